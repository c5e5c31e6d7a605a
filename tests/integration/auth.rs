//! Token validation through the running gateway: every rule has a case that fails when the
//! rule is broken.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::clerk::{FakeClerk, OpaqueSpec};
use crate::common::keys::{self, SigningKey};
use crate::common::upstream::Upstream;
use crate::common::{clerk_config, client, rpc, Keygate, Stack, RESOURCE};

type Env = Stack;

async fn setup_with(extra: &str) -> Env {
    Stack::start(extra).await
}

async fn setup() -> Env {
    setup_with("").await
}

fn access_claims(env: &Env, aud: Option<&str>) -> Value {
    keys::access_token_claims(&env.clerk.url(), "user_123", aud, "twenty:read")
}

/// Sign `claims` as a Clerk OAuth access token.
fn at_jwt(env: &Env, claims: &Value) -> String {
    env.key.sign(json!({"typ": "at+jwt"}), claims)
}

fn access_token(env: &Env) -> String {
    env.key.sign(
        json!({"typ": "at+jwt"}),
        &access_claims(env, Some(RESOURCE)),
    )
}

async fn call(env: &Env, path: &str, token: &str) -> reqwest::Response {
    client()
        .post(env.gw.at(path))
        .bearer_auth(token)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .send()
        .await
        .expect("request")
}

/// Assert a 401 with the invalid_token challenge, and that nothing reached the upstream.
async fn assert_rejected(env: &Env, token: &str) -> Value {
    let before = env.upstream.count();
    let resp = call(env, "/mcp", token).await;
    assert_eq!(resp.status(), 401);
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .expect("challenge")
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    assert!(
        challenge.contains(
            "resource_metadata=\"https://mcp.example.com/.well-known/oauth-protected-resource/mcp\""
        ),
        "{challenge}"
    );
    let body: Value = resp.json().await.expect("json body");
    assert_eq!(body["error"], "unauthorized");
    assert_eq!(
        env.upstream.count(),
        before,
        "a rejected request reached the upstream"
    );
    body
}

#[tokio::test]
async fn valid_access_token_reaches_upstream_without_the_token() {
    let env = setup().await;
    let token = access_token(&env);
    let resp = client()
        .post(env.gw.at("/mcp"))
        .bearer_auth(&token)
        .header("cookie", "session=abc")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-keygate-user", "user_admin")
        .json(&json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["id"], 7);
    let seen = env.upstream.last().expect("upstream saw the request");
    assert!(seen.headers.get("authorization").is_none());
    assert!(seen.headers.get("cookie").is_none());
    assert!(seen.headers.get("proxy-authorization").is_none());
    for (_, v) in seen.headers.iter() {
        assert!(
            !v.to_str().unwrap_or("").contains(&token),
            "the client's token reached the upstream"
        );
    }
    assert_eq!(seen.headers["x-keygate-user"], "user_123");
    assert_eq!(seen.headers["x-keygate-scopes"], "twenty:read");
    assert_eq!(seen.headers["x-keygate-token-kind"], "oauth_jwt");
}

