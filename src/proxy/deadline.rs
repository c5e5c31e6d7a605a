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
//! found through its socket digest, in a registry an entry leaves at the connection's first
//! stream or end). A body that is complete when the request starts (a GET, a WebSocket
//! upgrade, an event stream) has no body deadline at all.
//! Idle HTTP/2 connections are closed by Pingora's `h2_idle_timeout` (see `app.rs`).
//!
//! HTTP/2 control frames that make the server work without any stream (SETTINGS and PING that
//! ask for an acknowledgement, PRIORITY) are metered per connection as they are read
//! ([`ControlBudget`]): the h2 layer acknowledges every one and has no limit of its own, so a
//! flood past the budget closes the connection.
//!
//! The listener's socket buffers are chosen here too ([`listener_buffers`]): a connection's
//! buffers live as long as it does, idle event streams included.
//!
//! Failed handshakes are the client's doing and are logged at debug: the accept path checks a
//! TLS h2 connection's preface itself, and defers a write failure during the h2 handshake to
//! the connection's first read (see [`Opened`]), so Pingora's h2 handshake does not fail.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::listeners::L4BufferSettings;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
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
// HTTP/2 connections: Pingora runs each stream on a task of its own, so the first stream finds
// its connection's state through the socket digest the stream's session shares with it. An
// entry lives only while its connection waits for its first stream: the first stream or the
// end of the connection removes it.

/// The HTTP/2 connections of one listener still waiting for their first stream.
#[derive(Default)]
struct Pending {
    entries: Mutex<HashMap<usize, Entry>>,
    tickets: AtomicU64,
}

struct Entry {
    /// Which registration made this entry (a digest's address is reused once it is freed).
    ticket: u64,
    /// Held so that the address keying the entry stays this connection's while registered.
    _digest: Arc<SocketDigest>,
    conn: Arc<ConnState>,
}

impl Pending {
    fn entries(&self) -> MutexGuard<'_, HashMap<usize, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for this connection's first stream; the registration ends with the returned guard.
    fn register(
        self: &Arc<Self>,
        digest: Option<Arc<SocketDigest>>,
        conn: &Arc<ConnState>,
    ) -> Option<Registration> {
        let Some(digest) = digest else {
            // No digest to find it by: the connection is not held to the first-stream deadline
            // (the handshake still is, and idle connections are closed by the idle timeout).
            conn.head_seen.store(true, Ordering::Release);
            return None;
        };
        let key = Arc::as_ptr(&digest) as usize;
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        self.entries().insert(
            key,
            Entry {
                ticket,
                _digest: digest,
                conn: conn.clone(),
            },
        );
        Some(Registration {
            pending: self.clone(),
            key,
            ticket,
        })
    }

    /// A stream of an HTTP/2 connection has arrived: its connection has delivered a request.
    fn first_stream(&self, session: &ServerSession) {
        let Some(digest) = session.digest().and_then(|d| d.socket_digest.as_ref()) else {
            return;
        };
        let key = Arc::as_ptr(digest) as usize;
        if let Some(entry) = self.entries().remove(&key) {
            entry.conn.head_seen.store(true, Ordering::Release);
        }
    }

    /// Connections waiting for their first stream.
    fn len(&self) -> usize {
        self.entries().len()
    }
}

