//! Configuration: the TOML file plus environment overrides, checked once at startup and turned
//! into [`Settings`], the typed values the rest of keygate runs on.
//!
//! Every problem is collected and reported together, each naming the option or the variable
//! that caused it. Secrets are kept in [`SecretString`] and never printed.

pub mod file;
mod source;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use ipnet::IpNet;
use jsonwebtoken::Algorithm;
use secrecy::SecretString;
use url::Url;

pub use file::{Env, FileConfig, ProcessEnv};
pub use source::placeholder_marker;

/// One problem in the configuration, naming what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The option (`upstream.url`) or variable (`KEYGATE_UPSTREAM`) at fault.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Every problem found, in the order found.
#[derive(Debug, Default, Clone)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Record a problem.
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration problem(s):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub resource: ResourceSettings,
    pub auth: AuthSettings,
    pub clerk: Option<ClerkSettings>,
    pub issuers: Vec<IssuerSettings>,
    pub jwks: JwksSettings,
    pub cors: CorsSettings,
    pub log: LogSettings,
    pub dev: Option<DevSettings>,
    pub keys: KeysSettings,
    pub redis: Option<RedisConfig>,
    pub policy: PolicySettings,
    pub rate_limits: RateLimitSettings,
}

/// MCP transport checks and authorization rules.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub max_body_bytes: u64,
    pub inspect_max_bytes: usize,
    /// Accepted `MCP-Protocol-Version` values; empty = any.
    pub protocol_versions: Vec<String>,
    pub bind_sessions: bool,
    pub session_ttl: Duration,
    /// Paths whose POST bodies are JSON-RPC to inspect.
    pub mcp_paths: Vec<String>,
    /// Configured rules, then the built-in Twenty rules when `default_scopes = "twenty"`.
    pub scope_rules: crate::policy::mcp::ScopeRules,
    pub org: crate::policy::mcp::OrgRulesConfig,
    /// `[[policy.rules]]` and `policy.email_domains`, compiled.
    pub rules: crate::policy::rules::Rules,
    /// The clock rules read (the system's; tests set a fixed one).
    pub clock: crate::policy::rules::Clock,
    /// The per-client-IP failed-authentication budget.
    pub auth_failures: crate::policy::auth_failures::AuthFailuresSettings,
}

/// What a rate-limit rule counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKey {
    User,
    Org,
    Ip,
}

impl RateKey {
    /// The label used in limiter keys.
    pub fn as_str(self) -> &'static str {
        match self {
            RateKey::User => "user",
            RateKey::Org => "org",
            RateKey::Ip => "ip",
        }
    }
}

/// One validated rate-limit rule.
#[derive(Debug, Clone)]
pub struct RateRule {
    pub name: String,
    pub per: RateKey,
    pub requests: u32,
    pub period: Duration,
    pub burst: u32,
    pub paths: Vec<String>,
    pub tools: Vec<String>,
    pub cost: u32,
}

/// What to do with rate limits when Redis fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisFailure {
    Local,
    Allow,
    Deny,
}

/// Rate limiting.
#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    pub enabled: bool,
    pub use_redis: bool,
    pub on_redis_error: RedisFailure,
    pub rules: Vec<RateRule>,
}

/// Where a value goes in the upstream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InjectTarget {
    /// A query parameter of this name.
    Query(String),
    /// A header; `{key}` in the template is replaced by the value.
    Header {
        name: http::HeaderName,
        template: String,
    },
}

impl InjectTarget {
    /// The query parameter name, when the target is one.
    pub fn query_name(&self) -> Option<&str> {
        match self {
            InjectTarget::Query(q) => Some(q),
            InjectTarget::Header { .. } => None,
        }
    }

    /// The header name, when the target is one.
    pub fn header_name(&self) -> Option<&http::HeaderName> {
        match self {
            InjectTarget::Header { name, .. } => Some(name),
            InjectTarget::Query(_) => None,
        }
    }
}

/// How the user's key and base URL are injected into upstream requests.
#[derive(Debug, Clone, Default)]
pub struct InjectSettings {
    pub api_key: Option<InjectTarget>,
    pub base_url: Option<InjectTarget>,
}

/// The key vault.
#[derive(Debug, Clone)]
pub struct KeysSettings {
    pub enabled: bool,
    /// Built from the secrets during validation (a weak secret is a config problem).
    pub keyring: Option<std::sync::Arc<crate::keys::crypto::Keyring>>,
    pub data_dir: PathBuf,
    pub encryption_secret: Option<SecretString>,
    pub previous_encryption_secrets: Vec<SecretString>,
    pub org_keys: bool,
    /// The issuer whose users' key slots are named by subject alone, as they were before slots
    /// named the issuer (see [`crate::keys::store::Owner::of`]); `None`: every slot is qualified.
    pub legacy_slot_issuer: Option<String>,
    pub fallback_api_key: Option<SecretString>,
    pub default_base_url: Option<String>,
    pub allowed_base_url_hosts: Vec<String>,
    pub max_key_bytes: usize,
    pub max_body_bytes: usize,
    pub cache_ttl: Duration,
    pub cache_max_entries: u64,
}

/// The shared Redis key store.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub cluster: bool,
    pub key_prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub threads: usize,
    pub h2c: bool,
    pub request_header_timeout: Duration,
    pub keepalive_timeout: Duration,
    /// Request head to the whole body, for bodies read before forwarding.
    pub body_timeout: Duration,
    /// Longest gap between two chunks of a streamed request body.
    pub body_idle_timeout: Duration,
    /// Longest a write to the client may wait.
    pub send_timeout: Duration,
    pub trusted_proxies: Vec<IpNet>,
    pub grace_period: Duration,
    pub shutdown_timeout: Duration,
    pub tls: Option<TlsSettings>,
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The certificate and key, loaded and matched (present whenever the settings are valid).
    pub server_config: Option<Arc<rustls::ServerConfig>>,
    /// Problems that do not stop keygate (an expired or not yet valid certificate).
    pub warnings: Vec<String>,
}

/// A loaded listener certificate and key, with warnings that do not stop keygate.
type LoadedTls = (Arc<rustls::ServerConfig>, Vec<String>);

/// Load the public listener's certificate chain and key and check that they belong together;
/// an error names the option at fault. Warns on a certificate outside its validity period.
fn load_tls(cert_file: &Path, key_file: &Path) -> Result<LoadedTls, (&'static str, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    const CERT: &str = "server.tls.cert_file";
    const KEY: &str = "server.tls.key_file";
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            (
                CERT,
                format!("{}: not a PEM certificate: {e}", cert_file.display()),
            )
        })?;
    let Some(leaf) = certs.first() else {
        return Err((
            CERT,
            format!("{}: no PEM certificate found", cert_file.display()),
        ));
    };
    let mut warnings = Vec::new();
    match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, parsed)) => {
            let validity = parsed.validity();
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if now > validity.not_after.timestamp() {
                warnings.push(format!(
                    "{CERT}: the certificate expired on {}",
                    validity.not_after
                ));
            } else if now < validity.not_before.timestamp() {
                warnings.push(format!(
                    "{CERT}: the certificate is not valid before {}",
                    validity.not_before
                ));
            }
        }
        Err(e) => {
            return Err((
                CERT,
                format!(
                    "{}: not a valid X.509 certificate: {e}",
                    cert_file.display()
                ),
            ))
        }
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        (
            KEY,
            format!("{}: no PEM private key found: {e}", key_file.display()),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| (CERT, format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            (
                KEY,
                format!(
                    "{}: cannot be used with the certificate in {CERT}: {e}",
                    key_file.display()
                ),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), warnings))
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub url: Url,
    pub tls: bool,
    /// Host name for SNI and the `Host` header.
    pub host: String,
    /// `host[:port]` as it goes in the `Host` header, built once.
    pub host_header: http::HeaderValue,
    /// Resolved once at startup; nothing resolves names on the request path.
    pub addr: SocketAddr,
    /// Path prefix of the upstream URL, without a trailing slash ("" for the root).
    pub base_path: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub preserve_host: bool,
    pub verify_tls: bool,
    pub inject: InjectSettings,
}

