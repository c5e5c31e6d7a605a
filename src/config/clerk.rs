//! `[clerk]`: Clerk as an issuer. The Frontend API (from `frontend_api_url`, `domain` or the
//! publishable key) is the issuer and serves the JWKS; the Backend API verifies opaque tokens,
//! within the call bounds set here.

use std::time::Duration;

use base64::Engine;
use jsonwebtoken::Algorithm;
use secrecy::SecretString;
use url::Url;

use super::auth::{claim_map, parse_algorithms};
use super::file::ClerkFile;
use super::parse::{parse_http_url, secs};
use super::Problems;

#[derive(Debug, Clone)]
pub struct ClerkSettings {
    /// Frontend API base, e.g. `https://clerk.example.com`; also the token issuer.
    pub frontend_api: Url,
    pub issuer: String,
    pub jwks_url: Url,
    pub api_url: Url,
    pub secret_key: Option<SecretString>,
    pub authorized_parties: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub audiences: Vec<String>,
    pub oauth_opaque_tokens: bool,
    pub m2m_tokens: bool,
    pub api_keys: bool,
    pub opaque_negative_ttl: Duration,
    pub opaque_max_ttl: Duration,
    pub backend_timeout: Duration,
    /// Backend API calls in flight at once, at most (>= 1).
    pub backend_max_in_flight: usize,
    /// Backend API calls started per second, in the long run (>= 1).
    pub backend_rate_per_sec: u32,
    /// Backend API calls that may start at once (>= 1).
    pub backend_burst: u32,
    /// The longest a call waits for a slot; never more than `backend_timeout`.
    pub backend_max_wait: Duration,
    /// Where Clerk tokens carry each fact (unset: Clerk's own claims).
    pub claims: super::ClaimMap,
}

impl ClerkSettings {
    /// Validate `[clerk]`; tokens are for `resource_url` unless `audiences` says otherwise.
    pub(crate) fn from_file(
        c: &ClerkFile,
        resource_url: &str,
        problems: &mut Problems,
    ) -> Option<ClerkSettings> {
        let fapi_raw = if let Some(u) = &c.frontend_api_url {
            Some((u.clone(), "clerk.frontend_api_url (CLERK_FRONTEND_API_URL)"))
        } else if let Some(d) = &c.domain {
            let d = d.trim_end_matches('/');
            let url = if d.starts_with("http://") || d.starts_with("https://") {
                d.to_string()
            } else {
                format!("https://{d}")
            };
            Some((url, "clerk.domain (CLERK_DOMAIN)"))
        } else if let Some(pk) = &c.publishable_key {
            match frontend_api_from_publishable_key(pk) {
                Some(host) => Some((
                    format!("https://{host}"),
                    "clerk.publishable_key (CLERK_PUBLISHABLE_KEY)",
                )),
                None => {
                    problems.push(
                        "clerk.publishable_key (CLERK_PUBLISHABLE_KEY)",
                        "is not a Clerk publishable key (pk_test_… or pk_live_…)",
                    );
                    return None;
                }
            }
        } else {
            problems.push(
                "clerk",
                "set one of publishable_key (CLERK_PUBLISHABLE_KEY), domain (CLERK_DOMAIN) or frontend_api_url (CLERK_FRONTEND_API_URL)",
            );
            return None;
        };
        let (raw, field) = fapi_raw?;
        let frontend_api = parse_http_url(field, raw.trim_end_matches('/'), problems)?;
        let issuer = frontend_api.as_str().trim_end_matches('/').to_string();
        let jwks_url = Url::parse(&format!("{issuer}/.well-known/jwks.json")).ok()?;
        let api_url = parse_http_url("clerk.api_url (CLERK_API_URL)", &c.api_url, problems)?;
        let secret_key = c.secret_key.clone().map(SecretString::from);
        let wants_backend = c.oauth_opaque_tokens || c.m2m_tokens || c.api_keys;
        if secret_key.is_none() && (c.m2m_tokens || c.api_keys) {
            problems.push(
                "clerk.secret_key (CLERK_SECRET_KEY)",
                "is required to verify M2M tokens and API keys",
            );
        }
        let algorithms = parse_algorithms("clerk.algorithms", &c.algorithms, problems);
        let audiences = if c.audiences.is_empty() {
            vec![resource_url.to_string()]
        } else {
            c.audiences.clone()
        };
        let backend_timeout = Duration::from_millis(c.backend_timeout_ms.max(1));
        let backend_max_wait = Duration::from_millis(c.backend_max_wait_ms);
        if backend_max_wait > backend_timeout {
            problems.push(
                "clerk.backend_max_wait_ms",
                format!(
                    "{} is longer than clerk.backend_timeout_ms ({}): a call never waits longer than the timeout",
                    c.backend_max_wait_ms, c.backend_timeout_ms
                ),
            );
        }
        if c.backend_max_in_flight == 0 {
            problems.push("clerk.backend_max_in_flight", "must be at least 1");
        }
        if c.backend_rate_per_sec == 0 || c.backend_burst == 0 {
            problems.push(
                "clerk.backend_rate_per_sec / clerk.backend_burst",
                "both must be at least 1",
            );
        }
        Some(ClerkSettings {
            frontend_api,
            issuer,
            jwks_url,
            api_url,
            oauth_opaque_tokens: c.oauth_opaque_tokens && secret_key.is_some() && wants_backend,
            secret_key,
            authorized_parties: c
                .authorized_parties
                .iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect(),
            algorithms,
            audiences,
            m2m_tokens: c.m2m_tokens,
            api_keys: c.api_keys,
            opaque_negative_ttl: secs(c.opaque_negative_ttl_secs),
            opaque_max_ttl: secs(c.opaque_max_ttl_secs.max(1)),
            backend_timeout,
            backend_max_in_flight: usize::try_from(c.backend_max_in_flight.max(1))
                .unwrap_or(usize::MAX),
            backend_rate_per_sec: c.backend_rate_per_sec.max(1),
            backend_burst: c.backend_burst.max(1),
            backend_max_wait: backend_max_wait.min(backend_timeout),
            claims: claim_map("clerk.claims", &c.claims, problems),
        })
    }
}

/// The Frontend API host encoded in a Clerk publishable key (`pk_test_<base64("host$")>`).
pub fn frontend_api_from_publishable_key(pk: &str) -> Option<String> {
    let encoded = pk
        .strip_prefix("pk_test_")
        .or_else(|| pk.strip_prefix("pk_live_"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded))
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let host = text.strip_suffix('$').unwrap_or(&text);
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        return None;
    }
    Some(host.to_string())
}
