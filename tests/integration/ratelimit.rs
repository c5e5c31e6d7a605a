//! Shared rate limits and MCP session bindings against a real `redis-server` child (and a
//! three-node Redis Cluster): several limiter instances standing for several replicas, Redis
//! stopped and restarted under them; and a request's budgets spent together, all or nothing,
//! through the running gateway.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::policy::ratelimit::{
    Decision, FallbackLimiter, LocalLimiter, OnRedisError, Quota, RateLimiter, RedisLimiter, Spend,
};
use keygate::policy::sessions::{RedisBindings, SessionBindings};
use keygate::redis::{RedisConn, RedisSettings};

use crate::common::redis::{RedisCluster, RedisServer};
use crate::common::{clerk_config, post_mcp, Keygate, Stack};

/// Longer than any call may take with Redis down (connect + command timeouts, with margin):
/// a guard against hangs, not a timing assertion.
const NO_HANG: Duration = Duration::from_secs(5);

fn conn(url: &str, cluster: bool) -> Arc<RedisConn> {
    let settings = RedisSettings {
        url: url.to_string(),
        cluster,
        key_prefix: "kgtest:".into(),
        connect_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_millis(300),
    };
    Arc::new(RedisConn::new(&settings).expect("valid redis settings"))
}

/// 5 per minute in bursts of 5: nothing refills during a test.
fn five_per_minute() -> Quota {
    Quota::new(5, Duration::from_secs(60), 5).expect("valid quota")
}

async fn no_hang<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(NO_HANG, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

async fn check(limiter: &dyn RateLimiter, key: &str, quota: &Quota) -> Decision {
    no_hang("check", limiter.check(key, quota, 1))
        .await
        .unwrap_or_else(|e| panic!("{} check failed: {e}", limiter.name()))
}

/// A plain connection for looking at what the limiter left in Redis.
fn raw(url: &str) -> ::redis::Connection {
    ::redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("raw redis connection")
}

#[tokio::test]
async fn two_replicas_on_one_redis_enforce_one_limit() {
    let redis = RedisServer::start();
    let replicas = [
        RedisLimiter::new(conn(&redis.url(), false)),
        RedisLimiter::new(conn(&redis.url(), false)),
    ];
    assert_eq!(replicas[0].name(), "redis");
    let quota = five_per_minute();
    for (i, expected_remaining) in (0..5u32).rev().enumerate() {
        let d = check(&replicas[i % 2], "user:shared", &quota).await;
        assert!(d.allowed, "request {i} denied");
        assert_eq!(d.remaining, expected_remaining);
        assert_eq!(d.limit, 5);
    }
    for replica in &replicas {
        let d = check(replica, "user:shared", &quota).await;
        assert!(!d.allowed, "a sixth request passed");
        assert_eq!(d.remaining, 0);
        let retry = d.retry_after.expect("a denial says when to retry");
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_secs(12),
            "{retry:?}"
        );
    }
    // Another key has its own budget.
    assert!(check(&replicas[1], "user:other", &quota).await.allowed);
}

#[tokio::test]
async fn redis_and_local_limiters_decide_alike() {
    let redis = RedisServer::start();
    let shared = RedisLimiter::new(conn(&redis.url(), false));
    let local = LocalLimiter::default();
    let quota = Quota::new(10, Duration::from_secs(600), 6).expect("valid quota");
    for cost in [1, 2, 4, 1, 2, 1, 1, 7, 0] {
        let a = no_hang("redis", shared.check("k", &quota, cost))
            .await
            .expect("redis check");
        let b = local.check("k", &quota, cost).await.expect("local check");
        assert_eq!(
            (a.allowed, a.remaining, a.limit, a.retry_after.is_some()),
            (b.allowed, b.remaining, b.limit, b.retry_after.is_some()),
            "cost {cost}: {a:?} vs {b:?}"
        );
    }
}

fn spend<'a>(key: &'a str, quota: &'a Quota, cost: u32) -> Spend<'a> {
    Spend { key, quota, cost }
}

