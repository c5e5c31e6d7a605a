//! The key vault end to end: `/api/keys`, injection upstream, the embedded and Redis stores,
//! fail-closed decryption, rotation, cross-replica invalidation, Redis outages, and import of
//! the Node server's records.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::backends::Backends;
use crate::common::keys;
use crate::common::redis::RedisServer;
use crate::common::{client, Keygate, TempDir};

const SECRET_A: &str = "3f8a1c9e57b2d4067e1fa93c28d5b6409c7e2a15f3b8d06e4a91c7253df80b6e";
const SECRET_B: &str = "a6c3e91f0b7d2485f16e8c3a9d40b2e75c1f8a63e2d9047b8f35a1c6e02d97b4";

/// The shared backends, and gateways in front of them with the vault on.
struct Env(Backends);

impl std::ops::Deref for Env {
    type Target = Backends;
    fn deref(&self) -> &Backends {
        &self.0
    }
}

impl Env {
    async fn new() -> Env {
        Env(Backends::start().await)
    }

    fn config(&self, keys_toml: &str) -> String {
        self.0.config(&format!("[keys]\n{keys_toml}"))
    }

    /// A gateway with an embedded store in a fresh directory.
    async fn embedded(&self, extra_keys: &str) -> Keygate {
        let dir = TempDir::new("vault");
        let gw = Keygate::start(
            &self.config(&format!(
                "encryption_secret = \"{SECRET_A}\"\ndata_dir = \"{}\"\n{extra_keys}",
                dir.path().display()
            )),
            &self.upstream.url(),
        )
        .await
        .keep(dir);
        gw.wait_ready().await;
        gw
    }

    async fn redis(&self, redis: &RedisServer, env: &[(&str, &str)]) -> Keygate {
        let mut vars = vec![("REDIS_URL", redis.url())];
        vars.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut all = vec![("API_KEY_ENCRYPTION_SECRET", SECRET_A)];
        all.extend(vars);
        Keygate::start_with_env(&self.config(""), &self.upstream.url(), &all).await
    }
}

async fn put_key(gw: &Keygate, token: &str, body: Value) -> reqwest::Response {
    client()
        .post(gw.at("/api/keys"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("request")
}

/// Store `api_key` as `user`'s key through `/api/keys`, asserting success.
async fn store_key(gw: &Keygate, env: &Env, user: &str, api_key: &str) {
    let resp = put_key(gw, &env.session(user), json!({ "apiKey": api_key })).await;
    assert_eq!(resp.status(), 200, "storing {user}'s key");
}

/// `GET /api/keys` as `token`, as JSON.
async fn key_metadata(gw: &Keygate, token: &str) -> Value {
    let resp = client()
        .get(gw.at("/api/keys"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("json")
}

async fn mcp(gw: &Keygate, token: &str, query: &str) -> reqwest::Response {
    client()
        .post(gw.at(&format!("/mcp{query}")))
        .bearer_auth(token)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .send()
        .await
        .expect("request")
}

fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[tokio::test]
async fn store_read_inject_delete_with_the_embedded_store() {
    let env = Env::new().await;
    let gw = env.embedded("").await;
    let session = env.session("user_a");

    let empty: Value = key_metadata(&gw, &session).await;
    assert_eq!(empty, json!({"hasKey": false}));

    let resp = put_key(
        &gw,
        &session,
        json!({"apiKey": "tw_live_secret_a", "baseUrl": "https://api.twenty.com"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"success": true, "message": "API key stored successfully"})
    );

    let meta = client()
        .get(gw.at("/api/keys"))
        .bearer_auth(&session)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    assert!(!meta.contains("tw_live_secret_a"), "the key was echoed");
    let meta: Value = serde_json::from_str(&meta).expect("json");
    assert_eq!(meta["hasKey"], true);
    assert_eq!(meta["baseUrl"], "https://api.twenty.com");
    assert!(meta["updatedAt"].as_str().expect("time").ends_with('Z'));

    // The user's access token on the MCP route: the key goes upstream, the token does not.
    let token = env.access("user_a");
    let resp = mcp(
        &gw,
        &token,
        "?apiKey=client_pick&baseUrl=https://evil.example.com",
    )
    .await;
    assert_eq!(resp.status(), 200);
    let seen = env.upstream.last().expect("forwarded");
    assert_eq!(
        query_pairs(seen.query.as_deref()),
        vec![
            ("apiKey".to_string(), "tw_live_secret_a".to_string()),
            ("baseUrl".to_string(), "https://api.twenty.com".to_string()),
        ]
    );
    assert!(seen.headers.get("authorization").is_none());

    // Another user has no key: 400 in the Node server's shape, upstream not contacted.
    let before = env.upstream.count();
    let resp = mcp(&gw, &env.access("user_b"), "").await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"error": "No API key configured", "error_description": "Please configure your Twenty API key first"})
    );
    assert_eq!(env.upstream.count(), before);

    let resp = client()
        .delete(gw.at("/api/keys"))
        .bearer_auth(&session)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"success": true, "message": "API key deleted successfully"})
    );
    assert_eq!(mcp(&gw, &token, "").await.status(), 400);
}