#[derive(Debug, Clone)]
pub struct ResourceSettings {
    /// The canonical resource URL (`MCP_SERVER_URL`), the `aud` access tokens must carry.
    pub url: String,
    pub protected_paths: Vec<String>,
    pub scopes_supported: Vec<String>,
    pub resource_name: Option<String>,
    pub documentation: Option<String>,
    /// Where this resource's RFC 9728 document is served, for `WWW-Authenticate`.
    pub metadata_url: String,
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub enabled: bool,
    pub required: bool,
    pub max_token_bytes: usize,
    pub leeway: Duration,
    pub verified_cache_max_entries: u64,
    pub session_token_paths: Vec<String>,
    pub identity_headers: IdentityHeaders,
}

/// Header names that carry the verified identity upstream; `None` = not sent.
#[derive(Debug, Clone, Default)]
pub struct IdentityHeaders {
    pub user: Option<http::HeaderName>,
    pub org: Option<http::HeaderName>,
    pub scopes: Option<http::HeaderName>,
    pub token_kind: Option<http::HeaderName>,
    /// The issuer that vouched for the user: identity is (issuer, subject).
    pub issuer: Option<http::HeaderName>,
}

impl IdentityHeaders {
    /// Every configured name, so client-sent copies can be stripped.
    pub fn names(&self) -> impl Iterator<Item = &http::HeaderName> {
        [
            &self.user,
            &self.org,
            &self.scopes,
            &self.token_kind,
            &self.issuer,
        ]
        .into_iter()
        .flatten()
    }
}

#[derive(Debug, Clone)]
pub struct ClerkSettings {
    /// Frontend API base, e.g. `https://clerk.example.com`; also the token issuer.
    pub frontend_api: Url,
    pub issuer: String,
    pub jwks_url: Url,
    pub api_url: Url,
    pub secret_key: Option<SecretString>,
    pub authorized_parties: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub audiences: Vec<String>,
    pub oauth_opaque_tokens: bool,
    pub m2m_tokens: bool,
    pub api_keys: bool,
    pub opaque_negative_ttl: Duration,
    pub opaque_max_ttl: Duration,
    pub backend_timeout: Duration,
    /// Backend API calls in flight at once, at most (>= 1).
    pub backend_max_in_flight: usize,
    /// Backend API calls started: `backend_rate_per_sec` per second, bursts of `backend_burst`.
    pub backend_rate: crate::policy::ratelimit::Quota,
    /// The longest a call waits for a slot; never more than `backend_timeout`.
    pub backend_max_wait: Duration,
    /// Where Clerk tokens carry each fact (unset: Clerk's own claims).
    pub claims: crate::auth::claims::ClaimMap,
}

#[derive(Debug, Clone)]
pub enum KeySource {
    /// Fetched from this URL and refreshed.
    Url(Url),
    /// Discovered from `{issuer}/.well-known/openid-configuration` at startup.
    Discovery,
    /// A static JWKS document read at startup.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct IssuerSettings {
    pub issuer: String,
    pub keys: KeySource,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    /// Where this issuer's tokens carry each fact.
    pub claims: crate::auth::claims::ClaimMap,
}

#[derive(Debug, Clone)]
pub struct JwksSettings {
    pub refresh_interval: Duration,
    pub unknown_kid_cooldown: Duration,
    pub max_stale: Duration,
    pub fetch_timeout: Duration,
    pub max_bytes: usize,
    pub max_keys: usize,
}

#[derive(Debug, Clone)]
pub struct CorsSettings {
    pub allowed_origins: Vec<String>,
    pub allow_any_origin: bool,
    pub max_age: Duration,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub json: bool,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct DevSettings {
    pub issuer: String,
    pub signing_key_file: PathBuf,
    pub kid: String,
    /// Serve the dev issuer as an OAuth 2.1 authorization server (see `auth::dev_issuer`).
    pub authorization_server: bool,
}

/// The request paths the dev issuer's own paths must stay clear of.
fn mcp_and_keys_paths(mcp_paths: &[String]) -> Vec<String> {
    let mut paths: Vec<String> = mcp_paths
        .iter()
        .filter_map(|p| crate::proxy::route::normal_config_path(p))
        .collect();
    paths.push(crate::proxy::route::KEYS_PATH.to_string());
    paths
}

/// The dev authorization server mints tokens for anyone who asks: it runs only where nothing
/// else is trusted (no Clerk, no issuer but the dev one) and, unless `dev.allow_non_loopback`
/// says otherwise, only on a loopback listener.
fn check_dev_authorization_server(
    d: &file::DevFile,
    dev: Option<&DevSettings>,
    clerk: bool,
    issuers: &[IssuerSettings],
    listen: Option<&SocketAddr>,
    reserved: &[String],
    problems: &mut Problems,
) {
    const FIELD: &str = "dev.authorization_server";
    if clerk {
        problems.push(
            FIELD,
            "is refused while Clerk is configured ([clerk]): the dev authorization server signs \
             tokens for anyone and is for offline development only",
        );
    }
    for i in issuers.iter().filter(|i| i.issuer != d.issuer) {
        problems.push(
            FIELD,
            format!(
                "is refused while another issuer is trusted ([[issuers]] {:?}): the dev \
                 authorization server is for offline development only",
                i.issuer
            ),
        );
    }
    if !issuers.iter().any(|i| i.issuer == d.issuer) {
        problems.push(
            FIELD,
            format!(
                "needs an [[issuers]] entry for the dev issuer {:?} (jwks_file = the dev JWKS), \
                 or keygate refuses the tokens it issues",
                d.issuer
            ),
        );
    }
    if let Some(addr) = listen {
        if !addr.ip().is_loopback() && !d.allow_non_loopback {
            problems.push(
                FIELD,
                format!(
                    "is refused on server.listen {addr}, which is not a loopback address: set \
                     dev.allow_non_loopback = true to serve it there anyway"
                ),
            );
        }
    }
    match Url::parse(&d.issuer) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && u.query().is_none()
                && u.fragment().is_none() =>
        {
            let path = u.path().trim_end_matches('/');
            let normal = crate::proxy::route::normal_config_path(path);
            let clear = normal.as_deref().is_some_and(|n| {
                n == path
                    && !reserved
                        .iter()
                        .any(|r| n.starts_with(r.as_str()) || r.starts_with(n))
            });
            if path.is_empty() || !clear {
                problems.push(
                    "dev.issuer",
                    format!(
                        "{:?} must have a lowercase path of its own (like /dev-issuer), apart \
                         from the MCP paths and /api/keys, to serve the authorization server",
                        d.issuer
                    ),
                );
            }
        }
        _ => problems.push(
            "dev.issuer",
            format!(
                "{:?} is not an http(s) URL without query or fragment",
                d.issuer
            ),
        ),
    }
    if let Some(dev) = dev {
        if let Err(e) = crate::devtoken::DevSigner::load(dev, "") {
            problems.push("dev.signing_key_file", e.to_string());
        }
    }
}

