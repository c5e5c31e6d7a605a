//! MCP session binding: which user opened each `Mcp-Session-Id`, so a session id seen with
//! another user's token can be refused.
//!
//! It owns the record of "session → owner": in process ([`LocalBindings`], one replica) or in
//! Redis ([`RedisBindings`], shared by every replica). The first binding of a session wins and
//! is kept for a TTL (24 h by default), refreshed when the same owner binds it again. Session
//! ids are never stored: records are keyed by the SHA-256 (hex) of the id. It does not read
//! headers or decide what a mismatch means — that is the proxy's flow.
//!
//! [`RedisBindings`] keeps every binding it has seen in a bounded local cache, each until the
//! moment Redis would expire it. A binding's owner never changes while it exists (first
//! binding wins), so a cached owner is the right answer without asking Redis: a Redis outage
//! costs only sessions this replica has never seen (their lookups fail, and the proxy answers
//! 503). Re-binding a cached session by its owner refreshes the Redis TTL at most once per half
//! TTL, and is answered from the cache when Redis cannot be reached.
//!
//! Redis layout: `{prefix}mcp-session:{<sha256 hex of the session id>}`, a string holding the
//! owner, with a `PX` expiry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::cache::Expiring;
use crate::redis::RedisConn;

/// How long a binding lives unless told otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Sessions the local store keeps at most, unless told otherwise.
pub const DEFAULT_MAX_SESSIONS: u64 = 100_000;

/// First binding wins, atomically. `KEYS[1]`: the binding; `ARGV`: owner, TTL (ms).
/// Returns `{owner on record after the call, its remaining TTL in ms}`; refreshes the TTL when
/// that owner is `ARGV[1]`.
const BIND_LUA: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {ARGV[1], tonumber(ARGV[2])} end
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {current, tonumber(ARGV[2])}
end
if not current then return {false, 0} end
return {current, redis.call('PTTL', KEYS[1])}
"#;

/// The owner of `KEYS[1]` and its remaining TTL (ms): `{owner, pttl}`, or `{}` when unbound.
const OWNER_LUA: &str = r#"
local current = redis.call('GET', KEYS[1])
if not current then return {} end
return {current, redis.call('PTTL', KEYS[1])}
"#;

/// Why a binding could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BindingError {
    /// The shared store is unreachable, timed out, or failed.
    #[error("session bindings unavailable: {0}")]
    Unavailable(String),
}

/// Where session owners are recorded.
#[async_trait]
pub trait SessionBindings: Send + Sync + 'static {
    /// Record that `session_id` belongs to `owner` (first binding wins; returns the owner on
    /// record after the call).
    async fn bind(&self, session_id: &str, owner: &str) -> Result<String, BindingError>;
    /// Who owns `session_id`, if anyone.
    async fn owner(&self, session_id: &str) -> Result<Option<String>, BindingError>;
}

/// The SHA-256 of a session id, in lower-case hex: what records are keyed by.
fn session_hash(session_id: &str) -> String {
    format!("{:x}", Sha256::digest(session_id.as_bytes()))
}

/// In-process bindings: bounded, expiring a TTL after the last bind.
pub struct LocalBindings {
    owners: Expiring<String, String>,
    ttl: Duration,
}

impl LocalBindings {
    /// Keep at most `max_sessions` bindings, each for `ttl` after its last bind.
    pub fn new(ttl: Duration, max_sessions: u64) -> Self {
        Self {
            owners: Expiring::new(usize::try_from(max_sessions).unwrap_or(usize::MAX)),
            ttl: ttl.max(Duration::from_millis(1)),
        }
    }
}

impl Default for LocalBindings {
    fn default() -> Self {
        Self::new(DEFAULT_TTL, DEFAULT_MAX_SESSIONS)
    }
}