async fn check_all(limiter: &dyn RateLimiter, spends: &[Spend<'_>]) -> Vec<Decision> {
    no_hang("check_all", limiter.check_all(spends))
        .await
        .unwrap_or_else(|e| panic!("{} check_all failed: {e}", limiter.name()))
}

/// Script calls Redis has run so far (`EVALSHA` and `EVAL`, from `INFO commandstats`).
fn script_calls(raw: &mut ::redis::Connection) -> u64 {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(raw)
        .expect("INFO commandstats");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split(['=', ',']).nth(1)?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn check_all_on_redis_spends_nothing_when_one_budget_denies() {
    let redis = RedisServer::start();
    let limiter = RedisLimiter::new(conn(&redis.url(), false));
    let (wide, narrow) = (
        five_per_minute(),
        Quota::new(1, Duration::from_secs(60), 1).unwrap(),
    );
    assert!(check(&limiter, "tool:narrow", &narrow).await.allowed);
    let d = check_all(
        &limiter,
        &[
            spend("user:wide", &wide, 1),
            spend("tool:narrow", &narrow, 1),
        ],
    )
    .await;
    assert_eq!(d.len(), 2);
    assert!(d[0].allowed && !d[1].allowed, "{d:?}");
    assert_eq!((d[0].remaining, d[0].retry_after), (5, None), "{d:?}");
    assert!(d[1].retry_after.is_some());
    let mut raw = raw(&redis.url());
    let wide_tat: Option<u64> = ::redis::cmd("GET")
        .arg(limiter.redis_key("user:wide"))
        .query(&mut raw)
        .expect("GET");
    assert_eq!(
        wide_tat, None,
        "a refused call wrote the budget that had room"
    );

    // When every budget has room, every one spends.
    let other = five_per_minute();
    let d = check_all(
        &limiter,
        &[spend("user:wide", &wide, 2), spend("org:o", &other, 1)],
    )
    .await;
    let summary: Vec<_> = d.iter().map(|d| (d.allowed, d.remaining)).collect();
    assert_eq!(summary, [(true, 3), (true, 4)]);
    for key in ["user:wide", "org:o"] {
        let tat: Option<u64> = ::redis::cmd("GET")
            .arg(limiter.redis_key(key))
            .query(&mut raw)
            .expect("GET");
        assert!(tat.is_some(), "{key} was not written");
    }
    assert!(check_all(&limiter, &[]).await.is_empty());
}

#[tokio::test]
async fn check_all_on_redis_is_one_script_call_whatever_the_number_of_budgets() {
    let redis = RedisServer::start();
    let limiter = RedisLimiter::new(conn(&redis.url(), false));
    let mut raw = raw(&redis.url());
    let quota = five_per_minute();
    let tight = Quota::new(1, Duration::from_secs(60), 1).unwrap();
    // The first call may load the script (a failed EVALSHA, then SCRIPT LOAD).
    check_all(&limiter, &[spend("warm", &quota, 1)]).await;
    let before = script_calls(&mut raw);
    let three = [
        spend("a", &quota, 1),
        spend("b", &quota, 1),
        spend("c", &tight, 1),
    ];
    assert!(check_all(&limiter, &three).await.iter().all(|d| d.allowed));
    assert_eq!(script_calls(&mut raw), before + 1);
    let refused = check_all(&limiter, &three).await;
    assert!(!refused[2].allowed, "{refused:?}");
    assert_eq!(script_calls(&mut raw), before + 2);
    check_all(&limiter, &[]).await;
    assert_eq!(
        script_calls(&mut raw),
        before + 2,
        "an empty call asks nobody"
    );
}

#[tokio::test]
async fn redis_and_local_limiters_decide_alike_on_several_budgets() {
    let redis = RedisServer::start();
    let shared = RedisLimiter::new(conn(&redis.url(), false));
    let local = LocalLimiter::default();
    let (a, b) = (
        Quota::new(10, Duration::from_secs(600), 6).expect("valid quota"),
        Quota::new(10, Duration::from_secs(600), 3).expect("valid quota"),
    );
    let calls: [&[Spend]; 7] = [
        &[spend("a", &a, 1), spend("b", &b, 1)],
        &[spend("a", &a, 2), spend("a", &a, 1)],
        &[spend("b", &b, 2), spend("a", &a, 1)],
        &[spend("a", &a, 1), spend("b", &b, 1)],
        &[spend("a", &a, 1), spend("a", &a, 1), spend("b", &b, 4)],
        &[spend("b", &b, 0), spend("a", &a, 2)],
        &[spend("a", &a, 1), spend("a", &a, 1)],
    ];
    for spends in calls {
        let x = check_all(&shared, spends).await;
        let y = check_all(&local, spends).await;
        let view = |d: &[Decision]| -> Vec<_> {
            d.iter()
                .map(|d| (d.allowed, d.remaining, d.limit, d.retry_after.is_some()))
                .collect()
        };
        assert_eq!(view(&x), view(&y), "{spends:?}: {x:?} vs {y:?}");
    }
}

#[tokio::test]
async fn on_a_redis_cluster_check_all_checks_budget_by_budget() {
    let cluster = RedisCluster::start();
    let limiter = RedisLimiter::new(conn(&cluster.url(), true));
    let (wide, narrow) = (
        Quota::new(3, Duration::from_secs(60), 3).expect("valid quota"),
        Quota::new(1, Duration::from_secs(60), 1).expect("valid quota"),
    );
    // Keys of different budgets hash to different slots: one script per budget, in order.
    let in_order = [spend("user:u", &wide, 1), spend("tool:t", &narrow, 1)];
    assert!(check_all(&limiter, &in_order)
        .await
        .iter()
        .all(|d| d.allowed));
    // The budget checked before the one that denies has spent (the documented difference).
    let d = check_all(&limiter, &in_order).await;
    assert_eq!(d.len(), 2);
    assert!(d[0].allowed && !d[1].allowed, "{d:?}");
    assert_eq!(d[0].remaining, 1);
    // Checking stops at the first denial: the budgets after it get no decision and keep theirs.
    let d = check_all(&limiter, &[in_order[1], in_order[0]]).await;
    assert_eq!(d.len(), 1);
    assert!(!d[0].allowed);
    let left = no_hang("peek", limiter.check("user:u", &wide, 0))
        .await
        .expect("peek");
    assert_eq!(left.remaining, 1);
}

#[tokio::test]
async fn buckets_are_hash_tagged_keys_that_expire() {
    let redis = RedisServer::start();
    let limiter = RedisLimiter::new(conn(&redis.url(), false));
    let quota = five_per_minute(); // T = 12 s
    let d = no_hang("check", limiter.check("user:u1", &quota, 2))
        .await
        .expect("check");
    assert!(d.allowed);
    assert!(d.reset > Duration::from_secs(23) && d.reset <= Duration::from_secs(24));
    assert_eq!(limiter.redis_key("user:u1"), "kgtest:rl:{user:u1}");
    let mut raw = raw(&redis.url());
    let keys: Vec<String> = ::redis::cmd("KEYS").arg("*").query(&mut raw).expect("KEYS");
    assert_eq!(keys, ["kgtest:rl:{user:u1}"]);
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(&keys[0])
        .query(&mut raw)
        .expect("PTTL");
    assert!(ttl > 0 && ttl <= 24_000, "pttl {ttl}");
    // The value is the theoretical arrival time in server microseconds: about now + 24 s.
    let tat: u64 = ::redis::cmd("GET")
        .arg(&keys[0])
        .query(&mut raw)
        .expect("GET");
    let (secs, micros): (u64, u64) = ::redis::cmd("TIME").query(&mut raw).expect("TIME");
    let ahead = tat.saturating_sub(secs * 1_000_000 + micros);
    assert!(ahead > 23_000_000 && ahead <= 24_000_000, "{ahead}");

    // A quota whose bucket is full again 1 ms later leaves nothing behind for long.
    let quick = Quota::new(1000, Duration::from_secs(1), 1).expect("valid quota");
    let d = no_hang("check", limiter.check("ip:quick", &quick, 1))
        .await
        .expect("check");
    assert!(d.allowed);
    let deadline = Instant::now() + NO_HANG;
    loop {
        let exists: bool = ::redis::cmd("EXISTS")
            .arg("kgtest:rl:{ip:quick}")
            .query(&mut raw)
            .expect("EXISTS");
        if !exists {
            break;
        }
        assert!(Instant::now() < deadline, "the bucket never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_redis_cluster_keeps_one_limit_per_key_across_replicas() {
    let cluster = RedisCluster::start();
    let replicas = [
        RedisLimiter::new(conn(&cluster.url(), true)),
        RedisLimiter::new(conn(&cluster.url(), true)),
    ];
    let quota = Quota::new(3, Duration::from_secs(60), 3).expect("valid quota");
    // Enough keys to land on every master.
    for n in 0..12 {
        let key = format!("user:{n}");
        for i in 0..3 {
            assert!(check(&replicas[(n + i) % 2], &key, &quota).await.allowed);
        }
        assert!(!check(&replicas[0], &key, &quota).await.allowed);
        assert!(!check(&replicas[1], &key, &quota).await.allowed);
    }
}

#[tokio::test]
async fn redis_down_falls_back_to_the_local_limit_then_back_to_the_shared_one() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let limiter = FallbackLimiter::new(
        RedisLimiter::new(conn(&url, false)),
        OnRedisError::Local,
        LocalLimiter::default(),
    );
    let other_replica = RedisLimiter::new(conn(&url, false));
    let quota = Quota::new(3, Duration::from_secs(60), 3).expect("valid quota");
    assert_eq!(limiter.name(), "fallback");
    assert!(check(&limiter, "user:a", &quota).await.allowed);
    assert!(check(&limiter, "user:a", &quota).await.allowed);
    assert_eq!(limiter.fallbacks(), 0);

    redis.stop();
    // The local budget of this replica applies: three, then denied.
    for _ in 0..3 {
        assert!(check(&limiter, "user:a", &quota).await.allowed);
    }
    let denied = check(&limiter, "user:a", &quota).await;
    assert!(!denied.allowed);
    assert!(denied.retry_after.is_some());
    assert_eq!(limiter.fallbacks(), 4);

    redis.restart();
    let deadline = Instant::now() + NO_HANG;
    loop {
        let before = limiter.fallbacks();
        check(&limiter, "probe", &quota).await;
        if limiter.fallbacks() == before {
            break;
        }
        assert!(Instant::now() < deadline, "never went back to redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fallbacks = limiter.fallbacks();
    // Shared again: what this replica spends, the other one sees.
    for _ in 0..3 {
        assert!(check(&limiter, "user:b", &quota).await.allowed);
    }
    assert!(!check(&other_replica, "user:b", &quota).await.allowed);
    assert!(check(&other_replica, "user:c", &quota).await.allowed);
    assert_eq!(limiter.fallbacks(), fallbacks);
}

#[tokio::test]
async fn redis_down_with_allow_allows_and_with_deny_denies() {
    let mut redis = RedisServer::start();
    let allow = FallbackLimiter::new(
        RedisLimiter::new(conn(&redis.url(), false)),
        OnRedisError::Allow,
        LocalLimiter::new(10),
    );
    let deny = FallbackLimiter::new(
        RedisLimiter::new(conn(&redis.url(), false)),
        OnRedisError::Deny,
        LocalLimiter::new(10),
    );
    let quota = Quota::new(2, Duration::from_secs(60), 2).expect("valid quota");
    assert!(check(&deny, "user:a", &quota).await.allowed);
    redis.stop();
    for _ in 0..5 {
        assert!(check(&allow, "user:a", &quota).await.allowed);
        let d = check(&deny, "user:a", &quota).await;
        assert!(!d.allowed);
        assert!(d.retry_after.is_some());
    }
    assert_eq!((allow.fallbacks(), deny.fallbacks()), (5, 5));
}

#[tokio::test]
async fn a_limiter_built_while_redis_is_down_falls_back_at_once() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.stop();
    let limiter = FallbackLimiter::new(
        RedisLimiter::new(conn(&url, false)),
        OnRedisError::Local,
        LocalLimiter::default(),
    );
    let quota = Quota::new(1, Duration::from_secs(60), 1).expect("valid quota");
    assert!(check(&limiter, "user:a", &quota).await.allowed);
    assert!(!check(&limiter, "user:a", &quota).await.allowed);
    assert_eq!(limiter.fallbacks(), 2);
    let bare = RedisLimiter::new(conn(&url, false));
    let err = no_hang("check", bare.check("user:a", &quota, 1)).await;
    assert!(err.is_err(), "{err:?}");
}

#[tokio::test]
async fn session_bindings_are_shared_and_the_first_binding_wins() {
    let redis = RedisServer::start();
    let a = RedisBindings::new(conn(&redis.url(), false), Duration::from_secs(3600));
    let b = RedisBindings::new(conn(&redis.url(), false), Duration::from_secs(3600));
    let session = "5f0c6a3e-session-secret";
    assert_eq!(b.owner(session).await.expect("owner"), None);
    assert_eq!(a.bind(session, "user_a").await.expect("bind"), "user_a");
    assert_eq!(
        b.owner(session).await.expect("owner").as_deref(),
        Some("user_a")
    );
    assert_eq!(b.bind(session, "user_b").await.expect("bind"), "user_a");
    assert_eq!(a.bind(session, "user_a").await.expect("rebind"), "user_a");
    assert_eq!(
        a.owner(session).await.expect("owner").as_deref(),
        Some("user_a")
    );

    let mut raw = raw(&redis.url());
    let keys: Vec<String> = ::redis::cmd("KEYS").arg("*").query(&mut raw).expect("KEYS");
    assert_eq!(keys, [a.redis_key(session)]);
    assert!(keys[0].starts_with("kgtest:mcp-session:{"));
    assert!(!keys[0].contains("secret"), "{}", keys[0]);
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(&keys[0])
        .query(&mut raw)
        .expect("PTTL");
    assert!(ttl > 0 && ttl <= 3_600_000, "pttl {ttl}");
}

#[tokio::test]
async fn concurrent_binds_from_two_replicas_agree_on_one_owner() {
    let redis = RedisServer::start();
    let replicas = [
        Arc::new(RedisBindings::new(
            conn(&redis.url(), false),
            Duration::from_secs(60),
        )),
        Arc::new(RedisBindings::new(
            conn(&redis.url(), false),
            Duration::from_secs(60),
        )),
    ];
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let replica = replicas[i % 2].clone();
            tokio::spawn(async move { replica.bind("race", &format!("user_{i}")).await })
        })
        .collect();
    let mut owners = Vec::new();
    for t in tasks {
        owners.push(t.await.expect("task").expect("bind"));
    }
    owners.dedup();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(
        replicas[1].owner("race").await.expect("owner"),
        Some(owners[0].clone())
    );
}

#[tokio::test]
async fn session_bindings_fail_promptly_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let bindings = RedisBindings::new(conn(&redis.url(), false), Duration::from_secs(60));
    bindings.bind("s", "user_a").await.expect("bind");
    redis.stop();
    // A binding this replica knows is answered from memory; an unknown one needs Redis.
    assert_eq!(
        no_hang("owner", bindings.owner("s"))
            .await
            .expect("known")
            .as_deref(),
        Some("user_a")
    );
    assert_eq!(
        no_hang("bind", bindings.bind("s", "user_b"))
            .await
            .expect("known"),
        "user_a"
    );
    assert!(no_hang("owner", bindings.owner("t")).await.is_err());
    assert!(no_hang("bind", bindings.bind("t", "user_b")).await.is_err());
    redis.restart();
    let deadline = Instant::now() + NO_HANG;
    // Unknown bindings work again once reconnected.
    while bindings.bind("t", "user_b").await.is_err() {
        assert!(Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        bindings.owner("t").await.expect("owner").as_deref(),
        Some("user_b")
    );
}

#[tokio::test]
async fn a_binding_seen_by_one_replica_is_cached_with_the_ttl_redis_has_left() {
    let redis = RedisServer::start();
    let a = RedisBindings::new(conn(&redis.url(), false), Duration::from_secs(60));
    let b = RedisBindings::new(conn(&redis.url(), false), Duration::from_secs(60));
    a.bind("short", "user_a").await.expect("bind");
    // Redis will forget it in 300 ms: replica b, reading it, must not keep it longer.
    let client = ::redis::Client::open(redis.url()).expect("client");
    let mut raw = client.get_connection().expect("raw");
    let key = a.redis_key("short");
    let _: () = ::redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(300)
        .query(&mut raw)
        .expect("pexpire");
    assert_eq!(
        b.owner("short").await.expect("owner").as_deref(),
        Some("user_a")
    );
    let deadline = Instant::now() + NO_HANG;
    while b.owner("short").await.expect("owner").is_some() {
        assert!(
            Instant::now() < deadline,
            "the cached binding outlived Redis's"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.bind("short", "user_b").await.expect("bind"), "user_b");
}

/// A generous per-user budget on `/mcp`, listed first, and an export tool budget of one.
const TWO_BUDGETS: &str = r#"
[[rate_limits.rules]]
name = "per-user"
per = "user"
requests = 100
period_secs = 60
burst = 100
paths = ["/mcp"]

[[rate_limits.rules]]
name = "exports"
per = "user"
requests = 1
period_secs = 3600
burst = 1
tools = ["export_*"]
"#;

/// A keygate with [`TWO_BUDGETS`] on `redis`, in front of `s`'s Clerk and upstream.
async fn gateway_on_redis(s: &Stack, redis: &RedisServer) -> Keygate {
    let toml = clerk_config(&s.clerk.url(), s.clerk.secret_key(), TWO_BUDGETS);
    let url = redis.url();
    let gw = Keygate::start_with_env(&toml, &s.upstream.url(), &[("REDIS_URL", &url)]).await;
    gw.wait_ready().await;
    gw
}

/// POST a `tools/call` of `tool` to `gw`'s `/mcp`.
async fn call_tool(gw: &Keygate, token: &str, tool: &str) -> reqwest::Response {
    let body = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": {}}
    });
    post_mcp(gw, token, &body).await
}

fn ratelimit_header(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("ratelimit")
        .expect("a RateLimit header")
        .to_str()
        .expect("ascii")
        .to_string()
}

/// `keygate_rate_limit_decisions_total` of `rule` and `result` on `gw` (0 when absent).
async fn decisions(gw: &Keygate, rule: &str, result: &str) -> f64 {
    let (rule, result) = (format!("rule=\"{rule}\""), format!("result=\"{result}\""));
    gw.metrics_text()
        .await
        .lines()
        .filter(|l| l.starts_with("keygate_rate_limit_decisions_total{"))
        .filter(|l| l.contains(&rule) && l.contains(&result))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_request_refused_by_one_budget_spends_from_none() {
    let redis = RedisServer::start();
    let s = Stack::start(TWO_BUDGETS).await;
    let shared = gateway_on_redis(&s, &redis).await;
    // The same rule through the local limiter (the stack's own gateway) and through Redis.
    for (gw, user) in [(&s.gw, "user_local"), (&shared, "user_shared")] {
        let token = s.access_token(user);
        assert_eq!(call_tool(gw, &token, "export_people").await.status(), 200);
        let refused = call_tool(gw, &token, "export_companies").await;
        assert_eq!(refused.status(), 429, "{user}");
        assert!(
            ratelimit_header(&refused).starts_with("\"exports\";r=0;"),
            "{}",
            ratelimit_header(&refused)
        );
        // The per-user budget paid for the two requests that passed, not the refused one.
        let next = call_tool(gw, &token, "get_person").await;
        assert_eq!(next.status(), 200);
        let header = ratelimit_header(&next);
        assert!(header.starts_with("\"per-user\";r=98;"), "{user}: {header}");
        // Each rule's decision is counted: the per-user budget had room all three times.
        assert_eq!(decisions(gw, "per-user", "allowed").await, 3.0);
        assert_eq!(decisions(gw, "per-user", "limited").await, 0.0);
        assert_eq!(decisions(gw, "exports", "allowed").await, 1.0);
        assert_eq!(decisions(gw, "exports", "limited").await, 1.0);
    }
}

#[tokio::test]
async fn every_request_spends_its_budgets_in_one_redis_script_call() {
    let redis = RedisServer::start();
    let s = Stack::start("").await;
    let gw = gateway_on_redis(&s, &redis).await;
    let mut raw = raw(&redis.url());
    // The first call loads the script.
    let warm = s.access_token("user_warm");
    assert_eq!(call_tool(&gw, &warm, "get_person").await.status(), 200);
    let before = script_calls(&mut raw);
    // Two budgets apply to each export call; the repeated ones are refused by the second.
    let mut sent = 0;
    for user in ["user_a", "user_b", "user_c"] {
        let token = s.access_token(user);
        for expected in [200, 429] {
            assert_eq!(
                call_tool(&gw, &token, "export_people").await.status(),
                expected
            );
            sent += 1;
        }
        assert_eq!(call_tool(&gw, &token, "get_person").await.status(), 200);
        sent += 1;
    }
    assert_eq!(script_calls(&mut raw), before + sent);
}
