//! The shared key store: sealed records in Redis (one server or a Redis Cluster), plus the
//! pub/sub channel replicas use to tell each other a record changed; and [`RedisConn`], the
//! connection everything in keygate that talks to Redis goes through.
//!
//! [`RedisConn`] owns the connection life cycle — connecting lazily, bounding every call by the
//! command timeout, dropping a connection that failed or wedged and reconnecting on a later
//! call — so keygate starts while Redis is down and recovers when Redis comes back, without a
//! restart. A call waits at most `command_timeout` in all: connecting runs in a task of its own
//! (one at a time; callers wait for it only up to their own deadline), and a circuit breaker
//! stops asking a Redis that failed [`BREAKER_THRESHOLD`] calls in a row for a while (1 s,
//! doubling up to 30 s), letting one probe through when that time is up; while it is open,
//! calls fail at once so callers use their fallbacks without waiting.
//! The store owns the record's wire form (JSON, `sealed` in base64), which the embedded store
//! reuses. Neither caches records, decides anything about crypto, or waits out an outage:
//! callers get [`StoreError::Unavailable`] (or [`RedisConnError::Unavailable`]) at once and
//! decide. (The one retry made is for a connection found dead after idling — Redis restarted —
//! where the command is repeated once on a fresh connection; only commands that are safe to
//! repeat may go through [`RedisConn`].)
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
//! Runtimes: [`RedisStore::new`] and [`RedisConn::new`] do no I/O and spawn nothing, so they may
//! be called outside a tokio runtime. Connections are made by the first async call, on that
//! caller's runtime. The pub/sub listener is spawned by the first
//! [`KeyStore::subscribe_invalidations`] call made inside a runtime (or, when that call came
//! from outside one, by the next async call on the store), on that runtime; it is respawned if
//! that runtime went away, and aborted when the store is dropped.

use std::collections::BTreeSet;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use futures::StreamExt;
use prometheus::{IntCounter, IntGauge};
use redis::aio::{ConnectionLike, MultiplexedConnection, PubSubSink, PubSubStream};
use redis::cluster::{ClusterClient, NodeAddress};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, FromRedisValue, IntoConnectionInfo,
    RedisError, RedisFuture, RedisResult, ScriptInvocation, Value,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::store::{Invalidation, KeyStore, Owner, StoreError, StoredRecord};

/// How long after a failed connection attempt calls fail fast instead of trying again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);
/// Consecutive calls failing for want of Redis (unreachable, timed out) that open the circuit.
pub const BREAKER_THRESHOLD: u32 = 3;
/// How long the circuit first stays open, and the most it stays open (doubling in between).
const BREAKER_OPEN_MIN: Duration = Duration::from_secs(1);
const BREAKER_OPEN_MAX: Duration = Duration::from_secs(30);
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

/// How to reach Redis and lay out keys in it. `Debug` hides credentials in the URL.
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis://[user:pass@]host:port[/db]`, `rediss://…` (TLS) or `redis+unix://…`; with
    /// `cluster`, several comma-separated seed nodes, where items after the first may be bare
    /// `host:port` and then take the first item's scheme and credentials.
    pub url: String,
    /// Talk to a Redis Cluster.
    pub cluster: bool,
    /// Prefix of every key and channel name (default `keygate:`).
    pub key_prefix: String,
    /// Bound on establishing a connection (a call that must connect first may take this plus
    /// `command_timeout`).
    pub connect_timeout: Duration,
    /// Bound on each command once connected.
    pub command_timeout: Duration,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field("cluster", &self.cluster)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

/// Why a call through a [`RedisConn`] failed. Messages never contain credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisConnError {
    /// The settings cannot work: a malformed URL, several nodes without cluster mode.
    #[error("{0}")]
    Invalid(String),
    /// Unreachable, timed out, or refused: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// Redis refused the command because the key holds a value of another type.
    #[error("{0}")]
    WrongType(String),
}

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

