//! The configuration file as written by an operator: plain serde structs that mirror the TOML,
//! with defaults, plus the environment overrides applied on top of them.
//!
//! Nothing here is validated beyond its TOML type; `config::validate` turns these structs into
//! the typed [`crate::config::Settings`] the gateway runs on.

use serde::Deserialize;

use super::Problems;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub server: ServerFile,
    pub upstream: UpstreamFile,
    pub resource: ResourceFile,
    pub auth: AuthFile,
    pub clerk: Option<ClerkFile>,
    pub issuers: Vec<IssuerFile>,
    pub jwks: JwksFile,
    pub cors: CorsFile,
    pub log: LogFile,
    pub dev: Option<DevFile>,
    pub keys: KeysFile,
    pub redis: RedisFile,
    pub policy: PolicyFile,
    pub rate_limits: RateLimitsFile,
}

/// `[policy]`: MCP transport checks and authorization rules.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyFile {
    pub max_body_bytes: u64,
    pub inspect_max_bytes: usize,
    pub protocol_versions: Vec<String>,
    pub bind_sessions: bool,
    pub session_ttl_secs: u64,
    pub mcp_paths: Vec<String>,
    /// `"twenty"`: the built-in rules for the Twenty MCP server; `"none"`: only `scopes`.
    pub default_scopes: String,
    pub scopes: Vec<ScopeRuleConfig>,
    pub org: OrgRulesConfig,
    /// `[[policy.rules]]`: authorization rules over the mapped identity, first match wins.
    pub rules: Vec<RuleConfig>,
    /// Every authenticated caller's mapped email must be at one of these domains (unset: no
    /// global allowlist).
    pub email_domains: Option<Vec<String>>,
    /// `[policy.auth_failures]`: the per-client-IP failed-authentication budget.
    pub auth_failures: AuthFailuresConfig,
}

impl Default for PolicyFile {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            inspect_max_bytes: 64 * 1024,
            // Every version the official SDKs offer (the TypeScript SDK still sends
            // 2024-10-07), and the revisions since.
            protocol_versions: vec![
                "2024-10-07".into(),
                "2024-11-05".into(),
                "2025-03-26".into(),
                "2025-06-18".into(),
                "2025-11-25".into(),
                "2026-07-28".into(),
            ],
            bind_sessions: true,
            session_ttl_secs: 86_400,
            mcp_paths: vec!["/mcp".into()],
            default_scopes: "none".into(),
            scopes: Vec::new(),
            org: OrgRulesConfig::default(),
            rules: Vec::new(),
            email_domains: None,
            auth_failures: AuthFailuresConfig::default(),
        }
    }
}

/// `[rate_limits]`: budgets per user, org and client IP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsFile {
    pub enabled: bool,
    /// "auto" (Redis when configured), "local" or "redis".
    pub backend: String,
    /// When Redis fails: "local", "allow" or "deny".
    pub on_redis_error: String,
    pub rules: Vec<RateRuleFile>,
}

impl Default for RateLimitsFile {
    fn default() -> Self {
        Self {
            enabled: true,
            backend: "auto".into(),
            on_redis_error: "local".into(),
            rules: Vec::new(),
        }
    }
}

/// `[[rate_limits.rules]]`: one budget.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateRuleFile {
    /// Optional name, shown in the `RateLimit-Policy` header.
    #[serde(default)]
    pub name: Option<String>,
    /// "user", "org" or "ip".
    pub per: String,
    pub requests: u32,
    pub period_secs: u64,
    #[serde(default)]
    pub burst: Option<u32>,
    /// Path prefixes the rule applies to; empty = every route it can key on.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Tool-name globs: the rule then only counts `tools/call` of matching tools.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Units one matching request spends.
    #[serde(default = "one")]
    pub cost: u32,
}

fn one() -> u32 {
    1
}

/// `[server]`: listeners and connection handling.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerFile {
    pub listen: String,
    pub admin_listen: String,
    pub threads: usize,
    pub h2c: bool,
    pub request_header_timeout_secs: u64,
    pub keepalive_timeout_secs: u64,
    pub body_timeout_secs: u64,
    pub body_idle_timeout_secs: u64,
    pub send_timeout_secs: u64,
    pub trusted_proxies: Vec<String>,
    pub grace_period_secs: u64,
    pub shutdown_timeout_secs: u64,
    pub tls: Option<TlsFile>,
}

