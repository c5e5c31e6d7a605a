//! `FakeClerk`: one HTTP server on 127.0.0.1 playing both Clerk's Frontend API (JWKS and the
//! OAuth/OIDC discovery documents) and the parts of its Backend API keygate calls (`/v1/jwks`
//! and the three opaque-token verify endpoints), with the paths, JSON shapes and error bodies
//! Clerk really uses. Tests control which opaque tokens exist, count calls, and inject faults.
//!
//! Shapes follow Clerk's Backend API OpenAPI spec (version 2025-11-10) and the resources in
//! `clerk/javascript` `packages/backend/src/api/resources/`: timestamps are Unix milliseconds,
//! an unknown token is a 404 with `{"errors":[{message,long_message,code}],"clerk_trace_id"}`,
//! a revoked or expired token still answers 200 with `revoked`/`expired` set.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::keys::{self, SigningKey};

/// The Backend API secret key `FakeClerk` accepts.
pub const FAKE_SECRET_KEY: &str = "sk_test_keygate_fake";

/// What the Backend API knows about one opaque token. The token's prefix picks the endpoint
/// that knows it: `oat_` OAuth access token, `mt_` M2M token, `ak_` API key.
#[derive(Clone, Debug)]
pub struct OpaqueSpec {
    /// `user_…` for OAuth tokens and API keys, `mch_…` for M2M tokens.
    pub subject: String,
    pub scopes: Vec<String>,
    /// Unix milliseconds; `None` means the token never expires (`"expiration": null`).
    pub expires_at_ms: Option<i64>,
    pub revoked: bool,
    /// Reported as expired even if `expires_at_ms` is in the future.
    pub expired: bool,
    /// OAuth access tokens only.
    pub client_id: String,
}

impl Default for OpaqueSpec {
    fn default() -> Self {
        Self {
            subject: "user_keygateTestUser".into(),
            scopes: Vec::new(),
            expires_at_ms: Some(keys::now_ms() + 3_600_000),
            revoked: false,
            expired: false,
            client_id: keys::TEST_CLIENT_ID.into(),
        }
    }
}

impl OpaqueSpec {
    /// A live token for `subject` with `scopes`, expiring in an hour.
    pub fn new(subject: &str, scopes: &[&str]) -> Self {
        Self {
            subject: subject.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Self::default()
        }
    }
}

/// A fresh opaque token such as `oat_3f…` (prefix plus 32 hex characters).
pub fn random_token(prefix: &str) -> String {
    format!("{prefix}{}", keys::unique_hex(32))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    OAuth,
    M2m,
    ApiKey,
}

impl Kind {
    fn of(token: &str) -> Option<Kind> {
        if token.starts_with("oat_") {
            Some(Kind::OAuth)
        } else if token.starts_with("mt_") {
            Some(Kind::M2m)
        } else if token.starts_with("ak_") {
            Some(Kind::ApiKey)
        } else {
            None
        }
    }
}

struct Entry {
    id: String,
    spec: OpaqueSpec,
    created_at: i64,
    aud: Option<Vec<String>>,
    claims: Option<Value>,
}

struct Shared {
    url: String,
    jwks: Mutex<Value>,
    tokens: Mutex<HashMap<String, Entry>>,
    jwks_fetches: AtomicUsize,
    verify_calls: AtomicUsize,
    metadata_fetches: AtomicUsize,
    down: AtomicBool,
    verify_delay: Mutex<Duration>,
    /// Verify calls being answered now, and the most ever answered at once.
    verify_in_flight: AtomicUsize,
    verify_peak: AtomicUsize,
    /// While `true`, verify calls wait (after being counted) until it turns `false`.
    hold: tokio::sync::watch::Sender<bool>,
}

/// A running fake Clerk instance. Dropping it (or [`FakeClerk::stop`]) shuts the server down.
pub struct FakeClerk {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
}

