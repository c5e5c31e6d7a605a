//! The dashboard and the alert rules under `deploy/` evaluated by a real Prometheus: a
//! `prometheus` child process scrapes an in-process keygate (with Redis, the vault, a tight rate
//! rule and a scope rule) through a short mixed load — successes, 401s, 403s, 429s, an upstream
//! timeout, a Redis stop — then every dashboard panel's query must return data (and the panels
//! the load drives must show it), every series selector of the dashboard and of the alerts must
//! match a series keygate exports, and the alerts the load should trigger must fire while those
//! it should not stay inactive.
//!
//! The alerts are loaded from a copy of `deploy/prometheus/alerts.yaml` whose `for:` lines read
//! `for: 0s` (a test cannot wait minutes); every other byte, expressions included, is the
//! repository's.
//!
//! Needs the `prometheus` server binary (Debian's `prometheus` package, which `scripts/test`
//! installs); without it the test fails saying how to install it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::common::clerk::FakeClerk;
use crate::common::keys::{self, SigningKey};
use crate::common::redis::RedisServer;
use crate::common::upstream::Upstream;
use crate::common::{clerk_config, client, free_port, Keygate, TempDir, RESOURCE};

const INSTALL_PROMETHEUS: &str = "apt-get install -y --no-install-recommends prometheus";
const SECRET: &str = "3f8a1c9e57b2d4067e1fa93c28d5b6409c7e2a15f3b8d06e4a91c7253df80b6e";
/// The scrape job's name: what the dashboard's `$job` selects.
const JOB: &str = "keygate";
/// What Grafana's `$__rate_interval` is with its default 15 s data-source scrape interval
/// (four of them): long enough that one window covers the whole load.
const RATE_INTERVAL: &str = "1m";

/// Alerts the load below must trigger, and why.
const FIRING: [(&str, &str); 5] = [
    ("KeygateHighErrorRate", "a 504 and 503s among ~25 requests"),
    ("KeygateUpstreamErrors", "one upstream timeout among ~10"),
    (
        "KeygateKeyStoreErrors",
        "key lookups failing after the Redis stop",
    ),
    (
        "KeygateRateLimitRedisFallback",
        "rate-limit checks after the Redis stop",
    ),
    (
        "KeygateLockouts",
        "user_c refused by policy past its budget",
    ),
];

/// Alerts the load must leave inactive, and why.
const INACTIVE: [(&str, &str); 7] = [
    ("KeygateMetricsAbsent", "keygate is scraped"),
    ("KeygateUpstreamDown", "most upstream requests are answered"),
    ("KeygateKeyDecryptFailures", "every stored key decrypts"),
    ("KeygateJwksStale", "the keys were fetched seconds ago"),
    (
        "KeygateJwksNearMaxStale",
        "the keys were fetched seconds ago",
    ),
    ("KeygateJwksFetchFailing", "the fake Clerk serves its JWKS"),
    ("KeygateHttp2ControlFloods", "no HTTP/2 client at all"),
];

/// Panels whose data the load must move (a value other than zero somewhere in the range); the
/// others (in flight, SSE, decrypt failures, JWKS) must only return data.
const DRIVEN: [&str; 22] = [
    "Requests/s",
    "5xx ratio",
    "p99 latency, proxied",
    "Replicas by version",
    "Requests/s by route and status class",
    "Policy denials/s by reason",
    "Requests/s by method",
    "Request latency by route (p50, p90, p99)",
    "Upstream latency (p50, p90, p99)",
    "Authentication failures/s by reason and token kind",
    "Accepted tokens/s by kind",
    "Lockouts and HTTP/2 control-frame floods",
    "Key store operations/s",
    "Key store errors/s",
    "Key store latency (p50, p99)",
    "Decrypted-key cache hit ratio",
    "Rate-limited requests/s by rule",
    "Rate-limit decisions/s by rule and result",
    "Redis fallbacks/s",
    "Redis circuit breakers",
    "Upstream errors/s by kind",
    "Upstream responses/s and error ratio",
];

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// A prometheus child process

/// `prometheus` on a free loopback port with its TSDB in a temp dir; killed (and the dir
/// removed) on drop.
struct Prometheus {
    child: Child,
    url: String,
    dir: TempDir,
}

