//! Operations: metrics that reflect traffic, logs and metrics free of secrets (through the real
//! binary), audit events, and a graceful drain that loses no request another replica could take.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::common::clerk::OpaqueSpec;
use crate::common::keys;
use crate::common::{clerk_config, client, free_port, rpc, Keygate, Stack, RESOURCE};

async fn metrics_text(gw: &Keygate) -> String {
    let resp = client()
        .get(format!("{}/metrics", gw.admin_url))
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/plain"));
    resp.text().await.expect("text")
}

/// `/metrics` once `ready` holds for it; fails after a bounded wait.
async fn metrics_once(gw: &Keygate, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics_text(gw).await;
        if ready(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the metrics never reflected the traffic:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`value`], 0 when the series is absent.
fn value_or_zero(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The value of the series whose line starts with `series` (name plus labels, exactly).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[tokio::test]
async fn metrics_reflect_the_traffic() {
    let s = Stack::start("").await;
    let token = s.access_token("user_1");
    assert_eq!(rpc(s.gw.at("/mcp"), Some(&token)).await.status(), 200);
    assert_eq!(rpc(s.gw.at("/mcp"), Some(&token)).await.status(), 200);
    assert_eq!(rpc(s.gw.at("/mcp"), None).await.status(), 401);
    let forged = keys::tamper_payload(
        &token,
        &keys::access_token_claims(&s.clerk.url(), "user_admin", Some(RESOURCE), "x"),
    );
    assert_eq!(rpc(s.gw.at("/mcp"), Some(&forged)).await.status(), 401);
    // Requests are counted in the logging phase, after the client has its response: wait until
    // all four are counted (bounded), then check everything else against that snapshot.
    let text = metrics_once(&s.gw, |text| {
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with("keygate_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        total >= 4.0 && value_or_zero(text, "keygate_requests_in_flight") == 0.0
    })
    .await;
    // A refused token is still labelled with the kind it claims to be.
    assert_eq!(
        value(
            &text,
            "keygate_auth_total{kind=\"oauth_jwt\",outcome=\"rejected\",reason=\"bad_signature\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "keygate_requests_total{method=\"POST\",route=\"proxied\",status_class=\"2xx\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            "keygate_requests_total{method=\"POST\",route=\"proxied\",status_class=\"4xx\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            "keygate_auth_total{kind=\"oauth_jwt\",outcome=\"accepted\",reason=\"ok\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            "keygate_auth_total{kind=\"none\",outcome=\"rejected\",reason=\"missing\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&text, "keygate_token_cache_total{result=\"hit\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "keygate_token_cache_total{result=\"miss\"}"),
        2.0
    );
    let issuer = s.clerk.url();
    assert!(
        value(
            &text,
            &format!("keygate_jwks_fetches_total{{issuer=\"{issuer}\",result=\"ok\"}}")
        ) >= 1.0
    );
    assert_eq!(value(&text, "keygate_requests_in_flight"), 0.0);
    assert_eq!(value(&text, "keygate_upstream_duration_seconds_count"), 2.0);
    assert!(text.contains("keygate_build_info{version=\""));
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(!line.contains("user_1"), "a user id became a label: {line}");
    }
}

#[tokio::test]
async fn no_secret_reaches_the_logs_or_metrics() {
    let s = Stack::start("").await;
    let scratch = crate::common::TempDir::new("ops");
    let data = scratch.join("data");
    let secret = "c0ffee5a81d3f7264b9e0c2a7f4d18e3b65c90a2d7f14e8b3c6a05d9e2f7b1c4";
    let toml = clerk_config(
        &s.clerk.url(),
        s.clerk.secret_key(),
        &format!(
            "[keys]\ndata_dir = \"{}\"\n[log]\nformat = \"json\"\n[server]\ngrace_period_secs = 1\nshutdown_timeout_secs = 1\nthreads = 1\n",
            data.display()
        ),
    );
    let cfg = data.with_extension("toml");
    std::fs::write(&cfg, toml).expect("config");
    let (port, admin) = (free_port(), free_port());
    let mut child = crate::common::keygate_command(&cfg, port, admin)
        .env("KEYGATE_UPSTREAM", s.upstream.url())
        .env("API_KEY_ENCRYPTION_SECRET", secret)
        .env("RUST_LOG", "debug,pingora_proxy=trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keygate");
    let base = format!("http://127.0.0.1:{port}");
    let admin_url = format!("http://127.0.0.1:{admin}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client().get(format!("{admin_url}/ready")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "keygate never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let api_key = "tw_live_9f8e7d6c5b4a3928171605f4e3d2c1b0";
    let session = s.key.sign(
        json!({"typ": "JWT"}),
        &keys::clerk_session_claims(&s.clerk.url(), "user_logs", "sess_logs"),
    );
    let access = s.access_token("user_logs");
    let opaque = "oat_4c1f9e8d7b6a5f4e3d2c1b0a99887766";
    s.clerk
        .add_opaque(opaque, OpaqueSpec::new("user_logs", &["twenty:read"]));
    let stored = client()
        .post(format!("{base}/api/keys"))
        .bearer_auth(&session)
        .json(&json!({"apiKey": api_key}))
        .send()
        .await
        .expect("store");
    assert_eq!(stored.status(), 200);
    assert_eq!(
        rpc(format!("{base}/mcp?apiKey={api_key}"), Some(&access))
            .await
            .status(),
        200
    );
    assert_eq!(rpc(format!("{base}/mcp"), Some(opaque)).await.status(), 200);
    let tampered = keys::tamper_payload(
        &access,
        &keys::access_token_claims(&s.clerk.url(), "user_x", Some(RESOURCE), "x"),
    );
    assert_eq!(
        rpc(format!("{base}/mcp"), Some(&tampered)).await.status(),
        401
    );
    let deleted = client()
        .delete(format!("{base}/api/keys"))
        .bearer_auth(&session)
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 200);
    let metrics = client()
        .get(format!("{admin_url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");

    // SIGTERM: a graceful exit.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "keygate did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    let mut logs = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("read");
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut logs)
        .expect("read");

    // The logs say what happened…
    for expected in [
        "\"event\":\"key_stored\"",
        "\"event\":\"key_deleted\"",
        "\"event\":\"auth_failed\"",
        "keygate::access",
    ] {
        assert!(
            logs.contains(expected),
            "{expected} missing from the logs:\n{logs}"
        );
    }
    assert!(logs.contains("user_logs"));
    // Audit lines name the client's address plainly.
    let audit: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"target\":\"keygate::audit\""))
        .collect();
    assert!(!audit.is_empty(), "no audit line:\n{logs}");
    for line in audit {
        assert!(
            line.contains("\"client_ip\":\"127.0.0.1\""),
            "an audit line without client_ip=127.0.0.1: {line}"
        );
    }
    // …and never with a secret.
    let secrets = [
        ("access token", access.as_str()),
        ("session token", session.as_str()),
        ("tampered token", tampered.as_str()),
        ("opaque token", opaque),
        ("API key", api_key),
        ("encryption secret", secret),
        ("Clerk secret key", s.clerk.secret_key()),
    ];
    for (what, value) in secrets {
        // Tokens are long: a distinctive slice is enough to catch partial leaks too.
        let needle = &value[value.len().saturating_sub(24)..];
        assert!(!logs.contains(needle), "the {what} appears in the logs");
        assert!(!metrics.contains(needle), "the {what} appears in /metrics");
    }
}

#[tokio::test]
async fn a_draining_replica_finishes_in_flight_work_and_loses_nothing() {
    let s = Stack::start("[server]\ngrace_period_secs = 2\nshutdown_timeout_secs = 2\n").await;
    let toml = clerk_config(
        &s.clerk.url(),
        s.clerk.secret_key(),
        "[server]\ngrace_period_secs = 2\nshutdown_timeout_secs = 2\n",
    );
    let other = Keygate::start(&toml, &s.upstream.url()).await;
    other.wait_ready().await;
    let token = s.access_token("user_1");
    // Fresh connections only, so a closed listener shows up as a refused connection.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");

    let slow = {
        let fresh = fresh.clone();
        let url = s.gw.at("/slow?ms=1200");
        let token = token.clone();
        tokio::spawn(async move { fresh.get(url).bearer_auth(token).send().await })
    };
    let sse = client()
        .get(s.gw.at("/sse"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("sse");
    assert_eq!(sse.status(), 200);
    // The slow request is in flight once the upstream has it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s
        .upstream
        .requests()
        .iter()
        .any(|r| r.path.starts_with("/slow"))
    {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped_at = Instant::now();
    s.gw.handle.as_ref().expect("running").terminate();
    // The listener is closed once a plain connect is refused (bounded wait for that).
    let addr = s.gw.url.trim_start_matches("http://").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the draining replica kept its listener"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // In-flight work completes.
    let slow = slow
        .await
        .expect("task")
        .expect("the in-flight request was cut");
    assert_eq!(slow.status(), 200);
    // New work: the draining replica refuses connections, the other takes every request.
    let mut refused = 0;
    for i in 0..10 {
        let first = if i % 2 == 0 { &s.gw } else { &other };
        let mut result = fresh
            .post(first.at("/mcp"))
            .bearer_auth(&token)
            .json(&json!({"jsonrpc": "2.0", "id": i, "method": "ping"}))
            .send()
            .await;
        if let Err(e) = &result {
            assert!(
                e.is_connect(),
                "a request was lost after it was accepted: {e}"
            );
            refused += 1;
            result = fresh
                .post(other.at("/mcp"))
                .bearer_auth(&token)
                .json(&json!({"jsonrpc": "2.0", "id": i, "method": "ping"}))
                .send()
                .await;
        }
        assert_eq!(result.expect("the other replica answers").status(), 200);
    }
    assert!(
        refused >= 5,
        "the draining replica kept accepting ({refused} refused)"
    );
    // The open SSE stream is closed by the end of the grace period and shutdown timeout.
    let mut stream = sse.bytes_stream();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = stream.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the SSE stream outlived the shutdown");
    assert!(stopped_at.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn ready_fails_while_draining_as_the_readme_says() {
    let s = Stack::start("[server]\ngrace_period_secs = 3\nshutdown_timeout_secs = 1\n").await;
    let token = s.access_token("user_1");
    // A kept-alive admin connection, opened before the drain.
    let kept = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let ready = format!("{}/ready", s.gw.admin_url);
    assert_eq!(kept.get(&ready).send().await.expect("ready").status(), 200);
    // In-flight work keeps the replica draining for a while.
    let slow = {
        let url = s.gw.at("/slow?ms=2000");
        let token = token.clone();
        tokio::spawn(async move { client().get(url).bearer_auth(token).send().await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.upstream.requests().is_empty() {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.gw.handle.as_ref().expect("running").terminate();
    let fresh = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    // A probe's new connection is refused once the listener closed (bounded wait for that).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fresh.get(&ready).send().await {
            // Refused, or accepted into the backlog and reset when the listener closed: either
            // way the probe failed, which is what a draining replica must make it do.
            Err(_) => break,
            Ok(r) if r.status() == 503 => break,
            Ok(r) => assert!(
                Instant::now() < deadline,
                "/ready still answers {} while draining",
                r.status()
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The kept-alive connection, when the server still serves it, says 503: never 200.
    if let Ok(r) = kept.get(&ready).send().await {
        assert_eq!(
            r.status(),
            503,
            "/ready on an open connection while draining"
        );
    }
    let slow = slow
        .await
        .expect("task")
        .expect("in-flight request finished");
    assert_eq!(slow.status(), 200);
}
