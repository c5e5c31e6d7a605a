//! Authentication: from an `Authorization` header to a verified [`Identity`], or a refusal.
//!
//! Owns bearer extraction, the verified-token cache (keyed by a SHA-256 of the token, never
//! served past the token's expiry), dispatch to the right verifier (a JWT issuer picked by exact
//! `iss`, or Clerk's Backend API for opaque tokens), and readiness of the key sets.
//! Discovery documents live in `auth::discovery`. Policy on *what* an identity may do does not
//! live here.

pub mod claims;
pub mod clerk;
pub mod dev_issuer;
pub mod discovery;
pub mod error;
pub mod identity;
pub mod jwks;
pub mod jwt;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

pub use error::{AuthError, BearerError};
pub use identity::{Identity, OrgContext, TokenKind};

use crate::config::{KeySource, Settings};
use clerk::ClerkBackend;
use jwks::JwksCache;
use jwt::{ClerkRules, JwtIssuer};

/// Why authentication did not produce an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// The token is refused (401).
    Rejected(AuthError),
    /// A dependency needed to decide is down; fail closed (503).
    Unavailable(&'static str),
    /// Verification would need a Backend API call keygate's own bound refuses right now;
    /// fail closed (503), retry after this long (whole seconds).
    Saturated(Duration),
    /// The token is genuine but lacks a claim the issuer's mapping names, or carries it with
    /// the wrong type (403: a new token from the same account would not differ).
    Claims(claims::ClaimError),
}

impl From<AuthError> for AuthFailure {
    fn from(e: AuthError) -> Self {
        AuthFailure::Rejected(e)
    }
}

/// Pull the bearer token out of the request headers.
///
/// `Ok(None)`: no bearer credential. Two `Authorization` headers are a bad request; a token
/// over `max_bytes` is refused before anything parses it. The token's characters are checked
/// by [`Authenticator::authenticate`] on a cache miss ([`is_b64token`]).
pub fn bearer_token(
    headers: &http::HeaderMap,
    max_bytes: usize,
) -> Result<Option<&str>, BearerError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(BearerError::Repeated);
    }
    let bytes = value.as_bytes();
    if bytes.len() < 7 || !bytes[..7].eq_ignore_ascii_case(b"bearer ") {
        return Ok(None);
    }
    let token = std::str::from_utf8(&bytes[7..])
        .map_err(|_| AuthError::Malformed)?
        .trim_matches(' ');
    if token.len() > max_bytes {
        return Err(AuthError::TooLarge.into());
    }
    if token.trim_end_matches('=').is_empty() {
        return Err(AuthError::Malformed.into());
    }
    Ok(Some(token))
}

/// Whether `token` is an RFC 6750 `b64token`: ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" /
/// "/", then "=" padding. [`Authenticator::authenticate`] checks it before verifying a token it
/// has not seen; a token found in the verified-token cache is byte-for-byte one that passed.
pub fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    // Without early exit, so the check compiles to vector compares over the whole token.
    let charset = body.bytes().fold(true, |ok, b| {
        ok & (b.is_ascii_alphanumeric()
            | (b == b'-')
            | (b == b'.')
            | (b == b'_')
            | (b == b'~')
            | (b == b'+')
            | (b == b'/'))
    });
    !body.is_empty() && charset
}

/// A token authentication refused, and its kind as far as authentication had read it before
/// refusing: a label for the metrics of refused tokens, never trusted for a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub failure: AuthFailure,
    /// An opaque token's prefix kind; a JWT's `typ` (`oauth_jwt` when it names an access
    /// token, else `jwt`); `unknown` when refused before either was read.
    pub kind: &'static str,
}

impl Refused {
    fn new(failure: impl Into<AuthFailure>, kind: &'static str) -> Self {
        Self {
            failure: failure.into(),
            kind,
        }
    }
}

