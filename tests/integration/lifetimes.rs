//! Connection lifetimes, tried as a hostile client would over raw sockets, h2c and TLS h2:
//! every wait is bounded from accept to the last body byte; pipelined requests never hang;
//! a broken certificate stops keygate instead of leaving a dead port behind a ready probe.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{client, free_port, Stack, TempDir};

/// Short deadlines so that each test takes seconds.
const SHORT: &str = "[server]\nrequest_header_timeout_secs = 1\nkeepalive_timeout_secs = 2\n";
const SHORT_BODIES: &str = "[server]\nrequest_header_timeout_secs = 1\nkeepalive_timeout_secs = 2\nbody_timeout_secs = 2\nbody_idle_timeout_secs = 1\nsend_timeout_secs = 2\n";
/// How long past a 1–2 s deadline a test waits before calling the connection hung.
const LIMIT: Duration = Duration::from_secs(5);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect")
}

/// Whether the server closes `conn` within `limit`, discarding whatever it sends first.
async fn closes_within<S: AsyncReadExt + Unpin>(conn: &mut S, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Write `bytes` one at a time, `gap` apart, until the server closes the connection (true) or
/// `limit` passes (false).
async fn dribble_until_closed(conn: &mut TcpStream, bytes: &[u8], gap: Duration) -> bool {
    let until = Instant::now() + LIMIT;
    let mut i = 0;
    let mut buf = [0u8; 1024];
    while Instant::now() < until {
        tokio::select! {
            r = conn.read(&mut buf) => match r {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            },
            _ = tokio::time::sleep(gap) => {
                let b = bytes[i % bytes.len()];
                i += 1;
                if conn.write_all(&[b]).await.is_err() {
                    return true;
                }
            }
        }
    }
    false
}

#[tokio::test]
async fn silent_short_and_dribbling_connections_close_at_the_header_deadline_with_h2c_on() {
    let s = Stack::start(SHORT).await;
    let port = s.gw.port;
    let silent = async {
        let mut c = connect(port).await;
        closes_within(&mut c, LIMIT).await
    };
    let short = async {
        let mut c = connect(port).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost:")
            .await
            .expect("write");
        closes_within(&mut c, LIMIT).await
    };
    let short_preface = async {
        let mut c = connect(port).await;
        c.write_all(&H2_PREFACE[..19]).await.expect("write");
        closes_within(&mut c, LIMIT).await
    };
    let dribble_preface = async {
        let mut c = connect(port).await;
        dribble_until_closed(&mut c, H2_PREFACE, Duration::from_millis(300)).await
    };
    let dribble_head = async {
        let mut c = connect(port).await;
        dribble_until_closed(
            &mut c,
            b"GET /mcp HTTP/1.1\r\nX: ",
            Duration::from_millis(300),
        )
        .await
    };
    let (a, b, c, d, e) = tokio::join!(silent, short, short_preface, dribble_preface, dribble_head);
    assert!(a, "a silent connection stayed open");
    assert!(
        b,
        "a connection with 21 bytes of a request head stayed open"
    );
    assert!(
        c,
        "a connection with 19 bytes of the h2 preface stayed open"
    );
    assert!(d, "a connection dribbling the h2 preface stayed open");
    assert!(e, "a connection dribbling a request head stayed open");
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn a_short_http_1_0_request_is_answered_without_waiting_for_24_bytes() {
    let s = Stack::start(SHORT).await;
    let mut c = connect(s.gw.port).await;
    // 18 bytes: shorter than the h2 preface, and complete.
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("write");
    let mut resp = Vec::new();
    tokio::time::timeout(LIMIT, c.read_to_end(&mut resp))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(
        resp.starts_with(b"HTTP/1."),
        "{}",
        String::from_utf8_lossy(&resp)
    );
}

#[tokio::test]
async fn valid_clients_are_served_during_a_flood_of_silent_connections() {
    let s = Stack::start(SHORT).await;
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(connect(s.gw.port).await);
    }
    let token = s.access_token("user_1");
    let resp = client()
        .post(s.gw.at("/mcp"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("served during the flood");
    assert_eq!(resp.status(), 200);
    let closed = futures::future::join_all(
        flood
            .iter_mut()
            .map(|c| closes_within(c, Duration::from_secs(6))),
    )
    .await;
    assert!(
        closed.iter().all(|c| *c),
        "silent connections outlived the deadline"
    );
}

/// An h2c connection over a raw socket, driven by the `h2` crate; the returned handle ends
/// when the server closes the connection.
async fn h2c(
    port: u16,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = connect(port).await;
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

async fn ends_within(task: tokio::task::JoinHandle<()>, limit: Duration) -> bool {
    tokio::time::timeout(limit, task).await.is_ok()
}

#[tokio::test]
async fn an_h2c_connection_with_settings_and_no_stream_is_closed() {
    let s = Stack::start(SHORT).await;
    let (_send, conn) = h2c(s.gw.port).await;
    assert!(
        ends_within(conn, LIMIT).await,
        "an idle h2c connection stayed open"
    );
}

#[tokio::test]
async fn an_idle_h2c_connection_is_closed_after_the_keepalive_timeout() {
    let s = Stack::start(SHORT).await;
    let (send, conn) = h2c(s.gw.port).await;
    let mut send = send.ready().await.expect("ready");
    let req = http::Request::get(s.gw.at("/health"))
        .body(())
        .expect("request");
    let (resp, _) = send.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(LIMIT, resp)
        .await
        .expect("answered")
        .expect("response");
    assert_eq!(resp.status(), 200);
    // Idle from now on: 2 s of keep-alive allowance, then closed.
    assert!(
        ends_within(conn, Duration::from_secs(6)).await,
        "an idle h2c connection stayed open after its request"
    );
}

#[tokio::test]
async fn an_h2_stream_with_headers_and_no_body_is_ended() {
    let s = Stack::start(SHORT_BODIES).await;
    let token = s.access_token("user_1");
    let (send, _conn) = h2c(s.gw.port).await;
    let mut send = send.ready().await.expect("ready");
    let req = http::Request::post(s.gw.at("/mcp"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(())
        .expect("request");
    // Headers only: the body never comes.
    let (resp, _body) = send.send_request(req, false).expect("send");
    let outcome = tokio::time::timeout(LIMIT, resp).await;
    match outcome {
        Err(_) => panic!("a stream without its body was kept open"),
        Ok(Ok(r)) => assert_ne!(r.status(), 200, "a request without its body was served"),
        Ok(Err(_)) => {}
    }
    assert_eq!(s.upstream.count(), 0);
}

fn tls_config() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    format!(
        "[server]\nrequest_header_timeout_secs = 1\nkeepalive_timeout_secs = 2\n[server.tls]\ncert_file = \"{dir}/tests/fixtures/tls.crt\"\nkey_file = \"{dir}/tests/fixtures/tls.key\"\n"
    )
}

fn tls_connector(alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let pem = include_bytes!("../fixtures/tls-ca.crt");
    let der = pem_to_der(pem);
    roots.add(der.into()).expect("ca");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let text = String::from_utf8_lossy(pem);
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("pem")
}

async fn tls(port: u16, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tls_connector(alpn)
        .connect(name, connect(port).await)
        .await
        .expect("tls handshake")
}

#[tokio::test]
async fn tls_handshakes_and_h2_over_tls_are_bounded_by_the_header_deadline() {
    let s = Stack::start(&tls_config()).await;
    let port = s.gw.port;
    let no_handshake = async {
        let mut c = connect(port).await;
        closes_within(&mut c, LIMIT).await
    };
    let half_hello = async {
        let mut c = connect(port).await;
        // The first bytes of a TLS record header, then nothing.
        c.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
        closes_within(&mut c, LIMIT).await
    };
    let alpn_h2_no_preface = async {
        let mut c = tls(port, &[b"h2"]).await;
        closes_within(&mut c, LIMIT).await
    };
    let h2_no_stream = async {
        let c = tls(port, &[b"h2"]).await;
        let (_send, conn) = h2::client::handshake(c).await.expect("h2 handshake");
        tokio::time::timeout(LIMIT, conn).await.is_ok()
    };
    let h1_silent = async {
        let mut c = tls(port, &[b"http/1.1"]).await;
        closes_within(&mut c, LIMIT).await
    };
    let (a, b, c, d, e) = tokio::join!(
        no_handshake,
        half_hello,
        alpn_h2_no_preface,
        h2_no_stream,
        h1_silent
    );
    assert!(
        a,
        "a connection that never starts the TLS handshake stayed open"
    );
    assert!(b, "a half TLS hello stayed open");
    assert!(c, "TLS with ALPN h2 and no preface stayed open");
    assert!(d, "TLS h2 with SETTINGS and no stream stayed open");
    assert!(e, "TLS HTTP/1.1 with no request stayed open");
    // And a real client is still served over TLS h2.
    let c = tls(port, &[b"h2"]).await;
    let (send, conn) = h2::client::handshake(c).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut send = send.ready().await.expect("ready");
    let req = http::Request::get(format!("https://localhost:{port}/health"))
        .body(())
        .expect("request");
    let (resp, _) = send.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(LIMIT, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn pipelined_requests_get_their_responses_in_order_or_a_close_never_a_hang() {
    // Deadlines far past the test's limit: a hang is not ended by them.
    let s =
        Stack::start("[server]\nrequest_header_timeout_secs = 30\nkeepalive_timeout_secs = 60\n")
            .await;
    let mut c = connect(s.gw.port).await;
    c.write_all(
        b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\nGET /health?second HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await
    .expect("write");
    let mut got = Vec::new();
    let until = Instant::now() + LIMIT;
    let mut buf = [0u8; 4096];
    let mut closed = false;
    while Instant::now() < until {
        let responses = String::from_utf8_lossy(&got)
            .matches("HTTP/1.1 200")
            .count();
        if responses >= 2 {
            break;
        }
        match tokio::time::timeout(until - Instant::now(), c.read(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    let responses = text.matches("HTTP/1.1 200").count();
    assert!(
        responses == 2 || (responses == 1 && closed),
        "pipelined requests hung: {responses} response(s), closed {closed}:\n{text}"
    );
}

/// A token-bearing raw HTTP/1.1 request head with a declared body.
fn post_head(path: &str, token: &str, len: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
}

#[tokio::test]
async fn a_keys_api_body_that_never_comes_is_cut_off() {
    let s = Stack::start(&format!(
        "{SHORT_BODIES}[keys]\nencryption_secret = \"0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeef0f\"\ndata_dir = \"{}\"\n",
        std::env::temp_dir()
            .join(format!("keygate-lifetimes-{}", free_port()))
            .display()
    ))
    .await;
    let token = s.access_token("user_1");
    let mut c = connect(s.gw.port).await;
    c.write_all(post_head("/api/keys", &token, 40).as_bytes())
        .await
        .expect("write");
    c.write_all(b"{\"apiKey\":").await.expect("write");
    assert!(
        closes_within(&mut c, LIMIT).await,
        "a keys API body that never came held the connection"
    );
}

#[tokio::test]
async fn inspected_and_streamed_bodies_that_stall_are_cut_off() {
    let s = Stack::start(SHORT_BODIES).await;
    let token = s.access_token("user_1");
    let port = s.gw.port;
    // An inspected MCP POST that dribbles its body within the idle limit but never ends
    // within the whole-body deadline.
    let mcp = async {
        let mut c = connect(port).await;
        c.write_all(post_head("/mcp", &token, 4000).as_bytes())
            .await
            .expect("write");
        dribble_until_closed(&mut c, b" ", Duration::from_millis(300)).await
    };
    // A streamed proxied body that stops half way.
    let streamed = async {
        let mut c = connect(port).await;
        c.write_all(post_head("/echo-body", &token, 100).as_bytes())
            .await
            .expect("write");
        c.write_all(&[b'x'; 50]).await.expect("write");
        closes_within(&mut c, LIMIT).await
    };
    let (a, b) = tokio::join!(mcp, streamed);
    assert!(a, "an inspected body dribbled past the body deadline");
    assert!(b, "a streamed body that stopped held the connection");
}

/// Read a raw HTTP/1.1 response until the connection closes or its chunked body ends.
async fn read_response(c: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n0\r\n\r\n") {
        let k = tokio::time::timeout(LIMIT, c.read(&mut buf))
            .await
            .expect("answered in time")
            .unwrap_or(0);
        if k == 0 {
            break;
        }
        got.extend_from_slice(&buf[..k]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_streamed_body_that_keeps_coming_is_not_cut_off() {
    let s = Stack::start(SHORT_BODIES).await;
    let token = s.access_token("user_1");
    // 12 bytes over 3.6 s: longer than the whole-body deadline (2 s), each gap (0.3 s) within
    // the idle one (1 s). Over HTTP/1.1 and h2c at once.
    let n = 12;
    let gap = Duration::from_millis(300);
    let h1 = async {
        let mut c = connect(s.gw.port).await;
        c.write_all(post_head("/echo-body", &token, n).as_bytes())
            .await
            .expect("write");
        for _ in 0..n {
            tokio::time::sleep(gap).await;
            c.write_all(b"y").await.expect("still open");
        }
        read_response(&mut c).await
    };
    let h2 = async {
        let (send, _conn) = h2c(s.gw.port).await;
        let mut send = send.ready().await.expect("ready");
        let req = http::Request::post(s.gw.at("/echo-body"))
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .expect("request");
        let (resp, mut body) = send.send_request(req, false).expect("send");
        for i in 0..n {
            tokio::time::sleep(gap).await;
            body.send_data(bytes::Bytes::from_static(b"z"), i + 1 == n)
                .expect("still open");
        }
        let resp = tokio::time::timeout(LIMIT, resp)
            .await
            .expect("answered in time")
            .expect("response");
        let status = resp.status();
        let mut stream = resp.into_body();
        let mut echoed = Vec::new();
        while let Some(chunk) = tokio::time::timeout(LIMIT, stream.data())
            .await
            .expect("body in time")
        {
            let chunk = chunk.expect("body");
            let _ = stream.flow_control().release_capacity(chunk.len());
            echoed.extend_from_slice(&chunk);
        }
        (status, echoed)
    };
    let (text, (status, echoed)) = tokio::join!(h1, h2);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("\r\n0\r\n\r\n"),
        "HTTP/1.1 echo cut short:\n{text}"
    );
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(body.matches('y').count(), n, "{text}");
    assert_eq!(status, 200);
    assert_eq!(echoed, b"z".repeat(n), "h2c echo cut short");
    let bodies: Vec<_> = s.upstream.requests().into_iter().map(|r| r.body).collect();
    assert!(
        bodies.iter().any(|b| b[..] == b"y".repeat(n)[..]),
        "{bodies:?}"
    );
    assert!(
        bodies.iter().any(|b| b[..] == b"z".repeat(n)[..]),
        "{bodies:?}"
    );
}

/// Read exactly `n` bytes, or fail if the connection closes or `limit` passes.
async fn read_n(c: &mut TcpStream, n: usize, limit: Duration) -> Vec<u8> {
    let mut got = vec![0u8; n];
    tokio::time::timeout(limit, c.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("connection open");
    got
}

/// Whether the connection stays open for `period` (whatever it receives meanwhile).
async fn stays_open(c: &mut TcpStream, period: Duration) -> bool {
    !closes_within(c, period).await
}

/// A connection that has sent an HTTP/1.1 `GET path` bearing `token`, plus `headers` (each
/// line ending in CRLF).
async fn send_get(port: u16, path: &str, token: &str, headers: &str) -> TcpStream {
    let mut c = connect(port).await;
    c.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n{headers}\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    c
}

/// Longer than every deadline of `SHORT_BODIES` (1–2 s) put together with a margin.
const QUIET: Duration = Duration::from_millis(4500);

#[tokio::test]
async fn an_idle_websocket_stays_open() {
    let s = Stack::start(SHORT_BODIES).await;
    let token = s.access_token("user_1");
    let mut c = send_get(
        s.gw.port,
        "/ws",
        &token,
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    )
    .await;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.extend(read_n(&mut c, 1, LIMIT).await);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // Idle from the start, then idle again after traffic: neither the body deadlines nor the
    // header or keep-alive ones apply to an upgraded connection.
    assert!(
        stays_open(&mut c, QUIET).await,
        "an idle WebSocket was closed"
    );
    c.write_all(b"first").await.expect("write");
    assert_eq!(read_n(&mut c, 5, LIMIT).await, b"first");
    assert!(
        stays_open(&mut c, QUIET).await,
        "a WebSocket idle after traffic was closed"
    );
    c.write_all(b"second").await.expect("write");
    assert_eq!(read_n(&mut c, 6, LIMIT).await, b"second");
}

#[tokio::test]
async fn a_long_quiet_event_stream_stays_open() {
    let s = Stack::start(SHORT_BODIES).await;
    let token = s.access_token("user_1");
    // HTTP/1.1
    let mut c = send_get(s.gw.port, "/sse", &token, "").await;
    let events = s.upstream.sse_sender();
    events.send("one".into()).expect("stream open");
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("one") {
        got.extend(read_n(&mut c, 1, LIMIT).await);
    }
    // h2c, a GET whose headers end the stream.
    let (send, h2_conn) = h2c(s.gw.port).await;
    let mut send = send.ready().await.expect("ready");
    let req = http::Request::get(s.gw.at("/sse"))
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .expect("request");
    let (resp, _) = send.send_request(req, true).expect("send");
    let h2_events = s.upstream.sse_sender();
    h2_events.send("uno".into()).expect("stream open");
    let resp = tokio::time::timeout(LIMIT, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(LIMIT, body.data())
        .await
        .expect("in time")
        .expect("event")
        .expect("event");
    assert!(String::from_utf8_lossy(&first).contains("uno"));
    // Quiet for longer than every deadline, then the next events still arrive.
    assert!(
        stays_open(&mut c, QUIET).await,
        "a quiet event stream was closed"
    );
    assert!(
        !h2_conn.is_finished(),
        "a quiet h2c event stream was closed"
    );
    events
        .send("two".into())
        .expect("HTTP/1.1 stream still open");
    h2_events.send("dos".into()).expect("h2c stream still open");
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("two") {
        got.extend(read_n(&mut c, 1, LIMIT).await);
    }
    let next = tokio::time::timeout(LIMIT, body.data())
        .await
        .expect("in time")
        .expect("event")
        .expect("event");
    assert!(String::from_utf8_lossy(&next).contains("dos"));
}

#[tokio::test]
async fn a_client_that_never_reads_a_stream_is_disconnected_after_the_send_timeout() {
    let s = Stack::start(SHORT_BODIES).await;
    let token = s.access_token("user_1");
    let sender = s.upstream.sse_sender();
    let mut c = send_get(s.gw.port, "/sse", &token, "").await;
    // The client reads nothing while the upstream keeps sending: once the socket buffers are
    // full, keygate's write waits, then gives up after the send timeout and closes the stream,
    // which the upstream sees as its receiver going away.
    let chunk = "z".repeat(64 * 1024);
    let until = Instant::now() + Duration::from_secs(30);
    let mut gone = false;
    while Instant::now() < until {
        if sender.send(chunk.clone()).is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "a stream nobody reads was held open");
    // The connection to the client is closed, not just the upstream.
    assert!(closes_within(&mut c, Duration::from_secs(60)).await);
}

// ---- ready means serving ----

fn keygate_bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"));
    for var in [
        "KEYGATE_CONFIG",
        "AUTH_ENABLED",
        "CLERK_PUBLISHABLE_KEY",
        "CLERK_SECRET_KEY",
        "MCP_SERVER_URL",
        "API_KEY_ENCRYPTION_SECRET",
        "REDIS_URL",
        "TWENTY_API_KEY",
    ] {
        c.env_remove(var);
    }
    c
}

/// A temporary config directory holding `config/dev.toml` (its `dev/` files by absolute path,
/// its data inside the directory), with `server` added to its `[server]` table and `extra`
/// after it.
fn dev_dir(label: &str, server: &str, extra: &str) -> TempDir {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = TempDir::new(label);
    let dev = std::fs::read_to_string(format!("{root}/config/dev.toml")).expect("dev config");
    let data = format!("data_dir = \"{}\"", dir.join("data").display());
    let dev: Vec<String> = dev
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("data_dir") {
                data.clone()
            } else if l.trim() == "[server]" {
                format!("[server]\n{server}")
            } else {
                l.replace("\"dev/", &format!("\"{root}/config/dev/"))
            }
        })
        .collect();
    std::fs::write(
        dir.join("keygate.toml"),
        format!("{}\n{extra}", dev.join("\n")),
    )
    .expect("config");
    dir
}

/// A config directory holding the dev config plus `[server.tls]` with the given PEM contents.
fn tls_dir(cert: &[u8], key: &[u8]) -> TempDir {
    let dir = dev_dir(
        "tls",
        "",
        "[server.tls]\ncert_file = \"tls.crt\"\nkey_file = \"tls.key\"\n",
    );
    std::fs::write(dir.join("tls.crt"), cert).expect("cert");
    std::fs::write(dir.join("tls.key"), key).expect("key");
    dir
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

fn broken_pairs() -> Vec<(&'static str, Vec<u8>, Vec<u8>, &'static str)> {
    vec![
        (
            "garbage certificate",
            b"not a certificate\n".to_vec(),
            fixture("tls.key"),
            "server.tls.cert_file",
        ),
        (
            "empty key",
            fixture("tls.crt"),
            Vec::new(),
            "server.tls.key_file",
        ),
        (
            "certificate and key swapped",
            fixture("tls.key"),
            fixture("tls.crt"),
            "server.tls.cert_file",
        ),
        (
            "key of another certificate",
            fixture("tls.crt"),
            fixture("rsa-a.pem"),
            "server.tls.key_file",
        ),
    ]
}

#[test]
fn check_config_refuses_broken_certificates_naming_the_option() {
    for (what, cert, key, option) in broken_pairs() {
        let dir = tls_dir(&cert, &key);
        let out = keygate_bin()
            .arg("--config")
            .arg(dir.join("keygate.toml"))
            .arg("check-config")
            .output()
            .expect("run keygate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: check-config passed");
        assert!(
            stderr.contains(option),
            "{what}: {option} not named:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
    // The good pair still passes.
    let dir = tls_dir(&fixture("tls.crt"), &fixture("tls.key"));
    let out = keygate_bin()
        .arg("--config")
        .arg(dir.join("keygate.toml"))
        .arg("check-config")
        .output()
        .expect("run keygate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run the gateway binary until it exits (Some(code)) or `limit` passes (None, then killed).
fn run_until_exit(
    dir: &std::path::Path,
    listen: &str,
    admin: u16,
    limit: Duration,
) -> (Option<i32>, String, bool) {
    let mut child = keygate_bin()
        .arg("--config")
        .arg(dir.join("keygate.toml"))
        .env("KEYGATE_LISTEN", listen)
        .env("KEYGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn keygate");
    let until = Instant::now() + limit;
    let mut ready_seen = false;
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", admin)) {
            use std::io::{Read, Write};
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = c.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut resp = String::new();
            let _ = c.read_to_string(&mut resp);
            ready_seen |= resp.starts_with("HTTP/1.1 200");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    (code, stderr, ready_seen)
}

#[test]
fn a_broken_certificate_stops_keygate_with_a_clear_error_and_never_ready() {
    for (what, cert, key, option) in broken_pairs() {
        let dir = tls_dir(&cert, &key);
        let (code, stderr, ready) = run_until_exit(
            dir.path(),
            &format!("127.0.0.1:{}", free_port()),
            free_port(),
            Duration::from_secs(15),
        );
        assert!(
            code.is_some_and(|c| c != 0),
            "{what}: exit {code:?}\n{stderr}"
        );
        assert!(
            stderr.contains(option),
            "{what}: {option} not named:\n{stderr}"
        );
        assert!(!ready, "{what}: /ready said 200");
    }
}

#[test]
fn a_public_listener_that_cannot_bind_stops_keygate_and_is_never_ready() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tls_dir(&fixture("tls.crt"), &fixture("tls.key"));
    let (code, stderr, ready) =
        run_until_exit(dir.path(), &addr, free_port(), Duration::from_secs(15));
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}\n{stderr}");
    assert!(stderr.contains("server.listen"), "{stderr}");
    assert!(!ready, "/ready said 200 with no public listener");
}

/// The gateway binary on a TLS listener with debug logs for keygate, its stderr collected line
/// by line. Returns the child, the public and admin ports, the lines, and the config directory
/// (the child's data: removed when dropped).
async fn logging_tls_gateway() -> (
    std::process::Child,
    u16,
    u16,
    Arc<std::sync::Mutex<Vec<String>>>,
    TempDir,
) {
    let dir = tls_dir(&fixture("tls.crt"), &fixture("tls.key"));
    let (port, admin) = (free_port(), free_port());
    let mut child = keygate_bin()
        .arg("--config")
        .arg(dir.join("keygate.toml"))
        .env("KEYGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("KEYGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("RUST_LOG", "info,keygate=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn keygate");
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("stderr");
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().expect("lines").push(line);
        }
    });
    wait_ready(admin, &mut child, || {
        format!("{:?}", lines.lock().expect("lines"))
    })
    .await;
    (child, port, admin, lines, dir)
}

#[tokio::test]
async fn failed_handshakes_are_not_logged_as_errors() {
    let (mut child, port, _admin, lines, _dir) = logging_tls_gateway().await;
    let rounds = 10;
    for _ in 0..rounds {
        // Not TLS at all.
        let mut c = connect(port).await;
        c.write_all(b"\x16\x03\x01\x00\x05hello, this is not a ClientHello\r\n\r\n")
            .await
            .expect("write");
        assert!(closes_within(&mut c, LIMIT).await);
        // TLS that chose h2, then no preface.
        let mut c = tls(port, &[b"h2"]).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        c.flush().await.expect("flush");
        assert!(closes_within(&mut c, LIMIT).await);
        // TLS h2: the preface, then a reset instead of reading the server's SETTINGS.
        let mut c = tls(port, &[b"h2"]).await;
        c.write_all(H2_PREFACE).await.expect("write");
        c.flush().await.expect("flush");
        // A zero linger resets the connection on drop (nothing to block on).
        #[allow(deprecated)]
        c.get_ref()
            .0
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(c);
    }
    // Each of these connections ends with one debug line; wait for all of them.
    let closed = || {
        lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.contains("downstream connection closed before a request"))
            .count()
    };
    let until = Instant::now() + Duration::from_secs(10);
    while closed() < 3 * rounds && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = closed();
    let _ = child.kill();
    let _ = child.wait();
    let lines = lines.lock().expect("lines");
    let errors: Vec<_> = lines.iter().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.is_empty(),
        "failed handshakes logged errors: {errors:#?}"
    );
    assert!(
        seen >= 3 * rounds,
        "not every hostile connection was seen closing ({seen}): {lines:#?}"
    );
}

/// Wait (bounded) until the gateway child's admin listener says ready; `log` tells why not.
async fn wait_ready(admin: u16, child: &mut std::process::Child, log: impl Fn() -> String) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = client()
            .get(format!("http://127.0.0.1:{admin}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            return;
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "keygate exited: {}",
            log()
        );
        assert!(Instant::now() < until, "keygate never ready: {}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A token from `keygate dev-token` for the config in `dir`.
fn dev_token(dir: &TempDir) -> String {
    crate::common::dev_token(&dir.join("keygate.toml"), "user_flood", "twenty:read")
}

/// The release binary's real situation: a process limited to 256 descriptors, 300 connections
/// that never send a byte (and some that stop inside the h2c preface). The connections past the
/// limit wait in the kernel's backlog while accept() fails; those accepted are closed at the
/// header deadline, which frees descriptors, and a valid client (queued behind the flood) is
/// served.
#[tokio::test]
async fn valid_clients_are_served_during_a_flood_at_the_descriptor_limit() {
    let upstream = crate::common::upstream::Upstream::start().await;
    let dir = dev_dir(
        "fdlimit",
        "request_header_timeout_secs = 2\nkeepalive_timeout_secs = 2\n",
        "",
    );
    let (port, admin) = (free_port(), free_port());
    let mut child = std::process::Command::new("sh");
    child
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(dir.join("keygate.toml"));
    for var in [
        "KEYGATE_CONFIG",
        "AUTH_ENABLED",
        "CLERK_PUBLISHABLE_KEY",
        "CLERK_SECRET_KEY",
        "MCP_SERVER_URL",
        "API_KEY_ENCRYPTION_SECRET",
        "REDIS_URL",
    ] {
        child.env_remove(var);
    }
    let fallback_key = crate::common::clerk::random_token("fallback_");
    let mut child = KillOnDrop(
        child
            .env("KEYGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("KEYGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("KEYGATE_UPSTREAM", upstream.url())
            .env("TWENTY_API_KEY", &fallback_key)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).expect("stderr file"))
            .spawn()
            .expect("spawn keygate"),
    );
    wait_ready(admin, &mut child.0, || {
        std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
    })
    .await;
    let token = dev_token(&dir);

    let mut flood = Vec::new();
    for i in 0..300 {
        let mut c = connect(port).await;
        if i % 10 == 0 {
            c.write_all(&H2_PREFACE[..19]).await.expect("write");
        }
        flood.push(c);
    }
    let resp = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
        .post(format!("http://127.0.0.1:{port}/mcp"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("a valid client is served during the flood");
    assert_eq!(resp.status(), 200);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1, "the upstream got the valid request");
    let closed = futures::future::join_all(
        flood
            .iter_mut()
            .map(|c| closes_within(c, Duration::from_secs(20))),
    )
    .await;
    assert!(
        closed.iter().all(|c| *c),
        "flood connections outlived the deadline"
    );
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "keygate exited"
    );
    // The flood did reach the limit: accept() failed for want of descriptors.
    let _ = child.0.kill();
    let _ = child.0.wait();
    let stderr = std::fs::read_to_string(dir.join("stderr")).expect("stderr");
    assert!(
        stderr.contains("Too many open files"),
        "the flood never reached the descriptor limit:\n{stderr}"
    );
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP/2 frame header with an empty or 8-byte payload on stream 0.
fn control_frame(kind: u8) -> Vec<u8> {
    let payload = if kind == 6 { 8 } else { 0 };
    let mut f = vec![0, 0, payload, kind, 0, 0, 0, 0, 0];
    f.resize(9 + usize::from(payload), 0);
    f
}

/// Send the preface, then `frames` copies of a control frame as fast as the socket takes them
/// (reading what comes back meanwhile); true when the server closed the connection within
/// `limit` of the flood's start.
async fn control_flood<S>(conn: S, kind: u8, frames: usize, limit: Duration) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(conn);
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut opening = H2_PREFACE.to_vec();
        opening.extend(control_frame(4));
        if wr.write_all(&opening).await.is_err() {
            return;
        }
        let chunk = control_frame(kind).repeat(4096);
        let mut sent = 0;
        while sent < frames {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
            sent += 4096;
        }
        // Keep the write side open: a closed half would end the connection by itself.
        std::future::pending::<()>().await;
    });
    let closed = closes_within(&mut rd, limit.saturating_sub(started.elapsed())).await;
    writer.abort();
    closed
}

const FLOOD_CONFIG: &str =
    "[server]\nrequest_header_timeout_secs = 10\nkeepalive_timeout_secs = 30\n";

/// A flood of SETTINGS or PING frames (each asks for an acknowledgement) is cut off: the
/// connection is closed long before any idle or header deadline would close it, over h2c and
/// TLS h2, and counted; a client that pings within the budget is still served.
#[tokio::test]
async fn http2_control_frame_floods_are_cut_off() {
    let s = Stack::start(FLOOD_CONFIG).await;
    let before =
        s.gw.metric("keygate_h2_control_floods_total")
            .await
            .unwrap_or(0.0);
    for (kind, name) in [(6u8, "PING"), (4u8, "SETTINGS")] {
        let c = connect(s.gw.port).await;
        assert!(
            control_flood(c, kind, 200_000, LIMIT).await,
            "an h2c {name} flood was not cut off"
        );
    }
    let after =
        s.gw.metric("keygate_h2_control_floods_total")
            .await
            .unwrap_or(0.0);
    assert!(
        after >= before + 2.0,
        "floods not counted: {before} -> {after}"
    );

    // Within the budget: pings answered, then a request served on the same connection.
    let (mut send, mut conn) = {
        let tcp = connect(s.gw.port).await;
        h2::client::handshake(tcp).await.expect("h2 handshake")
    };
    let mut pings = conn.ping_pong().expect("ping_pong");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    for _ in 0..300 {
        tokio::time::timeout(LIMIT, pings.ping(h2::Ping::opaque()))
            .await
            .expect("pong in time")
            .expect("pong");
    }
    send = send.ready().await.expect("ready");
    let req = http::Request::get(format!("http://127.0.0.1:{}/health", s.gw.port))
        .body(())
        .expect("request");
    let (resp, _) = send.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(LIMIT, resp)
        .await
        .expect("in time")
        .expect("response");
    assert!(resp.status().as_u16() < 500, "{}", resp.status());
    driver.abort();

    // The same over TLS h2.
    let dir = env!("CARGO_MANIFEST_DIR");
    let tls_stack = Stack::start(&format!(
        "{FLOOD_CONFIG}[server.tls]\ncert_file = \"{dir}/tests/fixtures/tls.crt\"\nkey_file = \"{dir}/tests/fixtures/tls.key\"\n"
    ))
    .await;
    let c = tls(tls_stack.gw.port, &[b"h2"]).await;
    assert!(
        control_flood(c, 6, 200_000, LIMIT).await,
        "a TLS h2 PING flood was not cut off"
    );
}

/// Two POSTs with bodies of `sizes`, written back to back on one connection in `piece`-byte
/// writes while the responses are read; returns how many responses began.
async fn pipelined_posts<S>(conn: S, token: &str, sizes: [usize; 2], piece: usize) -> usize
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut bytes = Vec::new();
    for (n, len) in sizes.into_iter().enumerate() {
        bytes.extend_from_slice(post_head(&format!("/upload/{n}"), token, len).as_bytes());
        bytes.extend((0..len).map(|i| (i % 251) as u8));
    }
    let (mut rx, mut tx) = tokio::io::split(conn);
    let write = async move {
        for part in bytes.chunks(piece) {
            tx.write_all(part).await.expect("write");
        }
        tx
    };
    let read = async {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let until = Instant::now() + LIMIT;
        while count_heads(&got) < 2 && Instant::now() < until {
            match tokio::time::timeout(until - Instant::now(), rx.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        got
    };
    let (_tx, got) = tokio::join!(write, read);
    count_heads(&got)
}

fn count_heads(got: &[u8]) -> usize {
    String::from_utf8_lossy(got)
        .matches("HTTP/1.1 200 ")
        .count()
}

#[tokio::test]
async fn bodies_reach_the_upstream_whole_however_the_client_splits_them_in_clear_and_over_tls() {
    // Bodies larger than any read buffer, followed by a second request in the same bytes: the
    // listener's buffering must neither lose, reorder nor hold back a byte.
    let sizes = [200_000, 70_001];
    for tls_on in [false, true] {
        let s = Stack::start(if tls_on { tls_config() } else { String::new() }.as_str()).await;
        let token = s.access_token("user_1");
        for piece in [usize::MAX, 65_536, 16_385, 1_000] {
            let before = s.upstream.count();
            let answered = if tls_on {
                pipelined_posts(tls(s.gw.port, &[b"http/1.1"]).await, &token, sizes, piece).await
            } else {
                pipelined_posts(connect(s.gw.port).await, &token, sizes, piece).await
            };
            assert_eq!(answered, 2, "tls {tls_on}, {piece}-byte writes: responses");
            let seen = s.upstream.requests();
            assert_eq!(seen.len(), before + 2, "tls {tls_on}, {piece}-byte writes");
            for (n, len) in sizes.into_iter().enumerate() {
                let got = &seen[before + n];
                assert_eq!(got.path, format!("/upload/{n}"));
                let want: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                assert!(
                    got.body == want,
                    "tls {tls_on}, {piece}-byte writes: body {n} arrived as {} bytes, not {len} intact",
                    got.body.len()
                );
            }
        }
    }
}
