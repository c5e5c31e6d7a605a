//! The rules a JWT must pass, per issuer: algorithms pinned by configuration (never taken from
//! the token), `kid` required, no `jku`/`x5u`/`jwk`/`x5c`/`crit`, `iss` exact, `exp` required,
//! `nbf` checked with a small leeway, `sub` required, and token kinds kept apart: an OAuth
//! access token (`typ` at+jwt) must name this resource in `aud`; a Clerk session token (`sid`)
//! passes the `azp` allowlist and must not be `pending`.
//!
//! Keys come from `auth::jwks`; caching verified tokens is `auth`'s job, not this module's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::Deserialize;

use super::identity::{Identity, OrgContext, TokenKind};
use super::jwks::{JwksCache, KeyError};
use super::AuthFailure;
use crate::error::AuthError;

/// Rules that apply only to Clerk-issued tokens.
#[derive(Debug, Clone, Default)]
pub struct ClerkRules {
    /// Allowed `azp` values for session tokens; empty = not checked.
    pub authorized_parties: Vec<String>,
}

/// Verifies JWTs from one issuer.
pub struct JwtIssuer {
    issuer: String,
    jwks: Arc<JwksCache>,
    audiences: Vec<String>,
    /// Prepared once per allowed algorithm at startup.
    validations: HashMap<Algorithm, Validation>,
    clerk: Option<ClerkRules>,
}

#[derive(Deserialize)]
struct IssOnly {
    iss: Option<String>,
}

/// Read `iss` from an unverified token to pick the issuer; nothing else is trusted from it.
pub fn peek_issuer(token: &str) -> Result<String, AuthError> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| AuthError::Malformed)?;
    let peek: IssOnly = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    peek.iss.ok_or(AuthError::MissingClaim)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn contains_any(&self, wanted: &[String]) -> bool {
        match self {
            OneOrMany::One(s) => wanted.iter().any(|w| w == s),
            OneOrMany::Many(v) => v.iter().any(|s| wanted.iter().any(|w| w == s)),
        }
    }

    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => s.split_whitespace().map(str::to_string).collect(),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct OrgClaim {
    id: Option<String>,
    slg: Option<String>,
    rol: Option<String>,
    per: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    aud: Option<OneOrMany>,
    azp: Option<String>,
    sid: Option<String>,
    sts: Option<String>,
    scope: Option<String>,
    scp: Option<OneOrMany>,
    client_id: Option<String>,
    o: Option<OrgClaim>,
    org_id: Option<String>,
    org_slug: Option<String>,
    org_role: Option<String>,
}

fn is_access_token_typ(typ: Option<&str>) -> bool {
    typ.is_some_and(|t| {
        t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt")
    })
}

impl JwtIssuer {
    /// Build the verifier; `algorithms` is the issuer's allowlist.
    pub fn new(
        issuer: &str,
        jwks: Arc<JwksCache>,
        audiences: Vec<String>,
        algorithms: &[Algorithm],
        leeway: Duration,
        clerk: Option<ClerkRules>,
    ) -> Self {
        let validations = algorithms
            .iter()
            .map(|alg| {
                let mut v = Validation::new(*alg);
                v.algorithms = vec![*alg];
                v.leeway = leeway.as_secs();
                v.validate_exp = true;
                v.validate_nbf = true;
                v.validate_aud = false; // checked below, per token kind
                v.set_required_spec_claims(&["exp", "iss", "sub"]);
                v.set_issuer(&[issuer]);
                (*alg, v)
            })
            .collect();
        Self {
            issuer: issuer.to_string(),
            jwks,
            audiences,
            validations,
            clerk,
        }
    }

    /// The issuer string tokens must carry in `iss`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The key cache behind this issuer.
    pub fn jwks(&self) -> &Arc<JwksCache> {
        &self.jwks
    }

