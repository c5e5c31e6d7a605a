//! The ladder's load generator (HTTP/1.1 keep-alive, one thread). Every request carries the
//! next token of a pool of distinct users, so a proxy that caches verified tokens sees the
//! realistic mix rather than one hot token.
//!
//! Commands: see [`USAGE`], which a bad command line prints.
//!
//! Requests are MCP `tools/call` POSTs (JSON-RPC body, `MCP-Protocol-Version`) unless the URL
//! asks for SSE. Latency is measured from the moment a request is handed to the connection to
//! the last byte of its response.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_companies","arguments":{"limit":10}}}"#;

/// The command line, printed with any error in it.
const USAGE: &str = "\
usage:
  loadgen mint <keygate config> <count> <out file>      tokens for users user-0000..; one per line
  loadgen put-keys <base url> <tokens file>             POST /api/keys for every token's user
  loadgen closed <url> <tokens> <connections> <secs>    saturation: JSON summary on stdout
  loadgen rate <url> <tokens> <rate/s> <connections> <secs>   fixed rate: latency percentiles
  loadgen sse-idle <url> <tokens> <streams> <hold secs> open idle SSE streams, print READY, hold
  loadgen sse-latency <url> <tokens> <streams> <events> time from upstream send to client receipt
";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("missing argument {i}\n{USAGE}"))
    };
    let num = |i: usize| -> anyhow::Result<u64> {
        arg(i)?
            .parse::<u64>()
            .with_context(|| format!("argument {i} must be a number"))
    };
    match arg(0)? {
        "mint" => mint(Path::new(arg(1)?), num(2)? as usize, Path::new(arg(3)?)),
        "put-keys" => rt.block_on(put_keys(arg(1)?, &tokens(arg(2)?)?)),
        "closed" => {
            let target = Target::new(arg(1)?, tokens(arg(2)?)?)?;
            rt.block_on(closed(target, num(3)? as usize, secs(num(4)?)))
        }
        "rate" => {
            let target = Target::new(arg(1)?, tokens(arg(2)?)?)?;
            rt.block_on(rate(target, num(3)?, num(4)? as usize, secs(num(5)?)))
        }
        "sse-idle" => {
            let target = Target::new(arg(1)?, tokens(arg(2)?)?)?;
            rt.block_on(sse_idle(target, num(3)? as usize, secs(num(4)?)))
        }
        "sse-latency" => {
            let target = Target::new(arg(1)?, tokens(arg(2)?)?)?;
            rt.block_on(sse_latency(target, num(3)? as usize, num(4)? as usize))
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn tokens(path: &str) -> anyhow::Result<Vec<HeaderValue>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|t| HeaderValue::from_str(&format!("Bearer {}", t.trim())).context("token header"))
        .collect()
}

/// Sign `count` access tokens (distinct users) with the `[dev]` key of a keygate config.
fn mint(config: &Path, count: usize, out: &Path) -> anyhow::Result<()> {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let settings = keygate::config::load(Some(config), &env)
        .map_err(|p| anyhow::anyhow!("config {}: {p}", config.display()))?;
    let mut lines = String::new();
    for i in 0..count {
        let token = keygate::devtoken::mint(
            &settings,
            &keygate::devtoken::DevTokenRequest {
                subject: format!("user-{i:04}"),
                scopes: vec!["twenty:read".into(), "twenty:write".into()],
                ttl_secs: 6 * 3600,
                org: None,
            },
        )?;
        lines.push_str(&token);
        lines.push('\n');
    }
    std::fs::write(out, lines).with_context(|| format!("writing {}", out.display()))
}

/// Where requests go and what they carry.
#[derive(Clone)]
struct Target {
    addr: String,
    uri: Uri,
    host: HeaderValue,
    sse: bool,
    tokens: Arc<Vec<HeaderValue>>,
    next: Arc<AtomicUsize>,
}

