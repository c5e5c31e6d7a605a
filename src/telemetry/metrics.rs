//! Every metric keygate exports, declared in one place with its help text.
//!
//! Names carry the `keygate_` prefix and base units; label values come from small fixed sets
//! (routes, token kinds, reasons, configured issuers and rule names) — never user ids, tokens,
//! or paths. Each gateway owns its own registry, so several gateways in one process (tests)
//! do not mix their counts. Served by the admin listener at `/metrics`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets (seconds), from sub-millisecond local answers to slow upstreams.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The registry and every metric in it.
pub struct Metrics {
    registry: Registry,
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
    /// Rate-limit checks answered by the fallback because Redis failed.
    pub rate_limit_fallbacks: IntCounter,
    /// Requests refused by policy, by reason.
    pub policy_denials: IntCounterVec,
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
            "Rate-limit checks decided without Redis because it failed.",
        )
        .unwrap_or_else(|e| unreachable_metric("keygate_rate_limit_fallbacks_total", e));
        register(&r, Box::new(rate_limit_fallbacks.clone()), "fallbacks");
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
            key_cache: counter(
                &r,
                "keygate_key_cache_total",
                "Decrypted-key cache lookups by result.",
                &["result"],
            ),
            decrypt_failures,
            rate_limit: counter(
                &r,
                "keygate_rate_limit_decisions_total",
                "Rate-limit decisions by rule and result.",
                &["rule", "result"],
            ),
            rate_limit_fallbacks,
            policy_denials: counter(
                &r,
                "keygate_policy_denials_total",
                "Requests refused by keygate, by reason.",
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
            self.policy_denials.with_label_values(&[reason]);
        }
        for kind in ["connect", "timeout", "other"] {
            self.upstream_errors.with_label_values(&[kind]);
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

/// `2xx`, `4xx`… for a status code (`0`, no response, counts as `5xx`).
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
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
}
