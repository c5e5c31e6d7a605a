//! The failed-authentication budget: a client that keeps presenting tokens that are rejected is
//! locked out for a while (429), and while locked its tokens are not verified at all. Likewise a
//! subject (issuer and user) whose valid token keeps being refused by policy — a read-only token
//! probing write tools, a user outside the allowed orgs — is locked out itself, from every IP.
//!
//! It owns the `[policy.auth_failures]` section, the budget (one GCRA budget per client, spent
//! through a [`RateLimiter`], so with Redis configured every replica spends one shared budget)
//! and the local lock table that answers [`AuthFailures::locked`] without any I/O. It does not
//! decide what counts as a failure — the proxy's `authenticate` records a token that was
//! presented and refused, never a missing token or an unavailable verifier — nor write the
//! response.
//!
//! A client is its IP address; IPv4-mapped IPv6 addresses are their IPv4 address, and IPv6
//! addresses are grouped by their `/ipv6_prefix_len` network (one host usually holds a whole
//! /64, so locking single addresses would not stop it). The budget key is
//! `authfail/ip/<client>`, a subject's `authfail/sub/<issuer>|<subject>`; no rate-limit rule
//! key (`<rule>:<ip|user|org>:<who>`) can equal either. Only the budgets are shared through
//! Redis; each replica keeps its own lock table, so a client locked on one replica is locked on
//! another at its next refusal there.
//!
//! The lock table is bounded: when full, expired locks go first, then the locks closest to
//! their end (those clients are refused for a little less long; nobody is refused longer).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::ratelimit::{Quota, RateLimiter};
pub use crate::config::file::AuthFailuresConfig;
use crate::config::Problems;
use crate::retry_after::whole_secs;
use crate::telemetry::metrics::Metrics;

/// The validated section.
#[derive(Debug, Clone)]
pub struct AuthFailuresSettings {
    pub enabled: bool,
    /// `max_failures` per `window`, bursts of `max_failures`.
    pub budget: Quota,
    pub lockout: Duration,
    pub max_tracked_ips: u64,
    pub ipv6_prefix_len: u8,
    /// `subject_max_denials` per `window`; `None` when off.
    pub subject_budget: Option<Quota>,
}

/// The longest lockout accepted: a day.
const MAX_LOCKOUT_SECS: u64 = 86_400;

impl AuthFailuresConfig {
    /// Check the section; problems name `field.<option>`.
    pub fn validate(&self, field: &str, problems: &mut Problems) -> AuthFailuresSettings {
        let budget = Quota::new(
            self.max_failures,
            Duration::from_secs(self.window_secs),
            self.max_failures,
        )
        .unwrap_or_else(|e| {
            problems.push(
                format!("{field}.max_failures / {field}.window_secs"),
                format!("both must be at least 1 ({e})"),
            );
            Quota {
                requests: 1,
                period: Duration::from_secs(1),
                burst: 1,
            }
        });
        if self.lockout_secs == 0 || self.lockout_secs > MAX_LOCKOUT_SECS {
            problems.push(
                format!("{field}.lockout_secs"),
                format!("must be between 1 and {MAX_LOCKOUT_SECS}"),
            );
        }
        if self.max_tracked_ips == 0 {
            problems.push(format!("{field}.max_tracked_ips"), "must be at least 1");
        }
        if !(32..=128).contains(&self.ipv6_prefix_len) {
            problems.push(
                format!("{field}.ipv6_prefix_len"),
                "must be between 32 and 128",
            );
        }
        let subject_budget = (self.subject_max_denials > 0)
            .then(|| {
                Quota::new(
                    self.subject_max_denials,
                    Duration::from_secs(self.window_secs),
                    self.subject_max_denials,
                )
                .ok()
            })
            .flatten();
        AuthFailuresSettings {
            enabled: self.enabled,
            budget,
            subject_budget,
            lockout: Duration::from_secs(self.lockout_secs.clamp(1, MAX_LOCKOUT_SECS)),
            max_tracked_ips: self.max_tracked_ips.max(1),
            ipv6_prefix_len: self.ipv6_prefix_len.clamp(32, 128),
        }
    }
}

