//! Scope rules (`[[policy.scopes]]`, plus the built-in Twenty rules): a method glob and an
//! optional name glob map a call to the scopes it requires.

use globset::{Candidate, GlobBuilder, GlobMatcher};

use super::parse::{RpcCall, TOOLS_CALL};
use crate::config::file::ScopeRuleConfig;

/// A compiled glob; plain strings and `*` skip the regex.
#[derive(Debug, Clone)]
pub(crate) enum Pattern {
    Any,
    Exact(String),
    Glob(GlobMatcher),
}

impl Pattern {
    pub(crate) fn compile(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("empty pattern".into());
        }
        if pattern == "*" {
            return Ok(Pattern::Any);
        }
        if !pattern.contains(['*', '?', '[', ']', '{', '}', '\\']) {
            return Ok(Pattern::Exact(pattern.to_owned()));
        }
        // `*` crosses `/` (method and URI segments are not paths); explicit escaping so the
        // meaning of `\` does not depend on the platform.
        GlobBuilder::new(pattern)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map(|g| Pattern::Glob(g.compile_matcher()))
            .map_err(|e| e.to_string())
    }

    pub(crate) fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(p) => p == s,
            Pattern::Glob(g) => g.is_match_candidate(&Candidate::from_bytes(s.as_bytes())),
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    method: Pattern,
    name: Option<Pattern>,
    scopes: Vec<String>,
}

impl Rule {
    fn matches(&self, call: &RpcCall<'_>) -> bool {
        self.method.matches(&call.method)
            && match (&self.name, &call.name) {
                (None, _) => true,
                (Some(p), Some(n)) => p.matches(n),
                (Some(_), None) => false,
            }
    }
}

/// Scope rules compiled once at startup; the first matching rule decides.
#[derive(Debug, Clone)]
pub struct ScopeRules {
    rules: Vec<Rule>,
}

/// RFC 6749 `scope-token`: `%x21 / %x23-5B / %x5D-7E`, so it fits a quoted `scope="…"`.
pub(crate) fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x5b | 0x5d..=0x7e))
}

impl ScopeRules {
    /// Compile config rules, naming the rule index and the bad glob or scope on error.
    pub fn compile(rules: &[ScopeRuleConfig]) -> Result<Self, String> {
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let method = Pattern::compile(&r.method).map_err(|e| {
                format!("scope_rules[{i}].method: invalid glob {:?}: {e}", r.method)
            })?;
            let name = match &r.name {
                None => None,
                Some(n) => Some(
                    Pattern::compile(n)
                        .map_err(|e| format!("scope_rules[{i}].name: invalid glob {n:?}: {e}"))?,
                ),
            };
            if let Some(bad) = r.scopes.iter().find(|s| !is_scope_token(s)) {
                return Err(format!(
                    "scope_rules[{i}].scopes: {bad:?} is not a valid OAuth scope token"
                ));
            }
            compiled.push(Rule {
                method,
                name,
                scopes: r.scopes.clone(),
            });
        }
        Ok(Self { rules: compiled })
    }

    /// The scopes a call needs: the first rule whose method (and name, if the rule has one)
    /// matches; no rule -> none needed.
    pub fn required(&self, call: &RpcCall<'_>) -> &[String] {
        self.rules
            .iter()
            .find(|r| r.matches(call))
            .map(|r| r.scopes.as_slice())
            .unwrap_or(&[])
    }

    /// Check every call against `granted`; on denial, return all the scopes the request needs
    /// (union over the calls, sorted, deduplicated) for the `WWW-Authenticate` `scope`.
    pub fn authorize(&self, calls: &[RpcCall<'_>], granted: &[String]) -> Result<(), Vec<String>> {
        let allowed = calls
            .iter()
            .all(|c| self.required(c).iter().all(|s| granted.contains(s)));
        if allowed {
            return Ok(());
        }
        let mut needed: Vec<String> = calls
            .iter()
            .flat_map(|c| self.required(c).iter().cloned())
            .collect();
        needed.sort_unstable();
        needed.dedup();
        Err(needed)
    }

    /// The Twenty default as config rules, so it can be shown, extended or put after own rules.
    ///
    /// Protocol housekeeping (`initialize`, `ping`, `notifications/*`, and `server/discover`,
    /// which replaces `initialize` in 2026-07-28) needs no scope: it carries no CRM data, the
    /// token is already authenticated, and requiring `twenty:read` would stop a token holding
    /// only `twenty:write` from connecting, or from cancelling a call, instead of answering the
    /// first data call with a precise `insufficient_scope`. Read-named tools (`get_*`, `list_*`,
    /// `search_*`, `find_*`, `filter_*`, as the Twenty server names them) need `twenty:read`;
    /// every other tool needs `twenty:write`, so an unknown tool fails closed. Everything else
    /// (listing, `resources/*`, `prompts/*`, completion, unknown methods) needs `twenty:read`.
    pub fn twenty_default_config() -> Vec<ScopeRuleConfig> {
        let rule = |method: &str, name: Option<&str>, scopes: &[&str]| ScopeRuleConfig {
            method: method.to_owned(),
            name: name.map(str::to_owned),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        };
        vec![
            rule("initialize", None, &[]),
            rule("ping", None, &[]),
            rule("notifications/*", None, &[]),
            rule("server/discover", None, &[]),
            rule(
                TOOLS_CALL,
                Some("{get,list,search,find,filter}_*"),
                &["twenty:read"],
            ),
            rule(TOOLS_CALL, None, &["twenty:write"]),
            rule("*", None, &["twenty:read"]),
        ]
    }

    /// The default for the Twenty MCP server (see [`ScopeRules::twenty_default_config`]).
    pub fn twenty_default() -> Self {
        // The patterns are constants covered by a test; should they ever fail to compile, fall
        // back to demanding both scopes for everything rather than allowing anything.
        Self::compile(&Self::twenty_default_config()).unwrap_or_else(|_| Self {
            rules: vec![Rule {
                method: Pattern::Any,
                name: None,
                scopes: vec!["twenty:read".into(), "twenty:write".into()],
            }],
        })
    }
}
