//! Shared test harness: signing keys, a fake Clerk, a recording upstream, and keygate itself
//! started in-process on free loopback ports.
#![allow(dead_code)]

pub mod backends;
pub mod clerk;
pub mod keys;
pub mod redis;
pub mod upstream;

use std::collections::{BTreeSet, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keygate::app::Handle;

/// A free loopback port (bound, then released for keygate to take). A port is handed out at
/// most once per test process, so two listeners of one test (or of two concurrent tests) never
/// get the same port between its release and their bind. It is drawn below the kernel's
/// ephemeral range: a port from `bind(0)` is an ephemeral one, and any outgoing connection of
/// this process (to Redis, to an upstream) could take it as its source port between the release
/// and keygate's bind ("Address already in use").
pub fn free_port() -> u16 {
    free_ports(0)
}

/// The `keygate` binary on `config`, listening on `127.0.0.1:port` with its admin on
/// `127.0.0.1:admin`; the caller adds its environment and output handling, then spawns it.
pub fn keygate_command(config: &Path, port: u16, admin: u16) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"));
    c.arg("--config")
        .arg(config)
        .env("KEYGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("KEYGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"));
    c
}

/// A free port `p` (as [`free_port`]) whose `p + 10000`, Redis Cluster's bus port, is free and
/// below the ephemeral range too.
pub fn free_cluster_port() -> u16 {
    free_ports(10_000)
}

/// A free port, and with `bus > 0` also `port + bus` free, both below the ephemeral range and
/// both handed out at most once per test process.
fn free_ports(bus: u16) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let below = ephemeral_floor() - bus;
    let floor = 10_000u16.min(below / 2);
    let bindable = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
    loop {
        // std's per-instance random keys as the random source (no RNG dependency needed)
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u16(floor);
        let span = u64::from(below - floor);
        let port = floor + u16::try_from(h.finish() % span).expect("within the span");
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        let second = (bus > 0).then(|| port + bus);
        if handed_out.contains(&port) || second.is_some_and(|p| handed_out.contains(&p)) {
            continue;
        }
        if bindable(port) && second.is_none_or(bindable) {
            handed_out.insert(port);
            if let Some(p) = second {
                handed_out.insert(p);
            }
            return port;
        }
    }
}

/// The lowest port the kernel hands out as an ephemeral (source or `bind(0)`) port.
fn ephemeral_floor() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .filter(|p: &u16| *p > 22_000)
        .unwrap_or(32_768)
}

/// A fresh directory under the system temp directory, removed with its contents when dropped,
/// so a test run leaves nothing behind (also when the test fails).
pub struct TempDir(PathBuf);

