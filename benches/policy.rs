//! Policy on the request path: one local rate-limit decision, the MCP checks of a
//! `tools/call` body (parse, header match, scope rules), the authorization rules over a mapped
//! identity, and the route decision.

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

fn authorization_rules(c: &mut Criterion) {
    use keygate::auth::{Identity, TokenKind};
    use keygate::policy::rules::{Clock, IssuerFacts, Request, RuleConfig, Rules};
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let rule = |name: &str, call_name: Option<&str>, roles: &[&str]| RuleConfig {
        name: name.into(),
        method: Some("tools/call".into()),
        call_name: call_name.map(Into::into),
        roles: Some(strings(roles)),
        ..RuleConfig::default()
    };
    let configs = [
        RuleConfig {
            name: "key-writes-need-fresh-mfa".into(),
            paths: strings(&["/api/keys"]),
            http_methods: strings(&["POST", "DELETE"]),
            mfa_max_age_mins: Some(10),
            ..RuleConfig::default()
        },
        RuleConfig {
            name: "contractor-hours".into(),
            for_roles: Some(strings(&["contractor"])),
            days: Some(strings(&["mon", "tue", "wed", "thu", "fri"])),
            hours: Some("09:00-17:00".into()),
            time_zone: Some("Europe/Berlin".into()),
            ..RuleConfig::default()
        },
        rule("delete-tools-admin-only", Some("delete_*"), &["admin"]),
        rule(
            "write-tools-managers",
            Some("{create,update}_*"),
            &["manager", "admin"],
        ),
        rule("read-tools-members", None, &["member", "manager", "admin"]),
    ];
    let mut problems = keygate::config::Problems::default();
    let facts = [IssuerFacts {
        issuer: "https://idp.example".into(),
        maps_roles: true,
    }];
    let domains = strings(&["company.com", "company.co"]);
    let rules = Rules::compile(&configs, Some(&domains), &facts, &mut problems);
    assert!(problems.0.is_empty(), "{problems}");
    let mut identity = Identity::new("https://idp.example", "user_1", TokenKind::OAuthJwt);
    identity.roles = strings(&["member"]);
    identity.email = Some("ana@company.com".into());
    let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_person","arguments":{"id":"8f2c"}}}"#;
    let calls = mcp::parse_body(body).expect("valid");
    let clock = Clock::system();
    c.bench_function(
        "authorization rules (5 rules, email allowlist, allowed)",
        |b| {
            b.iter(|| {
                let request = Request {
                    path: "/mcp",
                    http_method: &http::Method::POST,
                    calls: Some(black_box(&calls)),
                };
                rules
                    .check(&request, Some(black_box(&identity)), &clock)
                    .expect("allowed")
            })
        },
    );
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

criterion_group!(
    benches,
    rate_limit,
    policy_check,
    authorization_rules,
    route_decision
);
criterion_main!(benches);