/// A lazily made, self-healing connection to Redis (single node or cluster); see the module
/// docs. Cheap to share behind an `Arc`: commands are multiplexed on one connection.
pub struct RedisConn {
    target: Target,
    /// The configured (seed) nodes; the pub/sub listener subscribes on one of them.
    nodes: Vec<Node>,
    /// `host:port` list for logs and errors; never contains credentials.
    hosts: String,
    prefix: String,
    connect_timeout: Duration,
    command_timeout: Duration,
    shared: Arc<Shared>,
    /// The circuit breaker's gauge (1 open) and trip counter, once attached.
    breaker_metrics: OnceLock<(IntGauge, IntCounter)>,
}

/// Connection state shared with the task that connects.
struct Shared {
    slot: StdMutex<Slot>,
    /// Bumped after every connection attempt, so callers waiting for one wake up.
    attempts: watch::Sender<u64>,
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

/// What commands go to.
#[allow(clippy::large_enum_variant)] // one per connection: boxing would buy nothing
#[derive(Clone)]
enum Target {
    Single(redis::Client),
    Cluster(ClusterClient),
}

/// A configured node, with its loggable address.
#[derive(Clone)]
struct Node {
    client: redis::Client,
    host: String,
}

/// The current command connection, if any, and why there is none.
#[derive(Default)]
struct Slot {
    conn: Option<(u64, Connection)>,
    generation: u64,
    last_failure: Option<Instant>,
    down: bool,
    /// A connection attempt is running.
    connecting: bool,
    breaker: Breaker,
}

/// The circuit breaker's state: closed (`open_until` none), open (before `open_until`) or
/// half-open (after it: one probe at a time).
#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    open_for: Duration,
    probing: bool,
}

/// A call let through by the breaker; a probe that is dropped unfinished frees the probe slot.
struct Admission<'a> {
    conn: &'a RedisConn,
    probe: bool,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.conn.slot().breaker.probing = false;
        }
    }
}

/// A failed call, and whether it failed for want of Redis (which the breaker counts) rather
/// than because Redis answered with an error.
struct Failure {
    error: RedisConnError,
    unreachable: bool,
}

impl Failure {
    fn unreachable(error: RedisConnError) -> Self {
        Self {
            error,
            unreachable: true,
        }
    }
}

/// A live command connection, as handed to [`RedisConn::run`]'s closure; both kinds are cheap
/// to clone and multiplexed.
#[derive(Clone)]
pub enum Connection {
    /// One Redis server.
    Single(MultiplexedConnection),
    /// A Redis Cluster (commands are routed by key slot).
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    /// Validate the settings and build the connection; connects nothing (see the module docs).
    pub fn new(settings: &RedisSettings) -> Result<Self, RedisConnError> {
        let infos = parse_urls(&settings.url, settings.cluster)?;
        let hosts = infos
            .iter()
            .map(|i| host_label(i.addr()))
            .collect::<Vec<_>>()
            .join(",");
        let invalid = |e: RedisError| {
            RedisConnError::Invalid(format!("invalid redis settings for {hosts}: {e}"))
        };
        let mut nodes = Vec::with_capacity(infos.len());
        for info in &infos {
            nodes.push(Node {
                client: redis::Client::open(info.clone()).map_err(invalid)?,
                host: host_label(info.addr()),
            });
        }
        let target = if settings.cluster {
            ClusterClient::builder(infos)
                .connection_timeout(settings.connect_timeout)
                .response_timeout(settings.command_timeout)
                .retries(3)
                .build()
                .map(Target::Cluster)
                .map_err(invalid)?
        } else {
            match nodes.first() {
                Some(node) => Target::Single(node.client.clone()),
                None => return Err(RedisConnError::Invalid("redis url is empty".into())),
            }
        };
        Ok(Self {
            target,
            nodes,
            hosts,
            prefix: settings.key_prefix.clone(),
            connect_timeout: settings.connect_timeout,
            command_timeout: settings.command_timeout,
            shared: Arc::new(Shared {
                slot: StdMutex::new(Slot::default()),
                attempts: watch::channel(0).0,
            }),
            breaker_metrics: OnceLock::new(),
        })
    }

