//! The dev authorization server (`[dev] authorization_server = true`): the whole OAuth 2.1 flow
//! an MCP client runs, driven over real sockets — 401 challenge, protected-resource metadata,
//! authorization-server metadata, dynamic registration, the consent page and its form, code
//! with PKCE S256 and `resource`, token, refresh — then the token used through keygate with the
//! stored key injected. Each refusal (wrong verifier, reused code, wrong redirect, wrong
//! resource, plain PKCE) and each startup refusal (Clerk, other issuers, non-loopback listen)
//! has its own test. The same flow driven by the official MCP TypeScript SDK client is at the
//! end (it needs `npm ci` in tests/mcp-sdk).

use std::collections::HashMap;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::upstream::Upstream;
use crate::common::{free_port, Keygate, TempDir};

const REDIRECT: &str = "http://127.0.0.1:4999/callback";
const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

/// A client that shows redirects instead of following them.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// The dev config for a gateway on `port`, with `extra` TOML appended.
fn config(port: u16, data: &TempDir, dev_extra: &str, extra: &str) -> String {
    format!(
        r#"
[resource]
url = "http://127.0.0.1:{port}/mcp"
protected_paths = ["/mcp"]
scopes_supported = ["twenty:read", "twenty:write"]

[[issuers]]
issuer = "http://127.0.0.1:{port}/dev-issuer"
jwks_file = "{MANIFEST}/config/dev/jwks.json"
algorithms = ["RS256"]

[dev]
issuer = "http://127.0.0.1:{port}/dev-issuer"
signing_key_file = "{MANIFEST}/config/dev/signing-key.pem"
authorization_server = true
{dev_extra}

[keys]
encryption_secret = "dev oauth test secret, long enough to pass the check"
data_dir = "{data}"

[policy]
default_scopes = "twenty"

[auth.identity_headers]
user = "X-Keygate-User"
org = "X-Keygate-Org"
{extra}
"#,
        data = data.path().display(),
    )
}

/// A running gateway with the dev authorization server, in front of an MCP upstream.
struct DevGateway {
    gw: Keygate,
    upstream: Upstream,
    issuer: String,
    resource: String,
}

async fn start() -> DevGateway {
    let upstream = Upstream::start_mcp().await;
    let port = free_port();
    let data = TempDir::new("dev-oauth");
    let toml = config(port, &data, "", "");
    let gw = Keygate::start_on(port, &toml, &upstream.url(), &[])
        .await
        .keep(data);
    gw.wait_ready().await;
    DevGateway {
        issuer: format!("http://127.0.0.1:{port}/dev-issuer"),
        resource: format!("http://127.0.0.1:{port}/mcp"),
        gw,
        upstream,
    }
}

struct Pkce {
    verifier: String,
    challenge: String,
}

fn pkce(seed: &str) -> Pkce {
    let verifier = format!("{seed}-verifier-0123456789-abcdefghijklmnopqrstuvwxyz");
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    Pkce {
        verifier,
        challenge,
    }
}

async fn get_json(url: &str) -> Value {
    let resp = http().get(url).send().await.expect("request");
    assert_eq!(resp.status(), 200, "GET {url}");
    resp.json().await.expect("json")
}

async fn register(d: &DevGateway, redirect: &str) -> reqwest::Response {
    http()
        .post(format!("{}/register", d.issuer))
        .json(&json!({
            "redirect_uris": [redirect],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "client_name": "dev oauth test",
        }))
        .send()
        .await
        .expect("register")
}

async fn client_id(d: &DevGateway) -> String {
    let resp = register(d, REDIRECT).await;
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.expect("json");
    body["client_id"].as_str().expect("client_id").to_string()
}

/// `GET /authorize` with these parameters (`None` leaves one out).
async fn authorize_page(d: &DevGateway, params: &[(&str, Option<&str>)]) -> reqwest::Response {
    let query: Vec<(&str, &str)> = params
        .iter()
        .filter_map(|(k, v)| v.map(|v| (*k, v)))
        .collect();
    http()
        .get(format!("{}/authorize", d.issuer))
        .query(&query)
        .send()
        .await
        .expect("authorize")
}

