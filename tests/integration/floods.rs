//! Floods cannot lock real users out: Clerk Backend API calls are bounded in concurrency and
//! rate, and a client IP that keeps presenting rejected tokens is locked out (429) before its
//! tokens cost a verification, while other clients keep working.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::common::clerk::{random_token, FakeClerk, OpaqueSpec};
use crate::common::keys;
use crate::common::upstream::Upstream;
use crate::common::{clerk_config, client, Keygate, Stack};

/// The client IP of the flooding client, and of a well-behaved one (both via a trusted proxy).
const IP_A: &str = "203.0.113.7";
const IP_B: &str = "198.51.100.20";

/// The usual stack, with `clerk_lines` added to the `[clerk]` section and `rest` after it.
async fn stack(clerk_lines: &str, rest: &str) -> Stack {
    let key = keys::SigningKey::rsa_a("kid-a");
    let clerk = FakeClerk::start(vec![key.clone()]).await;
    let upstream = Upstream::start().await;
    // The fixture's `[clerk]` section ends with `api_keys = true`.
    let toml = clerk_config(&clerk.url(), clerk.secret_key(), rest).replacen(
        "api_keys = true",
        &format!("api_keys = true\n{clerk_lines}"),
        1,
    );
    let gw = Keygate::start(&toml, &upstream.url()).await;
    gw.wait_ready().await;
    Stack {
        clerk,
        upstream,
        gw,
        key,
    }
}

/// POST a JSON-RPC ping with `token`, as the client `ip` behind the trusted proxy.
async fn call_as(stack: &Stack, ip: &str, token: &str) -> reqwest::Response {
    client()
        .post(stack.gw.at("/mcp"))
        .header("x-forwarded-for", ip)
        .bearer_auth(token)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request")
}

/// A live opaque OAuth token for `subject`, registered with the fake Clerk.
fn fresh_token(stack: &Stack, subject: &str) -> String {
    let token = random_token("oat_");
    stack
        .clerk
        .add_opaque(&token, OpaqueSpec::new(subject, &["twenty:read"]));
    token
}

/// The `Retry-After` header in whole seconds.
fn retry_after(resp: &reqwest::Response) -> u64 {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in whole seconds")
}

/// The value of one series in keygate's `/metrics` (0 when absent).
async fn metric(stack: &Stack, series: &str) -> f64 {
    stack.gw.metric(series).await.unwrap_or(0.0)
}

const MAX_FAILURES: usize = 10;
const FLOOD: usize = 2_000;
const FLOOD_CONCURRENCY: usize = 16;

