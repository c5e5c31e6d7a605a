//! The per-user key vault: each user's upstream API key sealed with AES-256-GCM
//! (`crypto`), kept in a store (`redis_store` or `embedded`, behind `store::KeyStore`), cached
//! and invalidated across replicas (`vault`), served at `/api/keys` (`api`), and migrated from
//! the Node Twenty MCP server (`import`).

pub mod api;
pub mod crypto;
pub mod embedded;
pub mod import;
pub mod redis_store;
pub mod store;
pub mod vault;

use secrecy::ExposeSecret;

use crate::config::KeysSettings;

/// Build the keyring from `API_KEY_ENCRYPTION_SECRET` and the retired secrets.
pub fn keyring(settings: &KeysSettings) -> Result<crypto::Keyring, String> {
    let active = settings.encryption_secret.as_ref().ok_or_else(|| {
        "keys.encryption_secret (API_KEY_ENCRYPTION_SECRET) is not set".to_string()
    })?;
    let previous: Vec<&str> = settings
        .previous_encryption_secrets
        .iter()
        .map(|s| s.expose_secret())
        .collect();
    crypto::Keyring::from_secrets(active.expose_secret(), &previous)
        .map_err(|e| format!("keys.encryption_secret (API_KEY_ENCRYPTION_SECRET): {e}"))
}
