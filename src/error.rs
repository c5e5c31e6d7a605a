//! Every way a request can be refused, and the one place that maps each to an HTTP response.
//!
//! Stages return a [`GatewayError`]; `proxy::respond` writes what [`GatewayError::response`]
//! describes. Bodies are JSON in the shape MCP clients and the Node seed server use:
//! `{"error": "...", "error_description": "..."}`. Nothing here ever contains a token or key.

use std::borrow::Cow;
use std::time::Duration;

use thiserror::Error;

/// Authentication's refusal, re-exported: every 401 carries one.
pub use crate::auth::AuthError;
use crate::auth::{AuthFailure, BearerError};
use crate::keys::api::PostError;
use crate::keys::vault::VaultError;
use crate::retry_after::whole_secs;

/// Everything that ends a request inside keygate instead of at the upstream.
#[derive(Debug, Clone, Error)]
pub enum GatewayError {
    #[error("{0}")]
    Unauthorized(AuthError),
    /// A bad request; the description names what is wrong (never a secret).
    #[error("{0}")]
    BadRequest(Cow<'static, str>),
    #[error("request body too large")]
    PayloadTooLarge,
    /// The caller has no upstream key stored and there is no fallback key.
    #[error("no API key configured")]
    NoApiKey,
    /// A stored key exists but cannot be decrypted: fail closed, never "no key".
    #[error("stored API key cannot be decrypted")]
    KeyDecrypt,
    #[error("origin not allowed")]
    OriginForbidden,
    /// The token lacks scopes the request needs; carries every scope needed.
    #[error("insufficient scope")]
    InsufficientScope(Vec<String>),
    /// Policy refuses this caller (org rules); the text names the rule.
    #[error("{0}")]
    Forbidden(String),
    /// An authorization rule refuses the request: names the rule and the failed condition.
    #[error("refused by rule {}: {}", .0.rule, .0.condition.description())]
    RuleDenied(Box<crate::policy::rules::Denial>),
    /// The token is genuine but does not carry a claim its issuer's mapping names.
    #[error("{0}")]
    Claims(crate::auth::claims::ClaimError),
    /// An MCP session id presented by someone other than the user who opened it.
    #[error("session not found")]
    SessionNotFound,
    /// Over a rate limit.
    #[error("rate limited")]
    RateLimited {
        retry_after: Duration,
        headers: Vec<(&'static str, String)>,
    },
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A dependency keygate needs to decide (JWKS, Clerk's Backend API) cannot be reached.
    #[error("{what} is temporarily unavailable")]
    Unavailable {
        what: &'static str,
        retry_after: Duration,
    },
    #[error("upstream is unreachable")]
    UpstreamUnreachable,
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("internal error")]
    Internal,
}

/// `Retry-After` when a dependency keygate needs to decide (key store, session store, signing
/// keys) is down.
pub const RETRY_DEPENDENCY: Duration = Duration::from_secs(5);
/// `Retry-After` when the rate limiter cannot answer.
pub const RETRY_RATE_LIMITER: Duration = Duration::from_secs(1);
/// `Retry-After` when the authorization server's metadata cannot be fetched.
pub const RETRY_AS_METADATA: Duration = Duration::from_secs(30);

/// What to write back for an error.
#[derive(Debug, Clone)]
pub struct ErrorResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// What the challenge needs to know about the protected resource.
#[derive(Debug, Clone)]
pub struct ChallengeParams<'a> {
    pub resource_metadata: &'a str,
    pub scope: Option<&'a str>,
}

/// A `Retry-After` value: [`whole_secs`], and at least one.
fn retry_after_value(d: Duration) -> String {
    whole_secs(d).as_secs().max(1).to_string()
}

fn json_body(error: &str, description: &str) -> String {
    serde_json::json!({ "error": error, "error_description": description }).to_string()
}

/// Quote a value for an auth-param (RFC 9110 quoted-string).
fn quoted(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

impl GatewayError {
    /// Whether this refuses an authenticated caller for what it asked (scope, org, another
    /// user's session): what the per-subject refusal budget counts.
    pub fn is_policy_refusal(&self) -> bool {
        matches!(
            self,
            GatewayError::InsufficientScope(_)
                | GatewayError::Forbidden(_)
                | GatewayError::RuleDenied(_)
                | GatewayError::SessionNotFound
        )
    }

    /// A stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::Unauthorized(a) => a.reason(),
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::PayloadTooLarge => "too_large",
            GatewayError::NoApiKey => "no_api_key",
            GatewayError::KeyDecrypt => "key_decrypt",
            GatewayError::OriginForbidden => "origin",
            GatewayError::InsufficientScope(_) => "insufficient_scope",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::RuleDenied(d) => d.condition.as_str(),
            GatewayError::Claims(e) => e.reason(),
            GatewayError::SessionNotFound => "session_not_found",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::NotFound => "not_found",
            GatewayError::MethodNotAllowed => "method",
            GatewayError::Unavailable { .. } => "unavailable",
            GatewayError::UpstreamUnreachable => "upstream_unreachable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::Internal => "internal",
        }
    }

