//! Organisation rules (`[policy.org]`): which organisations and roles may call.

use crate::auth::Identity;
use crate::config::file::OrgRulesConfig;

/// Why the org rules refused an identity; `Display` is safe to show clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrgDenial {
    #[error("this endpoint requires a token issued for an organization")]
    NoOrg,
    #[error("the token's organization is not allowed here")]
    OrgNotAllowed,
    #[error("the token's organization role is not allowed here")]
    RoleNotAllowed,
}

/// Org rules: with `allowed_org_ids` non-empty, the identity must carry one of them; with
/// `required_role`, its org role must equal it exactly (Clerk roles look like "org:admin"). A
/// token without org context is refused when any org rule is set.
pub fn check_org(rules: &OrgRulesConfig, identity: &Identity) -> Result<(), OrgDenial> {
    if !rules.is_active() {
        return Ok(());
    }
    let org = identity.org.as_ref().ok_or(OrgDenial::NoOrg)?;
    if !rules.allowed_org_ids.is_empty() && !rules.allowed_org_ids.contains(&org.id) {
        return Err(OrgDenial::OrgNotAllowed);
    }
    if let Some(role) = &rules.required_role {
        if org.role.as_deref() != Some(role.as_str()) {
            return Err(OrgDenial::RoleNotAllowed);
        }
    }
    Ok(())
}
