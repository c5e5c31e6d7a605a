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

use secrecy::ExposeSecret;

use crate::config::{KeysSettings, Problems};

/// The vault was asked for while no encryption secret is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("keys.encryption_secret (API_KEY_ENCRYPTION_SECRET) is not set")]
pub struct NoEncryptionSecret;

/// `[keys]` compiled at startup: the keyring from the encryption secrets, while the vault is
/// enabled and a secret is set (`None` otherwise). A weak or repeated secret is a configuration
/// problem naming `keys.encryption_secret`.
pub fn compile_keyring(
    settings: &KeysSettings,
    problems: &mut Problems,
) -> Option<Arc<crypto::Keyring>> {
    let active = settings
        .encryption_secret
        .as_ref()
        .filter(|_| settings.enabled)?;
    let previous: Vec<&str> = settings
        .previous_encryption_secrets
        .iter()
        .map(|s| s.expose_secret())
        .collect();
    match crypto::Keyring::from_secrets(active.expose_secret(), &previous) {
        Ok(ring) => Some(Arc::new(ring)),
        Err(e) => {
            problems.push(
                "keys.encryption_secret (API_KEY_ENCRYPTION_SECRET)",
                e.to_string(),
            );
            None
        }
    }
}

/// The validated default key settings (with a test encryption secret), for unit tests.
#[cfg(test)]
pub(crate) fn test_settings() -> KeysSettings {
    crate::config::test_settings().keys
}

/// The keyring of [`test_settings`], for unit tests.
#[cfg(test)]
pub(crate) fn test_keyring() -> Arc<crypto::Keyring> {
    let mut problems = Problems::default();
    compile_keyring(&test_settings(), &mut problems).expect("the test secret makes a keyring")
}