/// The lock table's clock.
#[derive(Clone)]
enum Clock {
    System,
    #[cfg(test)]
    Manual(Arc<Mutex<Instant>>),
}

impl Clock {
    fn now(&self) -> Instant {
        match self {
            Clock::System => Instant::now(),
            #[cfg(test)]
            Clock::Manual(now) => *now.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }
}

/// Locks until a moment, per key, in a bounded table. An empty table is checked without
/// taking the lock.
pub struct LockTable<K> {
    locks: Mutex<HashMap<K, Instant>>,
    len: AtomicUsize,
    max: usize,
}

impl<K: Hash + Eq + Clone> LockTable<K> {
    /// A table holding at most `max` locks.
    pub fn new(max: u64) -> Self {
        Self {
            locks: Mutex::new(HashMap::new()),
            len: AtomicUsize::new(0),
            max: usize::try_from(max).unwrap_or(usize::MAX).max(1),
        }
    }

    /// When `key`'s lock ends, if it is locked at `now`.
    fn until(&self, key: &K, now: Instant) -> Option<Instant> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        locks.get(key).copied().filter(|until| *until > now)
    }

    /// Lock `key` until `until`, unless it is locked already: `true` when this started a lock.
    fn lock(&self, key: &K, now: Instant, until: Instant) -> bool {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if locks.get(key).is_some_and(|u| *u > now) {
            return false;
        }
        if !locks.contains_key(key) && locks.len() >= self.max {
            Self::make_room(&mut locks, now, self.max);
        }
        locks.insert(key.clone(), until);
        self.len.store(locks.len(), Ordering::Relaxed);
        true
    }

    /// Drop ended locks; if that frees less than a quarter of the table, also the locks that
    /// end soonest, down to three quarters.
    fn make_room(locks: &mut HashMap<K, Instant>, now: Instant, max: usize) {
        super::ratelimit::evict_soonest(locks, now, max);
    }

    /// Locks held, ended or not yet dropped.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no lock is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The failed-authentication budget at run time.
pub struct AuthFailures {
    settings: AuthFailuresSettings,
    limiter: Arc<dyn RateLimiter>,
    ips: LockTable<IpAddr>,
    subjects: LockTable<String>,
    clock: Clock,
    lockouts: prometheus::IntCounter,
    refusals: prometheus::IntCounter,
    subject_lockouts: prometheus::IntCounter,
    subject_refusals: prometheus::IntCounter,
}

impl AuthFailures {
    /// `None` when the section is disabled. `limiter` holds the budgets (shared through Redis
    /// when it is a Redis limiter).
    pub fn new(
        settings: &AuthFailuresSettings,
        limiter: Arc<dyn RateLimiter>,
        metrics: &Metrics,
    ) -> Option<Self> {
        settings.enabled.then(|| Self {
            settings: settings.clone(),
            limiter,
            ips: LockTable::new(settings.max_tracked_ips),
            subjects: LockTable::new(settings.max_tracked_ips),
            clock: Clock::System,
            lockouts: metrics.auth_lockouts.clone(),
            refusals: metrics.auth_locked_refusals.clone(),
            subject_lockouts: metrics.subject_lockouts.clone(),
            subject_refusals: metrics.subject_locked_refusals.clone(),
        })
    }

    /// The subject's key: issuer and subject (an issuer never contains `|`).
    fn subject_key(issuer: &str, subject: &str) -> String {
        let mut key = String::with_capacity(issuer.len() + subject.len() + 1);
        key.push_str(issuer);
        key.push('|');
        key.push_str(subject);
        key
    }

    /// If the subject is locked out: how long it still is, in whole seconds (rounded up).
    /// Cheap and local (nothing is built while no subject is locked); a `Some` is counted.
    pub fn subject_locked(&self, issuer: &str, subject: &str) -> Option<Duration> {
        if self.subjects.is_empty() {
            return None;
        }
        let who = Self::subject_key(issuer, subject);
        self.remaining(&self.subjects, &who, &self.subject_refusals)
    }

