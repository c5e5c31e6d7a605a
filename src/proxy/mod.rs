//! The request flow: Pingora's `ProxyHttp` implemented as a sequence of plain stage calls,
//! one function per stage; each stage lives in its own module.
//!
//! ```text
//! early_request_filter    request id, client ip, header deadline satisfied
//! request_filter          route        Host and single-valued MCP headers -> the route
//!                                      decision, once (`route`)
//!                         rate (ip)    per-IP rate rules (`policy`)
//!                         local        /health, discovery, the dev authorization server
//!                                      (`local`)
//!                         origin       CORS allowlist and preflight (`origin`)
//!                         mcp          MCP transport checks (`mcp`)
//!                         authenticate lockouts, bearer token, verification, auth metric
//!                                      (`authn`)
//!                         mcp          MCP body read and inspection (`mcp`)
//!                         rate         per-user/org rate rules and tool budgets (`policy`)
//!                         authorize    rules, org rules, scopes (`policy`)
//!                         session      MCP session binding checked (`sessions`)
//!                         key          /api/keys answered, or the caller's key resolved for
//!                                      injection (`keys_api`)
//! upstream_peer           the configured upstream
//! upstream_request_filter header hygiene, forwarding and identity headers, key injection
//!                         (`upstream`)
//! request_body_filter     body progress for the body deadlines, streamed-body size cap
//! response_filter         session binding recorded (`sessions`), upstream and SSE metrics,
//!                         request id, rate-limit headers, CORS
//! fail_to_proxy           upstream errors answered (`upstream`)
//! logging                 access log, request metrics
//! ```
//!
//! Denials are written by [`respond::error`]; nothing else writes an error response.

pub mod authn;
pub mod body;
pub mod deadline;
pub mod headers;
pub mod inject;
pub mod keys_api;
pub mod local;
pub mod mcp;
pub mod origin;
pub mod policy;
pub mod respond;
pub mod route;
pub mod sessions;
pub mod upstream;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;

use crate::auth::{Authenticator, Identity};
use crate::config::RateKey;
use crate::config::Settings;
use crate::error::GatewayError;
use crate::keys::vault::UserKey;
use crate::policy::auth_failures::AuthFailures;
use crate::policy::cors::Cors;
use crate::policy::ratelimit::RateLimits;
use crate::policy::sessions::SessionBindings;
use crate::policy::CompiledPolicy;
use crate::telemetry::access;
use crate::telemetry::metrics::Metrics;
use keys_api::KeyStage;
use local::LocalRoutes;
use route::{PathKind, Routes};

/// Everything the request path reads, built once at startup.
pub struct GatewayState {
    pub settings: Settings,
    /// The route table every request is classified by, once.
    pub routes: Routes,
    /// What keygate answers itself.
    pub local: LocalRoutes,
    pub cors: Cors,
    /// Scope rules and authorization rules (with their clock), compiled at startup.
    pub policy: CompiledPolicy,
    pub auth: Authenticator,
    /// The per-client-IP failed-authentication budget, when enabled.
    pub auth_failures: Option<Arc<AuthFailures>>,
    /// `scope="…"` for challenges.
    pub challenge_scope: String,
    /// Rate-limit rules with their quotas and tool matchers, and the limiter they share.
    pub rate_limits: RateLimits,
    /// Who opened which MCP session.
    pub sessions: Option<Arc<dyn SessionBindings>>,
    /// The key vault and the fallback key.
    pub keys: KeyStage,
    pub peer: HttpPeer,
    /// Every metric.
    pub metrics: Arc<Metrics>,
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
        // `ctx.started` was taken by `new_ctx`, which Pingora calls once the head is read.
        deadline::mark_headers_read();
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
            let s = &*self.state;
            headers::check_request_head(session.req_header())?;
            // The one route decision: every policy below reads `route`, never the raw path.
            let route = s
                .routes
                .classify(path)
                .map_err(|e| GatewayError::BadRequest(e.as_str().into()))?;
            // Per-IP budgets guard every route, discovery and failed authentication included.
            let (limits, metrics) = (&s.rate_limits, &*s.metrics);
            policy::rate_limit(limits, metrics, ctx, &route, None, &[RateKey::Ip]).await?;
            if s.local.answer(session, ctx, path).await? {
                return Ok(true);
            }
            if route.kind == PathKind::KeysOther {
                // keygate's own namespace: never proxied, whatever the token.
                ctx.route = Route::Local;
                return Err(GatewayError::NotFound);
            }
            if origin::check(&s.cors, session, ctx).await? {
                return Ok(true);
            }
            mcp::transport_checks(&s.settings.policy, session)?;
            authn::authenticate(s, session, ctx, &route).await?;
            let body = mcp::read_mcp_body(&s.settings.policy, session, &route).await?;
            let calls = body
                .as_deref()
                .map(|b| mcp::inspect(session, b))
                .transpose()?;
            let user_kinds = [RateKey::User, RateKey::Org];
            policy::rate_limit(limits, metrics, ctx, &route, calls.as_deref(), &user_kinds).await?;
            let method = &session.req_header().method;
            policy::authorize(s, method, ctx, &route, calls.as_deref())?;
            sessions::check(s.sessions.as_deref(), session, ctx.identity.as_deref()).await?;
            if let Some(vault) = s.keys.vault.as_deref() {
                if route.kind == PathKind::Keys {
                    keys_api::handle(&s.settings.keys, vault, session, ctx).await?;
                    return Ok(true);
                }
                let identity = ctx.identity.as_deref();
                ctx.user_key = Some(s.keys.resolve(&s.settings.keys, vault, identity).await?);
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
        upstream::rewrite(&self.state, session, upstream_request, ctx)?;
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
        let bindings = self.state.sessions.as_deref();
        sessions::record(bindings, upstream_response, ctx.identity.as_deref()).await;
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
        let code = upstream::fail(&self.state, session, e, ctx).await;
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
