//! Routes keygate answers itself, before any policy: `/health`, the discovery documents
//! (protected-resource metadata and the authorization server's metadata, one route), and the
//! dev authorization server's endpoints when it is on.
//!
//! It owns what those answers are built from; nothing here reads a token.

use std::sync::Arc;

use bytes::Bytes;
use pingora::proxy::Session;

use super::body::read_body;
use super::{respond, RequestCtx, Route};
use crate::auth::dev_issuer::{self, DevAuthServer};
use crate::auth::discovery::{AsDocument, AuthServerMetadata, ResourceMetadata};
use crate::error::{GatewayError, RETRY_AS_METADATA};

/// The state behind keygate's own routes, built once at startup.
pub struct LocalRoutes {
    /// `/health`'s body.
    pub health_body: Bytes,
    pub resource_metadata: ResourceMetadata,
    pub as_metadata: AuthServerMetadata,
    /// The dev authorization server, when `dev.authorization_server` is on.
    pub dev_issuer: Option<Arc<DevAuthServer>>,
    /// Discovery is served only while authentication is on (`auth.enabled`).
    pub discovery: bool,
}

/// A discovery document keygate serves.
#[derive(Clone, Copy)]
enum Discovery {
    /// RFC 9728 protected-resource metadata.
    Resource,
    /// The authorization server's metadata (RFC 8414 or OpenID discovery).
    AuthServer(AsDocument),
}

impl LocalRoutes {
    fn discovery(&self, path: &str) -> Option<Discovery> {
        if self.resource_metadata.serves(path) {
            return Some(Discovery::Resource);
        }
        AsDocument::from_path(path).map(Discovery::AuthServer)
    }

    /// Answer `/health`, the dev authorization server and discovery; `Ok(true)` when answered.
    pub async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        path: &str,
    ) -> Result<bool, GatewayError> {
        let method = session.req_header().method.clone();
        if path == "/health" {
            ctx.route = Route::Local;
            respond::json(session, ctx, 200, self.health_body.clone(), &[]).await;
            return Ok(true);
        }
        if let Some(dev) = &self.dev_issuer {
            if let Some(endpoint) = dev.endpoint(path) {
                ctx.route = Route::Local;
                let body = if method == http::Method::POST {
                    read_body(session, dev_issuer::MAX_BODY_BYTES).await?
                } else {
                    Bytes::new()
                };
                let uri = session.req_header().uri.clone();
                let req = dev_issuer::DevRequest {
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
        let Some(doc) = self.discovery(path) else {
            return Ok(false);
        };
        ctx.route = Route::Local;
        if !self.discovery {
            return Err(GatewayError::NotFound);
        }
        if method == http::Method::OPTIONS {
            respond::empty(session, ctx, 204, &respond::PUBLIC_CORS_PREFLIGHT).await;
            return Ok(true);
        }
        if method != http::Method::GET && method != http::Method::HEAD {
            return Err(GatewayError::MethodNotAllowed);
        }
        let body = match doc {
            Discovery::Resource => self.resource_metadata.body(),
            Discovery::AuthServer(doc) => match self.as_metadata.get(doc).await {
                Ok(Some(body)) => body,
                Ok(None) => return Err(GatewayError::NotFound),
                Err(e) => {
                    tracing::warn!(error = %e, "authorization server metadata unavailable");
                    return Err(GatewayError::Unavailable {
                        what: "authorization server metadata",
                        retry_after: RETRY_AS_METADATA,
                    });
                }
            },
        };
        respond::json(session, ctx, 200, body, &respond::PUBLIC_DOCUMENT).await;
        Ok(true)
    }
}
