//! Traffic policy through the running gateway: MCP transport checks, scope and tool rules,
//! org rules, session binding, rate limits.

use serde_json::{json, Value};

use crate::common::{client, rpc, Stack};

#[tokio::test]
async fn unsupported_protocol_versions_are_refused() {
    let s = Stack::start("").await;
    let token = s.access_token("user_1");
    let resp = client()
        .post(s.gw.at("/mcp"))
        .bearer_auth(&token)
        .header("mcp-protocol-version", "1999-01-01")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json");
    assert!(body["error_description"]
        .as_str()
        .expect("text")
        .starts_with("Unsupported MCP-Protocol-Version"));
    assert_eq!(s.upstream.count(), 0);
    let ok = client()
        .post(s.gw.at("/mcp"))
        .bearer_auth(&token)
        .header("mcp-protocol-version", "2025-06-18")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let s = Stack::start("[policy]\nmax_body_bytes = 1000\n").await;
    let token = s.access_token("user_1");
    // Declared too large: refused before anything is sent upstream.
    let resp = client()
        .post(s.gw.at("/echo-body"))
        .bearer_auth(&token)
        .body(vec![b'x'; 5000])
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 413);
    assert_eq!(s.upstream.count(), 0);
    // Streamed without a length: cut off once past the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![b'y'; 500])).collect();
    let resp = client()
        .post(s.gw.at("/echo-body"))
        .bearer_auth(&token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    match resp {
        Ok(r) => assert_eq!(r.status(), 413),
        Err(e) => panic!("expected a 413 answer, got {e}"),
    }
    // Within the limit: fine.
    assert_eq!(rpc(s.gw.at("/mcp"), Some(&token)).await.status(), 200);
}

const SCOPE_RULES: &str = r#"
[[policy.scopes]]
method = "tools/call"
name = "delete_*"
scopes = ["twenty:write"]

[[policy.scopes]]
method = "tools/call"
name = "create_*"
scopes = ["twenty:write", "twenty:create"]
"#;

fn call(id: u64, tool: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {}}})
}

async fn post(s: &Stack, token: &str, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client().post(s.gw.at("/mcp")).bearer_auth(token).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("request")
}

#[tokio::test]
async fn tools_need_the_scopes_their_rule_names() {
    let s = Stack::start(SCOPE_RULES).await;
    let token = s.access_token("user_1"); // scope: twenty:read
    let ok = post(&s, &token, &call(1, "get_person"), &[]).await;
    assert_eq!(ok.status(), 200);
    // The inspected body reaches the upstream byte for byte.
    let seen = s.upstream.last().expect("forwarded");
    assert_eq!(seen.json(), call(1, "get_person"));

    let before = s.upstream.count();
    let denied = post(&s, &token, &call(2, "delete_person"), &[]).await;
    assert_eq!(denied.status(), 403);
    assert_eq!(
        denied.headers()["www-authenticate"],
        "Bearer error=\"insufficient_scope\", scope=\"twenty:write\", resource_metadata=\"https://mcp.example.com/.well-known/oauth-protected-resource/mcp\""
    );
    let body: Value = denied.json().await.expect("json");
    assert_eq!(body["error"], "insufficient_scope");
    assert_eq!(s.upstream.count(), before);
}

#[tokio::test]
async fn a_batch_passes_only_if_every_call_passes() {
    let s = Stack::start(SCOPE_RULES).await;
    let token = s.access_token("user_1");
    let batch = json!([
        call(1, "get_person"),
        call(2, "delete_person"),
        call(3, "create_note")
    ]);
    let resp = post(&s, &token, &batch, &[]).await;
    assert_eq!(resp.status(), 403);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        challenge.contains("scope=\"twenty:create twenty:write\""),
        "{challenge}"
    );
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn mcp_method_and_name_headers_must_match_the_body() {
    let s = Stack::start("").await;
    let token = s.access_token("user_1");
    let body = call(1, "get_person");
    let ok = post(
        &s,
        &token,
        &body,
        &[("mcp-method", "tools/call"), ("mcp-name", "get_person")],
    )
    .await;
    assert_eq!(ok.status(), 200);
    for headers in [
        [("mcp-method", "tools/list"), ("mcp-name", "get_person")],
        [("mcp-method", "tools/call"), ("mcp-name", "delete_person")],
    ] {
        let resp = post(&s, &token, &body, &headers).await;
        assert_eq!(resp.status(), 400, "{headers:?}");
    }
    let not_json = client()
        .post(s.gw.at("/mcp"))
        .bearer_auth(&token)
        .body("not json")
        .send()
        .await
        .expect("request");
    assert_eq!(not_json.status(), 400);
    assert_eq!(s.upstream.count(), 1);
}

#[tokio::test]
async fn the_twenty_defaults_separate_reads_from_writes() {
    let s = Stack::start("[policy]\ndefault_scopes = \"twenty\"\n").await;
    let token = s.access_token("user_1"); // twenty:read only
    assert_eq!(
        post(&s, &token, &call(1, "get_people"), &[]).await.status(),
        200
    );
    let resp = post(&s, &token, &call(2, "create_person"), &[]).await;
    assert_eq!(resp.status(), 403);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(challenge.contains("twenty:write"), "{challenge}");
}