/// The standard authorization request parameters.
fn auth_params<'a>(
    client_id: &'a str,
    challenge: &'a str,
    resource: &'a str,
) -> Vec<(&'static str, Option<&'a str>)> {
    vec![
        ("response_type", Some("code")),
        ("client_id", Some(client_id)),
        ("redirect_uri", Some(REDIRECT)),
        ("code_challenge", Some(challenge)),
        ("code_challenge_method", Some("S256")),
        ("resource", Some(resource)),
        ("scope", Some("twenty:read twenty:write")),
        ("state", Some("st-123")),
    ]
}

/// The hidden `request` field of the consent page.
fn form_request(html: &str) -> String {
    let at = html
        .find("name=\"request\" value=\"")
        .unwrap_or_else(|| panic!("no request field in {html}"));
    let rest = &html[at + "name=\"request\" value=\"".len()..];
    rest[..rest.find('"').expect("closing quote")].to_string()
}

/// The page's form posted with `user`, `org`, `scope`; the 303 `Location`'s query.
async fn consent(d: &DevGateway, html: &str, user: &str, scope: &str) -> HashMap<String, String> {
    let resp = http()
        .post(format!("{}/authorize", d.issuer))
        .form(&[
            ("request", form_request(html).as_str()),
            ("user", user),
            ("org", "org_dev"),
            ("scope", scope),
        ])
        .send()
        .await
        .expect("consent");
    assert_eq!(resp.status(), 303);
    let location = resp.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(location.starts_with(REDIRECT), "{location}");
    let url = url::Url::parse(&location).expect("location url");
    url.query_pairs().into_owned().collect()
}

/// A fresh code for a registered client: page, form, redirect.
async fn code_for(d: &DevGateway, client_id: &str, p: &Pkce) -> String {
    let page = authorize_page(d, &auth_params(client_id, &p.challenge, &d.resource)).await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("html");
    let q = consent(d, &html, "user_alice", "twenty:read twenty:write").await;
    assert_eq!(q.get("state").map(String::as_str), Some("st-123"));
    q["code"].clone()
}

async fn token(d: &DevGateway, form: &[(&str, &str)]) -> reqwest::Response {
    http()
        .post(format!("{}/token", d.issuer))
        .form(form)
        .send()
        .await
        .expect("token")
}

async fn exchange(
    d: &DevGateway,
    client_id: &str,
    code: &str,
    verifier: &str,
) -> reqwest::Response {
    token(
        d,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code_verifier", verifier),
            ("redirect_uri", REDIRECT),
            ("client_id", client_id),
            ("resource", &d.resource),
        ],
    )
    .await
}

async fn assert_oauth_error(resp: reqwest::Response, error: &str) {
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], error, "{body}");
}

