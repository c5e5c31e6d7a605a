//! The admin listener: `/health` (the process is up) and `/ready` (keygate can decide: every
//! issuer's signing keys are loaded and fresh). Metrics will be served here too.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::proxy::GatewayState;

/// The admin HTTP app.
pub struct Admin {
    pub state: Arc<GatewayState>,
    pub shutting_down: Arc<std::sync::atomic::AtomicBool>,
}

fn json(status: u16, body: Vec<u8>) -> Response<Vec<u8>> {
    let len = body.len();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", len)
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/health" => json(200, self.state.health_body.to_vec()),
            "/ready" => {
                let draining = self
                    .shutting_down
                    .load(std::sync::atomic::Ordering::Acquire);
                let keys = self.state.auth.is_ready() || !self.state.settings.auth.enabled;
                let store = match &self.state.vault {
                    Some(vault) => tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        vault.store().ping(),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok()),
                    None => true,
                };
                let ready = keys && store && !draining;
                let body = serde_json::json!({
                    "ready": ready,
                    "signing_keys": keys,
                    "key_store": store,
                    "draining": draining,
                });
                json(if ready { 200 } else { 503 }, body.to_string().into_bytes())
            }
            _ => json(
                404,
                br#"{"error":"not_found","error_description":"Not found"}"#.to_vec(),
            ),
        }
    }
}
