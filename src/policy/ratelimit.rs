//! Rate limits: the GCRA arithmetic, three [`RateLimiter`]s (in-process, shared through Redis,
//! and Redis with a fallback for outages) and the IETF `RateLimit` / `RateLimit-Policy`
//! response headers.
//!
//! It owns how a budget is spent and reported. It does not decide which requests count against
//! which budget, build the key (callers name one budget per key, rule included), or write the
//! 429 response — that is the proxy's flow and `respond`.
//!
//! # GCRA (the same in Rust and in the Lua script)
//!
//! A [`Quota`] of `requests` per `period` with bursts of `burst`:
//!
//! - emission interval `T = period / requests` (whole microseconds, rounded up, at least 1 µs);
//! - tolerance `τ = T × burst`;
//! - per key, one number: the theoretical arrival time `TAT` (µs), the moment the bucket would
//!   be full again. A missing key, or a `TAT` in the past, means a full bucket: `TAT = now`.
//!
//! A check spending `cost` units at time `now`:
//!
//! ```text
//! tat     = max(stored TAT, now)
//! new_tat = tat + T × cost
//! allowed = cost <= burst  and  new_tat − now <= τ
//! allowed: store new_tat, expiring at new_tat (then it is a full bucket anyway)
//!          remaining = ⌊(τ − (new_tat − now)) / T⌋    reset = new_tat − now
//! denied:  nothing stored
//!          remaining = ⌊max(τ − (tat − now), 0) / T⌋  reset = tat − now
//!          retry_after = new_tat − τ − now   (none when cost > burst: waiting cannot help)
//! ```
//!
//! So `burst` back-to-back requests pass, the next one waits `T`, and the long-run rate is
//! `requests / period`. All values are integers of microseconds; the Lua script does the same
//! in doubles, exact below 2^53 µs (epoch time is ~2^51), which is why [`Quota`] caps `τ` at
//! 2^48 µs (about 8.9 years).
//!
//! # Several budgets at once: all or nothing
//!
//! A request usually spends from several budgets (per user, per org, a tool's own). They are
//! checked together, with [`RateLimiter::check_all`], on one `now`:
//!
//! ```text
//! every spend, in order: the step above on its bucket (spends on the same key add up: each
//!                        starts from the TAT the earlier ones of the call would leave)
//! every spend allowed:   store every new TAT (each changed bucket once)
//! any spend denied:      store nothing; a denied spend reports as above, a spend that had
//!                        room reports allowed with its bucket as it is (remaining and reset
//!                        of the stored TAT, nothing spent)
//! ```
//!
//! So a request refused by one budget spends none of the others, whatever the order of the
//! rules. ([`RateLimiter::check`] is the same with one spend.)
//!
//! [`RedisLimiter`] runs that in one script call ([`GCRA_LUA`]: N keys, three arguments per
//! key) on the Redis server, with the server's `TIME` (never a replica's clock), on the keys
//! `{prefix}rl:{<key>}`, so every replica sharing the Redis spends one budget, in one round
//! trip per request. On a **Redis Cluster** the budget key in braces is the hash tag, so the
//! buckets of one request live in different slots and a multi-key script would be refused
//! (`CROSSSLOT`): there the limiter runs the same script once per budget, one key each, in
//! order, and stops at the first denial. That is not all or nothing: budgets checked before
//! the denying one have spent, and those after it are not checked (the decisions end at the
//! denial). [`LocalLimiter`] keeps `TAT`s in a bounded, sharded in-process table, locking the
//! shards of a call's keys together (each once, in ascending shard order, so calls never wait
//! on each other in a cycle); a `TAT` in the past is a full bucket and is dropped when room is
//! needed. [`FallbackLimiter`] asks Redis first and, when Redis fails, applies the local limit
//! (per replica, so N replicas allow up to N times the budget during an outage), allows, or
//! denies, as configured; it counts one fallback per call, whatever the number of budgets.
//!
//! # Headers
//!
//! [`headers`] follows draft-ietf-httpapi-ratelimit-headers-11 (May 2026), structured-field
//! form: `RateLimit-Policy: "<name>";q=<requests>;w=<period secs>` and
//! `RateLimit: "<name>";r=<remaining>;t=<reset secs>` (seconds rounded up; `w` at least 1).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::config::RateRule;
use crate::policy::mcp::RpcCall;
use crate::redis::RedisConn;
use crate::retry_after::whole_secs;
use crate::telemetry::metrics::Metrics;

/// Keys the local limiter tracks at most, unless told otherwise.
pub const DEFAULT_LOCAL_MAX_KEYS: u64 = 100_000;
/// The largest tolerance (`T × burst`) a quota may have, in microseconds.
const MAX_TOLERANCE_US: u64 = 1 << 48;
/// `Retry-After` suggested when [`OnRedisError::Deny`] refuses a request during an outage.
const RETRY_WHILE_UNAVAILABLE: Duration = Duration::from_secs(1);

/// GCRA for N budgets at once, all or nothing, on the Redis server's clock (see the module docs;
/// same formulas). `KEYS[i]`: the buckets. `ARGV[3i-2..3i]`: T (µs), burst, cost of budget `i`.
/// Returns 4 integers per budget, in order: allowed (1|0), remaining, reset (µs), retry_after
/// (µs; -1 when none). Budgets repeated in `KEYS` add up; nothing is written unless every
/// budget allows, and then each changed bucket once.
pub const GCRA_LUA: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local before, tat, out, refused = {}, {}, {}, false
local function left(used, interval, burst)
  return math.floor(math.max(interval * burst - used, 0) / interval)
end
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  if before[key] == nil then
    local stored = redis.call('GET', key)
    before[key] = now
    if stored then before[key] = math.max(tonumber(stored) or now, now) end
    tat[key] = before[key]
  end
  local used = tat[key] - now
  local ahead = used + interval * cost
  local j = 4 * i - 3
  if cost > burst then
    out[j], out[j + 1], out[j + 2], out[j + 3] = 0, left(used, interval, burst), used, -1
    refused = true
  elseif ahead > interval * burst then
    out[j], out[j + 1], out[j + 2] = 0, left(used, interval, burst), used
    out[j + 3] = ahead - interval * burst
    refused = true
  else
    out[j], out[j + 1], out[j + 2], out[j + 3] = 1, left(ahead, interval, burst), ahead, -1
    tat[key] = now + ahead
  end
end
if refused then
  for i, key in ipairs(KEYS) do
    local j = 4 * i - 3
    if out[j] == 1 then
      local used = before[key] - now
      out[j + 1] = left(used, tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1]))
      out[j + 2] = used
    end
  end
  return out
end
for _, key in ipairs(KEYS) do
  if tat[key] ~= before[key] then
    redis.call('SET', key, string.format('%.0f', tat[key]), 'PX', math.ceil((tat[key] - now) / 1000))
    before[key] = tat[key]
  end
end
return out
"#;

