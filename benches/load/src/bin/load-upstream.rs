//! The ladder's upstream: as close to free as an HTTP/1.1 server gets, so that what the ladder
//! measures is the proxy in front of it.
//!
//! - any request: `200` with a small JSON-RPC result (`Content-Length`), after reading the body;
//! - `GET` with `Accept: text/event-stream`: an SSE stream. `?interval_ms=N` sends an event every
//!   N ms whose data is the send time (ns since the Unix epoch); without it, one `ready` event and
//!   then silence until the client goes away (the idle-stream test);
//! - a request carrying `x-bench-record: 1` has its method, target and headers kept, and
//!   `GET /__last` returns them as JSON (the ladder's check that each candidate does its job).
//!
//! Usage: `load-upstream <listen addr>`; one thread.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

const RESULT: &[u8] =
    br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"ok"}]}}"#;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(addr))
}

async fn serve(addr: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let last: Arc<Mutex<serde_json::Value>> = Arc::new(Mutex::new(serde_json::Value::Null));
    eprintln!("load-upstream listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let last = last.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, last.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    last: Arc<Mutex<serde_json::Value>>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/__last" {
        let seen = last.lock().map(|v| v.clone()).unwrap_or_default();
        return Ok(json(seen.to_string().into_bytes()));
    }
    if req.headers().get("x-bench-record").is_some() {
        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                )
            })
            .collect();
        if let Ok(mut l) = last.lock() {
            *l = serde_json::json!({
                "method": req.method().as_str(),
                "target": req.uri().to_string(),
                "headers": headers,
            });
        }
    }
    let wants_sse = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if req.method() == http::Method::GET && wants_sse {
        let interval = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("interval_ms=")))
            .and_then(|n| n.parse::<u64>().ok());
        return Ok(sse(interval));
    }
    // Read (and drop) the request body, as a real server would.
    let _ = req.into_body().collect().await;
    Ok(json(RESULT.to_vec()))
}

fn json(body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn sse(interval_ms: Option<u64>) -> Response<Body> {
    let stream = futures::stream::unfold(0u64, move |n| async move {
        let data = match interval_ms {
            Some(ms) => {
                if n > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                format!("data: {}\n\n", now_ns())
            }
            None if n == 0 => "event: ready\ndata: {}\n\n".to_string(),
            None => {
                // Idle: never send again; the client closes the stream.
                std::future::pending::<()>().await;
                unreachable!("pending never completes")
            }
        };
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(data))), n + 1))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    resp
}