#[tokio::test]
async fn a_flood_from_one_ip_is_locked_out_while_another_ips_fresh_token_succeeds() {
    // A long wait for a call slot: B's call must not be refused for A's stragglers.
    let stack = stack(
        "backend_max_in_flight = 4\nbackend_max_wait_ms = 2500",
        &format!(
            "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
             [policy.auth_failures]\nmax_failures = {MAX_FAILURES}\nwindow_secs = 60\nlockout_secs = 60\n"
        ),
    )
    .await;
    // Slow enough that the flood's calls overlap.
    stack.clerk.set_verify_delay(Duration::from_millis(10));

    let limited = Arc::new(AtomicUsize::new(0));
    let flood = {
        let url = stack.gw.at("/mcp");
        let limited = limited.clone();
        tokio::spawn(async move {
            let statuses: Vec<(u16, Option<String>)> = futures::stream::iter(0..FLOOD)
                .map(|_| {
                    let url = url.clone();
                    let limited = limited.clone();
                    async move {
                        let resp = client()
                            .post(url)
                            .header("x-forwarded-for", IP_A)
                            .bearer_auth(random_token("oat_"))
                            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
                            .send()
                            .await
                            .expect("flood request");
                        let status = resp.status().as_u16();
                        if status == 429 {
                            limited.fetch_add(1, Ordering::SeqCst);
                        }
                        let retry = resp
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        (status, retry)
                    }
                })
                .buffer_unordered(FLOOD_CONCURRENCY)
                .collect()
                .await;
            statuses
        })
    };

    // Once A is locked out, and while its flood goes on, B's never-seen token still works.
    let deadline = Instant::now() + Duration::from_secs(20);
    while limited.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the flooding IP was never locked out ({} Backend API calls so far)",
            stack.clerk.verify_calls()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let good = fresh_token(&stack, "user_b");
    let resp = call_as(&stack, IP_B, &good).await;
    assert_eq!(resp.status(), 200, "the other IP's valid token was refused");
    let seen = stack.upstream.last().expect("B's request was forwarded");
    assert_eq!(seen.headers["x-keygate-user"], "user_b");

    let statuses = flood.await.expect("flood task");
    let calls = stack.clerk.verify_calls();
    // A's calls: its failure budget, the failure that started the lockout, and at most the
    // requests that were already past the lockout check then; plus B's one call.
    let bound = MAX_FAILURES + 1 + FLOOD_CONCURRENCY + 1;
    assert!(
        calls <= bound,
        "{calls} Backend API calls for a flood of {FLOOD} (bound {bound})"
    );
    let mut refused = 0;
    for (status, retry) in &statuses {
        match status {
            // Refused, or not verified because the Backend API bound was saturated.
            401 | 503 => {}
            429 => {
                refused += 1;
                let secs: u64 = retry
                    .as_deref()
                    .and_then(|r| r.parse().ok())
                    .expect("429 carries Retry-After in whole seconds");
                assert!((1..=60).contains(&secs), "Retry-After {secs}");
            }
            other => panic!("flood request answered {other}"),
        }
    }
    assert!(
        refused >= FLOOD - bound,
        "only {refused} of {FLOOD} flood requests were refused while locked"
    );

    // While locked, even A's valid token is refused without being verified.
    let a_valid = fresh_token(&stack, "user_a");
    let before = stack.clerk.verify_calls();
    let resp = call_as(&stack, IP_A, &a_valid).await;
    assert_eq!(resp.status(), 429);
    assert!((1..=60).contains(&retry_after(&resp)));
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(
        stack.clerk.verify_calls(),
        before,
        "a locked IP's token was verified"
    );
    // B is still fine, from the cache and with another fresh token.
    assert_eq!(call_as(&stack, IP_B, &good).await.status(), 200);
    let another = fresh_token(&stack, "user_b2");
    assert_eq!(call_as(&stack, IP_B, &another).await.status(), 200);

    assert_eq!(metric(&stack, "keygate_auth_lockouts_total").await, 1.0);
    // Every 429 but those answered to requests already past the lockout check when it began
    // (their tokens were verified: the lockout's first failure and the ones racing it).
    let refused_metric = metric(&stack, "keygate_auth_locked_refusals_total").await as usize;
    let seen = refused + 1;
    assert!(
        refused_metric <= seen && refused_metric + FLOOD_CONCURRENCY + 1 >= seen,
        "refusals while locked: metric {refused_metric}, 429s seen {seen}"
    );
}