/// A limit: `requests` per `period`, with bursts of up to `burst` at once (burst >= 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    /// Units granted per `period`, in the long run.
    pub requests: u32,
    /// The window `requests` refers to.
    pub period: Duration,
    /// Units that may be spent at once from a full bucket.
    pub burst: u32,
}

impl Quota {
    /// A checked quota.
    pub fn new(requests: u32, period: Duration, burst: u32) -> Result<Self, LimiterError> {
        let quota = Self {
            requests,
            period,
            burst,
        };
        quota.interval_us()?;
        Ok(quota)
    }

    /// The emission interval `T = period / requests` (see the module docs).
    pub fn emission_interval(&self) -> Result<Duration, LimiterError> {
        self.interval_us().map(Duration::from_micros)
    }

    /// `T` in microseconds, after checking the quota is usable.
    fn interval_us(&self) -> Result<u64, LimiterError> {
        if self.requests == 0 || self.burst == 0 || self.period.is_zero() {
            return Err(LimiterError::InvalidQuota(format!(
                "requests ({}), period ({:?}) and burst ({}) must all be positive",
                self.requests, self.period, self.burst
            )));
        }
        let requests = u128::from(self.requests);
        let interval = self.period.as_micros().div_ceil(requests).max(1);
        let fits = u64::try_from(interval)
            .ok()
            .filter(|t| t.saturating_mul(u64::from(self.burst)) <= MAX_TOLERANCE_US);
        fits.ok_or_else(|| {
            LimiterError::InvalidQuota(format!(
                "period / requests × burst ({:?} / {} × {}) is too long",
                self.period, self.requests, self.burst
            ))
        })
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether this budget had room for the units (spent, unless another budget of the same
    /// [`RateLimiter::check_all`] call refused).
    pub allowed: bool,
    /// The bucket size (the quota's burst).
    pub limit: u32,
    /// Units that could still be spent right now.
    pub remaining: u32,
    /// Time until the bucket is full again.
    pub reset: Duration,
    /// When denied, how long until the same request would pass; `None` when allowed, or when
    /// waiting cannot help (a cost above the burst).
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// `retry_after` in whole seconds, rounded up, for a `Retry-After` header.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after.map(ceil_secs)
    }
}

/// Why a limiter could not decide.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LimiterError {
    /// The shared store is unreachable, timed out, or failed.
    #[error("rate limiter unavailable: {0}")]
    Unavailable(String),
    /// The quota cannot be enforced (zero requests, period or burst, or far too long).
    #[error("invalid rate limit quota: {0}")]
    InvalidQuota(String),
}

/// One budget a request spends from: `cost` units of `key`'s budget under `quota`.
#[derive(Debug, Clone, Copy)]
pub struct Spend<'a> {
    /// The budget (rule and caller; see `CompiledRateRule::key`).
    pub key: &'a str,
    /// Its limit.
    pub quota: &'a Quota,
    /// Units to spend (a cost above the quota's burst is always denied).
    pub cost: u32,
}

