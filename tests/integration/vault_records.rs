//! Every stored field that steers a request is authenticated and re-checked: a base URL
//! changed in Redis, a version 1 record whose base URL left the allowlist, a record that is not
//! an envelope at all; and every way a key enters the vault passes one validation.

use std::process::Command;

use serde_json::{json, Value};

use crate::common::backends::Backends;
use crate::common::redis::RedisServer;
use crate::common::{client, Keygate};

/// The secret the crypto module's golden version 1 envelope was sealed under.
const GOLDEN_SECRET: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f000112233445566778899aabbccddeeff";
/// `tw_golden_api_key` sealed for `user:user_123` in format version 1 (base URL not bound).
const GOLDEN_V1: &str = "013930663739646564bb4722cd7dac8d84076bb0fd3363343eb2ab5e85407039e9f1e6997d876cbfef6237cd5b7b86b96014e5c9ee57";

/// The shared backends and one Redis, and gateways in front of them.
struct Env {
    backends: Backends,
    redis: RedisServer,
}

impl std::ops::Deref for Env {
    type Target = Backends;
    fn deref(&self) -> &Backends {
        &self.backends
    }
}

impl Env {
    async fn new() -> Env {
        Env {
            backends: Backends::start().await,
            redis: RedisServer::start(),
        }
    }

    fn config(&self) -> String {
        self.backends
            .config("[keys]\nallowed_base_url_hosts = [\"api.twenty.com\", \"crm.example.com\"]\n")
    }

    /// A fresh gateway (empty key cache) on the shared Redis.
    async fn gateway(&self) -> Keygate {
        let gw = Keygate::start_with_env(
            &self.config(),
            &self.upstream.url(),
            &[
                ("REDIS_URL", &self.redis.url()),
                ("API_KEY_ENCRYPTION_SECRET", GOLDEN_SECRET),
            ],
        )
        .await;
        gw.wait_ready().await;
        gw
    }

    async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis.url().as_str())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connection")
    }

    async fn raw_record(&self, user: &str) -> Value {
        let raw: String = redis::cmd("GET")
            .arg(format!("keygate:key:{{user:{user}}}"))
            .query_async(&mut self.redis_conn().await)
            .await
            .expect("record");
        serde_json::from_str(&raw).expect("json record")
    }

    async fn set_raw(&self, user: &str, raw: &str) {
        let _: () = redis::cmd("SET")
            .arg(format!("keygate:key:{{user:{user}}}"))
            .arg(raw)
            .query_async(&mut self.redis_conn().await)
            .await
            .expect("set");
    }

    /// A ping through `gw` as `user`: status, and whether it reached the upstream.
    async fn call(&self, gw: &Keygate, user: &str) -> (u16, bool) {
        let before = self.upstream.count();
        let resp = client()
            .post(gw.at("/mcp"))
            .bearer_auth(self.access(user))
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
            .send()
            .await
            .expect("request");
        (resp.status().as_u16(), self.upstream.count() > before)
    }
}

#[tokio::test]
async fn a_base_url_changed_in_the_store_fails_closed() {
    let env = Env::new().await;
    let gw = env.gateway().await;
    let resp = client()
        .post(gw.at("/api/keys"))
        .bearer_auth(env.session("user_1"))
        .json(&json!({"apiKey": "tw_real", "baseUrl": "https://api.twenty.com"}))
        .send()
        .await
        .expect("store");
    assert_eq!(resp.status(), 200);
    let record = env.raw_record("user_1").await;
    // Tampered towards another allowed host (only the envelope can tell) and towards one that
    // is not allowed at all.
    for url in ["https://crm.example.com", "http://169.254.169.254/latest"] {
        let mut tampered = record.clone();
        tampered["base_url"] = json!(url);
        env.set_raw("user_1", &tampered.to_string()).await;
        let gw = env.gateway().await;
        assert_eq!(env.call(&gw, "user_1").await, (500, false), "{url}");
    }
    // The record as written still works.
    env.set_raw("user_1", &record.to_string()).await;
    let gw = env.gateway().await;
    assert_eq!(env.call(&gw, "user_1").await, (200, true));
    let seen = env.upstream.last().expect("forwarded");
    assert!(seen
        .query
        .as_deref()
        .is_some_and(|q| q.contains("baseUrl=https%3A%2F%2Fapi.twenty.com")
            || q.contains("baseUrl=https://api.twenty.com")));
}