impl FakeClerk {
    /// Bind 127.0.0.1:0 and serve, publishing `keys` in the JWKS.
    pub async fn start(keys: Vec<SigningKey>) -> FakeClerk {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Clerk");
        let addr = listener.local_addr().expect("fake Clerk address");
        let shared = Arc::new(Shared {
            url: format!("http://{addr}"),
            jwks: Mutex::new(jwks_of(&keys)),
            tokens: Mutex::new(HashMap::new()),
            jwks_fetches: AtomicUsize::new(0),
            verify_calls: AtomicUsize::new(0),
            metadata_fetches: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            verify_delay: Mutex::new(Duration::ZERO),
            verify_in_flight: AtomicUsize::new(0),
            verify_peak: AtomicUsize::new(0),
            hold: tokio::sync::watch::Sender::new(false),
        });
        let app = Router::new()
            .route("/.well-known/jwks.json", get(jwks))
            .route("/.well-known/oauth-authorization-server", get(metadata))
            .route("/.well-known/openid-configuration", get(metadata))
            .route("/v1/jwks", get(jwks))
            .route(
                "/v1/oauth_applications/access_tokens/verify",
                post(verify_oauth),
            )
            .route("/v1/m2m_tokens/verify", post(verify_m2m))
            .route("/v1/api_keys/verify", post(verify_api_key))
            .layer(middleware::from_fn_with_state(shared.clone(), gate))
            .with_state(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        FakeClerk {
            addr,
            shared,
            shutdown: Mutex::new(Some(tx)),
        }
    }

    /// `http://127.0.0.1:PORT`: the FAPI origin, the Backend API base (paths under `/v1`) and
    /// the `iss` of every token this instance "issues".
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A publishable key naming this instance's FAPI host (`pk_test_` + base64 of
    /// `127.0.0.1:PORT$`), as Clerk encodes it. Note it carries no scheme: real FAPI is https.
    pub fn publishable_key(&self) -> String {
        format!("pk_test_{}", STANDARD.encode(format!("{}$", self.addr)))
    }

    /// The Backend API secret key (`Authorization: Bearer <this>`).
    pub fn secret_key(&self) -> &str {
        FAKE_SECRET_KEY
    }

    /// Replace the published keys (key rotation).
    pub fn set_keys(&self, keys: Vec<SigningKey>) {
        *lock(&self.shared.jwks) = jwks_of(&keys);
    }

    /// Register (or replace) an opaque token.
    pub fn add_opaque(&self, token: &str, spec: OpaqueSpec) {
        let prefix = match Kind::of(token) {
            Some(Kind::OAuth) => "oat_",
            Some(Kind::M2m) => "mt_",
            Some(Kind::ApiKey) => "ak_",
            None => panic!("opaque token {token:?} must start with oat_, mt_ or ak_"),
        };
        let entry = Entry {
            id: random_token(prefix),
            spec,
            created_at: keys::now_ms(),
            aud: None,
            claims: None,
        };
        lock(&self.shared.tokens).insert(token.to_owned(), entry);
    }

    /// Mark a registered token revoked (it keeps verifying with `"revoked": true`).
    pub fn revoke(&self, token: &str) {
        let mut tokens = lock(&self.shared.tokens);
        let entry = tokens.get_mut(token).expect("revoke: token was registered");
        entry.spec.revoked = true;
    }

    /// OAuth access tokens: add the `aud` list newer Backend API versions return with the
    /// token (the RFC 8707 resources it was issued for). Without it the field is omitted.
    pub fn set_opaque_aud(&self, token: &str, aud: &[&str]) {
        let mut tokens = lock(&self.shared.tokens);
        let entry = tokens
            .get_mut(token)
            .expect("set_opaque_aud: token was registered");
        entry.aud = Some(aud.iter().map(|a| a.to_string()).collect());
    }

    /// M2M tokens and API keys: set the custom `claims` object (otherwise `null`).
    pub fn set_opaque_claims(&self, token: &str, claims: Value) {
        let mut tokens = lock(&self.shared.tokens);
        let entry = tokens
            .get_mut(token)
            .expect("set_opaque_claims: token was registered");
        entry.claims = Some(claims);
    }

    /// Forget a token entirely (the verify endpoints then answer 404).
    pub fn remove_opaque(&self, token: &str) {
        lock(&self.shared.tokens).remove(token);
    }

    /// Requests for `/.well-known/jwks.json` plus `/v1/jwks`, including failed ones.
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Requests to any of the three verify endpoints, including failed ones.
    pub fn verify_calls(&self) -> usize {
        self.shared.verify_calls.load(Ordering::SeqCst)
    }

    /// Requests for either discovery document, including failed ones.
    pub fn metadata_fetches(&self) -> usize {
        self.shared.metadata_fetches.load(Ordering::SeqCst)
    }

    /// While down, every endpoint answers 503 (requests are still counted).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Delay every verify response by `d` (to exercise coalescing of concurrent verifies).
    pub fn set_verify_delay(&self, d: Duration) {
        *lock(&self.shared.verify_delay) = d;
    }

    /// Verify calls being answered right now (held or delayed ones included).
    pub fn verify_in_flight(&self) -> usize {
        self.shared.verify_in_flight.load(Ordering::SeqCst)
    }

    /// The most verify calls that were ever being answered at the same time.
    pub fn verify_peak(&self) -> usize {
        self.shared.verify_peak.load(Ordering::SeqCst)
    }

    /// While held, every verify call is counted, then waits until [`FakeClerk::release`].
    pub fn hold_verifies(&self) {
        self.shared.hold.send_replace(true);
    }

    /// Let held verify calls (and later ones) answer.
    pub fn release(&self) {
        self.shared.hold.send_replace(false);
    }

    /// Wait (at most 10 s) until `n` verify calls are being answered at once.
    pub async fn wait_verify_in_flight(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.verify_in_flight() != n {
            assert!(
                std::time::Instant::now() < deadline,
                "expected {n} verify calls in flight, have {}",
                self.verify_in_flight()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stop accepting connections; idle keep-alive connections are closed too.
    pub fn stop(&self) {
        if let Some(tx) = lock(&self.shutdown).take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for FakeClerk {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn jwks_of(keys: &[SigningKey]) -> Value {
    keys::jwks(&keys.iter().collect::<Vec<_>>())
}

/// Counting, fault injection and Backend API authentication, in front of every route.
async fn gate(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let is_verify = path.ends_with("/verify");
    if path.ends_with("jwks.json") || path == "/v1/jwks" {
        s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    } else if path.starts_with("/.well-known/") {
        s.metadata_fetches.fetch_add(1, Ordering::SeqCst);
    } else if is_verify {
        s.verify_calls.fetch_add(1, Ordering::SeqCst);
    }
    if s.down.load(Ordering::SeqCst) {
        return clerk_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service unavailable",
            "The service is temporarily unavailable.",
            "service_unavailable",
        );
    }
    let _in_flight = is_verify.then(|| InFlight::enter(&s));
    if is_verify {
        let delay = *lock(&s.verify_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut held = s.hold.subscribe();
        let _ = held.wait_for(|h| !*h).await;
    }
    if path.starts_with("/v1/") {
        let expected = format!("Bearer {FAKE_SECRET_KEY}");
        let auth = req.headers().get(header::AUTHORIZATION);
        if auth.and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            let msg = "The provided Clerk Secret Key is invalid. Make sure that your Clerk Secret Key is correct.";
            return clerk_error(StatusCode::UNAUTHORIZED, msg, msg, "clerk_key_invalid");
        }
    }
    next.run(req).await
}

/// One verify call being answered: counted in `verify_in_flight` (and the peak) until dropped,
/// also when the client gives up and the handler is cancelled.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(s: &Arc<Shared>) -> InFlight {
        let now = s.verify_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.verify_peak.fetch_max(now, Ordering::SeqCst);
        InFlight(s.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.verify_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Clerk's error envelope.
fn clerk_error(status: StatusCode, message: &str, long_message: &str, code: &str) -> Response {
    let body = json!({
        "errors": [{ "message": message, "long_message": long_message, "code": code }],
        "clerk_trace_id": keys::unique_hex(32),
    });
    (status, Json(body)).into_response()
}

async fn jwks(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(lock(&s.jwks).clone())
}

/// RFC 8414 metadata shaped like a Clerk instance with dynamic client registration enabled.
fn discovery(url: &str) -> Value {
    json!({
        "issuer": url,
        "authorization_endpoint": format!("{url}/oauth/authorize"),
        "token_endpoint": format!("{url}/oauth/token"),
        "revocation_endpoint": format!("{url}/oauth/token/revoke"),
        "introspection_endpoint": format!("{url}/oauth/token_info"),
        "userinfo_endpoint": format!("{url}/oauth/userinfo"),
        "registration_endpoint": format!("{url}/oauth/register"),
        "jwks_uri": format!("{url}/.well-known/jwks.json"),
        "scopes_supported": ["openid", "profile", "email", "public_metadata", "private_metadata", "offline_access"],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query", "form_post"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "none", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "email", "email_verified", "name", "picture"],
        "service_documentation": "https://clerk.com/docs",
    })
}

/// Served at both `oauth-authorization-server` and `openid-configuration`, as Clerk does.
async fn metadata(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(discovery(&s.url))
}

async fn verify_oauth(State(s): State<Arc<Shared>>, body: String) -> Response {
    // `secret` is the deprecated spelling of `access_token` the spec still accepts.
    verify(&s, Kind::OAuth, &body, &["access_token", "secret"])
}

async fn verify_m2m(State(s): State<Arc<Shared>>, body: String) -> Response {
    verify(&s, Kind::M2m, &body, &["token"])
}

async fn verify_api_key(State(s): State<Arc<Shared>>, body: String) -> Response {
    verify(&s, Kind::ApiKey, &body, &["secret"])
}

fn verify(s: &Shared, kind: Kind, body: &str, fields: &[&str]) -> Response {
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let Some(token) = fields
        .iter()
        .find_map(|f| parsed.get(*f).and_then(Value::as_str))
    else {
        return clerk_error(
            StatusCode::BAD_REQUEST,
            "is missing",
            &format!("{} must be included.", fields[0]),
            "form_param_missing",
        );
    };
    let tokens = lock(&s.tokens);
    let Some(entry) = tokens.get(token).filter(|_| Kind::of(token) == Some(kind)) else {
        return clerk_error(
            StatusCode::NOT_FOUND,
            "not found",
            "Resource not found",
            "resource_not_found",
        );
    };
    let now = keys::now_ms();
    let spec = &entry.spec;
    let expired = spec.expired || spec.expires_at_ms.is_some_and(|e| e <= now);
    let reason = spec.revoked.then_some("Revoked by user");
    let body = match kind {
        Kind::OAuth => {
            let mut v = json!({
                "object": "clerk_idp_oauth_access_token",
                "id": entry.id,
                "client_id": spec.client_id,
                "type": "oauth:access_token",
                "subject": spec.subject,
                "scopes": spec.scopes,
                "revoked": spec.revoked,
                "revocation_reason": reason,
                "expired": expired,
                "expiration": spec.expires_at_ms,
                "created_at": entry.created_at,
                "updated_at": entry.created_at,
            });
            if let Some(aud) = &entry.aud {
                v["aud"] = json!(aud);
            }
            v
        }
        Kind::M2m => json!({
            "object": "machine_to_machine_token",
            "id": entry.id,
            "subject": spec.subject,
            "claims": entry.claims,
            "scopes": spec.scopes,
            "revoked": spec.revoked,
            "revocation_reason": reason,
            "expired": expired,
            "expiration": spec.expires_at_ms,
            "last_used_at": now,
            "created_at": entry.created_at,
            "updated_at": entry.created_at,
        }),
        Kind::ApiKey => json!({
            "object": "api_key",
            "id": entry.id,
            "type": "api_key",
            "subject": spec.subject,
            "name": "keygate-test-key",
            "description": null,
            "claims": entry.claims,
            "scopes": spec.scopes,
            "revoked": spec.revoked,
            "revocation_reason": reason,
            "expired": expired,
            "expiration": spec.expires_at_ms,
            "created_by": null,
            "last_used_at": now,
            "created_at": entry.created_at,
            "updated_at": entry.created_at,
        }),
    };
    Json(body).into_response()
}
