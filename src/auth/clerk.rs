//! Clerk's opaque credentials — OAuth access tokens (`oat_`), M2M tokens (`mt_`) and API keys
//! (`ak_`) — verified through Clerk's Backend API.
//!
//! Results are cached by a hash of the token: a valid token until its expiry (capped), an
//! invalid one for a short negative TTL. Concurrent checks of one token share one call. When
//! the Backend API cannot answer, only live cache entries are trusted: everything else fails
//! closed.
//!
//! Calls are bounded, so that a flood of made-up tokens cannot spend Clerk's rate limit (per
//! Clerk instance, shared by every replica) that real users' new tokens need: at most
//! `backend_max_in_flight` at once, started at most `backend_rate_per_sec` per second in the
//! long run (bursts of `backend_burst`). A call waits for a slot at most `backend_max_wait`;
//! a call that gets none is not made and its request is answered 503 with `Retry-After` (never
//! "valid"). `backend_timeout` bounds the whole verification, the wait for a slot included.
//! Cache hits never wait for a slot. The bound is per replica.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::identity::{Identity, OrgContext, TokenKind};
use super::AuthError;
use super::AuthFailure;
use crate::cache::Expiring;
use crate::config::ClerkSettings;

/// The opaque token kinds, recognised by prefix.
pub fn opaque_kind(token: &str) -> Option<TokenKind> {
    if token.starts_with("oat_") {
        Some(TokenKind::OAuthOpaque)
    } else if token.starts_with("mt_") {
        Some(TokenKind::M2m)
    } else if token.starts_with("ak_") {
        Some(TokenKind::ApiKey)
    } else {
        None
    }
}

#[derive(Clone)]
enum Outcome {
    Valid(Arc<Identity>),
    Rejected(AuthError),
}

/// How long an outcome is kept: a refusal for the negative TTL; a valid credential until it
/// expires, at most `max_ttl`.
struct OutcomeLifetime {
    negative_ttl: Duration,
    max_ttl: Duration,
}

impl OutcomeLifetime {
    fn of(&self, outcome: &Outcome, now: SystemTime) -> Duration {
        match outcome {
            Outcome::Rejected(_) => self.negative_ttl,
            Outcome::Valid(id) => id
                .expires_at
                .and_then(|exp| exp.duration_since(now).ok())
                .map_or(self.max_ttl, |left| left.min(self.max_ttl)),
        }
    }
}

/// Start times for Backend API calls, by reservation: GCRA (see `policy::ratelimit`) where a
/// call that does not conform yet may book the moment it will, if that is soon enough.
struct Pacer {
    /// Emission interval `T`.
    interval: Duration,
    /// `τ = T × burst`.
    tolerance: Duration,
    /// The theoretical arrival time; `None` (or a past one) is a full bucket.
    tat: Mutex<Option<Instant>>,
}

impl Pacer {
    /// `per_sec` starts per second in the long run (`T = 1 s / per_sec`), bursts of `burst`;
    /// both are at least 1 (checked with the configuration).
    fn new(per_sec: u32, burst: u32) -> Self {
        let interval = Duration::from_secs(1) / per_sec.max(1);
        Self {
            interval,
            tolerance: interval.saturating_mul(burst),
            tat: Mutex::new(None),
        }
    }

    /// Book the earliest start at or after `now` the rate allows, if it is no later than
    /// `latest`; otherwise book nothing and say how long until one would be free.
    fn reserve(&self, now: Instant, latest: Instant) -> Result<Instant, Duration> {
        let mut tat = self.tat.lock().unwrap_or_else(PoisonError::into_inner);
        let new_tat = tat.map_or(now, |t| t.max(now)) + self.interval;
        let start = new_tat
            .checked_sub(self.tolerance)
            .map_or(now, |s| s.max(now));
        if start > latest {
            return Err(start - now);
        }
        *tat = Some(new_tat);
        Ok(start)
    }
}

/// What keygate allows itself to ask of the Backend API.
struct CallBound {
    slots: tokio::sync::Semaphore,
    pacer: Pacer,
    max_wait: Duration,
    timeout: Duration,
    /// `keygate_clerk_backend_refused_total` by reason, once metrics are attached.
    refused: Option<[prometheus::IntCounter; 2]>,
}

/// Which limit refused a call.
#[derive(Debug, Clone, Copy)]
enum Limit {
    Concurrency = 0,
    Rate = 1,
}

/// `Retry-After` suggested when no call slot freed up in time.
const RETRY_WHEN_SATURATED: Duration = Duration::from_secs(1);

/// Whole seconds, rounded up ([`crate::retry_after::whole_secs`]), and at least one.
fn whole_secs(d: Duration) -> Duration {
    crate::retry_after::whole_secs(d).max(Duration::from_secs(1))
}

