//! The shared key store: sealed records in Redis (one server or a Redis Cluster), plus the
//! pub/sub channel replicas use to tell each other a record changed. Every command goes through
//! [`RedisConn`] (`crate::redis`), which owns the connection, its deadlines and the circuit
//! breaker; the record's wire form is `keys::store`'s, shared with the embedded store. Nothing
//! here caches records, decides anything about crypto, or waits out an outage: callers get
//! [`StoreError::Unavailable`] at once and decide.
//!
//! Layout, with the default prefix `keygate:`:
//! - `keygate:key:{user:<id>}` / `keygate:key:{org:<id>}` — one string per owner, the JSON
//!   record. The slot in braces is the Redis Cluster hash tag.
//! - channel `keygate:invalidate` — messages are owner slots (`user:<id>`). Writes and deletes
//!   publish in the same script as the change, so a change that lands is always announced
//!   (even when the caller timed out and answered 503). The listener tells subscribers when
//!   the subscription is lost ([`Invalidation::Lost`]) and, once subscribed again, that
//!   anything may have changed meanwhile ([`Invalidation::All`]).
//!
//! Runtimes: [`RedisStore::new`] does no I/O and spawn nothing, so they may
//! be called outside a tokio runtime. Connections are made by the first async call, on that
//! caller's runtime. The pub/sub listener is spawned by the first
//! [`KeyStore::subscribe_invalidations`] call made inside a runtime (or, when that call came
//! from outside one, by the next async call on the store), on that runtime; it is respawned if
//! that runtime went away, and aborted when the store is dropped.

use std::collections::BTreeSet;
use std::future::Future;
use std::str::FromStr;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use futures::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster::NodeAddress;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{RedisError, RedisResult, Value};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::store::{
    decode_record, encode_record, Invalidation, KeyStore, Owner, StoreError, StoredRecord,
};
use crate::redis::{Connection, Node};
use crate::redis::{RedisConn, RedisConnError, RedisSettings};

/// First and longest wait between pub/sub reconnection attempts.
const PUBSUB_BACKOFF_MIN: Duration = Duration::from_millis(100);
const PUBSUB_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often the pub/sub connection is pinged, so a silently dead link is noticed.
const PUBSUB_PING_EVERY: Duration = Duration::from_secs(5);
/// Keys asked for per SCAN call.
const SCAN_COUNT: usize = 500;
/// Buffered invalidations per subscriber before it sees `Lagged`.
const INVALIDATION_BUFFER: usize = 1024;

/// Compare-and-swap on the `sealed` field, announcing the change in the same step. Base64 with
/// padding is canonical, so comparing the encoded strings compares the bytes. `ARGV`: expected
/// sealed, new record, channel, slot. Returns 1 replaced, 0 not (absent or different), -1 when
/// the current value is not a record.
const REPLACE_IF_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if not ok or type(rec) ~= 'table' or type(rec.sealed) ~= 'string' then return -1 end
if rec.sealed ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"#;

/// Write a record and announce it, in one step. `ARGV`: record, channel, slot.
const PUT_LUA: &str = r#"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"#;

/// Delete a record and announce it, in one step. `ARGV`: channel, slot. Returns keys removed.
const DELETE_LUA: &str = r#"
local removed = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return removed
"#;

impl From<RedisConnError> for StoreError {
    fn from(e: RedisConnError) -> Self {
        match e {
            RedisConnError::Invalid(m) | RedisConnError::Unavailable(m) => {
                StoreError::Unavailable(m)
            }
            RedisConnError::WrongType(m) => StoreError::Corrupt(m),
        }
    }
}

/// The [`KeyStore`] backed by Redis (single node or cluster).
pub struct RedisStore {
    conn: RedisConn,
    prefix: String,
    channel: String,
    cas: redis::Script,
    put: redis::Script,
    delete: redis::Script,
    invalidations: broadcast::Sender<Invalidation>,
    listener: StdMutex<Option<JoinHandle<()>>>,
}