#[tokio::test]
async fn org_rules_refuse_other_orgs_and_tokens_without_one() {
    let s = Stack::start(
        "[policy.org]\nallowed_org_ids = [\"org_keygateTestOrg\"]\nrequired_role = \"admin\"\n",
    )
    .await;
    let mut claims = crate::common::keys::access_token_claims(
        &s.clerk.url(),
        "user_1",
        Some(crate::common::RESOURCE),
        "twenty:read",
    );
    // No org context.
    let resp = rpc(s.gw.at("/mcp"), Some(&s.access_token("user_1"))).await;
    assert_eq!(resp.status(), 403);
    claims["o"] = json!({"id": "org_keygateTestOrg", "rol": "admin"});
    let ok = s.key.sign(json!({"typ": "at+jwt"}), &claims);
    assert_eq!(rpc(s.gw.at("/mcp"), Some(&ok)).await.status(), 200);
    claims["o"] = json!({"id": "org_keygateTestOrg", "rol": "member"});
    let member = s.key.sign(json!({"typ": "at+jwt"}), &claims);
    assert_eq!(rpc(s.gw.at("/mcp"), Some(&member)).await.status(), 403);
    claims["o"] = json!({"id": "org_other", "rol": "admin"});
    let other = s.key.sign(json!({"typ": "at+jwt"}), &claims);
    assert_eq!(rpc(s.gw.at("/mcp"), Some(&other)).await.status(), 403);
}

#[tokio::test]
async fn a_session_id_cannot_be_used_by_another_user() {
    let s = Stack::start("").await;
    let alice = s.access_token("user_alice");
    let bob = s.access_token("user_bob");
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let resp = post(&s, &alice, &init, &[]).await;
    assert_eq!(resp.status(), 200);
    let sid = resp.headers()["mcp-session-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    assert_eq!(
        post(&s, &alice, &list, &[("mcp-session-id", &sid)])
            .await
            .status(),
        200
    );
    let before = s.upstream.count();
    let stolen = post(&s, &bob, &list, &[("mcp-session-id", &sid)]).await;
    assert_eq!(stolen.status(), 404);
    assert_eq!(
        s.upstream.count(),
        before,
        "a stolen session reached the upstream"
    );
}

const USER_LIMIT: &str = r#"
[[rate_limits.rules]]
name = "user-mcp"
per = "user"
requests = 3
period_secs = 60
burst = 3
paths = ["/mcp"]
"#;

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("ascii")
        .to_string()
}

#[tokio::test]
async fn the_request_over_the_budget_is_429_with_ratelimit_headers() {
    let s = Stack::start(USER_LIMIT).await;
    let token = s.access_token("user_1");
    for remaining in [2, 1, 0] {
        let resp = rpc(s.gw.at("/mcp"), Some(&token)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "ratelimit-policy"), "\"user-mcp\";q=3;w=60");
        assert!(
            header(&resp, "ratelimit").starts_with(&format!("\"user-mcp\";r={remaining};t=")),
            "{}",
            header(&resp, "ratelimit")
        );
    }
    let before = s.upstream.count();
    let resp = rpc(s.gw.at("/mcp"), Some(&token)).await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = header(&resp, "retry-after").parse().expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(header(&resp, "ratelimit-policy"), "\"user-mcp\";q=3;w=60");
    assert!(header(&resp, "ratelimit").starts_with("\"user-mcp\";r=0;"));
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(s.upstream.count(), before);
    // Another user has a budget of their own.
    assert_eq!(
        rpc(s.gw.at("/mcp"), Some(&s.access_token("user_2")))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn an_ip_budget_guards_unauthenticated_routes() {
    let s =
        Stack::start("[[rate_limits.rules]]\nper = \"ip\"\nrequests = 2\nperiod_secs = 60\n").await;
    let url = s.gw.at("/.well-known/oauth-protected-resource");
    assert_eq!(client().get(&url).send().await.expect("r").status(), 200);
    assert_eq!(rpc(s.gw.at("/mcp"), Some("garbage")).await.status(), 401);
    assert_eq!(client().get(&url).send().await.expect("r").status(), 429);
}

#[tokio::test]
async fn expensive_tools_have_their_own_budget() {
    let s = Stack::start(
        "[[rate_limits.rules]]\nname = \"exports\"\nper = \"user\"\nrequests = 1\nperiod_secs = 3600\ntools = [\"export_*\"]\n",
    )
    .await;
    let token = s.access_token("user_1");
    assert_eq!(
        post(&s, &token, &call(1, "export_people"), &[])
            .await
            .status(),
        200
    );
    assert_eq!(
        post(&s, &token, &call(2, "get_person"), &[]).await.status(),
        200
    );
    assert_eq!(
        post(&s, &token, &call(3, "export_companies"), &[])
            .await
            .status(),
        429
    );
    assert_eq!(
        post(&s, &token, &call(4, "get_person"), &[]).await.status(),
        200
    );
}

#[tokio::test]
async fn replicas_sharing_redis_enforce_one_limit_and_fall_back_when_it_fails() {
    let mut redis = crate::common::redis::RedisServer::start();
    let s = Stack::start(USER_LIMIT).await;
    let toml = crate::common::clerk_config(&s.clerk.url(), s.clerk.secret_key(), USER_LIMIT);
    let env = [("REDIS_URL", redis.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = crate::common::Keygate::start_with_env(&toml, &s.upstream.url(), &env).await;
    let b = crate::common::Keygate::start_with_env(&toml, &s.upstream.url(), &env).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let token = s.access_token("user_shared");
    let statuses = [
        rpc(a.at("/mcp"), Some(&token)).await.status(),
        rpc(b.at("/mcp"), Some(&token)).await.status(),
        rpc(a.at("/mcp"), Some(&token)).await.status(),
        rpc(b.at("/mcp"), Some(&token)).await.status(),
    ];
    assert_eq!(statuses.map(|s| s.as_u16()), [200, 200, 200, 429]);

    // Redis gone: each replica falls back to its own local budget.
    redis.stop();
    let other = s.access_token("user_fallback");
    for _ in 0..3 {
        assert_eq!(rpc(a.at("/mcp"), Some(&other)).await.status(), 200);
    }
    assert_eq!(rpc(a.at("/mcp"), Some(&other)).await.status(), 429);
}
