//! The request flow: Pingora's `ProxyHttp` implemented as a sequence of plain stage calls.
//!
//! ```text
//! early_request_filter    request id, client ip, header deadline satisfied
//! request_filter          Host and single-valued MCP headers -> the route decision (once)
//!                         -> per-IP rate rules -> local routes (/health, discovery, the dev
//!                         authorization server) -> CORS/origin -> MCP transport checks
//!                         -> lockouts and authentication -> MCP body read and inspection
//!                         -> per-user/org rate rules and tool budgets -> authorization
//!                         (org, rules, scopes) -> session binding -> /api/keys, or the
//!                         caller's key resolved for injection
//! upstream_peer           the configured upstream
//! upstream_request_filter header hygiene, forwarding and identity headers, key injection
//! request_body_filter     body progress for the body deadlines, streamed-body size cap
//! response_filter         request id, CORS, rate-limit headers, session binding recorded
//! fail_to_proxy           upstream errors mapped through `respond::error`
//! logging                 access log, request metrics
//! ```
//!
//! Denials are written by [`respond::error`]; nothing else writes an error response.

pub mod deadline;
pub mod headers;
pub mod inject;
pub mod respond;
pub mod route;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::HeaderName;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;

use crate::auth::discovery::{AsDocument, AuthServerMetadata, ResourceMetadata};
use crate::auth::{bearer_token, Authenticator, Identity};
use crate::config::RateKey;
use crate::config::Settings;
use crate::error::{AuthError, GatewayError};
use crate::keys::api as keys_api;
use crate::keys::store::Owner;
use crate::keys::vault::{UserKey, Vault, VaultError};
use crate::policy::cors::Cors;
use crate::policy::mcp::{self, RpcCall};
use crate::policy::ratelimit::{self, CompiledRateRule, Decision, RateLimiter};
use crate::policy::sessions::SessionBindings;
use crate::telemetry::access;
use crate::telemetry::metrics::Metrics;
use route::{Classified, PathKind, Routes};

const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");

/// Everything the request path reads, built once at startup.
pub struct GatewayState {
    pub settings: Settings,
    pub auth: Authenticator,
    pub resource_metadata: ResourceMetadata,
    pub as_metadata: AuthServerMetadata,
    pub cors: Cors,
    pub peer: HttpPeer,
    /// `scope="…"` for challenges.
    pub challenge_scope: String,
    pub health_body: Bytes,
    /// The key vault, when enabled.
    pub vault: Option<Arc<Vault>>,
    /// `TWENTY_API_KEY`: injected for callers with no key of their own.
    pub fallback_key: Option<Arc<UserKey>>,
    /// Rate-limit rules with their quotas and tool matchers, and the limiter they share.
    pub rate_rules: Vec<CompiledRateRule>,
    pub limiter: Option<Arc<dyn RateLimiter>>,
    /// The Redis-backed limiter, when there is one (its fallback count is exported).
    pub fallback_limiter: Option<Arc<ratelimit::FallbackLimiter>>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Who opened which MCP session.
    pub sessions: Option<Arc<dyn SessionBindings>>,
    /// The route table every request is classified by, once.
    pub routes: Routes,
    /// The per-client-IP failed-authentication budget, when enabled.
    pub auth_failures: Option<Arc<crate::policy::auth_failures::AuthFailures>>,
    /// The dev authorization server, when `dev.authorization_server` is on.
    pub dev_issuer: Option<Arc<crate::auth::dev_issuer::DevAuthServer>>,
}

/// The caller as MCP session bindings know it: issuer and subject.
fn session_owner(identity: &Identity) -> String {
    format!("{}|{}", identity.issuer, identity.subject)
}

impl GatewayState {
    /// Whose slot an identity's key lives in (see [`Owner::of`]).
    pub fn owner(&self, identity: &Identity) -> Owner {
        let keys = &self.settings.keys;
        Owner::of(identity, keys.org_keys, keys.legacy_slot_issuer.as_deref())
    }
}

fn vault_error(e: VaultError) -> GatewayError {
    match e {
        VaultError::Store(_) => GatewayError::Unavailable {
            what: "key store",
            retry_after: std::time::Duration::from_secs(5),
        },
        VaultError::Decrypt => GatewayError::KeyDecrypt,
        VaultError::Invalid(e) => GatewayError::Invalid(e.to_string()),
        VaultError::Seal => GatewayError::Internal,
    }
}