impl Default for ServerFile {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            threads: 2,
            h2c: true,
            request_header_timeout_secs: 10,
            keepalive_timeout_secs: 60,
            body_timeout_secs: 30,
            body_idle_timeout_secs: 30,
            send_timeout_secs: 60,
            trusted_proxies: Vec::new(),
            grace_period_secs: 5,
            shutdown_timeout_secs: 20,
            tls: None,
        }
    }
}

/// `[server.tls]`: terminate TLS on the public listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert_file: String,
    pub key_file: String,
}

/// `[upstream]`: the one server keygate fronts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamFile {
    pub url: String,
    pub connect_timeout_secs: u64,
    pub read_timeout_secs: u64,
    pub write_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub preserve_host: bool,
    pub verify_tls: bool,
    pub inject: InjectFile,
}

/// `[upstream.inject]`: how the user's key and base URL reach the upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InjectFile {
    pub api_key_query: Option<String>,
    pub api_key_header: Option<String>,
    pub api_key_template: String,
    pub base_url_query: Option<String>,
    pub base_url_header: Option<String>,
}

impl Default for InjectFile {
    fn default() -> Self {
        Self {
            api_key_query: Some("apiKey".into()),
            api_key_header: None,
            api_key_template: "{key}".into(),
            base_url_query: Some("baseUrl".into()),
            base_url_header: None,
        }
    }
}

/// `[keys]`: the per-user key vault.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysFile {
    pub enabled: bool,
    pub data_dir: String,
    pub encryption_secret: Option<String>,
    pub previous_encryption_secrets: Vec<String>,
    pub org_keys: bool,
    pub legacy_slot_issuer: Option<String>,
    pub fallback_api_key: Option<String>,
    pub default_base_url: Option<String>,
    pub allowed_base_url_hosts: Vec<String>,
    pub max_key_bytes: usize,
    pub max_body_bytes: usize,
    pub cache_ttl_secs: u64,
    pub cache_max_entries: u64,
}

impl Default for KeysFile {
    fn default() -> Self {
        Self {
            enabled: true,
            data_dir: "data".into(),
            encryption_secret: None,
            previous_encryption_secrets: Vec::new(),
            org_keys: false,
            legacy_slot_issuer: None,
            fallback_api_key: None,
            default_base_url: None,
            allowed_base_url_hosts: Vec::new(),
            max_key_bytes: 4096,
            max_body_bytes: 16 * 1024,
            cache_ttl_secs: 300,
            cache_max_entries: 100_000,
        }
    }
}

/// `[redis]`: the shared key store (when `url` is set).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisFile {
    pub url: Option<String>,
    pub cluster: bool,
    pub key_prefix: String,
    pub connect_timeout_ms: u64,
    pub command_timeout_ms: u64,
}

impl Default for RedisFile {
    fn default() -> Self {
        Self {
            url: None,
            cluster: false,
            key_prefix: "keygate:".into(),
            connect_timeout_ms: 2000,
            command_timeout_ms: 500,
        }
    }
}

impl Default for UpstreamFile {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:3000".into(),
            connect_timeout_secs: 5,
            read_timeout_secs: 300,
            write_timeout_secs: 30,
            idle_timeout_secs: 60,
            preserve_host: false,
            verify_tls: true,
            inject: InjectFile::default(),
        }
    }
}

/// `[resource]`: how keygate names the protected resource to OAuth clients.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceFile {
    pub url: String,
    pub protected_paths: Vec<String>,
    pub scopes_supported: Vec<String>,
    pub resource_name: Option<String>,
    pub documentation: Option<String>,
}

impl Default for ResourceFile {
    fn default() -> Self {
        Self {
            url: String::new(),
            protected_paths: vec!["/mcp".into()],
            scopes_supported: Vec::new(),
            resource_name: None,
            documentation: None,
        }
    }
}

/// `[auth]`: what a request must carry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFile {
    pub enabled: bool,
    pub required: bool,
    pub max_token_bytes: usize,
    pub leeway_secs: u64,
    pub verified_cache_max_entries: u64,
    pub session_token_paths: Vec<String>,
    pub identity_headers: IdentityHeadersFile,
}

impl Default for AuthFile {
    fn default() -> Self {
        Self {
            enabled: true,
            required: true,
            max_token_bytes: 8192,
            leeway_secs: 5,
            verified_cache_max_entries: 100_000,
            session_token_paths: vec!["/api/keys".into()],
            identity_headers: IdentityHeadersFile::default(),
        }
    }
}

