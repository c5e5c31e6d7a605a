//! Request-path conformance: the client IP behind trusted proxies, `Host` and single-valued
//! MCP headers, NumericDate claims, `Retry-After`, accepted protocol versions, and quiet
//! downstream disconnects. Requests that HTTP clients refuse to build go over raw sockets.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::keys;
use crate::common::{clerk_config, client, free_port, Stack, RESOURCE};

const PING: &str = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;

/// POST a `ping` to `/mcp` with `token`, adding `headers` (repeated names become repeated
/// field lines).
async fn ping_with(s: &Stack, token: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client()
        .post(s.gw.at("/mcp"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(PING);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.expect("request")
}

/// Send `head` (request line and header lines, without the blank line) plus a `ping` body
/// over a fresh connection; the status code keygate answered, or `None` if it closed the
/// connection without a response.
async fn raw_status(s: &Stack, head: &str) -> Option<u16> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", s.gw.port))
        .await
        .expect("connect");
    let req = format!(
        "{head}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PING}",
        PING.len()
    );
    conn.write_all(req.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "no answer to {head:?}");
    let text = String::from_utf8_lossy(&got);
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok();
    status
}

#[tokio::test]
async fn the_client_ip_is_the_hop_the_trusted_proxy_vouches_for() {
    let s = Stack::start(
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [[rate_limits.rules]]\nname = \"edge\"\nper = \"ip\"\nrequests = 1\nperiod_secs = 3600\nburst = 1\n",
    )
    .await;
    let token = s.access_token("user_ip");
    // The client writes its own line; the trusted proxy appends a separate one (HAProxy's
    // `option forwardfor`). The budget is the proxy-appended address's.
    let first = ping_with(
        &s,
        &token,
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "203.0.113.7"),
        ],
    )
    .await;
    assert_eq!(first.status(), 200);
    let seen = s.upstream.last().expect("forwarded");
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("6.6.6.6, 203.0.113.7, 127.0.0.1")
    );
    let claimed_elsewhere = ping_with(
        &s,
        &token,
        &[
            ("x-forwarded-for", "7.7.7.7"),
            ("x-forwarded-for", "203.0.113.7"),
        ],
    )
    .await;
    assert_eq!(claimed_elsewhere.status(), 429, "the client chose its IP");
    // The same client written as an IPv4-mapped address, with a port: still the same budget.
    let mapped = ping_with(
        &s,
        &token,
        &[("x-forwarded-for", "[::ffff:203.0.113.7]:4711")],
    )
    .await;
    assert_eq!(mapped.status(), 429);
    // Another client behind the proxy has its own budget.
    let other = ping_with(&s, &token, &[("x-forwarded-for", "203.0.113.8:80")]).await;
    assert_eq!(other.status(), 200);

    // An unreadable right-most hop is not skipped: the proxy itself is then the client.
    let unreadable = ping_with(
        &s,
        &token,
        &[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "unknown"),
        ],
    )
    .await;
    assert_eq!(unreadable.status(), 200);
    let unreadable_again = ping_with(
        &s,
        &token,
        &[
            ("x-forwarded-for", "198.51.100.2"),
            ("x-forwarded-for", "[2001:db8::x]"),
        ],
    )
    .await;
    assert_eq!(
        unreadable_again.status(),
        429,
        "a client-written hop was used"
    );
    assert_eq!(s.upstream.count(), 3);
}

#[tokio::test]
async fn requests_without_one_valid_host_are_refused() {
    let s = Stack::start("").await;
    let token = s.access_token("user_host");
    let auth = format!("POST /mcp HTTP/1.1\r\nAuthorization: Bearer {token}");
    for hosts in [
        "",
        "\r\nHost: a b",
        "\r\nHost: ",
        "\r\nHost: host:80:x",
        "\r\nHost: exa\tmple.com",
        "\r\nHost: example.com\r\nHost: example.com",
        "\r\nHost: example.com\r\nHost: other.example",
        "\r\nHost: ex\"ample.com",
        "\r\nHost: example.com/path",
        "\r\nHost: user@example.com",
        "\r\nHost: [::1",
        "\r\nHost: [not-v6]:80",
        "\r\nHost: example.com:8o",
    ] {
        let status = raw_status(&s, &format!("{auth}{hosts}")).await;
        assert_eq!(status, Some(400), "{hosts:?}");
    }
    assert_eq!(
        s.upstream.count(),
        0,
        "a request without a valid Host was forwarded"
    );

    for host in [
        "localhost",
        "example.com:8080",
        "127.0.0.1:80",
        "[::1]:443",
        "[2001:db8::1]",
        "xn--bcher-kva.example",
        "a-b_c~d.%41!$&'()*+,;=",
    ] {
        let status = raw_status(&s, &format!("{auth}\r\nHost: {host}")).await;
        assert_eq!(status, Some(200), "{host:?}");
        let seen = s.upstream.last().expect("forwarded");
        assert_eq!(seen.header("x-forwarded-host"), Some(host));
    }
    // HTTP/1.0 has no Host requirement.
    let status = raw_status(
        &s,
        &format!("POST /mcp HTTP/1.0\r\nAuthorization: Bearer {token}"),
    )
    .await;
    assert_eq!(status, Some(200));
}