/// Which kind of route a request is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Answered by keygate itself.
    Local,
    /// Sent to the upstream.
    Proxied,
    /// `/api/keys`, answered from the vault.
    Keys,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Proxied => "proxied",
            Route::Keys => "keys",
        }
    }
}

/// Per-request state.
pub struct RequestCtx {
    pub request_id: headers::RequestId,
    pub client_ip: Option<IpAddr>,
    /// The connection's own peer (a trusted proxy, or the client itself).
    pub peer_ip: Option<IpAddr>,
    pub started: Instant,
    pub route: Route,
    pub identity: Option<Arc<Identity>>,
    /// The request's `Origin`, once it is known to be allowed.
    pub cors_origin: Option<String>,
    /// Why keygate refused the request, for the access log.
    pub denied: Option<&'static str>,
    /// The upstream key to inject.
    pub user_key: Option<Arc<UserKey>>,
    /// Request body bytes seen so far (for the body size limit).
    pub body_bytes: u64,
    /// `RateLimit-Policy` / `RateLimit` of the tightest budget, for the response.
    pub rate_headers: Vec<(&'static str, String)>,
    /// When the request went upstream.
    pub upstream_sent: Option<Instant>,
    /// Counted in the in-flight gauge (and so must be uncounted).
    pub in_flight: bool,
    /// Streaming an SSE response (counted in the open-streams gauge).
    pub sse: bool,
}

/// The Pingora proxy app.
pub struct Gateway {
    pub state: Arc<GatewayState>,
}

impl Gateway {
    fn session_tokens_allowed(&self, route: &Classified<'_>) -> bool {
        self.state
            .settings
            .auth
            .session_token_paths
            .iter()
            .any(|p| route.under(p))
    }

    /// Answer discovery and health routes; `Ok(true)` when answered.
    async fn local_route(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        path: &str,
    ) -> Result<bool, GatewayError> {
        let s = &self.state;
        let method = session.req_header().method.clone();
        let is_read = method == http::Method::GET || method == http::Method::HEAD;
        if path == "/health" {
            ctx.route = Route::Local;
            respond::json(session, ctx, 200, s.health_body.clone(), &[]).await;
            return Ok(true);
        }
        if let Some(dev) = &s.dev_issuer {
            if let Some(endpoint) = dev.endpoint(path) {
                ctx.route = Route::Local;
                let body = if method == http::Method::POST {
                    read_body(session, crate::auth::dev_issuer::MAX_BODY_BYTES).await?
                } else {
                    Bytes::new()
                };
                let uri = session.req_header().uri.clone();
                let req = crate::auth::dev_issuer::DevRequest {
                    method: &method,
                    query: uri.query(),
                    body: &body,
                };
                let r = dev.handle(endpoint, &req);
                let headers: Vec<(&str, &str)> =
                    r.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                respond::document(session, ctx, r.status, r.content_type, &headers, r.body).await;
                return Ok(true);
            }
        }
        if s.resource_metadata.serves(path) {
            ctx.route = Route::Local;
            if !s.settings.auth.enabled {
                return Err(GatewayError::NotFound);
            }
            if method == http::Method::OPTIONS {
                respond::empty(session, ctx, 204, &respond::PUBLIC_CORS_PREFLIGHT).await;
                return Ok(true);
            }
            if !is_read {
                return Err(GatewayError::MethodNotAllowed);
            }
            respond::json(
                session,
                ctx,
                200,
                s.resource_metadata.body(),
                &respond::PUBLIC_DOCUMENT,
            )
            .await;
            return Ok(true);
        }
        if let Some(doc) = AsDocument::from_path(path) {
            ctx.route = Route::Local;
            if !s.settings.auth.enabled {
                return Err(GatewayError::NotFound);
            }
            if method == http::Method::OPTIONS {
                respond::empty(session, ctx, 204, &respond::PUBLIC_CORS_PREFLIGHT).await;
                return Ok(true);
            }
            if !is_read {
                return Err(GatewayError::MethodNotAllowed);
            }
            return match s.as_metadata.get(doc).await {
                Ok(Some(body)) => {
                    respond::json(session, ctx, 200, body, &respond::PUBLIC_DOCUMENT).await;
                    Ok(true)
                }
                Ok(None) => Err(GatewayError::NotFound),
                Err(e) => {
                    tracing::warn!(error = %e, "authorization server metadata unavailable");
                    Err(GatewayError::Unavailable {
                        what: "authorization server metadata",
                        retry_after: std::time::Duration::from_secs(30),
                    })
                }
            };
        }
        Ok(false)
    }

