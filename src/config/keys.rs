//! `[keys]` and `[redis]`: the key vault (its encryption secrets, which the keys module turns
//! into its keyring at startup, the base URLs it accepts, its bounds and cache) and the shared
//! Redis store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use super::clerk::ClerkSettings;
use super::file::{KeysFile, RedisFile};
use super::issuers::IssuerSettings;
use super::parse::{parse_http_url, resolve_path, secs};
use super::Problems;

/// The key vault.
#[derive(Debug, Clone)]
pub struct KeysSettings {
    pub enabled: bool,
    pub data_dir: PathBuf,
    pub encryption_secret: Option<SecretString>,
    pub previous_encryption_secrets: Vec<SecretString>,
    pub org_keys: bool,
    /// The issuer whose users' key slots are named by subject alone, as they were before slots
    /// named the issuer (see `keys::store::Owner::of`); `None`: every slot is qualified.
    pub legacy_slot_issuer: Option<String>,
    pub fallback_api_key: Option<SecretString>,
    pub default_base_url: Option<String>,
    pub allowed_base_url_hosts: Vec<String>,
    pub max_key_bytes: usize,
    pub max_body_bytes: usize,
    pub cache_ttl: Duration,
    pub cache_max_entries: u64,
}

/// The shared Redis key store.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub cluster: bool,
    pub key_prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

impl KeysSettings {
    /// Validate `[keys]`; the legacy slot issuer must be one of the trusted issuers.
    pub(crate) fn from_file(
        k: &KeysFile,
        base: &Path,
        clerk: Option<&ClerkSettings>,
        issuers: &[IssuerSettings],
        problems: &mut Problems,
    ) -> KeysSettings {
        if k.enabled && k.encryption_secret.is_none() {
            problems.push(
                "keys.encryption_secret (API_KEY_ENCRYPTION_SECRET)",
                "is required while the key vault is enabled (or set keys.enabled = false)",
            );
        }
        let default_base_url = match &k.default_base_url {
            Some(raw) => parse_http_url("keys.default_base_url (TWENTY_BASE_URL)", raw, problems)
                .map(|u| u.as_str().trim_end_matches('/').to_string()),
            None => None,
        };
        let mut allowed_base_url_hosts: Vec<String> = k
            .allowed_base_url_hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        if allowed_base_url_hosts.is_empty() {
            let base = default_base_url
                .clone()
                .unwrap_or_else(|| "https://api.twenty.com".to_string());
            if let Some(host) = Url::parse(&base)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
            {
                allowed_base_url_hosts.push(host.to_ascii_lowercase());
            }
        }
        if k.max_key_bytes == 0 || k.max_key_bytes > 64 * 1024 {
            problems.push("keys.max_key_bytes", "must be between 1 and 65536");
        }
        if k.max_body_bytes < 256 || k.max_body_bytes > 1024 * 1024 {
            problems.push("keys.max_body_bytes", "must be between 256 and 1048576");
        }
        KeysSettings {
            enabled: k.enabled,
            data_dir: resolve_path(base, &k.data_dir),
            encryption_secret: k.encryption_secret.clone().map(SecretString::from),
            previous_encryption_secrets: k
                .previous_encryption_secrets
                .iter()
                .cloned()
                .map(SecretString::from)
                .collect(),
            org_keys: k.org_keys,
            legacy_slot_issuer: legacy_slot_issuer(
                k.legacy_slot_issuer.as_deref(),
                clerk.map(|c| c.issuer.as_str()),
                issuers,
                problems,
            ),
            fallback_api_key: k.fallback_api_key.clone().map(SecretString::from),
            default_base_url,
            allowed_base_url_hosts,
            max_key_bytes: k.max_key_bytes,
            max_body_bytes: k.max_body_bytes,
            cache_ttl: secs(k.cache_ttl_secs.max(1)),
            cache_max_entries: k.cache_max_entries.max(1),
        }
    }
}

impl RedisConfig {
    /// Validate `[redis]`; `None` when no URL is set.
    pub(crate) fn from_file(f: &RedisFile, problems: &mut Problems) -> Option<RedisConfig> {
        let url = f.url.as_ref()?;
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://"))
        {
            problems.push(
                "redis.url (REDIS_URL)",
                "must start with redis:// or rediss://",
            );
        }
        Some(RedisConfig {
            url: url.clone(),
            cluster: f.cluster,
            key_prefix: f.key_prefix.clone(),
            connect_timeout: Duration::from_millis(f.connect_timeout_ms.max(1)),
            command_timeout: Duration::from_millis(f.command_timeout_ms.max(1)),
        })
    }
}

/// `keys.legacy_slot_issuer`: as set (empty for none, else a trusted issuer), or by default
/// Clerk's issuer when Clerk is configured, else the issuer when exactly one is trusted — the
/// issuer whose records were written as `user:<sub>` before slots named the issuer.
fn legacy_slot_issuer(
    set: Option<&str>,
    clerk: Option<&str>,
    issuers: &[IssuerSettings],
    problems: &mut Problems,
) -> Option<String> {
    let trusted: Vec<&str> = clerk
        .into_iter()
        .chain(issuers.iter().map(|i| i.issuer.as_str()))
        .collect();
    match set {
        Some("") => None,
        Some(s) if trusted.contains(&s) => Some(s.to_string()),
        Some(s) => {
            problems.push(
                "keys.legacy_slot_issuer",
                format!("{s:?} is not a trusted issuer (Clerk's or an [[issuers]] entry's)"),
            );
            None
        }
        None => match (clerk, trusted.as_slice()) {
            (Some(c), _) => Some(c.to_string()),
            (None, [only]) => Some(only.to_string()),
            _ => None,
        },
    }
}