/// An HTTP/2 connection's entry in [`Pending`], removed on drop if it is still there.
struct Registration {
    pending: Arc<Pending>,
    key: usize,
    ticket: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut entries = self.pending.entries();
        if entries
            .get(&self.key)
            .is_some_and(|e| e.ticket == self.ticket)
        {
            entries.remove(&self.key);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The listener's application.

/// Read buffer of a TLS connection: one TLS record. rustls asks its transport for at most
/// 4 KiB at a time; this lets one system call bring in a whole record.
pub const TLS_READ_BUFFER: usize = 16 * 1024;

/// The public listener's socket buffers. Cleartext connections read straight into Pingora's
/// HTTP buffers, as Pingora's own upstream connections do: a read buffer under them would only
/// copy each byte once more, and it costs a 64 KiB zeroed allocation per connection for the
/// connection's whole life (resident at once when `calloc` reuses freed memory). TLS
/// connections read through [`TLS_READ_BUFFER`]. Writes keep Pingora's default.
pub fn listener_buffers(tls: bool) -> L4BufferSettings {
    L4BufferSettings::default().read(if tls { TLS_READ_BUFFER } else { 0 })
}

/// Owns the accept path: TLS handshake, h2c sniff and the first-request deadline, then hands
/// the connection to [`Requests`] and Pingora's HTTP machinery (whose own `h2c` option must be
/// off: this wrapper reports a sniffed h2c connection as ALPN h2).
pub struct Connections<A> {
    inner: Arc<Requests<A>>,
    tls: Option<Arc<Acceptor>>,
    h2c: bool,
    header: Duration,
    control: ControlBudget,
    floods: Option<prometheus::IntCounter>,
}

impl<A> Connections<A> {
    /// `tls`: terminate TLS with this acceptor; `h2c`: accept HTTP/2 with prior knowledge on
    /// cleartext connections.
    pub fn new(inner: Requests<A>, tls: Option<Acceptor>, h2c: bool, header: Duration) -> Self {
        Self {
            inner: Arc::new(inner),
            tls: tls.map(Arc::new),
            h2c,
            header,
            control: ControlBudget::DEFAULT,
            floods: None,
        }
    }

    /// Count the HTTP/2 connections closed for a control-frame flood on `counter`.
    pub fn count_control_floods(mut self, counter: prometheus::IntCounter) -> Self {
        self.floods = Some(counter);
        self
    }

    /// HTTP/2 connections accepted and still waiting for their first stream.
    pub fn awaiting_first_stream(&self) -> usize {
        self.inner.pending.len()
    }

    /// A fresh control-frame meter for one HTTP/2 connection.
    fn meter(&self) -> FrameMeter {
        FrameMeter::new(self.control, self.floods.clone())
    }

    /// TLS, then the protocol's opening bytes: what must happen before Pingora gets the stream.
    async fn open(&self, stream: Stream) -> Result<Stream, &'static str> {
        match &self.tls {
            Some(acceptor) => {
                let tls = tls_accept(acceptor, stream).await?;
                if matches!(tls.selected_alpn_proto(), Some(ALPN::H2)) {
                    expect_preface(tls, self.meter()).await
                } else {
                    Ok(tls)
                }
            }
            None if self.h2c => sniff(stream, self.meter()).await,
            None => Ok(stream),
        }
    }
}

/// Why a connection was dropped before it carried a request. Clients cause these at will:
/// never above debug.
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
        // Boxed: the TLS handshake and the preface sniff are large state machines that are done
        // before the first request, and unboxed their size would be held by this future for the
        // connection's whole life (an idle SSE stream included), ~3.7 KB per connection.
        let opening = Box::pin(self.open(stream));
        let stream = match tokio::time::timeout_at(deadline, opening).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(why)) => return dropped(why),
            Err(_) => return dropped("no request head in time"),
        };
        let conn = Arc::new(ConnState::default());
        let _registration = if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            self.inner
                .pending
                .register(stream.get_socket_digest(), &conn)
        } else {
            None
        };
        let work = CONNECTION.scope(
            conn.clone(),
            ServerApp::process_new(&self.inner, stream, shutdown),
        );
        tokio::pin!(work);
        let out = tokio::select! {
            out = &mut work => out,
            _ = tokio::time::sleep_until(deadline) => {
                if !conn.head_seen.load(Ordering::Acquire) {
                    return dropped("no request head in time");
                }
                work.await
            }
        };
        if !conn.head_seen.load(Ordering::Acquire) {
            return dropped("the client left, or its HTTP/2 handshake failed");
        }
        out
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.inner.as_ref()).await
    }
}