    /// The authorization rule (or claim mapping option) behind a refusal, for the body, the
    /// audit event and the metric label; `None` for other errors.
    pub fn rule(&self) -> Option<&str> {
        match self {
            GatewayError::RuleDenied(d) => Some(&d.rule),
            GatewayError::Claims(e) => Some(e.fact().option()),
            _ => None,
        }
    }

    /// The HTTP status, headers and JSON body for this error.
    pub fn response(&self, challenge: &ChallengeParams<'_>) -> ErrorResponse {
        let mut headers = Vec::new();
        let (status, body) = match self {
            GatewayError::Unauthorized(reason) => {
                let mut value = format!(
                    "Bearer resource_metadata={}",
                    quoted(challenge.resource_metadata)
                );
                if *reason != AuthError::Missing {
                    value.push_str(", error=\"invalid_token\", error_description=");
                    value.push_str(&quoted(&reason.to_string()));
                }
                if let Some(scope) = challenge.scope.filter(|s| !s.is_empty()) {
                    value.push_str(", scope=");
                    value.push_str(&quoted(scope));
                }
                headers.push(("www-authenticate", value));
                (401, json_body("unauthorized", &reason.to_string()))
            }
            GatewayError::BadRequest(msg) => (400, json_body("invalid_request", msg)),
            GatewayError::PayloadTooLarge => (
                413,
                json_body("invalid_request", "Request body is too large"),
            ),
            GatewayError::NoApiKey => (
                400,
                json_body(
                    "No API key configured",
                    "Please configure your Twenty API key first",
                ),
            ),
            GatewayError::KeyDecrypt => (
                500,
                json_body(
                    "internal_error",
                    "Your stored API key could not be read; store it again",
                ),
            ),
            GatewayError::OriginForbidden => (
                403,
                json_body("forbidden", "Origin is not allowed to call this server"),
            ),
            GatewayError::InsufficientScope(scopes) => {
                let scope = scopes.join(" ");
                headers.push((
                    "www-authenticate",
                    format!(
                        "Bearer error=\"insufficient_scope\", scope={}, resource_metadata={}",
                        quoted(&scope),
                        quoted(challenge.resource_metadata)
                    ),
                ));
                (
                    403,
                    json_body(
                        "insufficient_scope",
                        &format!("This request needs the scopes: {scope}"),
                    ),
                )
            }
            GatewayError::Forbidden(reason) => (403, json_body("forbidden", reason)),
            GatewayError::RuleDenied(d) => {
                use crate::policy::rules::Condition;
                let description = d.condition.description();
                let error = match d.condition {
                    Condition::Mfa if d.oauth => {
                        // RFC 9470: the client can ask for a fresh authentication.
                        let max_age = d.max_age.map_or(0, |a| a.as_secs());
                        headers.push((
                            "www-authenticate",
                            format!(
                                "Bearer error=\"insufficient_user_authentication\", error_description={}, max_age={max_age}, resource_metadata={}",
                                quoted(description),
                                quoted(challenge.resource_metadata)
                            ),
                        ));
                        "insufficient_user_authentication"
                    }
                    Condition::Scope => {
                        headers.push((
                            "www-authenticate",
                            format!(
                                "Bearer error=\"insufficient_scope\", scope={}, resource_metadata={}",
                                quoted(&d.scopes.join(" ")),
                                quoted(challenge.resource_metadata)
                            ),
                        ));
                        "insufficient_scope"
                    }
                    _ => "forbidden",
                };
                let mut body = serde_json::json!({
                    "error": error,
                    "error_description": description,
                    "rule": &*d.rule,
                    "reason": d.condition.as_str(),
                });
                if let Some(max_age) = d.max_age {
                    body["max_age"] = serde_json::json!(max_age.as_secs());
                }
                (403, body.to_string())
            }
            GatewayError::Claims(e) => (
                403,
                serde_json::json!({
                    "error": "forbidden",
                    "error_description": e.to_string(),
                    "rule": e.fact().option(),
                    "reason": e.reason(),
                })
                .to_string(),
            ),
            GatewayError::SessionNotFound => (404, json_body("not_found", "Session not found")),
            GatewayError::RateLimited {
                retry_after,
                headers: extra,
            } => {
                headers.push(("retry-after", retry_after_value(*retry_after)));
                headers.extend(extra.iter().cloned());
                (429, json_body("rate_limited", "Too many requests"))
            }
            GatewayError::NotFound => (404, json_body("not_found", "Not found")),
            GatewayError::MethodNotAllowed => {
                (405, json_body("method_not_allowed", "Method not allowed"))
            }
            GatewayError::Unavailable { what, retry_after } => {
                headers.push(("retry-after", retry_after_value(*retry_after)));
                (
                    503,
                    json_body(
                        "temporarily_unavailable",
                        &format!("{what} is temporarily unavailable"),
                    ),
                )
            }
            GatewayError::UpstreamUnreachable => (
                502,
                json_body("bad_gateway", "The upstream server could not be reached"),
            ),
            GatewayError::UpstreamTimeout => (
                504,
                json_body(
                    "gateway_timeout",
                    "The upstream server did not answer in time",
                ),
            ),
            GatewayError::Internal => (500, json_body("internal_error", "Internal error")),
        };
        ErrorResponse {
            status,
            headers,
            body,
        }
    }
}

