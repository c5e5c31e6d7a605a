//! `Upstream`: a recording HTTP/1.1 server on 127.0.0.1 standing in for the MCP server keygate
//! fronts. It records every request (method, path, query, headers, body) and offers:
//!
//! | route | behaviour |
//! |---|---|
//! | `POST /mcp` | JSON-RPC: `{"jsonrpc":"2.0","id":<id>,"result":{"ok":true}}`; notifications and responses get 202; `initialize` also sets `Mcp-Session-Id` |
//! | `GET /health` | `{"status":"healthy","service":"upstream"}` |
//! | `GET /sse` | `text/event-stream`; each string sent on [`Upstream::sse_sender`] becomes one event, flushed at once; dropping the sender ends the stream |
//! | `/slow?ms=N` (any method) | answers `{"slept_ms":N}` after N ms |
//! | `/echo-body` (any method) | streams the request body back as it arrives |
//! | `GET /ws` | WebSocket handshake (`101`, correct `Sec-WebSocket-Accept`), then echoes raw bytes |
//! | anything else | 200 `{"path":…,"method":…}` |
//!
//! [`Upstream::start_mcp`] serves the example echo MCP server's `/mcp` and `/health` instead
//! (a real MCP client can talk to it), recording every request the same way.
//!
//! The WebSocket route needs no extra crate: the listener hands out its own IO wrapper, and when
//! hyper finishes a `101` exchange on a connection the handler marked, the wrapper gives the
//! socket to an echo task instead of closing it. Bytes a client sends before it has read the
//! `101` may be lost, as with any server that only speaks after the handshake.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::serve::{IncomingStream, Listener};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

/// The example echo MCP server's routes (`examples/echo_upstream`), for [`Upstream::start_mcp`].
#[path = "../../../examples/echo_upstream/echo.rs"]
pub mod echo;

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    /// A header's value as text (`None` if absent or not visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("recorded body is JSON")
    }
}

struct Record {
    method: Method,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Arc<Mutex<Vec<u8>>>,
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Record>>,
    /// Receivers made by `sse_sender()` before a `GET /sse` arrived to take them.
    sse_ready: Mutex<VecDeque<mpsc::UnboundedReceiver<String>>>,
    /// Senders of `GET /sse` streams opened before the test asked for a sender.
    sse_waiting: Mutex<VecDeque<mpsc::UnboundedSender<String>>>,
    connections: AtomicUsize,
    sessions: AtomicUsize,
}

/// A running recording upstream. Dropping it (or [`Upstream::stop`]) shuts the server down.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
}

impl Upstream {
    /// Bind 127.0.0.1:0 and serve.
    pub async fn start() -> Upstream {
        Self::serve(None).await
    }

    /// Like [`Upstream::start`], but `/mcp` and `/health` are the example echo MCP server's
    /// (`examples/echo_upstream`: initialize, tools/list, tools/call answering with the key it
    /// received), so a real MCP client can talk to it; every request is still recorded.
    pub async fn start_mcp() -> Upstream {
        Self::serve(Some(echo::router())).await
    }

    async fn serve(mcp_app: Option<Router>) -> Upstream {
        let inner = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = inner.local_addr().expect("upstream address");
        let shared = Arc::new(Shared::default());
        let app = match mcp_app {
            Some(mcp_app) => mcp_app
                .fallback(other)
                .layer(middleware::from_fn_with_state(shared.clone(), record))
                .with_state(()),
            None => Self::routes(&shared),
        };
        let listener = EchoingListener {
            inner,
            shared: shared.clone(),
        };
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let service = app.into_make_service_with_connect_info::<ConnTag>();
            let _ = axum::serve(listener, service)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Upstream {
            addr,
            shared,
            shutdown: Mutex::new(Some(tx)),
        }
    }