#[async_trait]
impl SessionBindings for LocalBindings {
    async fn bind(&self, session_id: &str, owner: &str) -> Result<String, BindingError> {
        let until = Instant::now() + self.ttl;
        // One step, so that of two first binds at once exactly one wins.
        let on_record = self.owners.upsert(
            session_hash(session_id).as_str(),
            |current, expires| {
                if current == owner {
                    // Binding it again restarts its time to live.
                    *expires = until;
                }
                current.clone()
            },
            || (owner.to_string(), until, owner.to_string()),
        );
        Ok(on_record)
    }

    async fn owner(&self, session_id: &str) -> Result<Option<String>, BindingError> {
        Ok(self.owners.get(&session_hash(session_id)))
    }
}

/// A binding this replica has seen: whose it is and when this replica last refreshed it in
/// Redis (the cache keeps it until Redis would expire it).
#[derive(Clone)]
struct Known {
    owner: Arc<str>,
    refreshed: Instant,
}

/// Bindings in Redis, shared by every replica, with the ones seen here cached locally.
pub struct RedisBindings {
    conn: Arc<RedisConn>,
    ttl: Duration,
    ttl_ms: u64,
    bind: redis::Script,
    lookup: redis::Script,
    /// Keyed by the session hash, each until Redis would expire it.
    known: Expiring<String, Known>,
}

impl RedisBindings {
    /// Bindings on `conn`, under the connection's key prefix, each kept `ttl` after its last
    /// bind; at most [`DEFAULT_MAX_SESSIONS`] of them cached locally.
    pub fn new(conn: Arc<RedisConn>, ttl: Duration) -> Self {
        Self::with_capacity(conn, ttl, DEFAULT_MAX_SESSIONS)
    }

    /// As [`RedisBindings::new`], caching at most `max_cached` bindings locally.
    pub fn with_capacity(conn: Arc<RedisConn>, ttl: Duration, max_cached: u64) -> Self {
        let ttl = ttl.max(Duration::from_millis(1));
        Self {
            conn,
            ttl,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
            bind: redis::Script::new(BIND_LUA),
            lookup: redis::Script::new(OWNER_LUA),
            known: Expiring::new(usize::try_from(max_cached).unwrap_or(usize::MAX)),
        }
    }

    /// The cached binding of `hash`, if it has not expired.
    fn cached(&self, hash: &str) -> Option<Known> {
        self.known.get(hash)
    }

    /// Remember that `hash` belongs to `owner` for `pttl_ms` more (as Redis reported it).
    fn remember(&self, hash: String, owner: &str, pttl_ms: i64, refreshed: bool) {
        // PTTL is -1 for a key without expiry (not written by keygate): keep it one TTL.
        let left = u64::try_from(pttl_ms)
            .map(Duration::from_millis)
            .unwrap_or(self.ttl)
            .min(self.ttl);
        if left.is_zero() {
            return;
        }
        let now = Instant::now();
        let previous = self.known.get(hash.as_str());
        let owner: Arc<str> = match previous.as_ref() {
            Some(p) if &*p.owner == owner => p.owner.clone(),
            _ => Arc::from(owner),
        };
        let refreshed = match (refreshed, previous) {
            (true, _) => now,
            (false, Some(p)) if p.owner == owner => p.refreshed,
            // Seen but never refreshed by this replica: refresh on the next bind.
            (false, _) => now.checked_sub(self.ttl).unwrap_or(now),
        };
        self.known
            .insert(hash, Known { owner, refreshed }, now + left);
    }

    /// The Redis key recording `session_id`'s owner.
    pub fn redis_key(&self, session_id: &str) -> String {
        format!(
            "{}mcp-session:{{{}}}",
            self.conn.key_prefix(),
            session_hash(session_id)
        )
    }
}

