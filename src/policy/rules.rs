//! Authorization rules (`[[policy.rules]]`) and the global email-domain allowlist
//! (`policy.email_domains`): least privilege by path, HTTP method, JSON-RPC method and name,
//! over the mapped identity (scopes, roles, org, email, second-factor time) and the clock.
//!
//! A request is checked as units: each JSON-RPC call of an MCP POST, or the request itself when
//! it carries no call. For each unit the first rule whose selectors all match decides; its
//! requirements must all hold, else the request is refused naming the rule and the first
//! condition that failed (a fixed set: [`Condition`]). A unit no rule matches is not refused
//! here (`[[policy.scopes]]` and `[policy.org]` still apply). A request without an identity
//! (`auth.required = false`) fails every requirement of a rule that matches it.
//!
//! Rules are compiled once at startup, with every contradiction reported as a configuration
//! problem naming the option; evaluation allocates nothing on the way to "allowed". The clock
//! is injectable ([`Clock`]) so time windows are tested without the wall clock. This module
//! does not turn a denial into a response (`error` does) or read the HTTP request (`proxy`).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::mcp::{Pattern, RpcCall};
use crate::auth::Identity;
pub use crate::config::file::RuleConfig;
use crate::config::Problems;

/// The condition a refused request did not meet; a fixed set, used as the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Scope,
    Role,
    NoOrg,
    Org,
    EmailMissing,
    EmailDomain,
    EmailUnverified,
    Mfa,
    TimeWindow,
}

impl Condition {
    /// Every condition, for priming metrics.
    pub const ALL: [Condition; 9] = [
        Condition::Scope,
        Condition::Role,
        Condition::NoOrg,
        Condition::Org,
        Condition::EmailMissing,
        Condition::EmailDomain,
        Condition::EmailUnverified,
        Condition::Mfa,
        Condition::TimeWindow,
    ];

    /// The machine-readable `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Scope => "insufficient_scope",
            Condition::Role => "role",
            Condition::NoOrg => "no_org",
            Condition::Org => "org",
            Condition::EmailMissing => "email_missing",
            Condition::EmailDomain => "email_domain",
            Condition::EmailUnverified => "email_unverified",
            Condition::Mfa => "mfa",
            Condition::TimeWindow => "time_window",
        }
    }

    /// What was missing, for people.
    pub fn description(self) -> &'static str {
        match self {
            Condition::Scope => "the token lacks a scope this request needs",
            Condition::Role => "none of the token's roles is allowed here",
            Condition::NoOrg => "this request requires a token issued for an organization",
            Condition::Org => "the token's organization is not allowed here",
            Condition::EmailMissing => "this request requires a token that carries an email",
            Condition::EmailDomain => "the token's email domain is not allowed here",
            Condition::EmailUnverified => "the token's email address is not verified",
            Condition::Mfa => "this request requires a recently verified second factor",
            Condition::TimeWindow => "this request is not allowed at this time",
        }
    }
}

/// A refusal: which rule, which condition, and what a client can do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The rule's configured name (`policy.email_domains` for the global allowlist).
    pub rule: Arc<str>,
    pub condition: Condition,
    /// For [`Condition::Mfa`]: the freshness asked for (RFC 9470 `max_age`).
    pub max_age: Option<Duration>,
    /// For [`Condition::Scope`]: the scopes the rule requires.
    pub scopes: Vec<String>,
    /// Whether the credential is an OAuth access token (a client that can step up).
    pub oauth: bool,
}

/// The clock rules read: the system's, or a settable one (tests).
#[derive(Clone, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Clock(system)"),
            Some(t) => write!(f, "Clock(fixed at {})", t.load(Ordering::Relaxed)),
        }
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(None)
    }

    /// A clock that stays at `unix_secs` until [`Clock::set`].
    pub fn fixed(unix_secs: i64) -> Self {
        Self(Some(Arc::new(AtomicI64::new(unix_secs))))
    }

    /// Move a fixed clock (a system clock ignores this).
    pub fn set(&self, unix_secs: i64) {
        if let Some(t) = &self.0 {
            t.store(unix_secs, Ordering::Relaxed);
        }
    }

    /// Now.
    pub fn now(&self) -> SystemTime {
        match &self.0 {
            None => SystemTime::now(),
            Some(t) => {
                let secs = t.load(Ordering::Relaxed);
                match u64::try_from(secs) {
                    Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
                    Err(_) => UNIX_EPOCH,
                }
            }
        }
    }
}

