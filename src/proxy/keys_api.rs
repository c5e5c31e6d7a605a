//! The key stage: `/api/keys` (the signed-in caller's own key: read, store, delete, each
//! change audited), and otherwise the key to inject upstream — the caller's own, else the
//! fallback key. It owns whose slot a key lives in ([`owner`]); request and response shapes
//! are `keys::api`'s, storage and sealing the vault's.

use std::sync::Arc;

use bytes::Bytes;
use pingora::proxy::Session;

use super::body::read_body;
use super::{respond, RequestCtx, Route};
use crate::auth::{AuthError, Identity};
use crate::config::KeysSettings;
use crate::error::GatewayError;
use crate::keys::api;
use crate::keys::store::Owner;
use crate::keys::vault::{UserKey, Vault};

/// The vault and the fallback key, built once at startup.
pub struct KeyStage {
    /// The key vault, when enabled.
    pub vault: Option<Arc<Vault>>,
    /// `TWENTY_API_KEY`: injected for callers with no key of their own.
    pub fallback_key: Option<Arc<UserKey>>,
}

/// Whose slot an identity's key lives in (see [`Owner::of`]).
pub fn owner(keys: &KeysSettings, identity: &Identity) -> Owner {
    Owner::of(identity, keys.org_keys, keys.legacy_slot_issuer.as_deref())
}

/// `/api/keys`: the signed-in caller's own key.
pub async fn handle(
    keys: &KeysSettings,
    vault: &Vault,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    ctx.route = Route::Keys;
    let identity = ctx.identity.clone().ok_or(AuthError::Missing)?;
    let owner = owner(keys, &identity);
    let method = session.req_header().method.clone();
    let body = if method == http::Method::GET || method == http::Method::HEAD {
        let meta = vault.metadata(&owner).await?;
        api::metadata_body(meta.as_ref())
    } else if method == http::Method::POST {
        let raw = read_body(session, keys.max_body_bytes).await?;
        let new = api::parse_post(&raw, vault.rules())?;
        vault.put(&owner, &new.api_key, new.base_url, None).await?;
        tracing::info!(target: "keygate::audit", event = "key_stored", owner = %owner.slot(), issuer = %identity.issuer, request_id = %ctx.request_id, client_ip = ctx.client_ip.map(tracing::field::display));
        api::STORED.to_string()
    } else if method == http::Method::DELETE {
        let existed = vault.delete(&owner).await?;
        tracing::info!(target: "keygate::audit", event = "key_deleted", owner = %owner.slot(), issuer = %identity.issuer, existed, request_id = %ctx.request_id, client_ip = ctx.client_ip.map(tracing::field::display));
        api::DELETED.to_string()
    } else {
        return Err(GatewayError::MethodNotAllowed);
    };
    respond::json(
        session,
        ctx,
        200,
        Bytes::from(body),
        &[("cache-control", "no-store")],
    )
    .await;
    Ok(())
}

impl KeyStage {
    /// The key to inject: the caller's own, else the fallback, else a 400.
    pub async fn resolve(
        &self,
        keys: &KeysSettings,
        vault: &Vault,
        identity: Option<&Identity>,
    ) -> Result<Arc<UserKey>, GatewayError> {
        if let Some(identity) = identity {
            if let Some(key) = vault.lookup(&owner(keys, identity)).await? {
                return Ok(key);
            }
        }
        self.fallback_key.clone().ok_or(GatewayError::NoApiKey)
    }
}
