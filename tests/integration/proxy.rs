//! The proxy itself: streaming, header hygiene, upstream failures, slow clients, h2c.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::clerk::FakeClerk;
use crate::common::keys::{self, SigningKey};
use crate::common::upstream::Upstream;
use crate::common::{clerk_config, client, free_port, rpc, Keygate, Stack, RESOURCE};

struct Env {
    _clerk: FakeClerk,
    upstream: Upstream,
    gw: Keygate,
    token: String,
}

async fn setup_with(extra: &str) -> Env {
    let stack = Stack::start(extra).await;
    Env {
        token: stack.access_token("user_1"),
        _clerk: stack.clerk,
        upstream: stack.upstream,
        gw: stack.gw,
    }
}

/// keygate in front of `upstream` (a URL; `extra` appended to the config), ready: the fake
/// Clerk it trusts (keep it alive) and a valid access token for `user_1`.
async fn gateway_before(upstream: &str, extra: &str) -> (FakeClerk, Keygate, String) {
    let key = SigningKey::rsa_a("kid-a");
    let clerk = FakeClerk::start(vec![key.clone()]).await;
    let gw = Keygate::start(
        &clerk_config(&clerk.url(), clerk.secret_key(), extra),
        upstream,
    )
    .await;
    gw.wait_ready().await;
    let token = key.sign(
        json!({"typ": "at+jwt"}),
        &keys::access_token_claims(&clerk.url(), "user_1", Some(RESOURCE), "twenty:read"),
    );
    (clerk, gw, token)
}

/// Open `GET /sse` through keygate: the upstream's event sender and the 200 response.
async fn open_sse(
    env: &Env,
) -> (
    tokio::sync::mpsc::UnboundedSender<String>,
    reqwest::Response,
) {
    let sender = env.upstream.sse_sender();
    let resp = client()
        .get(env.gw.at("/sse"))
        .bearer_auth(&env.token)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    (sender, resp)
}

/// Read a response stream until `needle` has come through; fails after 5 s without it.
async fn read_until<S, B, E>(stream: &mut S, needle: &str)
where
    S: futures::Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Debug,
{
    let mut got = String::new();
    while !got.contains(needle) {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap_or_else(|_| panic!("{needle} was held back by the proxy"))
            .expect("stream open")
            .expect("chunk");
        got.push_str(&String::from_utf8_lossy(chunk.as_ref()));
    }
}

#[tokio::test]
async fn sse_events_arrive_one_by_one_before_the_next_is_sent() {
    let env = setup_with("").await;
    let (sender, resp) = open_sse(&env).await;
    assert!(resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/event-stream"));
    let mut stream = resp.bytes_stream();
    for i in 0..5 {
        let event = format!("event-{i}");
        sender.send(event.clone()).expect("upstream stream open");
        // The next event is only sent once this one has come through the proxy.
        read_until(&mut stream, &event).await;
    }
}

#[tokio::test]
async fn forwarding_headers_are_set_by_keygate_and_request_id_propagates() {
    let env = setup_with("").await;
    let resp = client()
        .post(env.gw.at("/mcp"))
        .bearer_auth(&env.token)
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-forwarded-host", "evil.example.com")
        .header("x-request-id", "req-abc-123")
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-abc-123");
    let seen = env.upstream.last().expect("forwarded");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    let host = format!("127.0.0.1:{}", env.gw.port);
    assert_eq!(seen.headers["x-forwarded-host"], host.as_str());
    assert_eq!(
        seen.headers["forwarded"],
        format!("for=127.0.0.1;proto=http;host=\"{host}\"").as_str()
    );
    assert_eq!(seen.headers["x-request-id"], "req-abc-123");
    // The upstream sees its own authority as Host.
    assert_eq!(
        seen.headers["host"],
        env.upstream.url().trim_start_matches("http://")
    );

    // Without a client id, keygate makes one and returns it.
    let resp = rpc(env.gw.at("/mcp"), Some(&env.token)).await;
    let rid = resp.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert_eq!(rid.len(), 36);
    assert_eq!(
        env.upstream.last().expect("seen").headers["x-request-id"],
        rid.as_str()
    );
}

#[tokio::test]
async fn a_trusted_proxy_extends_the_chain() {
    let env = setup_with("[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n").await;
    let resp = client()
        .post(env.gw.at("/mcp"))
        .bearer_auth(&env.token)
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let seen = env.upstream.last().expect("forwarded");
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn request_bodies_stream_through_intact() {
    let env = setup_with("").await;
    let body: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let resp = client()
        .post(env.gw.at("/echo-body"))
        .bearer_auth(&env.token)
        .body(body.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.expect("body").as_ref(), body.as_slice());
}

#[tokio::test]
async fn upstream_down_is_a_502_json() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (_clerk, gw, token) = gateway_before(&dead, "").await;
    let resp = rpc(gw.at("/mcp"), Some(&token)).await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "bad_gateway");
}

