//! The offline development setup: a token from `keygate dev-token` is accepted by a gateway
//! running `config/dev.toml`; the README's walkthrough succeeds against the example echo
//! upstream (run in-process here), showing the injected key; the dev config enforces the Twenty
//! scope defaults.

use serde_json::{json, Value};

use crate::common::upstream::Upstream;
use crate::common::{client, post_mcp, rpc, Keygate, TempDir};

use crate::common::upstream::echo;

/// A token minted by `keygate dev-token` with the dev config, for `user_dev`.
fn dev_token(scope: &str) -> String {
    crate::common::dev_token(std::path::Path::new("config/dev.toml"), "user_dev", scope)
}

/// `config/dev.toml` as keygate reads it from a temporary directory: its `dev/` files by
/// absolute path, its data in `data`.
fn dev_config(data: &TempDir) -> String {
    let original = std::fs::read_to_string("config/dev.toml").expect("dev config");
    let data_line = "data_dir = \"../target/keygate-dev\"";
    assert!(
        original.contains(data_line),
        "config/dev.toml changed its data_dir"
    );
    original
        .replace(
            "\"dev/",
            &format!("\"{}/config/dev/", env!("CARGO_MANIFEST_DIR")),
        )
        .replace(
            data_line,
            &format!("data_dir = \"{}\"", data.path().display()),
        )
}

/// The example echo upstream on a free loopback port; its base URL.
async fn echo_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, echo::router()).await;
    });
    format!("http://{addr}")
}

async fn call(gw: &Keygate, token: &str, body: Value) -> reqwest::Response {
    post_mcp(gw, token, &body).await
}

/// The URLs a client is told to use (resource, issuer) name the very address keygate listens
/// on, as an IP literal: `localhost` resolves to `::1` first on Debian, and a client without
/// happy eyeballs (Node.js 18's fetch) then never reaches a listener on 127.0.0.1.
#[test]
fn the_dev_urls_name_the_address_keygate_listens_on() {
    let s = keygate::app::configure(
        Some(std::path::Path::new("config/dev.toml")),
        &std::collections::HashMap::new(),
    )
    .map(|c| c.settings)
    .expect("the dev config loads");
    let listen = s.server.listen;
    let mut urls = vec![s.resource.url.clone()];
    urls.extend(s.issuers.iter().map(|i| i.issuer.clone()));
    for url in urls {
        let parsed = url::Url::parse(&url).expect("url");
        let host: std::net::IpAddr = parsed
            .host_str()
            .and_then(|h| h.trim_matches(['[', ']']).parse().ok())
            .unwrap_or_else(|| panic!("{url}: not an IP literal"));
        assert_eq!(host, listen.ip(), "{url} vs listen {listen}");
        assert_eq!(
            parsed.port(),
            Some(listen.port()),
            "{url} vs listen {listen}"
        );
    }
}

#[tokio::test]
async fn dev_token_is_accepted_by_the_dev_config() {
    let token = dev_token("twenty:read");
    let upstream = Upstream::start().await;
    let data = TempDir::new("dev");
    let gw = Keygate::start(&dev_config(&data), &upstream.url()).await;
    gw.wait_ready().await;
    // The newcomer's path: store a key, then call the MCP route with it injected.
    let stored = client()
        .post(gw.at("/api/keys"))
        .bearer_auth(&token)
        .json(&json!({"apiKey": "tw_dev_key"}))
        .send()
        .await
        .expect("request");
    assert_eq!(stored.status(), 200);
    let resp = rpc(gw.at("/mcp"), Some(&token)).await;
    assert_eq!(resp.status(), 200);
    let seen = upstream.last().expect("forwarded");
    assert_eq!(seen.headers["x-keygate-user"], "user_dev");
    assert_eq!(seen.query.as_deref(), Some("apiKey=tw_dev_key"));
    let anon = rpc(gw.at("/mcp"), None).await;
    assert_eq!(anon.status(), 401);
}