/// Days (bit 0 = Monday) and minutes of the day in one time zone.
#[derive(Debug, Clone)]
struct Window {
    days: u8,
    start: u16,
    end: u16,
    tz: jiff::tz::TimeZone,
}

impl Window {
    fn contains(&self, now: SystemTime) -> bool {
        let Ok(ts) = jiff::Timestamp::try_from(now) else {
            return false;
        };
        let local = self.tz.to_datetime(ts);
        let day = local.weekday().to_monday_zero_offset();
        let minute = i32::from(local.hour()) * 60 + i32::from(local.minute());
        self.days & (1 << day) != 0
            && minute >= i32::from(self.start)
            && minute < i32::from(self.end)
    }
}

#[derive(Debug, Clone)]
struct Rule {
    name: Arc<str>,
    paths: Vec<String>,
    http_methods: Vec<http::Method>,
    method: Option<Pattern>,
    call_name: Option<Pattern>,
    issuers: Vec<String>,
    for_roles: Option<Vec<String>>,
    scopes: Vec<String>,
    roles: Option<Vec<String>>,
    orgs: Option<Vec<String>>,
    require_org: bool,
    email_domains: Option<Vec<String>>,
    mfa_max_age: Option<Duration>,
    window: Option<Window>,
}

/// What a rule looks at in a request (borrowed; nothing is copied to check it).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The path's normal form (see `proxy::route`).
    pub path: &'a str,
    pub http_method: &'a http::Method,
    /// The JSON-RPC calls of an MCP POST; `None` for other requests.
    pub calls: Option<&'a [RpcCall<'a>]>,
}

impl Rule {
    fn matches(
        &self,
        req: &Request<'_>,
        call: Option<&RpcCall<'_>>,
        identity: Option<&Identity>,
    ) -> bool {
        let issuer = identity.map(|i| i.issuer.as_str());
        (self.issuers.is_empty() || issuer.is_some_and(|i| self.issuers.iter().any(|x| x == i)))
            && self.for_roles.as_ref().is_none_or(|wanted| {
                identity.is_some_and(|id| id.roles.iter().any(|r| wanted.contains(r)))
            })
            && (self.paths.is_empty() || self.paths.iter().any(|p| req.path.starts_with(p)))
            && (self.http_methods.is_empty() || self.http_methods.contains(req.http_method))
            && match (&self.method, call) {
                (None, _) => true,
                (Some(p), Some(c)) => p.matches(&c.method),
                (Some(_), None) => false,
            }
            && match (&self.call_name, call) {
                (None, _) => true,
                (Some(p), Some(c)) => c.name.as_deref().is_some_and(|n| p.matches(n)),
                (Some(_), None) => false,
            }
    }

    /// The first requirement `identity` fails, if any.
    fn requirements(
        &self,
        identity: Option<&Identity>,
        clock: &Clock,
    ) -> Result<(), (Condition, Option<Duration>)> {
        let fail = |c: Condition| Err((c, None));
        if !self.scopes.is_empty()
            && !identity.is_some_and(|id| self.scopes.iter().all(|s| id.has_scope(s)))
        {
            return fail(Condition::Scope);
        }
        if let Some(roles) = &self.roles {
            if !identity.is_some_and(|id| id.roles.iter().any(|r| roles.contains(r))) {
                return fail(Condition::Role);
            }
        }
        if self.require_org || self.orgs.is_some() {
            let Some(org) = identity.and_then(|id| id.org.as_ref()) else {
                return fail(Condition::NoOrg);
            };
            if let Some(orgs) = &self.orgs {
                if !orgs.contains(&org.id) {
                    return fail(Condition::Org);
                }
            }
        }
        if let Some(domains) = &self.email_domains {
            check_email(identity, domains).map_err(|c| (c, None))?;
        }
        if let Some(max_age) = self.mfa_max_age {
            let fresh = identity
                .and_then(|id| id.second_factor_at)
                .is_some_and(|at| {
                    clock
                        .now()
                        .duration_since(at)
                        .map_or(true, |age| age <= max_age)
                });
            if !fresh {
                return Err((Condition::Mfa, Some(max_age)));
            }
        }
        if let Some(window) = &self.window {
            if !window.contains(clock.now()) {
                return fail(Condition::TimeWindow);
            }
        }
        Ok(())
    }
}