#[tokio::test]
async fn a_slow_upstream_is_a_504_json_and_post_is_not_retried() {
    let env = setup_with("[upstream]\nread_timeout_secs = 1\n").await;
    let started = Instant::now();
    let resp = rpc(env.gw.at("/slow?ms=3000"), Some(&env.token)).await;
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "gateway_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Give a retry the time it would need to show up, then count.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let slow_posts = env
        .upstream
        .requests()
        .iter()
        .filter(|r| r.path == "/slow")
        .count();
    assert_eq!(slow_posts, 1, "a POST was retried");
}

#[tokio::test]
async fn slow_clients_are_cut_off_at_the_header_deadline() {
    let env = setup_with("[server]\nrequest_header_timeout_secs = 1\n").await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", env.gw.port))
        .await
        .expect("connect");
    conn.write_all(b"GET /mcp HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    // Keep dribbling a header byte by byte, well within Pingora's per-read timeout.
    let mut closed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if conn.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), conn.read(&mut buf)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a client dribbling headers for 4 s was not cut off");
    assert_eq!(env.upstream.count(), 0);
}

#[tokio::test]
async fn a_stream_outlives_the_header_deadline() {
    // The deadline bounds the headers only: a stream whose headers came in time runs on.
    let env = setup_with("[server]\nrequest_header_timeout_secs = 1\n").await;
    let (sender, resp) = open_sse(&env).await;
    let mut stream = resp.bytes_stream();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sender
        .send("after-the-deadline".into())
        .expect("upstream stream open");
    read_until(&mut stream, "after-the-deadline").await;
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let env = setup_with("").await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let resp = h2
        .post(env.gw.at("/mcp"))
        .bearer_auth(&env.token)
        .json(&json!({"jsonrpc": "2.0", "id": 3, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let seen = env.upstream.last().expect("forwarded");
    assert!(seen.headers.get("authorization").is_none());
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    let env = setup_with("").await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", env.gw.port))
        .await
        .expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        env.token
    );
    conn.write_all(req.as_bytes()).await.expect("write");
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    conn.write_all(b"ping-through-keygate")
        .await
        .expect("write");
    let mut echoed = vec![0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(&echoed, b"ping-through-keygate");
    let seen = env.upstream.last().expect("upgrade forwarded");
    assert!(seen.headers.get("authorization").is_none());
}

#[tokio::test]
async fn tls_is_terminated_when_configured() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let env = setup_with(&format!(
        "[server.tls]\ncert_file = \"{dir}/tests/fixtures/tls.crt\"\nkey_file = \"{dir}/tests/fixtures/tls.key\"\n"
    ))
    .await;
    let cert = reqwest::Certificate::from_pem(include_bytes!("../fixtures/tls-ca.crt"))
        .expect("certificate");
    // The certificate names `localhost`; pinned to loopback so the test needs no /etc/hosts.
    let tls_client = reqwest::Client::builder()
        .add_root_certificate(cert)
        .resolve(
            "localhost",
            std::net::SocketAddr::from(([127, 0, 0, 1], env.gw.port)),
        )
        .build()
        .expect("client");
    let resp = tls_client
        .post(format!("https://localhost:{}/mcp", env.gw.port))
        .bearer_auth(&env.token)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("https request");
    assert_eq!(resp.status(), 200);
    let seen = env.upstream.last().expect("forwarded");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    // Plain HTTP on the TLS port is not served.
    assert!(client()
        .get(env.gw.at("/health"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true));
}

#[tokio::test]
async fn dot_segments_cannot_smuggle_a_route() {
    let env = setup_with("").await;
    for target in ["/api/keys/../mcp", "/api/keys/%2E%2e/mcp", "/api%2fkeys"] {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", env.gw.port))
            .await
            .expect("connect");
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            env.token
        );
        conn.write_all(req.as_bytes()).await.expect("write");
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut resp))
            .await
            .expect("answer in time")
            .expect("read");
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 400"), "{target}: {resp}");
    }
    assert_eq!(env.upstream.count(), 0);
}

