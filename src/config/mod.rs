//! Configuration: the TOML file plus environment overrides, checked once at startup and turned
//! into [`Settings`], the typed values the rest of keygate runs on.
//!
//! Every problem is collected and reported together, each naming the option or the variable
//! that caused it. Secrets are kept in [`SecretString`](secrecy::SecretString) and never
//! printed. Each section is validated in its own file (`server`, `upstream`, `resource`,
//! `auth`, `clerk`, `issuers`, `cors`, `log`, `keys`, `policy`, `rate_limits`, `dev`), all
//! collecting into one [`Problems`]; this module reads the sources and runs the sections in
//! order, handing each what it needs from the ones before.
//!
//! Settings are plain values (numbers, strings, paths, claim maps, rules as written); this
//! module names none of the modules it configures. Each of those compiles its own section at
//! startup (scope and authorization rules, the failed-authentication budget, the keyring):
//! `app::configure` runs [`read`] and then every compile step, reporting
//! all problems together.

mod auth;
mod claims;
mod clerk;
mod cors;
mod dev;
pub mod file;
mod issuers;
mod keys;
mod log;
mod parse;
mod policy;
mod problems;
mod rate_limits;
mod resource;
mod server;
mod source;
mod upstream;

use std::path::Path;

pub use auth::{AuthSettings, IdentityHeaders};
pub use claims::{ClaimMap, ClaimPath, PathError};
pub use clerk::{frontend_api_from_publishable_key, ClerkSettings};
pub use cors::CorsSettings;
pub use dev::{DevKeyError, DevSettings};
pub use file::{Env, FileConfig, ProcessEnv};
pub use issuers::{IssuerSettings, JwksSettings, KeySource};
pub use keys::{KeysSettings, RedisConfig};
pub use log::{LogFormat, LogSettings};
pub(crate) use parse::normal_paths;
pub use parse::NotAChoice;
pub use policy::{DefaultScopes, PolicySettings};
pub use problems::{Problem, Problems};
pub use rate_limits::{RateBackend, RateKey, RateLimitSettings, RateRule, RedisFailure};
pub use resource::ResourceSettings;
pub use server::{ServerSettings, TlsSettings};
pub use source::placeholder_marker;
pub use upstream::{InjectSettings, InjectTarget, UpstreamSettings};

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

