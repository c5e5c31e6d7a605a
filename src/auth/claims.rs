//! Claim mapping: where an issuer puts the facts keygate authorizes on (user id, org id, org
//! role, roles, email, `email_verified`, scopes), and the second-factor facts (`fva`, `amr`,
//! `auth_time`) every issuer spells the same way.
//!
//! The maps themselves ([`ClaimMap`], [`ClaimPath`] and the path syntax) are settings, defined
//! in `config::claims`; this module reads tokens with them.
//!
//! Mapping happens once, when a token is verified; the [`Identity`](super::Identity) built from
//! it is cached with the token. A configured claim that is absent (or `null`) or of the wrong
//! type refuses the token with a [`ClaimError`] naming the mapping; it never silently becomes
//! "no org" or "no roles". This module does not verify tokens (`auth::jwt`) or decide what an
//! identity may do (`policy::rules`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use serde_json::{Map, Value};

pub use crate::config::{ClaimMap, ClaimPath, PathError};

/// The facts a mapping can name, as the configuration spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fact {
    UserId,
    OrgId,
    OrgRole,
    Roles,
    Email,
    EmailVerified,
    Scopes,
}

impl Fact {
    /// The option name under `claims`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fact::UserId => "user_id",
            Fact::OrgId => "org_id",
            Fact::OrgRole => "org_role",
            Fact::Roles => "roles",
            Fact::Email => "email",
            Fact::EmailVerified => "email_verified",
            Fact::Scopes => "scopes",
        }
    }

    /// The option's full name (`claims.org_id`), as refusals and metrics name it.
    pub fn option(self) -> &'static str {
        match self {
            Fact::UserId => "claims.user_id",
            Fact::OrgId => "claims.org_id",
            Fact::OrgRole => "claims.org_role",
            Fact::Roles => "claims.roles",
            Fact::Email => "claims.email",
            Fact::EmailVerified => "claims.email_verified",
            Fact::Scopes => "claims.scopes",
        }
    }

    /// Every fact, for priming metrics.
    pub const ALL: [Fact; 7] = [
        Fact::UserId,
        Fact::OrgId,
        Fact::OrgRole,
        Fact::Roles,
        Fact::Email,
        Fact::EmailVerified,
        Fact::Scopes,
    ];
}

/// A configured claim that the token does not satisfy. The text names the mapping option
/// (from configuration), never a value from the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("the token lacks the claim mapped as {}", .0.as_str())]
    Missing(Fact),
    #[error("the token's claim mapped as {} has the wrong type", .0.as_str())]
    WrongType(Fact),
}

impl ClaimError {
    /// A stable label for the `reason` of refusals and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ClaimError::Missing(_) => "claim_missing",
            ClaimError::WrongType(_) => "claim_type",
        }
    }

    /// The mapping option at fault.
    pub fn fact(&self) -> Fact {
        match self {
            ClaimError::Missing(f) | ClaimError::WrongType(f) => *f,
        }
    }
}

/// What the mapping read out of one token's claims.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappedClaims {
    /// `Some` only when `user_id` is mapped (else the subject is `sub`).
    pub user_id: Option<String>,
    /// `Some` only when `org_id` is mapped.
    pub org_id: Option<String>,
    pub org_role: Option<String>,
    /// `Some` only when `roles` is mapped.
    pub roles: Option<Vec<String>>,
    pub email: Option<String>,
    pub email_verified: Option<bool>,
    /// `Some` only when `scopes` is mapped.
    pub scopes: Option<Vec<String>>,
}

fn string(fact: Fact, v: &Value) -> Result<String, ClaimError> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        Value::String(_) => Err(ClaimError::Missing(fact)),
        // Numeric ids are common (home-grown issuers); they are ids all the same.
        Value::Number(n) if fact != Fact::Email => Ok(n.to_string()),
        _ => Err(ClaimError::WrongType(fact)),
    }
}

/// A JSON array of strings, or one space-separated string.
fn list(fact: Fact, v: &Value) -> Result<Vec<String>, ClaimError> {
    match v {
        Value::String(s) => Ok(s.split_whitespace().map(str::to_string).collect()),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                _ => Err(ClaimError::WrongType(fact)),
            })
            .collect(),
        _ => Err(ClaimError::WrongType(fact)),
    }
}