/// Read one response head (through the blank line) from a raw connection; fails after 5 s.
async fn read_head(conn: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut byte))
            .await
            .expect("a response head in time")
            .expect("read");
        assert_eq!(n, 1, "connection closed mid-head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_lowercase()
}

#[tokio::test]
async fn a_request_head_awaiting_100_continue_reaches_the_upstream_before_its_body() {
    // The head of a request with a body goes upstream at once when the client awaits an
    // interim response (`Expect: 100-continue`): only the upstream can answer it, and the
    // client may send nothing more until it does.
    let env = setup_with("").await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", env.gw.port))
        .await
        .expect("connect");
    let req = format!(
        "POST /echo-body HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
        env.token
    );
    conn.write_all(req.as_bytes()).await.expect("write head");
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.upstream.count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the head was held back until a body the client will not send"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The upstream answers the head: an interim 100, or (as this one does) its final response.
    let mut head = read_head(&mut conn).await;
    if head.starts_with("http/1.1 100") {
        head = read_head(&mut conn).await;
    }
    assert!(head.starts_with("http/1.1 200"), "{head}");
    conn.write_all(b"hello world").await.expect("write body");
    let mut body = Vec::new();
    while !String::from_utf8_lossy(&body).contains("hello world") {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("the echoed body in time")
            .expect("read");
        assert!(n > 0, "closed before the echoed body: {body:?}");
        body.extend_from_slice(&buf[..n]);
    }
    let seen = env.upstream.last().expect("forwarded");
    assert!(seen.headers.get("authorization").is_none());
}

#[tokio::test]
async fn an_upgrade_request_head_with_a_body_reaches_the_upstream_before_its_body() {
    // An upgrade request goes upstream head first even when it declares a body: the upstream
    // may answer 101 from the head alone, and a client may wait for that answer.
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let raw_port = raw.local_addr().expect("addr").port();
    let (head_tx, head_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let (mut up, _) = raw.accept().await.expect("accept");
        let head = read_head(&mut up).await;
        let _ = head_tx.send(head);
        up.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await
            .expect("write 101");
        let mut sink = [0u8; 64];
        while matches!(up.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let (_clerk, gw, token) = gateway_before(&format!("http://127.0.0.1:{raw_port}"), "").await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 4\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.expect("write head");
    let head = tokio::time::timeout(Duration::from_secs(5), head_rx)
        .await
        .expect("the upgrade head was held back until a body the client will not send yet")
        .expect("head");
    assert!(head.starts_with("get /ws http/1.1"), "{head}");
    assert!(!head.contains("authorization"), "{head}");
    let answer = read_head(&mut conn).await;
    assert!(answer.starts_with("http/1.1 101"), "{answer}");
}

/// A TLS terminator in front of `upstream` (the fixture certificate for `localhost`): the
/// port of an `https` upstream that forwards every connection's bytes to the recording one.
async fn tls_in_front_of(upstream: &Upstream) -> u16 {
    use std::sync::Arc;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = env!("CARGO_MANIFEST_DIR");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(format!("{dir}/tests/fixtures/tls.crt"))
            .expect("cert file")
            .collect::<Result<_, _>>()
            .expect("certs");
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/tests/fixtures/tls.key")).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let target = upstream.addr();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn an_https_upstream_gets_requests_with_and_without_bodies() {
    let upstream = Upstream::start().await;
    let port = tls_in_front_of(&upstream).await;
    let (_clerk, gw, token) = gateway_before(
        &format!("https://localhost:{port}"),
        "[upstream]\nverify_tls = false\n",
    )
    .await;
    // Small and large bodies of known length, a chunked body, no body; twice each, so the
    // second goes over a pooled connection.
    for _ in 0..2 {
        for len in [11usize, 100_000] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let resp = client()
                .post(gw.at("/echo-body"))
                .bearer_auth(&token)
                .body(body.clone())
                .send()
                .await
                .expect("request");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.bytes().await.expect("body").as_ref(), body.as_slice());
        }
        let chunks = futures::stream::iter(
            ["chunked ", "body"].map(|c| Ok::<_, std::io::Error>(c.as_bytes().to_vec())),
        );
        let resp = client()
            .post(gw.at("/echo-body"))
            .bearer_auth(&token)
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.expect("body"), "chunked body");
        let resp = client()
            .get(gw.at("/health"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
    }
    let seen = upstream.last().expect("forwarded");
    assert!(seen.headers.get("authorization").is_none());
}