async fn mcp(d: &DevGateway, token: &str, body: Value) -> reqwest::Response {
    http()
        .post(d.gw.at("/mcp"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .json(&body)
        .send()
        .await
        .expect("mcp")
}

#[tokio::test]
async fn an_mcp_client_gets_a_token_from_the_dev_issuer_and_calls_tools_with_its_stored_key() {
    let d = start().await;

    // No token: 401 pointing at the protected-resource metadata.
    let anon = http().post(d.gw.at("/mcp")).send().await.expect("request");
    assert_eq!(anon.status(), 401);
    let challenge = anon.headers()["www-authenticate"].to_str().expect("ascii");
    let prm_url = challenge
        .split("resource_metadata=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("resource_metadata in the challenge")
        .to_string();
    let prm = get_json(&prm_url).await;
    assert_eq!(prm["resource"], d.resource.as_str());
    assert_eq!(prm["authorization_servers"], json!([d.issuer]));

    // The authorization server's metadata, where clients look for it.
    let port = d.gw.port;
    let inserted =
        format!("http://127.0.0.1:{port}/.well-known/oauth-authorization-server/dev-issuer");
    let meta = get_json(&inserted).await;
    assert_eq!(meta["issuer"], d.issuer.as_str());
    assert_eq!(
        meta["authorization_endpoint"],
        format!("{}/authorize", d.issuer)
    );
    assert_eq!(meta["token_endpoint"], format!("{}/token", d.issuer));
    assert_eq!(
        meta["registration_endpoint"],
        format!("{}/register", d.issuer)
    );
    assert_eq!(meta["jwks_uri"], format!("{}/jwks.json", d.issuer));
    assert_eq!(meta["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(
        meta["token_endpoint_auth_methods_supported"],
        json!(["none"])
    );
    for alias in [
        format!("{}/.well-known/oauth-authorization-server", d.issuer),
        d.gw.at("/.well-known/oauth-authorization-server"),
    ] {
        assert_eq!(get_json(&alias).await, meta, "{alias}");
    }
    for oidc in [
        format!("http://127.0.0.1:{port}/.well-known/openid-configuration/dev-issuer"),
        format!("{}/.well-known/openid-configuration", d.issuer),
    ] {
        let doc = get_json(&oidc).await;
        assert_eq!(doc["issuer"], d.issuer.as_str(), "{oidc}");
        assert_eq!(doc["code_challenge_methods_supported"], json!(["S256"]));
    }
    let jwks = get_json(&format!("{}/jwks.json", d.issuer)).await;
    assert_eq!(jwks["keys"][0]["kid"], "keygate-dev");

    // Register, authorize, consent, exchange.
    let client_id = client_id(&d).await;
    let p = pkce("flow");
    let page = authorize_page(&d, &auth_params(&client_id, &p.challenge, &d.resource)).await;
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/html"));
    let html = page.text().await.expect("html");
    assert!(
        html.contains("value=\"twenty:read twenty:write\""),
        "{html}"
    );
    let q = consent(&d, &html, "user_alice", "twenty:read twenty:write").await;
    assert_eq!(q["state"], "st-123");
    let resp = exchange(&d, &client_id, &q["code"], &p.verifier).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let tokens: Value = resp.json().await.expect("json");
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["scope"], "twenty:read twenty:write");
    let access = tokens["access_token"]
        .as_str()
        .expect("access token")
        .to_string();
    let refresh = tokens["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_string();
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(access.split('.').next().expect("jwt header"))
            .expect("b64"),
    )
    .expect("header json");
    assert_eq!(header["typ"], "at+jwt");
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(access.split('.').nth(1).expect("jwt claims"))
            .expect("b64"),
    )
    .expect("claims json");
    assert_eq!(claims["aud"], d.resource.as_str());
    assert_eq!(claims["iss"], d.issuer.as_str());
    assert_eq!(claims["sub"], "user_alice");
    assert_eq!(claims["client_id"], client_id.as_str());

    // The signed-in user stores a key; tools run through keygate with it injected.
    let stored = http()
        .post(d.gw.at("/api/keys"))
        .bearer_auth(&access)
        .json(&json!({"apiKey": "tw_alice_key"}))
        .send()
        .await
        .expect("store key");
    assert_eq!(stored.status(), 200);
    let init = mcp(
        &d,
        &access,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"}}}),
    )
    .await;
    assert_eq!(init.status(), 200);
    let list = mcp(
        &d,
        &access,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    assert_eq!(list.status(), 200);
    let list: Value = list.json().await.expect("json");
    assert!(list["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .any(|t| t["name"] == "get_received_key"));
    let call = mcp(
        &d,
        &access,
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
               "params": {"name": "get_received_key", "arguments": {}}}),
    )
    .await;
    assert_eq!(call.status(), 200);
    let call: Value = call.json().await.expect("json");
    let text = call["result"]["content"][0]["text"].as_str().expect("text");
    assert!(text.contains("tw_alice_key"), "{text}");
    let seen = d.upstream.requests();
    assert!(seen.len() >= 3);
    for s in &seen {
        assert_eq!(s.query.as_deref(), Some("apiKey=tw_alice_key"));
        assert_eq!(s.header("x-keygate-user"), Some("user_alice"));
        let all = format!(
            "{:?} {:?} {}",
            s.headers,
            s.query,
            String::from_utf8_lossy(&s.body)
        );
        assert!(
            !all.contains(&access),
            "the access token reached the upstream"
        );
        assert!(
            !all.contains(&refresh),
            "the refresh token reached the upstream"
        );
    }

    // Refresh: works once; the old refresh token is refused after.
    let refreshed = token(
        &d,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", &client_id),
            ("resource", &d.resource),
        ],
    )
    .await;
    assert_eq!(refreshed.status(), 200);
    let refreshed: Value = refreshed.json().await.expect("json");
    let access2 = refreshed["access_token"]
        .as_str()
        .expect("access")
        .to_string();
    assert_ne!(refreshed["refresh_token"].as_str(), Some(refresh.as_str()));
    let list2 = mcp(
        &d,
        &access2,
        json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list"}),
    )
    .await;
    assert_eq!(list2.status(), 200);
    let again = token(
        &d,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", &client_id),
        ],
    )
    .await;
    assert_oauth_error(again, "invalid_grant").await;
}

#[tokio::test]
async fn the_token_endpoint_refuses_a_wrong_verifier_a_reused_code_and_a_wrong_redirect_or_resource(
) {
    let d = start().await;
    let client_id = client_id(&d).await;
    let p = pkce("refusals");

    // Wrong verifier: refused, and the code is spent.
    let code = code_for(&d, &client_id, &p).await;
    let wrong = exchange(&d, &client_id, &code, &pkce("other").verifier).await;
    assert_oauth_error(wrong, "invalid_grant").await;
    let after = exchange(&d, &client_id, &code, &p.verifier).await;
    assert_oauth_error(after, "invalid_grant").await;

    // Reused code: the first exchange works, the second is refused.
    let code = code_for(&d, &client_id, &p).await;
    assert_eq!(
        exchange(&d, &client_id, &code, &p.verifier).await.status(),
        200
    );
    let reused = exchange(&d, &client_id, &code, &p.verifier).await;
    assert_oauth_error(reused, "invalid_grant").await;

    // Another redirect_uri than the one the code was issued for.
    let code = code_for(&d, &client_id, &p).await;
    let other_redirect = token(
        &d,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("code_verifier", &p.verifier),
            ("redirect_uri", "http://127.0.0.1:4999/elsewhere"),
            ("client_id", &client_id),
        ],
    )
    .await;
    assert_oauth_error(other_redirect, "invalid_grant").await;

    // Another resource than the one the code was issued for.
    let code = code_for(&d, &client_id, &p).await;
    let other_resource = token(
        &d,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("code_verifier", &p.verifier),
            ("redirect_uri", REDIRECT),
            ("client_id", &client_id),
            ("resource", "https://elsewhere.example/mcp"),
        ],
    )
    .await;
    assert_oauth_error(other_resource, "invalid_target").await;

    // Another client than the one the code was issued to.
    let code = code_for(&d, &client_id, &p).await;
    let other_client_id = self::client_id(&d).await;
    let other_client = exchange(&d, &other_client_id, &code, &p.verifier).await;
    assert_oauth_error(other_client, "invalid_grant").await;

    // Unknown grants and garbage are refused with RFC 6749 errors.
    let unsupported = token(
        &d,
        &[
            ("grant_type", "password"),
            ("username", "x"),
            ("client_id", &client_id),
        ],
    )
    .await;
    assert_oauth_error(unsupported, "unsupported_grant_type").await;
}

