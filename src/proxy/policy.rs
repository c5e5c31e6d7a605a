//! The policy stage: rate limits (per IP before anything else; per user and org, tool budgets
//! included, once the caller and the MCP calls are known) and authorization (rules, org
//! rules, per-method scopes). The rules themselves are `policy`'s; this applies them to the
//! request's route decision, identity and calls.

use super::route::Classified;
use super::{GatewayState, RequestCtx};
use crate::config::RateKey;
use crate::error::{GatewayError, RETRY_RATE_LIMITER};
use crate::policy::mcp::{self, RpcCall};
use crate::policy::ratelimit::{self, CompiledRateRule, Decision, RateLimits};
use crate::telemetry::metrics::Metrics;

/// Spend the request's cost from every applicable budget keyed by one of `kinds`.
pub async fn rate_limit(
    limits: &RateLimits,
    metrics: &Metrics,
    ctx: &mut RequestCtx,
    route: &Classified<'_>,
    calls: Option<&[RpcCall<'_>]>,
    kinds: &[RateKey],
) -> Result<(), GatewayError> {
    let Some(limiter) = &limits.limiter else {
        return Ok(());
    };
    let mut tightest: Option<(&CompiledRateRule, Decision)> = None;
    for compiled in &limits.rules {
        let rule = &compiled.rule;
        if !kinds.contains(&rule.per) || !compiled.applies_to(&route.normal) {
            continue;
        }
        let ip;
        let identity = ctx.identity.as_deref();
        let issuer = identity.map(|i| i.issuer.as_str());
        let (issuer, who) = match rule.per {
            RateKey::Ip => match ctx.client_ip {
                Some(addr) => {
                    ip = addr.to_string();
                    (None, Some(ip.as_str()))
                }
                None => (None, None),
            },
            RateKey::User => (issuer, identity.map(|i| i.subject.as_str())),
            RateKey::Org => (
                issuer,
                identity.and_then(|i| i.org.as_ref()).map(|o| o.id.as_str()),
            ),
        };
        let Some(who) = who else { continue };
        let cost = compiled.cost(calls);
        if cost == 0 {
            continue;
        }
        let key = compiled.key(issuer, who);
        let decision = limiter
            .check(&key, &compiled.quota, cost)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "rate limiter unavailable");
                GatewayError::Unavailable {
                    what: "rate limiter",
                    retry_after: RETRY_RATE_LIMITER,
                }
            })?;
        compiled.count(metrics, decision.allowed);
        if !decision.allowed {
            let retry_after = decision.retry_after.unwrap_or(decision.reset);
            return Err(GatewayError::RateLimited {
                retry_after,
                headers: ratelimit::headers(&rule.name, &compiled.quota, &decision).to_vec(),
            });
        }
        if tightest
            .as_ref()
            .is_none_or(|(_, d)| decision.remaining < d.remaining)
        {
            tightest = Some((compiled, decision));
        }
    }
    if let Some((compiled, decision)) = tightest {
        ctx.rate_headers =
            ratelimit::headers(&compiled.rule.name, &compiled.quota, &decision).to_vec();
    }
    Ok(())
}

/// Authorization rules (every request once authentication has run, `/api/keys` included),
/// then org rules and per-method scopes for authenticated callers.
pub fn authorize(
    state: &GatewayState,
    method: &http::Method,
    ctx: &RequestCtx,
    route: &Classified<'_>,
    calls: Option<&[RpcCall<'_>]>,
) -> Result<(), GatewayError> {
    let policy = &state.policy;
    if state.settings.auth.enabled && !policy.rules.is_empty() {
        let request = crate::policy::rules::Request {
            path: &route.normal,
            http_method: method,
            calls,
        };
        policy
            .rules
            .check(&request, ctx.identity.as_deref(), &policy.clock)
            .map_err(GatewayError::RuleDenied)?;
    }
    let Some(identity) = ctx.identity.as_deref() else {
        return Ok(());
    };
    mcp::check_org(&state.settings.policy.org, identity)
        .map_err(|d| GatewayError::Forbidden(d.to_string()))?;
    if let Some(calls) = calls {
        policy
            .scope_rules
            .authorize(calls, &identity.scopes)
            .map_err(GatewayError::InsufficientScope)?;
    }
    Ok(())
}