impl RedisStore {
    /// Validate the settings and build the store; connects nothing (see the module docs).
    pub fn new(settings: RedisSettings) -> Result<Self, StoreError> {
        let conn = RedisConn::new(&settings)?;
        let (invalidations, _) = broadcast::channel(INVALIDATION_BUFFER);
        Ok(Self {
            conn,
            prefix: settings.key_prefix.clone(),
            channel: format!("{}invalidate", settings.key_prefix),
            cas: redis::Script::new(REPLACE_IF_LUA),
            put: redis::Script::new(PUT_LUA),
            delete: redis::Script::new(DELETE_LUA),
            invalidations,
            listener: StdMutex::new(None),
        })
    }

    /// The connection every command of this store goes through.
    pub fn conn(&self) -> &RedisConn {
        &self.conn
    }

    /// The Redis key holding `owner`'s record.
    fn key(&self, owner: &Owner) -> String {
        format!("{}key:{{{}}}", self.prefix, owner.slot())
    }

    /// The owner a record key belongs to, if the key is one of ours.
    fn owner_of_key(&self, key: &[u8]) -> Option<Owner> {
        let key = std::str::from_utf8(key).ok()?;
        let slot = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("key:{")?
            .strip_suffix('}')?;
        Owner::from_slot(slot)
    }

