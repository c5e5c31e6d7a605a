//! Wiring: the composition root. [`configure`] is the one way to a runnable configuration: the
//! configuration's validation, then every module's compile step over its section (scope and
//! authorization rules, the failed-authentication budget, the keyring), all
//! problems reported together. Then settings in, a Pingora server out — the public proxy
//! listener (its accept path and every downstream deadline owned by `proxy::deadline`), the
//! admin listener, and the background key refresher. Also a [`Handle`] to run a whole gateway
//! inside another process (tests, benches) and stop it again.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::Acceptor;
use pingora::listeners::ListenerConfig;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use pingora::upstreams::peer::HttpPeer;

use crate::admin::Admin;
use crate::auth::discovery::{AsDocument, AuthServerMetadata, ResourceMetadata};
use crate::auth::jwks::JwksCache;
use crate::auth::Authenticator;
use crate::config::RedisFailure;
use crate::config::{Env, Problems, Sections, Settings};
use crate::keys::crypto::Keyring;
use crate::keys::embedded::EmbeddedStore;
use crate::keys::redis_store::RedisStore;
use crate::keys::store::KeyStore;
use crate::keys::vault::{UserKey, Vault};
use crate::policy::auth_failures::AuthFailures;
use crate::policy::cors::Cors;
use crate::policy::ratelimit::CompiledRateRule;
use crate::policy::ratelimit::{
    FallbackLimiter, LocalLimiter, OnRedisError, Quota, RateLimiter, RateLimits, RedisLimiter,
};
use crate::policy::sessions::{LocalBindings, RedisBindings, SessionBindings};
use crate::policy::CompiledPolicy;
use crate::proxy::deadline::{listener_buffers, Connections, Limits, Requests};
use crate::proxy::keys_api::KeyStage;
use crate::proxy::local::LocalRoutes;
use crate::proxy::{Gateway, GatewayState};
use crate::redis::{RedisConn, RedisSettings};
use crate::telemetry::metrics::Metrics;

/// What the modules compiled from their sections at startup: the runtime objects the gateway
/// is built from (the settings hold only plain, validated values).
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The vault's keyring (`None` while the vault is off or has no secret).
    pub keyring: Option<Arc<Keyring>>,
    /// Scope rules, authorization rules and their clock, the failed-authentication budget.
    pub policy: CompiledPolicy,
}

impl Compiled {
    /// Every module's compile step over the validated sections; problems join `problems`.
    fn compile(s: &Sections, problems: &mut Problems) -> Compiled {
        Compiled {
            keyring: crate::keys::compile_keyring(&s.keys, problems),
            policy: CompiledPolicy::compile(&s.policy, s.clerk.as_ref(), &s.issuers, problems),
        }
    }
}

/// A configuration the gateway can run: the validated settings and what the modules compiled
/// from them.
#[derive(Debug, Clone)]
pub struct Configured {
    pub settings: Settings,
    pub compiled: Compiled,
}

/// Read and validate the configuration (`config::read`), then compile every module's section:
/// the settings and the compiled runtime objects, or every problem found by either, each naming
/// its option. The one entry for the command, the in-process gateway and its tests.
pub fn configure(path: Option<&Path>, env: &dyn Env) -> Result<Configured, Problems> {
    let (sections, mut problems) = crate::config::read(path, env)?;
    let compiled = Compiled::compile(&sections, &mut problems);
    match sections.into_settings() {
        Some(settings) if problems.0.is_empty() => Ok(Configured { settings, compiled }),
        _ => Err(problems),
    }
}

/// The HTTP client for JWKS, discovery and Clerk's Backend API, built once.
fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("keygate/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTP client")
}

