//! Writing keygate's own responses: the one `error` writer every denial goes through (status,
//! JSON body, challenge, request id, CORS, structured log), plus plain JSON and empty answers.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use super::headers::wire;
use super::{GatewayState, RequestCtx};
use crate::error::{ChallengeParams, GatewayError};
use crate::policy::cors::Cors;

/// Discovery documents are public: any origin may read them, and caches may keep them.
pub const PUBLIC_DOCUMENT: [(&str, &str); 2] = [
    ("access-control-allow-origin", "*"),
    ("cache-control", "public, max-age=3600"),
];

/// Preflight for the public discovery documents.
pub const PUBLIC_CORS_PREFLIGHT: [(&str, &str); 3] = [
    ("access-control-allow-origin", "*"),
    ("access-control-allow-methods", "GET, OPTIONS"),
    ("access-control-allow-headers", "MCP-Protocol-Version"),
];

/// The challenge parameters for this deployment.
pub fn challenge(state: &GatewayState) -> ChallengeParams<'_> {
    ChallengeParams {
        resource_metadata: &state.settings.resource.metadata_url,
        scope: Some(state.challenge_scope.as_str()),
    }
}

async fn write(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    headers: &[(&str, &str)],
    body: Option<(&str, Bytes)>,
) {
    let Ok(mut resp) = ResponseHeader::build(status, Some(headers.len() + 4)) else {
        return;
    };
    let len = body.as_ref().map_or(0, |(_, b)| b.len());
    let mut ok = resp
        .insert_header("content-length", len.to_string())
        .is_ok()
        && resp
            .insert_header(wire::X_REQUEST_ID, ctx.request_id.header_value())
            .is_ok();
    if let Some((content_type, _)) = &body {
        ok &= resp.insert_header("content-type", *content_type).is_ok();
    }
    for (name, value) in headers {
        ok &= resp.append_header(name.to_string(), *value).is_ok();
    }
    if let Some(origin) = ctx.cors_origin.as_deref() {
        for (name, value) in Cors::response_headers(origin) {
            ok &= resp.insert_header(name, value).is_ok();
        }
    }
    if !ok {
        tracing::error!(status, "could not build response headers");
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    let end = body.is_none() || head_only;
    if let Err(e) = session.write_response_header(Box::new(resp), end).await {
        tracing::debug!(error = %e, "client went away before the response header");
        return;
    }
    if let (Some((_, body)), false) = (body, head_only) {
        if let Err(e) = session.write_response_body(Some(body), true).await {
            tracing::debug!(error = %e, "client went away before the response body");
        }
    }
}

/// Write a JSON body.
pub async fn json(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    body: Bytes,
    headers: &[(&str, &str)],
) {
    write(
        session,
        ctx,
        status,
        headers,
        Some(("application/json", body)),
    )
    .await;
}

/// Write a body of another content type (the dev authorization server's pages).
pub async fn document(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    content_type: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) {
    write(session, ctx, status, headers, Some((content_type, body))).await;
}

/// Write a response without a body.
pub async fn empty<N: AsRef<str>, V: AsRef<str>>(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    headers: &[(N, V)],
) {
    let borrowed: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_ref(), v.as_ref()))
        .collect();
    write(session, ctx, status, &borrowed, None).await;
}

/// Write the response for `err`, and log the denial.
pub async fn error(
    session: &mut Session,
    ctx: &RequestCtx,
    state: &GatewayState,
    err: &GatewayError,
) {
    let r = err.response(&challenge(state));
    let event = match err {
        GatewayError::Unauthorized(_) => "auth_failed",
        GatewayError::RateLimited { .. } => "rate_limited",
        GatewayError::UpstreamUnreachable | GatewayError::UpstreamTimeout => "upstream_failed",
        _ => "denied",
    };
    tracing::info!(
        target: "keygate::audit",
        event,
        request_id = %ctx.request_id,
        status = r.status,
        reason = err.reason(),
        rule = err.rule(),
        client_ip = ctx.client_ip.map(tracing::field::display),
        user = ctx.identity.as_ref().map(|i| i.subject.as_str()),
        issuer = ctx.identity.as_ref().map(|i| i.issuer.as_str()),
        "request refused"
    );
    let headers: Vec<(&str, &str)> = r.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let body = Bytes::from(r.body);
    write(
        session,
        ctx,
        r.status,
        &headers,
        Some(("application/json", body)),
    )
    .await;
}