/// The kind label of a JWT, from the header decoded for its verification.
fn jwt_kind(header: Option<&jsonwebtoken::Header>) -> &'static str {
    match header {
        Some(h)
            if h.typ
                .as_deref()
                .is_some_and(|t| t.to_ascii_lowercase().ends_with("at+jwt")) =>
        {
            TokenKind::OAuthJwt.as_str()
        }
        Some(_) => "jwt",
        None => "unknown",
    }
}

/// The kind label of a token refused before it was parsed: its opaque prefix, if any.
fn unparsed_kind(token: &str) -> &'static str {
    clerk::opaque_kind(token).map_or("unknown", TokenKind::as_str)
}

/// Verifies bearer tokens against every configured issuer.
pub struct Authenticator {
    max_token_bytes: usize,
    issuers: HashMap<String, Arc<JwtIssuer>>,
    clerk: Option<ClerkBackend>,
    /// Verified identities by token hash. Entries are never returned past the token's `exp`;
    /// expired ones are dropped when met, or evicted like any other when the cache is full.
    verified: quick_cache::sync::Cache<[u8; 32], Arc<Identity>>,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

/// Counters of the verified-token cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Requests whose token was found verified and unexpired.
    pub hits: u64,
    /// Requests that had to verify their token.
    pub misses: u64,
}

impl Authenticator {
    /// Build verifiers from settings. Nothing is fetched yet: see [`Authenticator::key_sets`].
    pub fn new(settings: &Settings, client: reqwest::Client) -> Self {
        let mut issuers = HashMap::new();
        let leeway = settings.auth.leeway;
        let jwks_settings = &settings.jwks;
        if let Some(c) = &settings.clerk {
            let cache = Arc::new(JwksCache::from_url(
                &c.issuer,
                c.jwks_url.clone(),
                c.algorithms.clone(),
                jwks_settings,
                client.clone(),
            ));
            let rules = ClerkRules {
                authorized_parties: c.authorized_parties.clone(),
            };
            issuers.insert(
                c.issuer.clone(),
                Arc::new(JwtIssuer::new(
                    &c.issuer,
                    cache,
                    c.audiences.clone(),
                    &c.algorithms,
                    leeway,
                    Some(rules),
                    c.claims.clone(),
                )),
            );
        }
        for i in &settings.issuers {
            let cache = match &i.keys {
                KeySource::Url(u) => JwksCache::from_url(
                    &i.issuer,
                    u.clone(),
                    i.algorithms.clone(),
                    jwks_settings,
                    client.clone(),
                ),
                KeySource::Discovery => JwksCache::from_discovery(
                    &i.issuer,
                    i.algorithms.clone(),
                    jwks_settings,
                    client.clone(),
                ),
                KeySource::File(p) => JwksCache::from_file(
                    &i.issuer,
                    p.clone(),
                    i.algorithms.clone(),
                    jwks_settings,
                    client.clone(),
                ),
            };
            issuers.insert(
                i.issuer.clone(),
                Arc::new(JwtIssuer::new(
                    &i.issuer,
                    Arc::new(cache),
                    i.audiences.clone(),
                    &i.algorithms,
                    leeway,
                    None,
                    i.claims.clone(),
                )),
            );
        }
        let clerk = settings
            .clerk
            .as_ref()
            .and_then(|c| ClerkBackend::new(c, client.clone()));
        Self {
            max_token_bytes: settings.auth.max_token_bytes,
            issuers,
            clerk,
            verified: quick_cache::sync::Cache::new(
                usize::try_from(settings.auth.verified_cache_max_entries).unwrap_or(usize::MAX),
            ),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        }
    }

    /// Count Backend API calls refused by keygate's bound in `metrics`.
    pub fn attach_metrics(&mut self, metrics: &crate::telemetry::metrics::Metrics) {
        if let Some(clerk) = self.clerk.as_mut() {
            clerk.attach_metrics(metrics);
        }
    }

    /// The largest token accepted, in bytes.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Every issuer's key cache (to load at startup, refresh, and report readiness).
    pub fn key_sets(&self) -> Vec<Arc<JwksCache>> {
        self.issuers.values().map(|i| i.jwks().clone()).collect()
    }