fn boolean(fact: Fact, v: &Value) -> Result<bool, ClaimError> {
    match v {
        Value::Bool(b) => Ok(*b),
        // Some issuers (Cognito) send the string form.
        Value::String(s) if s == "true" => Ok(true),
        Value::String(s) if s == "false" => Ok(false),
        _ => Err(ClaimError::WrongType(fact)),
    }
}

/// The value at `path` in `claims`; `null` counts as absent.
pub fn lookup<'a>(path: &ClaimPath, claims: &'a Map<String, Value>) -> Option<&'a Value> {
    let (first, rest) = path.segments().split_first()?;
    let mut value = claims.get(first)?;
    for segment in rest {
        value = value.as_object()?.get(segment)?;
    }
    (!value.is_null()).then_some(value)
}

fn mapped<T>(
    claims: &Map<String, Value>,
    path: Option<&ClaimPath>,
    fact: Fact,
    read: impl Fn(Fact, &Value) -> Result<T, ClaimError>,
) -> Result<Option<T>, ClaimError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let value = lookup(path, claims).ok_or(ClaimError::Missing(fact))?;
    read(fact, value).map(Some)
}

impl MappedClaims {
    /// Read every mapped fact; a configured one that is absent or mistyped is an error.
    /// Unmapped `email` / `email_verified` are read from the standard claims when present and
    /// well typed (and ignored otherwise).
    pub fn read(map: &ClaimMap, claims: &Map<String, Value>) -> Result<Self, ClaimError> {
        let email = match &map.email {
            Some(p) => mapped(claims, Some(p), Fact::Email, string)?,
            None => claims
                .get("email")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        };
        let email_verified = match &map.email_verified {
            Some(p) => mapped(claims, Some(p), Fact::EmailVerified, boolean)?,
            None => claims
                .get("email_verified")
                .and_then(|v| boolean(Fact::EmailVerified, v).ok()),
        };
        Ok(Self {
            user_id: mapped(claims, map.user_id.as_ref(), Fact::UserId, string)?,
            org_id: mapped(claims, map.org_id.as_ref(), Fact::OrgId, string)?,
            org_role: mapped(claims, map.org_role.as_ref(), Fact::OrgRole, string)?,
            roles: mapped(claims, map.roles.as_ref(), Fact::Roles, list)?,
            email,
            email_verified,
            scopes: mapped(claims, map.scopes.as_ref(), Fact::Scopes, list)?,
        })
    }
}

/// `amr` values (RFC 8176) that say more than one factor was used on their own.
const MULTI_FACTOR_AMR: &str = "mfa";

/// When the second factor was last verified, from the token's own claims:
///
/// - Clerk session tokens: `fva` = `[first, second]` factor ages in minutes at issue time
///   (`-1`: never); the second factor was verified `fva[1]` minutes before `iat`.
/// - OIDC: `amr` containing `mfa`, or two or more distinct methods, with `auth_time` (the
///   authentication that used them).
///
/// Absent or mistyped claims yield `None`: an MFA condition then fails closed.
pub fn second_factor_at(claims: &Map<String, Value>) -> Option<SystemTime> {
    let time = |name: &str| NumericDate::from_secs(claims.get(name)?.as_f64()?)?.instant();
    if let Some(fva) = claims.get("fva").and_then(Value::as_array) {
        let minutes = fva.get(1)?.as_i64()?;
        if minutes < 0 {
            return None;
        }
        let issued = time("iat")?;
        return issued.checked_sub(Duration::from_secs(u64::try_from(minutes).ok()? * 60));
    }
    let amr = claims.get("amr")?.as_array()?;
    let mut methods = amr.iter().filter_map(Value::as_str);
    let first = methods.next();
    // `mfa` itself, or two different methods.
    let multi = first == Some(MULTI_FACTOR_AMR)
        || methods.any(|m| m == MULTI_FACTOR_AMR || first.is_some_and(|f| f != m));
    if !multi {
        return None;
    }
    time("auth_time")
}

/// An RFC 7519 NumericDate: seconds since the epoch as a JSON number, which may have a
/// fraction (section 2). Strings, booleans, arrays, objects and negative or unrepresentable
/// values are refused.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NumericDate(f64);

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::from_secs(f64::deserialize(d)?)
            .ok_or_else(|| serde::de::Error::custom("NumericDate out of range"))
    }
}