    /// Spend one unit of the subject's budget for a policy refusal. When the budget refuses
    /// it, the subject is locked out from now on: returns the lockout, else `None`.
    pub async fn record_denial(&self, issuer: &str, subject: &str) -> Option<Duration> {
        let budget = self.settings.subject_budget.as_ref()?;
        let who = Self::subject_key(issuer, subject);
        let key = format!("authfail/sub/{who}");
        let lockout = self
            .spend(&self.subjects, &key, budget, &who, "policy-refusal")
            .await;
        if let Spent::Started(lockout) = lockout {
            self.subject_lockouts.inc();
            tracing::info!(
                target: "keygate::audit",
                event = "lockout_started",
                issuer = issuer,
                user = subject,
                max_denials = budget.requests,
                window_secs = budget.period.as_secs(),
                lockout_secs = lockout.as_secs(),
                "subject locked out after repeated policy refusals"
            );
        }
        lockout.lockout()
    }

    /// How long `who` is still locked in `table`, in whole seconds; a lock found is counted
    /// on `refused`.
    fn remaining<K: Hash + Eq + Clone>(
        &self,
        table: &LockTable<K>,
        who: &K,
        refused: &prometheus::IntCounter,
    ) -> Option<Duration> {
        let now = self.clock.now();
        let until = table.until(who, now)?;
        refused.inc();
        Some(whole_secs(until - now))
    }

    /// Spend one unit of `budget` under `key`; when the budget refuses it, lock `who` in
    /// `table` for the lockout (unless a lock is already running). A budget that cannot be
    /// asked (Redis away and no fallback) locks nobody.
    async fn spend<K: Hash + Eq + Clone>(
        &self,
        table: &LockTable<K>,
        key: &str,
        budget: &Quota,
        who: &K,
        what: &'static str,
    ) -> Spent {
        match self.limiter.check(key, budget, 1).await {
            Ok(d) if d.allowed => return Spent::Within,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, budget = what, "lockout budget unavailable");
                return Spent::Within;
            }
        }
        let now = self.clock.now();
        let lockout = self.settings.lockout;
        if table.lock(who, now, now + lockout) {
            return Spent::Started(lockout);
        }
        // Another request of this caller started the lockout first.
        table.until(who, now).map_or(Spent::Within, |until| {
            Spent::Locked(whole_secs(until - now))
        })
    }

    /// The client `ip` stands for: IPv4-mapped addresses as IPv4, IPv6 by its network.
    fn client(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => ipnet::Ipv6Net::new(v6, self.settings.ipv6_prefix_len)
                .map_or(IpAddr::V6(v6), |net| IpAddr::V6(net.network())),
            v4 => v4,
        }
    }

    /// If `ip` is locked out: how long it still is, in whole seconds (rounded up). Cheap and
    /// local; a `Some` is counted as a refused request.
    pub fn locked(&self, ip: IpAddr) -> Option<Duration> {
        if self.ips.is_empty() {
            return None;
        }
        self.remaining(&self.ips, &self.client(ip), &self.refusals)
    }

    /// Spend one unit of `ip`'s budget for a rejected token. When the budget refuses it, `ip`
    /// is locked out from now on: returns the lockout (whole seconds), else `None`.
    pub async fn record_failure(&self, ip: IpAddr) -> Option<Duration> {
        let client = self.client(ip);
        let key = format!("authfail/ip/{client}");
        let budget = &self.settings.budget;
        let lockout = self
            .spend(&self.ips, &key, budget, &client, "failed-authentication")
            .await;
        if let Spent::Started(lockout) = lockout {
            self.lockouts.inc();
            tracing::info!(
                target: "keygate::audit",
                event = "lockout_started",
                client_ip = %client,
                max_failures = budget.requests,
                window_secs = budget.period.as_secs(),
                lockout_secs = lockout.as_secs(),
                "client locked out after repeated failed authentication"
            );
        }
        lockout.lockout()
    }
}

/// What spending a unit of a lockout budget did.
enum Spent {
    /// Within the budget (or the budget could not be asked).
    Within,
    /// The budget refused it and this started a lockout.
    Started(Duration),
    /// The budget refused it; a lockout was already running, this long still.
    Locked(Duration),
}