/// Read the file (when given), apply the environment, validate.
pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Settings, Problems> {
    let mut problems = Problems::default();
    let mut file = match path {
        None => FileConfig::default(),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => match source::parse_file(p, &text, &mut problems) {
                Some(f) => f,
                None => return Err(problems),
            },
            Err(e) => {
                problems.push(p.display().to_string(), format!("cannot read: {e}"));
                return Err(problems);
            }
        },
    };
    let base_dir = path
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    file.apply_env(env, &mut problems);
    source::refuse_placeholders(&file, env, &mut problems);
    let settings = validate(file, &base_dir, &mut problems);
    match settings {
        Some(s) if problems.0.is_empty() => Ok(s),
        _ => Err(problems),
    }
}

fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

fn parse_addr(field: &str, raw: &str, problems: &mut Problems) -> Option<SocketAddr> {
    match raw.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(field, format!("{raw:?} is not an ip:port address"));
            None
        }
    }
}

fn parse_http_url(field: &str, raw: &str, problems: &mut Problems) -> Option<Url> {
    match Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Some(u),
        Ok(_) => {
            problems.push(field, format!("{raw:?} must be an http(s) URL with a host"));
            None
        }
        Err(e) => {
            problems.push(field, format!("{raw:?} is not a URL: {e}"));
            None
        }
    }
}

fn parse_algorithms(field: &str, raw: &[String], problems: &mut Problems) -> Vec<Algorithm> {
    let mut out = Vec::new();
    for name in raw {
        match name.as_str() {
            "RS256" => out.push(Algorithm::RS256),
            "RS384" => out.push(Algorithm::RS384),
            "RS512" => out.push(Algorithm::RS512),
            "PS256" => out.push(Algorithm::PS256),
            "PS384" => out.push(Algorithm::PS384),
            "PS512" => out.push(Algorithm::PS512),
            "ES256" => out.push(Algorithm::ES256),
            "ES384" => out.push(Algorithm::ES384),
            "EdDSA" => out.push(Algorithm::EdDSA),
            other => problems.push(
                field,
                format!("{other:?} is not an allowed algorithm (asymmetric only: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"),
            ),
        }
    }
    if raw.is_empty() {
        problems.push(field, "at least one algorithm is required");
    }
    out
}

/// Headers keygate owns or the transport owns: never configurable as carriers.
const RESERVED_HEADERS: [&str; 4] = ["cookie", "host", "content-length", "transfer-encoding"];

fn parse_header_name(
    field: &str,
    raw: &Option<String>,
    problems: &mut Problems,
) -> Option<http::HeaderName> {
    parse_header_name_allowing(field, raw, &[], problems)
}

fn parse_header_name_allowing(
    field: &str,
    raw: &Option<String>,
    allowed: &[&str],
    problems: &mut Problems,
) -> Option<http::HeaderName> {
    let raw = raw.as_deref()?.trim();
    if raw.is_empty() {
        return None;
    }
    match http::HeaderName::from_bytes(raw.as_bytes()) {
        Ok(h) => {
            let reserved =
                RESERVED_HEADERS.contains(&h.as_str()) || h == http::header::AUTHORIZATION;
            if reserved && !allowed.contains(&h.as_str()) {
                problems.push(field, format!("{raw:?} cannot be used here"));
                return None;
            }
            Some(h)
        }
        Err(_) => {
            problems.push(field, format!("{raw:?} is not a valid header name"));
            None
        }
    }
}

fn parse_target(
    field: &str,
    query: &Option<String>,
    header: &Option<String>,
    template: &str,
    problems: &mut Problems,
) -> Option<InjectTarget> {
    let query = query.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let header = header.as_deref().map(str::trim).filter(|h| !h.is_empty());
    match (query, header) {
        (Some(_), Some(_)) => {
            problems.push(field, "set a query parameter or a header, not both");
            None
        }
        (Some(q), None) => {
            if q.contains(['&', '=', '#', ' ']) {
                problems.push(field, format!("{q:?} is not a plain query parameter name"));
                return None;
            }
            Some(InjectTarget::Query(q.to_string()))
        }
        (None, Some(h)) => {
            // Authorization is the usual home of an upstream API key.
            let name = parse_header_name_allowing(
                field,
                &Some(h.to_string()),
                &["authorization"],
                problems,
            )?;
            if !template.contains("{key}") {
                problems.push(field, "the template must contain {key}");
                return None;
            }
            Some(InjectTarget::Header {
                name,
                template: template.to_string(),
            })
        }
        (None, None) => None,
    }
}

fn parse_inject(f: &file::InjectFile, problems: &mut Problems) -> InjectSettings {
    InjectSettings {
        api_key: parse_target(
            "upstream.inject.api_key_*",
            &f.api_key_query,
            &f.api_key_header,
            &f.api_key_template,
            problems,
        ),
        base_url: parse_target(
            "upstream.inject.base_url_*",
            &f.base_url_query,
            &f.base_url_header,
            "{key}",
            problems,
        ),
    }
}

/// `keys.legacy_slot_issuer`: as set (empty for none, else a trusted issuer), or by default
/// Clerk's issuer when Clerk is configured, else the issuer when exactly one is trusted — the
/// issuer whose records were written as `user:<sub>` before slots named the issuer.
fn legacy_slot_issuer(
    set: Option<&str>,
    clerk: Option<&str>,
    issuers: &[IssuerSettings],
    problems: &mut Problems,
) -> Option<String> {
    let trusted: Vec<&str> = clerk
        .into_iter()
        .chain(issuers.iter().map(|i| i.issuer.as_str()))
        .collect();
    match set {
        Some("") => None,
        Some(s) if trusted.contains(&s) => Some(s.to_string()),
        Some(s) => {
            problems.push(
                "keys.legacy_slot_issuer",
                format!("{s:?} is not a trusted issuer (Clerk's or an [[issuers]] entry's)"),
            );
            None
        }
        None => match (clerk, trusted.as_slice()) {
            (Some(c), _) => Some(c.to_string()),
            (None, [only]) => Some(only.to_string()),
            _ => None,
        },
    }
}

/// A `claims` table as a [`ClaimMap`](crate::auth::claims::ClaimMap); a path that does not
/// parse is a problem naming the option.
fn claim_map(
    field: &str,
    f: &file::ClaimsFile,
    problems: &mut Problems,
) -> crate::auth::claims::ClaimMap {
    use crate::auth::claims::ClaimPath;
    let mut path = |name: &str, raw: &Option<file::ClaimPathFile>| {
        let parsed = match raw.as_ref()? {
            file::ClaimPathFile::Path(p) => ClaimPath::parse(p),
            file::ClaimPathFile::Segments(s) => ClaimPath::from_segments(s.clone()),
        };
        parsed
            .map_err(|e| problems.push(format!("{field}.{name}"), format!("the claim path {e}")))
            .ok()
    };
    crate::auth::claims::ClaimMap {
        user_id: path("user_id", &f.user_id),
        org_id: path("org_id", &f.org_id),
        org_role: path("org_role", &f.org_role),
        roles: path("roles", &f.roles),
        email: path("email", &f.email),
        email_verified: path("email_verified", &f.email_verified),
        scopes: path("scopes", &f.scopes),
    }
}