/// Whether `email` is at exactly one of `domains` (lowercase): one `@`, a non-empty local
/// part, the domain equal to an entry ignoring ASCII case. No suffix or subdomain matching.
pub fn email_domain_allowed(email: &str, domains: &[String]) -> bool {
    let mut parts = email.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !local.is_empty()
        && !email.contains(|c: char| c.is_whitespace() || c.is_control())
        && domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
}

fn check_email(identity: Option<&Identity>, domains: &[String]) -> Result<(), Condition> {
    let Some(email) = identity.and_then(|id| id.email.as_deref()) else {
        return Err(Condition::EmailMissing);
    };
    if !email_domain_allowed(email, domains) {
        return Err(Condition::EmailDomain);
    }
    // Where the issuer says whether it verified the address, it must have.
    if identity.and_then(|id| id.email_verified) == Some(false) {
        return Err(Condition::EmailUnverified);
    }
    Ok(())
}

/// Every rule, compiled; plus the global email-domain allowlist.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    email_domains: Option<Vec<String>>,
}

/// The rule name refusals by the global email-domain allowlist carry.
pub const GLOBAL_EMAIL_RULE: &str = "policy.email_domains";

/// What configuration says about the trusted issuers, for checking rules against it.
#[derive(Debug, Clone)]
pub struct IssuerFacts {
    pub issuer: String,
    /// Whether its tokens can carry roles (mapped, or Clerk's built-in org role).
    pub maps_roles: bool,
}

fn parse_day(raw: &str) -> Option<u8> {
    let days = [
        ["mon", "monday"],
        ["tue", "tuesday"],
        ["wed", "wednesday"],
        ["thu", "thursday"],
        ["fri", "friday"],
        ["sat", "saturday"],
        ["sun", "sunday"],
    ];
    let lower = raw.trim().to_ascii_lowercase();
    days.iter()
        .position(|names| names.contains(&lower.as_str()))
        .map(|i| i as u8)
}

