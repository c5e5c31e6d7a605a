//! The `keygate` command: `check-config` reports every problem at once without a panic or a
//! secret; `dev-token` mints a token the dev config accepts.

use std::process::Command;

fn keygate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keygate"));
    for var in [
        "KEYGATE_CONFIG",
        "AUTH_ENABLED",
        "REQUIRE_AUTH",
        "CLERK_PUBLISHABLE_KEY",
        "CLERK_SECRET_KEY",
        "CLERK_DOMAIN",
        "MCP_SERVER_URL",
        "API_KEY_ENCRYPTION_SECRET",
        "REDIS_URL",
        "TWENTY_API_KEY",
    ] {
        c.env_remove(var);
    }
    c
}

#[test]
fn check_config_reports_every_problem_and_no_secret() {
    let out = keygate()
        .arg("check-config")
        .env("KEYGATE_LISTEN", "nowhere")
        .env("KEYGATE_UPSTREAM", "gopher://x")
        .env("AUTH_ENABLED", "perhaps")
        .env("CLERK_PUBLISHABLE_KEY", "pk_live_!!!")
        .env("CLERK_SECRET_KEY", "sk_live_supersecretvalue")
        .env("API_KEY_ENCRYPTION_SECRET", "weak-secret-value")
        .output()
        .expect("run keygate");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for name in [
        "KEYGATE_LISTEN",
        "KEYGATE_UPSTREAM",
        "AUTH_ENABLED",
        "CLERK_PUBLISHABLE_KEY",
        "API_KEY_ENCRYPTION_SECRET",
    ] {
        assert!(stderr.contains(name), "{name} not reported:\n{stderr}");
    }
    for secret in ["supersecretvalue", "weak-secret-value"] {
        assert!(!stderr.contains(secret), "secret printed:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_dev_config_is_valid_offline() {
    let out = keygate()
        .args(["--config", "config/dev.toml", "check-config"])
        .output()
        .expect("run keygate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = keygate()
        .args(["--config", "config/keygate.example.toml", "check-config"])
        .env("CLERK_SECRET_KEY", "sk_test_x")
        .env(
            "API_KEY_ENCRYPTION_SECRET",
            "0f1e2d3c4b5a69788796a5b4c3d2e1f09d3b7e15a2c8f4607e1b9d35c2a8f6e0",
        )
        .output()
        .expect("run keygate");
    assert!(
        out.status.success(),
        "the example config must stay valid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
