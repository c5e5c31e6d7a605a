//! The admin listener: `/health` (the process is up), `/ready` (keygate serves and can decide:
//! the public listener accepts connections, every issuer's signing keys are loaded and fresh,
//! the key store answers) and `/metrics`.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::proxy::GatewayState;
use crate::telemetry::metrics::Metrics;

/// The admin HTTP app.
pub struct Admin {
    pub state: Arc<GatewayState>,
    pub shutting_down: Arc<std::sync::atomic::AtomicBool>,
}

fn json(status: u16, body: Vec<u8>) -> Response<Vec<u8>> {
    let len = body.len();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", len)
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

impl Admin {
    /// Bring the values other components count themselves into the registry, then render.
    fn metrics(&self) -> Vec<u8> {
        let state = &self.state;
        let m = &state.metrics;
        let cache = state.auth.cache_stats();
        Metrics::sync_counter(&m.token_cache.with_label_values(&["hit"]), cache.hits);
        Metrics::sync_counter(&m.token_cache.with_label_values(&["miss"]), cache.misses);
        for keys in state.auth.key_sets() {
            let issuer = keys.issuer();
            let errors = keys.fetch_error_count();
            let ok = keys.fetch_count().saturating_sub(errors);
            Metrics::sync_counter(&m.jwks_fetches.with_label_values(&[issuer, "ok"]), ok);
            Metrics::sync_counter(
                &m.jwks_fetches.with_label_values(&[issuer, "error"]),
                errors,
            );
            if let Some(age) = keys.age() {
                m.jwks_age
                    .with_label_values(&[issuer])
                    .set(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
            }
        }
        if let Some(limiter) = &state.rate_limits.fallback {
            Metrics::sync_counter(&m.rate_limit_fallbacks, limiter.fallbacks());
        }
        m.render()
    }
}

/// Whether the public listener accepts a TCP connection now (an unspecified address is probed
/// on loopback).
async fn public_listener_accepts(listen: std::net::SocketAddr) -> bool {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    tokio::time::timeout(
        std::time::Duration::from_secs(1),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .is_ok_and(|c| c.is_ok())
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/health" => json(200, self.state.local.health_body.to_vec()),
            "/metrics" => {
                let body = self.metrics();
                let len = body.len();
                Response::builder()
                    .status(200)
                    .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                    .header("content-length", len)
                    .body(body)
                    .unwrap_or_else(|_| Response::new(Vec::new()))
            }
            "/ready" => {
                let draining = self
                    .shutting_down
                    .load(std::sync::atomic::Ordering::Acquire);
                let keys = self.state.auth.is_ready() || !self.state.settings.auth.enabled;
                let store = match &self.state.keys.vault {
                    Some(vault) => tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        vault.store().ping(),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok()),
                    None => true,
                };
                let listener = public_listener_accepts(self.state.settings.server.listen).await;
                let ready = listener && keys && store && !draining;
                let body = serde_json::json!({
                    "ready": ready,
                    "listener": listener,
                    "signing_keys": keys,
                    "key_store": store,
                    "draining": draining,
                });
                json(if ready { 200 } else { 503 }, body.to_string().into_bytes())
            }
            _ => json(
                404,
                br#"{"error":"not_found","error_description":"Not found"}"#.to_vec(),
            ),
        }
    }
}

/// The admin listener's app: [`Admin`] behind Pingora's HTTP server, noting the shutdown signal
/// on every request it serves. The listeners stop accepting the moment shutdown is signalled;
/// a background task that sets the draining flag may run a little later, and a probe on a
/// kept-alive connection in between must not read "ready".
pub struct AdminApp {
    inner: Arc<pingora::apps::http_app::HttpServer<Admin>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl AdminApp {
    pub fn new(admin: Admin) -> Self {
        let draining = admin.shutting_down.clone();
        Self {
            inner: Arc::new(pingora::apps::http_app::HttpServer::new_app(admin)),
            draining,
        }
    }
}

#[async_trait]
impl pingora::apps::HttpServerApp for AdminApp {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &pingora::server::ShutdownWatch,
    ) -> Option<pingora::apps::ReusedHttpStream> {
        if *shutdown.borrow() {
            self.draining
                .store(true, std::sync::atomic::Ordering::Release);
        }
        self.inner.process_new_http(session, shutdown).await
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&pingora::apps::HttpServerOptions> {
        self.inner.server_options()
    }

    async fn http_cleanup(&self) {
        self.inner.http_cleanup().await
    }
}