fn parse_clock_time(raw: &str) -> Option<u16> {
    let (h, m) = raw.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    match (h, m) {
        (24, 0) => Some(24 * 60),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

/// `HH:MM-HH:MM` with start before end (24:00 allowed as an end).
fn parse_hours(raw: &str) -> Option<(u16, u16)> {
    let (a, b) = raw.split_once('-')?;
    let (start, end) = (parse_clock_time(a)?, parse_clock_time(b)?);
    (start < end && start < 24 * 60).then_some((start, end))
}

/// A domain as an allowlist entry: lowercase, no `@`, no wildcard, dots only between labels.
fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn domains(field: &str, raw: &[String], problems: &mut Problems) -> Vec<String> {
    if raw.is_empty() {
        problems.push(
            field,
            "is an empty list, which no one can satisfy: list the allowed domains or remove it",
        );
    }
    raw.iter()
        .filter_map(|d| {
            let d = d.trim().to_ascii_lowercase();
            if valid_domain(&d) {
                Some(d)
            } else {
                problems.push(
                    field,
                    format!(
                        "{d:?} is not a domain like company.com (no @, wildcard or leading dot)"
                    ),
                );
                None
            }
        })
        .collect()
}

const HTTP_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

impl Rules {
    /// Compile `[[policy.rules]]` and `policy.email_domains`, reporting every problem.
    pub fn compile(
        configs: &[RuleConfig],
        global_domains: Option<&[String]>,
        issuers: &[IssuerFacts],
        problems: &mut Problems,
    ) -> Self {
        let mut rules = Vec::with_capacity(configs.len());
        let mut names: Vec<&str> = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let field = |f: &str| format!("policy.rules[{i}].{f}");
            let name = c.name.trim();
            if name.is_empty() {
                problems.push(field("name"), "is required");
            } else if let Some(first) = names.iter().position(|n| *n == name) {
                problems.push(
                    field("name"),
                    format!("{name:?} is already the name of policy.rules[{first}]"),
                );
            } else if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
            {
                problems.push(
                    field("name"),
                    format!("{name:?} may hold only letters, digits, '-', '_', '.' and ':'"),
                );
            }
            names.push(name);
            let paths = crate::config::normal_paths(problems, &field("paths"), &c.paths);
            let mut http_methods = Vec::new();
            for m in &c.http_methods {
                let upper = m.trim().to_ascii_uppercase();
                match http::Method::from_bytes(upper.as_bytes()) {
                    Ok(method) if HTTP_METHODS.contains(&upper.as_str()) => {
                        http_methods.push(method)
                    }
                    _ => problems.push(
                        field("http_methods"),
                        format!("{m:?} is not one of {}", HTTP_METHODS.join(", ")),
                    ),
                }
            }
            let glob = |f: &str, raw: &Option<String>, problems: &mut Problems| {
                raw.as_ref().and_then(|g| match Pattern::compile(g) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        problems.push(field(f), format!("invalid glob {g:?}: {e}"));
                        None
                    }
                })
            };
            let method = glob("method", &c.method, problems);
            let call_name = glob("call_name", &c.call_name, problems);
            for iss in &c.issuers {
                if !issuers.iter().any(|f| &f.issuer == iss) {
                    problems.push(
                        field("issuers"),
                        format!(
                            "{iss:?} is not a trusted issuer (Clerk's or an [[issuers]] entry's)"
                        ),
                    );
                }
            }
            if let Some(bad) = c.scopes.iter().find(|s| !super::mcp::is_scope_token(s)) {
                problems.push(
                    field("scopes"),
                    format!("{bad:?} is not a valid OAuth scope token"),
                );
            }
            for (option, roles) in [("roles", &c.roles), ("for_roles", &c.for_roles)] {
                let Some(roles) = roles else { continue };
                if roles.is_empty() || roles.iter().any(|r| r.trim().is_empty()) {
                    problems.push(
                        field(option),
                        "is empty (or holds an empty role), which no one can satisfy: list the roles or remove it",
                    );
                }
                let in_scope = issuers
                    .iter()
                    .filter(|f| c.issuers.is_empty() || c.issuers.contains(&f.issuer));
                if !in_scope.clone().any(|f| f.maps_roles) {
                    let which: Vec<&str> = in_scope.map(|f| f.issuer.as_str()).collect();
                    problems.push(
                        field(option),
                        format!(
                            "no issuer this rule applies to ({}) maps roles: set claims.roles or claims.org_role on it",
                            which.join(", ")
                        ),
                    );
                }
            }
            if c.orgs.as_ref().is_some_and(Vec::is_empty) {
                problems.push(
                    field("orgs"),
                    "is empty, which no org can satisfy: list the allowed org ids or use require_org",
                );
            }
            let email_domains = c
                .email_domains
                .as_ref()
                .map(|d| domains(&field("email_domains"), d, problems));
            if c.mfa_max_age_mins == Some(0) {
                problems.push(
                    field("mfa_max_age_mins"),
                    "must be at least 1 (second-factor ages are whole minutes)",
                );
            }
            let window = compile_window(c, &field, problems);
            rules.push(Rule {
                name: Arc::from(name),
                paths,
                http_methods,
                method,
                call_name,
                issuers: c.issuers.clone(),
                for_roles: c.for_roles.clone(),
                scopes: c.scopes.clone(),
                roles: c.roles.clone(),
                orgs: c.orgs.clone(),
                require_org: c.require_org,
                email_domains,
                mfa_max_age: c
                    .mfa_max_age_mins
                    .map(|m| Duration::from_secs(m.saturating_mul(60))),
                window,
            });
        }
        let email_domains = global_domains.map(|d| domains("policy.email_domains", d, problems));
        Self {
            rules,
            email_domains,
        }
    }

    /// Whether there is anything to check.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.email_domains.is_none()
    }

    /// Check a request: the global allowlist, then for each unit (call, or the request) the
    /// first matching rule's requirements.
    pub fn check(
        &self,
        req: &Request<'_>,
        identity: Option<&Identity>,
        clock: &Clock,
    ) -> Result<(), Box<Denial>> {
        let oauth = identity.is_some_and(Identity::is_oauth);
        if let Some(domains) = &self.email_domains {
            if let Err(condition) = check_email(identity, domains) {
                return Err(Box::new(Denial {
                    rule: Arc::from(GLOBAL_EMAIL_RULE),
                    condition,
                    max_age: None,
                    scopes: Vec::new(),
                    oauth,
                }));
            }
        }
        if self.rules.is_empty() {
            return Ok(());
        }
        let check_unit = |call: Option<&RpcCall<'_>>| {
            let Some(rule) = self.rules.iter().find(|r| r.matches(req, call, identity)) else {
                return Ok(());
            };
            rule.requirements(identity, clock)
                .map_err(|(condition, max_age)| {
                    Box::new(Denial {
                        rule: rule.name.clone(),
                        condition,
                        max_age,
                        scopes: if condition == Condition::Scope {
                            rule.scopes.clone()
                        } else {
                            Vec::new()
                        },
                        oauth,
                    })
                })
        };
        match req.calls {
            Some(calls) if !calls.is_empty() => calls.iter().try_for_each(|c| check_unit(Some(c))),
            _ => check_unit(None),
        }
    }
}

