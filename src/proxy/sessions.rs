//! The session-binding stage: an `Mcp-Session-Id` belongs to the caller whose request opened
//! it. Checked on the way in (another caller's session is not found), recorded on the way out.
//! Where bindings are kept is `policy::sessions`'.

use http::HeaderName;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::auth::Identity;
use crate::error::{GatewayError, RETRY_DEPENDENCY};
use crate::policy::sessions::SessionBindings;

const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");

/// The caller as MCP session bindings know it: issuer and subject.
fn session_owner(identity: &Identity) -> String {
    format!("{}|{}", identity.issuer, identity.subject)
}

/// An `Mcp-Session-Id` opened by another user is not found.
pub async fn check(
    bindings: Option<&dyn SessionBindings>,
    session: &Session,
    identity: Option<&Identity>,
) -> Result<(), GatewayError> {
    let (Some(bindings), Some(identity)) = (bindings, identity) else {
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
        Ok(Some(owner)) if owner != session_owner(identity) => Err(GatewayError::SessionNotFound),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "session binding lookup failed");
            Err(GatewayError::Unavailable {
                what: "session store",
                retry_after: RETRY_DEPENDENCY,
            })
        }
    }
}

/// A session the upstream opens belongs to the caller who opened it.
pub async fn record(
    bindings: Option<&dyn SessionBindings>,
    response: &ResponseHeader,
    identity: Option<&Identity>,
) {
    let (Some(bindings), Some(identity)) = (bindings, identity) else {
        return;
    };
    if let Some(sid) = response
        .headers
        .get(&MCP_SESSION_ID)
        .and_then(|v| v.to_str().ok())
    {
        if let Err(e) = bindings.bind(sid, &session_owner(identity)).await {
            tracing::warn!(error = %e, "could not record the MCP session binding");
        }
    }
}
