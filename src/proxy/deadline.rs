//! Connection lifetimes: every wait on a downstream client is bounded, from the TCP accept to
//! the last request body byte, on HTTP/1.1, h2c and TLS (h2 or HTTP/1.1). Pingora bounds some
//! of these waits (per-read timeouts, the h2 idle timeout) but not all: it sniffs for the h2c
//! preface and runs the TLS handshake (fixed 60 s, errors logged at ERROR) before any
//! application code sees the connection, and has no whole-header or whole-body deadline.
//!
//! Two wrappers own what Pingora leaves open:
//! - [`Connections`] is the listener's application: it is handed the raw TCP stream at accept
//!   and runs the TLS handshake and the h2c sniff itself, then hands the stream to Pingora's
//!   HTTP machinery. A connection must deliver its first complete request head (HTTP/1.1) or
//!   its first stream (HTTP/2) within the header deadline counted from accept, else it is
//!   dropped — whatever was or was not sent before.
//! - [`Requests`] wraps the proxy for each request: the head deadline on kept-alive
//!   connections, then the request body (whole body of a request answered or inspected before
//!   it is forwarded; an idle-gap limit once a body streams upstream), plus the downstream
//!   write timeout and HTTP/1.1 pipelining.
//!
//! The proxy reports progress through [`mark_headers_read`] and [`body_progress`], which reach
//! the wrappers through task-locals (HTTP/2 streams run on their own tasks: their connection is
//! found through its socket digest).
//! Idle HTTP/2 connections are closed by Pingora's `h2_idle_timeout` (see `app.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Every downstream deadline, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Accept (TLS included) to the first complete request head; each later head on a
    /// kept-alive HTTP/1.1 connection gets this plus `keepalive`.
    pub header: Duration,
    /// Idle allowance between requests (HTTP/1.1) and streams (HTTP/2).
    pub keepalive: Duration,
    /// Request head to the whole body received, for bodies read before forwarding (inspected
    /// MCP POSTs, the keys API) and until a streamed body starts flowing upstream.
    pub body: Duration,
    /// Longest gap between two chunks of a body streamed upstream.
    pub body_idle: Duration,
    /// Longest a write to the client may wait (a client that stops reading).
    pub send: Duration,
}

// ---------------------------------------------------------------------------------------------
// Progress reported by the proxy.

tokio::task_local! {
    static CONNECTION: Arc<ConnState>;
    static REQUEST: Arc<RequestState>;
}

/// Whether a connection has delivered its first request head (or HTTP/2 stream).
#[derive(Default)]
struct ConnState {
    head_seen: AtomicBool,
}

const BODY_WAITING: u8 = 0;
const BODY_STREAMING: u8 = 1;
const BODY_DONE: u8 = 2;

/// One request's progress, as milliseconds since the request began.
struct RequestState {
    started: Instant,
    head_at: AtomicU64,
    body: AtomicU8,
    last_body: AtomicU64,
}

const NOT_YET: u64 = u64::MAX;

impl RequestState {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            head_at: AtomicU64::new(NOT_YET),
            body: AtomicU8::new(BODY_WAITING),
            last_body: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(NOT_YET - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.started + Duration::from_millis(ms)
    }
}

/// The marker the proxy persists on a kept-alive connection, so the next request on it gets
/// the idle allowance as well.
pub struct ReusedConnection;

/// Called by the proxy once a request's head has been parsed.
pub fn mark_headers_read() {
    let _ = REQUEST.try_with(|r| {
        let _ =
            r.head_at
                .compare_exchange(NOT_YET, r.now_ms(), Ordering::AcqRel, Ordering::Acquire);
    });
    let _ = CONNECTION.try_with(|c| c.head_seen.store(true, Ordering::Release));
}

