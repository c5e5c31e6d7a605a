//! Reading a request body keygate itself must see (an MCP message to inspect, a `/api/keys`
//! body, a dev authorization server form), bounded.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

use crate::error::GatewayError;

/// Read a request body of at most `max` bytes (413 beyond). A body that arrives in one piece
/// (the usual JSON-RPC message) is kept as it was read, without a copy.
pub async fn read_body(session: &mut Session, max: usize) -> Result<Bytes, GatewayError> {
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
            Err(_) => {
                return Err(GatewayError::BadRequest(
                    "Could not read the request body".into(),
                ))
            }
        }
    }
}
