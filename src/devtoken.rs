//! Offline development tokens: OAuth access tokens (`typ` at+jwt) signed with the `[dev]` key
//! from the config, for the issuer that `config/dev.toml` trusts through a static JWKS file.
//! `keygate dev-token` mints one from the command line; the dev authorization server
//! (`auth::dev_issuer`) mints the same shape for the clients it has authorized. It owns the
//! token's claims and its signature, not who may ask for one.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::config::{DevKeyError, DevSettings, Settings};

/// What to put in the token.
pub struct DevTokenRequest {
    pub subject: String,
    pub scopes: Vec<String>,
    pub ttl_secs: u64,
    pub org: Option<String>,
}

/// Why a dev token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevTokenError {
    #[error(transparent)]
    Key(#[from] DevKeyError),
    #[error("system clock before 1970")]
    Clock,
    #[error("signing the token failed")]
    Sign,
}

/// The dev key, loaded once, and what every token it signs says.
pub struct DevSigner {
    key: EncodingKey,
    issuer: String,
    kid: String,
    audience: String,
}

impl DevSigner {
    /// Load the `[dev]` signing key; tokens are issued for `audience` (the resource URL).
    pub fn load(dev: &DevSettings, audience: &str) -> Result<Self, DevTokenError> {
        let key = dev.signing_key()?;
        Ok(Self {
            key,
            issuer: dev.issuer.clone(),
            kid: dev.kid.clone(),
            audience: audience.to_string(),
        })
    }

    /// The public half as a JWKS document (`{"keys":[…]}`), with this signer's `kid`.
    pub fn jwks(&self) -> Result<serde_json::Value, DevTokenError> {
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&self.key, Algorithm::RS256)
            .map_err(|_| DevTokenError::Sign)?;
        jwk.common.key_id = Some(self.kid.clone());
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
        Ok(serde_json::json!({ "keys": [jwk] }))
    }

    /// Sign an access token for `req`, as issued to `client_id`.
    pub fn mint(&self, req: &DevTokenRequest, client_id: &str) -> Result<String, DevTokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| DevTokenError::Clock)?
            .as_secs();
        let mut header = Header::new(Algorithm::RS256);
        header.typ = Some("at+jwt".into());
        header.kid = Some(self.kid.clone());
        let mut claims = serde_json::json!({
            "iss": self.issuer,
            "sub": req.subject,
            "aud": self.audience,
            "client_id": client_id,
            "scope": req.scopes.join(" "),
            "iat": now,
            "nbf": now,
            "exp": now + req.ttl_secs,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        if let Some(org) = &req.org {
            claims["o"] = serde_json::json!({ "id": org });
        }
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|_| DevTokenError::Sign)
    }
}

/// Sign a development access token for `settings.dev`.
pub fn mint(settings: &Settings, req: &DevTokenRequest) -> anyhow::Result<String> {
    let dev = settings
        .dev
        .as_ref()
        .context("the config has no [dev] section (see config/dev.toml)")?;
    let signer = DevSigner::load(dev, &settings.resource.url)?;
    Ok(signer.mint(req, "keygate-dev")?)
}