/// Called by the proxy for each request body chunk on its way upstream; `end` once the body
/// is complete (an empty or already buffered body arrives here complete at once).
pub fn body_progress(end: bool) {
    let _ = REQUEST.try_with(|r| {
        if end {
            r.body.store(BODY_DONE, Ordering::Release);
        } else {
            r.last_body.store(r.now_ms(), Ordering::Release);
            let _ = r.body.compare_exchange(
                BODY_WAITING,
                BODY_STREAMING,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 connections: their streams run on tasks of their own, so the first stream finds its
// connection's state through the socket digest the stream's session shares with it.

type Registry = Mutex<HashMap<usize, (Arc<SocketDigest>, Arc<ConnState>)>>;

fn registry() -> &'static Registry {
    static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// An HTTP/2 connection waiting for its first stream; unregistered on drop. The entry holds
/// the digest, so its address cannot be reused by another connection while registered.
struct Registration(Option<usize>);

impl Registration {
    fn new(digest: Option<Arc<SocketDigest>>, conn: &Arc<ConnState>) -> Self {
        let Some(digest) = digest else {
            // No digest to find it by: the connection is not held to the first-stream deadline
            // (the handshake still is, and idle connections are closed by the idle timeout).
            conn.head_seen.store(true, Ordering::Release);
            return Self(None);
        };
        let key = Arc::as_ptr(&digest) as usize;
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (digest, conn.clone()));
        Self(Some(key))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(key) = self.0 {
            registry()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        }
    }
}

/// A stream of an HTTP/2 connection has arrived: its connection has delivered a request head.
fn mark_h2_stream(session: &ServerSession) {
    let Some(digest) = session.digest().and_then(|d| d.socket_digest.as_ref()) else {
        return;
    };
    let key = Arc::as_ptr(digest) as usize;
    let found = registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
    if let Some((_, conn)) = found {
        conn.head_seen.store(true, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------------
// The listener's application.

/// Owns the accept path: TLS handshake, h2c sniff and the first-head deadline, then hands the
/// connection to the HTTP app `A` (which must not sniff for h2c itself: its `h2c` option is
/// off; this wrapper reports a sniffed h2c connection as ALPN h2).
pub struct Connections<A> {
    inner: Arc<A>,
    tls: Option<Arc<Acceptor>>,
    h2c: bool,
    header: Duration,
}

impl<A> Connections<A> {
    /// `tls`: terminate TLS with this acceptor; `h2c`: accept HTTP/2 with prior knowledge on
    /// cleartext connections.
    pub fn new(inner: A, tls: Option<Acceptor>, h2c: bool, header: Duration) -> Self {
        Self {
            inner: Arc::new(inner),
            tls: tls.map(Arc::new),
            h2c,
            header,
        }
    }
}

/// Why a connection was dropped before it could carry a request.
fn dropped(why: &'static str) -> Option<Stream> {
    tracing::debug!(
        reason = why,
        "downstream connection closed before a request"
    );
    None
}

#[async_trait]
impl<A> ServerApp for Connections<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let deadline = Instant::now() + self.header;
        let opening = async {
            match &self.tls {
                Some(acceptor) => tls_accept(acceptor, stream).await,
                None if self.h2c => sniff(stream).await,
                None => Some(stream),
            }
        };
        let stream = match tokio::time::timeout_at(deadline, opening).await {
            Ok(Some(stream)) => stream,
            Ok(None) => return dropped("handshake failed or the client left"),
            Err(_) => return dropped("no request head in time"),
        };
        let conn = Arc::new(ConnState::default());
        let _registration = matches!(stream.selected_alpn_proto(), Some(ALPN::H2))
            .then(|| Registration::new(stream.get_socket_digest(), &conn));
        let work = CONNECTION.scope(
            conn.clone(),
            ServerApp::process_new(&self.inner, stream, shutdown),
        );
        tokio::pin!(work);
        tokio::select! {
            out = &mut work => out,
            _ = tokio::time::sleep_until(deadline) => {
                if conn.head_seen.load(Ordering::Acquire) {
                    work.await
                } else {
                    dropped("no request head in time")
                }
            }
        }
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.inner.as_ref()).await
    }
}

/// The TLS handshake, on the raw TCP stream the plain listener accepted. A failed handshake is
/// the client's doing: it is logged at debug, never at error.
async fn tls_accept(acceptor: &Acceptor, stream: Stream) -> Option<Stream> {
    let l4 = match stream.into_any().downcast::<L4Stream>() {
        Ok(l4) => *l4,
        Err(_) => {
            tracing::warn!("TLS listener got a stream that is not TCP; closing");
            return None;
        }
    };
    match acceptor.tls_handshake(l4).await {
        Ok(tls) => Some(Box::new(tls)),
        Err(e) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
    }
}

/// Read just enough to tell the h2 preface from an HTTP/1.x request: a request shorter than the
/// preface is not held waiting for 24 bytes.
async fn sniff(mut stream: Stream) -> Option<Stream> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    let h2 = loop {
        match stream.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return None,
            Ok(read) => n += read,
        }
        if buf[..n] != H2_PREFACE[..n] {
            break false;
        }
        if n == H2_PREFACE.len() {
            break true;
        }
    };
    Some(Box::new(Sniffed {
        prefix: buf,
        len: n,
        pos: 0,
        h2,
        inner: stream,
    }))
}

/// A cleartext stream whose first bytes were read by the sniff: they are read again first, and
/// a connection that opened with the h2 preface reports ALPN h2 (as TLS would have).
#[derive(Debug)]
struct Sniffed {
    prefix: [u8; 24],
    len: usize,
    pos: usize,
    h2: bool,
    inner: Stream,
}

impl AsyncRead for Sniffed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.len {
            let n = (self.len - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Sniffed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Sniffed {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Sniffed {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Sniffed {
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        if self.h2 {
            Some(ALPN::H2)
        } else {
            None
        }
    }
}

impl GetTimingDigest for Sniffed {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Sniffed {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Sniffed {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Sniffed {}

// ---------------------------------------------------------------------------------------------
// Each request.

/// Wraps the proxy app with the per-request deadlines of [`Limits`].
pub struct Requests<A> {
    inner: Arc<A>,
    limits: Limits,
}

impl<A> Requests<A> {
    pub fn new(inner: A, limits: Limits) -> Self {
        Self {
            inner: Arc::new(inner),
            limits,
        }
    }
}

/// What a request is waiting for when its watchdog wakes.
enum Watch {
    Until(Instant),
    Expired(&'static str),
    Done,
}

fn watch(state: &RequestState, limits: &Limits, head: Duration) -> Watch {
    let now = Instant::now();
    let head_at = state.head_at.load(Ordering::Acquire);
    let due = if head_at == NOT_YET {
        (state.started + head, "request head")
    } else {
        match state.body.load(Ordering::Acquire) {
            BODY_DONE => return Watch::Done,
            BODY_STREAMING => (
                state.at(state.last_body.load(Ordering::Acquire)) + limits.body_idle,
                "request body (idle)",
            ),
            _ => (state.at(head_at) + limits.body, "request body"),
        }
    };
    if now >= due.0 {
        Watch::Expired(due.1)
    } else {
        Watch::Until(due.0)
    }
}

#[async_trait]
impl<A> HttpServerApp for Requests<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    // Written as a plain function returning the boxed future (the shape `async_trait` gives
    // the trait method), so the session is handed to the inner app before any future state
    // exists: what this wrapper keeps for the whole request (a long SSE stream included) is
    // only the state, the timer and the inner future's pointer.
    fn process_new_http<'app, 'watch, 'fut>(
        self: &'app Arc<Self>,
        mut session: ServerSession,
        shutdown: &'watch ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'fut>>
    where
        'app: 'fut,
        'watch: 'fut,
        Self: 'fut,
    {
        let limits = self.limits;
        // The proxy leaves a marker on connections it keeps alive (see `ReusedConnection`).
        let reused = session.take_connection_user_context().is_some();
        let head = if reused {
            limits.header + limits.keepalive
        } else {
            limits.header
        };
        if session.is_http2() {
            mark_h2_stream(&session);
        } else {
            session.set_pipelining_enabled(true);
        }
        session.set_write_timeout(Some(limits.send));
        let state = Arc::new(RequestState::new());
        let work = REQUEST.scope(
            state.clone(),
            self.inner.process_new_http(session, shutdown),
        );
        Box::pin(async move {
            tokio::pin!(work);
            loop {
                let until = match watch(&state, &limits, head) {
                    Watch::Done => return work.await,
                    Watch::Until(at) => at,
                    Watch::Expired(what) => {
                        tracing::debug!(waiting_for = what, "downstream deadline passed; closing");
                        return None;
                    }
                };
                tokio::select! {
                    out = &mut work => return out,
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
        })
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.inner.server_options()
    }

    async fn http_cleanup(&self) {
        self.inner.http_cleanup().await
    }

    async fn process_custom_session(
        self: Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.inner
            .clone()
            .process_custom_session(stream, shutdown)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header: Duration::from_secs(10),
            keepalive: Duration::from_secs(60),
            body: Duration::from_secs(30),
            body_idle: Duration::from_secs(5),
            send: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn the_watch_follows_the_request_from_head_to_body() {
        let state = RequestState::new();
        let l = limits();
        assert!(
            matches!(watch(&state, &l, l.header), Watch::Until(t) if t == state.started + l.header)
        );
        state.head_at.store(1000, Ordering::Release);
        assert!(
            matches!(watch(&state, &l, l.header), Watch::Until(t) if t == state.at(1000) + l.body)
        );
        state.last_body.store(2000, Ordering::Release);
        state.body.store(BODY_STREAMING, Ordering::Release);
        assert!(
            matches!(watch(&state, &l, l.header), Watch::Until(t) if t == state.at(2000) + l.body_idle)
        );
        state.body.store(BODY_DONE, Ordering::Release);
        assert!(matches!(watch(&state, &l, l.header), Watch::Done));
        let late = RequestState::new();
        let zero = Limits {
            header: Duration::ZERO,
            ..l
        };
        assert!(matches!(
            watch(&late, &zero, zero.header),
            Watch::Expired("request head")
        ));
    }
}