/// `[auth.identity_headers]`: headers that carry the verified identity upstream (off when unset).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeadersFile {
    pub user: Option<String>,
    pub org: Option<String>,
    pub scopes: Option<String>,
    pub token_kind: Option<String>,
    pub issuer: Option<String>,
}

/// `[clerk]`: Clerk as the authorization server.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClerkFile {
    pub publishable_key: Option<String>,
    pub secret_key: Option<String>,
    pub domain: Option<String>,
    pub frontend_api_url: Option<String>,
    pub api_url: String,
    pub authorized_parties: Vec<String>,
    pub algorithms: Vec<String>,
    pub audiences: Vec<String>,
    pub oauth_opaque_tokens: bool,
    pub m2m_tokens: bool,
    pub api_keys: bool,
    pub opaque_negative_ttl_secs: u64,
    pub opaque_max_ttl_secs: u64,
    pub backend_timeout_ms: u64,
    /// Backend API calls in flight at once, at most.
    pub backend_max_in_flight: u32,
    /// Backend API calls started per second, in the long run.
    pub backend_rate_per_sec: u32,
    /// Backend API calls that may start at once when the rate budget is full.
    pub backend_burst: u32,
    /// How long a call may wait for a slot (in flight and rate) before its request gets 503.
    pub backend_max_wait_ms: u64,
    /// `[clerk.claims]`: where Clerk tokens carry each fact; unset ones read Clerk's own claims.
    pub claims: ClaimsFile,
}

impl Default for ClerkFile {
    fn default() -> Self {
        Self {
            publishable_key: None,
            secret_key: None,
            domain: None,
            frontend_api_url: None,
            api_url: "https://api.clerk.com".into(),
            authorized_parties: Vec::new(),
            algorithms: vec!["RS256".into()],
            audiences: Vec::new(),
            oauth_opaque_tokens: true,
            m2m_tokens: false,
            api_keys: false,
            opaque_negative_ttl_secs: 30,
            opaque_max_ttl_secs: 300,
            backend_timeout_ms: 3000,
            backend_max_in_flight: 32,
            backend_rate_per_sec: 50,
            backend_burst: 100,
            backend_max_wait_ms: 250,
            claims: ClaimsFile::default(),
        }
    }
}

/// `[[issuers]]`: any other OIDC issuer whose JWT access tokens keygate accepts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerFile {
    pub issuer: String,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// `[issuers.claims]`: where this issuer's tokens carry each fact.
    #[serde(default)]
    pub claims: ClaimsFile,
}

/// A claim path as written: `"a.b"` (quote a segment holding dots: `"\"https://x/org\".id"`)
/// or a list of literal segments (`["https://x/org", "id"]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ClaimPathFile {
    Path(String),
    Segments(Vec<String>),
}

/// `[issuers.claims]` / `[clerk.claims]`: where the facts keygate authorizes on live in a
/// token; each unset fact keeps the built-in reading.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimsFile {
    pub user_id: Option<ClaimPathFile>,
    pub org_id: Option<ClaimPathFile>,
    pub org_role: Option<ClaimPathFile>,
    pub roles: Option<ClaimPathFile>,
    pub email: Option<ClaimPathFile>,
    pub email_verified: Option<ClaimPathFile>,
    pub scopes: Option<ClaimPathFile>,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into()]
}

/// `[jwks]`: key-set lifecycle shared by every issuer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwksFile {
    pub refresh_interval_secs: u64,
    pub unknown_kid_cooldown_secs: u64,
    pub max_stale_secs: u64,
    pub fetch_timeout_secs: u64,
    pub max_bytes: usize,
    pub max_keys: usize,
}

impl Default for JwksFile {
    fn default() -> Self {
        Self {
            refresh_interval_secs: 300,
            unknown_kid_cooldown_secs: 30,
            max_stale_secs: 86_400,
            fetch_timeout_secs: 5,
            max_bytes: 64 * 1024,
            max_keys: 32,
        }
    }
}

/// `[cors]`: browser origins allowed to call the proxied routes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsFile {
    pub allowed_origins: Vec<String>,
    pub max_age_secs: u64,
}

impl Default for CorsFile {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_age_secs: 600,
        }
    }
}

/// `[log]`: output format and default level (`RUST_LOG` wins).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogFile {
    pub format: String,
    pub level: String,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// `[dev]`: a local issuer for offline development; `keygate dev-token` signs with it, and