/// Every section as validated, before the sections the gateway cannot run without are
/// required: the modules compile their runtime objects from these (see `app::configure`), so
/// their problems are reported with the configuration's even when a listener is unusable.
#[derive(Debug, Clone)]
pub struct Sections {
    /// `None` when unusable (a problem says why).
    pub server: Option<ServerSettings>,
    /// `None` when unusable (a problem says why).
    pub upstream: Option<UpstreamSettings>,
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

impl Sections {
    /// The settings, when every section the gateway cannot run without is usable.
    pub fn into_settings(self) -> Option<Settings> {
        Some(Settings {
            server: self.server?,
            upstream: self.upstream?,
            resource: self.resource,
            auth: self.auth,
            clerk: self.clerk,
            issuers: self.issuers,
            jwks: self.jwks,
            cors: self.cors,
            log: self.log,
            dev: self.dev,
            keys: self.keys,
            redis: self.redis,
            policy: self.policy,
            rate_limits: self.rate_limits,
        })
    }
}

/// Read the file (when given), apply the environment, validate every section; the sections
/// with every problem found. `Err` when the file cannot be read or parsed (nothing to
/// validate).
pub fn read(path: Option<&Path>, env: &dyn Env) -> Result<(Sections, Problems), Problems> {
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
    let sections = validate(file, &base_dir, &mut problems);
    Ok((sections, problems))
}

/// Read and validate (see [`read`]): the settings, or every configuration problem. This does
/// not compile the modules' runtime objects (scope and authorization rules, the keyring, ...):
/// `app::configure` does, reporting their problems with these.
pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Settings, Problems> {
    let (sections, problems) = read(path, env)?;
    match sections.into_settings() {
        Some(s) if problems.0.is_empty() => Ok(s),
        _ => Err(problems),
    }
}

/// Validate every section in order. Problems are collected; the sections the gateway cannot
/// run without (the listeners, the upstream) are `None` when unusable.
fn validate(f: FileConfig, base: &Path, problems: &mut Problems) -> Sections {
    let (listen, server) = ServerSettings::from_file(&f.server, base, problems);
    let upstream = UpstreamSettings::from_file(&f.upstream, problems);
    let resource = ResourceSettings::from_file(&f.resource, listen, problems);
    let auth = AuthSettings::from_file(&f.auth, problems);
    let clerk = f
        .clerk
        .as_ref()
        .and_then(|c| ClerkSettings::from_file(c, &resource.url, problems));
    let issuers = issuers::issuers_from_file(&f.issuers, base, &resource.url, problems);
    issuers::check_issuers(&f, clerk.as_ref(), &issuers, problems);
    let jwks = JwksSettings::from_file(&f.jwks, problems);
    let cors = CorsSettings::from_file(&f.cors, problems);
    let log = LogSettings::from_file(&f.log, problems);
    let keys = KeysSettings::from_file(&f.keys, base, clerk.as_ref(), &issuers, problems);
    let redis = RedisConfig::from_file(&f.redis, problems);
    let policy = PolicySettings::from_file(&f.policy, problems);
    let rate_limits = RateLimitSettings::from_file(&f.rate_limits, f.redis.url.is_some(), problems);
    let dev = DevSettings::from_file(&f, base, &issuers, listen, problems);
    Sections {
        server,
        upstream,
        resource,
        auth,
        clerk,
        issuers,
        jwks,
        cors,
        log,
        dev,
        keys,
        redis,
        policy,
        rate_limits,
    }
}

/// A valid encryption secret variable, for unit tests.
#[cfg(test)]
pub(crate) const TEST_SECRET: (&str, &str) = (
    "API_KEY_ENCRYPTION_SECRET",
    "3f8a1c9e57b2d4067e1fa93c28d5b6409c7e2a15f3b8d06e4a91c7253df80b6e",
);

/// An environment of `pairs`, for unit tests.
#[cfg(test)]
pub(crate) fn test_env(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Settings validated from the environment alone (no file; auth off, a test encryption
/// secret), for unit tests.
#[cfg(test)]
pub(crate) fn test_settings() -> Settings {
    let env = test_env(&[
        ("AUTH_ENABLED", "false"),
        ("KEYGATE_UPSTREAM", "http://127.0.0.1:3000"),
        TEST_SECRET,
    ]);
    load(None, &env).expect("valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use std::path::PathBuf;

    use super::TEST_SECRET as SECRET;

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

    use super::test_env as env;

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
        use secrecy::ExposeSecret;
        assert_eq!(
            s.keys.encryption_secret.as_ref().map(|s| s.expose_secret()),
            Some(SECRET.1)
        );
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

    /// The configuration names none of the modules it configures (they import it; an edge
    /// back closes a cycle): outside its tests, no file under `src/config` nor the shared path
    /// normal form (`src/paths.rs`) refers to a runtime module.
    #[test]
    fn config_imports_none_of_the_modules_it_configures() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let runtime = [
            "admin",
            "app",
            "auth",
            "devtoken",
            "error",
            "keys",
            "policy",
            "proxy",
            "redis",
            "telemetry",
        ];
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("config"))
            .expect("src/config")
            .map(|e| e.expect("entry").path())
            .collect();
        files.push(root.join("paths.rs"));
        let mut found = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read");
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            for (n, line) in code.lines().enumerate() {
                let line = line.split("//").next().unwrap_or("");
                for m in runtime {
                    let named = [format!("crate::{m}::"), format!("crate::{m};")];
                    if line.contains("crate::{") || named.iter().any(|n| line.contains(n.as_str()))
                    {
                        found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                    }
                }
            }
        }
        assert!(
            found.is_empty(),
            "config refers to runtime modules:\n{}",
            found.join("\n")
        );
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