/// Configured request paths in the normal form the route decision compares against
/// (`proxy::route`); a path that has none is a problem naming the option.
/// Configured paths in their normal form (see `proxy::route`); a path that has none is a
/// problem naming `field`.
pub(crate) fn normal_paths(problems: &mut Problems, field: &str, raw: &[String]) -> Vec<String> {
    raw.iter()
        .filter_map(|p| {
            let normal = crate::proxy::route::normal_config_path(p);
            if normal.is_none() {
                problems.push(
                    field.to_string(),
                    format!("{p:?} must be an absolute path without dot segments, encoded separators, query or fragment"),
                );
            }
            normal
        })
        .collect()
}

fn resolve_path(base: &Path, raw: &str) -> PathBuf {
    let p = PathBuf::from(raw);
    if p.is_absolute() || p.exists() {
        p
    } else {
        base.join(p)
    }
}

/// The Frontend API host encoded in a Clerk publishable key (`pk_test_<base64("host$")>`).
pub fn frontend_api_from_publishable_key(pk: &str) -> Option<String> {
    let encoded = pk
        .strip_prefix("pk_test_")
        .or_else(|| pk.strip_prefix("pk_live_"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded))
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let host = text.strip_suffix('$').unwrap_or(&text);
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        return None;
    }
    Some(host.to_string())
}