/// Something that spends budgets.
#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Spend several budgets at once, all or nothing (see the module docs): when every budget
    /// has room, every one spends; when any denies, none spends. One decision per spend, in
    /// the order of `spends`, except with [`RedisLimiter`] on a Redis Cluster, whose decisions
    /// end at the first denial: pair them with the spends by position. An invalid quota fails
    /// the call before anything is spent; no spends, no decisions and no I/O.
    async fn check_all(&self, spends: &[Spend<'_>]) -> Result<Vec<Decision>, LimiterError>;

    /// Spend `cost` units of `key`'s budget under `quota` (cost >= 1; a cost above burst is
    /// always denied): [`RateLimiter::check_all`] with one spend.
    async fn check(&self, key: &str, quota: &Quota, cost: u32) -> Result<Decision, LimiterError> {
        let spend = Spend { key, quota, cost };
        self.check_all(std::slice::from_ref(&spend))
            .await?
            .pop()
            .ok_or_else(|| LimiterError::Unavailable(format!("{}: no decision", self.name())))
    }

    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;
}

/// One GCRA step (see the module docs), in microseconds. Returns the decision and, when
/// allowed and the bucket is not full, the new `TAT` to store.
fn gcra(
    stored_tat: Option<u64>,
    now: u64,
    interval: u64,
    burst: u32,
    cost: u32,
) -> (Decision, Option<u64>) {
    let tolerance = interval.saturating_mul(u64::from(burst));
    let tat = stored_tat.map_or(now, |t| t.max(now));
    let used = tat - now;
    let left = |used: u64| units(tolerance.saturating_sub(used) / interval);
    let denied = |retry_after: Option<u64>| Decision {
        allowed: false,
        limit: burst,
        remaining: left(used),
        reset: Duration::from_micros(used),
        retry_after: retry_after.map(Duration::from_micros),
    };
    if cost > burst {
        return (denied(None), None);
    }
    let ahead = used + interval * u64::from(cost);
    if ahead > tolerance {
        return (denied(Some(ahead - tolerance)), None);
    }
    let decision = Decision {
        allowed: true,
        limit: burst,
        remaining: left(ahead),
        reset: Duration::from_micros(ahead),
        retry_after: None,
    };
    (decision, (ahead > 0).then_some(now + ahead))
}

/// A unit count that fits the quota's `u32` burst.
fn units(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Whole seconds, rounded up ([`whole_secs`]).
fn ceil_secs(d: Duration) -> u64 {
    whole_secs(d).as_secs()
}

/// Most shards of the local limiter's table: checks on different keys rarely wait on one lock.
const MAX_SHARDS: usize = 32;

/// One shard: the keys' `TAT`s, in microseconds on the limiter's clock.
type Shard = Mutex<HashMap<Box<str>, u64>>;

/// The local limiter's clock, in microseconds.
enum Clock {
    Monotonic(Instant),
    #[cfg(test)]
    Manual(Arc<AtomicU64>),
}

impl Clock {
    fn now_us(&self) -> u64 {
        match self {
            Clock::Monotonic(start) => {
                u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
            }
            #[cfg(test)]
            Clock::Manual(now) => now.load(Ordering::SeqCst),
        }
    }
}

/// In-process GCRA: one replica's view, in a sharded table bounded by a key count.
///
/// A bucket whose `TAT` has passed is a full bucket, the same as a missing key, so it is
/// dropped when its shard needs room. When a shard is full of live buckets, the quarter
/// closest to full (smallest `TAT`) is dropped: those keys start again with a full bucket,
/// which gives back the fewest units. Each sweep frees a quarter of the shard, so the cost of
/// making room stays constant per check, even under a flood of new keys. (A call spending
/// several new keys that fall in one shard makes room before storing any of them, so that
/// shard may briefly hold a few more than its share.)
pub struct LocalLimiter {
    shards: Box<[Shard]>,
    per_shard: usize,
    hasher: RandomState,
    clock: Clock,
}

impl LocalLimiter {
    /// A limiter tracking at most `max_keys` keys.
    pub fn new(max_keys: u64) -> Self {
        Self::with_clock(max_keys, MAX_SHARDS, Clock::Monotonic(Instant::now()))
    }

    fn with_clock(max_keys: u64, max_shards: usize, clock: Clock) -> Self {
        let max_keys = usize::try_from(max_keys).unwrap_or(usize::MAX).max(1);
        let shards = max_shards.clamp(1, max_keys);
        Self {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            per_shard: max_keys / shards,
            hasher: RandomState::new(),
            clock,
        }
    }

    /// Keys currently held, live or not yet dropped.
    pub fn tracked_keys(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len() as u64)
            .sum()
    }

    fn shard_index(&self, key: &str) -> usize {
        // The modulo keeps the index below the shard count, so it fits usize.
        (self.hasher.hash_one(key) % self.shards.len() as u64) as usize
    }

    /// One budget, under its shard's lock (the common case, and [`RateLimiter::check`]).
    fn spend_one(&self, spend: &Spend<'_>) -> Result<Decision, LimiterError> {
        let interval = spend.quota.interval_us()?;
        let now = self.clock.now_us();
        let mut buckets = self.shards[self.shard_index(spend.key)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let slot = buckets.get_mut(spend.key);
        let stored = slot.as_deref().copied();
        let (decision, store) = gcra(stored, now, interval, spend.quota.burst, spend.cost);
        if let Some(tat) = store {
            match slot {
                Some(slot) => *slot = tat,
                None => {
                    self.make_room(&mut buckets, now);
                    buckets.insert(spend.key.into(), tat);
                }
            }
        }
        Ok(decision)
    }

    /// The synchronous, all-or-nothing check behind [`RateLimiter::check_all`]: the shards of
    /// every key are locked together, each once and in ascending index order (so two calls
    /// never wait on each other in a cycle), every decision is made, and the new `TAT`s are
    /// stored only when every spend fits.
    fn spend_all(&self, spends: &[Spend<'_>]) -> Result<Vec<Decision>, LimiterError> {
        if let [one] = spends {
            return Ok(vec![self.spend_one(one)?]);
        }
        let mut intervals = Vec::with_capacity(spends.len());
        for s in spends {
            intervals.push(s.quota.interval_us()?);
        }
        if spends.is_empty() {
            return Ok(Vec::new());
        }
        let indices: Vec<usize> = spends.iter().map(|s| self.shard_index(s.key)).collect();
        let mut order = indices.clone();
        order.sort_unstable();
        order.dedup();
        let now = self.clock.now_us();
        let mut guards: Vec<_> = order
            .iter()
            .map(|&i| {
                self.shards[i]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
            })
            .collect();
        // Per distinct key: its guard, its TAT before this call and as this call leaves it.
        let mut tats: Vec<(&str, usize, Option<u64>, Option<u64>)> =
            Vec::with_capacity(spends.len());
        let mut decisions = Vec::with_capacity(spends.len());
        let mut refused = false;
        for ((s, &interval), index) in spends.iter().zip(&intervals).zip(indices) {
            let slot = match tats.iter().position(|t| t.0 == s.key) {
                Some(slot) => slot,
                None => {
                    let g = order.partition_point(|&o| o < index);
                    let stored = guards.get(g).and_then(|b| b.get(s.key).copied());
                    tats.push((s.key, g, stored, stored));
                    tats.len() - 1
                }
            };
            let (decision, store) = gcra(tats[slot].3, now, interval, s.quota.burst, s.cost);
            refused |= !decision.allowed;
            if let Some(tat) = store {
                tats[slot].3 = Some(tat);
            }
            decisions.push(decision);
        }
        if refused {
            for ((d, s), &interval) in decisions.iter_mut().zip(spends).zip(&intervals) {
                if d.allowed {
                    let before = tats.iter().find(|t| t.0 == s.key).and_then(|t| t.2);
                    *d = gcra(before, now, interval, s.quota.burst, 0).0;
                }
            }
            return Ok(decisions);
        }
        tats.retain(|(_, _, before, after)| after.is_some() && after != before);
        // Room first, then every write: making room for one key of the call must not drop
        // another that the call has just spent from.
        for &(key, g, _, _) in &tats {
            if let Some(buckets) = guards.get_mut(g) {
                if !buckets.contains_key(key) {
                    self.make_room(buckets, now);
                }
            }
        }
        for (key, g, _, after) in tats {
            let (Some(tat), Some(buckets)) = (after, guards.get_mut(g)) else {
                continue;
            };
            match buckets.get_mut(key) {
                Some(slot) => *slot = tat,
                None => {
                    buckets.insert(key.into(), tat);
                }
            }
        }
        Ok(decisions)
    }

    /// Below capacity, nothing; else drop full buckets and, if that is not a quarter of the
    /// shard, the buckets closest to full until it is.
    fn make_room(&self, buckets: &mut HashMap<Box<str>, u64>, now: u64) {
        if buckets.len() < self.per_shard {
            return;
        }
        evict_soonest(buckets, now, self.per_shard);
    }
}

impl Default for LocalLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_LOCAL_MAX_KEYS)
    }
}

#[async_trait]
impl RateLimiter for LocalLimiter {
    async fn check_all(&self, spends: &[Spend<'_>]) -> Result<Vec<Decision>, LimiterError> {
        self.spend_all(spends)
    }

    async fn check(&self, key: &str, quota: &Quota, cost: u32) -> Result<Decision, LimiterError> {
        self.spend_one(&Spend { key, quota, cost })
    }

    fn name(&self) -> &'static str {
        "local"
    }
}

/// GCRA in Redis: every replica sharing the Redis spends one budget per key.
pub struct RedisLimiter {
    conn: Arc<RedisConn>,
    script: redis::Script,
}

impl RedisLimiter {
    /// A limiter on `conn`, keys under the connection's prefix.
    pub fn new(conn: Arc<RedisConn>) -> Self {
        Self {
            conn,
            script: redis::Script::new(GCRA_LUA),
        }
    }