    fn routes(shared: &Arc<Shared>) -> Router {
        Router::new()
            .route("/mcp", post(mcp).fallback(other))
            .route("/health", get(health).fallback(other))
            .route("/sse", get(sse).fallback(other))
            .route("/slow", any(slow))
            .route("/echo-body", any(echo_body))
            .route("/ws", get(websocket).fallback(other))
            .fallback(other)
            .layer(middleware::from_fn_with_state(shared.clone(), record))
            .with_state(shared.clone())
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.shared.requests).iter().map(seen).collect()
    }

    /// The most recent request.
    pub fn last(&self) -> Option<Seen> {
        lock(&self.shared.requests).last().map(seen)
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Forget the recorded requests.
    pub fn clear(&self) {
        lock(&self.shared.requests).clear();
    }

    /// How many TCP connections were accepted (to observe connection reuse).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The sender feeding one `GET /sse` stream: the oldest stream still waiting for its
    /// sender, or else the next stream to open. Each `send(s)` becomes one `data: s` event.
    pub fn sse_sender(&self) -> mpsc::UnboundedSender<String> {
        if let Some(tx) = lock(&self.shared.sse_waiting).pop_front() {
            return tx;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.shared.sse_ready).push_back(rx);
        tx
    }

    /// Stop accepting connections; idle keep-alive connections are closed too.
    pub fn stop(&self) {
        if let Some(tx) = lock(&self.shutdown).take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 section 4.2.2).
pub fn websocket_accept(key: &str) -> String {
    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    STANDARD.encode(sha1(format!("{}{GUID}", key.trim()).as_bytes()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn seen(r: &Record) -> Seen {
    Seen {
        method: r.method.clone(),
        path: r.path.clone(),
        query: r.query.clone(),
        headers: r.headers.clone(),
        body: Bytes::copy_from_slice(&lock(&r.body)),
    }
}

/// Records the request. Bodies are read in full before the handler runs, except for
/// `/echo-body`, whose body is recorded chunk by chunk while it streams through.
async fn record(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let sink = Arc::new(Mutex::new(Vec::new()));
    lock(&s.requests).push(Record {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        body: sink.clone(),
    });
    let body = if parts.uri.path() == "/echo-body" {
        Body::from_stream(body.into_data_stream().inspect(move |chunk| {
            if let Ok(bytes) = chunk {
                lock(&sink).extend_from_slice(bytes);
            }
        }))
    } else {
        match axum::body::to_bytes(body, usize::MAX).await {
            Ok(bytes) => {
                lock(&sink).extend_from_slice(&bytes);
                Body::from(bytes)
            }
            Err(e) => return (StatusCode::BAD_REQUEST, format!("body: {e}")).into_response(),
        }
    };
    next.run(Request::from_parts(parts, body)).await
}

async fn mcp(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        let error = json!({"jsonrpc": "2.0", "id": null,
                           "error": {"code": -32700, "message": "Parse error"}});
        return (StatusCode::BAD_REQUEST, Json(error)).into_response();
    };
    let answer = |m: &Value| {
        let id = m.get("id").filter(|_| m.get("method").is_some())?;
        Some(json!({"jsonrpc": "2.0", "id": id, "result": {"ok": true}}))
    };
    let reply = match &message {
        Value::Array(batch) => {
            let replies: Vec<Value> = batch.iter().filter_map(answer).collect();
            (!replies.is_empty()).then_some(Value::Array(replies))
        }
        single => answer(single),
    };
    let Some(reply) = reply else {
        return StatusCode::ACCEPTED.into_response();
    };
    let mut response = Json(reply).into_response();
    if message.get("method").and_then(Value::as_str) == Some("initialize") {
        let n = s.sessions.fetch_add(1, Ordering::SeqCst) + 1;
        let id = HeaderValue::from_str(&format!("upstream-session-{n}")).expect("ascii");
        response.headers_mut().insert("mcp-session-id", id);
    }
    response
}

async fn health() -> Json<Value> {
    Json(json!({"status": "healthy", "service": "upstream"}))
}

async fn other(method: Method, uri: Uri) -> Json<Value> {
    Json(json!({"path": uri.path(), "method": method.as_str()}))
}

async fn sse(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let rx = lock(&s.sse_ready).pop_front().unwrap_or_else(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&s.sse_waiting).push_back(tx);
        rx
    });
    let events =
        UnboundedReceiverStream::new(rx).map(|s| Ok::<_, Infallible>(Event::default().data(s)));
    Sse::new(events)
}

#[derive(serde::Deserialize)]
struct SlowParams {
    ms: u64,
}

async fn slow(Query(p): Query<SlowParams>) -> Json<Value> {
    tokio::time::sleep(Duration::from_millis(p.ms)).await;
    Json(json!({"slept_ms": p.ms}))
}

async fn echo_body(req: Request) -> Response {
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let mut response = Response::new(req.into_body());
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
}

async fn websocket(ConnectInfo(conn): ConnectInfo<ConnTag>, headers: HeaderMap) -> Response {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let key = headers
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok());
    let (Some(key), true, true) = (
        key,
        has(header::UPGRADE, "websocket"),
        has(header::CONNECTION, "upgrade"),
    ) else {
        return (StatusCode::BAD_REQUEST, "not a websocket handshake").into_response();
    };
    conn.echo_after_upgrade.store(true, Ordering::SeqCst);
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header("sec-websocket-accept", websocket_accept(key))
        .body(Body::empty())
        .expect("valid 101 response")
}

/// Accepts TCP connections and wraps each in [`ConnIo`].
struct EchoingListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

/// Per-connection info handed to handlers: the connection's echo flag.
#[derive(Clone, Debug)]
struct ConnTag {
    echo_after_upgrade: Arc<AtomicBool>,
}

impl Listener for EchoingListener {
    type Io = ConnIo;
    type Addr = ConnTag;

    async fn accept(&mut self) -> (ConnIo, ConnTag) {
        loop {
            match self.inner.accept().await {
                Ok((stream, _peer)) => {
                    self.shared.connections.fetch_add(1, Ordering::SeqCst);
                    let flag = Arc::new(AtomicBool::new(false));
                    let io = ConnIo {
                        stream: Some(stream),
                        echo_after_upgrade: flag.clone(),
                    };
                    let tag = ConnTag {
                        echo_after_upgrade: flag,
                    };
                    return (io, tag);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<ConnTag> {
        self.inner.local_addr()?;
        Ok(ConnTag {
            echo_after_upgrade: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl Connected<IncomingStream<'_, EchoingListener>> for ConnTag {
    fn connect_info(stream: IncomingStream<'_, EchoingListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A TCP stream that, once marked by the `/ws` handler, survives hyper dropping it after the
/// `101` and is handed to [`echo`].
struct ConnIo {
    stream: Option<TcpStream>,
    echo_after_upgrade: Arc<AtomicBool>,
}

impl ConnIo {
    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("stream present until drop"))
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if !self.echo_after_upgrade.load(Ordering::SeqCst) {
            return;
        }
        if let (Some(stream), Ok(rt)) = (self.stream.take(), tokio::runtime::Handle::try_current())
        {
            rt.spawn(echo(stream));
        }
    }
}

/// Echo raw bytes until the peer closes.
async fn echo(stream: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let n = match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        let mut sent = 0;
        while sent < n {
            if stream.writable().await.is_err() {
                return;
            }
            match stream.try_write(&buf[sent..n]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
    }
}

/// SHA-1 (FIPS 180-4), needed only for the WebSocket handshake.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (hi, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hi = hi.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, v) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    out
}