    /// Report the circuit breaker in `open` (1 while open) and `trips` (times it opened).
    pub fn observe_breaker(&self, open: IntGauge, trips: IntCounter) {
        open.set(i64::from(self.slot().breaker.open_until.is_some()));
        let _ = self.breaker_metrics.set((open, trips));
    }

    /// Whether the circuit breaker is open (or half-open): calls fail without asking Redis.
    pub fn circuit_open(&self) -> bool {
        self.slot().breaker.open_until.is_some()
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        // Every update leaves the slot consistent: keep using it after a panic elsewhere.
        self.shared
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The configured `host:port` list (no credentials), for logs and errors.
    pub fn hosts(&self) -> &str {
        &self.hosts
    }

    /// The configured prefix of every key and channel name.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether this talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// Run one command (see [`RedisConn::run`]); `what` names it in errors.
    pub async fn query<T>(&self, what: &'static str, cmd: &Cmd) -> Result<T, RedisConnError>
    where
        T: FromRedisValue + Send,
    {
        self.run(what, |mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    /// Run one script invocation (EVALSHA, loading the script when Redis lost it; see
    /// [`RedisConn::run`]); `what` names it in errors.
    pub async fn invoke<T>(
        &self,
        what: &'static str,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, RedisConnError>
    where
        T: FromRedisValue + Send,
    {
        self.run(
            what,
            |mut c| async move { script.invoke_async(&mut c).await },
        )
        .await
    }

    /// Run `f` on the current connection (connecting first when there is none); the whole
    /// call, connecting included, is bounded by `command_timeout`, and fails at once while the
    /// circuit is open. A timeout or a connection-level error drops the connection so a later
    /// call starts afresh. When a reused connection turns out to have died while idle (Redis
    /// restarted), `f` is run once more on a fresh one: it must be safe to repeat.
    pub async fn run<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T, RedisConnError>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.command_timeout;
        let admission = self.admit()?;
        let outcome = self.run_until(what, &f, deadline).await;
        let unreachable = outcome.as_ref().err().is_some_and(|f| f.unreachable);
        self.record(&admission, unreachable);
        outcome.map_err(|f| f.error)
    }

    async fn run_until<T, F, Fut>(
        &self,
        what: &'static str,
        f: &F,
        deadline: tokio::time::Instant,
    ) -> Result<T, Failure>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (generation, conn, fresh) = self.connection(deadline).await?;
        let outcome = tokio::time::timeout_at(deadline, f(conn)).await;
        if let Ok(Err(e)) = &outcome {
            if !fresh && e.is_connection_dropped() {
                self.discard(generation);
                let (generation, conn, _) = self.connection(deadline).await?;
                let retried = tokio::time::timeout_at(deadline, f(conn)).await;
                return self.settle(what, generation, retried);
            }
        }
        self.settle(what, generation, outcome)
    }

    /// Let a call through unless the circuit is open; after the open interval, one probe.
    fn admit(&self) -> Result<Admission<'_>, RedisConnError> {
        let mut slot = self.slot();
        let breaker = &mut slot.breaker;
        let Some(until) = breaker.open_until else {
            return Ok(Admission {
                conn: self,
                probe: false,
            });
        };
        if Instant::now() < until || breaker.probing {
            return Err(RedisConnError::Unavailable(format!(
                "redis at {} is failing; not asking it for now (circuit open)",
                self.hosts
            )));
        }
        breaker.probing = true;
        Ok(Admission {
            conn: self,
            probe: true,
        })
    }

    /// Count a call's outcome: `unreachable` failures open the circuit after
    /// [`BREAKER_THRESHOLD`] in a row (a failed probe reopens it for twice as long); anything
    /// else closes it.
    fn record(&self, admission: &Admission<'_>, unreachable: bool) {
        let mut slot = self.slot();
        let breaker = &mut slot.breaker;
        if admission.probe {
            breaker.probing = false;
        }
        if !unreachable {
            breaker.failures = 0;
            if breaker.open_until.take().is_some() {
                breaker.open_for = Duration::ZERO;
                breaker.probing = false;
                if let Some((open, _)) = self.breaker_metrics.get() {
                    open.set(0);
                }
                tracing::info!(store = "redis", hosts = %self.hosts, "redis answers again; circuit closed");
            }
            return;
        }
        breaker.failures = breaker.failures.saturating_add(1);
        let reopen = admission.probe && breaker.open_until.is_some();
        if !reopen && (breaker.open_until.is_some() || breaker.failures < BREAKER_THRESHOLD) {
            return;
        }
        breaker.open_for = if reopen {
            (breaker.open_for * 2).clamp(BREAKER_OPEN_MIN, BREAKER_OPEN_MAX)
        } else {
            BREAKER_OPEN_MIN
        };
        breaker.open_until = Some(Instant::now() + breaker.open_for);
        if !reopen {
            if let Some((open, trips)) = self.breaker_metrics.get() {
                open.set(1);
                trips.inc();
            }
            tracing::warn!(
                store = "redis",
                hosts = %self.hosts,
                failures = breaker.failures,
                "redis keeps failing; circuit open, using fallbacks"
            );
        }
    }

    /// The current connection, its generation, and whether it was just made. When there is
    /// none, one task connects (bounded by `connect_timeout`) while callers wait for it until
    /// `deadline` at most. Fails fast for a short pause after a failed attempt.
    async fn connection(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<(u64, Connection, bool), Failure> {
        let mut waited = false;
        loop {
            let mut attempts = {
                let mut slot = self.slot();
                if let Some((generation, conn)) = &slot.conn {
                    return Ok((*generation, conn.clone(), waited));
                }
                if !slot.connecting {
                    if slot
                        .last_failure
                        .is_some_and(|t| t.elapsed() < RECONNECT_PAUSE)
                    {
                        return Err(Failure::unreachable(RedisConnError::Unavailable(format!(
                            "redis at {} is unreachable",
                            self.hosts
                        ))));
                    }
                    slot.connecting = true;
                    self.spawn_connect();
                }
                // Subscribed while holding the slot: the attempt's end cannot be missed.
                self.shared.attempts.subscribe()
            };
            waited = true;
            if tokio::time::timeout_at(deadline, attempts.changed())
                .await
                .is_err()
            {
                return Err(Failure::unreachable(RedisConnError::Unavailable(format!(
                    "redis at {} did not accept a connection within {:?}",
                    self.hosts, self.command_timeout
                ))));
            }
        }
    }

    /// Connect in a task of its own, so no caller waits longer than its deadline for it.
    fn spawn_connect(&self) {
        let shared = self.shared.clone();
        let target = self.target.clone();
        let (connect_timeout, command_timeout) = (self.connect_timeout, self.command_timeout);
        let hosts = self.hosts.clone();
        tokio::spawn(async move {
            let made = tokio::time::timeout(
                connect_timeout,
                connect(&target, connect_timeout, command_timeout),
            )
            .await;
            {
                let mut slot = shared
                    .slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                slot.connecting = false;
                match made {
                    Ok(Ok(conn)) => {
                        slot.generation += 1;
                        slot.conn = Some((slot.generation, conn));
                        slot.last_failure = None;
                        if slot.down {
                            slot.down = false;
                            tracing::info!(store = "redis", hosts = %hosts, "redis reachable again");
                        }
                    }
                    failed => {
                        let reason = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("connect timed out after {connect_timeout:?}"),
                        };
                        slot.last_failure = Some(Instant::now());
                        if !slot.down {
                            slot.down = true;
                            tracing::warn!(store = "redis", hosts = %hosts, %reason, "cannot connect to redis");
                        }
                    }
                }
            }
            shared.attempts.send_modify(|n| *n = n.wrapping_add(1));
        });
    }

    /// Forget connection `generation` (if still current) so the next call reconnects.
    fn discard(&self, generation: u64) {
        let mut slot = self.slot();
        if slot.conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            slot.conn = None;
            tracing::debug!(store = "redis", hosts = %self.hosts, "dropped redis connection");
        }
    }

    /// Turn a command outcome into an answer, dropping the connection when it failed.
    fn settle<T>(
        &self,
        what: &'static str,
        generation: u64,
        outcome: Result<RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, Failure> {
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let unreachable = e.is_io_error()
                    || e.is_unrecoverable_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout();
                if e.is_io_error() || e.is_unrecoverable_error() {
                    self.discard(generation);
                }
                Err(Failure {
                    error: self.map_error(what, &e),
                    unreachable,
                })
            }
            Err(_) => {
                self.discard(generation);
                Err(Failure::unreachable(RedisConnError::Unavailable(format!(
                    "redis {what} timed out after {:?}",
                    self.command_timeout
                ))))
            }
        }
    }