#[tokio::test]
async fn version_1_records_open_and_their_base_url_is_checked_again() {
    let env = Env::new().await;
    let sealed = (0..GOLDEN_V1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&GOLDEN_V1[i..i + 2], 16).expect("hex"))
        .collect::<Vec<u8>>();
    use base64::Engine as _;
    let sealed = base64::engine::general_purpose::STANDARD.encode(sealed);
    let record =
        |url: &str| json!({"sealed": sealed, "base_url": url, "updated_at": 1}).to_string();

    env.set_raw("user_123", &record("https://api.twenty.com"))
        .await;
    let gw = env.gateway().await;
    assert_eq!(env.call(&gw, "user_123").await, (200, true));
    let seen = env.upstream.last().expect("forwarded");
    assert!(seen
        .query
        .as_deref()
        .is_some_and(|q| q.contains("apiKey=tw_golden_api_key")));

    env.set_raw("user_123", &record("http://169.254.169.254/latest"))
        .await;
    let gw = env.gateway().await;
    assert_eq!(env.call(&gw, "user_123").await, (500, false));
}

#[tokio::test]
async fn records_that_are_not_envelopes_fail_closed_for_good() {
    let env = Env::new().await;
    let gw = env.gateway().await;
    for raw in [
        "not json at all",
        r#"{"sealed":"bm90IGFuIGVudmVsb3Bl","updated_at":1}"#,
    ] {
        env.set_raw("user_x", raw).await;
        // Permanent, not "retry later": 500, never 503, and nothing upstream.
        assert_eq!(env.call(&gw, "user_x").await, (500, false), "{raw}");
        let meta = client()
            .get(gw.at("/api/keys"))
            .bearer_auth(env.session("user_x"))
            .send()
            .await
            .expect("metadata");
        if raw.starts_with("not") {
            assert_eq!(meta.status(), 500, "GET /api/keys of a damaged record");
        }
    }
    let failures = gw
        .metric("keygate_key_decrypt_failures_total")
        .await
        .expect("decrypt failure counter");
    assert!(failures >= 2.0, "{failures}");
}

#[tokio::test]
async fn import_applies_the_rules_of_the_api() {
    let env = Env::new().await;
    let node_secret = "the Node server's own encryption secret, 32+ chars";
    let enc = |k: &str| keygate::keys::import::node_encrypt(k, node_secret);
    let export = json!({
        "user_ok": { "twentyApiKey": enc("tw_ok"), "twentyBaseUrl": "https://api.twenty.com" },
        "user_metadata_url": {
            "twentyApiKey": enc("tw_m"),
            "twentyBaseUrl": "http://169.254.169.254/latest"
        },
        "user_crlf": { "twentyApiKey": enc("tw_a\r\nX-Injected: 1") },
    });
    let dir = std::env::temp_dir().join(format!(
        "keygate-import-rules-{}",
        crate::common::free_port()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("export.json");
    std::fs::write(&file, export.to_string()).expect("export");
    let config = dir.join("keygate.toml");
    std::fs::write(&config, env.config()).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(&config)
        .args(["keys", "import", "--file"])
        .arg(&file)
        .args(["--node-secret-env", "NODE_SECRET"])
        .env_remove("API_KEY_ENCRYPTION_SECRET_PREVIOUS")
        .env("REDIS_URL", env.redis.url())
        .env("API_KEY_ENCRYPTION_SECRET", GOLDEN_SECRET)
        .env("NODE_SECRET", node_secret)
        .output()
        .expect("run keygate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("imported 1"), "{stdout}{stderr}");
    assert!(stderr.contains("user_metadata_url") && stderr.contains("baseUrl host is not allowed"));
    assert!(stderr.contains("user_crlf") && stderr.contains("control characters"));
    assert!(!stderr.contains("tw_a") && !stdout.contains("tw_"));
    let _ = std::fs::remove_dir_all(&dir);

    let gw = env.gateway().await;
    assert_eq!(env.call(&gw, "user_ok").await, (200, true));
    assert_eq!(env.call(&gw, "user_metadata_url").await, (400, false));
    assert_eq!(env.call(&gw, "user_crlf").await, (400, false));
}
