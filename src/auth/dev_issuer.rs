//! The dev issuer as a minimal OAuth 2.1 authorization server, so that a real MCP client can
//! get a token offline: RFC 8414 metadata (and its OpenID Connect twin), dynamic client
//! registration (RFC 7591, public clients only), the authorization code grant with PKCE S256
//! and the RFC 8707 `resource` parameter, a consent page where the developer picks the user,
//! org and scopes, and a token endpoint issuing `at+jwt` access tokens (signed by
//! [`DevSigner`], the same shape `keygate dev-token` mints) and rotating one-time refresh
//! tokens.
//!
//! It is served on the public listener under the dev issuer's own path, only when
//! `dev.authorization_server = true`, which configuration validation refuses next to Clerk,
//! any other issuer, or a non-loopback listener. Everything it remembers (clients, pending
//! consent pages, codes, refresh tokens) lives in bounded in-memory tables with a time to
//! live; codes and refresh tokens are kept by their SHA-256 only and removed on first use.
//!
//! It owns the OAuth protocol and its state; reading the request body (with its size cap) and
//! writing the response are the proxy's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use rand::RngCore;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use url::Url;

use crate::auth::discovery::AsDocument;
use crate::cache::Expiring;
use crate::config::Settings;
use crate::devtoken::{DevSigner, DevTokenError, DevTokenRequest};

/// Request bodies (registration, consent form, token requests) are at most this long.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// How long an access token lives.
const ACCESS_TTL: Duration = Duration::from_secs(3600);
/// How long an authorization code may wait for its exchange.
const CODE_TTL: Duration = Duration::from_secs(60);
/// How long a consent page stays valid.
const PENDING_TTL: Duration = Duration::from_secs(600);
/// How long an unused refresh token stays valid.
const REFRESH_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a registered client is remembered without use.
const CLIENT_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Table sizes: a developer's laptop, not a fleet.
const MAX_CLIENTS: u64 = 1_000;
const MAX_PENDING: u64 = 1_000;
const MAX_CODES: u64 = 1_000;
const MAX_REFRESH: u64 = 1_000;
/// Limits on what a client may register or ask for.
const MAX_REDIRECT_URIS: usize = 10;
const MAX_TEXT: usize = 2_000;
const MAX_NAME: usize = 200;
const MAX_SCOPES: usize = 32;

/// Which of the dev issuer's endpoints a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Metadata(AsDocument),
    Jwks,
    Register,
    Authorize,
    Token,
}

/// What the proxy hands over: the request, its body already read (and capped).
pub struct DevRequest<'a> {
    pub method: &'a http::Method,
    pub query: Option<&'a str>,
    pub body: &'a [u8],
}

/// What to answer.
#[derive(Debug)]
pub struct DevResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

/// Why the dev authorization server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    #[error("dev.issuer {0:?} is not a URL with a path of its own")]
    Issuer(String),
    #[error("dev.signing_key_file: {0}")]
    Key(#[from] DevTokenError),
}

struct Client {
    redirect_uris: Vec<String>,
    name: Option<String>,
}

/// An authorization request the developer has been shown and not yet answered.
struct Pending {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    resource: String,
    state: Option<String>,
}

/// What a code or a refresh token stands for.
#[derive(Clone)]
struct Grant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    resource: String,
    subject: String,
    org: Option<String>,
    scopes: Vec<String>,
}

/// The dev authorization server.
pub struct DevAuthServer {
    issuer: String,
    resource: String,
    default_scopes: Vec<String>,
    signer: DevSigner,
    oauth_doc: Bytes,
    openid_doc: Bytes,
    jwks: Bytes,
    oauth_paths: [String; 2],
    openid_paths: [String; 2],
    authorize_path: String,
    token_path: String,
    register_path: String,
    jwks_path: String,
    /// Registered clients, each kept `CLIENT_IDLE` after its last use.
    clients: Expiring<String, Arc<Client>>,
    pending: Table<Pending>,
    codes: Table<Grant>,
    refresh: Table<Grant>,
}

/// A JSON answer from the API endpoints: any origin may call them (public clients, no
/// cookies), and nothing here may be cached.
fn api_json(status: u16, body: &Value) -> DevResponse {
    DevResponse {
        status,
        content_type: "application/json",
        headers: vec![
            ("cache-control", "no-store".into()),
            ("pragma", "no-cache".into()),
            ("access-control-allow-origin", "*".into()),
        ],
        body: Bytes::from(body.to_string()),
    }
}