impl Target {
    fn new(url: &str, tokens: Vec<HeaderValue>) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().context("url")?;
        let authority = uri.authority().context("url needs host:port")?.clone();
        if tokens.is_empty() {
            bail!("the tokens file is empty");
        }
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        Ok(Self {
            addr: authority.as_str().to_string(),
            sse: path.contains("interval_ms") || path.contains("sse"),
            uri: path.parse()?,
            host: HeaderValue::from_str(authority.as_str())?,
            tokens: Arc::new(tokens),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn token(&self) -> HeaderValue {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.tokens.len();
        self.tokens[i].clone()
    }

    fn request(&self) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut b = Request::builder()
            .uri(self.uri.clone())
            .header(http::header::HOST, self.host.clone())
            .header(http::header::AUTHORIZATION, self.token());
        let body = if self.sse {
            b = b
                .method(Method::GET)
                .header(http::header::ACCEPT, "text/event-stream");
            Bytes::new()
        } else {
            b = b
                .method(Method::POST)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::ACCEPT, "application/json, text/event-stream")
                .header("mcp-protocol-version", "2025-06-18");
            Bytes::from_static(CALL)
        };
        Ok(b.body(Full::new(body))?)
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    non_2xx: AtomicU64,
    errors: AtomicU64,
}

/// Send one request on `sender` (reconnecting when the connection died) and wait for the whole
/// response. Returns whether it was a 2xx.
async fn one(
    target: &Target,
    sender: &mut Option<SendRequest<Full<Bytes>>>,
) -> anyhow::Result<bool> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = Some(target.connect().await?);
    }
    let s = sender.as_mut().context("connected")?;
    s.ready().await?;
    let resp = s.send_request(target.request()?).await?;
    let ok = resp.status().is_success();
    resp.into_body().collect().await?;
    Ok(ok)
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

fn summary(h: &Histogram<u64>, counts: &Counts, elapsed: Duration) -> serde_json::Value {
    let ok = counts.ok.load(Ordering::Relaxed);
    let non_2xx = counts.non_2xx.load(Ordering::Relaxed);
    serde_json::json!({
        "requests": ok + non_2xx,
        "ok": ok,
        "non_2xx": non_2xx,
        "errors": counts.errors.load(Ordering::Relaxed),
        "seconds": elapsed.as_secs_f64(),
        "rps": (ok + non_2xx) as f64 / elapsed.as_secs_f64(),
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "max_us": h.max(),
    })
}

/// Closed loop: `connections` workers, each sending its next request as soon as the previous
/// answered, for `duration`.
async fn closed(target: Target, connections: usize, duration: Duration) -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    let start = Instant::now();
    let end = start + duration;
    let mut workers = Vec::new();
    for _ in 0..connections {
        let target = target.clone();
        let counts = counts.clone();
        workers.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let mut sender = None;
            while Instant::now() < end {
                timed(&target, &mut sender, &counts, &mut h).await;
            }
            anyhow::Ok(h)
        }));
    }
    let all = merged(workers).await?;
    println!("{}", summary(&all, &counts, start.elapsed()));
    Ok(())
}

/// One request, counted and (when answered) timed into `h`; a failed connection is dropped so
/// the next request opens a new one.
async fn timed(
    target: &Target,
    sender: &mut Option<SendRequest<Full<Bytes>>>,
    counts: &Counts,
    h: &mut Histogram<u64>,
) {
    let t0 = Instant::now();
    match one(target, sender).await {
        Ok(ok) => {
            let field = if ok { &counts.ok } else { &counts.non_2xx };
            field.fetch_add(1, Ordering::Relaxed);
            h.saturating_record(t0.elapsed().as_micros() as u64);
        }
        Err(_) => {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            *sender = None;
        }
    }
}

/// The workers' histograms, merged once they have all finished.
async fn merged(
    workers: Vec<tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>>,
) -> anyhow::Result<Histogram<u64>> {
    let mut all = histogram()?;
    for w in workers {
        all.add(w.await??)?;
    }
    Ok(all)
}