fn upstream_peer(settings: &Settings) -> HttpPeer {
    let up = &settings.upstream;
    let mut peer = HttpPeer::new(up.addr, up.tls, up.host.clone());
    let o = &mut peer.options;
    o.connection_timeout = Some(up.connect_timeout);
    o.total_connection_timeout = Some(up.connect_timeout * 2);
    o.read_timeout = Some(up.read_timeout);
    o.write_timeout = Some(up.write_timeout);
    o.idle_timeout = Some(up.idle_timeout);
    o.verify_cert = up.verify_tls;
    o.verify_hostname = up.verify_tls;
    peer
}

fn redis_settings(settings: &Settings) -> Option<RedisSettings> {
    settings.redis.as_ref().map(|r| RedisSettings {
        url: r.url.clone(),
        cluster: r.cluster,
        key_prefix: r.key_prefix.clone(),
        connect_timeout: r.connect_timeout,
        command_timeout: r.command_timeout,
    })
}

/// The compiled rules, the limiter they share (none when no rule is configured), and the
/// Redis-backed limiter when that is the one.
/// Rate-limit rules with quotas and tool matchers, and the limiter the settings name.
fn build_rate_limits(
    settings: &Settings,
    conn: Option<&Arc<RedisConn>>,
) -> anyhow::Result<RateLimits> {
    let rl = &settings.rate_limits;
    if !rl.enabled || rl.rules.is_empty() {
        return Ok(RateLimits {
            rules: Vec::new(),
            limiter: None,
            fallback: None,
        });
    }
    let mut compiled = Vec::new();
    for rule in &rl.rules {
        let quota = Quota::new(rule.requests, rule.period, rule.burst)
            .map_err(|e| anyhow::anyhow!("rate_limits rule {:?}: {e}", rule.name))?;
        let tools = if rule.tools.is_empty() {
            None
        } else {
            let mut set = globset::GlobSetBuilder::new();
            for t in &rule.tools {
                set.add(globset::Glob::new(t)?);
            }
            Some(set.build()?)
        };
        compiled.push(CompiledRateRule::new(rule.clone(), quota, tools));
    }
    let local = LocalLimiter::new(100_000);
    Ok(match (rl.use_redis, conn) {
        (true, Some(conn)) => {
            let on_error = match rl.on_redis_error {
                RedisFailure::Local => OnRedisError::Local,
                RedisFailure::Allow => OnRedisError::Allow,
                RedisFailure::Deny => OnRedisError::Deny,
            };
            let fallback = Arc::new(FallbackLimiter::new(
                RedisLimiter::new(conn.clone()),
                on_error,
                local,
            ));
            RateLimits {
                rules: compiled,
                limiter: Some(fallback.clone()),
                fallback: Some(fallback),
            }
        }
        _ => RateLimits {
            rules: compiled,
            limiter: Some(Arc::new(local)),
            fallback: None,
        },
    })
}

/// The failed-authentication budget, when enabled: shared through Redis when there is one
/// (falling back to this replica's own count while Redis fails), else local.
fn build_auth_failures(
    settings: &Settings,
    policy: &CompiledPolicy,
    conn: Option<&Arc<RedisConn>>,
    metrics: &Metrics,
) -> Option<Arc<AuthFailures>> {
    let s = &policy.auth_failures;
    if !s.enabled || !settings.auth.enabled {
        return None;
    }
    let local = LocalLimiter::new(s.max_tracked_ips);
    let limiter: Arc<dyn RateLimiter> = match conn {
        Some(conn) => Arc::new(FallbackLimiter::new(
            RedisLimiter::new(conn.clone()),
            OnRedisError::Local,
            local,
        )),
        None => Arc::new(local),
    };
    AuthFailures::new(s, limiter, metrics).map(Arc::new)
}

/// Report `conn`'s circuit breaker in `metrics` as `client`.
fn observe_breaker(conn: &RedisConn, metrics: &Metrics, client: &str) {
    conn.observe_breaker(
        metrics.redis_circuit_open.with_label_values(&[client]),
        metrics.redis_circuit_trips.with_label_values(&[client]),
    );
}

