//! Every metric keygate exports, declared in one place with its help text.
//!
//! Names carry the `keygate_` prefix and base units; label values come from small fixed sets
//! (routes, token kinds, reasons, configured issuers and rule names) — never user ids, tokens,
//! or paths. Each gateway owns its own registry, so several gateways in one process (tests)
//! do not mix their counts. Served by the admin listener at `/metrics`.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets (seconds), from sub-millisecond local answers to slow upstreams.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Route kinds, methods and status classes of `keygate_requests_total`.
const ROUTES: [&str; 3] = ["local", "proxied", "keys"];
const METHODS: [&str; 8] = [
    "GET", "POST", "DELETE", "OPTIONS", "HEAD", "PUT", "PATCH", "OTHER",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Token kinds of accepted requests in `keygate_auth_total`.
const AUTH_KINDS: [&str; 5] = ["session", "oauth_jwt", "oauth_opaque", "m2m", "api_key"];

/// Children of the series every request touches, each resolved on first use and then read
/// without the label hashing and lock of `with_label_values` (and never created before use,
/// so `/metrics` lists only series that were primed or seen).
struct PerRequest {
    requests: [OnceLock<IntCounter>; ROUTES.len() * METHODS.len() * CLASSES.len()],
    durations: [OnceLock<Histogram>; ROUTES.len()],
    accepted: [OnceLock<IntCounter>; AUTH_KINDS.len()],
}

impl PerRequest {
    fn new() -> Self {
        Self {
            requests: [const { OnceLock::new() }; ROUTES.len() * METHODS.len() * CLASSES.len()],
            durations: [const { OnceLock::new() }; ROUTES.len()],
            accepted: [const { OnceLock::new() }; AUTH_KINDS.len()],
        }
    }
}

/// The index in `CLASSES` of a status code's class (`0`, no response, counts as `5xx`).
fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// The registry and every metric in it.
pub struct Metrics {
    registry: Registry,
    per_request: PerRequest,
    /// `keygate_key_cache_total{result="hit"}` and `{result="miss"}`.
    pub key_cache_hit: IntCounter,
    pub key_cache_miss: IntCounter,
    /// Requests answered, by route kind, method and status class.
    pub requests: IntCounterVec,
    /// Whole-request latency as keygate saw it, by route kind.
    pub request_duration: HistogramVec,
    /// Time from sending the request upstream to the upstream's response header.
    pub upstream_duration: Histogram,
    /// Requests being handled now.
    pub in_flight: IntGauge,
    /// SSE responses being streamed now.
    pub sse_open: IntGauge,
    /// Requests that ended because the client closed its connection or stopped reading.
    pub downstream_disconnects: IntCounter,
    /// HTTP/2 connections closed for sending control frames past their budget.
    pub h2_control_floods: IntCounter,
    /// Authentication outcomes by token kind, outcome and reason.
    pub auth: IntCounterVec,
    /// JWKS fetch attempts by issuer and result.
    pub jwks_fetches: IntCounterVec,
    /// Age of each issuer's key set (seconds since the last successful fetch).
    pub jwks_age: IntGaugeVec,
    /// Verified-token cache lookups by result.
    pub token_cache: IntCounterVec,
    /// Key store operations by store, operation and result.
    pub store_ops: IntCounterVec,
    /// Key store latency by store and operation.
    pub store_duration: HistogramVec,
    /// Decrypted-key cache lookups by result.
    pub key_cache: IntCounterVec,
    /// Stored keys that failed to decrypt.
    pub decrypt_failures: IntCounter,
    /// Rate-limit decisions by rule and result.
    pub rate_limit: IntCounterVec,
    /// Rate-limit calls (each the budgets of one request stage) answered by the fallback because
    /// Redis failed.
    pub rate_limit_fallbacks: IntCounter,
    /// 1 while a Redis client's circuit breaker is open (Redis not asked, fallbacks used), by
    /// client (`key_store`: the vault's; `shared`: rate limits and session bindings).
    pub redis_circuit_open: IntGaugeVec,
    /// Times a Redis client's circuit breaker opened, by client.
    pub redis_circuit_trips: IntCounterVec,
    /// Requests refused by policy, by rule (configured names; empty when no rule refused) and
    /// reason (a fixed set).
    pub policy_denials: IntCounterVec,
    /// Client IPs locked out after repeated failed authentication.
    pub auth_lockouts: IntCounter,
    /// Requests refused because their client IP was locked out.
    pub auth_locked_refusals: IntCounter,
    /// Subjects locked out after repeated policy refusals.
    pub subject_lockouts: IntCounter,
    /// Requests refused because their subject was locked out.
    pub subject_locked_refusals: IntCounter,
    /// Clerk Backend API calls refused by keygate's own bound, by which limit refused them
    /// (`concurrency`, `rate`): their requests got 503.
    pub clerk_backend_refused: IntCounterVec,
    /// Upstream failures by kind.
    pub upstream_errors: IntCounterVec,
    /// Always 1; the version label says which build runs.
    pub build_info: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, Box::new(c.clone()), name);
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, Box::new(h.clone()), name);
    h
}