#[tokio::test]
async fn missing_tokens_and_unavailable_verification_do_not_spend_the_failure_budget() {
    let stack = stack(
        "backend_max_in_flight = 4",
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [policy.auth_failures]\nmax_failures = 2\nwindow_secs = 3600\nlockout_secs = 60\n",
    )
    .await;
    for _ in 0..5 {
        let resp = client()
            .post(stack.gw.at("/mcp"))
            .header("x-forwarded-for", IP_A)
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
            .send()
            .await
            .expect("request");
        assert_eq!(
            resp.status(),
            401,
            "a missing token is not a failed attempt"
        );
    }
    stack.clerk.set_down(true);
    for _ in 0..5 {
        let resp = call_as(&stack, IP_A, &random_token("oat_")).await;
        assert_eq!(
            resp.status(),
            503,
            "an unavailable Backend API is not a failed attempt"
        );
    }
    stack.clerk.set_down(false);
    // Two rejections fit the budget; the third starts the lockout.
    for _ in 0..2 {
        assert_eq!(
            call_as(&stack, IP_A, &random_token("oat_")).await.status(),
            401
        );
    }
    let resp = call_as(&stack, IP_A, &random_token("oat_")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(retry_after(&resp), 60);
    let resp = call_as(&stack, IP_A, "not-a-token").await;
    assert_eq!(resp.status(), 429);
}

#[tokio::test]
async fn backend_api_concurrency_never_exceeds_the_bound_and_overflow_fails_closed() {
    let stack = stack(
        // Held calls must still be held, not timed out, when the test releases them.
        "backend_max_in_flight = 3\nbackend_max_wait_ms = 200\nbackend_timeout_ms = 15000",
        "[policy.auth_failures]\nenabled = false\n",
    )
    .await;
    let cached = fresh_token(&stack, "user_cached");
    assert_eq!(call_as(&stack, IP_B, &cached).await.status(), 200);
    let calls_before = stack.clerk.verify_calls();

    // Three unknown tokens take every slot and are held there by the Backend API.
    stack.clerk.hold_verifies();
    let held: Vec<_> = (0..3)
        .map(|_| {
            let url = stack.gw.at("/mcp");
            tokio::spawn(async move {
                client()
                    .post(url)
                    .bearer_auth(random_token("oat_"))
                    .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
                    .send()
                    .await
                    .expect("held request")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    stack.clerk.wait_verify_in_flight(3).await;

    // A fourth token finds no slot within the wait: 503 with Retry-After, never "valid",
    // and no fourth call.
    let resp = call_as(&stack, IP_A, &fresh_token(&stack, "user_late")).await;
    assert_eq!(resp.status(), 503);
    assert!(retry_after(&resp) >= 1);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "temporarily_unavailable");
    assert_eq!(stack.clerk.verify_calls(), calls_before + 3);
    // A live cache entry still passes while the Backend API is saturated.
    assert_eq!(call_as(&stack, IP_B, &cached).await.status(), 200);
    assert_eq!(
        metric(
            &stack,
            "keygate_clerk_backend_refused_total{reason=\"concurrency\"}"
        )
        .await,
        1.0
    );

    stack.clerk.release();
    for h in held {
        assert_eq!(h.await.expect("held task"), 401);
    }

    // Many distinct tokens at once: the Backend API never sees more than three at a time.
    stack.clerk.set_verify_delay(Duration::from_millis(20));
    let statuses: Vec<u16> = futures::stream::iter(0..40)
        .map(|_| {
            let url = stack.gw.at("/mcp");
            async move {
                client()
                    .post(url)
                    .bearer_auth(random_token("oat_"))
                    .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
                    .send()
                    .await
                    .expect("request")
                    .status()
                    .as_u16()
            }
        })
        .buffer_unordered(40)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 503),
        "{statuses:?}"
    );
    assert!(statuses.contains(&401), "{statuses:?}");
    assert_eq!(
        stack.clerk.verify_peak(),
        3,
        "peak of concurrent Backend API calls"
    );
}

#[tokio::test]
async fn backend_api_call_rate_is_bounded() {
    let stack = stack(
        "backend_rate_per_sec = 1\nbackend_burst = 2\nbackend_max_wait_ms = 100",
        "[policy.auth_failures]\nenabled = false\n",
    )
    .await;
    let started = Instant::now();
    let mut unavailable = 0;
    for _ in 0..6 {
        let resp = call_as(&stack, IP_A, &random_token("oat_")).await;
        match resp.status().as_u16() {
            401 => {}
            503 => {
                unavailable += 1;
                assert!(retry_after(&resp) >= 1);
            }
            other => panic!("answered {other}"),
        }
    }
    // The burst, plus one call per whole second that passed.
    let allowed = 2 + started.elapsed().as_secs() as usize;
    let calls = stack.clerk.verify_calls();
    assert!(calls <= allowed, "{calls} calls, at most {allowed} allowed");
    assert!(unavailable >= 6 - allowed, "{unavailable} refused");
    assert_eq!(unavailable + calls, 6);
    assert_eq!(
        metric(
            &stack,
            "keygate_clerk_backend_refused_total{reason=\"rate\"}"
        )
        .await,
        unavailable as f64
    );
}

const DENIAL_RULES: &str = "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
    [policy.auth_failures]\nmax_failures = 100\nwindow_secs = 3600\nlockout_secs = 60\n\
    subject_max_denials = 3\n\
    [[policy.scopes]]\nmethod = \"tools/call\"\nname = \"delete_*\"\nscopes = [\"twenty:write\"]\n";

/// `tools/call <tool>` as `ip`.
async fn call_tool(stack: &Stack, ip: &str, token: &str, tool: &str) -> reqwest::Response {
    client()
        .post(stack.gw.at("/mcp"))
        .header("x-forwarded-for", ip)
        .bearer_auth(token)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": tool, "arguments": {}}}))
        .send()
        .await
        .expect("request")
}

/// A subject whose valid token keeps being refused by policy (a read-only token probing
/// write tools) is locked out itself, from every IP; other users on the same IP are not.
#[tokio::test]
async fn a_subject_refused_by_policy_again_and_again_is_locked_out() {
    let s = stack("", DENIAL_RULES).await;
    let prober = fresh_token(&s, "user_prober");
    let neighbour = fresh_token(&s, "user_neighbour");
    // Three refusals fit the budget; the fourth starts the lockout (and is itself a 403).
    for _ in 0..4 {
        let r = call_tool(&s, IP_A, &prober, "delete_person").await;
        assert_eq!(r.status(), 403);
    }
    // From now on the subject is refused with 429, whatever it asks and from wherever.
    for ip in [IP_A, IP_B] {
        let r = call_tool(&s, ip, &prober, "get_person").await;
        assert_eq!(r.status(), 429, "from {ip}");
        let wait = retry_after(&r);
        assert!((1..=60).contains(&wait), "Retry-After {wait}");
    }
    let forwarded = s.upstream.count();
    // Another user on the same IP is served.
    let r = call_tool(&s, IP_A, &neighbour, "get_person").await;
    assert_eq!(r.status(), 200);
    assert_eq!(s.upstream.count(), forwarded + 1);
    assert_eq!(metric(&s, "keygate_subject_lockouts_total").await, 1.0);
    assert_eq!(
        metric(&s, "keygate_subject_locked_refusals_total").await,
        2.0
    );
    // The IP was never locked: policy refusals are not failed authentications.
    assert_eq!(metric(&s, "keygate_auth_lockouts_total").await, 0.0);
}

/// Denials are counted on the budget every replica shares through Redis: refusals spread over
/// two replicas add up to one lockout.
#[tokio::test]
async fn subject_denials_add_up_across_replicas_through_redis() {
    let redis = crate::common::redis::RedisServer::start();
    let rules = format!("[redis]\nurl = \"{}\"\n{DENIAL_RULES}", redis.url());
    let s = stack("", &rules).await;
    let toml = clerk_config(&s.clerk.url(), s.clerk.secret_key(), &rules);
    let other = Keygate::start(&toml, &s.upstream.url()).await;
    other.wait_ready().await;
    let prober = fresh_token(&s, "user_prober");
    let mut statuses = Vec::new();
    for i in 0..4 {
        let url = if i % 2 == 0 {
            s.gw.at("/mcp")
        } else {
            other.at("/mcp")
        };
        let r = client()
            .post(url)
            .bearer_auth(&prober)
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                          "params": {"name": "delete_person", "arguments": {}}}))
            .send()
            .await
            .expect("request");
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [403, 403, 403, 403]);
    // The replica that saw the fourth refusal locked the subject.
    let r = client()
        .post(other.at("/mcp"))
        .bearer_auth(&prober)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 429);
}