/// The key store the settings name: Redis when `REDIS_URL` is set, else the embedded store.
pub fn build_store(
    settings: &Settings,
    metrics: Option<&Metrics>,
) -> anyhow::Result<Arc<dyn KeyStore>> {
    Ok(match redis_settings(settings) {
        Some(r) => {
            let store =
                RedisStore::new(r).map_err(|e| anyhow::anyhow!("redis.url (REDIS_URL): {e}"))?;
            if let Some(m) = metrics {
                observe_breaker(store.conn(), m, "key_store");
            }
            Arc::new(store)
        }
        None => Arc::new(EmbeddedStore::open(&settings.keys.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "keys.data_dir (KEYGATE_DATA_DIR) {}: {e}",
                settings.keys.data_dir.display()
            )
        })?),
    })
}

/// The vault, when enabled, recording into `metrics` when given.
pub fn build_vault(
    configured: &Configured,
    metrics: Option<Arc<Metrics>>,
) -> anyhow::Result<Option<Arc<Vault>>> {
    let settings = &configured.settings;
    if !settings.keys.enabled {
        return Ok(None);
    }
    let keyring = configured
        .compiled
        .keyring
        .clone()
        .ok_or(crate::keys::NoEncryptionSecret)?;
    let store = build_store(settings, metrics.as_deref())?;
    let vault = Vault::new(store, keyring, &settings.keys);
    Ok(Some(Arc::new(match metrics {
        Some(m) => vault.with_metrics(m),
        None => vault,
    })))
}

/// Build the shared request-path state.
pub fn build_state(configured: Configured) -> anyhow::Result<Arc<GatewayState>> {
    let client = http_client()?;
    let metrics = Arc::new(Metrics::new());
    let vault = build_vault(&configured, Some(metrics.clone()))?;
    let Configured { settings, compiled } = configured;
    let conn = match redis_settings(&settings) {
        Some(r) => {
            Some(Arc::new(RedisConn::new(&r).map_err(|e| {
                anyhow::anyhow!("redis.url (REDIS_URL): {e}")
            })?))
        }
        None => None,
    };
    if let Some(c) = &conn {
        observe_breaker(c, &metrics, "shared");
    }
    let rate_limits = build_rate_limits(&settings, conn.as_ref())?;
    let issuers: Vec<String> = settings
        .clerk
        .iter()
        .map(|c| c.issuer.clone())
        .chain(settings.issuers.iter().map(|i| i.issuer.clone()))
        .collect();
    let rule_names: Vec<String> = rate_limits
        .rules
        .iter()
        .map(|r| r.rule.name.clone())
        .collect();
    metrics.prime(
        &issuers,
        vault.as_ref().map(|v| v.store().name()),
        &rule_names,
    );
    let ttl = settings.policy.session_ttl;
    let sessions: Option<Arc<dyn SessionBindings>> = if settings.policy.bind_sessions {
        Some(match &conn {
            Some(c) => Arc::new(RedisBindings::new(c.clone(), ttl)),
            None => Arc::new(LocalBindings::new(ttl, 100_000)),
        })
    } else {
        None
    };
    let fallback_key = settings.keys.fallback_api_key.clone().map(|k| {
        Arc::new(UserKey {
            api_key: k,
            base_url: None,
        })
    });
    let mut auth = Authenticator::new(&settings, client.clone());
    auth.attach_metrics(&metrics);
    let auth_failures = build_auth_failures(&settings, &compiled.policy, conn.as_ref(), &metrics);
    let health = serde_json::json!({
        "status": "healthy",
        "service": "keygate",
        "authEnabled": settings.auth.enabled,
    });
    // `/api/keys` is keygate's own only while the vault answers it.
    let routes = crate::proxy::route::Routes::new(&settings.policy.mcp_paths, vault.is_some());
    let dev_issuer = match settings.dev.as_ref().filter(|d| d.authorization_server) {
        Some(_) => Some(Arc::new(
            crate::auth::dev_issuer::DevAuthServer::new(&settings)
                .map_err(|e| anyhow::anyhow!("dev.authorization_server: {e}"))?,
        )),
        None => None,
    };
    let mut as_metadata = AuthServerMetadata::new(&settings, client);
    if let Some(dev) = &dev_issuer {
        as_metadata = as_metadata.with_local(
            dev.metadata(AsDocument::OAuth),
            dev.metadata(AsDocument::OpenId),
        );
    }
    Ok(Arc::new(GatewayState {
        local: LocalRoutes {
            health_body: Bytes::from(health.to_string()),
            resource_metadata: ResourceMetadata::new(&settings),
            as_metadata,
            dev_issuer,
            discovery: settings.auth.enabled,
        },
        cors: Cors::new(&settings.cors),
        policy: compiled.policy,
        peer: upstream_peer(&settings),
        challenge_scope: settings.resource.scopes_supported.join(" "),
        keys: KeyStage {
            vault,
            fallback_key,
        },
        rate_limits,
        metrics,
        sessions,
        routes,
        auth,
        auth_failures,
        settings,
    }))
}