    /// The Redis key holding `key`'s `TAT`: `{prefix}rl:{<key>}`.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}rl:{{{key}}}", self.conn.key_prefix())
    }

    /// Every budget in one script call.
    async fn check_together(
        &self,
        spends: &[Spend<'_>],
        intervals: &[u64],
    ) -> Result<Vec<Decision>, LimiterError> {
        let mut invocation = self.script.prepare_invoke();
        for (s, &interval) in spends.iter().zip(intervals) {
            invocation.key(self.redis_key(s.key));
            invocation.arg(interval).arg(s.quota.burst).arg(s.cost);
        }
        let reply: Vec<i64> = self
            .conn
            .invoke("rate limit", &invocation)
            .await
            .map_err(|e| LimiterError::Unavailable(e.to_string()))?;
        if reply.len() != 4 * spends.len() {
            return Err(LimiterError::Unavailable(format!(
                "rate limit script answered {} integers for {} budgets",
                reply.len(),
                spends.len()
            )));
        }
        reply
            .chunks_exact(4)
            .zip(spends)
            .map(|(r, s)| decision(r, s.quota))
            .collect()
    }

    /// One budget per script call, in order, stopping at the first denial.
    async fn check_each(
        &self,
        spends: &[Spend<'_>],
        intervals: &[u64],
    ) -> Result<Vec<Decision>, LimiterError> {
        let mut decisions = Vec::with_capacity(spends.len());
        for (spend, interval) in spends.chunks(1).zip(intervals.chunks(1)) {
            let answered = self.check_together(spend, interval).await?;
            let denied = answered.iter().any(|d| !d.allowed);
            decisions.extend(answered);
            if denied {
                break;
            }
        }
        Ok(decisions)
    }
}

/// One decision from the script's four integers: allowed (1|0), remaining, reset (µs),
/// retry_after (µs; -1 when none).
fn decision(reply: &[i64], quota: &Quota) -> Result<Decision, LimiterError> {
    let &[allowed, remaining, reset, retry] = reply else {
        return Err(LimiterError::Unavailable(format!(
            "rate limit script answered {} integers, not 4",
            reply.len()
        )));
    };
    let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
    Ok(Decision {
        allowed: allowed == 1,
        limit: quota.burst,
        remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
        reset: micros(reset),
        retry_after: (retry >= 0).then(|| micros(retry)),
    })
}

/// Every spend's `T`, checking its quota; the first invalid one is the error.
fn intervals(spends: &[Spend<'_>]) -> Result<Vec<u64>, LimiterError> {
    spends.iter().map(|s| s.quota.interval_us()).collect()
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    async fn check_all(&self, spends: &[Spend<'_>]) -> Result<Vec<Decision>, LimiterError> {
        let intervals = intervals(spends)?;
        if spends.is_empty() {
            return Ok(Vec::new());
        }
        if self.conn.is_cluster() && spends.len() > 1 {
            // Different budgets live in different slots: a multi-key script would be refused
            // (CROSSSLOT), so budget by budget, as the module docs say.
            return self.check_each(spends, &intervals).await;
        }
        self.check_together(spends, &intervals).await
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// What [`FallbackLimiter`] does while the shared limiter fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRedisError {
    /// Enforce the limit per replica with a [`LocalLimiter`].
    Local,
    /// Let every request through.
    Allow,
    /// Refuse every request (with a short `retry_after`).
    Deny,
}

/// The shared limiter first; when it fails, [`OnRedisError`] decides. Logs the first failure
/// of an outage and the recovery once each, and counts the calls that fell back.
pub struct FallbackLimiter {
    shared: Box<dyn RateLimiter>,
    local: LocalLimiter,
    on_error: OnRedisError,
    fallbacks: AtomicU64,
    failing: AtomicBool,
}

impl FallbackLimiter {
    /// `shared` (normally a [`RedisLimiter`]) backed by `local` for [`OnRedisError::Local`].
    pub fn new(shared: impl RateLimiter, on_error: OnRedisError, local: LocalLimiter) -> Self {
        Self {
            shared: Box::new(shared),
            local,
            on_error,
            fallbacks: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        }
    }

    /// Calls ([`RateLimiter::check_all`] or `check`, whatever their number of budgets)
    /// answered without the shared limiter since start.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// What happens while the shared limiter fails.
    pub fn on_error(&self) -> OnRedisError {
        self.on_error
    }
}

#[async_trait]
impl RateLimiter for FallbackLimiter {
    async fn check_all(&self, spends: &[Spend<'_>]) -> Result<Vec<Decision>, LimiterError> {
        if spends.is_empty() {
            return Ok(Vec::new());
        }
        let error = match self.shared.check_all(spends).await {
            Ok(decisions) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(limiter = self.shared.name(), "shared rate limits are back");
                }
                return Ok(decisions);
            }
            Err(e @ LimiterError::InvalidQuota(_)) => return Err(e),
            Err(e) => e,
        };
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                limiter = self.shared.name(),
                fallback = ?self.on_error,
                %error,
                "shared rate limits unavailable; falling back"
            );
        }
        match self.on_error {
            OnRedisError::Local => self.local.spend_all(spends),
            OnRedisError::Allow | OnRedisError::Deny => Ok(spends
                .iter()
                .map(|s| {
                    let (cost, burst) = (s.cost, s.quota.burst);
                    let allowed = self.on_error == OnRedisError::Allow && cost <= burst;
                    Decision {
                        allowed,
                        limit: burst,
                        remaining: if allowed { burst - cost } else { 0 },
                        reset: Duration::ZERO,
                        retry_after: (!allowed && cost <= burst).then_some(RETRY_WHILE_UNAVAILABLE),
                    }
                })
                .collect()),
        }
    }

    fn name(&self) -> &'static str {
        "fallback"
    }
}