    fn map_error(&self, what: &str, e: &RedisError) -> RedisConnError {
        if e.code() == Some("WRONGTYPE") {
            RedisConnError::WrongType(format!("redis {what}: the key holds a non-string value"))
        } else {
            RedisConnError::Unavailable(format!("redis {what} at {} failed: {e}", self.hosts))
        }
    }
}

/// Make a command connection to `target`.
async fn connect(
    target: &Target,
    connect_timeout: Duration,
    command_timeout: Duration,
) -> RedisResult<Connection> {
    match target {
        Target::Single(client) => {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(command_timeout));
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map(Connection::Single)
        }
        Target::Cluster(client) => client.get_async_connection().await.map(Connection::Cluster),
    }
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

/// The record as stored: JSON with `sealed` in standard base64.
#[derive(Serialize, Deserialize)]
struct WireRecord {
    sealed: String,
    #[serde(default)]
    base_url: Option<String>,
    updated_at: i64,
}

/// Encode a record in the JSON form both stores keep.
pub(crate) fn encode_record(record: &StoredRecord) -> Result<Vec<u8>, StoreError> {
    let wire = WireRecord {
        sealed: base64::engine::general_purpose::STANDARD.encode(&record.sealed),
        base_url: record.base_url.clone(),
        updated_at: record.updated_at,
    };
    serde_json::to_vec(&wire).map_err(|e| StoreError::Corrupt(format!("cannot encode record: {e}")))
}