impl Prometheus {
    /// Scrape `target` (host:port of keygate's admin listener) every second as job [`JOB`],
    /// evaluating `rules` (a rule file's text) every second; wait until it is ready.
    async fn start(target: &str, rules: &str) -> Prometheus {
        let dir = TempDir::new("prometheus");
        std::fs::write(dir.join("alerts.yaml"), rules).expect("write rules");
        let config = json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [dir.join("alerts.yaml")],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        });
        // JSON is YAML.
        std::fs::write(dir.join("prometheus.yml"), config.to_string()).expect("write config");
        std::fs::create_dir_all(dir.join("data")).expect("tsdb dir");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let port = free_port();
        let spawned = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "the `prometheus` server is not installed. Install it with:\n    \
                 {INSTALL_PROMETHEUS}\n(scripts/test installs it; CI runs scripts/test)"
            ),
            Err(e) => panic!("cannot start prometheus: {e}"),
        };
        let mut p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            let ready = client()
                .get(format!("{}/-/ready", p.url))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus never became ready:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` with `params`; the `data` of a successful answer.
    async fn api(&self, path: &str, params: &[(&str, String)]) -> Value {
        let resp = client()
            .get(format!("{}/api/v1/{path}", self.url))
            .query(params)
            .send()
            .await
            .unwrap_or_else(|e| panic!("prometheus /api/v1/{path}: {e}"));
        let status = resp.status();
        let body: Value = resp.json().await.expect("prometheus answers JSON");
        assert!(
            status == 200 && body["status"] == "success",
            "prometheus /api/v1/{path} {params:?}: {status} {body}"
        );
        body["data"].clone()
    }

    /// An instant query's result (a vector's samples, or a scalar as one sample).
    async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", expr.to_string())]).await;
        match &data["result"] {
            Value::Array(samples) => samples.clone(),
            scalar => vec![json!({"value": scalar})],
        }
    }

    /// A range query's series, from `start` to now, one step a second.
    async fn query_range(&self, expr: &str, start: f64) -> Vec<Value> {
        let data = self
            .api(
                "query_range",
                &[
                    ("query", expr.to_string()),
                    ("start", format!("{start:.3}")),
                    ("end", format!("{:.3}", unix_now())),
                    ("step", "1".to_string()),
                ],
            )
            .await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a one-sample instant query, if it has one.
    async fn value(&self, expr: &str) -> Option<f64> {
        let samples = self.query(expr).await;
        samples.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Every alerting rule loaded: name -> (state, health, last error).
    async fn alert_rules(&self) -> BTreeMap<String, (String, String, String)> {
        let data = self.api("rules", &[("type", "alert".to_string())]).await;
        let mut out = BTreeMap::new();
        for group in data["groups"].as_array().expect("groups") {
            for rule in group["rules"].as_array().expect("rules") {
                let text = |k: &str| rule[k].as_str().unwrap_or_default().to_string();
                out.insert(
                    text("name"),
                    (text("state"), text("health"), text("lastError")),
                );
            }
        }
        out
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The dashboard and the rules, as files

/// One query of a dashboard panel.
struct PanelQuery {
    title: String,
    time_series: bool,
    expr: String,
}

/// Every panel's queries (rows' nested panels included), Grafana's variables filled in the way
/// Grafana would for this job and instance.
fn panel_queries(instance: &str) -> Vec<PanelQuery> {
    let text =
        std::fs::read_to_string(repo_file("deploy/grafana/keygate.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut panels: Vec<&Value> = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    let mut out = Vec::new();
    for p in panels.into_iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().expect("a panel title").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            let raw = t["expr"].as_str().expect("a target expr");
            let expr = substitute(raw, instance);
            assert!(
                !expr.contains('$'),
                "panel \"{title}\": a variable this test does not fill in: {raw}"
            );
            out.push(PanelQuery {
                title: title.clone(),
                time_series: p["type"] == "timeseries",
                expr,
            });
        }
    }
    out
}

fn substitute(expr: &str, instance: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$job", JOB)
        .replace("$instance", instance)
}

/// The dashboard's template variables that query Prometheus: (name, `label_values` query).
fn variable_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(repo_file("deploy/grafana/keygate.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            (
                v["name"].as_str().expect("a name").to_string(),
                v["definition"].as_str().expect("a definition").to_string(),
            )
        })
        .collect()
}

/// alerts.yaml with every `for:` duration set to 0s, and nothing else changed.
fn rules_without_for() -> (String, Vec<String>) {
    let original =
        std::fs::read_to_string(repo_file("deploy/prometheus/alerts.yaml")).expect("alerts");
    let mut names = Vec::new();
    let mut out = String::new();
    for line in original.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            names.push(name.trim().to_string());
        }
        if trimmed.starts_with("for:") {
            let indent = &line[..line.len() - trimmed.len()];
            out.push_str(&format!("{indent}for: 0s\n"));
        } else {
            out.push_str(line);
        }
    }
    assert!(!names.is_empty(), "no alerts in alerts.yaml");
    (out, names)
}

/// The `expr` of each rule of alerts.yaml (block scalars joined), by alert name.
fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("deploy/prometheus/alerts.yaml")).expect("alerts");
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = Vec::new();
    let mut name = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let t = line.trim_start();
        if let Some(n) = t.strip_prefix("- alert:") {
            name = n.trim().to_string();
        } else if let Some(rest) = t.strip_prefix("expr:") {
            let rest = rest.trim();
            if rest.starts_with('|') || rest.starts_with('>') {
                let mut block = Vec::new();
                while i < lines.len()
                    && (lines[i].trim().is_empty() || indent(lines[i]) > indent(line))
                {
                    block.push(lines[i].trim());
                    i += 1;
                }
                out.push((name.clone(), block.join("\n")));
            } else {
                out.push((name.clone(), rest.to_string()));
            }
        }
    }
    out
}

/// Every series selector (`keygate_…` with its `{…}` matchers, if any) in a PromQL expression.
fn selectors(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(pos) = expr[from..].find("keygate_") {
        let at = from + pos;
        let mut end = at;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        if at == 0 || !ident(bytes[at - 1]) {
            if bytes.get(end) == Some(&b'{') {
                let close = expr[end..].find('}').expect("matchers are closed") + end;
                end = close + 1;
            }
            out.insert(expr[at..end].to_string());
        }
        from = end.max(at + 1);
    }
    out
}

fn has_nonzero(values: &[Value]) -> bool {
    values.iter().any(|v| {
        v[1].as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(|x| x.is_finite() && x != 0.0)
    })
}

// ---------------------------------------------------------------------------------------------
// The load

struct Load {
    clerk: FakeClerk,
    key: SigningKey,
    gw: Keygate,
    /// Requests sent to keygate's public listener.
    sent: usize,
}

impl Load {
    fn access(&self, user: &str) -> String {
        self.key.sign(
            json!({"typ": "at+jwt"}),
            &keys::access_token_claims(&self.clerk.url(), user, Some(RESOURCE), "twenty:read"),
        )
    }

    fn session(&self, user: &str) -> String {
        self.key.sign(
            json!({"typ": "JWT"}),
            &keys::clerk_session_claims(&self.clerk.url(), user, "sess_1"),
        )
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> u16 {
        self.sent += 1;
        req.send().await.expect("keygate answers").status().as_u16()
    }

    async fn put_key(&mut self, user: &str) -> u16 {
        let req = client()
            .post(self.gw.at("/api/keys"))
            .bearer_auth(self.session(user))
            .json(&json!({"apiKey": format!("upstream-key-of-{user}")}));
        self.send(req).await
    }

    /// A JSON-RPC call to `/mcp` (`tools/call` of `tool` when given, else `tools/list`).
    async fn mcp(&mut self, token: Option<&str>, tool: Option<&str>) -> u16 {
        let body = match tool {
            Some(name) => json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                 "params": {"name": name, "arguments": {}}}),
            None => json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        };
        let mut req = client().post(self.gw.at("/mcp")).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.send(req).await
    }
}

#[tokio::test]
async fn dashboard_panels_and_alerts_hold_on_a_real_prometheus() {
    let key = SigningKey::rsa_a("kid-a");
    let clerk = FakeClerk::start(vec![key.clone()]).await;
    let upstream = Upstream::start().await;
    let mut redis = RedisServer::start();
    // The vault on Redis; a generous shared per-user budget (so every proxied request asks
    // Redis) and a tight one on export tools; writes need twenty:write; a 1 s upstream read
    // timeout for the upstream error.
    let extra = r#"
[keys]
enabled = true

[redis]
connect_timeout_ms = 1000
command_timeout_ms = 200

[rate_limits]
backend = "redis"
on_redis_error = "local"

[[rate_limits.rules]]
name = "per-user"
per = "user"
requests = 100000
period_secs = 60

[[rate_limits.rules]]
name = "exports"
per = "user"
requests = 1
burst = 1
period_secs = 3600
tools = ["export_*"]

[[policy.scopes]]
method = "tools/call"
name = "delete_*"
scopes = ["twenty:write"]

[policy.auth_failures]
subject_max_denials = 1

[upstream]
read_timeout_secs = 1
"#;
    let gw = Keygate::start_with_env(
        &clerk_config(&clerk.url(), clerk.secret_key(), extra),
        &upstream.url(),
        &[
            ("REDIS_URL", &redis.url()),
            ("API_KEY_ENCRYPTION_SECRET", SECRET),
        ],
    )
    .await;
    gw.wait_ready().await;
    let instance = gw
        .admin_url
        .strip_prefix("http://")
        .expect("an http admin url")
        .to_string();

    let (rules, alert_names) = rules_without_for();
    let prom = Prometheus::start(&instance, &rules).await;

    // The load starts once Prometheus holds a scrape from before it, so every counter's rise
    // is seen.
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = format!("sum(keygate_requests_total{{job=\"{JOB}\"}})");
    while prom.value(&before).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped keygate at {instance}:\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let load_start = unix_now() - 2.0;

    let mut load = Load {
        clerk,
        key,
        gw,
        sent: 0,
    };
    // Successes: two users store their keys; one of them calls tools.
    assert_eq!(load.put_key("user_a").await, 200);
    assert_eq!(load.put_key("user_b").await, 200);
    let a = load.access("user_a");
    for _ in 0..5 {
        assert_eq!(load.mcp(Some(&a), None).await, 200);
    }
    // 401: no token, a token signed by a key the issuer never published.
    assert_eq!(load.mcp(None, None).await, 401);
    assert_eq!(load.mcp(None, None).await, 401);
    let forged = SigningKey::rsa_b("kid-a").sign(
        json!({"typ": "at+jwt"}),
        &keys::access_token_claims(&load.clerk.url(), "user_a", Some(RESOURCE), "twenty:read"),
    );
    assert_eq!(load.mcp(Some(&forged), None).await, 401);
    // 403: a delete tool without twenty:write, twice: the second refusal is past the
    // subject's budget of one and locks user_c out (429 from then on).
    let c = load.access("user_c");
    assert_eq!(load.mcp(Some(&c), Some("delete_person")).await, 403);
    assert_eq!(load.mcp(Some(&c), Some("delete_company")).await, 403);
    assert_eq!(load.mcp(Some(&c), None).await, 429);
    // 429: the export budget is one call.
    assert_eq!(load.mcp(Some(&a), Some("export_all")).await, 200);
    assert_eq!(load.mcp(Some(&a), Some("export_all")).await, 429);
    assert_eq!(load.mcp(Some(&a), Some("export_all")).await, 429);
    // An upstream error: the upstream answers after keygate's read timeout (504).
    let slow = client()
        .post(load.gw.at("/slow?ms=3000"))
        .bearer_auth(&a)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}));
    assert_eq!(load.send(slow).await, 504);
    // Redis stops: rate-limit checks fall back to this replica, and user_b's key (stored, never
    // cached) cannot be loaded (503).
    redis.stop();
    let b = load.access("user_b");
    for _ in 0..3 {
        assert_eq!(load.mcp(Some(&b), None).await, 503);
    }

    // Wait until Prometheus has scraped every request of the load (each is counted once
    // keygate has logged it).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = prom.value(&before).await.unwrap_or(0.0);
        if seen >= load.sent as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus saw {seen} of the {} requests sent:\n{}",
            load.sent,
            load.gw.metrics_text().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut problems = Vec::new();

    // The template variables list this job and instance.
    for (name, definition) in variable_queries() {
        let inner = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {name}: not a label_values query: {definition}"));
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        let selector = substitute(selector.trim(), &instance);
        let values = prom
            .api(
                &format!("label/{}/values", label.trim()),
                &[("match[]", selector.clone())],
            )
            .await;
        let want = if name == "job" {
            JOB
        } else {
            instance.as_str()
        };
        if !values
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x == want))
        {
            problems.push(format!(
                "variable ${name} ({definition}): {values} lacks {want}"
            ));
        }
    }

    // Every panel returns data; the panels the load drives show it.
    let queries = panel_queries(&instance);
    let titles: BTreeSet<&str> = queries.iter().map(|q| q.title.as_str()).collect();
    for driven in DRIVEN {
        assert!(
            titles.contains(driven),
            "no panel titled \"{driven}\" any more: update DRIVEN"
        );
    }
    let mut moved: BTreeMap<&str, bool> = BTreeMap::new();
    for q in &queries {
        let instant = prom.query(&q.expr).await;
        if instant.is_empty() {
            problems.push(format!(
                "panel \"{}\": no data (instant query): {}",
                q.title, q.expr
            ));
        }
        let mut nonzero = instant.iter().any(|s| has_nonzero(&[s["value"].clone()]));
        if q.time_series {
            let range = prom.query_range(&q.expr, load_start).await;
            if range.is_empty() {
                problems.push(format!(
                    "panel \"{}\": no data (range query): {}",
                    q.title, q.expr
                ));
            }
            nonzero |= range.iter().any(|s| {
                s["values"]
                    .as_array()
                    .is_some_and(|values| has_nonzero(values))
            });
        }
        *moved.entry(q.title.as_str()).or_default() |= nonzero;
    }
    for driven in DRIVEN {
        if moved.get(driven) != Some(&true) {
            let exprs: Vec<&str> = queries
                .iter()
                .filter(|q| q.title == driven)
                .map(|q| q.expr.as_str())
                .collect();
            problems.push(format!(
                "panel \"{driven}\": only zeros although the load drives it: {exprs:?}"
            ));
        }
    }

    // Every series selector, in the panels and in the alerts, matches what keygate exports:
    // a wrong metric name or label value would leave a panel empty or an alert mute forever.
    let mut checked = BTreeSet::new();
    let alerts = alert_exprs();
    assert_eq!(
        alerts.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        alert_names,
        "every alert has one expr"
    );
    let sources = queries
        .iter()
        .map(|q| (format!("panel \"{}\"", q.title), q.expr.clone()))
        .chain(
            alerts
                .iter()
                .map(|(n, e)| (format!("alert {n}"), e.clone())),
        );
    for (source, expr) in sources {
        for sel in selectors(&expr) {
            if !checked.insert(sel.clone()) {
                continue;
            }
            if prom.query(&format!("count({sel})")).await.is_empty() {
                problems.push(format!("{source}: {sel} matches no series keygate exports"));
            }
        }
    }

    // The alerts: all loaded and healthy; the load's alerts firing, the others inactive.
    let deadline = Instant::now() + Duration::from_secs(20);
    let states = loop {
        let states = prom.alert_rules().await;
        let all_fired = FIRING.iter().all(|(name, _)| {
            states
                .get(*name)
                .is_some_and(|(state, _, _)| state == "firing")
        });
        if all_fired || Instant::now() >= deadline {
            break states;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let loaded: BTreeSet<&String> = states.keys().collect();
    let expected: BTreeSet<&String> = alert_names.iter().collect();
    assert_eq!(
        loaded, expected,
        "prometheus loaded other alerts than alerts.yaml has"
    );
    for (name, (_, health, error)) in &states {
        if health != "ok" {
            problems.push(format!("alert {name}: health {health}: {error}"));
        }
    }
    for (name, why) in FIRING {
        let state = states.get(name).map_or("missing", |s| s.0.as_str());
        if state != "firing" && state != "pending" {
            problems.push(format!("alert {name} is {state}, expected firing ({why})"));
        }
    }
    for (name, why) in INACTIVE {
        let state = states.get(name).map_or("missing", |s| s.0.as_str());
        if state != "inactive" {
            problems.push(format!(
                "alert {name} is {state}, expected inactive ({why})"
            ));
        }
    }

    assert!(
        problems.is_empty(),
        "on a real Prometheus:\n  {}",
        problems.join("\n  ")
    );
    drop(prom);
    drop(upstream);
}