fn register(registry: &Registry, c: Box<dyn prometheus::core::Collector>, name: &str) {
    if let Err(e) = registry.register(c) {
        unreachable_metric(name, e)
    }
}

/// Metric definitions are constants: an invalid one is a programming error found by the first
/// test that builds a gateway, never by a request.
fn unreachable_metric(name: &str, e: prometheus::Error) -> ! {
    panic!("metric {name} is defined wrongly: {e}")
}

impl Metrics {
    /// Create the registry with every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_upstream_duration_seconds",
                "Time from sending a request upstream to the upstream's response header.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_upstream_duration_seconds", e));
        register(&r, Box::new(upstream_duration.clone()), "upstream_duration");
        let in_flight = IntGauge::new("keygate_requests_in_flight", "Requests being handled now.")
            .unwrap_or_else(|e| unreachable_metric("keygate_requests_in_flight", e));
        register(&r, Box::new(in_flight.clone()), "in_flight");
        let sse_open = IntGauge::new("keygate_sse_streams_open", "SSE responses streaming now.")
            .unwrap_or_else(|e| unreachable_metric("keygate_sse_streams_open", e));
        register(&r, Box::new(sse_open.clone()), "sse_open");
        let downstream_disconnects = IntCounter::new(
            "keygate_downstream_disconnects_total",
            "Requests that ended because the client closed its connection or stopped reading.",
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_downstream_disconnects_total", e));
        register(&r, Box::new(downstream_disconnects.clone()), "disconnects");
        let h2_control_floods = IntCounter::new(
            "keygate_h2_control_floods_total",
            "HTTP/2 connections closed for sending SETTINGS, PING or PRIORITY frames past their budget.",
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_h2_control_floods_total", e));
        register(&r, Box::new(h2_control_floods.clone()), "h2_control_floods");
        let jwks_age = IntGaugeVec::new(
            Opts::new(
                "keygate_jwks_age_seconds",
                "Seconds since each issuer's signing keys were last fetched successfully.",
            ),
            &["issuer"],
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_jwks_age_seconds", e));
        register(&r, Box::new(jwks_age.clone()), "jwks_age");
        let decrypt_failures = IntCounter::new(
            "keygate_key_decrypt_failures_total",
            "Stored API keys that failed to decrypt (requests failed closed).",
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_key_decrypt_failures_total", e));
        register(&r, Box::new(decrypt_failures.clone()), "decrypt_failures");
        let rate_limit_fallbacks = IntCounter::new(
            "keygate_rate_limit_fallbacks_total",
            "Rate-limit calls (the budgets of one request stage) decided without Redis because it failed.",
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_rate_limit_fallbacks_total", e));
        register(&r, Box::new(rate_limit_fallbacks.clone()), "fallbacks");
        let redis_circuit_open = IntGaugeVec::new(
            Opts::new(
                "keygate_redis_circuit_open",
                "1 while a Redis client's circuit breaker is open: Redis is not asked and \
                 fallbacks answer.",
            ),
            &["client"],
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_redis_circuit_open", e));
        register(
            &r,
            Box::new(redis_circuit_open.clone()),
            "redis_circuit_open",
        );
        let build_info = IntGaugeVec::new(
            Opts::new(
                "keygate_build_info",
                "Always 1; labelled with the running version.",
            ),
            &["version"],
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_build_info", e));
        register(&r, Box::new(build_info.clone()), "build_info");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let auth_lockouts = IntCounter::new(
            "keygate_auth_lockouts_total",
            "Client IPs locked out after repeated failed authentication.",
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_auth_lockouts_total", e));
        register(&r, Box::new(auth_lockouts.clone()), "auth_lockouts");
        let auth_locked_refusals = IntCounter::new(
            "keygate_auth_locked_refusals_total",
            "Requests refused (429) because their client IP was locked out.",
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_auth_locked_refusals_total", e));
        register(
            &r,
            Box::new(auth_locked_refusals.clone()),
            "auth_locked_refusals",
        );
        let subject_lockouts = IntCounter::new(
            "keygate_subject_lockouts_total",
            "Subjects (issuer and user) locked out after repeated policy refusals.",
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_subject_lockouts_total", e));
        register(&r, Box::new(subject_lockouts.clone()), "subject_lockouts");
        let subject_locked_refusals = IntCounter::new(
            "keygate_subject_locked_refusals_total",
            "Requests refused because their subject was locked out.",
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_subject_locked_refusals_total", e));
        register(
            &r,
            Box::new(subject_locked_refusals.clone()),
            "subject_locked_refusals",
        );
        let key_cache = counter(
            &r,
            "keygate_key_cache_total",
            "Decrypted-key cache lookups by result.",
            &["result"],
        );
        Self {
            requests: counter(
                &r,
                "keygate_requests_total",
                "Requests answered, by route kind, method and status class.",
                &["route", "method", "status_class"],
            ),
            request_duration: histogram(
                &r,
                "keygate_request_duration_seconds",
                "Whole-request latency as keygate saw it, by route kind.",
                &["route"],
            ),
            upstream_duration,
            in_flight,
            sse_open,
            downstream_disconnects,
            h2_control_floods,
            auth: counter(
                &r,
                "keygate_auth_total",
                "Authentication outcomes by token kind, outcome and reason.",
                &["kind", "outcome", "reason"],
            ),
            jwks_fetches: counter(
                &r,
                "keygate_jwks_fetches_total",
                "JWKS fetch attempts by issuer and result.",
                &["issuer", "result"],
            ),
            jwks_age,
            token_cache: counter(
                &r,
                "keygate_token_cache_total",
                "Verified-token cache lookups by result.",
                &["result"],
            ),
            store_ops: counter(
                &r,
                "keygate_key_store_operations_total",
                "Key store operations by store, operation and result.",
                &["store", "op", "result"],
            ),
            store_duration: histogram(
                &r,
                "keygate_key_store_duration_seconds",
                "Key store latency by store and operation.",
                &["store", "op"],
            ),
            key_cache_hit: key_cache.with_label_values(&["hit"]),
            key_cache_miss: key_cache.with_label_values(&["miss"]),
            key_cache,
            decrypt_failures,
            rate_limit: counter(
                &r,
                "keygate_rate_limit_decisions_total",
                "Rate-limit decisions by rule and result.",
                &["rule", "result"],
            ),
            rate_limit_fallbacks,
            redis_circuit_open,
            redis_circuit_trips: counter(
                &r,
                "keygate_redis_circuit_trips_total",
                "Times a Redis client's circuit breaker opened after repeated failures.",
                &["client"],
            ),
            policy_denials: counter(
                &r,
                "keygate_policy_denials_total",
                "Requests refused by keygate, by authorization rule (empty for refusals no \
                 rule made) and reason.",
                &["rule", "reason"],
            ),
            auth_lockouts,
            auth_locked_refusals,
            subject_lockouts,
            subject_locked_refusals,
            clerk_backend_refused: counter(
                &r,
                "keygate_clerk_backend_refused_total",
                "Clerk Backend API calls refused by keygate's bound (their requests got 503), by limit.",
                &["reason"],
            ),
            upstream_errors: counter(
                &r,
                "keygate_upstream_errors_total",
                "Upstream failures by kind.",
                &["kind"],
            ),
            build_info,
            registry: r,
            per_request: PerRequest::new(),
        }
    }

    /// Count a finished request (method as `METHODS` names it, else `OTHER`) and observe how
    /// long it took.
    pub fn request_done(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let class = class_index(status);
        let m = METHODS
            .iter()
            .position(|x| *x == method)
            .unwrap_or(METHODS.len() - 1);
        let labels = [route, METHODS[m], CLASSES[class]];
        let Some(r) = ROUTES.iter().position(|x| *x == route) else {
            // Not a route kind keygate has: counted, without a cached child.
            self.requests.with_label_values(&labels).inc();
            self.request_duration
                .with_label_values(&[route])
                .observe(seconds);
            return;
        };
        self.per_request.requests[(r * METHODS.len() + m) * CLASSES.len() + class]
            .get_or_init(|| self.requests.with_label_values(&labels))
            .inc();
        self.per_request.durations[r]
            .get_or_init(|| self.request_duration.with_label_values(&[route]))
            .observe(seconds);
    }

    /// Count an accepted token of `kind`.
    pub fn auth_accepted(&self, kind: &str) {
        match AUTH_KINDS.iter().position(|k| *k == kind) {
            Some(i) => self.per_request.accepted[i]
                .get_or_init(|| self.auth.with_label_values(&[kind, "accepted", "ok"]))
                .inc(),
            None => self.auth.with_label_values(&[kind, "accepted", "ok"]).inc(),
        }
    }

    /// Create every series the dashboards and alerts expect, at zero, so they exist before the
    /// first event (a `rate()` over a missing series is empty, not zero).
    pub fn prime(&self, issuers: &[String], store: Option<&str>, rules: &[String]) {
        for route in ["local", "proxied", "keys"] {
            self.request_duration.with_label_values(&[route]);
            for class in ["2xx", "4xx", "5xx"] {
                self.requests.with_label_values(&[route, "GET", class]);
                self.requests.with_label_values(&[route, "POST", class]);
            }
        }
        for kind in ["session", "oauth_jwt", "oauth_opaque", "m2m", "api_key"] {
            self.auth.with_label_values(&[kind, "accepted", "ok"]);
        }
        self.auth
            .with_label_values(&["none", "rejected", "missing"]);
        for kind in [
            "oauth_jwt",
            "jwt",
            "oauth_opaque",
            "m2m",
            "api_key",
            "unknown",
        ] {
            self.auth.with_label_values(&[kind, "rejected", "invalid"]);
            self.auth
                .with_label_values(&[kind, "unavailable", "unavailable"]);
        }
        for issuer in issuers {
            self.jwks_age.with_label_values(&[issuer.as_str()]);
            for result in ["ok", "error"] {
                self.jwks_fetches
                    .with_label_values(&[issuer.as_str(), result]);
            }
        }
        for result in ["hit", "miss"] {
            self.token_cache.with_label_values(&[result]);
            self.key_cache.with_label_values(&[result]);
        }
        if let Some(store) = store {
            for op in ["get", "put", "delete"] {
                self.store_duration.with_label_values(&[store, op]);
                for result in ["ok", "error"] {
                    self.store_ops.with_label_values(&[store, op, result]);
                }
            }
        }
        for rule in rules {
            for result in ["allowed", "limited"] {
                self.rate_limit.with_label_values(&[rule.as_str(), result]);
            }
        }
        for reason in [
            "origin",
            "insufficient_scope",
            "forbidden",
            "session_not_found",
            "bad_request",
            "too_large",
            "rate_limited",
            "no_api_key",
            "key_decrypt",
            "unavailable",
        ] {
            self.policy_denials.with_label_values(&["", reason]);
        }
        for kind in ["connect", "timeout", "other"] {
            self.upstream_errors.with_label_values(&[kind]);
        }
        for reason in ["concurrency", "rate"] {
            self.clerk_backend_refused.with_label_values(&[reason]);
        }
    }

    /// Raise a counter to `total` (for values other components count themselves).
    pub fn sync_counter(counter: &IntCounter, total: u64) {
        let current = counter.get();
        if total > current {
            counter.inc_by(total - current);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "could not encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_help_and_prefix() {
        let m = Metrics::new();
        m.requests
            .with_label_values(&["proxied", "POST", "2xx"])
            .inc();
        let text = String::from_utf8(m.render()).expect("utf8");
        assert!(text.contains("# HELP keygate_requests_total"));
        assert!(text.contains("keygate_build_info{version=\""));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap_or("");
            assert!(name.starts_with("keygate_"), "{line}");
        }
    }

    #[test]
    fn per_request_series_count_under_their_labels() {
        let m = Metrics::new();
        m.request_done("proxied", "POST", 200, 0.002);
        m.request_done("proxied", "POST", 204, 0.001);
        m.request_done("local", "BREW", 418, 0.0);
        m.request_done("keys", "DELETE", 0, 0.0);
        m.request_done("elsewhere", "GET", 302, 0.0);
        let count = |labels: &[&str]| m.requests.with_label_values(labels).get();
        assert_eq!(count(&["proxied", "POST", "2xx"]), 2);
        assert_eq!(count(&["local", "OTHER", "4xx"]), 1);
        assert_eq!(count(&["keys", "DELETE", "5xx"]), 1);
        assert_eq!(count(&["elsewhere", "GET", "3xx"]), 1);
        let proxied = m.request_duration.with_label_values(&["proxied"]);
        assert_eq!(proxied.get_sample_count(), 2);
        assert!((proxied.get_sample_sum() - 0.003).abs() < 1e-9);

        m.auth_accepted("oauth_jwt");
        m.auth_accepted("oauth_jwt");
        m.auth_accepted("api_key");
        let accepted = |kind: &str| m.auth.with_label_values(&[kind, "accepted", "ok"]).get();
        assert_eq!(accepted("oauth_jwt"), 2);
        assert_eq!(accepted("api_key"), 1);
        assert_eq!(accepted("session"), 0);

        m.key_cache_hit.inc();
        assert_eq!(m.key_cache.with_label_values(&["hit"]).get(), 1);
        assert_eq!(m.key_cache.with_label_values(&["miss"]).get(), 0);
    }

    #[test]
    fn status_classes_cover_every_code() {
        for (status, class) in [
            (101, "1xx"),
            (200, "2xx"),
            (399, "3xx"),
            (404, "4xx"),
            (0, "5xx"),
            (503, "5xx"),
        ] {
            assert_eq!(CLASSES[class_index(status)], class);
        }
    }
}
