//! The upstream stage: the request as the upstream sees it (header hygiene, forwarding and
//! identity headers, `Host`, the base path, the injected key), and what an upstream failure
//! is answered with.

use pingora::http::RequestHeader;
use pingora::prelude::*;

use super::{headers, inject, respond, GatewayState, RequestCtx};
use crate::error::GatewayError;

/// Rewrite the request for the upstream.
pub fn rewrite(
    state: &GatewayState,
    session: &Session,
    upstream_request: &mut RequestHeader,
    ctx: &RequestCtx,
) -> Result<()> {
    let server = &state.settings.server;
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
        &state.settings.auth.identity_headers,
    )?;
    let up = &state.settings.upstream;
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
        state.settings.keys.default_base_url.as_deref(),
    )
}

/// Answer a request that could not be proxied; returns the status for Pingora's log (0: the
/// client went away, nothing to answer).
pub async fn fail(
    state: &GatewayState,
    session: &mut Session,
    e: &Error,
    ctx: &mut RequestCtx,
) -> u16 {
    match e.esource() {
        _ if matches!(e.etype(), ErrorType::HTTPStatus(413)) => {
            let err = GatewayError::PayloadTooLarge;
            ctx.denied = Some(err.reason());
            if session.response_written().is_none() {
                respond::error(session, ctx, state, &err).await;
            }
            413
        }
        ErrorSource::Upstream => {
            let (err, kind) = match e.etype() {
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    (GatewayError::UpstreamTimeout, "timeout")
                }
                ErrorType::ConnectRefused
                | ErrorType::ConnectNoRoute
                | ErrorType::ConnectError
                | ErrorType::TLSHandshakeFailure => (GatewayError::UpstreamUnreachable, "connect"),
                _ => (GatewayError::UpstreamUnreachable, "other"),
            };
            state
                .metrics
                .upstream_errors
                .with_label_values(&[kind])
                .inc();
            ctx.denied = Some(err.reason());
            if session.response_written().is_none() {
                respond::error(session, ctx, state, &err).await;
            }
            err.response(&respond::challenge(state)).status
        }
        ErrorSource::Downstream => match e.etype() {
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
            _ => {
                let err = GatewayError::BadRequest("Malformed request".into());
                if session.response_written().is_none() {
                    respond::error(session, ctx, state, &err).await;
                }
                400
            }
        },
        ErrorSource::Internal | ErrorSource::Unset => {
            if session.response_written().is_none() {
                respond::error(session, ctx, state, &GatewayError::Internal).await;
            }
            500
        }
    }
}