/// The TLS handshake, on the raw TCP stream the plain listener accepted.
async fn tls_accept(acceptor: &Acceptor, stream: Stream) -> Result<Stream, &'static str> {
    let l4 = match stream.into_any().downcast::<L4Stream>() {
        Ok(l4) => *l4,
        Err(_) => {
            tracing::warn!("TLS listener got a stream that is not TCP; closing");
            return Err("not a TCP stream");
        }
    };
    match acceptor.tls_handshake(l4).await {
        Ok(tls) => Ok(Box::new(tls)),
        Err(e) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            Err("TLS handshake failed")
        }
    }
}

/// Read just enough of a cleartext connection to tell the h2 preface from an HTTP/1.x request:
/// a request shorter than the preface is not held waiting for 24 bytes.
async fn sniff(mut stream: Stream, meter: FrameMeter) -> Result<Stream, &'static str> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    let h2 = loop {
        match stream.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return Err("the client left"),
            Ok(read) => n += read,
        }
        if buf[..n] != H2_PREFACE[..n] {
            break false;
        }
        if n == H2_PREFACE.len() {
            break true;
        }
    };
    let meter = h2.then_some(meter);
    Ok(Box::new(Opened::new(stream, buf, n, h2, h2, meter)))
}

/// A TLS connection that chose h2 must open with the preface: anything else is refused here,
/// quietly, instead of failing Pingora's h2 handshake (which logs at ERROR).
async fn expect_preface(mut stream: Stream, meter: FrameMeter) -> Result<Stream, &'static str> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    while n < buf.len() {
        match stream.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return Err("the client left"),
            Ok(read) => n += read,
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Err("ALPN h2 without the HTTP/2 preface");
        }
    }
    Ok(Box::new(Opened::new(
        stream,
        buf,
        n,
        true,
        false,
        Some(meter),
    )))
}

/// How many HTTP/2 control frames (SETTINGS or PING asking for an acknowledgement, PRIORITY) a
/// connection may send: `burst` at once, refilled at `per_sec`. Clients send a handful (SETTINGS
/// at the start, keep-alive or window-estimation PINGs); a flood sends millions a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlBudget {
    pub burst: u32,
    pub per_sec: u32,
}

impl ControlBudget {
    /// 1,000 at once, 100 a second after that.
    pub const DEFAULT: ControlBudget = ControlBudget {
        burst: 1000,
        per_sec: 100,
    };
}

/// Follows the frame boundaries of an HTTP/2 connection's inbound bytes (after the preface) and
/// spends the control budget on each control frame. Only frame headers are looked at; payloads
/// are skipped by length. The clock is read only when the budget runs dry.
#[derive(Debug)]
struct FrameMeter {
    budget: ControlBudget,
    tokens: u32,
    refilled: Instant,
    /// The frame header being collected, and how many of its bytes are in.
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
    exceeded: bool,
    floods: Option<prometheus::IntCounter>,
}

impl FrameMeter {
    fn new(budget: ControlBudget, floods: Option<prometheus::IntCounter>) -> Self {
        Self {
            budget,
            tokens: budget.burst,
            refilled: Instant::now(),
            head: [0; 9],
            have: 0,
            skip: 0,
            exceeded: false,
            floods,
        }
    }

