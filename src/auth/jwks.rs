//! One issuer's signing keys: fetched before the gateway is ready, refreshed in the background,
//! refetched on an unknown `kid` at most once per cooldown (single-flight, with a negative cache
//! of unknown kids), kept through an IdP outage up to a max-stale bound, then failed closed.
//!
//! This module never looks at a token; `auth::jwt` asks it for a key by id.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use thiserror::Error;
use url::Url;

use crate::cache::Expiring;
use crate::config::JwksSettings;

/// A verification key and the algorithms it may be used with.
pub struct VerifyKey {
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

struct KeySet {
    keys: HashMap<String, Arc<VerifyKey>>,
    fetched_at: Instant,
}

/// Why a key could not be had.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    /// The issuer's current key set has no such key id.
    #[error("unknown key id")]
    Unknown,
    /// No usable key set: never fetched, or older than the max-stale bound.
    #[error("signing keys unavailable")]
    Unavailable,
}

/// Why fetching a key set failed (logged, never shown to clients).
#[derive(Debug, Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("status {0}")]
    Status(u16),
    #[error("document larger than {0} bytes")]
    TooLarge(usize),
    #[error("invalid document: {0}")]
    Invalid(String),
    #[error("cannot read {0}: {1}")]
    File(PathBuf, std::io::Error),
}

enum Source {
    Url(Url),
    /// `{issuer}/.well-known/openid-configuration` names the JWKS URL; resolved on first fetch.
    Discovery {
        issuer: String,
        resolved: ArcSwapOption<Url>,
    },
    File(PathBuf),
}

/// The key cache for one issuer.
pub struct JwksCache {
    issuer: String,
    source: Source,
    allowed: Vec<Algorithm>,
    settings: JwksSettings,
    client: reqwest::Client,
    current: ArcSwapOption<KeySet>,
    /// Time of the last fetch attempt; the lock makes refetches single-flight.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
    /// Kids found in no fetched set, each until its cooldown ends.
    unknown_kids: Expiring<String, ()>,
    unknown_kid_cooldown: Duration,
    fetches: AtomicU64,
    fetch_errors: AtomicU64,
}

impl JwksCache {
    fn new(
        issuer: &str,
        source: Source,
        allowed: Vec<Algorithm>,
        settings: &JwksSettings,
        client: reqwest::Client,
    ) -> Self {
        Self {
            issuer: issuer.to_string(),
            source,
            allowed,
            settings: settings.clone(),
            client,
            current: ArcSwapOption::empty(),
            last_attempt: tokio::sync::Mutex::new(None),
            unknown_kids: Expiring::new(10_000),
            unknown_kid_cooldown: settings.unknown_kid_cooldown.max(Duration::from_secs(1)),
            fetches: AtomicU64::new(0),
            fetch_errors: AtomicU64::new(0),
        }
    }

    /// Keys fetched from a fixed JWKS URL.
    pub fn from_url(
        issuer: &str,
        url: Url,
        allowed: Vec<Algorithm>,
        settings: &JwksSettings,
        client: reqwest::Client,
    ) -> Self {
        Self::new(issuer, Source::Url(url), allowed, settings, client)
    }

    /// Keys found through the issuer's OpenID discovery document.
    pub fn from_discovery(
        issuer: &str,
        allowed: Vec<Algorithm>,
        settings: &JwksSettings,
        client: reqwest::Client,
    ) -> Self {
        let source = Source::Discovery {
            issuer: issuer.to_string(),
            resolved: ArcSwapOption::empty(),
        };
        Self::new(issuer, source, allowed, settings, client)
    }

    /// Keys read from a static JWKS file (offline development, air-gapped issuers).
    pub fn from_file(
        issuer: &str,
        path: PathBuf,
        allowed: Vec<Algorithm>,
        settings: &JwksSettings,
        client: reqwest::Client,
    ) -> Self {
        Self::new(issuer, Source::File(path), allowed, settings, client)
    }

    /// The issuer these keys belong to.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// How many fetches were attempted (for tests and metrics).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// How many fetches failed.
    pub fn fetch_error_count(&self) -> u64 {
        self.fetch_errors.load(Ordering::Relaxed)
    }

