//! `[policy]` compiled at startup: the scope rules (the configured ones, then the built-in
//! defaults `policy.default_scopes` names), the authorization rules with the clock they read,
//! and the failed-authentication budget. Problems join the configuration's (see
//! `app::configure`), naming the option; the proxy checks requests against what this builds.

use crate::config::{ClerkSettings, DefaultScopes, IssuerSettings, PolicySettings, Problems};

use super::auth_failures::AuthFailuresSettings;
use super::mcp::ScopeRules;
use super::rules::{Clock, IssuerFacts, Rules};

/// The policy the gateway runs on, compiled from [`PolicySettings`].
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    /// Configured rules, then the built-in Twenty rules when `default_scopes = "twenty"`.
    pub scope_rules: ScopeRules,
    /// `[[policy.rules]]` and `policy.email_domains`.
    pub rules: Rules,
    /// The clock rules read (the system's; tests set a fixed one).
    pub clock: Clock,
    /// The per-client-IP failed-authentication budget.
    pub auth_failures: AuthFailuresSettings,
}

impl CompiledPolicy {
    /// Compile `[policy]`; role rules apply to the issuers (Clerk and `[[issuers]]`) whose claim
    /// maps carry roles.
    pub fn compile(
        p: &PolicySettings,
        clerk: Option<&ClerkSettings>,
        issuers: &[IssuerSettings],
        problems: &mut Problems,
    ) -> CompiledPolicy {
        let mut rules = p.scopes.clone();
        if p.default_scopes == DefaultScopes::Twenty {
            rules.extend(ScopeRules::twenty_default_config());
        }
        let scope_rules = match ScopeRules::compile(&rules) {
            Ok(r) => r,
            Err(e) => {
                problems.push("policy.scopes", e);
                ScopeRules::twenty_default()
            }
        };
        let auth_failures = p.auth_failures.validate("policy.auth_failures", problems);
        let issuer_facts: Vec<IssuerFacts> = clerk
            .iter()
            .map(|c| IssuerFacts {
                issuer: c.issuer.clone(),
                maps_roles: c.claims.maps_roles(true),
            })
            .chain(issuers.iter().map(|i| IssuerFacts {
                issuer: i.issuer.clone(),
                maps_roles: i.claims.maps_roles(false),
            }))
            .collect();
        let rules = Rules::compile(
            &p.rules,
            p.email_domains.as_deref(),
            &issuer_facts,
            problems,
        );
        CompiledPolicy {
            scope_rules,
            rules,
            clock: Clock::system(),
            auth_failures,
        }
    }
}