#[async_trait]
impl SessionBindings for RedisBindings {
    async fn bind(&self, session_id: &str, owner: &str) -> Result<String, BindingError> {
        let hash = session_hash(session_id);
        let known = self.cached(&hash);
        if let Some(k) = &known {
            if &*k.owner != owner || k.refreshed.elapsed() < self.ttl / 2 {
                // Another owner's binding stands; the owner's own was refreshed lately.
                return Ok(k.owner.to_string());
            }
        }
        let mut invocation = self.bind.key(self.redis_key(session_id));
        invocation.arg(owner).arg(self.ttl_ms);
        let outcome: Result<(Option<String>, i64), _> =
            self.conn.invoke("session bind", &invocation).await;
        match outcome {
            Ok((Some(on_record), pttl)) => {
                let refreshed = on_record == owner;
                self.remember(hash, &on_record, pttl, refreshed);
                Ok(on_record)
            }
            // Expired between SET NX and GET: nobody holds it; the next bind takes it.
            Ok((None, _)) => Err(BindingError::Unavailable(
                "session binding expired while being bound".into(),
            )),
            // The binding is known to be the owner's: only its refresh failed.
            Err(_) if known.is_some() => Ok(owner.to_string()),
            Err(e) => Err(BindingError::Unavailable(e.to_string())),
        }
    }

    async fn owner(&self, session_id: &str) -> Result<Option<String>, BindingError> {
        let hash = session_hash(session_id);
        if let Some(k) = self.cached(&hash) {
            return Ok(Some(k.owner.to_string()));
        }
        let invocation = self.lookup.key(self.redis_key(session_id));
        let found: Vec<redis::Value> = self
            .conn
            .invoke("session owner", &invocation)
            .await
            .map_err(|e| BindingError::Unavailable(e.to_string()))?;
        let (owner, pttl) = match found.as_slice() {
            [] => return Ok(None),
            [owner, pttl] => (
                redis::from_redis_value::<String>(owner.clone()),
                redis::from_redis_value::<i64>(pttl.clone()),
            ),
            _ => {
                return Err(BindingError::Unavailable(
                    "unexpected reply to a session lookup".into(),
                ))
            }
        };
        let (Ok(owner), Ok(pttl)) = (owner, pttl) else {
            return Err(BindingError::Unavailable(
                "unexpected reply to a session lookup".into(),
            ));
        };
        self.remember(hash, &owner, pttl, false);
        Ok(Some(owner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::RedisSettings;

    #[tokio::test]
    async fn first_binding_wins() {
        let b = LocalBindings::default();
        assert_eq!(b.owner("s1").await.unwrap(), None);
        assert_eq!(b.bind("s1", "user_a").await.unwrap(), "user_a");
        assert_eq!(b.bind("s1", "user_b").await.unwrap(), "user_a");
        assert_eq!(b.bind("s1", "user_a").await.unwrap(), "user_a");
        assert_eq!(b.owner("s1").await.unwrap().as_deref(), Some("user_a"));
        assert_eq!(b.bind("s2", "user_b").await.unwrap(), "user_b");
        assert_eq!(b.owner("s2").await.unwrap().as_deref(), Some("user_b"));
    }

    #[tokio::test]
    async fn bindings_expire_after_their_ttl() {
        let b = LocalBindings::new(Duration::from_millis(30), 10);
        b.bind("s", "user_a").await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(b.owner("s").await.unwrap(), None);
        assert_eq!(b.bind("s", "user_b").await.unwrap(), "user_b");
    }

    #[tokio::test]
    async fn local_bindings_are_bounded() {
        let b = LocalBindings::new(DEFAULT_TTL, 50);
        for i in 0..2_000 {
            b.bind(&format!("s{i}"), "u").await.unwrap();
        }
        assert!(b.owners.len() <= 50, "{}", b.owners.len());
    }

    #[test]
    fn session_ids_are_stored_only_as_hashes() {
        let b = LocalBindings::default();
        futures::executor::block_on(b.bind("secret-session", "u")).unwrap();
        let keys: Vec<String> = b.owners.keys();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].len(), 64);
        assert!(!keys[0].contains("secret"));
        assert_eq!(
            session_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );

        let conn = RedisConn::new(&RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            cluster: false,
            key_prefix: "kg:".into(),
            connect_timeout: Duration::from_millis(100),
            command_timeout: Duration::from_millis(100),
        })
        .unwrap();
        let redis = RedisBindings::new(Arc::new(conn), DEFAULT_TTL);
        assert_eq!(
            redis.redis_key("abc"),
            "kg:mcp-session:{ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad}"
        );
    }
}