/// Loads every issuer's keys at startup and keeps them fresh until shutdown.
struct KeyRefresher {
    caches: Vec<Arc<JwksCache>>,
    vault: Option<Arc<Vault>>,
}

#[async_trait]
impl BackgroundService for KeyRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tasks = Vec::new();
        for cache in &self.caches {
            let cache = cache.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = cache.refresh().await {
                    tracing::warn!(issuer = cache.issuer(), error = %e, "initial JWKS fetch failed; will retry");
                }
                cache.run_refresher().await;
            }));
        }
        if let Some(vault) = &self.vault {
            tasks.push(tokio::spawn(vault.clone().follow_invalidations()));
        }
        let _ = shutdown.changed().await;
        for t in tasks {
            t.abort();
        }
    }
}

/// Assemble the Pingora server with every service.
/// The replica's draining flag, raised when a stop signal arrives (see [`Draining`]).
pub type DrainingFlag = Arc<AtomicBool>;

/// Assemble the Pingora server; run it with a shutdown signal wrapped in [`Draining`] around
/// the returned flag.
pub fn build_server(state: Arc<GatewayState>) -> anyhow::Result<(Server, DrainingFlag)> {
    let s = &state.settings;
    let conf = ServerConf {
        threads: s.server.threads,
        grace_period_seconds: Some(s.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(s.server.shutdown_timeout.as_secs()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy(
        &server.configuration,
        Gateway {
            state: state.clone(),
        },
    );
    let mut options = HttpServerOptions::default();
    // The accept path (`Connections`) sniffs for h2c itself, with a deadline.
    options.h2c = false;
    options.h2_idle_timeout = Some(s.server.keepalive_timeout);
    proxy.server_options = Some(options);
    let limits = Limits {
        header: s.server.request_header_timeout,
        keepalive: s.server.keepalive_timeout,
        body: s.server.body_timeout,
        body_idle: s.server.body_idle_timeout,
        send: s.server.send_timeout,
    };
    let tls = match &s.server.tls {
        Some(tls) => Some(Acceptor::from_server_config(
            tls.server_config
                .clone()
                .ok_or_else(|| anyhow::anyhow!("server.tls: certificate and key not loaded"))?,
        )),
        None => None,
    };
    let app = Connections::new(
        Requests::new(proxy, limits),
        tls,
        s.server.h2c,
        s.server.request_header_timeout,
    )
    .count_control_floods(state.metrics.h2_control_floods.clone());
    let mut public = Service::new("keygate proxy".to_string(), app);
    // Plain TCP even with TLS: the handshake runs in `Connections`, under the header deadline.
    public.add_listener(
        ListenerConfig::tcp(s.server.listen.to_string())
            .l4_buffer(listener_buffers(s.server.tls.is_some())),
    );
    server.add_service(public);

    let draining = Arc::new(AtomicBool::new(false));
    let mut admin = Service::new(
        "keygate admin".to_string(),
        crate::admin::AdminApp::new(Admin {
            state: state.clone(),
            shutting_down: draining.clone(),
        }),
    );
    admin.add_tcp(&s.server.admin_listen.to_string());
    server.add_service(admin);

    server.add_service(background_service(
        "key refresher",
        KeyRefresher {
            caches: state.auth.key_sets(),
            vault: state.keys.vault.clone(),
        },
    ));
    Ok((server, draining))
}

/// A shutdown signal that raises the draining flag the moment it arrives, before Pingora acts
/// on it: listeners close in no fixed order once it does, so a readiness probe that still
/// reaches `/ready` (a kept-alive connection, or the admin listener closing after the public
/// one) is told 503, never 200.
struct Draining<W> {
    inner: W,
    draining: DrainingFlag,
}

#[async_trait]
impl<W: ShutdownSignalWatch + Send + Sync> ShutdownSignalWatch for Draining<W> {
    async fn recv(&self) -> ShutdownSignal {
        let signal = self.inner.recv().await;
        self.draining.store(true, Ordering::Release);
        signal
    }
}

/// How a [`Handle`] is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// At once: in-flight requests are cut.
    Fast,
    /// Like SIGTERM: stop accepting, let in-flight work finish within the grace period.
    Graceful,
}

struct ChannelSignal(tokio::sync::watch::Receiver<Stop>);

#[async_trait]
impl ShutdownSignalWatch for ChannelSignal {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        match rx.wait_for(|s| *s != Stop::Running).await.map(|s| *s) {
            Ok(Stop::Graceful) => ShutdownSignal::GracefulTerminate,
            _ => ShutdownSignal::FastShutdown,
        }
    }
}

/// A gateway running on its own threads inside this process.
pub struct Handle {
    pub state: Arc<GatewayState>,
    stop: tokio::sync::watch::Sender<Stop>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    /// Start a gateway; it listens once this returns (the caller waits for the port).
    pub fn spawn(configured: Configured) -> anyhow::Result<Self> {
        check_listeners(&configured.settings)?;
        let state = build_state(configured)?;
        let (server, draining) = build_server(state.clone())?;
        let (stop, rx) = tokio::sync::watch::channel(Stop::Running);
        let thread = std::thread::Builder::new()
            .name("keygate".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(Draining {
                        inner: ChannelSignal(rx),
                        draining,
                    }),
                })
            })
            .context("starting the gateway thread")?;
        Ok(Self {
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// Stop the gateway and wait for its threads.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    /// Begin a graceful stop, as SIGTERM does: listeners close at once, in-flight requests
    /// get the grace period. Returns without waiting.
    pub fn terminate(&self) {
        let _ = self.stop.send(Stop::Graceful);
    }

    fn stop_and_join(&mut self) {
        if *self.stop.borrow() == Stop::Running {
            let _ = self.stop.send(Stop::Fast);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Run the gateway in the foreground until a signal stops it.
pub fn run(configured: Configured) -> anyhow::Result<()> {
    let settings = &configured.settings;
    tracing::info!(
        listen = %settings.server.listen,
        admin = %settings.server.admin_listen,
        upstream = %settings.upstream.url,
        auth = settings.auth.enabled,
        "keygate starting"
    );
    if let Some(tls) = &settings.server.tls {
        for warning in &tls.warnings {
            tracing::warn!("{warning}");
        }
    }
    check_listeners(settings)?;
    let state = build_state(configured)?;
    let (server, draining) = build_server(state)?;
    server.run(RunArgs {
        shutdown_signal: Box::new(Draining {
            inner: pingora::server::UnixShutdownSignalWatch,
            draining,
        }),
    });
    Ok(())
}

/// Fail before starting when a listener's address cannot be bound, instead of leaving a
/// process whose port is dead.
fn check_listeners(settings: &Settings) -> anyhow::Result<()> {
    for (option, addr) in [
        ("server.listen (KEYGATE_LISTEN)", settings.server.listen),
        (
            "server.admin_listen (KEYGATE_ADMIN_LISTEN)",
            settings.server.admin_listen,
        ),
    ] {
        std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("{option} {addr}: cannot listen: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::{test_env as env, TEST_SECRET as SECRET};

    #[test]
    fn clerk_call_bounds_and_the_failure_budget_are_checked_naming_the_option() {
        let dir = std::env::temp_dir().join(format!("keygate-bounds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("bounds.toml");
        std::fs::write(
            &path,
            "[clerk]\nfrontend_api_url = \"https://clerk.example.com\"\nsecret_key = \"sk_test_x\"\n\
             backend_timeout_ms = 1000\nbackend_max_wait_ms = 1500\nbackend_max_in_flight = 0\n\
             backend_rate_per_sec = 0\n\
             [policy.auth_failures]\nwindow_secs = 0\n",
        )
        .expect("write");
        let problems = configure(Some(&path), &env(&[SECRET])).expect_err("bad bounds");
        let fields: Vec<&str> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"clerk.backend_max_wait_ms"), "{problems}");
        assert!(
            fields.contains(&"clerk.backend_max_in_flight"),
            "{problems}"
        );
        assert!(
            fields.contains(&"clerk.backend_rate_per_sec / clerk.backend_burst"),
            "{problems}"
        );
        assert!(
            fields
                .iter()
                .any(|f| f.contains("policy.auth_failures.window_secs")),
            "{problems}"
        );

        std::fs::write(
            &path,
            "[clerk]\nfrontend_api_url = \"https://clerk.example.com\"\nsecret_key = \"sk_test_x\"\n",
        )
        .expect("write");
        let Configured { settings, compiled } =
            configure(Some(&path), &env(&[SECRET])).expect("defaults are valid");
        let c = settings.clerk.expect("clerk");
        assert_eq!(c.backend_max_in_flight, 32);
        assert_eq!((c.backend_rate_per_sec, c.backend_burst), (50, 100));
        // Below Clerk's production limit (1000 per 10 s) even in the worst 10 s.
        assert!(c.backend_burst + 10 * c.backend_rate_per_sec < 1000);
        assert!(c.backend_max_wait <= c.backend_timeout);
        let f = &compiled.policy.auth_failures;
        assert!(f.enabled);
        assert_eq!(f.budget.requests, 20);
        assert_eq!(f.lockout, Duration::from_secs(60));
    }

    /// The modules' compile problems are reported with every configuration problem, naming
    /// their options, even when a section the gateway cannot run without is unusable.
    #[test]
    fn compile_problems_join_every_configuration_problem() {
        let dir = std::env::temp_dir().join(format!("keygate-compose-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("compose.toml");
        std::fs::write(
            &path,
            "[auth]\nenabled = false\n\
             [[policy.scopes]]\nmethod = \"tools/[\"\nscopes = [\"x\"]\n\
             [policy.auth_failures]\nwindow_secs = 0\n",
        )
        .expect("write");
        let problems = configure(
            Some(&path),
            &env(&[
                ("KEYGATE_LISTEN", "not-an-addr"),
                ("API_KEY_ENCRYPTION_SECRET", "weak-secret-value"),
            ]),
        )
        .expect_err("bad config");
        let _ = std::fs::remove_dir_all(&dir);
        let fields: Vec<&str> = problems.0.iter().map(|p| p.field.as_str()).collect();
        for want in [
            "KEYGATE_LISTEN",
            "keys.encryption_secret (API_KEY_ENCRYPTION_SECRET)",
            "policy.scopes",
            "policy.auth_failures.window_secs",
        ] {
            assert!(
                fields.iter().any(|f| f.contains(want)),
                "{want} not reported: {problems}"
            );
        }
        assert!(
            !problems.to_string().contains("weak-secret-value"),
            "{problems}"
        );
    }
}