/// Open loop at a fixed rate: worker `i` of `connections` sends at `start + (i + k·C)/rate`.
/// A worker that falls behind sends at once; the achieved rate shows it.
async fn rate(
    target: Target,
    per_sec: u64,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    let gap = Duration::from_secs_f64(connections as f64 / per_sec as f64);
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + duration;
    let mut workers = Vec::new();
    for i in 0..connections {
        let target = target.clone();
        let counts = counts.clone();
        workers.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let mut sender = Some(target.connect().await?);
            let mut at = start + Duration::from_secs_f64(i as f64 / per_sec as f64);
            while at < end {
                tokio::time::sleep_until(at.into()).await;
                timed(&target, &mut sender, &counts, &mut h).await;
                at += gap;
            }
            anyhow::Ok(h)
        }));
    }
    let all = merged(workers).await?;
    let mut out = summary(&all, &counts, duration);
    out["target_rps"] = serde_json::json!(per_sec);
    println!("{out}");
    Ok(())
}

/// Open `streams` SSE streams, wait for each one's first event, print `READY {…}`, and hold
/// them open (idle) for `hold`.
async fn sse_idle(target: Target, streams: usize, hold: Duration) -> anyhow::Result<()> {
    let mut open = Vec::with_capacity(streams);
    let mut failed = 0usize;
    let t0 = Instant::now();
    for _ in 0..streams {
        match open_stream(&target).await {
            Ok((sender, mut body)) => {
                // The first event proves the stream is established end to end.
                match tokio::time::timeout(secs(10), body.frame()).await {
                    Ok(Some(Ok(_))) => open.push((sender, body)),
                    _ => failed += 1,
                }
            }
            Err(_) => failed += 1,
        }
    }
    println!(
        "READY {}",
        serde_json::json!({"open": open.len(), "failed": failed, "seconds": t0.elapsed().as_secs_f64()})
    );
    tokio::time::sleep(hold).await;
    drop(open);
    Ok(())
}

async fn open_stream(
    target: &Target,
) -> anyhow::Result<(SendRequest<Full<Bytes>>, hyper::body::Incoming)> {
    let mut sender = target.connect().await?;
    let resp = sender.send_request(target.request()?).await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    Ok((sender, resp.into_body()))
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Open `streams` SSE streams whose upstream stamps each event with its send time, read
/// `events` events from each, and report how long events took to arrive.
async fn sse_latency(target: Target, streams: usize, events: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let (_sender, mut body) = open_stream(&target).await?;
            let mut buf = Vec::new();
            let mut seen = 0usize;
            while seen < events {
                let frame = tokio::time::timeout(secs(10), body.frame())
                    .await
                    .context("no event within 10 s")?
                    .context("stream ended")??;
                let received = now_ns();
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                    let event: Vec<u8> = buf.drain(..end + 2).collect();
                    let text = String::from_utf8_lossy(&event);
                    if let Some(sent) = text
                        .lines()
                        .find_map(|l| l.strip_prefix("data: "))
                        .and_then(|n| n.trim().parse::<u128>().ok())
                    {
                        let micros = received.saturating_sub(sent) / 1000;
                        h.saturating_record(micros as u64);
                        seen += 1;
                    }
                }
            }
            anyhow::Ok(h)
        }));
    }
    let all = merged(tasks).await?;
    println!(
        "{}",
        serde_json::json!({
            "events": all.len(),
            "p50_us": all.value_at_quantile(0.5),
            "p99_us": all.value_at_quantile(0.99),
            "max_us": all.max(),
        })
    );
    Ok(())
}

/// Store an API key for every token's user through keygate's `/api/keys`.
async fn put_keys(base: &str, tokens: &[HeaderValue]) -> anyhow::Result<()> {
    let target = Target::new(
        &format!("{}/api/keys", base.trim_end_matches('/')),
        tokens.to_vec(),
    )?;
    let mut sender = target.connect().await?;
    for (i, token) in tokens.iter().enumerate() {
        let body = format!(r#"{{"apiKey":"tw_bench_key_{i:04}"}}"#);
        let req = Request::builder()
            .method(Method::POST)
            .uri(target.uri.clone())
            .header(http::header::HOST, target.host.clone())
            .header(http::header::AUTHORIZATION, token.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        if sender.is_closed() {
            sender = target.connect().await?;
        }
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "POST /api/keys for token {i}: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    eprintln!("stored {} keys", tokens.len());
    Ok(())
}
