//! `[policy]`: MCP transport checks (body bounds, protocol versions, session binding), the
//! scope rules (`[[policy.scopes]]`, plus the built-in Twenty rules), org rules, authorization
//! rules (`[[policy.rules]]`) and the failed-authentication budget.

use std::str::FromStr;
use std::time::Duration;

use super::clerk::ClerkSettings;
use super::file::PolicyFile;
use super::issuers::IssuerSettings;
use super::parse::{normal_paths, secs, NotAChoice};
use super::Problems;

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
/// `policy.default_scopes`: the built-in scope rules added after the configured ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultScopes {
    /// Twenty's read/write rules.
    Twenty,
    None,
}

impl FromStr for DefaultScopes {
    type Err = NotAChoice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "twenty" => Ok(DefaultScopes::Twenty),
            "none" => Ok(DefaultScopes::None),
            other => Err(NotAChoice::new(other, "\"twenty\" or \"none\"")),
        }
    }
}

impl PolicySettings {
    /// Validate `[policy]`; roles rules apply to the issuers (Clerk and `[[issuers]]`) whose
    /// claim maps carry roles.
    pub(crate) fn from_file(
        p: &PolicyFile,
        clerk: Option<&ClerkSettings>,
        issuers: &[IssuerSettings],
        problems: &mut Problems,
    ) -> PolicySettings {
        if p.inspect_max_bytes == 0 || p.inspect_max_bytes > 64 * 1024 {
            problems.push(
                "policy.inspect_max_bytes",
                "must be between 1 and 65536 (bodies are held in memory to inspect)",
            );
        }
        let default_scopes = p.default_scopes.parse().unwrap_or_else(|e: NotAChoice| {
            problems.push("policy.default_scopes", e.to_string());
            DefaultScopes::None
        });
        for (i, rule) in p.scopes.iter().enumerate() {
            if rule.scopes.is_empty() {
                problems.push(
                    format!("policy.scopes[{i}].scopes"),
                    "list at least one scope",
                );
            }
        }
        let mut rules = p.scopes.clone();
        if default_scopes == DefaultScopes::Twenty {
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
        PolicySettings {
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
        }
    }
}
