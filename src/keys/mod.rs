//! The per-user key vault: each user's upstream API key sealed with AES-256-GCM
//! (`crypto`), kept in a store (`redis_store` or `embedded`, behind `store::KeyStore`), cached
//! and invalidated across replicas (`vault`), served at `/api/keys` (`api`), and migrated from
//! the Node Twenty MCP server (`import`); every key entering it is checked by `check`.

pub mod api;
pub mod check;
pub mod crypto;
pub mod embedded;
pub mod import;
pub mod redis_store;
pub mod store;
pub mod vault;

use std::sync::Arc;

use crate::config::KeysSettings;

/// The vault was asked for while no encryption secret is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("keys.encryption_secret (API_KEY_ENCRYPTION_SECRET) is not set")]
pub struct NoEncryptionSecret;

/// The keyring built (and checked) when the configuration was validated.
pub fn keyring(settings: &KeysSettings) -> Result<Arc<crypto::Keyring>, NoEncryptionSecret> {
    settings.keyring.clone().ok_or(NoEncryptionSecret)
}

/// The validated default key settings (with a test encryption secret), for unit tests.
#[cfg(test)]
pub(crate) fn test_settings() -> KeysSettings {
    crate::config::test_settings().keys
}