impl From<AuthError> for GatewayError {
    fn from(e: AuthError) -> Self {
        GatewayError::Unauthorized(e)
    }
}

impl From<BearerError> for GatewayError {
    fn from(e: BearerError) -> Self {
        match e {
            BearerError::Repeated => {
                GatewayError::BadRequest("Multiple Authorization headers are not allowed".into())
            }
            BearerError::Token(e) => GatewayError::Unauthorized(e),
        }
    }
}

impl From<AuthFailure> for GatewayError {
    fn from(f: AuthFailure) -> Self {
        match f {
            AuthFailure::Rejected(e) => GatewayError::Unauthorized(e),
            AuthFailure::Unavailable(what) => GatewayError::Unavailable {
                what,
                retry_after: RETRY_DEPENDENCY,
            },
            AuthFailure::Saturated(retry_after) => GatewayError::Unavailable {
                what: "token verification",
                retry_after,
            },
            AuthFailure::Claims(e) => GatewayError::Claims(e),
        }
    }
}

impl From<PostError> for GatewayError {
    fn from(e: PostError) -> Self {
        GatewayError::BadRequest(e.to_string().into())
    }
}

impl From<VaultError> for GatewayError {
    fn from(e: VaultError) -> Self {
        match e {
            VaultError::Store(_) => GatewayError::Unavailable {
                what: "key store",
                retry_after: RETRY_DEPENDENCY,
            },
            // Fail closed: a key that exists but cannot be read is never "no key".
            VaultError::Decrypt => GatewayError::KeyDecrypt,
            VaultError::Invalid(e) => GatewayError::BadRequest(e.to_string().into()),
            VaultError::Seal => GatewayError::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CH: ChallengeParams<'static> = ChallengeParams {
        resource_metadata: "https://mcp.example.com/.well-known/oauth-protected-resource/mcp",
        scope: Some("twenty:read"),
    };

    #[test]
    fn missing_token_challenge_has_no_error_code_but_quoted_metadata() {
        let r = GatewayError::Unauthorized(AuthError::Missing).response(&CH);
        assert_eq!(r.status, 401);
        let (_, v) = &r.headers[0];
        assert_eq!(
            v,
            "Bearer resource_metadata=\"https://mcp.example.com/.well-known/oauth-protected-resource/mcp\", scope=\"twenty:read\""
        );
    }

    #[test]
    fn invalid_token_challenge_names_invalid_token() {
        let r = GatewayError::Unauthorized(AuthError::Expired).response(&CH);
        let (_, v) = &r.headers[0];
        assert!(v.contains("error=\"invalid_token\""), "{v}");
        let body: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(body["error"], "unauthorized");
        assert_eq!(body["error_description"], "token has expired");
    }

    #[test]
    fn insufficient_scope_challenge_names_every_needed_scope() {
        let r = GatewayError::InsufficientScope(vec!["twenty:read".into(), "twenty:write".into()])
            .response(&CH);
        assert_eq!(r.status, 403);
        let (_, v) = &r.headers[0];
        assert_eq!(
            v,
            "Bearer error=\"insufficient_scope\", scope=\"twenty:read twenty:write\", resource_metadata=\"https://mcp.example.com/.well-known/oauth-protected-resource/mcp\""
        );
    }

    #[test]
    fn rule_refusals_name_the_rule_and_step_up_only_oauth_clients() {
        use crate::policy::rules::{Condition, Denial};
        let denial = |oauth| {
            GatewayError::RuleDenied(Box::new(Denial {
                rule: "key-writes-need-fresh-mfa".into(),
                condition: Condition::Mfa,
                max_age: Some(Duration::from_secs(600)),
                scopes: Vec::new(),
                oauth,
            }))
        };
        let r = denial(true).response(&CH);
        assert_eq!(r.status, 403);
        let body: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(body["rule"], "key-writes-need-fresh-mfa");
        assert_eq!(body["reason"], "mfa");
        assert_eq!(body["max_age"], 600);
        let (name, v) = &r.headers[0];
        assert_eq!(*name, "www-authenticate");
        assert!(
            v.starts_with("Bearer error=\"insufficient_user_authentication\"")
                && v.contains("max_age=600"),
            "{v}"
        );
        assert!(denial(false).response(&CH).headers.is_empty());
        assert_eq!(denial(false).reason(), "mfa");
        // A rule's refusal spends the subject's refusal budget, like a missing scope.
        assert!(denial(true).is_policy_refusal());
        assert!(GatewayError::InsufficientScope(Vec::new()).is_policy_refusal());
        assert!(!GatewayError::OriginForbidden.is_policy_refusal());
        assert_eq!(denial(false).rule(), Some("key-writes-need-fresh-mfa"));
    }

    #[test]
    fn unavailable_carries_retry_after() {
        let r = GatewayError::Unavailable {
            what: "token verification",
            retry_after: Duration::from_secs(5),
        }
        .response(&CH);
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after", "5".to_string())));
    }

    #[test]
    fn retry_after_is_rounded_up_to_whole_seconds() {
        let limited = |d| GatewayError::RateLimited {
            retry_after: d,
            headers: Vec::new(),
        };
        let unavailable = |d| GatewayError::Unavailable {
            what: "key store",
            retry_after: d,
        };
        for (d, want) in [
            (Duration::from_millis(1200), "2"),
            (Duration::from_millis(300), "1"),
            (Duration::from_secs(2), "2"),
            (Duration::from_nanos(2_000_000_001), "3"),
            (Duration::ZERO, "1"),
        ] {
            for err in [limited(d), unavailable(d)] {
                let r = err.response(&CH);
                let got = r.headers.iter().find(|(n, _)| *n == "retry-after");
                assert_eq!(got.map(|(_, v)| v.as_str()), Some(want), "{d:?}");
            }
        }
    }
    #[test]
    fn vault_failures_fail_closed_each_with_its_own_answer() {
        let decrypt = GatewayError::from(VaultError::Decrypt).response(&CH);
        assert_eq!(decrypt.status, 500);
        assert!(
            decrypt.body.contains("could not be read"),
            "{}",
            decrypt.body
        );
        // A seal failure stored nothing: an internal error, never "cannot be decrypted".
        let seal = GatewayError::from(VaultError::Seal);
        assert_eq!(
            (seal.response(&CH).status, seal.reason()),
            (500, "internal")
        );
        let invalid = GatewayError::from(VaultError::Invalid(
            crate::keys::check::Rejected::KeyTooLong,
        ));
        let r = invalid.response(&CH);
        assert_eq!(r.status, 400);
        let body: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(body["error"], "invalid_request");
        assert_eq!(body["error_description"], "API key is too long");
    }

    #[test]
    fn bearer_and_auth_failures_map_to_their_answers() {
        let repeated = GatewayError::from(BearerError::Repeated);
        assert_eq!(repeated.reason(), BearerError::Repeated.reason());
        let r = repeated.response(&CH);
        assert_eq!(r.status, 400);
        assert!(r.headers.is_empty());
        let body: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(
            body["error_description"],
            "Multiple Authorization headers are not allowed"
        );
        let token = GatewayError::from(BearerError::Token(AuthError::TooLarge));
        assert_eq!(token.response(&CH).status, 401);
        assert_eq!(token.reason(), "too_large");
        let down = GatewayError::from(AuthFailure::Unavailable("signing keys")).response(&CH);
        assert_eq!(down.status, 503);
        assert!(down.headers.contains(&("retry-after", "5".to_string())));
    }
}