    /// Seconds since the key set was last loaded (`None` before the first load).
    pub fn age(&self) -> Option<Duration> {
        self.current
            .load()
            .as_ref()
            .map(|set| set.fetched_at.elapsed())
    }

    /// Whether a usable key set is loaded.
    pub fn is_ready(&self) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|set| self.is_usable(set))
    }

    fn is_usable(&self, set: &KeySet) -> bool {
        matches!(self.source, Source::File(_))
            || set.fetched_at.elapsed() <= self.settings.max_stale
    }

    /// The key for `kid`, refetching once per cooldown when it is unknown.
    pub async fn key(&self, kid: &str) -> Result<Arc<VerifyKey>, KeyError> {
        let requested_at = Instant::now();
        if let Some(found) = self.lookup(kid) {
            return Ok(found);
        }
        if self.is_ready() && self.unknown_kids.get(kid).is_some() {
            return Err(KeyError::Unknown);
        }
        self.refresh_throttled(requested_at).await;
        if let Some(found) = self.lookup(kid) {
            return Ok(found);
        }
        if self.is_ready() {
            if !self.settings.unknown_kid_cooldown.is_zero() {
                self.unknown_kids.insert(
                    kid.to_string(),
                    (),
                    Instant::now() + self.unknown_kid_cooldown,
                );
            }
            Err(KeyError::Unknown)
        } else {
            Err(KeyError::Unavailable)
        }
    }

    fn lookup(&self, kid: &str) -> Option<Arc<VerifyKey>> {
        let guard = self.current.load();
        guard
            .as_ref()
            .filter(|set| self.is_usable(set))
            .and_then(|set| set.keys.get(kid).cloned())
    }

    /// Refetch unless someone fetched within the cooldown; concurrent callers share one fetch.
    async fn refresh_throttled(&self, requested_at: Instant) {
        let mut last = self.last_attempt.lock().await;
        if let Some(at) = *last {
            // Another caller fetched while we waited for the lock, or one did recently.
            if at >= requested_at || at.elapsed() < self.settings.unknown_kid_cooldown {
                return;
            }
        }
        *last = Some(Instant::now());
        if let Err(e) = self.fetch_and_store().await {
            tracing::warn!(issuer = %self.issuer, error = %e, "JWKS refetch failed");
        }
    }

    /// Fetch now regardless of the cooldown (startup and the background refresher).
    pub async fn refresh(&self) -> Result<(), FetchError> {
        let mut last = self.last_attempt.lock().await;
        *last = Some(Instant::now());
        self.fetch_and_store().await
    }

    async fn fetch_and_store(&self) -> Result<(), FetchError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = self.fetch_and_store_once().await;
        if result.is_err() {
            self.fetch_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn fetch_and_store_once(&self) -> Result<(), FetchError> {
        let body = match &self.source {
            Source::File(path) => {
                std::fs::read(path).map_err(|e| FetchError::File(path.clone(), e))?
            }
            Source::Url(url) => self.get_capped(url.clone()).await?,
            Source::Discovery { issuer, resolved } => {
                let url = match resolved.load_full() {
                    Some(u) => (*u).clone(),
                    None => {
                        let u = self.discover(issuer).await?;
                        resolved.store(Some(Arc::new(u.clone())));
                        u
                    }
                };
                self.get_capped(url).await?
            }
        };
        let keys = parse_jwks(&body, &self.allowed, self.settings.max_keys)?;
        tracing::info!(issuer = %self.issuer, keys = keys.len(), "JWKS loaded");
        self.current.store(Some(Arc::new(KeySet {
            keys,
            fetched_at: Instant::now(),
        })));
        self.unknown_kids.clear();
        Ok(())
    }

    async fn discover(&self, issuer: &str) -> Result<Url, FetchError> {
        let url = Url::parse(&format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        ))
        .map_err(|e| FetchError::Invalid(e.to_string()))?;
        let body = self.get_capped(url).await?;
        let doc: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| FetchError::Invalid(e.to_string()))?;
        if doc.get("issuer").and_then(|v| v.as_str()) != Some(issuer) {
            return Err(FetchError::Invalid(
                "discovery document names another issuer".into(),
            ));
        }
        let jwks = doc
            .get("jwks_uri")
            .and_then(|v| v.as_str())
            .ok_or_else(|| FetchError::Invalid("no jwks_uri".into()))?;
        Url::parse(jwks).map_err(|e| FetchError::Invalid(e.to_string()))
    }

    async fn get_capped(&self, url: Url) -> Result<Vec<u8>, FetchError> {
        let mut resp = self
            .client
            .get(url)
            .timeout(self.settings.fetch_timeout)
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        let max = self.settings.max_bytes;
        if resp.content_length().is_some_and(|n| n as usize > max) {
            return Err(FetchError::TooLarge(max));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() + chunk.len() > max {
                return Err(FetchError::TooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// What a failed refresh leaves keygate with, in words for the log: only a usable key set
    /// is "kept"; with none, tokens of this issuer are answered 503.
    fn refresh_failure_message(&self) -> &'static str {
        if self.is_ready() {
            "JWKS refresh failed; keeping last good keys"
        } else if self.current.load().is_some() {
            "JWKS refresh failed; the last keys are older than max_stale, tokens of this issuer get 503"
        } else {
            "JWKS fetch failed; no signing keys loaded yet, tokens of this issuer get 503"
        }
    }

    /// Refresh forever: every `refresh_interval`, sooner after a failure.
    pub async fn run_refresher(self: Arc<Self>) {
        if matches!(self.source, Source::File(_)) {
            return;
        }
        let retry = Duration::from_secs(5);
        loop {
            let wait = if self.is_ready() {
                self.settings.refresh_interval
            } else {
                retry
            };
            tokio::time::sleep(wait).await;
            if let Err(e) = self.refresh().await {
                tracing::warn!(issuer = %self.issuer, error = %e, "{}", self.refresh_failure_message());
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

fn parse_jwks(
    body: &[u8],
    allowed: &[Algorithm],
    max_keys: usize,
) -> Result<HashMap<String, Arc<VerifyKey>>, FetchError> {
    let raw: RawSet =
        serde_json::from_slice(body).map_err(|e| FetchError::Invalid(e.to_string()))?;
    if raw.keys.len() > max_keys {
        return Err(FetchError::Invalid(format!(
            "{} keys exceed the limit of {max_keys}",
            raw.keys.len()
        )));
    }
    let mut keys = HashMap::new();
    for value in raw.keys {
        // One key we cannot use (another kty, an encryption key) must not hide the others.
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let family = key.family();
        let algorithms: Vec<Algorithm> = match jwk.common.key_algorithm {
            Some(ka) => match Algorithm::try_from(ka) {
                Ok(alg) if allowed.contains(&alg) => vec![alg],
                _ => Vec::new(),
            },
            None => allowed
                .iter()
                .copied()
                .filter(|a| a.family() == family)
                .collect(),
        };
        if algorithms.is_empty() {
            continue;
        }
        keys.insert(kid, Arc::new(VerifyKey { key, algorithms }));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> JwksSettings {
        JwksSettings {
            refresh_interval: Duration::from_secs(300),
            unknown_kid_cooldown: Duration::from_secs(30),
            max_stale: Duration::from_secs(3600),
            fetch_timeout: Duration::from_secs(1),
            max_bytes: 64 * 1024,
            max_keys: 32,
        }
    }

    #[test]
    fn a_failed_refresh_claims_kept_keys_only_when_there_are_some() {
        let cache = JwksCache::from_url(
            "https://issuer.example",
            Url::parse("http://127.0.0.1:9/jwks.json").expect("url"),
            vec![Algorithm::RS256],
            &settings(),
            reqwest::Client::new(),
        );
        let said = cache.refresh_failure_message();
        assert!(!said.contains("keeping last good keys"), "{said}");
        assert!(said.contains("no signing keys loaded yet"), "{said}");
        cache.current.store(Some(Arc::new(KeySet {
            keys: HashMap::new(),
            fetched_at: Instant::now(),
        })));
        assert!(cache
            .refresh_failure_message()
            .contains("keeping last good keys"));
    }
}