/// with `authorization_server = true` keygate serves it as a minimal OAuth 2.1 authorization
/// server on the public listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevFile {
    pub issuer: String,
    pub signing_key_file: String,
    #[serde(default = "default_dev_kid")]
    pub kid: String,
    /// Serve the dev issuer as an OAuth 2.1 authorization server (off by default).
    #[serde(default)]
    pub authorization_server: bool,
    /// Allow the dev authorization server on a listener that is not loopback-only.
    #[serde(default)]
    pub allow_non_loopback: bool,
}

fn default_dev_kid() -> String {
    "keygate-dev".into()
}

/// A view of the process environment, so tests can pass their own.
pub trait Env {
    /// The value of `name`, when set and not empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Env for std::collections::HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).filter(|v| !v.is_empty()).cloned()
    }
}

/// Secret variables may also come from a file (`NAME_FILE`, e.g. a mounted Kubernetes secret);
/// setting both is a problem, and so is a file that cannot be read.
fn env_secret(env: &dyn Env, name: &str, problems: &mut Problems) -> Option<String> {
    let file_var = format!("{name}_FILE");
    match (env.var(name), env.var(&file_var)) {
        (Some(_), Some(_)) => {
            problems.push(&file_var, format!("set {name} or {file_var}, not both"));
            None
        }
        (Some(v), None) => Some(v),
        (None, Some(path)) => match std::fs::read_to_string(&path) {
            Ok(text) => Some(text.trim_end_matches(['\n', '\r']).to_string()),
            Err(e) => {
                problems.push(&file_var, format!("cannot read {path}: {e}"));
                None
            }
        },
        (None, None) => None,
    }
}

fn env_bool(env: &dyn Env, name: &str, problems: &mut Problems) -> Option<bool> {
    let raw = env.var(name)?;
    match raw.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => {
            problems.push(name, "must be true or false");
            None
        }
    }
}

impl FileConfig {
    /// Apply the environment variables keygate honours; a variable always wins over the file.
    pub fn apply_env(&mut self, env: &dyn Env, problems: &mut Problems) {
        if let Some(v) = env_bool(env, "AUTH_ENABLED", problems) {
            self.auth.enabled = v;
        }
        if let Some(v) = env_bool(env, "REQUIRE_AUTH", problems) {
            self.auth.required = v;
        }
        if let Some(v) = env.var("KEYGATE_LISTEN") {
            self.server.listen = v;
        }
        if let Some(v) = env.var("KEYGATE_ADMIN_LISTEN") {
            self.server.admin_listen = v;
        }
        if let Some(v) = env.var("KEYGATE_UPSTREAM") {
            self.upstream.url = v;
        }
        if let Some(v) = env.var("MCP_SERVER_URL") {
            self.resource.url = v;
        }
        if let Some(v) = env.var("KEYGATE_DATA_DIR") {
            self.keys.data_dir = v;
        }
        if let Some(v) = env_secret(env, "API_KEY_ENCRYPTION_SECRET", problems) {
            self.keys.encryption_secret = Some(v);
        }
        if let Some(v) = env_secret(env, "API_KEY_ENCRYPTION_SECRET_PREVIOUS", problems) {
            self.keys.previous_encryption_secrets = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(v) = env_secret(env, "TWENTY_API_KEY", problems) {
            self.keys.fallback_api_key = Some(v);
        }
        if let Some(v) = env.var("TWENTY_BASE_URL") {
            self.keys.default_base_url = Some(v);
        }
        if let Some(v) = env_secret(env, "REDIS_URL", problems) {
            self.redis.url = Some(v);
        }
        if let Some(v) = env.var("KEYGATE_LOG_FORMAT") {
            self.log.format = v;
        }
        let clerk_vars = [
            "CLERK_PUBLISHABLE_KEY",
            "CLERK_SECRET_KEY",
            "CLERK_DOMAIN",
            "CLERK_FRONTEND_API_URL",
            "CLERK_API_URL",
        ];
        let provider = env.var("AUTH_PROVIDER");
        let wants_clerk =
            clerk_vars.iter().any(|n| env.var(n).is_some()) || provider.as_deref() == Some("clerk");
        if wants_clerk && self.clerk.is_none() {
            self.clerk = Some(ClerkFile::default());
        }
        if let Some(clerk) = self.clerk.as_mut() {
            if let Some(v) = env.var("CLERK_PUBLISHABLE_KEY") {
                clerk.publishable_key = Some(v);
            }
            if let Some(v) = env_secret(env, "CLERK_SECRET_KEY", problems) {
                clerk.secret_key = Some(v);
            }
            if let Some(v) = env.var("CLERK_DOMAIN") {
                clerk.domain = Some(v);
            }
            if let Some(v) = env.var("CLERK_FRONTEND_API_URL") {
                clerk.frontend_api_url = Some(v);
            }
            if let Some(v) = env.var("CLERK_API_URL") {
                clerk.api_url = v;
            }
        }
        match provider.as_deref() {
            None | Some("clerk") => {}
            Some("oidc") => {
                if self.issuers.is_empty() && self.auth.enabled {
                    problems.push(
                        "AUTH_PROVIDER",
                        "is \"oidc\" but no [[issuers]] are configured",
                    );
                }
            }
            Some(_) => problems.push("AUTH_PROVIDER", "must be \"clerk\" or \"oidc\""),
        }
    }
}

/// One scope rule from config: method glob, optional name glob, scopes all required.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeRuleConfig {
    pub method: String,
    #[serde(default)]
    pub name: Option<String>,
    pub scopes: Vec<String>,
}