/// An RFC 6749 error (`invalid_grant`, …).
fn oauth_error(status: u16, error: &str, description: &str) -> DevResponse {
    api_json(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn preflight(methods: &str) -> DevResponse {
    DevResponse {
        status: 204,
        content_type: "text/plain",
        headers: vec![
            ("access-control-allow-origin", "*".into()),
            ("access-control-allow-methods", methods.into()),
            (
                "access-control-allow-headers",
                "Content-Type, Authorization, MCP-Protocol-Version".into(),
            ),
            ("access-control-max-age", "600".into()),
        ],
        body: Bytes::new(),
    }
}

fn method_not_allowed(allow: &str) -> DevResponse {
    let mut r = oauth_error(405, "invalid_request", "method not allowed");
    r.headers.push(("allow", allow.into()));
    r
}

/// Text safe to place in HTML text and double-quoted attribute values.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html(status: u16, body: String) -> DevResponse {
    DevResponse {
        status,
        content_type: "text/html; charset=utf-8",
        headers: vec![
            ("cache-control", "no-store".into()),
            (
                "content-security-policy",
                "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'".into(),
            ),
            ("x-frame-options", "DENY".into()),
            ("referrer-policy", "no-referrer".into()),
            ("x-content-type-options", "nosniff".into()),
        ],
        body: Bytes::from(body),
    }
}

const STYLE: &str = "body{font-family:sans-serif;max-width:40em;margin:2em auto;padding:0 1em}\
label{display:block;margin:.8em 0 .2em}input[type=text]{width:100%;padding:.3em}\
dt{font-weight:bold}dd{margin:0 0 .5em 0;word-break:break-all}button{margin:1em .5em 0 0}";

fn error_page(message: &str) -> DevResponse {
    html(
        400,
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>keygate dev \
             authorization: refused</title><style>{STYLE}</style></head><body><h1>Authorization \
             refused</h1><p>{}</p></body></html>",
            html_escape(message)
        ),
    )
}

/// A bounded table whose entries expire `ttl` after insertion.
struct Table<V> {
    entries: Expiring<String, Arc<V>>,
    ttl: Duration,
}

impl<V> Table<V> {
    fn new(cap: u64, ttl: Duration) -> Self {
        Self {
            entries: Expiring::new(usize::try_from(cap).unwrap_or(usize::MAX)),
            ttl,
        }
    }

    fn insert(&self, key: String, value: Arc<V>) {
        self.entries.insert(key, value, Instant::now() + self.ttl);
    }

    fn remove(&self, key: &str) -> Option<Arc<V>> {
        self.entries.remove(key)
    }
}

/// A random, URL-safe secret (256 bits).
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What codes and refresh tokens are kept by.
fn digest(secret: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(secret.as_bytes()))
}

/// Equal without an early exit (the compared values are digests; this is belt and braces).
fn same(a: &str, b: &str) -> bool {
    subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes()).into()
}

