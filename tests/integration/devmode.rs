//! The offline development setup: a token from `keygate dev-token` is accepted by a gateway
//! running `config/dev.toml`.

use std::process::Command;

use crate::common::upstream::Upstream;
use crate::common::{client, rpc, Keygate};

#[tokio::test]
async fn dev_token_is_accepted_by_the_dev_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "--config",
            "config/dev.toml",
            "dev-token",
            "--scope",
            "twenty:read",
            "--sub",
            "user_dev",
        ])
        .env_remove("KEYGATE_CONFIG")
        .output()
        .expect("run keygate dev-token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string();
    let upstream = Upstream::start().await;
    let toml = std::fs::read_to_string("config/dev.toml")
        .expect("dev config")
        .replace(
            "\"dev/",
            &format!("\"{}/config/dev/", env!("CARGO_MANIFEST_DIR")),
        );
    let data = crate::common::TempDir::new("dev");
    let toml = toml.replace(
        &format!("{}/config/dev/data", env!("CARGO_MANIFEST_DIR")),
        &data.path().display().to_string(),
    );
    let gw = Keygate::start(&toml, &upstream.url()).await;
    gw.wait_ready().await;
    // The newcomer's path: store a key, then call the MCP route with it injected.
    let stored = client()
        .post(gw.at("/api/keys"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"apiKey": "tw_dev_key"}))
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
