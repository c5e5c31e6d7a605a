//! `[policy]`: MCP transport checks (body bounds, protocol versions, session binding), the
//! scope rules (`[[policy.scopes]]`, plus the built-in Twenty rules), org rules, authorization
//! rules (`[[policy.rules]]`) and the failed-authentication budget. The rules and the budget
//! are held as written; the policy module compiles them at startup (`policy::CompiledPolicy`).

use std::str::FromStr;
use std::time::Duration;

use super::file::{AuthFailuresConfig, OrgRulesConfig, PolicyFile, RuleConfig, ScopeRuleConfig};
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
    /// `[[policy.scopes]]`, as written (each lists at least one scope).
    pub scopes: Vec<ScopeRuleConfig>,
    /// The built-in scope rules added after the configured ones.
    pub default_scopes: DefaultScopes,
    pub org: OrgRulesConfig,
    /// `[[policy.rules]]`, as written.
    pub rules: Vec<RuleConfig>,
    /// `policy.email_domains`, as written.
    pub email_domains: Option<Vec<String>>,
    /// `[policy.auth_failures]`, as written: the per-client-IP failed-authentication budget.
    pub auth_failures: AuthFailuresConfig,
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
    /// Validate `[policy]` (what needs no compiling; the rules and the budget are compiled by
    /// `policy::CompiledPolicy`).
    pub(crate) fn from_file(p: &PolicyFile, problems: &mut Problems) -> PolicySettings {
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
        PolicySettings {
            max_body_bytes: p.max_body_bytes,
            inspect_max_bytes: p.inspect_max_bytes.min(64 * 1024),
            protocol_versions: p.protocol_versions.clone(),
            bind_sessions: p.bind_sessions,
            session_ttl: secs(p.session_ttl_secs.max(60)),
            mcp_paths: normal_paths(problems, "policy.mcp_paths", &p.mcp_paths),
            scopes: p.scopes.clone(),
            default_scopes,
            org: p.org.clone(),
            rules: p.rules.clone(),
            email_domains: p.email_domains.clone(),
            auth_failures: p.auth_failures.clone(),
        }
    }
}
