//! Self-checks of the harness fakes, using only reqwest and jsonwebtoken (no keygate code):
//! if these fail, the keygate tests built on the fakes prove nothing.

use std::io::{Read as _, Write as _};
use std::net::TcpStream as StdTcpStream;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use crate::common::clerk::{random_token, FakeClerk, OpaqueSpec};
use crate::common::keys::{self, SigningKey};
use crate::common::upstream::{websocket_accept, Upstream};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

fn validation(alg: Algorithm, iss: &str, aud: Option<&str>) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = 5;
    v.validate_nbf = true;
    v.set_issuer(&[iss]);
    v.set_required_spec_claims(&["exp", "nbf", "iss", "sub"]);
    match aud {
        Some(aud) => v.set_audience(&[aud]),
        None => v.validate_aud = false,
    }
    v
}

async fn fetch_jwks(clerk: &FakeClerk) -> JwkSet {
    let url = format!("{}/.well-known/jwks.json", clerk.url());
    let resp = client().get(url).send().await.expect("GET jwks");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("JWKS parses as a JwkSet")
}

/// Verify `token` the way a careful resource server would: key chosen by `kid` from the JWKS.
fn verify_with(jwks: &JwkSet, token: &str, v: &Validation) -> jsonwebtoken::errors::Result<Value> {
    let kid = decode_header(token)?.kid.expect("token has a kid");
    let jwk = jwks.find(&kid).expect("kid is published");
    decode::<Value>(token, &DecodingKey::from_jwk(jwk)?, v).map(|d| d.claims)
}

#[tokio::test]
async fn jwks_tokens_verify_rs256_and_es256() {
    let rsa = SigningKey::rsa_a("kid-rsa-a");
    let ec = SigningKey::ec_a("kid-ec-a");
    let clerk = FakeClerk::start(vec![rsa.clone(), ec.clone()]).await;
    let jwks = fetch_jwks(&clerk).await;
    assert_eq!(clerk.jwks_fetches(), 1);
    assert_eq!(jwks.keys.len(), 2);
    let published = clerk_jwks_json(&clerk).await;
    assert_eq!(published["keys"][0]["use"], "sig");
    assert_eq!(published["keys"][0]["alg"], "RS256");
    assert_eq!(published["keys"][1]["crv"], "P-256");

    let iss = clerk.url();
    let session = rsa.sign(
        json!({}),
        &keys::clerk_session_claims(&iss, "user_1", "sess_1"),
    );
    let claims = verify_with(&jwks, &session, &validation(Algorithm::RS256, &iss, None))
        .expect("RS256 session token verifies against the served JWKS");
    assert_eq!(claims["sid"], "sess_1");
    assert_eq!(claims["v"], 2);
    assert_eq!(
        decode_header(&session).expect("header").typ.as_deref(),
        Some("JWT")
    );

    let aud = "http://127.0.0.1:9/mcp";
    let at = ec.sign(
        json!({"typ": "at+jwt"}),
        &keys::access_token_claims(&iss, "user_1", Some(aud), "mcp:read mcp:write"),
    );
    let claims = verify_with(&jwks, &at, &validation(Algorithm::ES256, &iss, Some(aud)))
        .expect("ES256 access token verifies against the served JWKS");
    assert_eq!(claims["scope"], "mcp:read mcp:write");
    assert!(claims["jti"].as_str().expect("jti").starts_with("oat_"));
    assert_eq!(
        decode_header(&at).expect("header").typ.as_deref(),
        Some("at+jwt")
    );

    // The same token checks out against the committed public PEM too.
    let pem_key = DecodingKey::from_ec_pem(ec.public_pem()).expect("EC public PEM");
    decode::<Value>(
        &at,
        &pem_key,
        &validation(Algorithm::ES256, &iss, Some(aud)),
    )
    .expect("public PEM matches the private fixture");
}

async fn clerk_jwks_json(clerk: &FakeClerk) -> Value {
    let url = format!("{}/.well-known/jwks.json", clerk.url());
    let resp = client().get(url).send().await.expect("GET jwks");
    resp.json().await.expect("JWKS is JSON")
}