#[tokio::test]
async fn the_authorize_endpoint_refuses_plain_or_missing_pkce_a_wrong_resource_and_unknown_redirects(
) {
    let d = start().await;
    let client_id = client_id(&d).await;
    let p = pkce("authorize");

    // Refusals after the client and redirect are known go back to the client as RFC 6749
    // errors on the redirect, never as a page that issues a code.
    let refused = |mut params: Vec<(&'static str, Option<&'static str>)>,
                   change: (&'static str, Option<&'static str>)| {
        for kv in params.iter_mut() {
            if kv.0 == change.0 {
                kv.1 = change.1;
            }
        }
        params
    };
    let base: Vec<(&'static str, Option<&'static str>)> = auth_params(
        Box::leak(client_id.clone().into_boxed_str()),
        Box::leak(p.challenge.clone().into_boxed_str()),
        Box::leak(d.resource.clone().into_boxed_str()),
    );
    for (change, error) in [
        (("code_challenge_method", Some("plain")), "invalid_request"),
        (("code_challenge_method", None), "invalid_request"),
        (("code_challenge", None), "invalid_request"),
        (
            ("resource", Some("https://elsewhere.example/mcp")),
            "invalid_target",
        ),
        (
            ("response_type", Some("token")),
            "unsupported_response_type",
        ),
    ] {
        let resp = authorize_page(&d, &refused(base.clone(), change)).await;
        assert_eq!(resp.status(), 303, "{change:?}");
        let location = resp.headers()["location"].to_str().expect("ascii");
        let url = url::Url::parse(location).expect("url");
        let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
        assert_eq!(
            q.get("error").map(String::as_str),
            Some(error),
            "{change:?}"
        );
        assert_eq!(q.get("state").map(String::as_str), Some("st-123"));
        assert!(!q.contains_key("code"));
    }

    // An unregistered redirect_uri or client is never redirected to.
    for change in [
        ("redirect_uri", Some("http://127.0.0.1:4999/callback/other")),
        ("redirect_uri", Some("https://attacker.example/callback")),
        ("client_id", Some("no-such-client")),
    ] {
        let resp = authorize_page(&d, &refused(base.clone(), change)).await;
        assert_eq!(resp.status(), 400, "{change:?}");
        assert!(!resp.headers().contains_key("location"));
    }

    // An oversized state is never echoed onto the redirect, even with another error.
    let long: &'static str = Box::leak("s".repeat(2_001).into_boxed_str());
    let oversized = refused(
        refused(base.clone(), ("state", Some(long))),
        ("response_type", Some("token")),
    );
    let resp = authorize_page(&d, &oversized).await;
    assert_eq!(resp.status(), 400);
    assert!(!resp.headers().contains_key("location"));

    // What the page echoes is escaped.
    let resp = authorize_page(
        &d,
        &refused(
            base.clone(),
            ("state", Some("\"><script>alert(1)</script>")),
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let html = resp.text().await.expect("html");
    assert!(!html.contains("<script>"), "{html}");
    assert!(html.contains("&lt;script&gt;"), "{html}");

    // A form for a request that was never shown is refused.
    let forged = http()
        .post(format!("{}/authorize", d.issuer))
        .form(&[("request", "forged"), ("user", "user_x"), ("scope", "")])
        .send()
        .await
        .expect("post");
    assert_eq!(forged.status(), 400);
}

#[tokio::test]
async fn registration_accepts_https_and_loopback_redirects_only() {
    let d = start().await;
    for ok in [
        "http://127.0.0.1:5000/cb",
        "http://localhost:6274/oauth/callback",
        "http://[::1]:8000/cb",
        "https://app.example.com/cb",
    ] {
        let resp = register(&d, ok).await;
        assert_eq!(resp.status(), 201, "{ok}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["redirect_uris"], json!([ok]));
        assert_eq!(body["token_endpoint_auth_method"], "none");
        assert!(body.get("client_secret").is_none());
    }
    for bad in [
        "http://app.example.com/cb",
        "javascript:alert(1)",
        "https://app.example.com/cb#frag",
        "not a url",
    ] {
        let resp = register(&d, bad).await;
        assert_eq!(resp.status(), 400, "{bad}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"], "invalid_redirect_uri", "{bad}");
    }
    let confidential = http()
        .post(format!("{}/register", d.issuer))
        .json(&json!({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "client_secret_basic"}))
        .send()
        .await
        .expect("register");
    assert_eq!(confidential.status(), 400);
    let too_big = http()
        .post(format!("{}/register", d.issuer))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"redirect_uris\":[\"{REDIRECT}\"],\"client_name\":\"{}\"}}",
            "x".repeat(64 * 1024)
        ))
        .send()
        .await
        .expect("register");
    assert_eq!(too_big.status(), 413);
}