    /// Origin allowlist and preflight; `Ok(true)` when a preflight was answered.
    async fn cors(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool, GatewayError> {
        let req = session.req_header();
        let Some(origin) = req
            .headers
            .get(http::header::ORIGIN)
            .map(|o| o.to_str().unwrap_or("").to_string())
        else {
            return Ok(false);
        };
        if !self.state.cors.allows(&origin) {
            return Err(GatewayError::OriginForbidden);
        }
        let preflight = req.method == http::Method::OPTIONS
            && req
                .headers
                .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            let headers = self.state.cors.preflight_headers(&origin);
            respond::empty(session, ctx, 204, &headers).await;
            return Ok(true);
        }
        ctx.cors_origin = Some(origin);
        Ok(false)
    }

    async fn authenticate(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        route: &Classified<'_>,
    ) -> Result<(), GatewayError> {
        let auth = &self.state.auth;
        let settings = &self.state.settings.auth;
        if !settings.enabled {
            return Ok(());
        }
        // A locked-out client is refused before its token costs anything.
        let failures = self.state.auth_failures.as_deref().zip(ctx.client_ip);
        if let Some((failures, ip)) = failures {
            if let Some(retry_after) = failures.locked(ip) {
                return Err(GatewayError::RateLimited {
                    retry_after,
                    headers: Vec::new(),
                });
            }
        }
        let metric = &self.state.metrics.auth;
        let token = bearer_token(&session.req_header().headers, auth.max_token_bytes())
            .inspect_err(|e| {
                metric
                    .with_label_values(&["none", "rejected", e.reason()])
                    .inc();
            });
        let result = match token {
            Err(e) => Err(e),
            Ok(None) => {
                if settings.required {
                    metric
                        .with_label_values(&["none", "rejected", "missing"])
                        .inc();
                    return Err(crate::error::AuthError::Missing.into());
                }
                return Ok(());
            }
            Ok(Some(token)) => match auth
                .authenticate(token, self.session_tokens_allowed(route))
                .await
            {
                Ok(identity) => {
                    self.state.metrics.auth_accepted(identity.kind.as_str());
                    // A subject locked out for repeated policy refusals, from any IP.
                    if let Some(failures) = self.state.auth_failures.as_deref() {
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
                Err(failure) => {
                    let (outcome, reason) = match &failure {
                        crate::auth::AuthFailure::Rejected(e) => ("rejected", e.reason()),
                        crate::auth::AuthFailure::Unavailable(_) => ("unavailable", "unavailable"),
                        crate::auth::AuthFailure::Saturated(_) => ("unavailable", "saturated"),
                        crate::auth::AuthFailure::Claims(e) => ("rejected", e.reason()),
                    };
                    metric
                        .with_label_values(&[crate::auth::kind_hint(token), outcome, reason])
                        .inc();
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

    /// MCP transport rules that need no identity: protocol version and declared body size.
    fn transport_checks(&self, session: &Session) -> Result<(), GatewayError> {
        let policy = &self.state.settings.policy;
        let headers = &session.req_header().headers;
        if let Some(v) = headers.get(&MCP_PROTOCOL_VERSION) {
            let ok = policy.protocol_versions.is_empty()
                || v.to_str()
                    .is_ok_and(|v| policy.protocol_versions.iter().any(|p| p == v.trim()));
            if !ok {
                return Err(GatewayError::Invalid(format!(
                    "Unsupported MCP-Protocol-Version; supported: {}",
                    policy.protocol_versions.join(", ")
                )));
            }
        }
        let declared = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > policy.max_body_bytes) {
            return Err(GatewayError::PayloadTooLarge);
        }
        Ok(())
    }

    /// Read the JSON-RPC body of an MCP POST (bounded; Pingora's retry buffer then sends the
    /// same bytes upstream). `None` for requests that are not MCP POSTs — decided by the route,
    /// so every spelling of an MCP path is read.
    async fn read_mcp_body(
        &self,
        session: &mut Session,
        route: &Classified<'_>,
    ) -> Result<Option<Bytes>, GatewayError> {
        let policy = &self.state.settings.policy;
        if route.kind != PathKind::Mcp || session.req_header().method != http::Method::POST {
            return Ok(None);
        }
        session.as_downstream_mut().enable_retry_buffering();
        read_body(session, policy.inspect_max_bytes).await.map(Some)
    }

    /// The calls in an MCP POST body, checked against its `Mcp-Method` / `Mcp-Name` headers.
    fn inspect_mcp<'b>(
        &self,
        session: &Session,
        body: &'b [u8],
    ) -> Result<Vec<RpcCall<'b>>, GatewayError> {
        let calls = mcp::parse_body(body).map_err(|e| GatewayError::Invalid(e.to_string()))?;
        let headers = &session.req_header().headers;
        let header = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        mcp::check_headers(&calls, header(&MCP_METHOD), header(&MCP_NAME))
            .map_err(|e| GatewayError::Invalid(e.to_string()))?;
        Ok(calls)
    }

    /// Spend the request's cost from every applicable budget keyed by one of `kinds`.
    async fn rate_limit(
        &self,
        ctx: &mut RequestCtx,
        route: &Classified<'_>,
        calls: Option<&[RpcCall<'_>]>,
        kinds: &[RateKey],
    ) -> Result<(), GatewayError> {
        let Some(limiter) = &self.state.limiter else {
            return Ok(());
        };
        let mut tightest: Option<(&CompiledRateRule, Decision)> = None;
        for compiled in &self.state.rate_rules {
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
                        retry_after: std::time::Duration::from_secs(1),
                    }
                })?;
            compiled.count(&self.state.metrics, decision.allowed);
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
    fn authorize(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        route: &Classified<'_>,
        calls: Option<&[RpcCall<'_>]>,
    ) -> Result<(), GatewayError> {
        let policy = &self.state.settings.policy;
        if self.state.settings.auth.enabled && !policy.rules.is_empty() {
            let request = crate::policy::rules::Request {
                path: &route.normal,
                http_method: &session.req_header().method,
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
        mcp::check_org(&self.state.settings.policy.org, identity)
            .map_err(|d| GatewayError::Forbidden(d.to_string()))?;
        if let Some(calls) = calls {
            self.state
                .settings
                .policy
                .scope_rules
                .authorize(calls, &identity.scopes)
                .map_err(GatewayError::InsufficientScope)?;
        }
        Ok(())
    }

    /// An `Mcp-Session-Id` opened by another user is not found.
    async fn check_session(&self, session: &Session, ctx: &RequestCtx) -> Result<(), GatewayError> {
        let (Some(bindings), Some(identity)) = (&self.state.sessions, ctx.identity.as_deref())
        else {
            return Ok(());
        };
        let Some(sid) = session
            .req_header()
            .headers
            .get(&MCP_SESSION_ID)
            .and_then(|v| v.to_str().ok())
        else {
            return Ok(());
        };
        match bindings.owner(sid).await {
            Ok(Some(owner)) if owner != session_owner(identity) => {
                Err(GatewayError::SessionNotFound)
            }
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "session binding lookup failed");
                Err(GatewayError::Unavailable {
                    what: "session store",
                    retry_after: std::time::Duration::from_secs(5),
                })
            }
        }
    }

    /// `/api/keys`: the signed-in caller's own key.
    async fn keys_api(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        vault: &Vault,
    ) -> Result<(), GatewayError> {
        ctx.route = Route::Keys;
        let identity = ctx.identity.clone().ok_or(AuthError::Missing)?;
        let owner = self.state.owner(&identity);
        let method = session.req_header().method.clone();
        let body = if method == http::Method::GET || method == http::Method::HEAD {
            let meta = vault.metadata(&owner).await.map_err(vault_error)?;
            keys_api::metadata_body(meta.as_ref())
        } else if method == http::Method::POST {
            let raw = read_body(session, self.state.settings.keys.max_body_bytes).await?;
            let new = keys_api::parse_post(&raw, vault.rules())?;
            vault
                .put(&owner, &new.api_key, new.base_url, None)
                .await
                .map_err(vault_error)?;
            tracing::info!(target: "keygate::audit", event = "key_stored", owner = %owner.slot(), issuer = %identity.issuer, request_id = %ctx.request_id, client_ip = ctx.client_ip.map(tracing::field::display));
            keys_api::STORED.to_string()
        } else if method == http::Method::DELETE {
            let existed = vault.delete(&owner).await.map_err(vault_error)?;
            tracing::info!(target: "keygate::audit", event = "key_deleted", owner = %owner.slot(), issuer = %identity.issuer, existed, request_id = %ctx.request_id, client_ip = ctx.client_ip.map(tracing::field::display));
            keys_api::DELETED.to_string()
        } else {
            return Err(GatewayError::MethodNotAllowed);
        };
        respond::json(
            session,
            ctx,
            200,
            Bytes::from(body),
            &[("cache-control", "no-store")],
        )
        .await;
        Ok(())
    }

    /// The key to inject: the caller's own, else the fallback, else a 400.
    async fn resolve_key(
        &self,
        ctx: &RequestCtx,
        vault: &Vault,
    ) -> Result<Arc<UserKey>, GatewayError> {
        if let Some(identity) = &ctx.identity {
            if let Some(key) = vault
                .lookup(&self.state.owner(identity))
                .await
                .map_err(vault_error)?
            {
                return Ok(key);
            }
        }
        self.state
            .fallback_key
            .clone()
            .ok_or(GatewayError::NoApiKey)
    }

    async fn deny(&self, session: &mut Session, ctx: &mut RequestCtx, err: GatewayError) {
        ctx.denied = Some(err.reason());
        // Policy refusals spend the subject's refusal budget (this answer stays a refusal;
        // a lockout applies from the next request).
        if err.is_policy_refusal() {
            if let (Some(failures), Some(identity)) =
                (self.state.auth_failures.as_deref(), ctx.identity.as_deref())
            {
                failures
                    .record_denial(&identity.issuer, &identity.subject)
                    .await;
            }
        }
        if !matches!(err, GatewayError::Unauthorized(_)) {
            self.state
                .metrics
                .policy_denials
                .with_label_values(&[err.rule().unwrap_or(""), err.reason()])
                .inc();
        }
        respond::error(session, ctx, &self.state, &err).await;
    }
}

/// Read a request body of at most `max` bytes (413 beyond). A body that arrives in one piece
/// (the usual JSON-RPC message) is kept as it was read, without a copy.
async fn read_body(session: &mut Session, max: usize) -> Result<Bytes, GatewayError> {
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                let len = joined.as_ref().map_or(first.len(), BytesMut::len);
                if len + chunk.len() > max {
                    return Err(GatewayError::PayloadTooLarge);
                }
                match joined.as_mut() {
                    Some(buf) => buf.extend_from_slice(&chunk),
                    None if first.is_empty() => first = chunk,
                    None => {
                        let mut buf = BytesMut::with_capacity(len + chunk.len());
                        buf.extend_from_slice(&first);
                        buf.extend_from_slice(&chunk);
                        joined = Some(buf);
                    }
                }
            }
            Ok(None) => return Ok(joined.map_or(first, BytesMut::freeze)),
            Err(_) => return Err(GatewayError::BadRequest("Could not read the request body")),
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            request_id: headers::RequestId::default(),
            client_ip: None,
            peer_ip: None,
            started: Instant::now(),
            route: Route::Proxied,
            identity: None,
            cors_origin: None,
            denied: None,
            user_key: None,
            body_bytes: 0,
            rate_headers: Vec::new(),
            upstream_sent: None,
            in_flight: false,
            sse: false,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        deadline::mark_headers_read();
        ctx.started = Instant::now();
        self.state.metrics.in_flight.inc();
        ctx.in_flight = true;
        ctx.request_id =
            headers::request_id(session.req_header().headers.get(headers::X_REQUEST_ID));
        // `::ffff:a.b.c.d` (a dual-stack listener's view of an IPv4 peer) is that IPv4 peer.
        ctx.peer_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical());
        ctx.client_ip = headers::client_ip(
            ctx.peer_ip,
            &session.req_header().headers,
            &self.state.settings.server.trusted_proxies,
        );
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // A clone of the URI shares its buffer: the path is borrowed without a copy.
        let uri = session.req_header().uri.clone();
        let path = uri.path();
        let outcome = async {
            headers::check_request_head(session.req_header())?;
            // The one route decision: every policy below reads `route`, never the raw path.
            let route = self
                .state
                .routes
                .classify(path)
                .map_err(|e| GatewayError::BadRequest(e.as_str()))?;
            // Per-IP budgets guard every route, discovery and failed authentication included.
            self.rate_limit(ctx, &route, None, &[RateKey::Ip]).await?;
            if self.local_route(session, ctx, path).await? {
                return Ok(true);
            }
            if route.kind == PathKind::KeysOther {
                // keygate's own namespace: never proxied, whatever the token.
                ctx.route = Route::Local;
                return Err(GatewayError::NotFound);
            }
            if self.cors(session, ctx).await? {
                return Ok(true);
            }
            self.transport_checks(session)?;
            self.authenticate(session, ctx, &route).await?;
            let body = self.read_mcp_body(session, &route).await?;
            let calls = body
                .as_deref()
                .map(|b| self.inspect_mcp(session, b))
                .transpose()?;
            self.rate_limit(
                ctx,
                &route,
                calls.as_deref(),
                &[RateKey::User, RateKey::Org],
            )
            .await?;
            self.authorize(session, ctx, &route, calls.as_deref())?;
            self.check_session(session, ctx).await?;
            if let Some(vault) = self.state.vault.clone() {
                if route.kind == PathKind::Keys {
                    self.keys_api(session, ctx, &vault).await?;
                    return Ok(true);
                }
                ctx.user_key = Some(self.resolve_key(ctx, &vault).await?);
            }
            Ok::<bool, GatewayError>(false)
        }
        .await;
        match outcome {
            Ok(answered) => Ok(answered),
            Err(e) => {
                self.deny(session, ctx, e).await;
                Ok(true)
            }
        }
    }

    fn persist_connection_context(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        Some(Box::new(deadline::ReusedConnection))
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.state.peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let s = &self.state;
        let server = &s.settings.server;
        let downstream = session.req_header();
        let host = downstream
            .headers
            .get(http::header::HOST)
            .cloned()
            .or_else(|| {
                downstream
                    .uri
                    .authority()
                    .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
            });
        let fwd = headers::Forwarding {
            peer: ctx.peer_ip,
            peer_trusted: headers::is_trusted(ctx.peer_ip, &server.trusted_proxies),
            tls: server.tls.is_some(),
            host,
            request_id: &ctx.request_id,
        };
        headers::rewrite(
            upstream_request,
            &fwd,
            ctx.identity.as_deref(),
            &s.settings.auth.identity_headers,
        )?;
        let up = &s.settings.upstream;
        if !up.preserve_host {
            upstream_request.insert_header(http::header::HOST, up.host_header.clone())?;
        }
        // Origin-form only: an absolute-form target never names another host upstream.
        if !up.base_path.is_empty() || upstream_request.uri.authority().is_some() {
            let pq = upstream_request
                .uri
                .path_and_query()
                .map(|pq| pq.as_str())
                .unwrap_or("/");
            let joined = format!("{}{pq}", up.base_path);
            let uri = http::Uri::try_from(joined)
                .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "upstream path", e))?;
            upstream_request.set_uri(uri);
        }
        inject::apply(
            upstream_request,
            &up.inject,
            ctx.user_key.as_deref(),
            s.settings.keys.default_base_url.as_deref(),
        )?;
        ctx.upstream_sent = Some(Instant::now());
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        deadline::body_progress(end_of_stream);
        // Bodies without a Content-Length are counted as they stream.
        ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        if ctx.body_bytes > self.state.settings.policy.max_body_bytes {
            return Error::e_explain(ErrorType::HTTPStatus(413), "request body over the limit");
        }
        Ok(())
    }