fn compile_window(
    c: &RuleConfig,
    field: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<Window> {
    if c.days.is_none() && c.hours.is_none() {
        if c.time_zone.is_some() {
            problems.push(
                field("time_zone"),
                "is set without days or hours: say when the rule allows",
            );
        }
        return None;
    }
    let Some(zone) = &c.time_zone else {
        problems.push(
            field("time_zone"),
            "is required with days or hours (an IANA name such as Europe/Berlin)",
        );
        return None;
    };
    let tz = match jiff::tz::TimeZone::get(zone) {
        Ok(tz) => Some(tz),
        Err(_) => {
            problems.push(
                field("time_zone"),
                format!("{zone:?} is not a known IANA time zone (such as Europe/Berlin)"),
            );
            None
        }
    };
    let mut days = 0u8;
    match &c.days {
        None => days = 0x7f,
        Some(list) if list.is_empty() => problems.push(
            field("days"),
            "is empty, which no time can satisfy: list days (mon … sun) or remove it",
        ),
        Some(list) => {
            for d in list {
                match parse_day(d) {
                    Some(i) => days |= 1 << i,
                    None => problems.push(
                        field("days"),
                        format!("{d:?} is not a day (mon, tue, wed, thu, fri, sat, sun)"),
                    ),
                }
            }
        }
    }
    let (start, end) = match &c.hours {
        None => (0, 24 * 60),
        Some(h) => match parse_hours(h) {
            Some(range) => range,
            None => {
                problems.push(
                    field("hours"),
                    format!("{h:?} must be HH:MM-HH:MM with the start before the end (00:00-24:00 at most)"),
                );
                (0, 0)
            }
        },
    };
    Some(Window {
        days,
        start,
        end,
        tz: tz?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{OrgContext, TokenKind};

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn compile(configs: &[RuleConfig]) -> Result<Rules, Problems> {
        let mut problems = Problems::default();
        let facts = [IssuerFacts {
            issuer: "https://idp.example".into(),
            maps_roles: true,
        }];
        let rules = Rules::compile(configs, None, &facts, &mut problems);
        if problems.0.is_empty() {
            Ok(rules)
        } else {
            Err(problems)
        }
    }

    fn id() -> Identity {
        let mut id = Identity::new("https://idp.example", "u1", TokenKind::OAuthJwt);
        id.roles = strings(&["member"]);
        id
    }

    fn mcp_req<'a>(calls: &'a [RpcCall<'a>]) -> Request<'a> {
        Request {
            path: "/mcp",
            http_method: &http::Method::POST,
            calls: Some(calls),
        }
    }

    fn tool(name: &str) -> RpcCall<'_> {
        RpcCall {
            method: "tools/call".into(),
            name: Some(name.into()),
        }
    }

    #[test]
    fn the_first_matching_rule_decides_each_call() {
        let rules = compile(&[
            RuleConfig {
                name: "delete".into(),
                method: Some("tools/call".into()),
                call_name: Some("delete_*".into()),
                roles: Some(strings(&["admin"])),
                ..RuleConfig::default()
            },
            RuleConfig {
                name: "tools".into(),
                method: Some("tools/call".into()),
                roles: Some(strings(&["member", "admin"])),
                ..RuleConfig::default()
            },
        ])
        .expect("rules");
        let clock = Clock::system();
        let member = id();
        let calls = [tool("get_a")];
        assert_eq!(rules.check(&mcp_req(&calls), Some(&member), &clock), Ok(()));
        let calls = [tool("get_a"), tool("delete_b")];
        let denial = rules
            .check(&mcp_req(&calls), Some(&member), &clock)
            .expect_err("refused");
        assert_eq!(
            (&*denial.rule, denial.condition),
            ("delete", Condition::Role)
        );
        // Without an identity every requirement fails.
        let calls = [tool("get_a")];
        assert!(rules.check(&mcp_req(&calls), None, &clock).is_err());
    }

    #[test]
    fn org_and_mfa_and_window_conditions() {
        let rules = compile(&[RuleConfig {
            name: "r".into(),
            orgs: Some(strings(&["org_a"])),
            mfa_max_age_mins: Some(10),
            days: Some(strings(&["mon", "tue", "wed", "thu", "fri"])),
            hours: Some("09:00-17:00".into()),
            time_zone: Some("Europe/Berlin".into()),
            ..RuleConfig::default()
        }])
        .expect("rules");
        // Wednesday 2026-07-15 10:00 in Berlin (UTC+2) is 08:00 UTC.
        let wed_10 = 1_784_102_400;
        let clock = Clock::fixed(wed_10);
        let req = Request {
            path: "/anything",
            http_method: &http::Method::GET,
            calls: None,
        };
        let mut who = id();
        let reason = |who: &Identity| {
            rules
                .check(&req, Some(who), &clock)
                .map_err(|d| d.condition)
        };
        assert_eq!(reason(&who), Err(Condition::NoOrg));
        who.org = Some(OrgContext {
            id: "org_b".into(),
            ..OrgContext::default()
        });
        assert_eq!(reason(&who), Err(Condition::Org));
        who.org = Some(OrgContext {
            id: "org_a".into(),
            ..OrgContext::default()
        });
        assert_eq!(reason(&who), Err(Condition::Mfa));
        who.second_factor_at = Some(clock.now() - Duration::from_secs(11 * 60));
        assert_eq!(reason(&who), Err(Condition::Mfa));
        who.second_factor_at = Some(clock.now() - Duration::from_secs(9 * 60));
        assert_eq!(reason(&who), Ok(()));
        // 17:00 Berlin is outside (end excluded); 16:59 inside; Saturday outside.
        clock.set(wed_10 + 7 * 3600);
        who.second_factor_at = Some(clock.now());
        assert_eq!(reason(&who), Err(Condition::TimeWindow));
        clock.set(wed_10 + 7 * 3600 - 60);
        assert_eq!(reason(&who), Ok(()));
        clock.set(wed_10 + 3 * 86_400);
        who.second_factor_at = Some(clock.now());
        assert_eq!(reason(&who), Err(Condition::TimeWindow));
    }

    #[test]
    fn selectors_path_http_method_issuer_and_calls() {
        let rules = compile(&[
            RuleConfig {
                name: "keys-writes".into(),
                paths: strings(&["/api/keys"]),
                http_methods: strings(&["post", "DELETE"]),
                email_domains: Some(strings(&["company.com"])),
                ..RuleConfig::default()
            },
            RuleConfig {
                name: "idp-only-tools".into(),
                issuers: strings(&["https://idp.example"]),
                method: Some("tools/*".into()),
                require_org: true,
                ..RuleConfig::default()
            },
        ])
        .expect("rules");
        let clock = Clock::system();
        let who = id();
        let at = |path, method| Request {
            path,
            http_method: method,
            calls: None,
        };
        let denied = |req: &Request<'_>, who: &Identity| {
            rules
                .check(req, Some(who), &clock)
                .err()
                .map(|d| (d.rule.to_string(), d.condition))
        };
        let post = http::Method::POST;
        let get = http::Method::GET;
        // Prefix of the normal form; methods compared case-insensitively in config.
        for path in ["/api/keys", "/api/keys/"] {
            assert_eq!(
                denied(&at(path, &post), &who),
                Some(("keys-writes".into(), Condition::EmailMissing))
            );
        }
        assert_eq!(denied(&at("/api/keys", &get), &who), None);
        assert_eq!(denied(&at("/other", &post), &who), None);
        let mut with_email = id();
        with_email.email = Some("a@company.com".into());
        assert_eq!(denied(&at("/api/keys", &post), &with_email), None);
        with_email.email_verified = Some(false);
        assert_eq!(
            denied(&at("/api/keys", &post), &with_email),
            Some(("keys-writes".into(), Condition::EmailUnverified))
        );
        // A rule with a method selector never matches a request without calls.
        assert_eq!(denied(&at("/mcp", &post), &who), None);
        let calls = [tool("get_a")];
        assert_eq!(
            denied(&mcp_req(&calls), &who),
            Some(("idp-only-tools".into(), Condition::NoOrg))
        );
        // Another issuer's token is not selected by the rule.
        let other = Identity::new("https://other.example", "u1", TokenKind::OAuthJwt);
        assert_eq!(denied(&mcp_req(&calls), &other), None);
        // A body of responses only is checked as the request itself.
        assert_eq!(denied(&mcp_req(&[]), &who), None);
    }

    #[test]
    fn email_domains_match_exactly() {
        let allowed = strings(&["company.com", "company.co"]);
        for ok in ["a@company.com", "a@COMPANY.com", "b.c@company.co"] {
            assert!(email_domain_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "a@company.com.evil.io",
            "evil@company.com@x",
            "a@evilcompany.com",
            "a@sub.company.com",
            "@company.com",
            "company.com",
            "a@company.com ",
            "a@company.com\n",
            "a@company.co.uk",
            "a@company.com.",
        ] {
            assert!(!email_domain_allowed(bad, &allowed), "{bad:?}");
        }
    }

    #[test]
    fn contradictions_are_problems_naming_the_option() {
        let bad = compile(&[
            RuleConfig {
                name: "a".into(),
                roles: Some(vec![]),
                ..RuleConfig::default()
            },
            RuleConfig {
                name: "a".into(),
                days: Some(strings(&["mon"])),
                time_zone: Some("Mars/Olympus".into()),
                ..RuleConfig::default()
            },
            RuleConfig {
                name: "c".into(),
                hours: Some("17:00-09:00".into()),
                time_zone: Some("UTC".into()),
                ..RuleConfig::default()
            },
            RuleConfig {
                name: "d".into(),
                days: Some(strings(&["mon"])),
                ..RuleConfig::default()
            },
            RuleConfig {
                name: "e".into(),
                email_domains: Some(strings(&["*.company.com"])),
                ..RuleConfig::default()
            },
        ])
        .expect_err("problems");
        let fields: Vec<&str> = bad.0.iter().map(|p| p.field.as_str()).collect();
        for want in [
            "policy.rules[0].roles",
            "policy.rules[1].name",
            "policy.rules[1].time_zone",
            "policy.rules[2].hours",
            "policy.rules[3].time_zone",
            "policy.rules[4].email_domains",
        ] {
            assert!(fields.contains(&want), "{want} not in {fields:?}");
        }
        // A role rule where no issuer maps roles.
        let mut problems = Problems::default();
        Rules::compile(
            &[RuleConfig {
                name: "r".into(),
                roles: Some(strings(&["admin"])),
                ..RuleConfig::default()
            }],
            None,
            &[IssuerFacts {
                issuer: "https://x".into(),
                maps_roles: false,
            }],
            &mut problems,
        );
        assert_eq!(problems.0.len(), 1, "{problems}");
        assert!(problems.0[0].message.contains("maps roles"), "{problems}");
    }
}

/// Property tests over the email-domain matcher.
#[cfg(test)]
mod prop {
    use proptest::prelude::*;

    use super::email_domain_allowed;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// An accepted address has exactly one `@` and its domain is exactly an entry.
        #[test]
        fn accepted_addresses_are_exactly_at_an_allowed_domain(email in "[a-zA-Z@.\\- ]{0,24}(company\\.com)?[a-z@.]{0,8}") {
            let allowed = vec!["company.com".to_string()];
            if email_domain_allowed(&email, &allowed) {
                prop_assert_eq!(email.matches('@').count(), 1);
                let (local, domain) = email.split_once('@').unwrap_or_default();
                prop_assert!(!local.is_empty());
                prop_assert!(domain.eq_ignore_ascii_case("company.com"), "{}", email);
            }
        }

        /// Appending anything to an allowed domain, or prefixing a label, is refused.
        #[test]
        fn suffix_and_prefix_tricks_are_refused(
            local in "[a-z]{1,8}",
            suffix in "[a-z.@]{1,12}",
            prefix in "[a-z]{1,8}\\.?",
        ) {
            let allowed = vec!["company.com".to_string()];
            let plain = format!("{local}@company.com");
            prop_assert!(email_domain_allowed(&plain, &allowed));
            let with_suffix = format!("{local}@company.com{suffix}");
            prop_assert!(!email_domain_allowed(&with_suffix, &allowed));
            let with_prefix = format!("{local}@{prefix}company.com");
            prop_assert!(!email_domain_allowed(&with_prefix, &allowed));
        }
    }
}