fn load(toml: &str, listen: &str) -> Result<keygate::config::Settings, keygate::config::Problems> {
    let dir = TempDir::new("dev-oauth-config");
    let path = dir.join("keygate.toml");
    std::fs::write(&path, toml).expect("write");
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert("KEYGATE_LISTEN".into(), listen.into());
    vars.insert("KEYGATE_ADMIN_LISTEN".into(), "127.0.0.1:1".into());
    vars.insert("KEYGATE_UPSTREAM".into(), "http://127.0.0.1:2".into());
    keygate::app::configure(Some(&path), &vars).map(|c| c.settings)
}

fn assert_refused(
    result: Result<keygate::config::Settings, keygate::config::Problems>,
    says: &str,
) {
    let Err(problems) = result else {
        panic!("accepted; expected a dev.authorization_server problem saying {says:?}");
    };
    let hit = problems
        .0
        .iter()
        .find(|p| p.field.starts_with("dev.authorization_server"))
        .unwrap_or_else(|| panic!("no dev.authorization_server problem: {problems}"));
    assert!(hit.message.contains(says), "{problems}");
}

#[test]
fn the_dev_authorization_server_is_refused_next_to_clerk_other_issuers_or_a_public_listener() {
    let data = TempDir::new("dev-oauth-data");
    let port = 18080;
    // The plain dev setup is accepted.
    load(&config(port, &data, "", ""), "127.0.0.1:18080").expect("dev setup is valid");
    load(&config(port, &data, "", ""), "[::1]:18080").expect("dev setup is valid on ::1");

    // Clerk configured.
    let clerk = config(
        port,
        &data,
        "",
        "[clerk]\npublishable_key = \"pk_test_Zm9vLmNsZXJrLmFjY291bnRzLmRldiQ\"\nsecret_key = \"sk_test_abcdefghijklmnopqrstuvwxyz\"\n",
    );
    assert_refused(load(&clerk, "127.0.0.1:18080"), "Clerk");

    // Another issuer trusted next to the dev one.
    let other = config(
        port,
        &data,
        "",
        "[[issuers]]\nissuer = \"https://login.example.com\"\njwks_url = \"https://login.example.com/jwks\"\n",
    );
    assert_refused(load(&other, "127.0.0.1:18080"), "https://login.example.com");

    // A listener others can reach, unless explicitly allowed.
    assert_refused(
        load(&config(port, &data, "", ""), "0.0.0.0:18080"),
        "loopback",
    );
    assert_refused(
        load(&config(port, &data, "", ""), "192.0.2.10:18080"),
        "loopback",
    );
    load(
        &config(port, &data, "allow_non_loopback = true", ""),
        "0.0.0.0:18080",
    )
    .expect("explicitly allowed");
    // The override covers the listener only, never a production issuer.
    let both = config(port, &data, "allow_non_loopback = true", "[clerk]\npublishable_key = \"pk_test_Zm9vLmNsZXJrLmFjY291bnRzLmRldiQ\"\nsecret_key = \"sk_test_abcdefghijklmnopqrstuvwxyz\"\n");
    assert_refused(load(&both, "127.0.0.1:18080"), "Clerk");

    // Off unless asked for.
    let off = config(port, &data, "", "").replace("authorization_server = true\n", "");
    let settings = load(&off, "0.0.0.0:18080").expect("no authorization server, no refusal");
    assert!(!settings.dev.expect("dev").authorization_server);
}