impl Spent {
    fn lockout(&self) -> Option<Duration> {
        match self {
            Spent::Within => None,
            Spent::Started(d) | Spent::Locked(d) => Some(*d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ratelimit::LocalLimiter;

    fn settings(max_failures: u32) -> AuthFailuresSettings {
        let mut problems = Problems::default();
        let s = AuthFailuresConfig {
            max_failures,
            window_secs: 60,
            lockout_secs: 30,
            ..AuthFailuresConfig::default()
        }
        .validate("policy.auth_failures", &mut problems);
        assert!(problems.0.is_empty(), "{problems}");
        s
    }

    fn failures(max_failures: u32) -> (AuthFailures, Arc<Mutex<Instant>>, Metrics) {
        let metrics = Metrics::new();
        let mut f = AuthFailures::new(
            &settings(max_failures),
            Arc::new(LocalLimiter::new(1000)),
            &metrics,
        )
        .expect("enabled");
        let now = Arc::new(Mutex::new(Instant::now()));
        f.clock = Clock::Manual(now.clone());
        (f, now, metrics)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[tokio::test]
    async fn the_failure_after_the_budget_starts_a_lockout_for_that_ip_only() {
        let (f, now, metrics) = failures(3);
        let a = ip("203.0.113.7");
        for _ in 0..3 {
            assert_eq!(f.record_failure(a).await, None);
            assert_eq!(f.locked(a), None);
        }
        assert_eq!(f.record_failure(a).await, Some(Duration::from_secs(30)));
        assert_eq!(f.locked(a), Some(Duration::from_secs(30)));
        assert_eq!(f.locked(ip("203.0.113.8")), None);
        assert_eq!(metrics.auth_lockouts.get(), 1);
        assert_eq!(metrics.auth_locked_refusals.get(), 1);
        // Retry-After is rounded up: 20.5 s left is 21 s.
        *now.lock().unwrap() += Duration::from_millis(9_500);
        assert_eq!(f.locked(a), Some(Duration::from_secs(21)));
        *now.lock().unwrap() += Duration::from_millis(20_500);
        assert_eq!(f.locked(a), None);
    }

    #[tokio::test]
    async fn a_subject_past_its_refusal_budget_is_locked_and_no_one_else() {
        let (f, now, metrics) = failures(3);
        let iss = "https://issuer.example";
        for _ in 0..30 {
            assert_eq!(f.record_denial(iss, "user_a").await, None);
        }
        assert_eq!(f.subject_locked(iss, "user_a"), None);
        assert_eq!(
            f.record_denial(iss, "user_a").await,
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            f.subject_locked(iss, "user_a"),
            Some(Duration::from_secs(30))
        );
        // Another user, and the same user id from another issuer, are someone else.
        assert_eq!(f.subject_locked(iss, "user_b"), None);
        assert_eq!(f.subject_locked("https://other.example", "user_a"), None);
        // Refusals are not failed authentications: no IP is locked.
        assert_eq!(metrics.auth_lockouts.get(), 0);
        assert_eq!(metrics.subject_lockouts.get(), 1);
        assert_eq!(metrics.subject_locked_refusals.get(), 1);
        *now.lock().unwrap() += Duration::from_secs(30);
        assert_eq!(f.subject_locked(iss, "user_a"), None);
    }

    #[tokio::test]
    async fn no_subject_budget_when_turned_off() {
        let metrics = Metrics::new();
        let mut problems = Problems::default();
        let settings = AuthFailuresConfig {
            subject_max_denials: 0,
            ..AuthFailuresConfig::default()
        }
        .validate("policy.auth_failures", &mut problems);
        let f = AuthFailures::new(&settings, Arc::new(LocalLimiter::new(1000)), &metrics)
            .expect("enabled");
        for _ in 0..1000 {
            assert_eq!(f.record_denial("iss", "user_a").await, None);
        }
        assert_eq!(f.subject_locked("iss", "user_a"), None);
    }

    #[tokio::test]
    async fn concurrent_failures_start_one_lockout() {
        let (f, _, metrics) = failures(1);
        let a = ip("192.0.2.1");
        assert_eq!(f.record_failure(a).await, None);
        assert!(f.record_failure(a).await.is_some());
        assert!(f.record_failure(a).await.is_some());
        assert_eq!(metrics.auth_lockouts.get(), 1);
    }

    #[tokio::test]
    async fn mapped_ipv4_is_ipv4_and_ipv6_is_grouped_by_its_prefix() {
        let (f, _, _) = failures(1);
        f.record_failure(ip("::ffff:192.0.2.9")).await;
        assert!(f.record_failure(ip("192.0.2.9")).await.is_some());
        assert!(f.locked(ip("::ffff:192.0.2.9")).is_some());
        f.record_failure(ip("2001:db8:1:2::1")).await;
        assert!(f.record_failure(ip("2001:db8:1:2:ffff::7")).await.is_some());
        assert!(f.locked(ip("2001:db8:1:2::abcd")).is_some());
        assert!(f.locked(ip("2001:db8:1:3::1")).is_none());
    }

    #[tokio::test]
    async fn a_lockout_is_one_audit_event_naming_the_client() {
        // Register the event's callsite first, on this thread: installing the subscriber then
        // recomputes its interest, whichever other test threads hit it meanwhile.
        let (warm_up, _, _) = failures(1);
        for _ in 0..2 {
            warm_up.record_failure(ip("192.0.2.250")).await;
        }
        let logs = crate::telemetry::capture::Capture::json();
        let (f, _, _) = failures(1);
        for _ in 0..4 {
            f.record_failure(ip("198.51.100.4")).await;
        }
        let text = logs.text_so_far();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .filter(|e: &serde_json::Value| e["fields"]["event"] == "lockout_started")
            .collect();
        assert_eq!(events.len(), 1, "{text}");
        let e = &events[0];
        assert_eq!(e["target"], "keygate::audit");
        assert_eq!(e["fields"]["client_ip"], "198.51.100.4");
        assert_eq!(e["fields"]["lockout_secs"], 30);
        // A subject's lockout names the subject and its issuer.
        for _ in 0..32 {
            f.record_denial("https://issuer.example", "user_probe")
                .await;
        }
        let text = logs.text_so_far();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .filter(|e: &serde_json::Value| {
                e["fields"]["event"] == "lockout_started" && e["fields"]["user"] == "user_probe"
            })
            .collect();
        assert_eq!(events.len(), 1, "{text}");
        assert_eq!(events[0]["fields"]["issuer"], "https://issuer.example");
        assert_eq!(events[0]["fields"]["max_denials"], 30);
    }

    #[test]
    fn the_lock_table_is_bounded_and_drops_ended_locks_first() {
        let table = LockTable::new(8);
        let t0 = Instant::now();
        for i in 0..4u16 {
            assert!(table.lock(&i, t0, t0 + Duration::from_secs(1)));
        }
        for i in 4..8u16 {
            assert!(table.lock(&i, t0, t0 + Duration::from_secs(100)));
        }
        let later = t0 + Duration::from_secs(2);
        assert!(table.lock(&8, later, later + Duration::from_secs(100)));
        assert_eq!(table.len(), 5);
        for i in 4..9u16 {
            assert!(table.until(&i, later).is_some());
        }
        for i in 9..1000u16 {
            table.lock(&i, later, later + Duration::from_secs(50));
        }
        assert!(table.len() <= 8);
    }

    #[test]
    fn problems_name_the_option() {
        let mut problems = Problems::default();
        AuthFailuresConfig {
            max_failures: 0,
            lockout_secs: 0,
            ipv6_prefix_len: 8,
            ..AuthFailuresConfig::default()
        }
        .validate("policy.auth_failures", &mut problems);
        let fields: Vec<&str> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert!(fields
            .iter()
            .any(|f| f.contains("policy.auth_failures.max_failures")));
        assert!(fields.contains(&"policy.auth_failures.lockout_secs"));
        assert!(fields.contains(&"policy.auth_failures.ipv6_prefix_len"));
    }
}