    /// Account for `bytes` read from the client; false once the budget is exceeded.
    fn read(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() && !self.exceeded {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                self.have = 0;
                let [l0, l1, l2, kind, flags, ..] = self.head;
                self.skip = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
                // SETTINGS (4) and PING (6) without ACK are acknowledged; PRIORITY (2) is read.
                let control = matches!(kind, 4 | 6) && flags & 1 == 0 || kind == 2;
                if control && !self.spend() {
                    self.exceeded = true;
                    tracing::debug!("HTTP/2 control-frame flood: closing the connection");
                    if let Some(c) = &self.floods {
                        c.inc();
                    }
                }
            }
        }
        !self.exceeded
    }

    fn spend(&mut self) -> bool {
        if self.tokens == 0 {
            let now = Instant::now();
            let earned = now.saturating_duration_since(self.refilled).as_secs_f64()
                * f64::from(self.budget.per_sec);
            if earned >= 1.0 {
                // Saturating float-to-int conversion; at most the burst.
                self.tokens = (earned as u32).min(self.budget.burst);
                self.refilled = now;
            }
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// A stream whose first bytes were read by the accept path: they are read again first. A
/// cleartext connection that opened with the h2 preface reports ALPN h2 (as TLS would have).
///
/// On an HTTP/2 connection, a write that fails before the first read past the preface (the
/// server's SETTINGS, while the client already reset the connection) is reported as done and
/// the failure is returned by the next read instead: the h2 handshake then succeeds and the
/// connection ends at its first read, which Pingora logs at debug, rather than failing the
/// handshake, which Pingora logs at ERROR, at whatever rate clients connect and reset.
#[derive(Debug)]
struct Opened {
    prefix: [u8; 24],
    len: usize,
    pos: usize,
    /// Cleartext HTTP/2 by prior knowledge: report ALPN h2.
    h2c: bool,
    /// Defer write failures until the first read past the preface.
    handshaking: bool,
    failed: Option<std::io::ErrorKind>,
    /// HTTP/2: the control frames read so far, against the budget.
    meter: Option<FrameMeter>,
    inner: Stream,
}

impl Opened {
    fn new(
        inner: Stream,
        prefix: [u8; 24],
        len: usize,
        h2: bool,
        h2c: bool,
        meter: Option<FrameMeter>,
    ) -> Self {
        Self {
            prefix,
            len,
            pos: 0,
            h2c,
            handshaking: h2,
            failed: None,
            meter,
            inner,
        }
    }

    /// A write's outcome, with a failure during the HTTP/2 handshake deferred to the next read.
    fn deferred<T>(
        &mut self,
        polled: Poll<std::io::Result<T>>,
        done: T,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Ready(Err(e)) if self.handshaking => {
                tracing::debug!(error = %e, "downstream write failed during the HTTP/2 handshake");
                self.failed = Some(e.kind());
                Poll::Ready(Ok(done))
            }
            other => other,
        }
    }
}

impl AsyncRead for Opened {
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
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.handshaking = false;
            if let Some(meter) = &mut self.meter {
                if !meter.read(&buf.filled()[before..]) {
                    return Poll::Ready(Err(std::io::Error::other("HTTP/2 control-frame flood")));
                }
            }
        }
        polled
    }
}