/// A PKCE verifier or S256 challenge: 43 to 128 characters of `[A-Za-z0-9-._~]` (RFC 7636).
fn pkce_shaped(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// `https`, or `http` on a loopback host; no fragment (RFC 6749 §3.1.2, RFC 8252 §7.3).
fn redirect_allowed(raw: &str) -> bool {
    if raw.len() > MAX_TEXT {
        return false;
    }
    let Ok(u) = Url::parse(raw) else {
        return false;
    };
    if u.fragment().is_some() || u.username() != "" || u.password().is_some() {
        return false;
    }
    match (u.scheme(), u.host()) {
        ("https", Some(_)) => true,
        ("http", Some(url::Host::Domain(d))) => d.eq_ignore_ascii_case("localhost"),
        ("http", Some(url::Host::Ipv4(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Ipv6(ip))) => ip.is_loopback(),
        _ => false,
    }
}

/// Form or query pairs; `None` when a parameter is repeated (RFC 6749 §3.1, §3.2).
fn params(raw: &[u8]) -> Option<std::collections::HashMap<String, String>> {
    let mut out = std::collections::HashMap::new();
    for (k, v) in url::form_urlencoded::parse(raw) {
        if out.insert(k.into_owned(), v.into_owned()).is_some() {
            return None;
        }
    }
    Some(out)
}

/// Scopes from a space-separated list, bounded.
fn scope_list(raw: &str) -> Option<Vec<String>> {
    let scopes: Vec<String> = raw.split_whitespace().map(str::to_string).collect();
    let ok = scopes.len() <= MAX_SCOPES
        && scopes.iter().all(|s| {
            s.len() <= MAX_NAME
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        });
    ok.then_some(scopes)
}

/// A user or org id the developer typed: short, visible characters only.
fn id_shaped(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && s.chars().all(|c| !c.is_control() && !c.is_whitespace())
}

#[derive(Deserialize)]
struct Registration {
    #[serde(default)]
    redirect_uris: Vec<String>,
    token_endpoint_auth_method: Option<String>,
    grant_types: Option<Vec<String>>,
    response_types: Option<Vec<String>>,
    client_name: Option<String>,
}

impl DevAuthServer {
    /// Build it from validated settings (`dev.authorization_server` is on).
    pub fn new(settings: &Settings) -> Result<Self, DevIssuerError> {
        let dev = settings
            .dev
            .as_ref()
            .ok_or_else(|| DevIssuerError::Issuer(String::new()))?;
        let issuer = dev.issuer.trim_end_matches('/').to_string();
        let base = Url::parse(&issuer)
            .ok()
            .map(|u| u.path().trim_end_matches('/').to_string())
            .filter(|p| !p.is_empty())
            .ok_or_else(|| DevIssuerError::Issuer(dev.issuer.clone()))?;
        let signer = DevSigner::load(dev, &settings.resource.url)?;
        let jwks = Bytes::from(signer.jwks()?.to_string());
        let default_scopes = settings.resource.scopes_supported.clone();
        let mut oauth = json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "registration_endpoint": format!("{issuer}/register"),
            "jwks_uri": format!("{issuer}/jwks.json"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_methods_supported": ["none"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": true,
        });
        if !default_scopes.is_empty() {
            oauth["scopes_supported"] = json!(default_scopes);
        }
        let mut openid = oauth.clone();
        openid["subject_types_supported"] = json!(["public"]);
        openid["id_token_signing_alg_values_supported"] = json!(["RS256"]);
        Ok(Self {
            resource: settings.resource.url.clone(),
            default_scopes,
            signer,
            oauth_doc: Bytes::from(oauth.to_string()),
            openid_doc: Bytes::from(openid.to_string()),
            jwks,
            oauth_paths: [
                format!("/.well-known/oauth-authorization-server{base}"),
                format!("{base}/.well-known/oauth-authorization-server"),
            ],
            openid_paths: [
                format!("/.well-known/openid-configuration{base}"),
                format!("{base}/.well-known/openid-configuration"),
            ],
            authorize_path: format!("{base}/authorize"),
            token_path: format!("{base}/token"),
            register_path: format!("{base}/register"),
            jwks_path: format!("{base}/jwks.json"),
            issuer,
            clients: Expiring::new(usize::try_from(MAX_CLIENTS).unwrap_or(usize::MAX)),
            pending: Table::new(MAX_PENDING, PENDING_TTL),
            codes: Table::new(MAX_CODES, CODE_TTL),
            refresh: Table::new(MAX_REFRESH, REFRESH_TTL),
        })
    }

    /// A registered client, now used (it is kept `CLIENT_IDLE` from now).
    fn client(&self, client_id: &str) -> Option<Arc<Client>> {
        self.clients
            .get_extending(client_id, Instant::now() + CLIENT_IDLE)
    }

    /// The issuer URL (no trailing slash).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The metadata document of `doc`'s kind.
    pub fn metadata(&self, doc: AsDocument) -> Bytes {
        match doc {
            AsDocument::OAuth => self.oauth_doc.clone(),
            AsDocument::OpenId => self.openid_doc.clone(),
        }
    }

    /// Which endpoint `path` (the raw request path) is, if it is one of ours.
    pub fn endpoint(&self, path: &str) -> Option<Endpoint> {
        if self.oauth_paths.iter().any(|p| p == path) {
            Some(Endpoint::Metadata(AsDocument::OAuth))
        } else if self.openid_paths.iter().any(|p| p == path) {
            Some(Endpoint::Metadata(AsDocument::OpenId))
        } else if path == self.authorize_path {
            Some(Endpoint::Authorize)
        } else if path == self.token_path {
            Some(Endpoint::Token)
        } else if path == self.register_path {
            Some(Endpoint::Register)
        } else if path == self.jwks_path {
            Some(Endpoint::Jwks)
        } else {
            None
        }
    }

    /// Answer a request to `endpoint`.
    pub fn handle(&self, endpoint: Endpoint, req: &DevRequest<'_>) -> DevResponse {
        let m = req.method;
        let read = m == http::Method::GET || m == http::Method::HEAD;
        let post = m == http::Method::POST;
        match endpoint {
            Endpoint::Metadata(_) | Endpoint::Jwks if m == http::Method::OPTIONS => {
                preflight("GET, OPTIONS")
            }
            Endpoint::Register | Endpoint::Token if m == http::Method::OPTIONS => {
                preflight("POST, OPTIONS")
            }
            Endpoint::Metadata(doc) if read => self.document(self.metadata(doc)),
            Endpoint::Jwks if read => self.document(self.jwks.clone()),
            Endpoint::Metadata(_) | Endpoint::Jwks => method_not_allowed("GET, HEAD, OPTIONS"),
            Endpoint::Register if post => self.register(req.body),
            Endpoint::Token if post => self.token(req.body),
            Endpoint::Register | Endpoint::Token => method_not_allowed("POST, OPTIONS"),
            Endpoint::Authorize if read => self.authorize(req.query.unwrap_or("")),
            Endpoint::Authorize if post => self.consent(req.body),
            Endpoint::Authorize => method_not_allowed("GET, HEAD, POST"),
        }
    }

    fn document(&self, body: Bytes) -> DevResponse {
        DevResponse {
            status: 200,
            content_type: "application/json",
            headers: vec![
                ("access-control-allow-origin", "*".into()),
                ("cache-control", "no-cache".into()),
            ],
            body,
        }
    }

    /// RFC 7591 registration of a public client.
    fn register(&self, body: &[u8]) -> DevResponse {
        let Ok(reg) = serde_json::from_slice::<Registration>(body) else {
            return oauth_error(
                400,
                "invalid_client_metadata",
                "the body is not client metadata JSON",
            );
        };
        if reg.redirect_uris.is_empty() || reg.redirect_uris.len() > MAX_REDIRECT_URIS {
            return oauth_error(
                400,
                "invalid_redirect_uri",
                "register between 1 and 10 redirect_uris",
            );
        }
        if let Some(bad) = reg.redirect_uris.iter().find(|u| !redirect_allowed(u)) {
            let shown: String = bad.chars().take(100).collect();
            return oauth_error(
                400,
                "invalid_redirect_uri",
                &format!(
                    "{shown:?} is not allowed: use https, or http on a loopback host, without a fragment"
                ),
            );
        }
        if reg
            .token_endpoint_auth_method
            .as_deref()
            .is_some_and(|m| m != "none")
        {
            return oauth_error(
                400,
                "invalid_client_metadata",
                "only public clients are registered here: token_endpoint_auth_method must be \"none\"",
            );
        }
        if reg.grant_types.as_ref().is_some_and(|g| {
            g.iter()
                .any(|g| g != "authorization_code" && g != "refresh_token")
        }) {
            return oauth_error(
                400,
                "invalid_client_metadata",
                "grant_types may only list authorization_code and refresh_token",
            );
        }
        if reg
            .response_types
            .as_ref()
            .is_some_and(|r| r.iter().any(|r| r != "code"))
        {
            return oauth_error(
                400,
                "invalid_client_metadata",
                "response_types may only list code",
            );
        }
        if reg.client_name.as_ref().is_some_and(|n| n.len() > MAX_NAME) {
            return oauth_error(400, "invalid_client_metadata", "client_name is too long");
        }
        let client_id = format!("dev-client-{}", random_token());
        let issued_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut answer = json!({
            "client_id": client_id,
            "client_id_issued_at": issued_at,
            "redirect_uris": reg.redirect_uris,
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
        });
        if let Some(name) = &reg.client_name {
            answer["client_name"] = json!(name);
        }
        self.clients.insert(
            client_id,
            Arc::new(Client {
                redirect_uris: reg.redirect_uris,
                name: reg.client_name,
            }),
            Instant::now() + CLIENT_IDLE,
        );
        api_json(201, &answer)
    }

    /// `GET /authorize`: check the request, then show the consent page.
    fn authorize(&self, query: &str) -> DevResponse {
        let Some(q) = params(query.as_bytes()) else {
            return error_page("A parameter of the authorization request is repeated.");
        };
        let Some((client_id, client)) = q
            .get("client_id")
            .and_then(|id| Some((id.clone(), self.client(id)?)))
        else {
            return error_page("Unknown client_id: register the client first.");
        };
        let redirect_uri = match q.get("redirect_uri") {
            Some(r) if client.redirect_uris.iter().any(|u| u == r) => r.clone(),
            None if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
            _ => return error_page("redirect_uri is not one this client registered."),
        };
        let state = q.get("state").cloned();
        // Checked before any refusal could echo it back on the redirect.
        if state.as_ref().is_some_and(|s| s.len() > MAX_TEXT) {
            return error_page("state is too long.");
        }
        // From here on, refusals go back to the client on its redirect.
        let refuse = |error: &str, description: &str| {
            self.redirect(
                &redirect_uri,
                &[("error", error), ("error_description", description)],
                state.as_deref(),
            )
        };
        if q.get("response_type").map(String::as_str) != Some("code") {
            return refuse("unsupported_response_type", "response_type must be code");
        }
        let Some(challenge) = q.get("code_challenge").filter(|c| pkce_shaped(c)) else {
            return refuse(
                "invalid_request",
                "a PKCE code_challenge (S256) is required",
            );
        };
        if q.get("code_challenge_method").map(String::as_str) != Some("S256") {
            return refuse("invalid_request", "code_challenge_method must be S256");
        }
        let resource = match q.get("resource") {
            None => self.resource.clone(),
            Some(r) if *r == self.resource => r.clone(),
            Some(_) => return refuse("invalid_target", "resource is not this server's resource"),
        };
        let scopes = match q.get("scope") {
            Some(s) => match scope_list(s) {
                Some(list) => list,
                None => return refuse("invalid_scope", "scope is not a list of scope names"),
            },
            None => self.default_scopes.clone(),
        };
        let id = random_token();
        let page = self.consent_page(
            &id,
            &client_id,
            &client,
            &redirect_uri,
            &resource,
            state.as_deref(),
            &scopes,
        );
        self.pending.insert(
            id,
            Arc::new(Pending {
                client_id,
                redirect_uri,
                challenge: challenge.clone(),
                resource,
                state,
            }),
        );
        html(200, page)
    }

    #[allow(clippy::too_many_arguments)]
    fn consent_page(
        &self,
        id: &str,
        client_id: &str,
        client: &Client,
        redirect_uri: &str,
        resource: &str,
        state: Option<&str>,
        scopes: &[String],
    ) -> String {
        let e = html_escape;
        let name = client.name.as_deref().unwrap_or("an unnamed client");
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>keygate dev \
             authorization</title><style>{STYLE}</style></head><body>\
             <h1>Sign in to {resource_e} (development)</h1>\
             <p>This is keygate's offline development issuer: it signs a token for whichever \
             user you name. Never expose it.</p>\
             <dl><dt>Client</dt><dd>{name} ({client_id})</dd>\
             <dt>Returns to</dt><dd>{redirect}</dd>\
             <dt>State</dt><dd>{state}</dd></dl>\
             <form method=\"post\" action=\"{action}\">\
             <input type=\"hidden\" name=\"request\" value=\"{id}\">\
             <label for=\"user\">User id</label>\
             <input type=\"text\" id=\"user\" name=\"user\" value=\"user_dev\" required>\
             <label for=\"org\">Organization id (empty for none)</label>\
             <input type=\"text\" id=\"org\" name=\"org\" value=\"\">\
             <label for=\"scope\">Scopes (space separated)</label>\
             <input type=\"text\" id=\"scope\" name=\"scope\" value=\"{scope}\">\
             <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\
             <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button>\
             </form></body></html>",
            resource_e = e(resource),
            name = e(name),
            client_id = e(client_id),
            redirect = e(redirect_uri),
            state = e(state.unwrap_or("(none)")),
            action = e(&self.authorize_path),
            id = e(id),
            scope = e(&scopes.join(" ")),
        )
    }

    /// `POST /authorize`: the developer's answer; a one-time code on the client's redirect.
    fn consent(&self, body: &[u8]) -> DevResponse {
        let Some(form) = params(body) else {
            return error_page("A form field is repeated.");
        };
        let Some(pending) = form.get("request").and_then(|id| self.pending.remove(id)) else {
            return error_page(
                "This authorization request is unknown or expired: start again from the client.",
            );
        };
        let state = pending.state.as_deref();
        if form.get("decision").map(String::as_str) == Some("deny") {
            return self.redirect(
                &pending.redirect_uri,
                &[
                    ("error", "access_denied"),
                    ("error_description", "the developer denied the request"),
                ],
                state,
            );
        }
        let Some(subject) = form.get("user").map(|u| u.trim()).filter(|u| id_shaped(u)) else {
            return error_page("The user id must be 1 to 200 visible characters without spaces.");
        };
        let org = match form.get("org").map(|o| o.trim()).filter(|o| !o.is_empty()) {
            Some(o) if id_shaped(o) => Some(o.to_string()),
            Some(_) => {
                return error_page("The org id must be 1 to 200 visible characters without spaces.")
            }
            None => None,
        };
        let Some(scopes) = scope_list(form.get("scope").map_or("", String::as_str)) else {
            return error_page("The scopes must be a space-separated list of scope names.");
        };
        let code = random_token();
        self.codes.insert(
            digest(&code),
            Arc::new(Grant {
                client_id: pending.client_id.clone(),
                redirect_uri: pending.redirect_uri.clone(),
                challenge: pending.challenge.clone(),
                resource: pending.resource.clone(),
                subject: subject.to_string(),
                org,
                scopes,
            }),
        );
        self.redirect(&pending.redirect_uri, &[("code", &code)], state)
    }

    /// 303 to `redirect_uri` with `pairs`, `state` and `iss` (RFC 9207) added to its query.
    fn redirect(
        &self,
        redirect_uri: &str,
        pairs: &[(&str, &str)],
        state: Option<&str>,
    ) -> DevResponse {
        let Ok(mut url) = Url::parse(redirect_uri) else {
            return error_page("The registered redirect_uri is not a URL.");
        };
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in pairs {
                q.append_pair(k, v);
            }
            if let Some(s) = state {
                q.append_pair("state", s);
            }
            q.append_pair("iss", &self.issuer);
        }
        let mut r = html(303, String::new());
        r.headers.push(("location", url.to_string()));
        r
    }

    /// `POST /token`: the authorization code and refresh token grants.
    fn token(&self, body: &[u8]) -> DevResponse {
        let Some(form) = params(body) else {
            return oauth_error(400, "invalid_request", "a parameter is repeated");
        };
        let Some(client_id) = form.get("client_id") else {
            return oauth_error(
                400,
                "invalid_request",
                "client_id is required (public clients)",
            );
        };
        if self.client(client_id).is_none() {
            return oauth_error(401, "invalid_client", "unknown client_id");
        }
        let grant = match form.get("grant_type").map(String::as_str) {
            Some("authorization_code") => self.code_grant(&form, client_id),
            Some("refresh_token") => self.refresh_grant(&form, client_id),
            Some(_) => Err(oauth_error(
                400,
                "unsupported_grant_type",
                "grant_type must be authorization_code or refresh_token",
            )),
            None => Err(oauth_error(
                400,
                "invalid_request",
                "grant_type is required",
            )),
        };
        match grant {
            Ok(grant) => self.issue(grant),
            Err(refusal) => refusal,
        }
    }

    fn code_grant(
        &self,
        form: &std::collections::HashMap<String, String>,
        client_id: &str,
    ) -> Result<Grant, DevResponse> {
        let (Some(code), Some(verifier), Some(redirect_uri)) = (
            form.get("code"),
            form.get("code_verifier"),
            form.get("redirect_uri"),
        ) else {
            return Err(oauth_error(
                400,
                "invalid_request",
                "code, code_verifier and redirect_uri are required",
            ));
        };
        // Removed before any check: a code is spent by its first use, right or wrong.
        let Some(grant) = self.codes.remove(&digest(code)) else {
            return Err(oauth_error(
                400,
                "invalid_grant",
                "the code is unknown, used or expired",
            ));
        };
        if grant.client_id != client_id {
            return Err(oauth_error(
                400,
                "invalid_grant",
                "the code was issued to another client",
            ));
        }
        if grant.redirect_uri != *redirect_uri {
            return Err(oauth_error(
                400,
                "invalid_grant",
                "redirect_uri differs from the authorization request's",
            ));
        }
        let computed = digest(verifier);
        if !pkce_shaped(verifier) || !same(&computed, &grant.challenge) {
            return Err(oauth_error(
                400,
                "invalid_grant",
                "code_verifier does not match the code_challenge",
            ));
        }
        if form.get("resource").is_some_and(|r| *r != grant.resource) {
            return Err(oauth_error(
                400,
                "invalid_target",
                "resource differs from the authorization request's",
            ));
        }
        Ok((*grant).clone())
    }

    fn refresh_grant(
        &self,
        form: &std::collections::HashMap<String, String>,
        client_id: &str,
    ) -> Result<Grant, DevResponse> {
        let Some(token) = form.get("refresh_token") else {
            return Err(oauth_error(
                400,
                "invalid_request",
                "refresh_token is required",
            ));
        };
        // One-time: rotated on every use.
        let Some(grant) = self.refresh.remove(&digest(token)) else {
            return Err(oauth_error(
                400,
                "invalid_grant",
                "the refresh token is unknown, used or expired",
            ));
        };
        if grant.client_id != client_id {
            return Err(oauth_error(
                400,
                "invalid_grant",
                "the refresh token was issued to another client",
            ));
        }
        if form.get("resource").is_some_and(|r| *r != grant.resource) {
            return Err(oauth_error(
                400,
                "invalid_target",
                "resource differs from the original grant's",
            ));
        }
        let mut grant = (*grant).clone();
        if let Some(raw) = form.get("scope") {
            match scope_list(raw) {
                Some(narrower) if narrower.iter().all(|s| grant.scopes.contains(s)) => {
                    grant.scopes = narrower;
                }
                _ => {
                    return Err(oauth_error(
                        400,
                        "invalid_scope",
                        "scope may only narrow the original grant",
                    ))
                }
            }
        }
        Ok(grant)
    }

    /// An access token for `grant`, and a fresh refresh token standing for it.
    fn issue(&self, grant: Grant) -> DevResponse {
        let req = DevTokenRequest {
            subject: grant.subject.clone(),
            scopes: grant.scopes.clone(),
            ttl_secs: ACCESS_TTL.as_secs(),
            org: grant.org.clone(),
        };
        let access = match self.signer.mint(&req, &grant.client_id) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "dev authorization server could not sign a token");
                return oauth_error(500, "server_error", "could not sign the token");
            }
        };
        let refresh = random_token();
        let scope = grant.scopes.join(" ");
        self.refresh.insert(digest(&refresh), Arc::new(grant));
        api_json(
            200,
            &json!({
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": ACCESS_TTL.as_secs(),
                "refresh_token": refresh,
                "scope": scope,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escape_covers_markup_and_quotes() {
        assert_eq!(
            html_escape(r#"<a href="x" onclick='y'>&</a>"#),
            "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;&lt;/a&gt;"
        );
    }

    #[test]
    fn redirects_are_https_or_loopback_http() {
        for ok in [
            "https://app.example.com/cb",
            "http://127.0.0.1:3000/cb",
            "http://127.9.9.9/cb",
            "http://localhost/cb",
            "http://[::1]:8080/cb",
        ] {
            assert!(redirect_allowed(ok), "{ok}");
        }
        for bad in [
            "http://example.com/cb",
            "http://10.0.0.1/cb",
            "https://app.example.com/cb#x",
            "https://user:pw@app.example.com/cb",
            "ftp://127.0.0.1/cb",
            "javascript:alert(1)",
            "/relative",
        ] {
            assert!(!redirect_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn repeated_parameters_are_refused() {
        assert!(params(b"a=1&b=2").is_some());
        assert!(params(b"a=1&a=2").is_none());
    }

    #[test]
    fn pkce_values_have_rfc7636_shape() {
        assert!(pkce_shaped(&"a".repeat(43)));
        assert!(!pkce_shaped(&"a".repeat(42)));
        assert!(!pkce_shaped(&"a".repeat(129)));
        assert!(!pkce_shaped(&format!("{}+", "a".repeat(43))));
    }
}
