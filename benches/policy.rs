//! Policy on the request path: one local rate-limit decision, and the MCP checks of a
//! `tools/call` body (parse, header match, scope rules).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keygate::policy::mcp::{self, ScopeRules};
use keygate::policy::ratelimit::{LocalLimiter, Quota, RateLimiter};

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

criterion_group!(benches, rate_limit, policy_check);
criterion_main!(benches);