#[tokio::test]
async fn the_quick_start_walkthrough_shows_the_injected_key() {
    let token = dev_token("twenty:read twenty:write");
    let data = TempDir::new("dev-walkthrough");
    let gw = Keygate::start(&dev_config(&data), &echo_upstream().await).await;
    gw.wait_ready().await;

    let anon = client().get(gw.at("/mcp")).send().await.expect("request");
    assert_eq!(anon.status(), 401);
    assert!(anon.headers().contains_key("www-authenticate"));
    let stored = client()
        .post(gw.at("/api/keys"))
        .bearer_auth(&token)
        .json(&json!({"apiKey": "your-twenty-api-key"}))
        .send()
        .await
        .expect("request");
    assert_eq!(stored.status(), 200);
    let init = call(
        &gw,
        &token,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                          "clientInfo": {"name": "curl", "version": "1"}}}),
    )
    .await;
    assert_eq!(init.status(), 200);
    let list = call(
        &gw,
        &token,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    assert_eq!(list.status(), 200);
    let list: Value = list.json().await.expect("json");
    assert!(
        list["result"]["tools"]
            .as_array()
            .is_some_and(|t| t.len() == 2),
        "{list}"
    );
    let called = call(
        &gw,
        &token,
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
               "params": {"name": "get_received_key", "arguments": {}}}),
    )
    .await;
    assert_eq!(called.status(), 200);
    let called: Value = called.json().await.expect("json");
    let text = called["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or("");
    assert!(
        text.contains("apiKey query parameter \"your-twenty-api-key\""),
        "{called}"
    );
    let metadata = client()
        .get(gw.at("/.well-known/oauth-protected-resource/mcp"))
        .send()
        .await
        .expect("request");
    assert_eq!(metadata.status(), 200);
}

#[tokio::test]
async fn the_dev_config_enforces_the_twenty_scope_defaults() {
    let data = TempDir::new("dev-scopes");
    let gw = Keygate::start(&dev_config(&data), &echo_upstream().await).await;
    gw.wait_ready().await;
    let reader = dev_token("twenty:read");
    let nobody = dev_token("");
    let stored = client()
        .post(gw.at("/api/keys"))
        .bearer_auth(&reader)
        .json(&json!({"apiKey": "k"}))
        .send()
        .await
        .expect("request");
    assert_eq!(stored.status(), 200);
    let tool = |name: &str| {
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": name, "arguments": {"text": "hi"}}})
    };
    assert_eq!(
        call(&gw, &reader, tool("get_received_key")).await.status(),
        200
    );
    assert_eq!(call(&gw, &reader, tool("echo")).await.status(), 403);
    assert_eq!(
        call(&gw, &reader, tool("delete_person")).await.status(),
        403
    );
    assert_eq!(
        call(&gw, &nobody, tool("get_received_key")).await.status(),
        403
    );
}

/// A mimalloc build (the default) opts its process out of transparent huge pages before it
/// serves (src/main.rs): otherwise every 2 MiB region mimalloc touches is resident whole. The
/// kernel shows the flag in `/proc/<pid>/status` once `main` has run, which a listening socket
/// proves.
#[cfg(all(target_os = "linux", feature = "mimalloc"))]
#[test]
fn a_running_keygate_has_opted_out_of_transparent_huge_pages() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let data = TempDir::new("devmode-thp");
    let cfg = data.path().join("dev.toml");
    std::fs::write(&cfg, dev_config(&data)).expect("config");
    let (port, admin) = (crate::common::free_port(), crate::common::free_port());
    let mut child = crate::common::keygate_command(&cfg, port, admin)
        .env_remove("KEYGATE_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keygate");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break std::fs::read_to_string(format!("/proc/{}/status", child.id()));
        }
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            panic!("keygate never listened on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    let status = status.expect("/proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("the kernel reports THP_enabled (Linux >= 5.0)");
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}