#[tokio::test]
async fn attack_tokens_are_what_they_claim() {
    let rsa = SigningKey::rsa_a("kid-a");
    let iss = "http://issuer.test";
    let claims = keys::clerk_session_claims(iss, "user_1", "sess_1");
    let v = validation(Algorithm::RS256, iss, None);
    let pub_key = DecodingKey::from_rsa_pem(rsa.public_pem()).expect("RSA public PEM");

    let good = rsa.sign(json!({}), &claims);
    decode::<Value>(&good, &pub_key, &v).expect("honest token verifies");

    let none = keys::unsigned_token(&json!({"alg": "none", "typ": "JWT"}), &claims);
    assert!(none.ends_with('.'));
    assert!(decode::<Value>(&none, &pub_key, &v).is_err());

    let confused = keys::hs256_token(rsa.public_pem(), &json!({"kid": "kid-a"}), &claims);
    assert!(decode::<Value>(&confused, &pub_key, &v).is_err());
    let mut hs = validation(Algorithm::HS256, iss, None);
    hs.algorithms = vec![Algorithm::HS256];
    decode::<Value>(&confused, &DecodingKey::from_secret(rsa.public_pem()), &hs)
        .expect("HS256 token is really keyed with the public PEM bytes");

    let mut forged = claims.clone();
    forged["sub"] = json!("user_admin");
    let tampered = keys::tamper_payload(&good, &forged);
    assert_eq!(keys::payload_of(&tampered)["sub"], "user_admin");
    assert!(decode::<Value>(&tampered, &pub_key, &v).is_err());

    let no_kid = rsa.sign(
        json!({"kid": null, "jku": "http://evil.test/jwks"}),
        &claims,
    );
    let header = decode_header(&no_kid).expect("header");
    assert_eq!(header.kid, None);
    assert_eq!(header.jku.as_deref(), Some("http://evil.test/jwks"));

    let other = SigningKey::rsa_b("kid-a").sign(json!({}), &claims);
    assert!(
        decode::<Value>(&other, &pub_key, &v).is_err(),
        "key b is a different key"
    );
}

#[tokio::test]
async fn key_rotation_metadata_and_backend_jwks() {
    let clerk = FakeClerk::start(vec![SigningKey::rsa_a("old")]).await;
    let pk = clerk.publishable_key();
    let fapi = STANDARD
        .decode(pk.strip_prefix("pk_test_").expect("pk_test_ prefix"))
        .expect("base64");
    assert_eq!(fapi, format!("{}$", clerk.addr()).into_bytes());
    clerk.set_keys(vec![SigningKey::rsa_b("new")]);
    let jwks = fetch_jwks(&clerk).await;
    assert!(jwks.find("old").is_none() && jwks.find("new").is_some());

    let http = client();
    let backend = format!("{}/v1/jwks", clerk.url());
    let denied = http.get(&backend).send().await.expect("GET /v1/jwks");
    assert_eq!(denied.status(), 401);
    let body: Value = denied.json().await.expect("error JSON");
    assert_eq!(body["errors"][0]["code"], "clerk_key_invalid");
    let ok = http
        .get(&backend)
        .bearer_auth(clerk.secret_key())
        .send()
        .await
        .expect("GET /v1/jwks");
    assert_eq!(ok.status(), 200);
    let body: Value = ok.json().await.expect("JWKS JSON");
    assert_eq!(body["keys"][0]["kid"], "new");
    assert_eq!(clerk.jwks_fetches(), 3);

    for path in ["oauth-authorization-server", "openid-configuration"] {
        let url = format!("{}/.well-known/{path}", clerk.url());
        let doc: Value = http
            .get(url)
            .send()
            .await
            .expect("GET metadata")
            .json()
            .await
            .expect("JSON");
        assert_eq!(doc["issuer"], clerk.url());
        assert_eq!(
            doc["token_endpoint"],
            format!("{}/oauth/token", clerk.url())
        );
        assert_eq!(
            doc["jwks_uri"],
            format!("{}/.well-known/jwks.json", clerk.url())
        );
        assert_eq!(doc["code_challenge_methods_supported"], json!(["S256"]));
    }
    assert_eq!(clerk.metadata_fetches(), 2);
}