    /// Verify signature and claims; classify the token.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        let header: Header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.jku.is_some()
            || header.x5u.is_some()
            || header.jwk.is_some()
            || header.x5c.is_some()
            || header.crit.is_some()
        {
            return Err(AuthError::ForbiddenHeader.into());
        }
        let validation = self
            .validations
            .get(&header.alg)
            .ok_or(AuthError::AlgorithmNotAllowed)?;
        let kid = header.kid.as_deref().ok_or(AuthError::MissingKid)?;
        let key = match self.jwks.key(kid).await {
            Ok(k) => k,
            Err(KeyError::Unknown) => return Err(AuthError::UnknownKey.into()),
            Err(KeyError::Unavailable) => {
                return Err(AuthFailure::Unavailable("signing keys"));
            }
        };
        if !key.algorithms.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed.into());
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::InvalidIssuer => AuthError::UnknownIssuer,
                    ErrorKind::MissingRequiredClaim(_) => AuthError::MissingClaim,
                    ErrorKind::InvalidAlgorithm => AuthError::AlgorithmNotAllowed,
                    _ => AuthError::Malformed,
                }
            })?;
        self.classify(header.typ.as_deref(), data.claims)
            .map_err(AuthFailure::from)
    }

    fn classify(&self, typ: Option<&str>, claims: Claims) -> Result<Identity, AuthError> {
        if claims.sub.is_empty() {
            return Err(AuthError::MissingClaim);
        }
        let kind = if is_access_token_typ(typ) {
            TokenKind::OAuthJwt
        } else if self.clerk.is_some() && claims.sid.is_some() {
            TokenKind::ClerkSession
        } else if self.clerk.is_some() {
            // Clerk's access tokens say at+jwt and its session tokens carry sid: anything else
            // (an ID token, a custom template) is not a credential for this resource.
            return Err(AuthError::WrongKind);
        } else {
            // Other issuers often type access tokens plain "JWT"; the audience decides.
            TokenKind::OAuthJwt
        };
        match kind {
            TokenKind::ClerkSession => {
                if claims.sts.as_deref() == Some("pending") {
                    return Err(AuthError::PendingSession);
                }
                let parties = self
                    .clerk
                    .as_ref()
                    .map(|c| c.authorized_parties.as_slice())
                    .unwrap_or_default();
                if !parties.is_empty() {
                    let azp = claims.azp.as_deref().map(|a| a.trim_end_matches('/'));
                    if !azp.is_some_and(|a| parties.iter().any(|p| p == a)) {
                        return Err(AuthError::UnauthorizedParty);
                    }
                }
            }
            _ => {
                if !claims
                    .aud
                    .as_ref()
                    .is_some_and(|aud| aud.contains_any(&self.audiences))
                {
                    return Err(AuthError::WrongAudience);
                }
            }
        }
        let scopes = match (claims.scope, claims.scp) {
            (Some(s), _) => s.split_whitespace().map(str::to_string).collect(),
            (None, Some(scp)) => scp.into_vec(),
            (None, None) => Vec::new(),
        };
        let org = match claims.o {
            Some(o) => o.id.map(|id| OrgContext {
                id,
                slug: o.slg,
                role: o.rol,
                permissions: o
                    .per
                    .map(|p| p.split(',').map(str::to_string).collect())
                    .unwrap_or_default(),
            }),
            None => claims.org_id.map(|id| OrgContext {
                id,
                slug: claims.org_slug,
                role: claims.org_role,
                permissions: Vec::new(),
            }),
        };
        let expires_at = u64::try_from(claims.exp)
            .ok()
            .map(|s| UNIX_EPOCH + Duration::from_secs(s));
        Ok(Identity {
            subject: claims.sub,
            issuer: self.issuer.clone(),
            kind,
            scopes,
            client_id: claims.client_id.or(claims.azp),
            org,
            expires_at: expires_at.or(Some(SystemTime::now())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_reads_iss_and_rejects_non_jwts() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"iss":"https://issuer.example","sub":"u"}"#);
        let token = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.sig");
        assert_eq!(peek_issuer(&token).as_deref(), Ok("https://issuer.example"));
        assert_eq!(peek_issuer("oat_abc"), Err(AuthError::Malformed));
        assert_eq!(peek_issuer("a.b.c.d"), Err(AuthError::Malformed));
    }

    #[test]
    fn access_token_typ_variants() {
        assert!(is_access_token_typ(Some("at+jwt")));
        assert!(is_access_token_typ(Some("application/AT+JWT")));
        assert!(!is_access_token_typ(Some("JWT")));
        assert!(!is_access_token_typ(None));
    }
}
