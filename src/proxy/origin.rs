//! The CORS/origin stage: a request carrying an `Origin` must name an allowed one; a CORS
//! preflight from it is answered here. What is allowed is `policy::cors`'s.

use pingora::proxy::Session;

use super::{respond, RequestCtx};
use crate::error::GatewayError;
use crate::policy::cors::Cors;

/// Origin allowlist and preflight; `Ok(true)` when a preflight was answered.
pub async fn check(
    cors: &Cors,
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
    if !cors.allows(&origin) {
        return Err(GatewayError::OriginForbidden);
    }
    let preflight = req.method == http::Method::OPTIONS
        && req
            .headers
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        let headers = cors.preflight_headers(&origin);
        respond::empty(session, ctx, 204, &headers).await;
        return Ok(true);
    }
    ctx.cors_origin = Some(origin);
    Ok(false)
}