async fn post_verify(clerk: &FakeClerk, path: &str, body: Value, auth: bool) -> (u16, Value) {
    let mut req = client().post(format!("{}{path}", clerk.url())).json(&body);
    if auth {
        req = req.bearer_auth(clerk.secret_key());
    }
    let resp = req.send().await.expect("POST verify");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

#[tokio::test]
async fn opaque_verify_endpoints_answer_like_clerk() {
    let clerk = FakeClerk::start(vec![]).await;
    let (oat, mt, ak) = (
        random_token("oat_"),
        random_token("mt_"),
        random_token("ak_"),
    );
    clerk.add_opaque(&oat, OpaqueSpec::new("user_1", &["mcp:read"]));
    clerk.add_opaque(&mt, OpaqueSpec::new("mch_1", &["mch_2"]));
    clerk.add_opaque(
        &ak,
        OpaqueSpec {
            subject: "org_1".into(),
            scopes: vec!["read".into(), "write".into()],
            expires_at_ms: None,
            revoked: false,
            expired: false,
            client_id: String::new(),
        },
    );

    let oauth = "/v1/oauth_applications/access_tokens/verify";
    let (status, body) = post_verify(&clerk, oauth, json!({"access_token": oat}), true).await;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "clerk_idp_oauth_access_token");
    assert_eq!(body["subject"], "user_1");
    assert_eq!(body["client_id"], keys::TEST_CLIENT_ID);
    assert_eq!(body["scopes"], json!(["mcp:read"]));
    assert_eq!(
        (body["revoked"].clone(), body["expired"].clone()),
        (json!(false), json!(false))
    );
    let expiration = body["expiration"].as_i64().expect("expiration");
    assert!(
        expiration > keys::now_ms(),
        "expiration is in Unix milliseconds"
    );
    assert!(body["id"].as_str().expect("id").starts_with("oat_"));

    let (status, body) =
        post_verify(&clerk, "/v1/m2m_tokens/verify", json!({"token": mt}), true).await;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "machine_to_machine_token");
    assert_eq!(body["subject"], "mch_1");
    assert_eq!(body["claims"], Value::Null);
    clerk.set_opaque_claims(&mt, json!({"team": "ops"}));
    let (_, body) = post_verify(&clerk, "/v1/m2m_tokens/verify", json!({"token": mt}), true).await;
    assert_eq!(body["claims"], json!({"team": "ops"}));

    let (status, body) =
        post_verify(&clerk, "/v1/api_keys/verify", json!({"secret": ak}), true).await;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "api_key");
    assert_eq!(body["type"], "api_key");
    assert_eq!(body["subject"], "org_1");
    assert_eq!(body["expiration"], Value::Null);

    clerk.revoke(&oat);
    let (status, body) = post_verify(&clerk, oauth, json!({"access_token": oat}), true).await;
    assert_eq!((status, body["revoked"].clone()), (200, json!(true)));
    assert_eq!(body["revocation_reason"], "Revoked by user");

    let past = OpaqueSpec {
        expires_at_ms: Some(keys::now_ms() - 1_000),
        ..OpaqueSpec::default()
    };
    let stale = random_token("oat_");
    clerk.add_opaque(&stale, past);
    clerk.set_opaque_aud(&stale, &["http://127.0.0.1:9/mcp"]);
    let (_, body) = post_verify(&clerk, oauth, json!({"access_token": stale}), true).await;
    assert_eq!(body["expired"], true);
    assert_eq!(body["aud"], json!(["http://127.0.0.1:9/mcp"]));

    let (status, body) =
        post_verify(&clerk, oauth, json!({"access_token": "oat_unknown"}), true).await;
    assert_eq!(status, 404);
    assert!(body["errors"][0]["code"].is_string() && body["clerk_trace_id"].is_string());
    let (status, _) = post_verify(&clerk, "/v1/api_keys/verify", json!({"secret": mt}), true).await;
    assert_eq!(
        status, 404,
        "an M2M token is unknown to the API-key endpoint"
    );

    let (status, body) =
        post_verify(&clerk, "/v1/api_keys/verify", json!({"secret": ak}), false).await;
    assert_eq!(status, 401);
    assert_eq!(body["errors"][0]["code"], "clerk_key_invalid");
    assert_eq!(clerk.verify_calls(), 9);
}

#[tokio::test]
async fn clerk_faults_down_and_slow() {
    let clerk = FakeClerk::start(vec![SigningKey::rsa_a("a")]).await;
    let oat = random_token("oat_");
    clerk.add_opaque(&oat, OpaqueSpec::new("user_1", &[]));
    clerk.set_down(true);
    let resp = client()
        .get(format!("{}/.well-known/jwks.json", clerk.url()))
        .send()
        .await
        .expect("GET jwks");
    assert_eq!(resp.status(), 503);
    clerk.set_down(false);

    clerk.set_verify_delay(Duration::from_millis(300));
    let started = Instant::now();
    let path = "/v1/oauth_applications/access_tokens/verify";
    let (status, _) = post_verify(&clerk, path, json!({"access_token": oat}), true).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    let url = clerk.url();
    clerk.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        client().get(url).send().await.is_err(),
        "stopped server refuses connections"
    );
}