/// Decode [`encode_record`]'s form; anything else is [`StoreError::Corrupt`]. The error never
/// quotes the stored bytes.
pub(crate) fn decode_record(slot: &str, bytes: &[u8]) -> Result<StoredRecord, StoreError> {
    let wire: WireRecord = serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Corrupt(format!(
            "record for {slot} is not a valid record (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(wire.sealed.as_bytes())
        .map_err(|_| StoreError::Corrupt(format!("record for {slot}: sealed is not base64")))?;
    Ok(StoredRecord {
        sealed,
        base_url: wire.base_url,
        updated_at: wire.updated_at,
    })
}

/// Split and parse the configured URL(s) into connection infos, never echoing credentials.
fn parse_urls(url: &str, cluster: bool) -> Result<Vec<ConnectionInfo>, RedisConnError> {
    let items: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let Some(first) = items.first() else {
        return Err(RedisConnError::Invalid("redis url is empty".into()));
    };
    if items.len() > 1 && !cluster {
        return Err(RedisConnError::Invalid(
            "redis url lists several nodes but cluster mode is off".into(),
        ));
    }
    let Some(scheme_end) = first.find("://") else {
        return Err(RedisConnError::Invalid(
            "redis url must start with redis://, rediss:// or redis+unix://".into(),
        ));
    };
    // The first item's scheme and credentials, for bare `host:port` seeds after it.
    let authority_start = scheme_end + 3;
    let authority_end = first[authority_start..]
        .find(['/', '?', '#'])
        .map_or(first.len(), |i| authority_start + i);
    let inherited = match first[authority_start..authority_end].rfind('@') {
        Some(at) => &first[..authority_start + at + 1],
        None => &first[..authority_start],
    };
    let mut infos = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let full = if item.contains("://") {
            (*item).to_string()
        } else {
            format!("{inherited}{item}")
        };
        let info = full.as_str().into_connection_info().map_err(|e| {
            RedisConnError::Invalid(format!("redis url (node {}) is invalid: {e}", index + 1))
        })?;
        infos.push(info);
    }
    Ok(infos)
}

/// The URL(s) with any `user:password@` replaced by `***@`.
fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|item| {
            let Some(scheme_end) = item.find("://") else {
                return item.to_string();
            };
            let start = scheme_end + 3;
            let end = item[start..]
                .find(['/', '?', '#'])
                .map_or(item.len(), |i| start + i);
            match item[start..end].rfind('@') {
                Some(at) => format!("{}***@{}", &item[..start], &item[start + at + 1..]),
                None => item.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `host:port` (or the socket path) of an address, for logs.
fn host_label(addr: &ConnectionAddr) -> String {
    addr.to_string()
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

fn not_cluster() -> RedisError {
    RedisError::from((redis::ErrorKind::Client, "not a cluster connection"))
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

    fn settings(url: &str, cluster: bool) -> RedisSettings {
        RedisSettings {
            url: url.into(),
            cluster,
            key_prefix: "keygate:".into(),
            connect_timeout: Duration::from_millis(200),
            command_timeout: Duration::from_millis(200),
        }
    }

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
    fn new_validates_urls_without_connecting_or_leaking_passwords() {
        assert!(RedisStore::new(settings("redis://:hunter2@127.0.0.1:1/0", false)).is_ok());
        assert!(RedisStore::new(settings("rediss://127.0.0.1:1", false)).is_ok());
        for bad in [
            "",
            "127.0.0.1:6379",
            "http://:hunter2@h:1",
            "redis://:hunter2@h:notaport",
        ] {
            let Err(e) = RedisStore::new(settings(bad, false)) else {
                panic!("accepted {bad:?}");
            };
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        let err = RedisStore::new(settings("redis://a:1,redis://b:2", false));
        assert!(err.is_err(), "several nodes need cluster mode");
    }

    #[test]
    fn cluster_seeds_inherit_scheme_and_credentials() {
        let infos = parse_urls("rediss://u:p@a:7000, b:7001,redis://c:7002", true).unwrap();
        let hosts: Vec<String> = infos.iter().map(|i| i.addr().to_string()).collect();
        assert_eq!(hosts, ["a:7000", "b:7001", "c:7002"]);
        assert!(matches!(infos[1].addr(), ConnectionAddr::TcpTls { .. }));
        assert_eq!(infos[1].redis_settings().password(), Some("p"));
        assert!(matches!(infos[2].addr(), ConnectionAddr::Tcp(..)));
        let store = RedisStore::new(settings("redis://:p@a:7000,b:7001", true)).unwrap();
        assert_eq!(store.conn.hosts(), "a:7000,b:7001");
    }

    #[test]
    fn records_round_trip_and_garbage_is_corrupt() {
        let record = StoredRecord {
            sealed: vec![0, 1, 2, 255],
            base_url: Some("https://crm.example.com".into()),
            updated_at: 42,
        };
        let bytes = encode_record(&record).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["sealed"], "AAEC/w==");
        assert_eq!(decode_record("user:u", &bytes).unwrap(), record);
        for garbage in [
            &b"not json"[..],
            br#"{"sealed":"***","updated_at":1}"#,
            b"[]",
        ] {
            assert!(matches!(
                decode_record("user:u", garbage),
                Err(StoreError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn debug_of_settings_hides_credentials() {
        let s = settings("redis://user:hunter2@a:1/0,rediss://:hunter2@b:2", true);
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("redis://***@a:1/0,rediss://***@b:2"),
            "{shown}"
        );
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