/// The `RateLimit-Policy` and `RateLimit` response headers (lower-case names) for one policy,
/// in draft-ietf-httpapi-ratelimit-headers-11's structured-field form.
pub fn headers(
    policy_name: &str,
    quota: &Quota,
    decision: &Decision,
) -> [(&'static str, String); 2] {
    let name = sf_string(policy_name);
    let window = ceil_secs(quota.period).max(1);
    [
        (
            "ratelimit-policy",
            format!("{name};q={};w={window}", quota.requests),
        ),
        (
            "ratelimit",
            format!(
                "{name};r={};t={}",
                decision.remaining,
                ceil_secs(decision.reset)
            ),
        ),
    ]
}

/// A structured-field String: quoted, `"` and `\` escaped, anything but printable ASCII
/// replaced by `_` (the format allows nothing else).
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

/// Make room in a bounded table whose values are the moments entries stop mattering (a
/// bucket's `TAT`, a lock's end): drop those over by `now`; if that frees less than a quarter
/// of `max`, also those that end soonest, down to three quarters of `max`. Shared by the local
/// limiter and the failed-authentication lock table.
pub(crate) fn evict_soonest<K, V: Copy + Ord>(table: &mut HashMap<K, V>, now: V, max: usize) {
    table.retain(|_, end| *end > now);
    let keep = max - max.div_ceil(4);
    if table.len() <= keep {
        return;
    }
    let mut ends: Vec<V> = table.values().copied().collect();
    let drop = ends.len() - keep;
    let (_, &mut cutoff, _) = ends.select_nth_unstable(drop - 1);
    let mut over = drop;
    table.retain(|_, end| {
        if over > 0 && *end <= cutoff {
            over -= 1;
            false
        } else {
            true
        }
    });
}

/// Every rate-limit rule ready for the request path, and the limiter they share.
pub struct RateLimits {
    pub rules: Vec<CompiledRateRule>,
    /// `None` when no rule is configured.
    pub limiter: Option<Arc<dyn RateLimiter>>,
    /// The Redis-backed limiter, when there is one (its fallback count is exported).
    pub fallback: Option<Arc<FallbackLimiter>>,
}

/// A rate-limit rule ready for the request path.
pub struct CompiledRateRule {
    pub rule: RateRule,
    pub quota: Quota,
    /// For tool budgets: which `tools/call` names count.
    pub tools: Option<globset::GlobSet>,
    /// `{name}:{per}:`, the start of every limiter key of this rule.
    key_prefix: String,
    /// This rule's `allowed` and `limited` decision counters, resolved on first use.
    decisions: [std::sync::OnceLock<prometheus::IntCounter>; 2],
}

impl CompiledRateRule {
    pub fn new(rule: RateRule, quota: Quota, tools: Option<globset::GlobSet>) -> Self {
        let key_prefix = format!("{}:{}:", rule.name, rule.per.as_str());
        Self {
            rule,
            quota,
            tools,
            key_prefix,
            decisions: [const { std::sync::OnceLock::new() }; 2],
        }
    }

    /// The limiter key for one caller of this rule: `who` as named by `issuer` (users and
    /// orgs: identity is (issuer, subject)), or `who` alone (addresses).
    pub fn key(&self, issuer: Option<&str>, who: &str) -> String {
        let scope = issuer.map_or(0, |i| i.len() + 1);
        let mut key = String::with_capacity(self.key_prefix.len() + scope + who.len());
        key.push_str(&self.key_prefix);
        if let Some(issuer) = issuer {
            key.push_str(issuer);
            key.push('|');
        }
        key.push_str(who);
        key
    }

    /// Count a decision of this rule.
    pub fn count(&self, metrics: &Metrics, allowed: bool) {
        let (i, outcome) = if allowed {
            (0, "allowed")
        } else {
            (1, "limited")
        };
        self.decisions[i]
            .get_or_init(|| {
                metrics
                    .rate_limit
                    .with_label_values(&[self.rule.name.as_str(), outcome])
            })
            .inc();
    }

    /// Whether the request's path (its normal form, see `proxy::route`) counts for this rule:
    /// it starts with one of
    /// the rule's paths, the way an upstream routing by prefix decides (`/mcpx` counts for
    /// `/mcp`, as it is MCP too).
    pub fn applies_to(&self, normal_path: &str) -> bool {
        self.rule.paths.is_empty() || self.rule.paths.iter().any(|p| normal_path.starts_with(p))
    }

    /// Units this request spends: the rule's cost, times the matching tool calls for a tool
    /// budget (zero when none match).
    pub fn cost(&self, calls: Option<&[RpcCall<'_>]>) -> u32 {
        match &self.tools {
            None => self.rule.cost,
            Some(set) => {
                let n = calls
                    .unwrap_or_default()
                    .iter()
                    .filter(|c| c.method == "tools/call")
                    .filter(|c| c.name.as_deref().is_some_and(|n| set.is_match(n)))
                    .count() as u32;
                self.rule.cost.saturating_mul(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000;

    /// A local limiter on a clock only the test moves.
    fn manual(max_keys: u64) -> (LocalLimiter, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(1_000 * SEC));
        (
            LocalLimiter::with_clock(max_keys, MAX_SHARDS, Clock::Manual(now.clone())),
            now,
        )
    }

    fn advance(clock: &AtomicU64, by: Duration) {
        clock.fetch_add(by.as_micros() as u64, Ordering::SeqCst);
    }

    /// 10 per minute (T = 6 s), bursts of `burst`.
    fn per_minute(burst: u32) -> Quota {
        Quota::new(10, Duration::from_secs(60), burst).unwrap()
    }

    #[tokio::test]
    async fn exactly_burst_requests_pass_then_one_is_denied_with_retry_after_t() {
        let (limiter, _) = manual(100);
        let quota = per_minute(5);
        for expected_remaining in (0..5).rev() {
            let d = limiter.check("k", &quota, 1).await.unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, expected_remaining);
            assert_eq!(d.limit, 5);
            assert_eq!(d.retry_after, None);
        }
        let denied = limiter.check("k", &quota, 1).await.unwrap();
        assert!(!denied.allowed);
        assert_eq!(denied.remaining, 0);
        assert_eq!(denied.retry_after, Some(Duration::from_secs(6)));
        assert_eq!(denied.reset, Duration::from_secs(30));
        assert_eq!(denied.retry_after_secs(), Some(6));
    }

    #[tokio::test]
    async fn one_unit_comes_back_after_each_emission_interval() {
        let (limiter, clock) = manual(100);
        let quota = per_minute(2);
        assert!(limiter.check("k", &quota, 1).await.unwrap().allowed);
        assert!(limiter.check("k", &quota, 1).await.unwrap().allowed);
        assert!(!limiter.check("k", &quota, 1).await.unwrap().allowed);
        advance(&clock, Duration::from_secs(5));
        let early = limiter.check("k", &quota, 1).await.unwrap();
        assert!(!early.allowed);
        assert_eq!(early.retry_after, Some(Duration::from_secs(1)));
        advance(&clock, Duration::from_secs(1));
        let refilled = limiter.check("k", &quota, 1).await.unwrap();
        assert!(refilled.allowed);
        assert_eq!(refilled.remaining, 0);
        assert!(!limiter.check("k", &quota, 1).await.unwrap().allowed);
        // A whole idle burst later, the bucket is full again.
        advance(&clock, Duration::from_secs(12));
        let full = limiter.check("k", &quota, 1).await.unwrap();
        assert_eq!((full.allowed, full.remaining), (true, 1));
    }

    #[tokio::test]
    async fn cost_spends_several_units_and_a_cost_above_burst_never_passes() {
        let (limiter, clock) = manual(100);
        let quota = per_minute(10);
        let first = limiter.check("k", &quota, 4).await.unwrap();
        assert_eq!((first.allowed, first.remaining), (true, 6));
        assert_eq!(first.reset, Duration::from_secs(24));
        let second = limiter.check("k", &quota, 4).await.unwrap();
        assert_eq!((second.allowed, second.remaining), (true, 2));
        let third = limiter.check("k", &quota, 4).await.unwrap();
        assert!(!third.allowed);
        assert_eq!(third.remaining, 2, "a denial spends nothing");
        assert_eq!(third.retry_after, Some(Duration::from_secs(12)));
        let fits = limiter.check("k", &quota, 2).await.unwrap();
        assert_eq!((fits.allowed, fits.remaining), (true, 0));
        advance(&clock, Duration::from_secs(3600));
        let too_big = limiter.check("k", &quota, 11).await.unwrap();
        assert!(!too_big.allowed);
        assert_eq!(too_big.retry_after, None, "waiting cannot help");
        assert_eq!(too_big.remaining, 10);
    }

    #[tokio::test]
    async fn remaining_and_reset_follow_the_bucket() {
        let (limiter, clock) = manual(100);
        let quota = per_minute(5);
        for _ in 0..3 {
            limiter.check("k", &quota, 1).await.unwrap();
        }
        let d = limiter.check("k", &quota, 1).await.unwrap();
        assert_eq!(d.remaining, 1);
        assert_eq!(d.reset, Duration::from_secs(24));
        advance(&clock, Duration::from_secs(9));
        // 15 s of the 24 s are left; one more unit (6 s) makes 21 s of the 30 s tolerance
        // used: 9 s, one whole unit, remain.
        let d = limiter.check("k", &quota, 1).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.reset, Duration::from_secs(21));
        assert_eq!(d.remaining, 1);
    }

    #[tokio::test]
    async fn distinct_keys_have_distinct_budgets() {
        let (limiter, _) = manual(100);
        let quota = per_minute(1);
        assert!(limiter.check("user:a", &quota, 1).await.unwrap().allowed);
        assert!(!limiter.check("user:a", &quota, 1).await.unwrap().allowed);
        assert!(limiter.check("user:b", &quota, 1).await.unwrap().allowed);
        assert!(limiter.check("ip:a", &quota, 1).await.unwrap().allowed);
    }

    #[tokio::test]
    async fn memory_is_bounded_by_the_key_count() {
        let (limiter, _) = manual(100);
        let quota = per_minute(5);
        for i in 0..5_000 {
            limiter.check(&format!("k{i}"), &quota, 1).await.unwrap();
        }
        assert!(limiter.tracked_keys() <= 100, "{}", limiter.tracked_keys());
    }

    /// One shard of 8 keys on a clock the test moves.
    fn one_shard() -> (LocalLimiter, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(1_000 * SEC));
        (
            LocalLimiter::with_clock(8, 1, Clock::Manual(now.clone())),
            now,
        )
    }

    /// Units left on `key` after spending one more.
    async fn remaining_after_one(limiter: &LocalLimiter, key: &str, quota: &Quota) -> u32 {
        limiter.check(key, quota, 1).await.unwrap().remaining
    }

    #[tokio::test]
    async fn full_buckets_make_room_before_live_ones() {
        let (limiter, clock) = one_shard();
        let quota = per_minute(5);
        for i in 0..4 {
            limiter.check(&format!("old{i}"), &quota, 1).await.unwrap();
        }
        // T = 6 s: the four old buckets are full again after 6 s.
        advance(&clock, Duration::from_secs(7));
        for i in 0..4 {
            limiter.check(&format!("live{i}"), &quota, 1).await.unwrap();
        }
        // The shard is full; the next new key drops the four full buckets, no live one.
        limiter.check("new", &quota, 1).await.unwrap();
        assert_eq!(limiter.tracked_keys(), 5);
        for i in 0..4 {
            assert_eq!(
                remaining_after_one(&limiter, &format!("live{i}"), &quota).await,
                3
            );
        }
    }

    #[tokio::test]
    async fn a_shard_full_of_live_buckets_drops_the_quarter_closest_to_full() {
        let (limiter, _) = one_shard();
        let quota = per_minute(5);
        // Keys k0..k7; k<i> has spent i + 1 units, so k0 and k1 are the closest to full.
        for i in 0..8u32 {
            let key = format!("k{i}");
            limiter.check(&key, &quota, i.min(4) + 1).await.unwrap();
        }
        limiter.check("new", &quota, 1).await.unwrap();
        assert_eq!(limiter.tracked_keys(), 7);
        // k0 and k1 start again from a full bucket; k2 kept its spending.
        assert_eq!(remaining_after_one(&limiter, "k0", &quota).await, 4);
        assert_eq!(remaining_after_one(&limiter, "k1", &quota).await, 4);
        assert_eq!(remaining_after_one(&limiter, "k2", &quota).await, 1);
    }

    #[tokio::test]
    async fn concurrent_checks_on_one_key_spend_exactly_the_burst() {
        let (limiter, _) = manual(100);
        let limiter = Arc::new(limiter);
        let quota = per_minute(20);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let limiter = limiter.clone();
                let quota = quota.clone();
                tokio::spawn(async move { limiter.check("k", &quota, 1).await.unwrap().allowed })
            })
            .collect();
        let mut allowed = 0;
        for t in tasks {
            allowed += usize::from(t.await.unwrap());
        }
        assert_eq!(allowed, 20);
    }

    fn spend<'a>(key: &'a str, quota: &'a Quota, cost: u32) -> Spend<'a> {
        Spend { key, quota, cost }
    }

    /// Units left on `key` now, spending nothing.
    async fn left(limiter: &LocalLimiter, key: &str, quota: &Quota) -> u32 {
        limiter.check(key, quota, 0).await.unwrap().remaining
    }

    #[tokio::test]
    async fn check_all_spends_nothing_when_one_budget_denies() {
        let (limiter, _) = manual(100);
        let (wide, narrow) = (per_minute(5), per_minute(1));
        assert!(limiter.check("wide", &wide, 1).await.unwrap().allowed);
        assert!(limiter.check("narrow", &narrow, 1).await.unwrap().allowed);
        for order in [[0, 1], [1, 0]] {
            let both = [spend("wide", &wide, 1), spend("narrow", &narrow, 1)];
            let spends = order.map(|i| both[i]);
            let decisions = limiter.check_all(&spends).await.unwrap();
            assert_eq!(decisions.len(), 2);
            let (w, n) = (&decisions[order[0]], &decisions[order[1]]);
            assert!(!n.allowed, "{n:?}");
            assert_eq!(n.retry_after, Some(Duration::from_secs(6)));
            // The wide budget had room, and it reports what it still has: nothing was spent.
            assert!(w.allowed, "{w:?}");
            assert_eq!((w.remaining, w.retry_after), (4, None));
            assert_eq!(left(&limiter, "wide", &wide).await, 4, "order {order:?}");
        }
    }

    #[tokio::test]
    async fn check_all_spends_every_budget_when_all_allow() {
        let (limiter, _) = manual(100);
        let (a, b) = (per_minute(5), per_minute(3));
        let decisions = limiter
            .check_all(&[spend("a", &a, 2), spend("b", &b, 1)])
            .await
            .unwrap();
        let summary: Vec<_> = decisions.iter().map(|d| (d.allowed, d.remaining)).collect();
        assert_eq!(summary, [(true, 3), (true, 2)]);
        assert_eq!(left(&limiter, "a", &a).await, 3);
        assert_eq!(left(&limiter, "b", &b).await, 2);
        assert!(limiter.check_all(&[]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn check_all_spends_on_one_key_add_up() {
        let (limiter, _) = manual(100);
        let quota = per_minute(5);
        let twice = [spend("k", &quota, 2), spend("k", &quota, 2)];
        let d = limiter.check_all(&twice).await.unwrap();
        assert_eq!((d[0].allowed, d[0].remaining), (true, 3));
        assert_eq!((d[1].allowed, d[1].remaining), (true, 1));
        assert_eq!(left(&limiter, "k", &quota).await, 1);
        // One unit is left: the second spend of the same call does not fit, so neither spends.
        let d = limiter
            .check_all(&[spend("k", &quota, 1), spend("k", &quota, 1)])
            .await
            .unwrap();
        assert!(d[0].allowed && !d[1].allowed, "{d:?}");
        assert_eq!(d[1].retry_after, Some(Duration::from_secs(6)));
        assert_eq!(left(&limiter, "k", &quota).await, 1);
    }

    #[test]
    fn check_all_on_keys_of_one_shard_locks_it_once() {
        // On its own thread, so that a shard locked twice (a deadlock) fails the test.
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (limiter, _) = one_shard();
            let quota = per_minute(2);
            let spends = [
                spend("a", &quota, 1),
                spend("b", &quota, 1),
                spend("a", &quota, 1),
            ];
            let decisions = limiter.spend_all(&spends).unwrap();
            let left = |key| limiter.spend_one(&spend(key, &quota, 0)).unwrap().remaining;
            let _ = done.send((decisions, left("a"), left("b")));
        });
        let (decisions, a, b) = outcome
            .recv_timeout(Duration::from_secs(10))
            .expect("check_all on one shard never returned (locked it twice?)");
        assert!(decisions.iter().all(|d| d.allowed), "{decisions:?}");
        assert_eq!((a, b), (0, 1));
    }

    #[tokio::test]
    async fn check_all_keeps_every_budget_it_spent_when_the_table_is_full() {
        // One shard holding one key: storing the second key of the call makes room.
        let now = Arc::new(AtomicU64::new(1_000 * SEC));
        let limiter = LocalLimiter::with_clock(1, 1, Clock::Manual(now));
        let quota = per_minute(2);
        let spends = [spend("a", &quota, 1), spend("b", &quota, 1)];
        assert!(limiter
            .check_all(&spends)
            .await
            .unwrap()
            .iter()
            .all(|d| d.allowed));
        // The room was made before the call stored anything, so neither spend was dropped.
        let decisions = limiter.check_all(&spends).await.unwrap();
        let left: Vec<_> = decisions.iter().map(|d| d.remaining).collect();
        assert_eq!(left, [0, 0]);
    }

    #[tokio::test]
    async fn check_all_rejects_an_invalid_quota_before_spending_anything() {
        let (limiter, _) = manual(10);
        let good = per_minute(2);
        let bad = Quota {
            requests: 0,
            period: Duration::from_secs(1),
            burst: 1,
        };
        let spends = [spend("good", &good, 1), spend("bad", &bad, 1)];
        assert!(matches!(
            limiter.check_all(&spends).await,
            Err(LimiterError::InvalidQuota(_))
        ));
        assert_eq!(left(&limiter, "good", &good).await, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_check_alls_on_overlapping_keys_spend_exactly_the_bursts() {
        let (limiter, _) = manual(100);
        let limiter = Arc::new(limiter);
        // "a" and "c" hold 20 each; "b", in every call, holds 30: it runs out first.
        let (ac, b) = (per_minute(20), per_minute(30));
        let sets: [[&str; 2]; 4] = [["a", "b"], ["b", "a"], ["c", "b"], ["b", "c"]];
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (limiter, ac, b) = (limiter.clone(), ac.clone(), b.clone());
                let set = sets[i % 4];
                tokio::spawn(async move {
                    let spends = set.map(|k| spend(k, if k == "b" { &b } else { &ac }, 1));
                    let decisions = limiter.check_all(&spends).await.unwrap();
                    let passed = decisions.iter().all(|d| d.allowed);
                    (set.contains(&"a"), passed)
                })
            })
            .collect();
        let (mut via_a, mut via_c) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                (true, true) => via_a += 1,
                (false, true) => via_c += 1,
                _ => {}
            }
        }
        assert_eq!(via_a + via_c, 30);
        assert_eq!(left(&limiter, "b", &b).await, 0);
        // Only calls that passed spent: nothing was taken by a call another budget refused.
        assert_eq!(left(&limiter, "a", &ac).await, 20 - via_a);
        assert_eq!(left(&limiter, "c", &ac).await, 20 - via_c);
    }

    #[test]
    fn gcra_treats_a_past_tat_as_a_full_bucket() {
        let t = 6 * SEC;
        let (d, store) = gcra(Some(10 * SEC), 100 * SEC, t, 5, 1);
        assert!(d.allowed);
        assert_eq!(d.remaining, 4);
        assert_eq!(store, Some(106 * SEC));
        let (peek, store) = gcra(None, 100 * SEC, t, 5, 0);
        assert_eq!((peek.allowed, peek.remaining, store), (true, 5, None));
    }

    #[test]
    fn quotas_are_checked() {
        assert!(Quota::new(0, Duration::from_secs(1), 1).is_err());
        assert!(Quota::new(1, Duration::ZERO, 1).is_err());
        assert!(Quota::new(1, Duration::from_secs(1), 0).is_err());
        assert!(Quota::new(1, Duration::from_secs(10 * 365 * 86_400), 1).is_err());
        let q = Quota::new(3, Duration::from_secs(1), 1).unwrap();
        assert_eq!(
            q.emission_interval().unwrap(),
            Duration::from_micros(333_334)
        );
        let fast = Quota::new(u32::MAX, Duration::from_secs(1), 1).unwrap();
        assert_eq!(fast.emission_interval().unwrap(), Duration::from_micros(1));
    }

    #[tokio::test]
    async fn an_invalid_quota_is_an_error_not_a_decision() {
        let (limiter, _) = manual(10);
        let quota = Quota {
            requests: 0,
            period: Duration::from_secs(1),
            burst: 1,
        };
        assert!(matches!(
            limiter.check("k", &quota, 1).await,
            Err(LimiterError::InvalidQuota(_))
        ));
    }

    /// A shared limiter that fails while told to.
    struct Flaky {
        down: Arc<AtomicBool>,
        inner: LocalLimiter,
    }

    #[async_trait]
    impl RateLimiter for Flaky {
        async fn check_all(&self, spends: &[Spend<'_>]) -> Result<Vec<Decision>, LimiterError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(LimiterError::Unavailable("down".into()));
            }
            self.inner.check_all(spends).await
        }

        fn name(&self) -> &'static str {
            "flaky"
        }
    }

    fn flaky(on_error: OnRedisError) -> (FallbackLimiter, Arc<AtomicBool>) {
        let down = Arc::new(AtomicBool::new(false));
        let shared = Flaky {
            down: down.clone(),
            inner: LocalLimiter::new(10),
        };
        (
            FallbackLimiter::new(shared, on_error, LocalLimiter::new(10)),
            down,
        )
    }

    #[tokio::test]
    async fn fallback_applies_the_local_limit_while_the_shared_one_fails() {
        let (limiter, down) = flaky(OnRedisError::Local);
        let quota = per_minute(2);
        assert!(limiter.check("k", &quota, 1).await.unwrap().allowed);
        assert!(limiter.check("k", &quota, 1).await.unwrap().allowed);
        assert!(!limiter.check("k", &quota, 1).await.unwrap().allowed);
        assert_eq!(limiter.fallbacks(), 0);
        down.store(true, Ordering::SeqCst);
        // The local budget is separate: two more, then denied.
        assert!(limiter.check("k", &quota, 1).await.unwrap().allowed);
        assert!(limiter.check("k", &quota, 1).await.unwrap().allowed);
        assert!(!limiter.check("k", &quota, 1).await.unwrap().allowed);
        assert_eq!(limiter.fallbacks(), 3);
        down.store(false, Ordering::SeqCst);
        assert!(!limiter.check("k", &quota, 1).await.unwrap().allowed);
        assert_eq!(limiter.fallbacks(), 3);
    }

    #[tokio::test]
    async fn fallback_allows_or_denies_as_configured() {
        let quota = per_minute(2);
        let (allow, down) = flaky(OnRedisError::Allow);
        down.store(true, Ordering::SeqCst);
        for _ in 0..5 {
            let d = allow.check("k", &quota, 1).await.unwrap();
            assert_eq!((d.allowed, d.remaining, d.retry_after), (true, 1, None));
        }
        assert!(!allow.check("k", &quota, 3).await.unwrap().allowed);
        assert_eq!(allow.fallbacks(), 6);

        let (deny, down) = flaky(OnRedisError::Deny);
        down.store(true, Ordering::SeqCst);
        let d = deny.check("k", &quota, 1).await.unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(RETRY_WHILE_UNAVAILABLE));
        assert_eq!(deny.fallbacks(), 1);
    }

    #[tokio::test]
    async fn fallback_checks_all_budgets_at_once_and_counts_one_fallback_per_call() {
        let (wide, narrow) = (per_minute(5), per_minute(1));
        let spends = [spend("wide", &wide, 1), spend("narrow", &narrow, 1)];
        let (local, down) = flaky(OnRedisError::Local);
        down.store(true, Ordering::SeqCst);
        let first = local.check_all(&spends).await.unwrap();
        assert!(first.iter().all(|d| d.allowed), "{first:?}");
        let second = local.check_all(&spends).await.unwrap();
        assert!(second[0].allowed && !second[1].allowed, "{second:?}");
        // The local limit is all or nothing too: the refused call left "wide" as it was.
        assert_eq!(second[0].remaining, 4);
        assert_eq!(local.check("wide", &wide, 1).await.unwrap().remaining, 3);
        assert_eq!(local.fallbacks(), 3);
        assert!(local.check_all(&[]).await.unwrap().is_empty());
        assert_eq!(local.fallbacks(), 3, "an empty call asks nobody");

        for (on_error, allowed) in [(OnRedisError::Allow, true), (OnRedisError::Deny, false)] {
            let (limiter, down) = flaky(on_error);
            down.store(true, Ordering::SeqCst);
            let d = limiter.check_all(&spends).await.unwrap();
            let summary: Vec<_> = d.iter().map(|d| (d.allowed, d.remaining)).collect();
            let expected = if allowed {
                [(true, 4), (true, 0)]
            } else {
                [(false, 0); 2]
            };
            assert_eq!(summary, expected, "{on_error:?}");
            assert_eq!(limiter.fallbacks(), 1, "{on_error:?}");
        }
    }

    #[tokio::test]
    async fn fallback_does_not_hide_an_invalid_quota() {
        let (limiter, _) = flaky(OnRedisError::Allow);
        let quota = Quota {
            requests: 1,
            period: Duration::from_secs(1),
            burst: 0,
        };
        assert!(limiter.check("k", &quota, 1).await.is_err());
        assert_eq!(limiter.fallbacks(), 0);
    }

    #[tokio::test]
    async fn an_outage_is_logged_once_when_it_starts_and_once_when_it_ends() {
        let logs = crate::telemetry::capture::Capture::text();
        let (limiter, down) = flaky(OnRedisError::Local);
        let quota = per_minute(100);
        for outage in [3, 1] {
            down.store(true, Ordering::SeqCst);
            for _ in 0..outage {
                limiter.check("k", &quota, 1).await.unwrap();
            }
            down.store(false, Ordering::SeqCst);
            limiter.check("k", &quota, 1).await.unwrap();
            limiter.check("k", &quota, 1).await.unwrap();
        }
        let text = logs.text_so_far();
        assert_eq!(text.matches("falling back").count(), 2, "{text}");
        assert_eq!(text.matches("are back").count(), 2, "{text}");
        assert_eq!(limiter.fallbacks(), 4);
    }

    #[test]
    fn headers_use_the_structured_field_form() {
        let quota = Quota::new(100, Duration::from_millis(60_500), 10).unwrap();
        let decision = Decision {
            allowed: true,
            limit: 10,
            remaining: 7,
            reset: Duration::from_millis(1_200),
            retry_after: None,
        };
        let [policy, limit] = headers("per-user", &quota, &decision);
        assert_eq!(
            policy,
            ("ratelimit-policy", "\"per-user\";q=100;w=61".into())
        );
        assert_eq!(limit, ("ratelimit", "\"per-user\";r=7;t=2".into()));
        let sub_second = Quota::new(5, Duration::from_millis(200), 1).unwrap();
        let full = Decision {
            reset: Duration::ZERO,
            ..decision
        };
        let [policy, limit] = headers("a \"b\"\\c\né", &sub_second, &full);
        assert_eq!(policy.1, r#""a \"b\"\\c__";q=5;w=1"#);
        assert_eq!(limit.1, r#""a \"b\"\\c__";r=7;t=0"#);
    }
}

#[cfg(test)]
mod compiled_rule_tests {
    use super::*;
    use crate::config::RateKey;
    use crate::proxy::route::Routes;
    use crate::telemetry::metrics::Metrics;

    fn rule(name: &str, per: RateKey) -> CompiledRateRule {
        let rule = RateRule {
            name: name.into(),
            per,
            requests: 10,
            period: std::time::Duration::from_secs(60),
            burst: 10,
            paths: vec!["/mcp".into()],
            tools: Vec::new(),
            cost: 1,
        };
        let quota = Quota::new(rule.requests, rule.period, rule.burst).expect("quota");
        CompiledRateRule::new(rule, quota, None)
    }

    #[test]
    fn limiter_keys_name_the_rule_the_kind_and_the_caller() {
        assert_eq!(
            rule("per-user", RateKey::User).key(Some("https://idp.example"), "user_1"),
            "per-user:user:https://idp.example|user_1"
        );
        assert_eq!(
            rule("edge", RateKey::Ip).key(None, "10.0.0.1"),
            "edge:ip:10.0.0.1"
        );
        let r = rule("x", RateKey::Org);
        let routes = Routes::new(&["/mcp".to_string()], true);
        let applies = |p: &str| r.applies_to(&routes.classify(p).expect("path").normal);
        // Every spelling an upstream routes to /mcp counts; other paths do not.
        for p in ["/mcp", "/mcp/sub", "/mcpx", "//MCP", "/mcp;x"] {
            assert!(applies(p), "{p}");
        }
        assert!(!applies("/x/mcp") && !applies("/health"));
    }

    #[test]
    fn decisions_are_counted_per_rule_and_result() {
        let metrics = Metrics::new();
        let a = rule("a", RateKey::User);
        let b = rule("b", RateKey::User);
        a.count(&metrics, true);
        a.count(&metrics, true);
        a.count(&metrics, false);
        b.count(&metrics, false);
        let get =
            |name: &str, result: &str| metrics.rate_limit.with_label_values(&[name, result]).get();
        assert_eq!(get("a", "allowed"), 2);
        assert_eq!(get("a", "limited"), 1);
        assert_eq!(get("b", "allowed"), 0);
        assert_eq!(get("b", "limited"), 1);
    }
}