#[tokio::test]
async fn repeated_single_valued_mcp_headers_are_refused() {
    let s = Stack::start("").await;
    let token = s.access_token("user_dup");
    let head = format!("POST /mcp HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}");
    for (name, a, b) in [
        ("Mcp-Session-Id", "sess-a", "sess-b"),
        ("Mcp-Session-Id", "sess-a", "sess-a"),
        ("MCP-Protocol-Version", "2025-06-18", "2025-03-26"),
        ("Mcp-Method", "ping", "ping"),
        ("Mcp-Name", "x", "y"),
    ] {
        let status = raw_status(&s, &format!("{head}\r\n{name}: {a}\r\n{name}: {b}")).await;
        assert_eq!(status, Some(400), "two {name}");
    }
    assert_eq!(
        s.upstream.count(),
        0,
        "a request with a repeated MCP header was forwarded"
    );
    // One of each is fine.
    let status = raw_status(
        &s,
        &format!("{head}\r\nMcp-Session-Id: sess-a\r\nMCP-Protocol-Version: 2025-06-18"),
    )
    .await;
    assert_eq!(status, Some(200));
}

#[tokio::test]
async fn numeric_dates_may_be_fractional() {
    let s = Stack::start("").await;
    let now = keys::now() as f64;
    let token = |edit: &dyn Fn(&mut Value)| {
        let mut claims =
            keys::access_token_claims(&s.clerk.url(), "user_nd", Some(RESOURCE), "twenty:read");
        edit(&mut claims);
        s.key.sign(json!({"typ": "at+jwt"}), &claims)
    };
    let status = |t: String| {
        let s = &s;
        async move { ping_with(s, &t, &[]).await.status().as_u16() }
    };
    assert_eq!(
        status(token(&|c| {
            c["exp"] = json!(now + 600.5);
            c["iat"] = json!(now - 0.25);
            c["nbf"] = json!(now - 1.5);
        }))
        .await,
        200
    );
    assert_eq!(status(token(&|c| c["exp"] = json!(now - 10.5))).await, 401);
    assert_eq!(status(token(&|c| c["nbf"] = json!(now + 600.5))).await, 401);
    for bad in [
        json!("9999999999"),
        json!(null),
        json!([now + 600.0]),
        json!(true),
    ] {
        assert_eq!(
            status(token(&|c| c["exp"] = bad.clone())).await,
            401,
            "exp {bad}"
        );
        assert_eq!(
            status(token(&|c| c["nbf"] = bad.clone())).await,
            401,
            "nbf {bad}"
        );
        assert_eq!(
            status(token(&|c| c["iat"] = bad.clone())).await,
            401,
            "iat {bad}"
        );
    }
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn a_client_that_waits_retry_after_is_served() {
    // One request every 1.5 s: the second one is refused for a fraction over a second.
    let s = Stack::start(
        "[[rate_limits.rules]]\nname = \"slow\"\nper = \"user\"\nrequests = 2\nperiod_secs = 3\nburst = 1\npaths = [\"/mcp\"]\n",
    )
    .await;
    let token = s.access_token("user_retry");
    assert_eq!(ping_with(&s, &token, &[]).await.status(), 200);
    let refused = ping_with(&s, &token, &[]).await;
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds");
    assert_eq!(wait, 2, "1.5 s minus a moment, rounded up");
    // Waiting exactly what the client was told (the documented contract, not a guess).
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(ping_with(&s, &token, &[]).await.status(), 200);
}

#[tokio::test]
async fn every_protocol_version_the_official_sdks_send_is_accepted_by_default() {
    let s = Stack::start("").await;
    let token = s.access_token("user_versions");
    // The TypeScript SDK's SUPPORTED_PROTOCOL_VERSIONS, and the 2026-07-28 revision.
    for version in [
        "2024-10-07",
        "2024-11-05",
        "2025-03-26",
        "2025-06-18",
        "2025-11-25",
        "2026-07-28",
    ] {
        let resp = ping_with(&s, &token, &[("mcp-protocol-version", version)]).await;
        assert_eq!(resp.status(), 200, "{version}");
    }
    let resp = ping_with(&s, &token, &[("mcp-protocol-version", "2023-01-01")]).await;
    assert_eq!(resp.status(), 400);
}

/// The value of an unlabelled series in a Prometheus text page.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn a_client_leaving_a_stream_is_not_an_error() {
    // The real binary, so its log lines can be read.
    let s = Stack::start("").await;
    let cfg = std::env::temp_dir().join(format!("keygate-conformance-{}.toml", free_port()));
    let toml = clerk_config(
        &s.clerk.url(),
        s.clerk.secret_key(),
        "[server]\ngrace_period_secs = 1\nshutdown_timeout_secs = 1\nthreads = 1\n",
    );
    std::fs::write(&cfg, toml).expect("config");
    let (port, admin) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(&cfg)
        .env("KEYGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("KEYGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("KEYGATE_UPSTREAM", s.upstream.url())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keygate");
    let metrics = || async {
        client()
            .get(format!("http://127.0.0.1:{admin}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client()
            .get(format!("http://127.0.0.1:{admin}/ready"))
            .send()
            .await
        {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "keygate never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let sender = s.upstream.sse_sender();
    let resp = client()
        .get(format!("http://127.0.0.1:{port}/sse"))
        .bearer_auth(s.access_token("user_sse"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    sender.send("first".into()).expect("stream open");
    let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the first event arrives")
        .expect("stream open")
        .expect("chunk");
    assert!(String::from_utf8_lossy(&chunk).contains("first"));
    // The client goes away; keygate notices when it next reads or writes.
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = sender.send("more".into());
        let text = metrics().await.unwrap_or_default();
        let open = metric(&text, "keygate_sse_streams_open");
        let done = metric(&text, "keygate_downstream_disconnects_total").unwrap_or(0.0);
        if open == Some(0.0) && done >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the disconnect was never counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "keygate did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut logs = String::new();
    for pipe in [
        child.stderr.take().map(|p| Box::new(p) as Box<dyn Read>),
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut pipe = pipe;
        pipe.read_to_string(&mut logs).expect("read logs");
    }
    assert!(logs.contains("keygate::access"), "no access log:\n{logs}");
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "a disconnect logged errors: {errors:#?}");
}