    /// Run one command through the connection (every command here is safe to repeat), making
    /// sure the pub/sub listener runs when someone subscribed.
    async fn run<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.ensure_listener(false);
        Ok(self.conn.run(what, f).await?)
    }

    /// Run one plain command (see [`RedisStore::run`]).
    async fn query<T: redis::FromRedisValue + Send>(
        &self,
        what: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        self.ensure_listener(false);
        Ok(self.conn.query(what, cmd).await?)
    }

    /// Start the pub/sub listener if it is not running. `subscribing` is true when called from
    /// `subscribe_invalidations`; otherwise it only starts when someone already subscribed.
    fn ensure_listener(&self, subscribing: bool) {
        if !subscribing && self.invalidations.receiver_count() == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut listener = match self.listener.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if listener.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let listen = Listener {
            nodes: self.conn.nodes.clone(),
            channel: self.channel.clone(),
            sender: self.invalidations.clone(),
            connect_timeout: self.conn.connect_timeout,
            ping_timeout: self.conn.command_timeout.max(Duration::from_secs(1)),
        };
        *listener = Some(runtime.spawn(listen.run()));
    }

    /// SCAN every key matching `pattern` on a single node.
    async fn scan_single(&self, pattern: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let cmd = &cmd;
            let (next, page): (u64, Vec<Vec<u8>>) = self
                .run("scan", |mut c| async move { cmd.query_async(&mut c).await })
                .await?;
            keys.extend(page);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// SCAN every key matching `pattern` on every master of the cluster. Refuses to answer
    /// with a partial list when a master with slots did not take part.
    async fn scan_cluster(&self, pattern: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let scan = |cursor: u64| {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            cmd
        };
        let masters = self
            .run("cluster nodes", |c| async move {
                let Connection::Cluster(mut c) = c else {
                    return Err(not_cluster());
                };
                c.route_command(
                    redis::cmd("CLUSTER").arg("NODES").clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                )
                .await
            })
            .await
            .map(|v| count_masters_with_slots(&v))?;
        let first = &scan(0);
        let fanned = self
            .run("scan", |c| async move {
                let Connection::Cluster(mut c) = c else {
                    return Err(not_cluster());
                };
                c.route_command(
                    first.clone(),
                    RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                )
                .await
            })
            .await?;
        let Value::Map(per_node) = fanned else {
            return Err(StoreError::Unavailable(
                "redis cluster scan: unexpected reply shape".into(),
            ));
        };
        if per_node.len() < masters {
            return Err(StoreError::Unavailable(format!(
                "redis cluster scan reached {} of {masters} masters",
                per_node.len()
            )));
        }
        let mut keys = Vec::new();
        for (node, reply) in per_node {
            let node: String = redis::from_redis_value(node).map_err(|e| {
                StoreError::Unavailable(format!("redis cluster scan: bad node name: {e}"))
            })?;
            let (mut cursor, page) = scan_page(reply)?;
            keys.extend(page);
            let address = NodeAddress::from_str(&node).map_err(|e| {
                StoreError::Unavailable(format!("redis cluster scan: bad node address: {e}"))
            })?;
            while cursor != 0 {
                let cmd = &scan(cursor);
                let routing = &RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: address.host().to_string(),
                    port: address.port(),
                });
                let reply = self
                    .run("scan", |c| async move {
                        let Connection::Cluster(mut c) = c else {
                            return Err(not_cluster());
                        };
                        c.route_command(cmd.clone(), routing.clone()).await
                    })
                    .await?;
                let (next, page) = scan_page(reply)?;
                keys.extend(page);
                cursor = next;
            }
        }
        Ok(keys)
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        let listener = match self.listener.get_mut() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(handle) = listener.take() {
            handle.abort();
        }
    }
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn get(&self, owner: &Owner) -> Result<Option<StoredRecord>, StoreError> {
        let raw: Option<Vec<u8>> = self
            .query("get", redis::cmd("GET").arg(self.key(owner)))
            .await?;
        raw.map(|bytes| decode_record(&owner.slot(), &bytes))
            .transpose()
    }

    async fn put(&self, owner: &Owner, record: &StoredRecord) -> Result<(), StoreError> {
        let mut invocation = self.put.key(self.key(owner));
        invocation
            .arg(encode_record(record)?)
            .arg(&self.channel)
            .arg(owner.slot());
        self.ensure_listener(false);
        let _: i64 = self.conn.invoke("set", &invocation).await?;
        Ok(())
    }

    async fn delete(&self, owner: &Owner) -> Result<bool, StoreError> {
        let mut invocation = self.delete.key(self.key(owner));
        invocation.arg(&self.channel).arg(owner.slot());
        self.ensure_listener(false);
        let removed: i64 = self.conn.invoke("del", &invocation).await?;
        Ok(removed > 0)
    }

    async fn replace_if(
        &self,
        owner: &Owner,
        expected: &[u8],
        record: &StoredRecord,
    ) -> Result<bool, StoreError> {
        let key = self.key(owner);
        let key = &key;
        let expected = &base64::engine::general_purpose::STANDARD.encode(expected);
        let value = &encode_record(record)?;
        let slot = &owner.slot();
        let outcome: i64 = self
            .run("replace_if", |mut c| async move {
                self.cas
                    .key(key)
                    .arg(expected)
                    .arg(value)
                    .arg(&self.channel)
                    .arg(slot)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        match outcome {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(StoreError::Corrupt(format!(
                "record for {} is not valid JSON",
                owner.slot()
            ))),
        }
    }

    async fn owners(&self) -> Result<Vec<Owner>, StoreError> {
        let pattern = format!("{}key:*", escape_glob(&self.prefix));
        let keys = if self.conn.is_cluster() {
            self.scan_cluster(&pattern).await?
        } else {
            self.scan_single(&pattern).await?
        };
        let mut owners = BTreeSet::new();
        for key in keys {
            match self.owner_of_key(&key) {
                Some(owner) => {
                    owners.insert(owner.slot());
                }
                None => tracing::warn!(
                    store = "redis",
                    key = %String::from_utf8_lossy(&key),
                    "ignoring a key that names no owner"
                ),
            }
        }
        Ok(owners
            .iter()
            .filter_map(|slot| Owner::from_slot(slot))
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.query("ping", &redis::cmd("PING")).await
    }

    async fn publish_invalidation(&self, owner: &Owner) -> Result<(), StoreError> {
        self.query(
            "publish",
            redis::cmd("PUBLISH").arg(&self.channel).arg(owner.slot()),
        )
        .await
    }

    fn subscribe_invalidations(&self) -> broadcast::Receiver<Invalidation> {
        let receiver = self.invalidations.subscribe();
        self.ensure_listener(true);
        receiver
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// The pub/sub listener: holds one subscription, reconnecting with backoff, and forwards each
/// received slot to the store's broadcast channel; a lost subscription is announced as
/// [`Invalidation::Lost`], a new one as [`Invalidation::All`] (messages may have been missed).
struct Listener {
    nodes: Vec<Node>,
    channel: String,
    sender: broadcast::Sender<Invalidation>,
    connect_timeout: Duration,
    ping_timeout: Duration,
}

impl Listener {
    async fn run(self) {
        let mut backoff = PUBSUB_BACKOFF_MIN;
        let mut attempt = 0usize;
        let mut logged_down = false;
        loop {
            let Some(node) = self.nodes.get(attempt % self.nodes.len().max(1)) else {
                return;
            };
            attempt = attempt.wrapping_add(1);
            match self.subscribe(node).await {
                Ok((sink, stream)) => {
                    tracing::info!(store = "redis", host = %node.host, "subscribed to key invalidations");
                    backoff = PUBSUB_BACKOFF_MIN;
                    logged_down = false;
                    // Whatever was published before this subscription went unheard.
                    let _ = self.sender.send(Invalidation::All);
                    let reason = self.pump(sink, stream).await;
                    let _ = self.sender.send(Invalidation::Lost);
                    tracing::warn!(store = "redis", host = %node.host, %reason, "invalidation subscription lost; reconnecting");
                }
                Err(reason) => {
                    if !logged_down {
                        logged_down = true;
                        tracing::warn!(store = "redis", host = %node.host, %reason, "cannot subscribe to key invalidations; retrying");
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(PUBSUB_BACKOFF_MAX);
        }
    }

    async fn subscribe(&self, node: &Node) -> Result<(PubSubSink, PubSubStream), String> {
        let attempt = async {
            let mut pubsub = node.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, RedisError>(pubsub.split())
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("timed out after {:?}", self.connect_timeout)),
        }
    }

    /// Forward messages until the connection ends; returns why it ended.
    async fn pump(&self, mut sink: PubSubSink, mut stream: PubSubStream) -> String {
        let mut ping = tokio::time::interval(PUBSUB_PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return "connection closed".into();
                    };
                    let owner = msg
                        .get_payload::<String>()
                        .ok()
                        .and_then(|slot| Owner::from_slot(&slot));
                    match owner {
                        // No receivers is fine: nobody caches yet.
                        Some(owner) => { let _ = self.sender.send(Invalidation::Owner(owner)); }
                        None => tracing::debug!(store = "redis", "ignoring a malformed invalidation"),
                    }
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(self.ping_timeout, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return format!("ping failed: {e}"),
                        Err(_) => return "ping timed out".into(),
                    }
                }
            }
        }
    }
}

/// Escape Redis glob metacharacters so the prefix matches literally.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `(next cursor, keys)` from one SCAN reply.
fn scan_page(reply: Value) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
    if let Value::ServerError(e) = reply {
        return Err(StoreError::Unavailable(format!(
            "redis cluster scan failed on a node: {}",
            e.details().unwrap_or("server error")
        )));
    }
    redis::from_redis_value::<(u64, Vec<Vec<u8>>)>(reply)
        .map_err(|e| StoreError::Unavailable(format!("redis scan: unexpected reply: {e}")))
}

fn not_cluster() -> RedisError {
    RedisError::from((redis::ErrorKind::Client, "not a cluster connection"))
}

/// Masters that own slots, from a `CLUSTER NODES` reply.
fn count_masters_with_slots(reply: &Value) -> usize {
    let text = match reply {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::VerbatimString { text, .. } => text.clone(),
        Value::SimpleString(s) => s.clone(),
        _ => return 0,
    };
    // Fields: id addr flags master-id ping pong epoch link-state slot…; a master owning
    // slots has at least one slot field.
    text.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 8 && f[2].split(',').any(|flag| flag == "master"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::redis::test_settings as settings;

    #[test]
    fn keys_use_the_slot_as_hash_tag_and_parse_back() {
        let store = RedisStore::new(settings("redis://127.0.0.1:1", false)).unwrap();
        let owner = Owner::user("user_1");
        let key = store.key(&owner);
        assert_eq!(key, "keygate:key:{user:user_1}");
        assert_eq!(store.owner_of_key(key.as_bytes()), Some(owner));
        assert_eq!(store.owner_of_key(b"keygate:other"), None);
        assert_eq!(store.owner_of_key(b"other:key:{user:x}"), None);
    }

    #[test]
    fn glob_metacharacters_in_the_prefix_are_escaped() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(escape_glob("keygate:"), "keygate:");
    }

    #[test]
    fn cluster_nodes_reply_counts_masters_with_slots() {
        let reply = Value::BulkString(
            b"id1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
              id2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n\
              id3 127.0.0.1:7002@17002 slave id1 0 0 1 connected\n\
              id4 127.0.0.1:7003@17003 master - 0 0 3 connected\n"
                .to_vec(),
        );
        assert_eq!(count_masters_with_slots(&reply), 2);
    }
}