    /// A client that closes its connection (an SSE stream it is done with, a request it gave
    /// up on) is not an error of keygate's: counted, logged at debug, never at error.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        let disconnect = error.esource() == &ErrorSource::Downstream
            && matches!(
                error.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            );
        if disconnect {
            self.state.metrics.downstream_disconnects.inc();
            tracing::debug!(error = %error, "client went away");
        }
        disconnect
    }

    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        // Never the query string: it may carry keys.
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A session the upstream opens belongs to the caller who opened it.
        if let (Some(bindings), Some(identity)) = (&self.state.sessions, ctx.identity.as_deref()) {
            if let Some(sid) = upstream_response
                .headers
                .get(&MCP_SESSION_ID)
                .and_then(|v| v.to_str().ok())
            {
                if let Err(e) = bindings.bind(sid, &session_owner(identity)).await {
                    tracing::warn!(error = %e, "could not record the MCP session binding");
                }
            }
        }
        let metrics = &self.state.metrics;
        if let Some(sent) = ctx.upstream_sent {
            metrics
                .upstream_duration
                .observe(sent.elapsed().as_secs_f64());
        }
        let is_sse = upstream_response
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_sse && !ctx.sse {
            ctx.sse = true;
            metrics.sse_open.inc();
        }
        upstream_response
            .insert_header(headers::wire::X_REQUEST_ID, ctx.request_id.header_value())?;
        for (name, value) in &ctx.rate_headers {
            upstream_response.insert_header(*name, value.as_str())?;
        }
        if let Some(origin) = ctx.cors_origin.as_deref() {
            for (name, value) in Cors::response_headers(origin) {
                upstream_response.insert_header(name, value)?;
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match e.esource() {
            _ if matches!(e.etype(), ErrorType::HTTPStatus(413)) => {
                let err = GatewayError::PayloadTooLarge;
                ctx.denied = Some(err.reason());
                if session.response_written().is_none() {
                    respond::error(session, ctx, &self.state, &err).await;
                }
                413
            }
            ErrorSource::Upstream => {
                let (err, kind) = match e.etype() {
                    ErrorType::ConnectTimedout
                    | ErrorType::ReadTimedout
                    | ErrorType::WriteTimedout => (GatewayError::UpstreamTimeout, "timeout"),
                    ErrorType::ConnectRefused
                    | ErrorType::ConnectNoRoute
                    | ErrorType::ConnectError
                    | ErrorType::TLSHandshakeFailure => {
                        (GatewayError::UpstreamUnreachable, "connect")
                    }
                    _ => (GatewayError::UpstreamUnreachable, "other"),
                };
                self.state
                    .metrics
                    .upstream_errors
                    .with_label_values(&[kind])
                    .inc();
                ctx.denied = Some(err.reason());
                if session.response_written().is_none() {
                    respond::error(session, ctx, &self.state, &err).await;
                }
                err.response(&respond::challenge(&self.state)).status
            }
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => {
                    let err = GatewayError::BadRequest("Malformed request");
                    if session.response_written().is_none() {
                        respond::error(session, ctx, &self.state, &err).await;
                    }
                    400
                }
            },
            ErrorSource::Internal | ErrorSource::Unset => {
                if session.response_written().is_none() {
                    respond::error(session, ctx, &self.state, &GatewayError::Internal).await;
                }
                500
            }
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session
            .response_written()
            .map_or(0, |resp| resp.status.as_u16());
        let req = session.req_header();
        let metrics = &self.state.metrics;
        if ctx.in_flight {
            metrics.in_flight.dec();
            ctx.in_flight = false;
        }
        if ctx.sse {
            metrics.sse_open.dec();
            ctx.sse = false;
        }
        let elapsed = ctx.started.elapsed();
        metrics.request_done(
            ctx.route.as_str(),
            req.method.as_str(),
            status,
            elapsed.as_secs_f64(),
        );
        access::log(&access::Entry {
            request_id: ctx.request_id.as_str(),
            method: req.method.as_str(),
            path: req.uri.path(),
            status,
            route: ctx.route.as_str(),
            duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            client_ip: ctx.client_ip,
            user: ctx.identity.as_ref().map(|i| i.subject.as_str()),
            token_kind: ctx.identity.as_ref().map(|i| i.kind.as_str()),
            denied: ctx.denied,
            error: e.map(|e| e.etype().as_str()),
        });
    }
}
