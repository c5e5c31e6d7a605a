//! The policy stage: rate limits (per IP before anything else; per user and org, tool budgets
//! included, once the caller and the MCP calls are known) and authorization (rules, org
//! rules, per-method scopes). The rules themselves are `policy`'s; this applies them to the
//! request's route decision, identity and calls.

use super::route::Classified;
use super::{GatewayState, RequestCtx};
use crate::config::RateKey;
use crate::error::{GatewayError, RETRY_RATE_LIMITER};
use crate::policy::mcp::{self, RpcCall};
use crate::policy::ratelimit::{self, CompiledRateRule, Decision, RateLimits, Spend};
use crate::telemetry::metrics::Metrics;

/// Spend the request's cost from every applicable budget keyed by one of `kinds`, all in one
/// limiter call: every budget spends, or (when one refuses) none does, and the first refusing
/// rule answers.
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
    // No allocation when no rule applies (the common case for one of the two stages).
    let mut budgets: Vec<(&CompiledRateRule, String, u32)> = Vec::new();
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
        budgets.push((compiled, compiled.key(issuer, who), cost));
    }
    if budgets.is_empty() {
        return Ok(());
    }
    let spends: Vec<Spend<'_>> = budgets
        .iter()
        .map(|(compiled, key, cost)| Spend {
            key,
            quota: &compiled.quota,
            cost: *cost,
        })
        .collect();
    let decisions = limiter.check_all(&spends).await.map_err(|e| {
        tracing::warn!(error = %e, "rate limiter unavailable");
        GatewayError::Unavailable {
            what: "rate limiter",
            retry_after: RETRY_RATE_LIMITER,
        }
    })?;
    let mut refused: Option<(&CompiledRateRule, Decision)> = None;
    let mut tightest: Option<(&CompiledRateRule, Decision)> = None;
    // A limiter that stops at the first refusal answers fewer decisions: the rest were not
    // checked and are not counted.
    for ((compiled, _, _), decision) in budgets.iter().zip(decisions) {
        compiled.count(metrics, decision.allowed);
        if !decision.allowed {
            refused = refused.or(Some((compiled, decision)));
        } else if tightest
            .as_ref()
            .is_none_or(|(_, d)| decision.remaining < d.remaining)
        {
            tightest = Some((compiled, decision));
        }
    }
    if let Some((compiled, decision)) = refused {
        let retry_after = decision.retry_after.unwrap_or(decision.reset);
        return Err(GatewayError::RateLimited {
            retry_after,
            headers: ratelimit::headers(&compiled.rule.name, &compiled.quota, &decision).to_vec(),
        });
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