impl CallBound {
    /// Wait for a slot and a start time, then run `call` within what is left of the timeout.
    async fn run<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let started = Instant::now();
        let give_up = started + self.max_wait;
        let Ok(Ok(_permit)) = tokio::time::timeout(self.max_wait, self.slots.acquire()).await
        else {
            return Err(self.refuse(Limit::Concurrency, RETRY_WHEN_SATURATED));
        };
        let start = match self.pacer.reserve(Instant::now(), give_up) {
            Ok(start) => start,
            Err(wait) => return Err(self.refuse(Limit::Rate, whole_secs(wait))),
        };
        tokio::time::sleep_until(start.into()).await;
        let left = self.timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, call).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::TimedOut),
        }
    }

    fn refuse(&self, limit: Limit, retry_after: Duration) -> BackendError {
        if let Some(counters) = &self.refused {
            counters[limit as usize].inc();
        }
        BackendError::Saturated { limit, retry_after }
    }
}

/// Verifies opaque Clerk credentials through the Backend API, with caching and coalescing.
pub struct ClerkBackend {
    client: reqwest::Client,
    api_url: Url,
    issuer: String,
    secret_key: Option<SecretString>,
    oauth: bool,
    m2m: bool,
    api_keys: bool,
    bound: CallBound,
    lifetime: OutcomeLifetime,
    cache: Expiring<[u8; 32], Outcome, BackendError>,
}

#[derive(Deserialize)]
struct VerifyResponse {
    subject: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    revoked: bool,
    #[serde(default)]
    expired: bool,
    /// Unix milliseconds, or null for credentials that do not expire.
    expiration: Option<i64>,
    client_id: Option<String>,
}

/// Why the Backend API could not give an answer (never cached).
#[derive(Debug, thiserror::Error)]
enum BackendError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("status {0}")]
    Status(u16),
    #[error("no answer within the timeout")]
    TimedOut,
    /// keygate's own bound refused the call; it was not made.
    #[error("calls saturated ({limit:?} limit)")]
    Saturated { limit: Limit, retry_after: Duration },
}

impl ClerkBackend {
    /// Build from settings; `None` when no opaque kind is enabled or there is no secret key.
    pub fn new(settings: &ClerkSettings, client: reqwest::Client) -> Option<Self> {
        let enabled = settings.oauth_opaque_tokens || settings.m2m_tokens || settings.api_keys;
        if !enabled || settings.secret_key.is_none() {
            return None;
        }
        Some(Self {
            client,
            api_url: settings.api_url.clone(),
            issuer: settings.issuer.clone(),
            secret_key: settings.secret_key.clone(),
            oauth: settings.oauth_opaque_tokens,
            m2m: settings.m2m_tokens,
            api_keys: settings.api_keys,
            bound: CallBound {
                slots: tokio::sync::Semaphore::new(settings.backend_max_in_flight),
                pacer: Pacer::new(settings.backend_rate_per_sec, settings.backend_burst),
                max_wait: settings.backend_max_wait.min(settings.backend_timeout),
                timeout: settings.backend_timeout,
                refused: None,
            },
            lifetime: OutcomeLifetime {
                negative_ttl: settings.opaque_negative_ttl,
                max_ttl: settings.opaque_max_ttl,
            },
            cache: Expiring::new(100_000),
        })
    }

    /// Count calls refused by the bound in `metrics`.
    pub fn attach_metrics(&mut self, metrics: &crate::telemetry::metrics::Metrics) {
        let counter = |reason: &str| metrics.clerk_backend_refused.with_label_values(&[reason]);
        self.bound.refused = Some([counter("concurrency"), counter("rate")]);
    }

    fn enabled(&self, kind: TokenKind) -> bool {
        match kind {
            TokenKind::OAuthOpaque => self.oauth,
            TokenKind::M2m => self.m2m,
            TokenKind::ApiKey => self.api_keys,
            _ => false,
        }
    }

    /// Verify an opaque token of `kind`; `hash` is the token's SHA-256, the cache key.
    pub async fn verify(
        &self,
        kind: TokenKind,
        token: &str,
        hash: [u8; 32],
    ) -> Result<Arc<Identity>, AuthFailure> {
        if !self.enabled(kind) {
            return Err(AuthError::WrongKind.into());
        }
        let outcome = self
            .cache
            .get_or_try_insert(&hash, async {
                let outcome = self.bound.run(self.call(kind, token)).await?;
                let keep = self.lifetime.of(&outcome, SystemTime::now());
                Ok((outcome, Instant::now() + keep))
            })
            .await;
        match outcome {
            Ok(Outcome::Valid(id)) => {
                if id.expires_at.is_some_and(|exp| exp <= SystemTime::now()) {
                    return Err(AuthError::Expired.into());
                }
                Ok(id)
            }
            Ok(Outcome::Rejected(e)) => Err(e.into()),
            Err(e) => match &*e {
                BackendError::Saturated { limit, retry_after } => {
                    tracing::debug!(?limit, "Clerk Backend API call refused by keygate's bound");
                    Err(AuthFailure::Saturated(*retry_after))
                }
                other => {
                    tracing::warn!(error = %other, kind = kind.as_str(), "Clerk Backend API verification failed");
                    Err(AuthFailure::Unavailable("token verification"))
                }
            },
        }
    }

