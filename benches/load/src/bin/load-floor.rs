//! The required-work floor: the passthrough plus, written as plainly as Pingora allows, the work
//! keygate's specification makes every authenticated MCP request do, with nothing configurable,
//! no metrics, no log and no token verification (every token is taken as valid; the ladder runs
//! with warm caches, where keygate verifies nothing either). It answers one question: how much of
//! keygate's cost over the bare passthrough any proxy doing the same job on Pingora would pay.
//!
//! Per request, as keygate's step 4 does:
//! - keygate's connection and request deadlines (its own accept path and watchdog, the same ones);
//! - the bearer token taken from `Authorization`, hashed with SHA-256, looked up in a verified
//!   token map, then the user's key looked up by subject;
//! - the JSON-RPC body read before the upstream is chosen (Pingora's retry buffer sends it on)
//!   and its `method` and `params.name` read;
//! - upstream headers: `Authorization`, `Proxy-Authorization` and `Cookie` removed;
//!   `X-Forwarded-For`, `Forwarded`, `X-Forwarded-Proto`, `X-Forwarded-Host` and a generated
//!   `X-Request-Id` set; `Host` set to the upstream's; the key appended as `?apiKey=`;
//! - the upstream peer with the timeouts keygate runs with in the ladder: connect, read, write
//!   and idle (the idle one bounds a pooled upstream connection, so Pingora arms a timer each
//!   time it releases one to the pool), built once at startup and cloned per request, as
//!   keygate does;
//! - `X-Request-Id` returned in the response.
//!
//! Usage: `load-floor <listen addr> <upstream addr>`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use keygate::proxy::deadline::{body_progress, mark_headers_read, Connections, Limits, Requests};
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service;
use sha2::{Digest, Sha256};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(serde::Deserialize)]
struct Rpc<'a> {
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    params: Option<Params<'a>>,
}

#[derive(serde::Deserialize)]
struct Params<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
}

struct Floor {
    host: HeaderValue,
    /// Token hash -> subject (keygate: token hash -> verified identity).
    verified: RwLock<HashMap<[u8; 32], Arc<str>>>,
    /// Subject -> API key (keygate: the key cache).
    keys: RwLock<HashMap<Arc<str>, Arc<str>>>,
    next_id: AtomicU64,
    /// The upstream, built once at startup as keygate builds its own.
    peer: HttpPeer,
}

#[derive(Default)]
struct Ctx {
    key: Option<Arc<str>>,
    request_id: Option<HeaderValue>,
    /// What the body named (kept, so the parse is not optimised away).
    calls: usize,
}

impl Floor {
    fn key_for(&self, token: &[u8]) -> Arc<str> {
        let hash: [u8; 32] = Sha256::digest(token).into();
        let known = self
            .verified
            .read()
            .ok()
            .and_then(|m| m.get(&hash).cloned());
        let subject = known.unwrap_or_else(|| {
            let subject: Arc<str> = format!(
                "user_{:02x}{:02x}{:02x}{:02x}",
                hash[0], hash[1], hash[2], hash[3]
            )
            .into();
            if let Ok(mut m) = self.verified.write() {
                m.insert(hash, subject.clone());
            }
            subject
        });
        let known = self.keys.read().ok().and_then(|m| m.get(&subject).cloned());
        known.unwrap_or_else(|| {
            let key: Arc<str> = format!("key-{subject}").into();
            if let Ok(mut m) = self.keys.write() {
                m.insert(subject, key.clone());
            }
            key
        })
    }
}