    /// Verified-token cache counters (opaque tokens have their own cache in `clerk`).
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            hits: self.cache_hits.load(Ordering::Relaxed),
            misses: self.cache_misses.load(Ordering::Relaxed),
        }
    }

    /// Whether every issuer has usable keys.
    pub fn is_ready(&self) -> bool {
        self.issuers.values().all(|i| i.jwks().is_ready())
    }

    /// Verify `token`. Session tokens are refused unless `session_allowed`.
    pub async fn authenticate(
        &self,
        token: &str,
        session_allowed: bool,
    ) -> Result<Arc<Identity>, Refused> {
        if token.len() > self.max_token_bytes {
            return Err(Refused::new(AuthError::TooLarge, unparsed_kind(token)));
        }
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self.verified.get(&hash);
        let identity = match cached {
            Some(id) if id.expires_at.is_some_and(|e| e > SystemTime::now()) => {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                id
            }
            _ => {
                if cached.is_some() {
                    self.verified.remove(&hash);
                }
                self.cache_misses.fetch_add(1, Ordering::Relaxed);
                if !is_b64token(token) {
                    return Err(Refused::new(AuthError::Malformed, unparsed_kind(token)));
                }
                self.verify_uncached(token, hash).await?
            }
        };
        if identity.kind == TokenKind::ClerkSession && !session_allowed {
            // A session token is a JWT whose `typ` does not name an access token.
            return Err(Refused::new(AuthError::WrongKind, "jwt"));
        }
        Ok(identity)
    }

    async fn verify_uncached(&self, token: &str, hash: [u8; 32]) -> Result<Arc<Identity>, Refused> {
        if let Some(kind) = clerk::opaque_kind(token) {
            let refused = |f| Refused::new(f, kind.as_str());
            return match &self.clerk {
                Some(backend) => backend.verify(kind, token, hash).await.map_err(refused),
                None => Err(refused(AuthError::WrongKind.into())),
            };
        }
        // The header is decoded once: for the kind label, and for verification.
        let header = jsonwebtoken::decode_header(token).ok();
        let kind = jwt_kind(header.as_ref());
        let refused = |f| Refused::new(f, kind);
        let iss = jwt::peek_issuer(token).map_err(|e| refused(e.into()))?;
        let issuer = self
            .issuers
            .get(&iss)
            .ok_or_else(|| refused(AuthError::UnknownIssuer.into()))?;
        let header = header.ok_or_else(|| refused(AuthError::Malformed.into()))?;
        let identity = issuer
            .verify_with_header(token, header)
            .await
            .map_err(refused)?;
        let identity = Arc::new(identity);
        // Only tokens that expire are kept (a verified JWT always has `exp`).
        if identity.expires_at.is_some_and(|e| e > SystemTime::now()) {
            self.verified.insert(hash, identity.clone());
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for v in values {
            h.append(
                http::header::AUTHORIZATION,
                http::HeaderValue::from_str(v).expect("header"),
            );
        }
        h
    }

    /// Refusals carry the kind authentication read of the token (for the auth metric), so
    /// nothing parses a refused token a second time to label it.
    #[tokio::test]
    async fn refusals_carry_the_kind_authentication_read() {
        use base64::Engine;
        let settings = crate::config::test_settings();
        let auth = Authenticator::new(&settings, reqwest::Client::new());
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let jwt = |typ: &str| {
            let header = b64(serde_json::json!({ "alg": "RS256", "typ": typ, "kid": "k" }));
            let claims = b64(serde_json::json!({ "iss": "https://nobody.example", "sub": "u" }));
            format!("{header}.{claims}.c2ln")
        };
        let refused = |reason, kind| Refused::new(reason, kind);
        for (token, want) in [
            (
                jwt("at+jwt"),
                refused(AuthError::UnknownIssuer, "oauth_jwt"),
            ),
            (jwt("JWT"), refused(AuthError::UnknownIssuer, "jwt")),
            // The issuer is peeked first; a header that does not decode is then malformed.
            (
                format!("e30x.{}.c2ln", b64(serde_json::json!({ "iss": "x" }))),
                refused(AuthError::UnknownIssuer, "unknown"),
            ),
            (
                "oat_abc".to_string(),
                refused(AuthError::WrongKind, "oauth_opaque"),
            ),
            (
                "oat_a b".to_string(),
                refused(AuthError::Malformed, "oauth_opaque"),
            ),
            ("a b".to_string(), refused(AuthError::Malformed, "unknown")),
            ("abc".to_string(), refused(AuthError::Malformed, "unknown")),
        ] {
            assert_eq!(
                auth.authenticate(&token, true).await.err(),
                Some(want),
                "{token}"
            );
        }
    }

    #[test]
    fn b64token_charset() {
        assert!(is_b64token("abc.DEF-_~+/09=="));
        assert!(is_b64token("oat_abc"));
        for bad in ["a b", "a$b", "a\"b", "ab=c", "===", "", "é"] {
            assert!(!is_b64token(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn bearer_extraction_rules() {
        assert_eq!(bearer_token(&headers(&[]), 100).ok(), Some(None));
        assert_eq!(
            bearer_token(&headers(&["Bearer abc.def-_~+/=="]), 100).ok(),
            Some(Some("abc.def-_~+/=="))
        );
        assert_eq!(
            bearer_token(&headers(&["bearer abc"]), 100).ok(),
            Some(Some("abc"))
        );
        assert_eq!(
            bearer_token(&headers(&["Basic dXNlcg=="]), 100).ok(),
            Some(None)
        );
        assert!(matches!(
            bearer_token(&headers(&["Bearer a", "Bearer b"]), 100),
            Err(BearerError::Repeated)
        ));
        // The charset is checked by `authenticate`, before verification (`is_b64token`).
        assert_eq!(
            bearer_token(&headers(&["Bearer a b"]), 100).ok(),
            Some(Some("a b"))
        );
        assert!(matches!(
            bearer_token(&headers(&["Bearer ==="]), 100),
            Err(BearerError::Token(AuthError::Malformed))
        ));
        assert!(matches!(
            bearer_token(&headers(&[&format!("Bearer {}", "a".repeat(101))]), 100),
            Err(BearerError::Token(AuthError::TooLarge))
        ));
    }
}

/// Property tests over bearer extraction, which reads whatever a client sends.
#[cfg(test)]
mod prop {
    use proptest::prelude::*;

    use super::{bearer_token, is_b64token, jwt_kind, unparsed_kind};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Any Authorization value is decided without a panic; a token handed on is within the
        /// size cap, part of the header, and never empty or padding only.
        #[test]
        fn bearer_values_are_decided_within_bounds(
            value in prop::collection::vec(any::<u8>(), 0..96),
            scheme in prop::sample::select(vec!["Bearer ", "bearer ", "BEARER  ", "Basic ", ""]),
            max in 1usize..64,
        ) {
            let mut raw = scheme.as_bytes().to_vec();
            raw.extend_from_slice(&value);
            let Ok(header) = http::HeaderValue::from_bytes(&raw) else {
                return Ok(());
            };
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, header.clone());
            if let Ok(Some(token)) = bearer_token(&headers, max) {
                prop_assert!(token.len() <= max);
                prop_assert!(!token.trim_end_matches('=').is_empty());
                let text = String::from_utf8_lossy(header.as_bytes()).into_owned();
                prop_assert!(text.contains(token));
                let _ = unparsed_kind(token);
                let _ = jwt_kind(jsonwebtoken::decode_header(token).ok().as_ref());
                let _ = is_b64token(token);
            }
            // A second Authorization header is always refused.
            headers.append(http::header::AUTHORIZATION, header);
            prop_assert!(bearer_token(&headers, max).is_err());
        }

        /// Token-shaped strings of any content are classified without a panic.
        #[test]
        fn any_token_text_is_classified(token in "\\PC{0,200}") {
            let _ = unparsed_kind(&token);
            let _ = jwt_kind(jsonwebtoken::decode_header(&token).ok().as_ref());
            let _ = is_b64token(&token);
        }
    }
}