    async fn call(&self, kind: TokenKind, token: &str) -> Result<Outcome, BackendError> {
        let (path, body) = match kind {
            TokenKind::OAuthOpaque => (
                "v1/oauth_applications/access_tokens/verify",
                serde_json::json!({ "access_token": token }),
            ),
            TokenKind::M2m => (
                "v1/m2m_tokens/verify",
                serde_json::json!({ "token": token }),
            ),
            _ => ("v1/api_keys/verify", serde_json::json!({ "secret": token })),
        };
        let base = self.api_url.as_str().trim_end_matches('/');
        let secret = self
            .secret_key
            .as_ref()
            .map(|s| s.expose_secret().to_string())
            .unwrap_or_default();
        let resp = self
            .client
            .post(format!("{base}/{path}"))
            .bearer_auth(secret)
            .json(&body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        match status {
            200 => {}
            // The token is unknown or malformed: a definite "no", cached briefly.
            400 | 404 | 410 | 422 => return Ok(Outcome::Rejected(AuthError::Invalid)),
            // 401/403 mean keygate's own secret key is wrong; 429/5xx mean try later.
            other => return Err(BackendError::Status(other)),
        }
        let parsed: VerifyResponse = resp.json().await?;
        if parsed.revoked {
            return Ok(Outcome::Rejected(AuthError::Revoked));
        }
        let expires_at = parsed
            .expiration
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        if parsed.expired || expires_at.is_some_and(|e| e <= SystemTime::now()) {
            return Ok(Outcome::Rejected(AuthError::Expired));
        }
        let Some(subject) = parsed.subject.filter(|s| !s.is_empty()) else {
            return Ok(Outcome::Rejected(AuthError::MissingClaim));
        };
        let org = subject.starts_with("org_").then(|| OrgContext {
            id: subject.clone(),
            ..OrgContext::default()
        });
        Ok(Outcome::Valid(Arc::new(Identity {
            subject,
            issuer: self.issuer.clone(),
            kind,
            scopes: parsed.scopes,
            client_id: parsed.client_id,
            roles: org
                .as_ref()
                .and_then(|o| o.role.clone())
                .into_iter()
                .collect(),
            org,
            expires_at,
            email: None,
            email_verified: None,
            second_factor_at: None,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn outcomes_are_kept_for_their_own_lifetime() {
        let lifetime = OutcomeLifetime {
            negative_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
        };
        let now = SystemTime::now();
        let valid = |expires_at: Option<SystemTime>| {
            let mut id = Identity::new("https://clerk.example", "user_1", TokenKind::OAuthOpaque);
            id.expires_at = expires_at;
            Outcome::Valid(Arc::new(id))
        };
        let secs = Duration::from_secs;
        assert_eq!(
            lifetime.of(&Outcome::Rejected(AuthError::Revoked), now),
            secs(5)
        );
        assert_eq!(lifetime.of(&valid(Some(now + secs(10))), now), secs(10));
        assert_eq!(lifetime.of(&valid(Some(now + secs(3_600))), now), secs(300));
        assert_eq!(lifetime.of(&valid(None), now), secs(300));
    }

    #[test]
    fn the_pacer_lets_a_burst_start_at_once_then_books_one_start_per_interval() {
        // 10 per second (T = 100 ms), bursts of 3.
        let pacer = Pacer::new(10, 3);
        let t0 = Instant::now();
        let latest = t0 + 250 * MS;
        for _ in 0..3 {
            assert_eq!(pacer.reserve(t0, latest), Ok(t0));
        }
        assert_eq!(pacer.reserve(t0, latest), Ok(t0 + 100 * MS));
        assert_eq!(pacer.reserve(t0, latest), Ok(t0 + 200 * MS));
        // The next start would be at 300 ms, past the latest acceptable: nothing is booked.
        assert_eq!(pacer.reserve(t0, latest), Err(300 * MS));
        assert_eq!(pacer.reserve(t0, t0 + 300 * MS), Ok(t0 + 300 * MS));
        // After a quiet second the whole burst is back.
        let later = t0 + Duration::from_secs(2);
        for _ in 0..3 {
            assert_eq!(pacer.reserve(later, later), Ok(later));
        }
        assert_eq!(pacer.reserve(later, later), Err(100 * MS));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(whole_secs(300 * MS), Duration::from_secs(1));
        assert_eq!(
            whole_secs(Duration::from_millis(1_001)),
            Duration::from_secs(2)
        );
        assert_eq!(whole_secs(Duration::from_secs(2)), Duration::from_secs(2));
    }

    #[test]
    fn prefixes_pick_the_kind() {
        assert_eq!(opaque_kind("oat_x"), Some(TokenKind::OAuthOpaque));
        assert_eq!(opaque_kind("mt_x"), Some(TokenKind::M2m));
        assert_eq!(opaque_kind("ak_x"), Some(TokenKind::ApiKey));
        assert_eq!(opaque_kind("eyJ.x.y"), None);
    }
}
