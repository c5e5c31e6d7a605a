//! MCP session binding: which user opened each `Mcp-Session-Id`, so a session id seen with
//! another user's token can be refused.
//!
//! It owns the record of "session → owner": in process ([`LocalBindings`], one replica) or in
//! Redis ([`RedisBindings`], shared by every replica). The first binding of a session wins and
//! is kept for a TTL (24 h by default), refreshed when the same owner binds it again. Session
//! ids are never stored: records are keyed by the SHA-256 (hex) of the id. It does not read
//! headers or decide what a mismatch means — that is the proxy's flow.
//!
//! Redis layout: `{prefix}mcp-session:{<sha256 hex of the session id>}`, a string holding the
//! owner, with a `PX` expiry.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use moka::ops::compute::Op;
use moka::sync::Cache;
use sha2::{Digest, Sha256};

use crate::keys::redis_store::RedisConn;

/// How long a binding lives unless told otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Sessions the local store keeps at most, unless told otherwise.
pub const DEFAULT_MAX_SESSIONS: u64 = 100_000;

/// First binding wins, atomically. `KEYS[1]`: the binding; `ARGV`: owner, TTL (ms).
/// Returns the owner on record after the call; refreshes the TTL when that is `ARGV[1]`.
const BIND_LUA: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return ARGV[1] end
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return current
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
    owners: Cache<String, String>,
}

impl LocalBindings {
    /// Keep at most `max_sessions` bindings, each for `ttl` after its last bind.
    pub fn new(ttl: Duration, max_sessions: u64) -> Self {
        Self {
            owners: Cache::builder()
                .max_capacity(max_sessions)
                .time_to_live(ttl.max(Duration::from_millis(1)))
                .build(),
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
        let mut on_record = owner.to_string();
        self.owners
            .entry(session_hash(session_id))
            .and_compute_with(|current| match current {
                // Writing it again restarts its time to live.
                Some(e) if e.value() == owner => Op::Put(owner.to_string()),
                Some(e) => {
                    on_record = e.into_value();
                    Op::Nop
                }
                None => Op::Put(owner.to_string()),
            });
        Ok(on_record)
    }

    async fn owner(&self, session_id: &str) -> Result<Option<String>, BindingError> {
        Ok(self.owners.get(&session_hash(session_id)))
    }
}

/// Bindings in Redis, shared by every replica.
pub struct RedisBindings {
    conn: Arc<RedisConn>,
    ttl_ms: u64,
    bind: redis::Script,
}

impl RedisBindings {
    /// Bindings on `conn`, under the connection's key prefix, each kept `ttl` after its last
    /// bind.
    pub fn new(conn: Arc<RedisConn>, ttl: Duration) -> Self {
        Self {
            conn,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
            bind: redis::Script::new(BIND_LUA),
        }
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
        let mut invocation = self.bind.key(self.redis_key(session_id));
        invocation.arg(owner).arg(self.ttl_ms);
        self.conn
            .invoke("session bind", &invocation)
            .await
            .map_err(|e| BindingError::Unavailable(e.to_string()))
    }

    async fn owner(&self, session_id: &str) -> Result<Option<String>, BindingError> {
        let mut get = redis::cmd("GET");
        get.arg(self.redis_key(session_id));
        self.conn
            .query("session owner", &get)
            .await
            .map_err(|e| BindingError::Unavailable(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::redis_store::RedisSettings;

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
        b.owners.run_pending_tasks();
        assert!(b.owners.entry_count() <= 50, "{}", b.owners.entry_count());
    }

    #[test]
    fn session_ids_are_stored_only_as_hashes() {
        let b = LocalBindings::default();
        futures::executor::block_on(b.bind("secret-session", "u")).unwrap();
        let keys: Vec<String> = b.owners.iter().map(|(k, _)| (*k).clone()).collect();
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