#[tokio::test]
async fn api_keys_rejects_bad_input_with_named_rules() {
    let env = Env::new().await;
    let gw = env.embedded("max_body_bytes = 1024\n").await;
    let session = env.session("user_a");
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            client()
                .post(gw.at("/api/keys"))
                .bearer_auth(&session)
                .body("{nope"),
            400,
            "Invalid JSON body",
        ),
        (
            client()
                .post(gw.at("/api/keys"))
                .bearer_auth(&session)
                .json(&json!({})),
            400,
            "API key is required",
        ),
        (
            client()
                .post(gw.at("/api/keys"))
                .bearer_auth(&session)
                .json(&json!({"apiKey": "k", "baseUrl": "https://evil.example.com"})),
            400,
            "baseUrl host is not allowed; allowed hosts: api.twenty.com",
        ),
        (
            client()
                .post(gw.at("/api/keys"))
                .bearer_auth(&session)
                .body(format!("{{\"apiKey\":\"{}\"}}", "k".repeat(2000))),
            413,
            "Request body is too large",
        ),
        (
            client()
                .put(gw.at("/api/keys"))
                .bearer_auth(&session)
                .body("{}"),
            405,
            "Method not allowed",
        ),
        (
            client().get(gw.at("/api/keys")),
            401,
            "missing bearer token",
        ),
    ];
    for (req, status, description) in cases {
        let resp = req.send().await.expect("request");
        assert_eq!(resp.status(), status, "{description}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error_description"], description);
    }
    assert_eq!(env.upstream.count(), 0);
}

#[tokio::test]
async fn the_fallback_key_serves_users_without_their_own() {
    let env = Env::new().await;
    let gw = env
        .embedded("fallback_api_key = \"tw_shared_key\"\ndefault_base_url = \"https://crm.example.com\"\n")
        .await;
    assert_eq!(mcp(&gw, &env.access("user_new"), "").await.status(), 200);
    let seen = env.upstream.last().expect("forwarded");
    assert_eq!(
        query_pairs(seen.query.as_deref()),
        vec![
            ("apiKey".to_string(), "tw_shared_key".to_string()),
            ("baseUrl".to_string(), "https://crm.example.com".to_string()),
        ]
    );
}

#[tokio::test]
async fn header_injection_replaces_the_client_credential() {
    let env = Env::new().await;
    let dir = TempDir::new("vault-h");
    let toml = format!(
        "{}\n[upstream.inject]\napi_key_query = \"\"\napi_key_header = \"Authorization\"\napi_key_template = \"Bearer {{key}}\"\nbase_url_query = \"\"\n",
        env.config(&format!(
            "encryption_secret = \"{SECRET_A}\"\ndata_dir = \"{}\"\n",
            dir.path().display()
        ))
    );
    let gw = Keygate::start(&toml, &env.upstream.url()).await.keep(dir);
    gw.wait_ready().await;
    assert_eq!(
        put_key(
            &gw,
            &env.session("user_h"),
            json!({"apiKey": "tw_header_key"})
        )
        .await
        .status(),
        200
    );
    let token = env.access("user_h");
    assert_eq!(mcp(&gw, &token, "?apiKey=kept").await.status(), 200);
    let seen = env.upstream.last().expect("forwarded");
    assert_eq!(seen.headers["authorization"], "Bearer tw_header_key");
    assert_eq!(seen.query.as_deref(), Some("apiKey=kept"));
}

#[tokio::test]
async fn a_ciphertext_copied_to_another_user_fails_closed() {
    let env = Env::new().await;
    let redis = RedisServer::start();
    let gw = env.redis(&redis, &[]).await;
    gw.wait_ready().await;
    store_key(&gw, &env, "user_a", "tw_a").await;
    store_key(&gw, &env, "user_b", "tw_b").await;
    // An attacker with write access to Redis moves A's sealed key into B's slot.
    let raw = redis::Client::open(redis.url().as_str()).expect("client");
    let mut conn = raw
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let a: String = redis::cmd("GET")
        .arg("keygate:key:{user:user_a}")
        .query_async(&mut conn)
        .await
        .expect("A's record");
    let _: () = redis::cmd("SET")
        .arg("keygate:key:{user:user_b}")
        .arg(&a)
        .query_async(&mut conn)
        .await
        .expect("overwrite B");
    // A fresh gateway (no cache) on the same Redis.
    let gw2 = env.redis(&redis, &[]).await;
    gw2.wait_ready().await;
    let before = env.upstream.count();
    let resp = mcp(&gw2, &env.access("user_b"), "").await;
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "internal_error");
    assert_eq!(
        env.upstream.count(),
        before,
        "a request went upstream without its key"
    );
    // A's own record still works.
    assert_eq!(mcp(&gw2, &env.access("user_a"), "").await.status(), 200);
}