#[tokio::test]
async fn missing_token_gets_challenge_without_error_code() {
    let env = setup().await;
    let resp = client()
        .post(env.gw.at("/mcp"))
        .json(&json!({}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().expect("ascii");
    assert_eq!(
        challenge,
        "Bearer resource_metadata=\"https://mcp.example.com/.well-known/oauth-protected-resource/mcp\", scope=\"twenty:read twenty:write\""
    );
    assert_eq!(env.upstream.count(), 0);
}

#[tokio::test]
async fn alg_none_is_rejected() {
    let env = setup().await;
    let token = keys::unsigned_token(
        &json!({"alg": "none", "typ": "at+jwt", "kid": "kid-a"}),
        &access_claims(&env, Some(RESOURCE)),
    );
    assert_rejected(&env, &token).await;
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_rejected() {
    let env = setup().await;
    let token = keys::hs256_token(
        env.key.public_pem(),
        &json!({"typ": "at+jwt", "kid": "kid-a"}),
        &access_claims(&env, Some(RESOURCE)),
    );
    assert_rejected(&env, &token).await;
}

#[tokio::test]
async fn tampered_payload_fails_the_signature() {
    let env = setup().await;
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims["sub"] = json!("user_admin");
    let token = keys::tamper_payload(&access_token(&env), &claims);
    let body = assert_rejected(&env, &token).await;
    assert_eq!(body["error_description"], "token signature is invalid");
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_rejected() {
    let env = setup().await;
    let now = keys::now();
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims["exp"] = json!(now - 30);
    claims["iat"] = json!(now - 90);
    claims["nbf"] = json!(now - 90);
    let body = assert_rejected(&env, &at_jwt(&env, &claims)).await;
    assert_eq!(body["error_description"], "token has expired");

    let mut claims = access_claims(&env, Some(RESOURCE));
    claims["nbf"] = json!(now + 60);
    let body = assert_rejected(&env, &at_jwt(&env, &claims)).await;
    assert_eq!(body["error_description"], "token is not yet valid");

    // Within the 5 s leeway an nbf a moment ahead (clock skew) is accepted.
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims["nbf"] = json!(now + 2);
    let ok = call(&env, "/mcp", &at_jwt(&env, &claims)).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn exp_is_required_and_must_be_a_number() {
    let env = setup().await;
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims.as_object_mut().expect("object").remove("exp");
    assert_rejected(&env, &at_jwt(&env, &claims)).await;
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims["exp"] = json!((keys::now() - 1000).to_string());
    assert_rejected(&env, &at_jwt(&env, &claims)).await;
}

#[tokio::test]
async fn wrong_issuer_is_rejected() {
    let env = setup().await;
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims["iss"] = json!("https://evil.example.com");
    let body = assert_rejected(&env, &at_jwt(&env, &claims)).await;
    assert_eq!(body["error_description"], "token issuer is not trusted");
    // Same host, different string: iss must match exactly.
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims["iss"] = json!(format!("{}/", env.clerk.url()));
    assert_rejected(&env, &at_jwt(&env, &claims)).await;
}

#[tokio::test]
async fn access_token_audience_must_name_this_resource() {
    let env = setup().await;
    let token = env
        .key
        .sign(json!({"typ": "at+jwt"}), &access_claims(&env, None));
    let body = assert_rejected(&env, &token).await;
    assert_eq!(
        body["error_description"],
        "token was not issued for this resource"
    );
    let token = env.key.sign(
        json!({"typ": "at+jwt"}),
        &access_claims(&env, Some("https://other.example.com/mcp")),
    );
    assert_rejected(&env, &token).await;
    let mut claims = access_claims(&env, None);
    claims["aud"] = json!(["https://other.example.com", RESOURCE]);
    let ok = call(&env, "/mcp", &at_jwt(&env, &claims)).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn sub_is_required() {
    let env = setup().await;
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims.as_object_mut().expect("object").remove("sub");
    assert_rejected(&env, &at_jwt(&env, &claims)).await;
}

#[tokio::test]
async fn key_urls_embedded_keys_and_crit_are_refused() {
    let env = setup().await;
    let claims = access_claims(&env, Some(RESOURCE));
    for extra in [
        json!({"typ": "at+jwt", "jku": "https://evil.example.com/jwks.json"}),
        json!({"typ": "at+jwt", "x5u": "https://evil.example.com/cert.pem"}),
        json!({"typ": "at+jwt", "jwk": env.key.jwk()}),
        json!({"typ": "at+jwt", "crit": ["exp"]}),
    ] {
        let body = assert_rejected(&env, &env.key.sign(extra, &claims)).await;
        assert_eq!(
            body["error_description"],
            "token header names keys or extensions that are not accepted"
        );
    }
}

#[tokio::test]
async fn kid_is_required() {
    let env = setup().await;
    let token = env.key.sign(
        json!({"typ": "at+jwt", "kid": null}),
        &access_claims(&env, Some(RESOURCE)),
    );
    let body = assert_rejected(&env, &token).await;
    assert_eq!(body["error_description"], "token has no key id");
}

#[tokio::test]
async fn session_tokens_only_where_configured() {
    let env = setup().await;
    let session = env.key.sign(
        json!({"typ": "JWT"}),
        &keys::clerk_session_claims(&env.clerk.url(), "user_42", "sess_1"),
    );
    let body = assert_rejected(&env, &session).await;
    assert_eq!(
        body["error_description"],
        "this kind of token is not accepted here"
    );
    // /api/keys accepts session tokens by default.
    let resp = client()
        .get(env.gw.at("/api/keys"))
        .bearer_auth(&session)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let seen = env.upstream.last().expect("upstream saw /api/keys");
    assert_eq!(seen.path, "/api/keys");
    assert_eq!(seen.headers["x-keygate-user"], "user_42");
    assert_eq!(seen.headers["x-keygate-token-kind"], "session");
    assert_eq!(seen.headers["x-keygate-org"], "org_keygateTestOrg");
}

#[tokio::test]
async fn pending_sessions_and_unlisted_parties_are_refused() {
    let env = setup_with("[auth]\nsession_token_paths = [\"/mcp\"]\n").await;
    // No azp allowlist configured in this deployment: a normal session passes on /mcp.
    let mut claims = keys::clerk_session_claims(&env.clerk.url(), "user_42", "sess_1");
    let ok = call(&env, "/mcp", &env.key.sign(json!({"typ": "JWT"}), &claims)).await;
    assert_eq!(ok.status(), 200);
    claims["sts"] = json!("pending");
    let body = assert_rejected(&env, &env.key.sign(json!({"typ": "JWT"}), &claims)).await;
    assert_eq!(body["error_description"], "session is not fully signed in");

    let env = Env {
        gw: Keygate::start_with_env(
            &clerk_config(
                &env.clerk.url(),
                env.clerk.secret_key(),
                "[auth]\nsession_token_paths = [\"/mcp\"]\n",
            )
            .replace(
                "[clerk]\n",
                "[clerk]\nauthorized_parties = [\"https://app.example.com\"]\n",
            ),
            &env.upstream.url(),
            &[],
        )
        .await,
        ..env
    };
    env.gw.wait_ready().await;
    let claims = keys::clerk_session_claims(&env.clerk.url(), "user_42", "sess_1");
    let body = assert_rejected(&env, &env.key.sign(json!({"typ": "JWT"}), &claims)).await;
    assert_eq!(
        body["error_description"],
        "token was issued to an unauthorized party"
    );
    let mut claims = claims;
    claims["azp"] = json!("https://app.example.com");
    let ok = call(&env, "/mcp", &env.key.sign(json!({"typ": "JWT"}), &claims)).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn a_clerk_jwt_that_is_neither_access_nor_session_token_is_refused() {
    let env = setup().await;
    // An ID-token-like JWT: audience matches, but no at+jwt type and no session id.
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims.as_object_mut().expect("object").remove("scope");
    let body = assert_rejected(&env, &env.key.sign(json!({"typ": "JWT"}), &claims)).await;
    assert_eq!(
        body["error_description"],
        "this kind of token is not accepted here"
    );
}

#[tokio::test]
async fn jwks_rotation_to_a_new_kid_is_picked_up() {
    let env = setup_with("[jwks]\nunknown_kid_cooldown_secs = 0\n").await;
    let new_key = SigningKey::rsa_b("kid-b");
    let token = new_key.sign(
        json!({"typ": "at+jwt"}),
        &access_claims(&env, Some(RESOURCE)),
    );
    // Before the IdP publishes the key: unknown.
    let body = assert_rejected(&env, &token).await;
    assert_eq!(body["error_description"], "token signing key is unknown");
    env.clerk.set_keys(vec![env.key.clone(), new_key.clone()]);
    let resp = call(&env, "/mcp", &token).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_flood_of_random_kids_causes_a_bounded_number_of_fetches() {
    // Every request verifies its token here, none is turned away by the failure budget.
    let env = setup_with("[policy.auth_failures]\nenabled = false\n").await;
    let before = env.clerk.jwks_fetches();
    let claims = access_claims(&env, Some(RESOURCE));
    let mut handles = Vec::new();
    for i in 0..60 {
        let token = env.key.sign(
            json!({"typ": "at+jwt", "kid": format!("random-{i}")}),
            &claims,
        );
        let url = env.gw.at("/mcp");
        handles.push(tokio::spawn(async move {
            client()
                .post(url)
                .bearer_auth(token)
                .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    for h in handles {
        assert_eq!(h.await.expect("task").expect("response"), 401);
    }
    let fetched = env.clerk.jwks_fetches() - before;
    // Default cooldown is 30 s: at most one refetch for the whole flood.
    assert!(fetched <= 1, "{fetched} JWKS fetches for 60 unknown kids");
}

#[tokio::test]
async fn jwks_outage_with_warm_keys_keeps_verifying() {
    let env = setup().await;
    env.clerk.set_down(true);
    // A token never seen before (not in the verified cache) still verifies with cached keys.
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims["jti"] = json!("fresh-during-outage");
    let resp = call(&env, "/mcp", &at_jwt(&env, &claims)).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn jwks_outage_with_cold_cache_fails_closed_and_not_ready() {
    let key = SigningKey::rsa_a("kid-a");
    let clerk = FakeClerk::start(vec![key.clone()]).await;
    clerk.set_down(true);
    let upstream = Upstream::start().await;
    let gw = Keygate::start(
        &clerk_config(&clerk.url(), clerk.secret_key(), ""),
        &upstream.url(),
    )
    .await;
    let ready = client()
        .get(format!("{}/ready", gw.admin_url))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 503);
    let token = key.sign(
        json!({"typ": "at+jwt"}),
        &keys::access_token_claims(&clerk.url(), "user_1", Some(RESOURCE), "twenty:read"),
    );
    let resp = rpc(gw.at("/mcp"), Some(&token)).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(upstream.count(), 0);
    // When the IdP comes back, keygate recovers without a restart.
    clerk.set_down(false);
    gw.wait_ready().await;
    let resp = rpc(gw.at("/mcp"), Some(&token)).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn keys_older_than_max_stale_fail_closed() {
    let env = setup_with("[jwks]\nmax_stale_secs = 1\nunknown_kid_cooldown_secs = 0\n").await;
    env.clerk.set_down(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims["jti"] = json!("after-stale");
    let resp = call(&env, "/mcp", &at_jwt(&env, &claims)).await;
    assert_eq!(resp.status(), 503);
}

/// A live opaque OAuth token for `user_77` with the `twenty:read` scope.
fn live_oauth_spec() -> OpaqueSpec {
    OpaqueSpec {
        subject: "user_77".into(),
        scopes: vec!["twenty:read".into()],
        expires_at_ms: Some((keys::now() + 600) * 1000),
        revoked: false,
        expired: false,
        client_id: "client_1".into(),
    }
}

#[tokio::test]
async fn opaque_oauth_token_is_verified_cached_and_revocation_applies_to_new_checks() {
    let env = setup().await;
    env.clerk.add_opaque("oat_good", live_oauth_spec());
    let resp = call(&env, "/mcp", "oat_good").await;
    assert_eq!(resp.status(), 200);
    let seen = env.upstream.last().expect("forwarded");
    assert_eq!(seen.headers["x-keygate-user"], "user_77");
    assert_eq!(seen.headers["x-keygate-token-kind"], "oauth_opaque");
    assert_eq!(env.clerk.verify_calls(), 1);
    // Second use: served from the cache.
    assert_eq!(call(&env, "/mcp", "oat_good").await.status(), 200);
    assert_eq!(env.clerk.verify_calls(), 1);

    // A revoked token is refused, and the refusal is cached briefly too.
    env.clerk.add_opaque(
        "oat_revoked",
        OpaqueSpec {
            subject: "user_78".into(),
            scopes: vec![],
            expires_at_ms: None,
            revoked: true,
            expired: false,
            client_id: "client_1".into(),
        },
    );
    let body = assert_rejected(&env, "oat_revoked").await;
    assert_eq!(body["error_description"], "token has been revoked");
    assert_rejected(&env, "oat_revoked").await;
    assert_eq!(env.clerk.verify_calls(), 2);
    // Unknown tokens are refused.
    assert_rejected(&env, "oat_unknown").await;
}

#[tokio::test]
async fn concurrent_checks_of_one_opaque_token_share_one_call() {
    let env = setup().await;
    env.clerk.set_verify_delay(Duration::from_millis(300));
    env.clerk.add_opaque(
        "oat_busy",
        OpaqueSpec {
            subject: "user_9".into(),
            scopes: vec![],
            expires_at_ms: Some((keys::now() + 600) * 1000),
            revoked: false,
            expired: false,
            client_id: "client_1".into(),
        },
    );
    let mut handles = Vec::new();
    for _ in 0..20 {
        let url = env.gw.at("/mcp");
        handles.push(tokio::spawn(async move {
            client()
                .post(url)
                .bearer_auth("oat_busy")
                .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    for h in handles {
        assert_eq!(h.await.expect("task").expect("response"), 200);
    }
    assert_eq!(env.clerk.verify_calls(), 1);
}

#[tokio::test]
async fn m2m_tokens_and_api_keys_carry_their_kind() {
    let env = setup().await;
    for (token, subject, kind) in [
        ("mt_machine", "mch_1", "m2m"),
        ("ak_userkey", "user_5", "api_key"),
        ("ak_orgkey", "org_5", "api_key"),
    ] {
        env.clerk.add_opaque(
            token,
            OpaqueSpec {
                subject: subject.into(),
                scopes: vec!["twenty:read".into()],
                expires_at_ms: None,
                revoked: false,
                expired: false,
                client_id: String::new(),
            },
        );
        let resp = call(&env, "/mcp", token).await;
        assert_eq!(resp.status(), 200, "{token}");
        let seen = env.upstream.last().expect("forwarded");
        assert_eq!(seen.headers["x-keygate-user"], subject);
        assert_eq!(seen.headers["x-keygate-token-kind"], kind);
    }
    let seen = env.upstream.last().expect("forwarded");
    assert_eq!(seen.headers["x-keygate-org"], "org_5");
}

#[tokio::test]
async fn backend_outage_fails_closed_except_for_cached_tokens() {
    let env = setup().await;
    env.clerk.add_opaque(
        "oat_cached",
        OpaqueSpec {
            subject: "user_1".into(),
            scopes: vec![],
            expires_at_ms: Some((keys::now() + 600) * 1000),
            revoked: false,
            expired: false,
            client_id: "c".into(),
        },
    );
    assert_eq!(call(&env, "/mcp", "oat_cached").await.status(), 200);
    env.clerk.set_down(true);
    assert_eq!(call(&env, "/mcp", "oat_cached").await.status(), 200);
    let resp = call(&env, "/mcp", "oat_never_seen").await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "temporarily_unavailable");
}

#[tokio::test]
async fn disabled_opaque_kinds_are_refused_without_calling_clerk() {
    let env = setup_with("").await;
    let gw = Keygate::start(
        &clerk_config(&env.clerk.url(), env.clerk.secret_key(), "")
            .replace("m2m_tokens = true", "m2m_tokens = false"),
        &env.upstream.url(),
    )
    .await;
    gw.wait_ready().await;
    let resp = rpc(gw.at("/mcp"), Some("mt_anything")).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(env.clerk.verify_calls(), 0);
}

#[tokio::test]
async fn tokens_outside_the_b64token_charset_are_malformed_and_never_sent_to_clerk() {
    let env = setup().await;
    env.clerk.add_opaque("oat_good", live_oauth_spec());
    for token in ["oat_good$", "oat_go\"od", "oat_good=x"] {
        let body = assert_rejected(&env, token).await;
        assert_eq!(body["error_description"], "malformed token", "{token}");
    }
    assert_eq!(env.clerk.verify_calls(), 0);
    // The same check does not stand in the way of the well-formed token.
    assert_eq!(call(&env, "/mcp", "oat_good").await.status(), 200);
    assert_eq!(env.clerk.verify_calls(), 1);
}

#[tokio::test]
async fn two_authorization_headers_are_a_bad_request() {
    let env = setup().await;
    let token = access_token(&env);
    let resp = client()
        .post(env.gw.at("/mcp"))
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", "Bearer other")
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 400);
    assert_eq!(env.upstream.count(), 0);
}

#[tokio::test]
async fn oversized_tokens_are_refused_before_parsing() {
    let env = setup().await;
    let big = format!("{}.{}.{}", "a".repeat(5000), "b".repeat(5000), "c");
    let body = assert_rejected(&env, &big).await;
    assert_eq!(body["error_description"], "token exceeds the maximum size");
}

#[tokio::test]
async fn require_auth_false_lets_anonymous_through_but_not_bad_tokens() {
    let key = SigningKey::rsa_a("kid-a");
    let clerk = FakeClerk::start(vec![key]).await;
    let upstream = Upstream::start().await;
    let gw = Keygate::start_with_env(
        &clerk_config(&clerk.url(), clerk.secret_key(), ""),
        &upstream.url(),
        &[("REQUIRE_AUTH", "false")],
    )
    .await;
    gw.wait_ready().await;
    let anon = client()
        .post(gw.at("/mcp"))
        .header("x-keygate-user", "user_spoofed")
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(anon.status(), 200);
    let seen = upstream.last().expect("forwarded");
    assert!(seen.headers.get("x-keygate-user").is_none());
    let bad = rpc(gw.at("/mcp"), Some("not-a-token")).await;
    assert_eq!(bad.status(), 401);
}

#[tokio::test]
async fn auth_disabled_passes_everything_and_hides_discovery() {
    let upstream = Upstream::start().await;
    let gw = Keygate::start_with_env(
        crate::common::NO_VAULT,
        &upstream.url(),
        &[("AUTH_ENABLED", "false")],
    )
    .await;
    let resp = rpc(gw.at("/mcp"), None).await;
    assert_eq!(resp.status(), 200);
    let prm = client()
        .get(gw.at("/.well-known/oauth-protected-resource"))
        .send()
        .await
        .expect("request");
    assert_eq!(prm.status(), 404);
    let health: Value = client()
        .get(gw.at("/health"))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(
        health,
        json!({"status": "healthy", "service": "keygate", "authEnabled": false})
    );
}

#[tokio::test]
async fn any_oidc_issuer_through_discovery() {
    // A second fake plays a generic OIDC provider; keygate finds its JWKS via discovery.
    let key = SigningKey::ec_a("oidc-ec");
    let idp = FakeClerk::start(vec![key.clone()]).await;
    let upstream = Upstream::start().await;
    let toml = format!(
        r#"
[keys]
enabled = false
[resource]
url = "{RESOURCE}"
[[issuers]]
issuer = "{iss}"
audiences = ["api://twenty"]
algorithms = ["ES256"]
"#,
        iss = idp.url()
    );
    let gw = Keygate::start(&toml, &upstream.url()).await;
    gw.wait_ready().await;
    let claims = keys::access_token_claims(&idp.url(), "auth0|123", Some("api://twenty"), "read");
    let token = key.sign(json!({"typ": "JWT"}), &claims);
    let resp = rpc(gw.at("/mcp"), Some(&token)).await;
    assert_eq!(resp.status(), 200);
    // The same issuer's token for another audience is refused.
    let claims = keys::access_token_claims(&idp.url(), "auth0|123", Some("api://other"), "read");
    let resp = client()
        .post(gw.at("/mcp"))
        .bearer_auth(key.sign(json!({"typ": "JWT"}), &claims))
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
    // An RS256 token is refused by an ES256-only issuer, whatever the token says.
    let rsa = SigningKey::rsa_a("oidc-ec");
    let claims = keys::access_token_claims(&idp.url(), "auth0|123", Some("api://twenty"), "read");
    let resp = client()
        .post(gw.at("/mcp"))
        .bearer_auth(rsa.sign(json!({"typ": "JWT"}), &claims))
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn a_token_seen_before_skips_verification_until_it_expires() {
    let env = setup().await;
    let auth = &env.gw.handle.as_ref().expect("running").state.auth;
    let token = access_token(&env);
    let before = auth.cache_stats();
    assert_eq!(call(&env, "/mcp", &token).await.status(), 200);
    assert_eq!(call(&env, "/mcp", &token).await.status(), 200);
    assert_eq!(call(&env, "/mcp", &token).await.status(), 200);
    let after = auth.cache_stats();
    assert_eq!(after.misses - before.misses, 1, "verified more than once");
    assert_eq!(after.hits - before.hits, 2);

    // A cached token is never accepted past its exp.
    let mut claims = access_claims(&env, Some(RESOURCE));
    claims["exp"] = json!(keys::now() + 2);
    let short = at_jwt(&env, &claims);
    assert_eq!(call(&env, "/mcp", &short).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Still inside the 5 s leeway for a fresh verification, but the cache entry is gone and
    // a re-verification is what decides.
    let resp = call(&env, "/mcp", &short).await;
    assert_eq!(auth.cache_stats().misses - before.misses, 3);
    assert_eq!(resp.status(), 200);
}
