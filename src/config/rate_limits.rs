//! `[rate_limits]`: the rate-limit rules (what each counts by, its quota, the paths and tools it
//! covers), where the counts are kept, and what happens when Redis fails.

use std::str::FromStr;
use std::time::Duration;

use super::file::RateLimitsFile;
use super::parse::{normal_paths, secs, NotAChoice};
use super::Problems;

/// What a rate-limit rule counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKey {
    User,
    Org,
    Ip,
}

impl RateKey {
    /// The label used in limiter keys.
    pub fn as_str(self) -> &'static str {
        match self {
            RateKey::User => "user",
            RateKey::Org => "org",
            RateKey::Ip => "ip",
        }
    }
}

/// One validated rate-limit rule.
#[derive(Debug, Clone)]
pub struct RateRule {
    pub name: String,
    pub per: RateKey,
    pub requests: u32,
    pub period: Duration,
    pub burst: u32,
    pub paths: Vec<String>,
    pub tools: Vec<String>,
    pub cost: u32,
}

/// What to do with rate limits when Redis fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisFailure {
    Local,
    Allow,
    Deny,
}

/// Rate limiting.
#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    pub enabled: bool,
    pub use_redis: bool,
    pub on_redis_error: RedisFailure,
    pub rules: Vec<RateRule>,
}
impl FromStr for RateKey {
    type Err = NotAChoice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(RateKey::User),
            "org" => Ok(RateKey::Org),
            "ip" => Ok(RateKey::Ip),
            other => Err(NotAChoice::new(other, "\"user\", \"org\" or \"ip\"")),
        }
    }
}

impl FromStr for RedisFailure {
    type Err = NotAChoice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(RedisFailure::Local),
            "allow" => Ok(RedisFailure::Allow),
            "deny" => Ok(RedisFailure::Deny),
            other => Err(NotAChoice::new(other, "\"local\", \"allow\" or \"deny\"")),
        }
    }
}

/// `rate_limits.backend`: where the counts are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateBackend {
    /// Redis when `redis.url` is set, else in memory.
    Auto,
    Local,
    Redis,
}

impl FromStr for RateBackend {
    type Err = NotAChoice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(RateBackend::Auto),
            "local" => Ok(RateBackend::Local),
            "redis" => Ok(RateBackend::Redis),
            other => Err(NotAChoice::new(other, "\"auto\", \"local\" or \"redis\"")),
        }
    }
}

impl RateLimitSettings {
    /// Validate `[rate_limits]`; `redis` says whether `redis.url` is set.
    pub(crate) fn from_file(
        r: &RateLimitsFile,
        redis: bool,
        problems: &mut Problems,
    ) -> RateLimitSettings {
        let use_redis = match r.backend.parse() {
            Ok(RateBackend::Auto) => redis,
            Ok(RateBackend::Local) => false,
            Ok(RateBackend::Redis) => {
                if !redis {
                    problems.push(
                        "rate_limits.backend",
                        "is \"redis\" but redis.url (REDIS_URL) is not set",
                    );
                }
                true
            }
            Err(e) => {
                problems.push("rate_limits.backend", e.to_string());
                false
            }
        };
        let on_redis_error = r.on_redis_error.parse().unwrap_or_else(|e: NotAChoice| {
            problems.push("rate_limits.on_redis_error", e.to_string());
            RedisFailure::Local
        });
        let mut rate_rules = Vec::new();
        for (i, rule) in r.rules.iter().enumerate() {
            let field = format!("rate_limits.rules[{i}]");
            let per: RateKey = match rule.per.parse() {
                Ok(per) => per,
                Err(e) => {
                    problems.push(format!("{field}.per"), e.to_string());
                    continue;
                }
            };
            if rule.requests == 0 || rule.period_secs == 0 {
                problems.push(&field, "requests and period_secs must be at least 1");
                continue;
            }
            let burst = rule.burst.unwrap_or(rule.requests).max(1);
            if rule.cost == 0 || rule.cost > burst {
                problems.push(
                    format!("{field}.cost"),
                    "must be between 1 and the rule's burst",
                );
            }
            for t in &rule.tools {
                if globset::Glob::new(t).is_err() {
                    problems.push(
                        format!("{field}.tools"),
                        format!("{t:?} is not a valid glob"),
                    );
                }
            }
            rate_rules.push(RateRule {
                name: rule
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}-{i}", per.as_str())),
                per,
                requests: rule.requests,
                period: secs(rule.period_secs),
                burst,
                paths: normal_paths(problems, &format!("{field}.paths"), &rule.paths),
                tools: rule.tools.clone(),
                cost: rule.cost,
            });
        }
        RateLimitSettings {
            enabled: r.enabled,
            use_redis,
            on_redis_error,
            rules: rate_rules,
        }
    }
}
