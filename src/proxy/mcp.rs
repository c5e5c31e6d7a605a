//! The MCP stage: transport rules that need no identity (`MCP-Protocol-Version`, the declared
//! body size), and reading and inspecting an MCP POST's JSON-RPC body (parsing and header
//! checks are `policy::mcp`'s). Whether a request is MCP is the route's decision.

use bytes::Bytes;
use http::HeaderName;
use pingora::proxy::Session;

use super::body::read_body;
use super::route::{Classified, PathKind};
use crate::config::PolicySettings;
use crate::error::GatewayError;
use crate::policy::mcp::{self, RpcCall};

const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");

/// MCP transport rules that need no identity: protocol version and declared body size.
pub fn transport_checks(policy: &PolicySettings, session: &Session) -> Result<(), GatewayError> {
    let headers = &session.req_header().headers;
    if let Some(v) = headers.get(&MCP_PROTOCOL_VERSION) {
        let ok = policy.protocol_versions.is_empty()
            || v.to_str()
                .is_ok_and(|v| policy.protocol_versions.iter().any(|p| p == v.trim()));
        if !ok {
            return Err(GatewayError::BadRequest(
                format!(
                    "Unsupported MCP-Protocol-Version; supported: {}",
                    policy.protocol_versions.join(", ")
                )
                .into(),
            ));
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
pub async fn read_mcp_body(
    policy: &PolicySettings,
    session: &mut Session,
    route: &Classified<'_>,
) -> Result<Option<Bytes>, GatewayError> {
    if route.kind != PathKind::Mcp || session.req_header().method != http::Method::POST {
        return Ok(None);
    }
    session.as_downstream_mut().enable_retry_buffering();
    read_body(session, policy.inspect_max_bytes).await.map(Some)
}

/// The calls in an MCP POST body, checked against its `Mcp-Method` / `Mcp-Name` headers.
pub fn inspect<'b>(session: &Session, body: &'b [u8]) -> Result<Vec<RpcCall<'b>>, GatewayError> {
    let calls =
        mcp::parse_body(body).map_err(|e| GatewayError::BadRequest(e.to_string().into()))?;
    let headers = &session.req_header().headers;
    let header = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    mcp::check_headers(&calls, header(&MCP_METHOD), header(&MCP_NAME))
        .map_err(|e| GatewayError::BadRequest(e.to_string().into()))?;
    Ok(calls)
}