/// The upstream peer with the timeouts keygate runs with in the ladder: its `[upstream]`
/// defaults, taken from keygate's own config, and the read timeout the ladder's config sets
/// (`read_timeout_secs = 3600` in `benches/load/run`, for long event streams).
fn upstream_peer(upstream: SocketAddr) -> HttpPeer {
    let defaults = keygate::config::file::UpstreamFile::default();
    let connect = Duration::from_secs(defaults.connect_timeout_secs);
    let mut peer = HttpPeer::new(upstream, false, String::new());
    let o = &mut peer.options;
    // As keygate sets them (`app.rs`): the whole connection attempt gets twice the connect time.
    o.connection_timeout = Some(connect);
    o.total_connection_timeout = Some(connect * 2);
    o.read_timeout = Some(Duration::from_secs(3600));
    o.write_timeout = Some(Duration::from_secs(defaults.write_timeout_secs));
    o.idle_timeout = Some(Duration::from_secs(defaults.idle_timeout_secs));
    peer
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn early_request_filter(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        mark_headers_read();
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.key = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
            .map(|v| self.key_for(&v[7..]));
        if ctx.key.is_none() {
            session.respond_error(401).await?;
            return Ok(true);
        }

        session.as_downstream_mut().enable_retry_buffering();
        let mut body = BytesMut::new();
        while let Some(chunk) = session.read_request_body().await? {
            body.extend_from_slice(&chunk);
        }
        let body: Bytes = body.freeze();
        if let Ok(rpc) = serde_json::from_slice::<Rpc<'_>>(&body) {
            ctx.calls = usize::from(rpc.method.is_some())
                + usize::from(rpc.params.and_then(|p| p.name).is_some());
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        for name in [
            http::header::AUTHORIZATION,
            http::header::PROXY_AUTHORIZATION,
            http::header::COOKIE,
        ] {
            req.remove_header(&name);
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let host = req.headers.get(http::header::HOST).cloned();
        let forwarded = match host.as_ref().and_then(|h| h.to_str().ok()) {
            Some(h) => format!("for={peer};proto=http;host=\"{h}\""),
            None => format!("for={peer};proto=http"),
        };
        req.insert_header("X-Forwarded-For", peer)?;
        req.insert_header("Forwarded", forwarded)?;
        req.insert_header("X-Forwarded-Proto", "http")?;
        if let Some(h) = host {
            req.insert_header("X-Forwarded-Host", h)?;
        }
        let id = format!("{:032x}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let id = HeaderValue::from_str(&id).map_err(|_| Error::new(ErrorType::InternalError))?;
        req.insert_header("X-Request-Id", id.clone())?;
        ctx.request_id = Some(id);
        req.insert_header(http::header::HOST, self.host.clone())?;
        if let Some(key) = &ctx.key {
            let uri = match req.uri.query() {
                Some(q) => format!("{}?{q}&apiKey={key}", req.uri.path()),
                None => format!("{}?apiKey={key}", req.uri.path()),
            };
            let uri = http::Uri::try_from(uri).map_err(|_| Error::new(ErrorType::InternalError))?;
            req.set_uri(uri);
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        // The body deadlines' watchdog, as keygate feeds it.
        body_progress(end_of_stream);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(id) = ctx.request_id.take() {
            resp.insert_header("X-Request-Id", id)?;
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    // The same process-wide memory settings as keygate's binary: its idle-stream memory and
    // this one's are then comparable.
    keygate::memory::keep_small_pages().map_err(anyhow::Error::msg)?;
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8082".into());
    let upstream: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:3000".into())
        .parse()?;
    let conf = ServerConf {
        threads: 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let floor = Floor {
        host: HeaderValue::from_str(&upstream.to_string())?,
        verified: RwLock::new(HashMap::new()),
        keys: RwLock::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        peer: upstream_peer(upstream),
    };
    let proxy = pingora::proxy::http_proxy(&server.configuration, floor);
    // keygate's connection and request deadlines, with its defaults (h2c sniffed at accept).
    let limits = Limits {
        header: Duration::from_secs(10),
        keepalive: Duration::from_secs(60),
        body: Duration::from_secs(30),
        body_idle: Duration::from_secs(30),
        send: Duration::from_secs(60),
    };
    let app = Connections::new(
        Requests::new(proxy, limits),
        None,
        true,
        Duration::from_secs(10),
    );
    let mut service = Service::new("load-floor".to_string(), app);
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever()
}