#[tokio::test]
async fn without_the_option_the_dev_issuer_paths_are_not_served() {
    let upstream = Upstream::start_mcp().await;
    let port = free_port();
    let data = TempDir::new("dev-oauth-off");
    let toml = config(port, &data, "", "").replace("authorization_server = true\n", "");
    let gw = Keygate::start_on(port, &toml, &upstream.url(), &[])
        .await
        .keep(data);
    gw.wait_ready().await;
    let meta = http()
        .get(gw.at("/.well-known/oauth-authorization-server/dev-issuer"))
        .send()
        .await
        .expect("request");
    assert_ne!(meta.status(), 200);
    let reg = http()
        .post(gw.at("/dev-issuer/register"))
        .json(&json!({"redirect_uris": [REDIRECT]}))
        .send()
        .await
        .expect("request");
    assert_ne!(reg.status(), 201);
}

/// Run `node tests/mcp-sdk/oauth-flow.mjs <args>`, at most `limit`; its stdout as JSON.
fn run_sdk_script(args: &[&str], limit: Duration) -> Value {
    use std::process::{Command, Stdio};
    let dir = std::path::Path::new(MANIFEST).join("tests/mcp-sdk");
    assert!(
        dir.join("node_modules/@modelcontextprotocol/sdk/package.json")
            .exists(),
        "the MCP SDK is not installed: run scripts/test (or `npm ci --prefix tests/mcp-sdk`)"
    );
    let mut child = Command::new("node")
        .arg(dir.join("oauth-flow.mjs"))
        .args(args)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (scripts/test installs Node.js)");
    let deadline = std::time::Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait for node").is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("node output");
            panic!(
                "the SDK script did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("node output");
    assert!(
        out.status.success(),
        "the SDK script failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "SDK script output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_mcp_sdk_client_authorizes_and_calls_tools_through_keygate() {
    let d = start().await;
    let url = d.gw.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_sdk_script(&[&url, "tw_sdk_key"], Duration::from_secs(60))
    })
    .await
    .expect("script thread");

    assert_eq!(out["first"], "unauthorized", "{out}");
    assert_eq!(
        out["steps"],
        json!(["registered", "authorize", "tokens"]),
        "{out}"
    );
    assert_eq!(out["authorize"]["code_challenge_method"], "S256", "{out}");
    assert_eq!(out["authorize"]["resource"], d.resource.as_str(), "{out}");
    assert_eq!(
        out["authorize"]["scope"], "twenty:read twenty:write",
        "{out}"
    );
    assert_eq!(out["token_type"], "Bearer", "{out}");
    assert_eq!(out["has_refresh_token"], true, "{out}");
    assert_eq!(out["claims"]["iss"], d.issuer.as_str(), "{out}");
    assert_eq!(out["claims"]["aud"], d.resource.as_str(), "{out}");
    assert_eq!(out["claims"]["sub"], "user_dev", "{out}");
    assert_eq!(out["claims"]["org"], "org_sdk", "{out}");
    assert_eq!(out["server"], "keygate-echo-upstream", "{out}");
    assert_eq!(out["tools"], json!(["get_received_key", "echo"]), "{out}");
    let text = out["call_text"].as_str().expect("call text");
    assert!(text.contains("\"tw_sdk_key\""), "{text}");

    // What the upstream saw: the stored key on every MCP request, the identity, no token.
    let seen: Vec<_> = d
        .upstream
        .requests()
        .into_iter()
        .filter(|s| s.path == "/mcp")
        .collect();
    let methods: Vec<String> = seen
        .iter()
        .filter(|s| s.method == "POST")
        .filter_map(|s| serde_json::from_slice::<Value>(&s.body).ok())
        .filter_map(|b| b["method"].as_str().map(str::to_string))
        .collect();
    for m in [
        "initialize",
        "notifications/initialized",
        "tools/list",
        "tools/call",
    ] {
        assert!(methods.iter().any(|x| x == m), "{m} not seen: {methods:?}");
    }
    for s in &seen {
        assert_eq!(s.query.as_deref(), Some("apiKey=tw_sdk_key"));
        assert_eq!(s.header("x-keygate-user"), Some("user_dev"));
        assert_eq!(s.header("x-keygate-org"), Some("org_sdk"));
        assert!(s.header("authorization").is_none());
        let all = format!(
            "{:?} {:?} {}",
            s.headers,
            s.query,
            String::from_utf8_lossy(&s.body)
        );
        assert!(!all.contains("eyJ"), "a JWT reached the upstream: {all}");
    }
}