impl AsyncWrite for Opened {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.deferred(polled, buf.len())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        let all = bufs.iter().map(|b| b.len()).sum();
        self.deferred(polled, all)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.deferred(polled, ())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Opened {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Opened {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Opened {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        if self.h2c {
            Some(ALPN::H2)
        } else {
            self.inner.selected_alpn_proto()
        }
    }
}

impl GetTimingDigest for Opened {
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

impl GetProxyDigest for Opened {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Opened {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Opened {}

// ---------------------------------------------------------------------------------------------
// Each request.

/// Wraps the proxy app with the per-request deadlines of [`Limits`].
pub struct Requests<A> {
    inner: Arc<A>,
    limits: Limits,
    pending: Arc<Pending>,
}

impl<A> Requests<A> {
    pub fn new(inner: A, limits: Limits) -> Self {
        Self {
            inner: Arc::new(inner),
            limits,
            pending: Arc::default(),
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
            self.pending.first_stream(&session);
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
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;

    fn frame(kind: u8, flags: u8, payload: usize) -> Vec<u8> {
        let len = u32::try_from(payload).expect("small");
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.resize(9 + payload, 0xAB);
        f
    }

    /// A budget that never refills: verdicts that do not depend on the clock.
    fn budget(burst: u32) -> ControlBudget {
        ControlBudget { burst, per_sec: 0 }
    }

    #[test]
    fn control_frames_spend_the_budget_and_others_do_not() {
        let mut m = FrameMeter::new(budget(3), None);
        // DATA, HEADERS, WINDOW_UPDATE, and acknowledgements are free.
        let mut free = frame(0, 0, 100);
        free.extend(frame(1, 4, 20));
        free.extend(frame(8, 0, 4));
        free.extend(frame(4, 1, 0));
        free.extend(frame(6, 1, 8));
        for _ in 0..50 {
            assert!(m.read(&free));
        }
        // PING, SETTINGS, PRIORITY spend one each: the fourth is over a burst of three.
        assert!(m.read(&frame(6, 0, 8)));
        assert!(m.read(&frame(4, 0, 6)));
        assert!(m.read(&frame(2, 0, 5)));
        assert!(!m.read(&frame(6, 0, 8)));
        // Once over, always over.
        assert!(!m.read(&frame(0, 0, 1)));
    }

    #[test]
    fn a_payload_that_looks_like_frames_is_skipped() {
        let mut m = FrameMeter::new(budget(1), None);
        // A DATA frame whose payload is full of PING frame headers.
        let pings: Vec<u8> = frame(6, 0, 8).repeat(100);
        let mut data = frame(0, 0, pings.len());
        data.truncate(9);
        data.extend(&pings);
        assert!(m.read(&data));
        assert!(m.read(&frame(6, 0, 8)));
        assert!(!m.read(&frame(6, 0, 8)));
    }

    #[test]
    fn the_budget_refills_with_time() {
        let mut m = FrameMeter::new(
            ControlBudget {
                burst: 2,
                per_sec: 1000,
            },
            None,
        );
        assert!(m.read(&frame(6, 0, 8)));
        assert!(m.read(&frame(6, 0, 8)));
        // Dry now; a refill is due once a millisecond has passed.
        m.refilled -= Duration::from_millis(5);
        assert!(m.read(&frame(6, 0, 8)));
    }

    proptest! {
        /// However the bytes are cut into reads, the meter sees the same frames: the same
        /// verdict, after the same number of control frames.
        #[test]
        fn any_chunking_gives_the_same_verdict(
            frames in proptest::collection::vec((0u8..10, 0u8..2, 0usize..40), 0..60),
            cuts in proptest::collection::vec(1usize..30, 1..40),
            burst in 0u32..30,
        ) {
            let bytes: Vec<u8> = frames
                .iter()
                .flat_map(|&(kind, flags, len)| frame(kind, flags, len))
                .collect();
            let mut whole = FrameMeter::new(budget(burst), None);
            let whole_ok = whole.read(&bytes);
            let mut parts = FrameMeter::new(budget(burst), None);
            let mut rest = &bytes[..];
            let mut parts_ok = true;
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let n = (*cut).min(rest.len());
                parts_ok &= parts.read(&rest[..n]);
                rest = &rest[n..];
            }
            prop_assert_eq!(whole_ok, parts_ok);
            prop_assert_eq!(whole.tokens, parts.tokens);
            let control = frames
                .iter()
                .filter(|&&(k, f, _)| matches!(k, 4 | 6) && f & 1 == 0 || k == 2)
                .count();
            prop_assert_eq!(whole_ok, control <= burst as usize);
        }
    }

    fn limits() -> Limits {
        Limits {
            header: Duration::from_secs(10),
            keepalive: Duration::from_secs(60),
            body: Duration::from_secs(30),
            body_idle: Duration::from_secs(5),
            send: Duration::from_secs(60),
        }
    }

    /// An app that takes each request and answers nothing.
    struct Silent;

    #[async_trait]
    impl HttpServerApp for Silent {
        async fn process_new_http(
            self: &Arc<Self>,
            _session: ServerSession,
            _shutdown: &ShutdownWatch,
        ) -> Option<ReusedHttpStream> {
            None
        }
    }

    /// A cleartext listener served by `Connections` (h2c on), as Pingora would hand it streams.
    async fn listener() -> (std::net::SocketAddr, Arc<Connections<Silent>>) {
        use std::os::fd::AsRawFd;
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let app = Arc::new(Connections::new(
            Requests::new(Silent, limits()),
            None,
            true,
            Duration::from_secs(30),
        ));
        let served = app.clone();
        tokio::spawn(async move {
            let (_stop, shutdown) = tokio::sync::watch::channel(false);
            while let Ok((socket, _)) = tcp.accept().await {
                let fd = socket.as_raw_fd();
                let mut l4 = L4Stream::from(socket);
                l4.set_socket_digest(SocketDigest::from_raw_fd(fd));
                let (app, shutdown) = (served.clone(), shutdown.clone());
                tokio::spawn(async move { app.process_new(Box::new(l4), &shutdown).await });
            }
        });
        (addr, app)
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn an_h2_connection_leaves_the_first_stream_registry_when_it_ends_or_sends_a_stream() {
        let (addr, app) = listener().await;
        // Handshake, no stream, then the client goes away.
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
        let driver = tokio::spawn(conn);
        until("registered", || app.awaiting_first_stream() == 1).await;
        drop(send);
        driver.abort();
        until("drained after the client left", || {
            app.awaiting_first_stream() == 0
        })
        .await;

        // A stream removes the entry while the connection stays open.
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
        let driver = tokio::spawn(conn);
        until("registered", || app.awaiting_first_stream() == 1).await;
        let mut send = send.ready().await.expect("ready");
        let req = http::Request::get("http://localhost/")
            .body(())
            .expect("request");
        let _ = send.send_request(req, true).expect("send");
        until("drained at the first stream", || {
            app.awaiting_first_stream() == 0
        })
        .await;
        assert!(!driver.is_finished(), "the connection ended");

        // Many connections that come and go leave nothing behind.
        let mut clients = Vec::new();
        for _ in 0..50 {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
            clients.push((send, tokio::spawn(conn)));
        }
        until("all registered", || app.awaiting_first_stream() >= 50).await;
        for (send, driver) in clients {
            drop(send);
            driver.abort();
        }
        until("all drained", || app.awaiting_first_stream() == 0).await;
    }

    #[tokio::test]
    async fn a_registration_never_removes_a_newer_connections_entry() {
        let pending = Arc::new(Pending::default());
        let digest = Arc::new(SocketDigest::from_raw_fd(0));
        let (old, new) = (Arc::default(), Arc::default());
        let first = pending.register(Some(digest.clone()), &old);
        // The first connection's entry is gone (its first stream came); the same address now
        // keys another connection's entry.
        pending.entries().clear();
        let second = pending.register(Some(digest), &new);
        drop(first);
        assert_eq!(pending.len(), 1, "the newer entry was removed");
        drop(second);
        assert_eq!(pending.len(), 0);
    }

    /// The client sent the preface, then reset the connection before the server's SETTINGS.
    fn reset_after_preface() -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(1024);
        drop(client);
        server
    }

    #[tokio::test]
    async fn a_reset_during_the_h2_handshake_does_not_fail_the_handshake() {
        use pingora::protocols::http::v2::server::handshake;
        // Unwrapped, Pingora's handshake fails (and Pingora logs that at ERROR).
        let mut preface_then_reset = tokio::io::duplex(1024);
        preface_then_reset
            .0
            .write_all(H2_PREFACE)
            .await
            .expect("write");
        drop(preface_then_reset.0);
        assert!(handshake(Box::new(preface_then_reset.1), None)
            .await
            .is_err());
        // Through the accept path's wrapper the failure surfaces at the first read instead.
        let opened = Opened::new(
            Box::new(reset_after_preface()),
            *H2_PREFACE,
            24,
            true,
            true,
            None,
        );
        let mut conn = handshake(Box::new(opened), None)
            .await
            .expect("the handshake succeeds");
        assert!(conn.accept().await.is_none_or(|r| r.is_err()));
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
