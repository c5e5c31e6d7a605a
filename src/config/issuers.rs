//! `[[issuers]]` and `[jwks]`: the OpenID issuers trusted besides Clerk, where each one's keys
//! come from, and how JWKS documents are fetched and cached.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use url::Url;

use super::auth::{claim_map, parse_algorithms};
use super::clerk::ClerkSettings;
use super::file::{FileConfig, IssuerFile, JwksFile};
use super::parse::{parse_http_url, resolve_path, secs};
use super::Problems;

#[derive(Debug, Clone)]
pub enum KeySource {
    /// Fetched from this URL and refreshed.
    Url(Url),
    /// Discovered from `{issuer}/.well-known/openid-configuration` at startup.
    Discovery,
    /// A static JWKS document read at startup.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct IssuerSettings {
    pub issuer: String,
    pub keys: KeySource,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    /// Where this issuer's tokens carry each fact.
    pub claims: super::ClaimMap,
}

#[derive(Debug, Clone)]
pub struct JwksSettings {
    pub refresh_interval: Duration,
    pub unknown_kid_cooldown: Duration,
    pub max_stale: Duration,
    pub fetch_timeout: Duration,
    pub max_bytes: usize,
    pub max_keys: usize,
}

impl KeySource {
    /// Where `[[issuers]]` entry `field` gets its keys: `jwks_url`, `jwks_file`, or (neither)
    /// discovery from the issuer URL. `None` when the entry cannot be used.
    fn from_file(
        field: &str,
        iss: &IssuerFile,
        base: &Path,
        problems: &mut Problems,
    ) -> Option<KeySource> {
        Some(match (&iss.jwks_url, &iss.jwks_file) {
            (Some(_), Some(_)) => {
                problems.push(field, "set jwks_url or jwks_file, not both");
                return None;
            }
            (Some(u), None) => {
                KeySource::Url(parse_http_url(&format!("{field}.jwks_url"), u, problems)?)
            }
            (None, Some(p)) => {
                let path = resolve_path(base, p);
                if !path.is_file() {
                    problems.push(
                        format!("{field}.jwks_file"),
                        format!("{} does not exist", path.display()),
                    );
                }
                KeySource::File(path)
            }
            (None, None) => {
                parse_http_url(&format!("{field}.issuer"), &iss.issuer, problems)?;
                KeySource::Discovery
            }
        })
    }
}

/// Validate `[[issuers]]`; tokens are for `resource_url` unless an entry's `audiences` says
/// otherwise. An unusable entry is left out (its problems are recorded).
pub(crate) fn issuers_from_file(
    f: &[IssuerFile],
    base: &Path,
    resource_url: &str,
    problems: &mut Problems,
) -> Vec<IssuerSettings> {
    let mut issuers = Vec::new();
    for (i, iss) in f.iter().enumerate() {
        let field = format!("issuers[{i}]");
        if iss.issuer.is_empty() {
            problems.push(format!("{field}.issuer"), "is required");
            continue;
        }
        if iss.issuer.contains('|') {
            // `|` separates issuer and subject in key slots, limiter keys and session bindings.
            problems.push(format!("{field}.issuer"), "must not contain '|'");
            continue;
        }
        let Some(keys) = KeySource::from_file(&field, iss, base, problems) else {
            continue;
        };
        issuers.push(IssuerSettings {
            issuer: iss.issuer.clone(),
            keys,
            audiences: if iss.audiences.is_empty() {
                vec![resource_url.to_string()]
            } else {
                iss.audiences.clone()
            },
            algorithms: parse_algorithms(&format!("{field}.algorithms"), &iss.algorithms, problems),
            claims: claim_map(&format!("{field}.claims"), &iss.claims, problems),
        });
    }
    issuers
}

impl JwksSettings {
    /// Validate `[jwks]`.
    pub(crate) fn from_file(f: &JwksFile, problems: &mut Problems) -> JwksSettings {
        if f.max_keys == 0 || f.max_bytes < 256 {
            problems.push("jwks", "max_keys must be >= 1 and max_bytes >= 256");
        }
        JwksSettings {
            refresh_interval: secs(f.refresh_interval_secs.max(10)),
            unknown_kid_cooldown: secs(f.unknown_kid_cooldown_secs),
            max_stale: secs(f.max_stale_secs),
            fetch_timeout: secs(f.fetch_timeout_secs.max(1)),
            max_bytes: f.max_bytes,
            max_keys: f.max_keys,
        }
    }
}

/// The issuers trusted together: at least one while authentication is enabled, none twice.
pub(crate) fn check_issuers(
    f: &FileConfig,
    clerk: Option<&ClerkSettings>,
    issuers: &[IssuerSettings],
    problems: &mut Problems,
) {
    if f.auth.enabled && clerk.is_none() && issuers.is_empty() && f.clerk.is_none() {
        problems.push(
            "auth",
            "authentication is enabled but no issuer is configured: add [clerk] (or CLERK_PUBLISHABLE_KEY) or [[issuers]], or set AUTH_ENABLED=false",
        );
    }
    {
        let mut seen = std::collections::HashSet::new();
        let all = clerk
            .iter()
            .map(|c| c.issuer.as_str())
            .chain(issuers.iter().map(|i| i.issuer.as_str()));
        for iss in all {
            if !seen.insert(iss) {
                problems.push("issuers", format!("issuer {iss:?} is configured twice"));
            }
        }
    }
}
