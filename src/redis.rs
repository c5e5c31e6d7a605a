//! The Redis connection everything in keygate that talks to Redis goes through: the key store
//! (`keys::redis_store`), shared rate limits (`policy::ratelimit`) and MCP session bindings
//! (`policy::sessions`). One server or a Redis Cluster.
//!
//! [`RedisConn`] owns the connection life cycle — connecting lazily, bounding every call by the
//! command timeout, dropping a connection that failed or wedged and reconnecting on a later
//! call — so keygate starts while Redis is down and recovers when Redis comes back, without a
//! restart. A call waits at most `command_timeout` in all: connecting runs in a task of its own
//! (one at a time; callers wait for it only up to their own deadline), and a circuit breaker
//! stops asking a Redis that failed [`BREAKER_THRESHOLD`] calls in a row for a while (1 s,
//! doubling up to 30 s), letting one probe through when that time is up; while it is open,
//! calls fail at once so callers use their fallbacks without waiting. It does not wait out an
//! outage: callers get [`RedisConnError::Unavailable`] at once and decide. (The one retry made
//! is for a connection found dead after idling — Redis restarted — where the command is
//! repeated once on a fresh connection; only commands that are safe to repeat may go through
//! [`RedisConn`].)
//!
//! [`RedisConn::new`] does no I/O and spawns nothing, so it may be called outside a tokio
//! runtime; connections are made by the first async call, on that caller's runtime.

use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, FromRedisValue, IntoConnectionInfo,
    RedisError, RedisFuture, RedisResult, ScriptInvocation, Value,
};
use tokio::sync::watch;

/// How long after a failed connection attempt calls fail fast instead of trying again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);
/// Consecutive calls failing for want of Redis (unreachable, timed out) that open the circuit.
pub const BREAKER_THRESHOLD: u32 = 3;
/// How long the circuit first stays open, and the most it stays open (doubling in between).
const BREAKER_OPEN_MIN: Duration = Duration::from_secs(1);
const BREAKER_OPEN_MAX: Duration = Duration::from_secs(30);

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

/// A lazily made, self-healing connection to Redis (single node or cluster); see the module
/// docs. Cheap to share behind an `Arc`: commands are multiplexed on one connection.
pub struct RedisConn {
    target: Target,
    /// The configured (seed) nodes; the pub/sub listener subscribes on one of them.
    pub(crate) nodes: Vec<Node>,
    /// `host:port` list for logs and errors; never contains credentials.
    hosts: String,
    prefix: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
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

/// What commands go to.
#[allow(clippy::large_enum_variant)] // one per connection: boxing would buy nothing
#[derive(Clone)]
enum Target {
    Single(redis::Client),
    Cluster(ClusterClient),
}

/// A configured node, with its loggable address.
#[derive(Clone)]
pub(crate) struct Node {
    pub(crate) client: redis::Client,
    pub(crate) host: String,
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

/// Settings for `url` with short timeouts, for unit tests.
#[cfg(test)]
pub(crate) fn test_settings(url: &str, cluster: bool) -> RedisSettings {
    RedisSettings {
        url: url.into(),
        cluster,
        key_prefix: "keygate:".into(),
        connect_timeout: Duration::from_millis(200),
        command_timeout: Duration::from_millis(200),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_validates_urls_without_connecting_or_leaking_passwords() {
        assert!(RedisConn::new(&test_settings("redis://:hunter2@127.0.0.1:1/0", false)).is_ok());
        assert!(RedisConn::new(&test_settings("rediss://127.0.0.1:1", false)).is_ok());
        for bad in [
            "",
            "127.0.0.1:6379",
            "http://:hunter2@h:1",
            "redis://:hunter2@h:notaport",
        ] {
            let Err(e) = RedisConn::new(&test_settings(bad, false)) else {
                panic!("accepted {bad:?}");
            };
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        let err = RedisConn::new(&test_settings("redis://a:1,redis://b:2", false));
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
        let conn = RedisConn::new(&test_settings("redis://:p@a:7000,b:7001", true)).unwrap();
        assert_eq!(conn.hosts(), "a:7000,b:7001");
    }

    #[test]
    fn debug_of_settings_hides_credentials() {
        let s = test_settings("redis://user:hunter2@a:1/0,rediss://:hunter2@b:2", true);
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("redis://***@a:1/0,rediss://***@b:2"),
            "{shown}"
        );
    }
}