/// Two listen addresses that would end up on one socket: Pingora shares a socket between
/// listeners with the same address, and a wildcard address overlaps every IP on its port.
/// Port 0 (any free port) collides only with the identical address.
fn listeners_collide(a: &SocketAddr, b: &SocketAddr) -> bool {
    if a == b {
        return true;
    }
    a.port() != 0 && a.port() == b.port() && (a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn validate(f: FileConfig, base: &Path, problems: &mut Problems) -> Option<Settings> {
    // [server]
    let listen = parse_addr("server.listen (KEYGATE_LISTEN)", &f.server.listen, problems);
    let admin_listen = parse_addr(
        "server.admin_listen (KEYGATE_ADMIN_LISTEN)",
        &f.server.admin_listen,
        problems,
    );
    if let (Some(public), Some(admin)) = (&listen, &admin_listen) {
        if listeners_collide(public, admin) {
            problems.push(
                "server.admin_listen (KEYGATE_ADMIN_LISTEN)",
                format!(
                    "must not share a port with server.listen ({public}): /metrics and /ready \
                     would be served on the public listener"
                ),
            );
        }
    }
    if f.server.threads == 0 {
        problems.push("server.threads", "must be at least 1");
    }
    for (name, value) in [
        (
            "server.request_header_timeout_secs",
            f.server.request_header_timeout_secs,
        ),
        ("server.body_timeout_secs", f.server.body_timeout_secs),
        (
            "server.body_idle_timeout_secs",
            f.server.body_idle_timeout_secs,
        ),
        ("server.send_timeout_secs", f.server.send_timeout_secs),
    ] {
        if value == 0 {
            problems.push(name, "must be at least 1");
        }
    }
    let mut trusted_proxies = Vec::new();
    for raw in &f.server.trusted_proxies {
        let parsed = raw
            .parse::<IpNet>()
            .or_else(|_| raw.parse::<IpAddr>().map(IpNet::from));
        match parsed {
            Ok(n) => trusted_proxies.push(n),
            Err(_) => problems.push(
                "server.trusted_proxies",
                format!("{raw:?} is not an IP address or CIDR"),
            ),
        }
    }
    let tls = f.server.tls.as_ref().map(|t| {
        let cert_file = resolve_path(base, &t.cert_file);
        let key_file = resolve_path(base, &t.key_file);
        if !cert_file.is_file() {
            problems.push(
                "server.tls.cert_file",
                format!("{} does not exist", cert_file.display()),
            );
        }
        if !key_file.is_file() {
            problems.push(
                "server.tls.key_file",
                format!("{} does not exist", key_file.display()),
            );
        }
        let mut server_config = None;
        let mut warnings = Vec::new();
        if cert_file.is_file() && key_file.is_file() {
            match load_tls(&cert_file, &key_file) {
                Ok((config, w)) => {
                    server_config = Some(config);
                    warnings = w;
                }
                Err((option, problem)) => problems.push(option, problem),
            }
        }
        TlsSettings {
            cert_file,
            key_file,
            server_config,
            warnings,
        }
    });

    // [upstream]
    let upstream = parse_http_url("upstream.url (KEYGATE_UPSTREAM)", &f.upstream.url, problems)
        .and_then(|url| {
            let tls = url.scheme() == "https";
            let host = url.host_str()?.trim_matches(['[', ']']).to_string();
            let port = url.port_or_known_default()?;
            let authority = match url.port() {
                Some(p) => format!("{}:{p}", url.host_str()?),
                None => url.host_str()?.to_string(),
            };
            let addr = match std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port)) {
                Ok(mut it) => it.next(),
                Err(_) => None,
            };
            let Some(addr) = addr else {
                problems.push(
                    "upstream.url (KEYGATE_UPSTREAM)",
                    format!("cannot resolve {host:?}"),
                );
                return None;
            };
            if url.query().is_some() || url.fragment().is_some() {
                problems.push(
                    "upstream.url (KEYGATE_UPSTREAM)",
                    "must not carry a query or fragment",
                );
            }
            let base_path = url.path().trim_end_matches('/').to_string();
            let Ok(host_header) = http::HeaderValue::from_str(&authority) else {
                problems.push(
                    "upstream.url (KEYGATE_UPSTREAM)",
                    "host is not valid in a Host header",
                );
                return None;
            };
            Some(UpstreamSettings {
                tls,
                host,
                host_header,
                addr,
                base_path,
                url,
                connect_timeout: secs(f.upstream.connect_timeout_secs.max(1)),
                read_timeout: secs(f.upstream.read_timeout_secs.max(1)),
                write_timeout: secs(f.upstream.write_timeout_secs.max(1)),
                idle_timeout: secs(f.upstream.idle_timeout_secs),
                preserve_host: f.upstream.preserve_host,
                verify_tls: f.upstream.verify_tls,
                inject: InjectSettings::default(),
            })
        });
    let inject = parse_inject(&f.upstream.inject, problems);
    let upstream = upstream.map(|mut u| {
        u.inject = inject;
        u
    });

    // [resource]
    let resource_url = if f.resource.url.is_empty() {
        match listen {
            Some(a) => format!("http://localhost:{}/mcp", a.port()),
            None => String::new(),
        }
    } else {
        f.resource.url.clone()
    };
    let resource_parsed = parse_http_url("resource.url (MCP_SERVER_URL)", &resource_url, problems);
    if let Some(u) = &resource_parsed {
        if u.fragment().is_some() {
            problems.push(
                "resource.url (MCP_SERVER_URL)",
                "must not carry a fragment (RFC 8707)",
            );
        }
    }
    for p in &f.resource.protected_paths {
        if !p.starts_with('/') || p.contains(['?', '#']) {
            problems.push(
                "resource.protected_paths",
                format!("{p:?} must be a path starting with /"),
            );
        }
    }
    let metadata_url = resource_parsed
        .as_ref()
        .map(|u| {
            let mut origin = u.origin().ascii_serialization();
            origin.push_str("/.well-known/oauth-protected-resource");
            let path = u.path().trim_end_matches('/');
            if !path.is_empty() {
                origin.push_str(path);
            }
            origin
        })
        .unwrap_or_default();

    // [auth]
    if f.auth.max_token_bytes < 64 || f.auth.max_token_bytes > 1024 * 1024 {
        problems.push("auth.max_token_bytes", "must be between 64 and 1048576");
    }
    if f.auth.leeway_secs > 60 {
        problems.push("auth.leeway_secs", "must be at most 60 seconds");
    }
    let ih = &f.auth.identity_headers;
    let identity_headers = IdentityHeaders {
        user: parse_header_name("auth.identity_headers.user", &ih.user, problems),
        org: parse_header_name("auth.identity_headers.org", &ih.org, problems),
        scopes: parse_header_name("auth.identity_headers.scopes", &ih.scopes, problems),
        token_kind: parse_header_name("auth.identity_headers.token_kind", &ih.token_kind, problems),
        issuer: parse_header_name("auth.identity_headers.issuer", &ih.issuer, problems),
    };

    // [clerk]
    let clerk = f.clerk.as_ref().and_then(|c| {
        let fapi_raw = if let Some(u) = &c.frontend_api_url {
            Some((u.clone(), "clerk.frontend_api_url (CLERK_FRONTEND_API_URL)"))
        } else if let Some(d) = &c.domain {
            let d = d.trim_end_matches('/');
            let url = if d.starts_with("http://") || d.starts_with("https://") {
                d.to_string()
            } else {
                format!("https://{d}")
            };
            Some((url, "clerk.domain (CLERK_DOMAIN)"))
        } else if let Some(pk) = &c.publishable_key {
            match frontend_api_from_publishable_key(pk) {
                Some(host) => Some((
                    format!("https://{host}"),
                    "clerk.publishable_key (CLERK_PUBLISHABLE_KEY)",
                )),
                None => {
                    problems.push(
                        "clerk.publishable_key (CLERK_PUBLISHABLE_KEY)",
                        "is not a Clerk publishable key (pk_test_… or pk_live_…)",
                    );
                    return None;
                }
            }
        } else {
            problems.push(
                "clerk",
                "set one of publishable_key (CLERK_PUBLISHABLE_KEY), domain (CLERK_DOMAIN) or frontend_api_url (CLERK_FRONTEND_API_URL)",
            );
            return None;
        };
        let (raw, field) = fapi_raw?;
        let frontend_api = parse_http_url(field, raw.trim_end_matches('/'), problems)?;
        let issuer = frontend_api.as_str().trim_end_matches('/').to_string();
        let jwks_url = Url::parse(&format!("{issuer}/.well-known/jwks.json")).ok()?;
        let api_url = parse_http_url("clerk.api_url (CLERK_API_URL)", &c.api_url, problems)?;
        let secret_key = c.secret_key.clone().map(SecretString::from);
        let wants_backend = c.oauth_opaque_tokens || c.m2m_tokens || c.api_keys;
        if secret_key.is_none() && (c.m2m_tokens || c.api_keys) {
            problems.push(
                "clerk.secret_key (CLERK_SECRET_KEY)",
                "is required to verify M2M tokens and API keys",
            );
        }
        let algorithms = parse_algorithms("clerk.algorithms", &c.algorithms, problems);
        let audiences = if c.audiences.is_empty() {
            vec![resource_url.clone()]
        } else {
            c.audiences.clone()
        };
        let backend_timeout = Duration::from_millis(c.backend_timeout_ms.max(1));
        let backend_max_wait = Duration::from_millis(c.backend_max_wait_ms);
        if backend_max_wait > backend_timeout {
            problems.push(
                "clerk.backend_max_wait_ms",
                format!(
                    "{} is longer than clerk.backend_timeout_ms ({}): a call never waits longer than the timeout",
                    c.backend_max_wait_ms, c.backend_timeout_ms
                ),
            );
        }
        if c.backend_max_in_flight == 0 {
            problems.push("clerk.backend_max_in_flight", "must be at least 1");
        }
        let backend_rate = crate::policy::ratelimit::Quota::new(
            c.backend_rate_per_sec,
            Duration::from_secs(1),
            c.backend_burst,
        )
        .map_err(|e| {
            problems.push(
                "clerk.backend_rate_per_sec / clerk.backend_burst",
                format!("both must be at least 1 ({e})"),
            )
        })
        .ok()?;
        Some(ClerkSettings {
            frontend_api,
            issuer,
            jwks_url,
            api_url,
            oauth_opaque_tokens: c.oauth_opaque_tokens && secret_key.is_some() && wants_backend,
            secret_key,
            authorized_parties: c
                .authorized_parties
                .iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect(),
            algorithms,
            audiences,
            m2m_tokens: c.m2m_tokens,
            api_keys: c.api_keys,
            opaque_negative_ttl: secs(c.opaque_negative_ttl_secs),
            opaque_max_ttl: secs(c.opaque_max_ttl_secs.max(1)),
            backend_timeout,
            backend_max_in_flight: usize::try_from(c.backend_max_in_flight.max(1))
                .unwrap_or(usize::MAX),
            backend_rate,
            backend_max_wait: backend_max_wait.min(backend_timeout),
            claims: claim_map("clerk.claims", &c.claims, problems),
        })
    });

    // [[issuers]]
    let mut issuers = Vec::new();
    for (i, iss) in f.issuers.iter().enumerate() {
        let field = format!("issuers[{i}]");
        if iss.issuer.is_empty() {
            problems.push(format!("{field}.issuer"), "is required");
            continue;
        }
        if iss.issuer.contains('|') {
            // `|` separates issuer and subject in key slots, limiter keys and session bindings.
            problems.push(format!("{field}.issuer"), "must not contain '|'");
            continue;
        }
        let keys = match (&iss.jwks_url, &iss.jwks_file) {
            (Some(_), Some(_)) => {
                problems.push(&field, "set jwks_url or jwks_file, not both");
                continue;
            }
            (Some(u), None) => match parse_http_url(&format!("{field}.jwks_url"), u, problems) {
                Some(u) => KeySource::Url(u),
                None => continue,
            },
            (None, Some(p)) => {
                let path = resolve_path(base, p);
                if !path.is_file() {
                    problems.push(
                        format!("{field}.jwks_file"),
                        format!("{} does not exist", path.display()),
                    );
                }
                KeySource::File(path)
            }
            (None, None) => {
                if parse_http_url(&format!("{field}.issuer"), &iss.issuer, problems).is_none() {
                    continue;
                }
                KeySource::Discovery
            }
        };
        issuers.push(IssuerSettings {
            issuer: iss.issuer.clone(),
            keys,
            audiences: if iss.audiences.is_empty() {
                vec![resource_url.clone()]
            } else {
                iss.audiences.clone()
            },
            algorithms: parse_algorithms(&format!("{field}.algorithms"), &iss.algorithms, problems),
            claims: claim_map(&format!("{field}.claims"), &iss.claims, problems),
        });
    }
    if f.auth.enabled && clerk.is_none() && issuers.is_empty() && f.clerk.is_none() {
        problems.push(
            "auth",
            "authentication is enabled but no issuer is configured: add [clerk] (or CLERK_PUBLISHABLE_KEY) or [[issuers]], or set AUTH_ENABLED=false",
        );
    }
    {
        let mut seen = std::collections::HashSet::new();
        let all = clerk
            .iter()
            .map(|c| c.issuer.as_str())
            .chain(issuers.iter().map(|i| i.issuer.as_str()));
        for iss in all {
            if !seen.insert(iss) {
                problems.push("issuers", format!("issuer {iss:?} is configured twice"));
            }
        }
    }

    // [jwks]
    if f.jwks.max_keys == 0 || f.jwks.max_bytes < 256 {
        problems.push("jwks", "max_keys must be >= 1 and max_bytes >= 256");
    }

    // [cors]
    let mut allowed_origins = Vec::new();
    let mut allow_any_origin = false;
    for o in &f.cors.allowed_origins {
        if o == "*" {
            allow_any_origin = true;
            continue;
        }
        match Url::parse(o) {
            Ok(u) if u.origin().is_tuple() && (u.path() == "/" || u.path().is_empty()) => {
                allowed_origins.push(u.origin().ascii_serialization())
            }
            _ => problems.push(
                "cors.allowed_origins",
                format!("{o:?} is not an origin like https://app.example.com"),
            ),
        }
    }

    // [log]
    let json = match f.log.format.as_str() {
        "json" => true,
        "text" => false,
        other => {
            problems.push(
                "log.format (KEYGATE_LOG_FORMAT)",
                format!("{other:?} must be \"text\" or \"json\""),
            );
            false
        }
    };

    // [keys]
    let k = &f.keys;
    if k.enabled && k.encryption_secret.is_none() {
        problems.push(
            "keys.encryption_secret (API_KEY_ENCRYPTION_SECRET)",
            "is required while the key vault is enabled (or set keys.enabled = false)",
        );
    }
    let default_base_url = match &k.default_base_url {
        Some(raw) => parse_http_url("keys.default_base_url (TWENTY_BASE_URL)", raw, problems)
            .map(|u| u.as_str().trim_end_matches('/').to_string()),
        None => None,
    };
    let mut allowed_base_url_hosts: Vec<String> = k
        .allowed_base_url_hosts
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect();
    if allowed_base_url_hosts.is_empty() {
        let base = default_base_url
            .clone()
            .unwrap_or_else(|| "https://api.twenty.com".to_string());
        if let Some(host) = Url::parse(&base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
        {
            allowed_base_url_hosts.push(host.to_ascii_lowercase());
        }
    }
    if k.max_key_bytes == 0 || k.max_key_bytes > 64 * 1024 {
        problems.push("keys.max_key_bytes", "must be between 1 and 65536");
    }
    if k.max_body_bytes < 256 || k.max_body_bytes > 1024 * 1024 {
        problems.push("keys.max_body_bytes", "must be between 256 and 1048576");
    }
    let keyring = match (&k.encryption_secret, k.enabled) {
        (Some(active), true) => {
            let previous: Vec<&str> = k
                .previous_encryption_secrets
                .iter()
                .map(String::as_str)
                .collect();
            match crate::keys::crypto::Keyring::from_secrets(active, &previous) {
                Ok(ring) => Some(std::sync::Arc::new(ring)),
                Err(e) => {
                    problems.push(
                        "keys.encryption_secret (API_KEY_ENCRYPTION_SECRET)",
                        e.to_string(),
                    );
                    None
                }
            }
        }
        _ => None,
    };
    let keys = KeysSettings {
        enabled: k.enabled,
        keyring,
        data_dir: resolve_path(base, &k.data_dir),
        encryption_secret: k.encryption_secret.clone().map(SecretString::from),
        previous_encryption_secrets: k
            .previous_encryption_secrets
            .iter()
            .cloned()
            .map(SecretString::from)
            .collect(),
        org_keys: k.org_keys,
        legacy_slot_issuer: legacy_slot_issuer(
            k.legacy_slot_issuer.as_deref(),
            clerk.as_ref().map(|c| c.issuer.as_str()),
            &issuers,
            problems,
        ),
        fallback_api_key: k.fallback_api_key.clone().map(SecretString::from),
        default_base_url,
        allowed_base_url_hosts,
        max_key_bytes: k.max_key_bytes,
        max_body_bytes: k.max_body_bytes,
        cache_ttl: secs(k.cache_ttl_secs.max(1)),
        cache_max_entries: k.cache_max_entries.max(1),
    };
    let redis = f.redis.url.as_ref().map(|url| {
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://"))
        {
            problems.push(
                "redis.url (REDIS_URL)",
                "must start with redis:// or rediss://",
            );
        }
        RedisConfig {
            url: url.clone(),
            cluster: f.redis.cluster,
            key_prefix: f.redis.key_prefix.clone(),
            connect_timeout: Duration::from_millis(f.redis.connect_timeout_ms.max(1)),
            command_timeout: Duration::from_millis(f.redis.command_timeout_ms.max(1)),
        }
    });

    // [policy]
    let p = &f.policy;
    if p.inspect_max_bytes == 0 || p.inspect_max_bytes > 64 * 1024 {
        problems.push(
            "policy.inspect_max_bytes",
            "must be between 1 and 65536 (bodies are held in memory to inspect)",
        );
    }
    let twenty_default_scopes = match p.default_scopes.as_str() {
        "twenty" => true,
        "none" => false,
        other => {
            problems.push(
                "policy.default_scopes",
                format!("{other:?} must be \"twenty\" or \"none\""),
            );
            false
        }
    };
    for (i, rule) in p.scopes.iter().enumerate() {
        if rule.scopes.is_empty() {
            problems.push(
                format!("policy.scopes[{i}].scopes"),
                "list at least one scope",
            );
        }
    }
    let mut rules = p.scopes.clone();
    if twenty_default_scopes {
        rules.extend(crate::policy::mcp::ScopeRules::twenty_default_config());
    }
    let scope_rules = match crate::policy::mcp::ScopeRules::compile(&rules) {
        Ok(r) => r,
        Err(e) => {
            problems.push("policy.scopes", e);
            crate::policy::mcp::ScopeRules::twenty_default()
        }
    };
    let auth_failures = p.auth_failures.validate("policy.auth_failures", problems);
    let issuer_facts: Vec<crate::policy::rules::IssuerFacts> = clerk
        .iter()
        .map(|c| crate::policy::rules::IssuerFacts {
            issuer: c.issuer.clone(),
            maps_roles: c.claims.maps_roles(true),
        })
        .chain(issuers.iter().map(|i| crate::policy::rules::IssuerFacts {
            issuer: i.issuer.clone(),
            maps_roles: i.claims.maps_roles(false),
        }))
        .collect();
    let authz_rules = crate::policy::rules::Rules::compile(
        &p.rules,
        p.email_domains.as_deref(),
        &issuer_facts,
        problems,
    );
    let policy = PolicySettings {
        max_body_bytes: p.max_body_bytes,
        inspect_max_bytes: p.inspect_max_bytes.min(64 * 1024),
        protocol_versions: p.protocol_versions.clone(),
        bind_sessions: p.bind_sessions,
        session_ttl: secs(p.session_ttl_secs.max(60)),
        mcp_paths: normal_paths(problems, "policy.mcp_paths", &p.mcp_paths),
        scope_rules,
        org: p.org.clone(),
        rules: authz_rules,
        clock: crate::policy::rules::Clock::system(),
        auth_failures,
    };

    // [rate_limits]
    let r = &f.rate_limits;
    let use_redis = match r.backend.as_str() {
        "auto" => f.redis.url.is_some(),
        "local" => false,
        "redis" => {
            if f.redis.url.is_none() {
                problems.push(
                    "rate_limits.backend",
                    "is \"redis\" but redis.url (REDIS_URL) is not set",
                );
            }
            true
        }
        other => {
            problems.push(
                "rate_limits.backend",
                format!("{other:?} must be \"auto\", \"local\" or \"redis\""),
            );
            false
        }
    };
    let on_redis_error = match r.on_redis_error.as_str() {
        "local" => RedisFailure::Local,
        "allow" => RedisFailure::Allow,
        "deny" => RedisFailure::Deny,
        other => {
            problems.push(
                "rate_limits.on_redis_error",
                format!("{other:?} must be \"local\", \"allow\" or \"deny\""),
            );
            RedisFailure::Local
        }
    };
    let mut rate_rules = Vec::new();
    for (i, rule) in r.rules.iter().enumerate() {
        let field = format!("rate_limits.rules[{i}]");
        let per = match rule.per.as_str() {
            "user" => RateKey::User,
            "org" => RateKey::Org,
            "ip" => RateKey::Ip,
            other => {
                problems.push(
                    format!("{field}.per"),
                    format!("{other:?} must be \"user\", \"org\" or \"ip\""),
                );
                continue;
            }
        };
        if rule.requests == 0 || rule.period_secs == 0 {
            problems.push(&field, "requests and period_secs must be at least 1");
            continue;
        }
        let burst = rule.burst.unwrap_or(rule.requests).max(1);
        if rule.cost == 0 || rule.cost > burst {
            problems.push(
                format!("{field}.cost"),
                "must be between 1 and the rule's burst",
            );
        }
        for t in &rule.tools {
            if globset::Glob::new(t).is_err() {
                problems.push(
                    format!("{field}.tools"),
                    format!("{t:?} is not a valid glob"),
                );
            }
        }
        rate_rules.push(RateRule {
            name: rule
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-{i}", per.as_str())),
            per,
            requests: rule.requests,
            period: secs(rule.period_secs),
            burst,
            paths: normal_paths(problems, &format!("{field}.paths"), &rule.paths),
            tools: rule.tools.clone(),
            cost: rule.cost,
        });
    }
    let rate_limits = RateLimitSettings {
        enabled: r.enabled,
        use_redis,
        on_redis_error,
        rules: rate_rules,
    };

    let dev = f.dev.as_ref().map(|d| DevSettings {
        issuer: d.issuer.clone(),
        signing_key_file: resolve_path(base, &d.signing_key_file),
        kid: d.kid.clone(),
        authorization_server: d.authorization_server,
    });
    if let Some(d) = f.dev.as_ref().filter(|d| d.authorization_server) {
        check_dev_authorization_server(
            d,
            dev.as_ref(),
            f.clerk.is_some(),
            &issuers,
            listen.as_ref(),
            &mcp_and_keys_paths(&f.policy.mcp_paths),
            problems,
        );
    }

    Some(Settings {
        server: ServerSettings {
            listen: listen?,
            admin_listen: admin_listen?,
            threads: f.server.threads.max(1),
            h2c: f.server.h2c,
            request_header_timeout: secs(f.server.request_header_timeout_secs.max(1)),
            keepalive_timeout: secs(f.server.keepalive_timeout_secs),
            body_timeout: secs(f.server.body_timeout_secs.max(1)),
            body_idle_timeout: secs(f.server.body_idle_timeout_secs.max(1)),
            send_timeout: secs(f.server.send_timeout_secs.max(1)),
            trusted_proxies,
            grace_period: secs(f.server.grace_period_secs),
            shutdown_timeout: secs(f.server.shutdown_timeout_secs),
            tls,
        },
        upstream: upstream?,
        resource: ResourceSettings {
            url: resource_url,
            protected_paths: f.resource.protected_paths.clone(),
            scopes_supported: f.resource.scopes_supported.clone(),
            resource_name: f.resource.resource_name.clone(),
            documentation: f.resource.documentation.clone(),
            metadata_url,
        },
        auth: AuthSettings {
            enabled: f.auth.enabled,
            required: f.auth.required,
            max_token_bytes: f.auth.max_token_bytes,
            leeway: secs(f.auth.leeway_secs),
            verified_cache_max_entries: f.auth.verified_cache_max_entries.max(1),
            session_token_paths: normal_paths(
                problems,
                "auth.session_token_paths",
                &f.auth.session_token_paths,
            ),
            identity_headers,
        },
        clerk,
        issuers,
        jwks: JwksSettings {
            refresh_interval: secs(f.jwks.refresh_interval_secs.max(10)),
            unknown_kid_cooldown: secs(f.jwks.unknown_kid_cooldown_secs),
            max_stale: secs(f.jwks.max_stale_secs),
            fetch_timeout: secs(f.jwks.fetch_timeout_secs.max(1)),
            max_bytes: f.jwks.max_bytes,
            max_keys: f.jwks.max_keys,
        },
        cors: CorsSettings {
            allowed_origins,
            allow_any_origin,
            max_age: secs(f.cors.max_age_secs),
        },
        log: LogSettings {
            json,
            level: f.log.level.clone(),
        },
        dev,
        keys,
        redis,
        policy,
        rate_limits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SECRET: (&str, &str) = (
        "API_KEY_ENCRYPTION_SECRET",
        "3f8a1c9e57b2d4067e1fa93c28d5b6409c7e2a15f3b8d06e4a91c7253df80b6e",
    );

    #[test]
    fn the_vault_needs_a_secret_and_reads_the_seed_variables() {
        let problems = load(None, &env(&[("AUTH_ENABLED", "false")])).expect_err("no secret");
        assert!(problems
            .0
            .iter()
            .any(|p| p.field.contains("API_KEY_ENCRYPTION_SECRET")));
        let s = load(
            None,
            &env(&[
                ("AUTH_ENABLED", "false"),
                SECRET,
                ("TWENTY_BASE_URL", "https://crm.example.com/"),
                ("TWENTY_API_KEY", "tw_fallback"),
                ("REDIS_URL", "redis://127.0.0.1:6390"),
                ("KEYGATE_DATA_DIR", "/var/lib/keygate"),
            ]),
        )
        .expect("valid");
        assert_eq!(
            s.keys.default_base_url.as_deref(),
            Some("https://crm.example.com")
        );
        assert_eq!(
            s.keys.allowed_base_url_hosts,
            vec!["crm.example.com".to_string()]
        );
        assert!(s.keys.fallback_api_key.is_some());
        assert_eq!(
            s.redis.map(|r| r.url).as_deref(),
            Some("redis://127.0.0.1:6390")
        );
        assert_eq!(s.keys.data_dir, PathBuf::from("/var/lib/keygate"));
        let default = load(None, &env(&[("AUTH_ENABLED", "false"), SECRET])).expect("valid");
        assert_eq!(
            default.keys.allowed_base_url_hosts,
            vec!["api.twenty.com".to_string()]
        );
        assert_eq!(
            default.upstream.inject.api_key,
            Some(InjectTarget::Query("apiKey".into()))
        );
    }

    #[test]
    fn the_admin_listener_cannot_share_the_public_socket() {
        let refused = |public: &str, admin: &str| {
            let vars = env(&[
                ("AUTH_ENABLED", "false"),
                SECRET,
                ("KEYGATE_LISTEN", public),
                ("KEYGATE_ADMIN_LISTEN", admin),
            ]);
            match load(None, &vars) {
                Ok(_) => false,
                Err(p) => p.0.iter().any(|p| p.field.contains("KEYGATE_ADMIN_LISTEN")),
            }
        };
        assert!(refused("127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(refused("0.0.0.0:8080", "127.0.0.1:8080"));
        assert!(refused("127.0.0.1:8080", "[::]:8080"));
        assert!(refused("127.0.0.1:0", "127.0.0.1:0"));
        assert!(!refused("0.0.0.0:8080", "127.0.0.1:9090"));
        assert!(!refused("127.0.0.1:8080", "10.0.0.1:8080"));
        assert!(!refused("127.0.0.1:0", "0.0.0.0:0"));
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn publishable_key_yields_frontend_api_host() {
        // base64("clerk.example.com$")
        let pk = format!(
            "pk_live_{}",
            base64::engine::general_purpose::STANDARD.encode("clerk.example.com$")
        );
        assert_eq!(
            frontend_api_from_publishable_key(&pk).as_deref(),
            Some("clerk.example.com")
        );
        assert_eq!(frontend_api_from_publishable_key("sk_live_abc"), None);
        assert_eq!(frontend_api_from_publishable_key("pk_test_%%%"), None);
    }

    #[test]
    fn every_problem_is_reported_at_once_naming_its_source() {
        let e = env(&[
            ("KEYGATE_LISTEN", "not-an-addr"),
            ("AUTH_ENABLED", "maybe"),
            ("KEYGATE_UPSTREAM", "ftp://x"),
            ("CLERK_PUBLISHABLE_KEY", "pk_test_???"),
        ]);
        let problems = load(None, &e).expect_err("config is bad");
        let fields: Vec<&str> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"AUTH_ENABLED"), "{fields:?}");
        assert!(
            fields.iter().any(|f| f.contains("KEYGATE_LISTEN")),
            "{fields:?}"
        );
        assert!(
            fields.iter().any(|f| f.contains("KEYGATE_UPSTREAM")),
            "{fields:?}"
        );
        assert!(
            fields.iter().any(|f| f.contains("CLERK_PUBLISHABLE_KEY")),
            "{fields:?}"
        );
    }

    #[test]
    fn clerk_frontend_api_override_wins_and_derives_issuer_and_jwks() {
        let pk = format!(
            "pk_test_{}",
            base64::engine::general_purpose::STANDARD.encode("foo.clerk.accounts.dev$")
        );
        let e = env(&[
            ("CLERK_PUBLISHABLE_KEY", &pk),
            ("KEYGATE_UPSTREAM", "http://127.0.0.1:3000"),
            SECRET,
        ]);
        let s = load(None, &e).expect("valid");
        let c = s.clerk.expect("clerk");
        assert_eq!(c.issuer, "https://foo.clerk.accounts.dev");
        assert_eq!(
            c.jwks_url.as_str(),
            "https://foo.clerk.accounts.dev/.well-known/jwks.json"
        );
        let e = env(&[
            ("CLERK_PUBLISHABLE_KEY", &pk),
            ("CLERK_FRONTEND_API_URL", "http://127.0.0.1:4000"),
            SECRET,
        ]);
        let c = load(None, &e).expect("valid").clerk.expect("clerk");
        assert_eq!(c.issuer, "http://127.0.0.1:4000");
    }

    #[test]
    fn auth_enabled_without_issuer_is_an_error_unless_disabled() {
        let problems = load(None, &env(&[])).expect_err("no issuer");
        assert!(problems.0.iter().any(|p| p.field == "auth"));
        assert!(load(None, &env(&[("AUTH_ENABLED", "false"), SECRET])).is_ok());
    }

    #[test]
    fn hmac_algorithms_are_refused() {
        let e = env(&[("CLERK_FRONTEND_API_URL", "https://clerk.example.com")]);
        let mut file = FileConfig::default();
        let mut problems = Problems::default();
        file.apply_env(&e, &mut problems);
        if let Some(c) = file.clerk.as_mut() {
            c.algorithms = vec!["HS256".into()];
        }
        validate(file, Path::new("."), &mut problems);
        assert!(problems.0.iter().any(|p| p.field == "clerk.algorithms"));
    }

    #[test]
    fn secrets_can_come_from_files() {
        let dir = std::env::temp_dir().join(format!("keygate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let file = dir.join("secret");
        std::fs::write(&file, format!("{}\n", SECRET.1)).expect("write");
        let path = file.display().to_string();
        let s = load(
            None,
            &env(&[
                ("AUTH_ENABLED", "false"),
                ("API_KEY_ENCRYPTION_SECRET_FILE", &path),
            ]),
        )
        .expect("valid");
        assert!(s.keys.keyring.is_some());
        let both = load(
            None,
            &env(&[
                ("AUTH_ENABLED", "false"),
                SECRET,
                ("API_KEY_ENCRYPTION_SECRET_FILE", &path),
            ]),
        )
        .expect_err("both set");
        assert!(both
            .0
            .iter()
            .any(|p| p.field == "API_KEY_ENCRYPTION_SECRET_FILE"));
        let missing = load(
            None,
            &env(&[
                ("AUTH_ENABLED", "false"),
                (
                    "API_KEY_ENCRYPTION_SECRET_FILE",
                    "/nonexistent/keygate-secret",
                ),
            ]),
        )
        .expect_err("unreadable");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(missing
            .0
            .iter()
            .any(|p| p.field == "API_KEY_ENCRYPTION_SECRET_FILE"));
    }

    #[test]
    fn clerk_call_bounds_and_the_failure_budget_are_checked_naming_the_option() {
        let dir = std::env::temp_dir().join(format!("keygate-bounds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("bounds.toml");
        std::fs::write(
            &path,
            "[clerk]\nfrontend_api_url = \"https://clerk.example.com\"\nsecret_key = \"sk_test_x\"\n\
             backend_timeout_ms = 1000\nbackend_max_wait_ms = 1500\nbackend_max_in_flight = 0\n\
             [policy.auth_failures]\nwindow_secs = 0\n",
        )
        .expect("write");
        let problems = load(Some(&path), &env(&[SECRET])).expect_err("bad bounds");
        let fields: Vec<&str> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"clerk.backend_max_wait_ms"), "{problems}");
        assert!(
            fields.contains(&"clerk.backend_max_in_flight"),
            "{problems}"
        );
        assert!(
            fields
                .iter()
                .any(|f| f.contains("policy.auth_failures.window_secs")),
            "{problems}"
        );

        std::fs::write(
            &path,
            "[clerk]\nfrontend_api_url = \"https://clerk.example.com\"\nsecret_key = \"sk_test_x\"\n",
        )
        .expect("write");
        let s = load(Some(&path), &env(&[SECRET])).expect("defaults are valid");
        let c = s.clerk.expect("clerk");
        assert_eq!(c.backend_max_in_flight, 32);
        assert_eq!((c.backend_rate.requests, c.backend_rate.burst), (50, 100));
        // Below Clerk's production limit (1000 per 10 s) even in the worst 10 s.
        assert!(c.backend_rate.burst + 10 * c.backend_rate.requests < 1000);
        assert!(c.backend_max_wait <= c.backend_timeout);
        let f = &s.policy.auth_failures;
        assert!(f.enabled);
        assert_eq!(f.budget.requests, 20);
        assert_eq!(f.lockout, Duration::from_secs(60));
    }

    #[test]
    fn unknown_options_are_rejected() {
        let dir = std::env::temp_dir().join(format!("keygate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[server]\nlisten_addr = \"x\"\n").expect("write");
        let problems = load(Some(&path), &env(&[])).expect_err("unknown field");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(problems.0[0].message.contains("listen_addr"), "{problems}");
    }
}