#[tokio::test]
async fn upstream_records_and_answers() {
    let up = Upstream::start().await;
    let http = client();
    let rpc = json!({"jsonrpc": "2.0", "id": 7, "method": "initialize", "params": {}});
    let resp = http
        .post(format!("{}/mcp?apiKey=secret", up.url()))
        .header("x-test", "yes")
        .json(&rpc)
        .send()
        .await
        .expect("POST /mcp");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["mcp-session-id"], "upstream-session-1");
    let reply: Value = resp.json().await.expect("JSON-RPC reply");
    assert_eq!(
        reply,
        json!({"jsonrpc": "2.0", "id": 7, "result": {"ok": true}})
    );

    let seen = up.last().expect("request recorded");
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/mcp");
    assert_eq!(seen.query.as_deref(), Some("apiKey=secret"));
    assert_eq!(seen.header("x-test"), Some("yes"));
    assert_eq!(seen.json(), rpc);

    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let resp = http
        .post(format!("{}/mcp", up.url()))
        .json(&note)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 202);

    let health: Value = http
        .get(format!("{}/health", up.url()))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(health, json!({"status": "healthy", "service": "upstream"}));
    let other: Value = http
        .delete(format!("{}/x/y", up.url()))
        .send()
        .await
        .expect("DELETE")
        .json()
        .await
        .expect("JSON");
    assert_eq!(other, json!({"path": "/x/y", "method": "DELETE"}));

    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let echoed = http
        .post(format!("{}/echo-body", up.url()))
        .body(big.clone())
        .send()
        .await
        .expect("POST /echo-body")
        .bytes()
        .await
        .expect("echoed body");
    assert_eq!(echoed.as_ref(), big.as_slice());
    assert_eq!(up.last().expect("recorded").body.as_ref(), big.as_slice());

    let started = Instant::now();
    let slow = http
        .post(format!("{}/slow?ms=200", up.url()))
        .send()
        .await
        .expect("POST /slow");
    assert_eq!(slow.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(up.count(), 6);
}

#[tokio::test]
async fn upstream_sse_releases_events_one_at_a_time() {
    let up = Upstream::start().await;
    let mut resp = client()
        .get(format!("{}/sse", up.url()))
        .send()
        .await
        .expect("GET /sse");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    // The stream opened before the test asked for its sender: the rendezvous works both ways.
    let tx = up.sse_sender();
    for event in ["first", "second", "third"] {
        let nothing = tokio::time::timeout(Duration::from_millis(100), resp.chunk()).await;
        assert!(nothing.is_err(), "no event arrives before it is sent");
        tx.send(event.to_owned()).expect("stream alive");
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .expect("event arrives promptly")
            .expect("read chunk")
            .expect("stream still open");
        assert_eq!(
            std::str::from_utf8(&chunk).expect("utf-8"),
            format!("data: {event}\n\n")
        );
    }
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .expect("ends");
    assert!(end.expect("clean end").is_none());
}

/// Send `request` on `stream` and read one response head (plus a Content-Length body).
fn exchange(stream: &mut StdTcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).expect("write request");
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    while !data.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("read response head");
        data.push(byte[0]);
    }
    let head = String::from_utf8(data).expect("ASCII head");
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .map_or(0, |v| v.parse::<usize>().expect("length"));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("read body");
    head
}

#[tokio::test]
async fn upstream_websocket_echoes_even_on_a_reused_connection() {
    assert_eq!(
        websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    let up = Upstream::start().await;
    let addr = up.addr();
    tokio::task::spawn_blocking(move || {
        let mut s = StdTcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let head = exchange(&mut s, "GET /health HTTP/1.1\r\nHost: up\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let head = exchange(
            &mut s,
            "GET /ws HTTP/1.1\r\nHost: up\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        );
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        for msg in [&b"\x81\x05hello"[..], b"raw bytes, both ways"] {
            s.write_all(msg).expect("write frame");
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).expect("read echo");
            assert_eq!(back, msg);
        }
    })
    .await
    .expect("websocket exchange");
    assert_eq!(up.connections(), 1);
    assert_eq!(up.count(), 2);
}