#[tokio::test]
async fn two_replicas_on_one_redis_see_each_others_deletes() {
    let env = Env::new().await;
    let redis = RedisServer::start();
    let gw1 = env.redis(&redis, &[]).await;
    let gw2 = env.redis(&redis, &[]).await;
    gw1.wait_ready().await;
    gw2.wait_ready().await;
    let session = env.session("user_r");
    assert_eq!(
        put_key(&gw1, &session, json!({"apiKey": "tw_r"}))
            .await
            .status(),
        200
    );
    let token = env.access("user_r");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // gw2 reads and caches the key.
    assert_eq!(mcp(&gw2, &token, "").await.status(), 200);
    let resp = client()
        .delete(gw1.at("/api/keys"))
        .bearer_auth(&session)
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let status = mcp(&gw2, &token, "").await.status();
        if status == 400 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica 2 still injects a deleted key after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn redis_outage_cached_keys_work_uncached_get_503_then_recovery() {
    let env = Env::new().await;
    let mut redis = RedisServer::start();
    let gw = env.redis(&redis, &[]).await;
    gw.wait_ready().await;
    store_key(&gw, &env, "user_c", "tw_c").await;
    store_key(&gw, &env, "user_d", "tw_d").await;
    // Let the invalidations of our own writes arrive before caching a read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cached = env.access("user_c");
    assert_eq!(mcp(&gw, &cached, "").await.status(), 200);

    redis.stop();
    assert_eq!(
        mcp(&gw, &cached, "").await.status(),
        200,
        "cached key stopped working"
    );
    let started = Instant::now();
    // user_d's key was invalidated by its own write and never read since: uncached.
    let resp = mcp(&gw, &env.access("user_d"), "").await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the lookup hung"
    );
    let ready = client()
        .get(format!("{}/ready", gw.admin_url))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 503);

    // The test Redis keeps nothing on disk: it comes back empty, and keygate with it.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stored = put_key(&gw, &env.session("user_d"), json!({"apiKey": "tw_d2"})).await;
        if stored.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keygate did not recover after Redis returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mcp(&gw, &env.access("user_d"), "").await.status(), 200);
    let seen = env.upstream.last().expect("forwarded");
    assert_eq!(query_pairs(seen.query.as_deref())[0].1, "tw_d2");
}

#[tokio::test]
async fn keygate_starts_while_redis_is_down() {
    let env = Env::new().await;
    let mut redis = RedisServer::start();
    redis.stop();
    let gw = env.redis(&redis, &[]).await;
    let ready = client()
        .get(format!("{}/ready", gw.admin_url))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["key_store"], false);
    redis.restart();
    gw.wait_ready().await;
    store_key(&gw, &env, "user_e", "tw_e").await;
}