/// Which organisations and roles may call; empty means no org rule.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrgRulesConfig {
    pub allowed_org_ids: Vec<String>,
    pub required_role: Option<String>,
}

impl OrgRulesConfig {
    /// Whether any org rule is set (and so a token without org context is refused).
    pub fn is_active(&self) -> bool {
        !self.allowed_org_ids.is_empty() || self.required_role.is_some()
    }
}

/// One `[[policy.rules]]` entry as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Shown in refusals, the audit event and the metric; unique.
    pub name: String,
    /// Path prefixes (normal form, as the route decision compares): the rule matches a path
    /// that starts with one. Empty: any path.
    #[serde(default)]
    pub paths: Vec<String>,
    /// HTTP methods (`POST`, `DELETE`, ...). Empty: any.
    #[serde(default)]
    pub http_methods: Vec<String>,
    /// JSON-RPC method glob: the rule then matches only calls of that method.
    #[serde(default)]
    pub method: Option<String>,
    /// Glob on the call's name: `params.name` (the tool or prompt), or `params.uri` for
    /// `resources/read`. The rule then matches only calls with a matching name.
    #[serde(default)]
    pub call_name: Option<String>,
    /// Only tokens from these issuers match. Empty: every issuer.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Only identities holding one of these roles match (e.g. a rule for contractors).
    #[serde(default)]
    pub for_roles: Option<Vec<String>>,
    /// Every one of these scopes is required.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// At least one of these roles is required (exact match).
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// The token's org must be one of these.
    #[serde(default)]
    pub orgs: Option<Vec<String>>,
    /// The token must name an org.
    #[serde(default)]
    pub require_org: bool,
    /// The mapped email's domain must be one of these (exact), and verified where the issuer
    /// says.
    #[serde(default)]
    pub email_domains: Option<Vec<String>>,
    /// A second factor verified at most this many minutes ago.
    #[serde(default)]
    pub mfa_max_age_mins: Option<u64>,
    /// Days of the week (`mon` … `sun`) the rule allows, in `time_zone`.
    #[serde(default)]
    pub days: Option<Vec<String>>,
    /// `HH:MM-HH:MM`, start included, end excluded, in `time_zone`.
    #[serde(default)]
    pub hours: Option<String>,
    /// An IANA time zone name (`Europe/Berlin`); required with `days` or `hours`.
    #[serde(default)]
    pub time_zone: Option<String>,
}

/// `[policy.auth_failures]` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFailuresConfig {
    /// Budget failed authentications per client IP.
    pub enabled: bool,
    /// Failures a client may have in `window_secs` (the budget refills steadily); the next one
    /// starts a lockout.
    pub max_failures: u32,
    pub window_secs: u64,
    /// How long a locked-out client is refused.
    pub lockout_secs: u64,
    /// Clients tracked at most (failure budgets and locks each).
    pub max_tracked_ips: u64,
    /// IPv6 clients are grouped by this network prefix.
    pub ipv6_prefix_len: u8,
    /// Policy refusals (403) a subject may have in `window_secs`; the next one locks the
    /// subject out for `lockout_secs`. 0 turns the subject budget off.
    pub subject_max_denials: u32,
}

impl Default for AuthFailuresConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_failures: 20,
            window_secs: 60,
            lockout_secs: 60,
            max_tracked_ips: 100_000,
            ipv6_prefix_len: 64,
            subject_max_denials: 30,
        }
    }
}