impl TempDir {
    /// Create `<tmp>/keygate-<label>-<pid>-<unique>`.
    pub fn new(label: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "keygate-{label}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A keygate running in this process.
pub struct Keygate {
    pub handle: Option<Handle>,
    /// `http://127.0.0.1:PORT` of the public listener.
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin_url: String,
    pub port: u16,
    /// Holds the config file (and the default data directory); removed on drop.
    dir: TempDir,
    /// Other directories this gateway uses (e.g. its data directory), removed with it.
    kept: Vec<TempDir>,
}

impl Keygate {
    /// Start keygate with `toml` as its config file, in front of `upstream`, and wait until it
    /// accepts connections. `env` adds environment overrides.
    pub async fn start_with_env(toml: &str, upstream: &str, env: &[(&str, &str)]) -> Keygate {
        Self::start_full(free_port(), toml, upstream, env, |_| {}).await
    }

    /// [`Keygate::start_with_env`], with `edit` applied to the configuration (settings and
    /// compiled policy) before start (for what no config file sets, such as the policy clock).
    pub async fn start_with_settings(
        toml: &str,
        upstream: &str,
        env: &[(&str, &str)],
        edit: impl FnOnce(&mut keygate::app::Configured),
    ) -> Keygate {
        Self::start_full(free_port(), toml, upstream, env, edit).await
    }

    /// Like [`Keygate::start_with_env`], with the public listener on `port` (from
    /// [`free_port`]), for configs that must name their own URL (resource, issuer).
    pub async fn start_on(port: u16, toml: &str, upstream: &str, env: &[(&str, &str)]) -> Keygate {
        Self::start_full(port, toml, upstream, env, |_| {}).await
    }

    /// The public listener on `port`, `env` overrides, `edit` applied to the configuration.
    async fn start_full(
        port: u16,
        toml: &str,
        upstream: &str,
        env: &[(&str, &str)],
        edit: impl FnOnce(&mut keygate::app::Configured),
    ) -> Keygate {
        let dir = TempDir::new("test");
        let path = dir.join("keygate.toml");
        std::fs::write(&path, toml).expect("write config");
        let admin = free_port();
        let mut vars: HashMap<String, String> = HashMap::new();
        vars.insert("KEYGATE_LISTEN".into(), format!("127.0.0.1:{port}"));
        vars.insert("KEYGATE_ADMIN_LISTEN".into(), format!("127.0.0.1:{admin}"));
        vars.insert("KEYGATE_UPSTREAM".into(), upstream.to_string());
        for (k, v) in env {
            vars.insert(k.to_string(), v.to_string());
        }
        let mut configured = match keygate::app::configure(Some(&path), &vars) {
            Ok(c) => c,
            Err(p) => panic!("test config invalid: {p}"),
        };
        edit(&mut configured);
        let handle = Handle::spawn(configured).expect("keygate starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
                && tokio::net::TcpStream::connect(("127.0.0.1", admin))
                    .await
                    .is_ok();
            if up {
                break;
            }
            assert!(Instant::now() < deadline, "keygate did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Keygate {
            handle: Some(handle),
            url: format!("http://127.0.0.1:{port}"),
            admin_url: format!("http://127.0.0.1:{admin}"),
            port,
            dir,
            kept: Vec::new(),
        }
    }

    /// Remove `dir` when this gateway is dropped.
    pub fn keep(mut self, dir: TempDir) -> Keygate {
        self.kept.push(dir);
        self
    }

    /// Start with no extra environment.
    pub async fn start(toml: &str, upstream: &str) -> Keygate {
        Self::start_with_env(toml, upstream, &[]).await
    }

    /// Wait until `/ready` answers 200 (signing keys loaded).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = client()
                .get(format!("{}/ready", self.admin_url))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "keygate never became ready");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The full URL of `path` on the public listener.
    /// The admin listener's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        client()
            .get(format!("{}/metrics", self.admin_url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of the sample `series` (name with its exact label text) in `/metrics`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        self.metrics_text()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    /// Stop keygate (also done on drop).
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

impl Drop for Keygate {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            // Joining blocks: do it off the async runtime's worker.
            std::thread::spawn(move || h.shutdown());
        }
    }
}

/// A plain HTTP client (no proxy, no pooling surprises).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// The config for keygate fronting `clerk` (a FakeClerk URL), with the given extra TOML.
pub fn clerk_config(clerk_url: &str, secret: &str, extra: &str) -> String {
    format!(
        r#"
[resource]
url = "https://mcp.example.com/mcp"
protected_paths = ["/mcp"]
scopes_supported = ["twenty:read", "twenty:write"]

[clerk]
frontend_api_url = "{clerk_url}"
api_url = "{clerk_url}"
secret_key = "{secret}"
m2m_tokens = true
api_keys = true

[auth.identity_headers]
user = "X-Keygate-User"
org = "X-Keygate-Org"
scopes = "X-Keygate-Scopes"
token_kind = "X-Keygate-Token-Kind"
issuer = "X-Keygate-Issuer"
{vault}
{extra}
"#,
        vault = if extra.contains("[keys]") {
            ""
        } else {
            NO_VAULT
        }
    )
}

/// Config lines that turn the key vault off, for tests about other things.
pub const NO_VAULT: &str = "[keys]\nenabled = false\n";

/// The audience Clerk OAuth tokens must carry for the test resource.
pub const RESOURCE: &str = "https://mcp.example.com/mcp";

/// The usual setup: a fake Clerk signing with `kid-a`, a recording upstream, and a ready
/// keygate in front of it configured by [`clerk_config`] plus `extra`.
pub struct Stack {
    pub clerk: clerk::FakeClerk,
    pub upstream: upstream::Upstream,
    pub gw: Keygate,
    pub key: keys::SigningKey,
}

impl Stack {
    /// Start everything and wait until keygate is ready.
    pub async fn start(extra: &str) -> Stack {
        let key = keys::SigningKey::rsa_a("kid-a");
        let clerk = clerk::FakeClerk::start(vec![key.clone()]).await;
        let upstream = upstream::Upstream::start().await;
        let gw = Keygate::start(
            &clerk_config(&clerk.url(), clerk.secret_key(), extra),
            &upstream.url(),
        )
        .await;
        gw.wait_ready().await;
        Stack {
            clerk,
            upstream,
            gw,
            key,
        }
    }

    /// A valid Clerk OAuth access token for `sub`, issued for the test resource.
    pub fn access_token(&self, sub: &str) -> String {
        self.key.sign(
            serde_json::json!({"typ": "at+jwt"}),
            &keys::access_token_claims(&self.clerk.url(), sub, Some(RESOURCE), "twenty:read"),
        )
    }
}

/// POST a JSON-RPC `ping` to `url`, with `token` as bearer when given.
pub async fn rpc(url: String, token: Option<&str>) -> reqwest::Response {
    let mut req = client()
        .post(url)
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.expect("request")
}

/// POST `body` (JSON) to `gw`'s `/mcp` with `token`.
pub async fn post_mcp(gw: &Keygate, token: &str, body: &serde_json::Value) -> reqwest::Response {
    client()
        .post(gw.at("/mcp"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("request")
}

/// A token minted by `keygate dev-token` with the config at `config`.
pub fn dev_token(config: &Path, sub: &str, scope: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(config)
        .args(["dev-token", "--scope", scope, "--sub", sub])
        .env_remove("KEYGATE_CONFIG")
        .output()
        .expect("run keygate dev-token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}
