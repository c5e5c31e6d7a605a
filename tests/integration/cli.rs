//! The `keygate` command: `check-config` reports every problem at once without a panic or a
//! secret; `dev-token` mints a token the dev config accepts.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// The command's output, once it exited; killed (and the test failed) if it is still running
/// after `limit`, so a gateway that wrongly starts cannot hang the suite.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keygate");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "keygate kept running:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Run `keygate --config <file> check-config` on `toml`; (exit code, stderr).
fn check_file(name: &str, toml: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = crate::common::TempDir::new("cli");
    let path = dir.join(name);
    std::fs::write(&path, toml).expect("write config");
    let out = keygate()
        .current_dir(dir.path())
        .args(["--config", name, "check-config"])
        .envs(env.iter().copied())
        .output()
        .expect("run keygate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn file_errors_name_the_file_line_column_and_option_all_at_once() {
    let (code, stderr) = check_file(
        "keygate.toml",
        "[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n[server]\nthreads = \"two\"\nlisten = 8080\n\n[keys]\ncolour = \"blue\"\n",
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    for expected in [
        "keygate.toml:5:11: server.threads: invalid type: string \"two\", expected usize",
        "keygate.toml:6:10: server.listen: invalid type: integer `8080`, expected a string",
        "keygate.toml:9:1: keys.colour: unknown field `colour`",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn syntax_errors_name_their_line() {
    let (code, stderr) = check_file(
        "broken.toml",
        "[server\nthreads = 1\n\n[keys]\ncache_ttl_secs = = 3\n",
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    for expected in ["broken.toml:1:", "broken.toml:5:"] {
        assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
    }
}

#[test]
fn running_without_a_config_hints_at_the_flag_and_the_variable() {
    let out = keygate().arg("check-config").output().expect("run keygate");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--config") && stderr.contains("KEYGATE_CONFIG"),
        "{stderr}"
    );
}

/// `NAME=value` lines of an env file, comments and blanks skipped.
fn env_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// Every environment template the repository ships, with the variables that are placeholders.
fn shipped_placeholders() -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for template in ["deploy/.env.example", "deploy/k8s/base/secrets.env.example"] {
        let text = std::fs::read_to_string(template).expect(template);
        for (name, value) in env_lines(&text) {
            if keygate::config::placeholder_marker(&value).is_some() {
                found.push((template.to_string(), name, value));
            }
        }
    }
    found
}

#[test]
fn every_shipped_placeholder_is_refused_naming_its_variable() {
    let placeholders = shipped_placeholders();
    for must in ["CLERK_SECRET_KEY", "REDIS_URL", "API_KEY_ENCRYPTION_SECRET"] {
        assert!(
            placeholders.iter().any(|(_, name, _)| name == must),
            "{must} is no longer a shipped placeholder: update this test"
        );
    }
    for (template, name, value) in &placeholders {
        let mut env = vec![(name.as_str(), value.as_str())];
        // A valid value for everything else, so the placeholder is the only problem.
        for (k, v) in [
            ("CLERK_PUBLISHABLE_KEY", "pk_test_Y2xlcmsuZXhhbXBsZS5jb20k"),
            ("CLERK_SECRET_KEY", "sk_test_0123456789abcdef"),
            (
                "API_KEY_ENCRYPTION_SECRET",
                "0f1e2d3c4b5a69788796a5b4c3d2e1f09d3b7e15a2c8f4607e1b9d35c2a8f6e0",
            ),
        ] {
            if k != name {
                env.push((k, v));
            }
        }
        for command in ["check-config", "run"] {
            let mut cmd = keygate();
            cmd.args(["--config", "config/keygate.example.toml", command])
                .env("KEYGATE_LISTEN", "127.0.0.1:0")
                .env("KEYGATE_ADMIN_LISTEN", "127.0.0.1:1")
                .envs(env.iter().copied());
            let out = output_within(cmd, Duration::from_secs(20));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{template}: {name} must stop `keygate {command}`:\n{stderr}"
            );
            assert!(
                stderr.contains(&format!("  - {name}: ")) && stderr.contains("placeholder"),
                "{template}: {name} not named as a placeholder by `keygate {command}`:\n{stderr}"
            );
        }
    }
}

/// `path` with `.` and `..` resolved lexically.
fn normalized(path: &std::path::Path) -> std::path::PathBuf {
    let mut out = std::path::PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn no_shipped_config_keeps_its_data_in_the_source_tree() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let env: std::collections::HashMap<String, String> = [
        ("CLERK_SECRET_KEY", "sk_test_x"),
        (
            "API_KEY_ENCRYPTION_SECRET",
            "0f1e2d3c4b5a69788796a5b4c3d2e1f09d3b7e15a2c8f4607e1b9d35c2a8f6e0",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for config in ["config/dev.toml", "config/keygate.example.toml"] {
        let none = std::collections::HashMap::new();
        let env = if config.ends_with("dev.toml") {
            &none
        } else {
            &env
        };
        let s = keygate::app::configure(Some(&repo.join(config)), env)
            .map(|c| c.settings)
            .unwrap_or_else(|p| panic!("{config}: {p}"));
        let data = normalized(&repo.join(&s.keys.data_dir));
        assert!(
            !data.starts_with(repo) || data.starts_with(repo.join("target")),
            "{config} keeps its embedded store in the source tree: {}",
            data.display()
        );
    }
}
