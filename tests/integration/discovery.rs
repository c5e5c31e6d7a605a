//! What MCP clients fetch before they have a token: protected-resource metadata, the
//! authorization server's metadata, CORS preflights, health and readiness.

use serde_json::{json, Value};

use crate::common::clerk::FakeClerk;
use crate::common::upstream::Upstream;
use crate::common::{client, Keygate, Stack, RESOURCE};

async fn setup(extra: &str) -> (FakeClerk, Upstream, Keygate) {
    let stack = Stack::start(extra).await;
    (stack.clerk, stack.upstream, stack.gw)
}

#[tokio::test]
async fn protected_resource_metadata_at_root_and_path_suffixed_urls() {
    let (clerk, upstream, gw) = setup("").await;
    for path in [
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-protected-resource/mcp",
    ] {
        let resp = client()
            .get(gw.at(path))
            .header("host", "evil.example.com")
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200, "{path}");
        assert!(resp.headers()["cache-control"]
            .to_str()
            .expect("ascii")
            .contains("max-age"));
        let doc: Value = resp.json().await.expect("json");
        assert_eq!(
            doc,
            json!({
                "resource": RESOURCE,
                "authorization_servers": [clerk.url()],
                "scopes_supported": ["twenty:read", "twenty:write"],
                "bearer_methods_supported": ["header"],
            })
        );
    }
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn authorization_server_metadata_is_passed_through_unmodified() {
    let (clerk, _upstream, gw) = setup("").await;
    for path in [
        "/.well-known/oauth-authorization-server",
        "/.well-known/openid-configuration",
    ] {
        let original = client()
            .get(format!("{}{path}", clerk.url()))
            .send()
            .await
            .expect("fake")
            .bytes()
            .await
            .expect("body");
        let through = client().get(gw.at(path)).send().await.expect("request");
        assert_eq!(through.status(), 200);
        assert_eq!(through.bytes().await.expect("body"), original, "{path}");
    }
    // Cached: a second read does not go back to the issuer.
    let before = clerk.metadata_fetches();
    let again = client()
        .get(gw.at("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .expect("request");
    assert_eq!(again.status(), 200);
    assert_eq!(clerk.metadata_fetches(), before);
}

#[tokio::test]
async fn cors_preflight_is_answered_before_authentication() {
    let (_clerk, upstream, gw) =
        setup("[cors]\nallowed_origins = [\"https://app.example.com\"]\n").await;
    let resp = client()
        .request(reqwest::Method::OPTIONS, gw.at("/mcp"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, mcp-session-id",
        )
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 204);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    let methods = h["access-control-allow-methods"].to_str().expect("ascii");
    assert!(
        methods.contains("POST") && methods.contains("GET"),
        "{methods}"
    );
    let allowed = h["access-control-allow-headers"].to_str().expect("ascii");
    for name in [
        "Authorization",
        "Content-Type",
        "Mcp-Session-Id",
        "MCP-Protocol-Version",
        "Mcp-Method",
        "Mcp-Name",
        "Last-Event-ID",
    ] {
        assert!(allowed.contains(name), "{name} not allowed: {allowed}");
    }
    let exposed = h["access-control-expose-headers"].to_str().expect("ascii");
    assert!(exposed.contains("Mcp-Session-Id") && exposed.contains("WWW-Authenticate"));
    assert_eq!(upstream.count(), 0);

    // A 401 to an allowed origin is readable by the browser, challenge included.
    let resp = client()
        .post(gw.at("/mcp"))
        .header("origin", "https://app.example.com")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
}

#[tokio::test]
async fn disallowed_origins_are_refused() {
    let (_clerk, upstream, gw) =
        setup("[cors]\nallowed_origins = [\"https://app.example.com\"]\n").await;
    let preflight = client()
        .request(reqwest::Method::OPTIONS, gw.at("/mcp"))
        .header("origin", "https://evil.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("request");
    assert_eq!(preflight.status(), 403);
    let resp = client()
        .post(gw.at("/mcp"))
        .header("origin", "https://evil.example.com")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 403);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn health_on_both_listeners_and_readiness() {
    let (_clerk, upstream, gw) = setup("").await;
    let expected = json!({"status": "healthy", "service": "keygate", "authEnabled": true});
    for url in [gw.at("/health"), format!("{}/health", gw.admin_url)] {
        let body: Value = client()
            .get(&url)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        assert_eq!(body, expected, "{url}");
    }
    let ready = client()
        .get(format!("{}/ready", gw.admin_url))
        .send()
        .await
        .expect("request");
    assert_eq!(ready.status(), 200);
    assert_eq!(upstream.count(), 0, "/health must be answered by keygate");
}
