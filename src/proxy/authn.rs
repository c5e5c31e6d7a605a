//! The authentication stage: lockouts, the bearer token, verification by `auth`, the auth
//! metric, and the failed-authentication budget a refused token spends.
//!
//! It decides who the caller is (`ctx.identity`); what the caller may do is the policy stage's.

use pingora::proxy::Session;

use super::route::Classified;
use super::{GatewayState, RequestCtx};
use crate::auth::{bearer_token, AuthError, AuthFailure, Refused};
use crate::error::GatewayError;

/// Whether Clerk session tokens are accepted on this route (`auth.session_token_paths`).
fn session_tokens_allowed(state: &GatewayState, route: &Classified<'_>) -> bool {
    state
        .settings
        .auth
        .session_token_paths
        .iter()
        .any(|p| route.under(p))
}

/// Authenticate the request: `ctx.identity` is set when a token was verified.
pub async fn authenticate(
    state: &GatewayState,
    session: &Session,
    ctx: &mut RequestCtx,
    route: &Classified<'_>,
) -> Result<(), GatewayError> {
    let auth = &state.auth;
    let settings = &state.settings.auth;
    if !settings.enabled {
        return Ok(());
    }
    // A locked-out client is refused before its token costs anything.
    let failures = state.auth_failures.as_deref().zip(ctx.client_ip);
    if let Some((failures, ip)) = failures {
        if let Some(retry_after) = failures.locked(ip) {
            return Err(GatewayError::RateLimited {
                retry_after,
                headers: Vec::new(),
            });
        }
    }
    let metric = &state.metrics.auth;
    let token =
        bearer_token(&session.req_header().headers, auth.max_token_bytes()).inspect_err(|e| {
            metric
                .with_label_values(&["none", "rejected", e.reason()])
                .inc();
        });
    let result = match token {
        Err(e) => Err(e.into()),
        Ok(None) => {
            if settings.required {
                metric
                    .with_label_values(&["none", "rejected", "missing"])
                    .inc();
                return Err(AuthError::Missing.into());
            }
            return Ok(());
        }
        Ok(Some(token)) => match auth
            .authenticate(token, session_tokens_allowed(state, route))
            .await
        {
            Ok(identity) => {
                state.metrics.auth_accepted(identity.kind.as_str());
                // A subject locked out for repeated policy refusals, from any IP.
                if let Some(failures) = state.auth_failures.as_deref() {
                    if let Some(retry_after) =
                        failures.subject_locked(&identity.issuer, &identity.subject)
                    {
                        ctx.identity = Some(identity);
                        return Err(GatewayError::RateLimited {
                            retry_after,
                            headers: Vec::new(),
                        });
                    }
                }
                ctx.identity = Some(identity);
                return Ok(());
            }
            Err(Refused { failure, kind }) => {
                let (outcome, reason) = match &failure {
                    AuthFailure::Rejected(e) => ("rejected", e.reason()),
                    AuthFailure::Unavailable(_) => ("unavailable", "unavailable"),
                    AuthFailure::Saturated(_) => ("unavailable", "saturated"),
                    AuthFailure::Claims(e) => ("rejected", e.reason()),
                };
                // The kind is what authentication read of the token: no second parse here.
                metric.with_label_values(&[kind, outcome, reason]).inc();
                Err(GatewayError::from(failure))
            }
        },
    };
    // A token that was presented and refused spends the client's failure budget; a
    // missing token, a bad request or an unavailable verifier does not.
    if let (Err(GatewayError::Unauthorized(_)), Some((failures, ip))) = (&result, failures) {
        if let Some(retry_after) = failures.record_failure(ip).await {
            return Err(GatewayError::RateLimited {
                retry_after,
                headers: Vec::new(),
            });
        }
    }
    result
}