impl NumericDate {
    /// `secs` as a NumericDate, if it is one.
    pub(crate) fn from_secs(secs: f64) -> Option<Self> {
        (secs.is_finite() && (0.0..u64::MAX as f64).contains(&secs)).then_some(Self(secs))
    }

    /// The instant, exactly (fraction included); `None` past what the clock can represent.
    pub(crate) fn instant(self) -> Option<SystemTime> {
        UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(self.0).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::UNIX_EPOCH;

    fn p(raw: &str) -> ClaimPath {
        ClaimPath::parse(raw).expect("path")
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn lookup_walks_objects_and_treats_null_as_absent() {
        let claims = obj(json!({
            "https://example.com/org": {"id": "org_1"},
            "realm_access": {"roles": ["a"]},
            "n": null,
        }));
        assert_eq!(
            lookup(&p("\"https://example.com/org\".id"), &claims),
            Some(&json!("org_1"))
        );
        assert_eq!(
            lookup(&p("realm_access.roles"), &claims),
            Some(&json!(["a"]))
        );
        assert_eq!(lookup(&p("realm_access.roles.x"), &claims), None);
        // An unquoted dotted name is a nested path, not the namespaced claim.
        assert_eq!(lookup(&p("https://example.com/org"), &claims), None);
        assert_eq!(lookup(&p("n"), &claims), None);
    }

    #[test]
    fn mapped_facts_missing_or_mistyped_are_refusals() {
        let map = ClaimMap {
            org_id: Some(p("organizationId")),
            roles: Some(p("roles")),
            ..ClaimMap::default()
        };
        let ok = MappedClaims::read(
            &map,
            &obj(json!({"organizationId": "o1", "roles": "a b", "email": "x@y.z"})),
        )
        .expect("mapped");
        assert_eq!(ok.org_id.as_deref(), Some("o1"));
        assert_eq!(ok.roles, Some(vec!["a".into(), "b".into()]));
        assert_eq!(ok.email.as_deref(), Some("x@y.z"));
        assert_eq!(
            MappedClaims::read(&map, &obj(json!({"roles": []}))),
            Err(ClaimError::Missing(Fact::OrgId))
        );
        assert_eq!(
            MappedClaims::read(&map, &obj(json!({"organizationId": "o1", "roles": [1]}))),
            Err(ClaimError::WrongType(Fact::Roles))
        );
        assert_eq!(
            MappedClaims::read(&map, &obj(json!({"organizationId": {}, "roles": []}))),
            Err(ClaimError::WrongType(Fact::OrgId))
        );
    }

    #[test]
    fn second_factor_time_from_fva_or_amr() {
        let iat = 1_800_000_000u64;
        let at = |v: Value| second_factor_at(&obj(v));
        assert_eq!(
            at(json!({"iat": iat, "fva": [0, 4]})),
            Some(UNIX_EPOCH + Duration::from_secs(iat - 240))
        );
        assert_eq!(at(json!({"iat": iat, "fva": [0, -1]})), None);
        assert_eq!(at(json!({"iat": iat, "fva": "x"})), None);
        assert_eq!(
            at(json!({"amr": ["pwd", "mfa"], "auth_time": iat})),
            Some(UNIX_EPOCH + Duration::from_secs(iat))
        );
        assert_eq!(
            at(json!({"amr": ["pwd", "otp"], "auth_time": iat})),
            Some(UNIX_EPOCH + Duration::from_secs(iat))
        );
        assert_eq!(at(json!({"amr": ["pwd"], "auth_time": iat})), None);
        assert_eq!(at(json!({"amr": ["pwd", "pwd"], "auth_time": iat})), None);
        assert_eq!(at(json!({"amr": ["mfa"]})), None);
        // A time that is not a NumericDate is no time.
        for bad in [json!(-5), json!("1800000000"), json!(1e300), json!(null)] {
            assert_eq!(at(json!({"amr": ["mfa"], "auth_time": bad})), None, "{bad}");
            assert_eq!(at(json!({"iat": bad, "fva": [0, 4]})), None, "{bad}");
        }
    }
}