fn keygate_cli(config: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let dir = TempDir::new("vault-cli");
    let path = dir.join("keygate.toml");
    std::fs::write(&path, config).expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    cmd.arg("--config").arg(&path).args(args);
    for var in [
        "API_KEY_ENCRYPTION_SECRET",
        "API_KEY_ENCRYPTION_SECRET_PREVIOUS",
        "REDIS_URL",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run keygate")
}

#[tokio::test]
async fn rotation_keeps_old_records_readable_and_moves_them_to_the_new_key() {
    let env = Env::new().await;
    let redis = RedisServer::start();
    let old = env.redis(&redis, &[]).await;
    old.wait_ready().await;
    for user in ["user_1", "user_2"] {
        let body = json!({"apiKey": format!("tw_{user}")});
        assert_eq!(put_key(&old, &env.session(user), body).await.status(), 200);
    }
    // New active secret, old one kept for decryption: old records still open.
    let rotated_env = [
        ("API_KEY_ENCRYPTION_SECRET", SECRET_B),
        ("API_KEY_ENCRYPTION_SECRET_PREVIOUS", SECRET_A),
    ];
    let both = Keygate::start_with_env(
        &env.config(""),
        &env.upstream.url(),
        &[
            ("REDIS_URL", redis.url().as_str()),
            rotated_env[0],
            rotated_env[1],
        ],
    )
    .await;
    both.wait_ready().await;
    assert_eq!(mcp(&both, &env.access("user_1"), "").await.status(), 200);

    let out = keygate_cli(
        &env.config(""),
        &["keys", "rotate"],
        &[
            ("REDIS_URL", redis.url().as_str()),
            rotated_env[0],
            rotated_env[1],
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("rotated 2"), "{stdout}");

    // Only the new secret now: every record opens.
    let new_only = Keygate::start_with_env(
        &env.config(""),
        &env.upstream.url(),
        &[
            ("REDIS_URL", redis.url().as_str()),
            ("API_KEY_ENCRYPTION_SECRET", SECRET_B),
        ],
    )
    .await;
    new_only.wait_ready().await;
    for user in ["user_1", "user_2"] {
        assert_eq!(
            mcp(&new_only, &env.access(user), "").await.status(),
            200,
            "{user}"
        );
        let seen = env.upstream.last().expect("forwarded");
        assert_eq!(
            query_pairs(seen.query.as_deref())[0].1,
            format!("tw_{user}")
        );
    }
    // Rotating again finds nothing to do.
    let out = keygate_cli(
        &env.config(""),
        &["keys", "rotate"],
        &[
            ("REDIS_URL", redis.url().as_str()),
            ("API_KEY_ENCRYPTION_SECRET", SECRET_B),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("rotated 0"));
}

#[tokio::test]
async fn import_of_node_server_records() {
    let env = Env::new().await;
    let redis = RedisServer::start();
    let node_secret = "the Node server's own encryption secret, 32+ chars";
    let export = json!({
        "user_imp1": {
            "twentyApiKey": keygate::keys::import::node_encrypt("tw_imported_1", node_secret),
            "twentyBaseUrl": "https://api.twenty.com",
            "twentyApiKeyUpdatedAt": "2025-06-01T10:00:00.000Z"
        },
        "user_imp2": {
            "twentyApiKey": keygate::keys::import::node_encrypt("tw_imported_2", node_secret),
        },
        "user_bad": {
            "twentyApiKey": keygate::keys::import::node_encrypt("tw_x", "some other secret of 32+ characters"),
        }
    });
    let dir = TempDir::new("import");
    let file = dir.join("export.json");
    std::fs::write(&file, export.to_string()).expect("export");
    let out = keygate_cli(
        &env.config(""),
        &[
            "keys",
            "import",
            "--file",
            file.to_str().expect("path"),
            "--node-secret-env",
            "NODE_SECRET",
        ],
        &[
            ("REDIS_URL", redis.url().as_str()),
            ("API_KEY_ENCRYPTION_SECRET", SECRET_A),
            ("NODE_SECRET", node_secret),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a bad record must make the import fail"
    );
    assert!(stdout.contains("imported 2"), "{stdout}{stderr}");
    assert!(stderr.contains("user_bad"), "{stderr}");
    assert!(!stdout.contains("tw_imported") && !stderr.contains("tw_imported"));

    let gw = env.redis(&redis, &[]).await;
    gw.wait_ready().await;
    assert_eq!(mcp(&gw, &env.access("user_imp1"), "").await.status(), 200);
    let seen = env.upstream.last().expect("forwarded");
    assert_eq!(
        query_pairs(seen.query.as_deref()),
        vec![
            ("apiKey".to_string(), "tw_imported_1".to_string()),
            ("baseUrl".to_string(), "https://api.twenty.com".to_string()),
        ]
    );
    let meta: Value = key_metadata(&gw, &env.session("user_imp1")).await;
    assert_eq!(meta["updatedAt"], "2025-06-01T10:00:00Z");
    assert_eq!(mcp(&gw, &env.access("user_bad"), "").await.status(), 400);
}

#[tokio::test]
async fn org_keys_are_shared_by_the_org_when_configured() {
    let env = Env::new().await;
    let gw = env.embedded("org_keys = true\n").await;
    // Session tokens from the fake carry the org `org_keygateTestOrg`.
    assert_eq!(
        put_key(
            &gw,
            &env.session("user_admin"),
            json!({"apiKey": "tw_org_key"})
        )
        .await
        .status(),
        200
    );
    let colleague = env.key.sign(
        json!({"typ": "JWT"}),
        &keys::clerk_session_claims(&env.clerk.url(), "user_colleague", "sess_2"),
    );
    let meta: Value = key_metadata(&gw, &colleague).await;
    assert_eq!(meta["hasKey"], true, "the org's key is not shared");
    // An access token without org context keeps to the user's own slot: no key there.
    assert_eq!(mcp(&gw, &env.access("user_admin"), "").await.status(), 400);
}
