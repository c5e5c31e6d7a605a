//! Policy on the request path: one local rate-limit decision, the MCP checks of a
//! `tools/call` body (parse, header match, scope rules), and the route decision.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keygate::policy::mcp::{self, ScopeRules};
use keygate::policy::ratelimit::{LocalLimiter, Quota, RateLimiter};
use keygate::proxy::route::Routes;

fn rate_limit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let limiter = LocalLimiter::new(100_000);
    let quota = Quota::new(1_000_000_000, Duration::from_secs(1), 1_000_000).expect("quota");
    c.bench_function("rate limit decision (local)", |b| {
        b.iter(|| {
            rt.block_on(limiter.check(black_box("user-mcp:user:user_bench"), &quota, 1))
                .expect("decision")
        })
    });
}

fn policy_check(c: &mut Criterion) {
    let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_person","arguments":{"id":"8f2c"}}}"#;
    let rules = ScopeRules::twenty_default();
    let granted = vec!["twenty:read".to_string()];
    c.bench_function("mcp policy check (parse + headers + scopes)", |b| {
        b.iter(|| {
            let calls = mcp::parse_body(black_box(body)).expect("valid");
            mcp::check_headers(&calls, Some("tools/call"), Some("get_person")).expect("match");
            rules.authorize(&calls, &granted).expect("allowed")
        })
    });
}

fn route_decision(c: &mut Criterion) {
    let routes = Routes::new(&["/mcp".to_string()], true);
    c.bench_function("route decision (canonical /mcp)", |b| {
        b.iter(|| routes.classify(black_box("/mcp")).expect("path").kind)
    });
    c.bench_function("route decision (//MCP;x/%73ub, normalised)", |b| {
        b.iter(|| {
            routes
                .classify(black_box("//MCP;x/%73ub"))
                .expect("path")
                .kind
        })
    });
}

criterion_group!(benches, rate_limit, policy_check, route_decision);
criterion_main!(benches);
