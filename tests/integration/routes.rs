//! The one route decision through the running gateway: every spelling of a path that an
//! upstream would serve as MCP is inspected as MCP, and keygate's `/api/keys` namespace is
//! never proxied, however the path is written.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::keys::{self, SigningKey};
use crate::common::{clerk_config, client, Keygate, Stack};

/// Spellings an upstream serves as `/mcp`: Express (case, trailing slash), the Node Twenty
/// server (any path starting with `/mcp`), nginx/Go/Python (merged slashes, percent-decoding),
/// servlet containers (`;params`).
const MCP_SPELLINGS: [&str; 11] = [
    "/mcp/",
    "//mcp",
    "/MCP",
    "/mcpx",
    "/mcp;x",
    "/mcp%20",
    "/mcp.json",
    "/mcp//",
    "/%6Dcp",
    "/Mcp/sub",
    "/;x/mcp",
];

const WRITE_NEEDS_SCOPE: &str = r#"
[[policy.scopes]]
method = "tools/call"
name = "create_*"
scopes = ["twenty:write"]
"#;

fn call(id: u64, tool: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {}}})
}

async fn post_at(s: &Stack, path: &str, token: &str, body: &Value) -> reqwest::Response {
    client()
        .post(s.gw.at(path))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("request")
}

/// Send `request` as raw bytes (for targets an HTTP client library would normalise) and
/// return the response's status code.
async fn raw_status(port: u16, request: &str) -> u16 {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    conn.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        // The status line is all this needs.
        while !buf.windows(2).any(|w| w == b"\r\n") {
            let n = conn.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to {request:?}");
    let line = String::from_utf8_lossy(&buf);
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {line:?}"))
}

#[tokio::test]
async fn every_spelling_of_the_mcp_path_is_inspected() {
    let s = Stack::start(WRITE_NEEDS_SCOPE).await;
    let token = s.access_token("user_1"); // twenty:read only
    for path in MCP_SPELLINGS {
        let resp = post_at(&s, path, &token, &call(1, "create_person")).await;
        assert_eq!(resp.status(), 403, "{path}: a write tool without its scope");
        // The header check and the body parse run too.
        let resp = client()
            .post(s.gw.at(path))
            .bearer_auth(&token)
            .header("mcp-method", "tools/list")
            .json(&call(2, "get_person"))
            .send()
            .await
            .expect("request");
        assert_eq!(
            resp.status(),
            400,
            "{path}: Mcp-Method disagreeing with the body"
        );
        let resp = client()
            .post(s.gw.at(path))
            .bearer_auth(&token)
            .body("not json-rpc")
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 400, "{path}: a body that is not JSON-RPC");
        let resp = client()
            .post(s.gw.at(path))
            .bearer_auth(&token)
            .body(vec![b' '; 70 * 1024])
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 413, "{path}: over the inspection cap");
    }
    assert_eq!(
        s.upstream.count(),
        0,
        "nothing refused reached the upstream"
    );
    // A permitted call on a non-canonical spelling is forwarded as sent.
    let ok = post_at(&s, "/MCP/", &token, &call(3, "get_person")).await;
    assert_eq!(ok.status(), 200);
    let seen = s.upstream.last().expect("forwarded");
    assert_eq!(seen.path, "/MCP/");
    assert_eq!(seen.json(), call(3, "get_person"));
}

#[tokio::test]
async fn budgets_count_every_spelling() {
    let s = Stack::start(
        r#"
[[rate_limits.rules]]
name = "user-mcp"
per = "user"
requests = 4
period_secs = 3600
burst = 4
paths = ["/mcp"]

[[rate_limits.rules]]
name = "exports"
per = "user"
requests = 1
period_secs = 3600
tools = ["export_*"]
"#,
    )
    .await;
    let token = s.access_token("user_1");
    assert_eq!(
        post_at(&s, "/mcp", &token, &call(1, "export_people"))
            .await
            .status(),
        200
    );
    // The tool budget is spent: other spellings cannot reach the tool again.
    for path in ["/MCP/", "//mcp", "/mcp;x"] {
        let resp = post_at(&s, path, &token, &call(2, "export_people")).await;
        assert_eq!(resp.status(), 429, "{path}: the tool budget counts it");
    }
    // The path budget (4 per hour) counted the one request that passed (a refused request
    // spends from no budget) and counts every spelling: three more pass, then /mcpx is over it
    // (a `get_` call costs the tool budget nothing).
    for path in ["/MCP/", "//mcp", "/mcp;x"] {
        let resp = post_at(&s, path, &token, &call(3, "get_person")).await;
        assert_eq!(resp.status(), 200, "{path}");
    }
    let resp = post_at(&s, "/mcpx", &token, &call(4, "get_person")).await;
    assert_eq!(resp.status(), 429, "/mcpx counts against the /mcp budget");
    assert_eq!(s.upstream.count(), 4);
}

#[tokio::test]
async fn the_keys_namespace_is_answered_by_keygate_only() {
    let key = SigningKey::rsa_a("kid-a");
    let clerk = crate::common::clerk::FakeClerk::start(vec![key.clone()]).await;
    let upstream = crate::common::upstream::Upstream::start().await;
    let dir = std::env::temp_dir().join(format!(
        "keygate-routes-{}-{}",
        std::process::id(),
        crate::common::free_port()
    ));
    let gw = Keygate::start(
        &clerk_config(
            &clerk.url(),
            clerk.secret_key(),
            &format!(
                "[keys]\nencryption_secret = \"{}\"\ndata_dir = \"{}\"\n",
                "3f8a1c9e57b2d4067e1fa93c28d5b6409c7e2a15f3b8d06e4a91c7253df80b6e",
                dir.display()
            ),
        ),
        &upstream.url(),
    )
    .await;
    gw.wait_ready().await;
    let session = key.sign(
        json!({"typ": "JWT"}),
        &keys::clerk_session_claims(&clerk.url(), "user_1", "sess_1"),
    );

    // Other spellings of /api/keys are the vault itself.
    for path in ["/API/Keys", "/api/keys/", "//api//keys", "/api/keys;x"] {
        let resp = client()
            .get(gw.at(path))
            .bearer_auth(&session)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200, "{path}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["hasKey"], false, "{path}");
    }
    // Anything under it is keygate's too: 404, with or without a token.
    for path in ["/api/keys/x", "/api/keys/x/y", "/API/KEYS/export"] {
        for token in [Some(&session), None] {
            let mut req = client().post(gw.at(path)).json(&json!({"apiKey": "k"}));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.expect("request");
            assert_eq!(resp.status(), 404, "{path}");
        }
    }
    // Traversal behind path parameters is refused before any route is chosen.
    let auth = format!("Authorization: Bearer {session}\r\n");
    for target in [
        "/api/keys/..;/mcp",
        "/api/keys/%2e%2e;x/mcp",
        "/api/keys/../mcp",
    ] {
        let req =
            format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
        assert_eq!(raw_status(gw.port, &req).await, 400, "{target}");
    }
    assert_eq!(upstream.count(), 0, "nothing under /api/keys was proxied");
    let _ = std::fs::remove_dir_all(&dir);
}
