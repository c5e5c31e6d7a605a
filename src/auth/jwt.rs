//! The rules a JWT must pass, per issuer: algorithms pinned by configuration (never taken from
//! the token), `kid` required, no `jku`/`x5u`/`jwk`/`x5c`/`crit`, `iss` exact, `exp` required,
//! `nbf` checked with a small leeway (each NumericDate a JSON number, fractions allowed,
//! `iat` included), `sub` required, and token kinds kept apart: an OAuth
//! access token (`typ` at+jwt) must name this resource in `aud`; a Clerk session token (`sid`)
//! passes the `azp` allowlist and must not be `pending`.
//!
//! Keys come from `auth::jwks`; caching verified tokens is `auth`'s job, not this module's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::Deserialize;

use super::claims::{self, ClaimMap, MappedClaims, NumericDate};
use super::identity::{Identity, OrgContext, TokenKind};
use super::jwks::{JwksCache, KeyError};
use super::AuthError;
use super::AuthFailure;

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
    /// Where this issuer's tokens carry user id, org, roles, email and scopes.
    claims: ClaimMap,
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

/// An optional NumericDate that, when present, is one: `null` is not a number either.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<NumericDate>, D::Error> {
    NumericDate::deserialize(d).map(Some)
}

/// The claims keygate reads. `exp` and `nbf` are compared with the clock by `jsonwebtoken`
/// (which reads fractional NumericDates to the nearest second, within the configured leeway);
/// here each NumericDate must also be one, `iat` included.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: NumericDate,
    #[allow(dead_code)] // read for its type: a non-number is refused
    #[serde(default, deserialize_with = "present")]
    nbf: Option<NumericDate>,
    #[allow(dead_code)] // read for its type: a non-number is refused
    #[serde(default, deserialize_with = "present")]
    iat: Option<NumericDate>,
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
        claims: ClaimMap,
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
            claims,
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
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        self.verify_with_header(token, header).await
    }

    /// [`JwtIssuer::verify`], for a caller that has already decoded the token's header.
    pub async fn verify_with_header(
        &self,
        token: &str,
        header: Header,
    ) -> Result<Identity, AuthFailure> {
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
        // Decoded once as JSON: the typed claims and the mapped facts are both read from it.
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidIssuer => AuthError::UnknownIssuer,
                ErrorKind::MissingRequiredClaim(_) => AuthError::MissingClaim,
                ErrorKind::InvalidAlgorithm => AuthError::AlgorithmNotAllowed,
                _ => AuthError::Malformed,
            },
        )?;
        let serde_json::Value::Object(raw) = &data.claims else {
            return Err(AuthError::Malformed.into());
        };
        let typed = Claims::deserialize(&data.claims).map_err(|_| AuthError::Malformed)?;
        let identity = self.classify(header.typ.as_deref(), typed)?;
        let mapped = MappedClaims::read(&self.claims, raw).map_err(AuthFailure::Claims)?;
        Ok(apply_mapping(
            identity,
            mapped,
            claims::second_factor_at(raw),
        ))
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
        let expires_at = claims.exp.instant();
        Ok(Identity {
            subject: claims.sub,
            issuer: self.issuer.clone(),
            kind,
            scopes,
            client_id: claims.client_id.or(claims.azp),
            org,
            expires_at: expires_at.or(Some(SystemTime::now())),
            roles: Vec::new(),
            email: None,
            email_verified: None,
            second_factor_at: None,
        })
    }
}

/// Lay the mapped facts over the built-in reading: a mapped fact replaces the built-in one;
/// roles are the mapped roles plus the org role, once each.
fn apply_mapping(
    mut identity: Identity,
    mapped: MappedClaims,
    second_factor_at: Option<SystemTime>,
) -> Identity {
    if let Some(user) = mapped.user_id {
        identity.subject = user;
    }
    if let Some(scopes) = mapped.scopes {
        identity.scopes = scopes;
    }
    if let Some(id) = mapped.org_id {
        identity.org = Some(OrgContext {
            id,
            slug: None,
            role: mapped.org_role.clone(),
            permissions: Vec::new(),
        });
    } else if let (Some(org), Some(role)) = (identity.org.as_mut(), mapped.org_role.clone()) {
        org.role = Some(role);
    }
    let mut roles = mapped.roles.unwrap_or_default();
    let org_role = identity
        .org
        .as_ref()
        .and_then(|o| o.role.clone())
        .or(mapped.org_role);
    if let Some(role) = org_role {
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    identity.roles = roles;
    identity.email = mapped.email;
    identity.email_verified = mapped.email_verified;
    identity.second_factor_at = second_factor_at;
    identity
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

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

    const RSA_A: &[u8] = include_bytes!("../../tests/fixtures/rsa-a.pem");
    const ISSUER: &str = "https://issuer.example";
    const AUDIENCE: &str = "https://mcp.example.com/mcp";

    /// An issuer whose keys come from a JWKS file holding the public half of `rsa-a.pem`.
    async fn issuer() -> JwtIssuer {
        let encoding = jsonwebtoken::EncodingKey::from_rsa_pem(RSA_A).expect("key");
        let mut jwk = serde_json::to_value(
            jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::RS256).expect("jwk"),
        )
        .expect("json");
        jwk["kid"] = serde_json::json!("kid-a");
        jwk["alg"] = serde_json::json!("RS256");
        let path = std::env::temp_dir().join(format!(
            "keygate-jwt-test-{}-{}.json",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&path, serde_json::json!({ "keys": [jwk] }).to_string()).expect("write");
        let settings = crate::config::JwksSettings {
            refresh_interval: Duration::from_secs(300),
            unknown_kid_cooldown: Duration::from_secs(30),
            max_stale: Duration::from_secs(3600),
            fetch_timeout: Duration::from_secs(5),
            max_bytes: 64 * 1024,
            max_keys: 16,
        };
        let jwks = Arc::new(JwksCache::from_file(
            ISSUER,
            path.clone(),
            vec![Algorithm::RS256],
            &settings,
            reqwest::Client::new(),
        ));
        jwks.refresh().await.expect("keys load");
        let _ = std::fs::remove_file(&path);
        JwtIssuer::new(
            ISSUER,
            jwks,
            vec![AUDIENCE.into()],
            &[Algorithm::RS256],
            Duration::from_secs(5),
            None,
            Default::default(),
        )
    }

    fn now() -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64()
            .floor()
    }

    /// An RS256 access token with the usual claims, `edit`ed.
    fn token(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let now = now() as i64;
        let mut claims = serde_json::json!({
            "iss": ISSUER, "sub": "user_1", "aud": AUDIENCE, "scope": "twenty:read",
            "iat": now, "nbf": now - 5, "exp": now + 600,
        });
        edit(&mut claims);
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = Some("kid-a".into());
        header.typ = Some("at+jwt".into());
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(RSA_A).expect("key");
        jsonwebtoken::encode(&header, &claims, &key).expect("sign")
    }

    async fn verdict(issuer: &JwtIssuer, token: String) -> Result<Identity, AuthError> {
        issuer.verify(&token).await.map_err(|e| match e {
            AuthFailure::Rejected(e) => e,
            AuthFailure::Unavailable(what) => panic!("{what} unavailable"),
            AuthFailure::Saturated(_) => panic!("a JWT issuer is never saturated"),
            AuthFailure::Claims(e) => panic!("no claims are mapped here: {e}"),
        })
    }

    #[tokio::test]
    async fn numeric_dates_may_be_fractional() {
        let issuer = issuer().await;
        let now = now();
        let id = verdict(
            &issuer,
            token(|c| {
                c["exp"] = serde_json::json!(now + 600.5);
                c["nbf"] = serde_json::json!(now - 1.25);
                c["iat"] = serde_json::json!(now - 0.75);
            }),
        )
        .await
        .expect("a fractional NumericDate is a NumericDate");
        // The credential ends at its exact `exp`, not a rounded one.
        let expires = id.expires_at.expect("expiry");
        let exp = UNIX_EPOCH + Duration::from_secs_f64(now + 600.5);
        assert_eq!(expires, exp);
        assert_eq!(
            verdict(&issuer, token(|c| c["exp"] = serde_json::json!(now - 10.5)))
                .await
                .err(),
            Some(AuthError::Expired)
        );
        assert_eq!(
            verdict(
                &issuer,
                token(|c| c["nbf"] = serde_json::json!(now + 600.5))
            )
            .await
            .err(),
            Some(AuthError::NotYetValid)
        );
    }

    #[tokio::test]
    async fn numeric_dates_must_be_numbers() {
        let issuer = issuer().await;
        let now = now();
        for claim in ["exp", "nbf", "iat"] {
            for bad in [
                serde_json::json!((now + 600.0).to_string()),
                serde_json::json!([now + 600.0]),
                serde_json::json!({"t": now + 600.0}),
                serde_json::json!(true),
                serde_json::json!(null),
                serde_json::json!(-1),
                serde_json::json!(-1.5),
            ] {
                let result = verdict(&issuer, token(|c| c[claim] = bad.clone())).await;
                assert!(result.is_err(), "{claim} = {bad}");
            }
        }
        // Without `exp` there is no token; `nbf` and `iat` are optional.
        let no_exp = token(|c| {
            c.as_object_mut().map(|o| o.remove("exp"));
        });
        assert!(verdict(&issuer, no_exp).await.is_err());
        assert!(verdict(&issuer, token(|_| {})).await.is_ok());
        let neither = token(|c| {
            c.as_object_mut().map(|o| {
                o.remove("nbf");
                o.remove("iat")
            });
        });
        assert!(verdict(&issuer, neither).await.is_ok());
    }
}

/// Property tests over the claims parser, which reads whatever a signer put in a token.
#[cfg(test)]
mod prop {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::Claims;

    fn claim_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            (-1e20f64..1e20).prop_map(|f| json!(f)),
            Just(json!(null)),
            any::<bool>().prop_map(|b| json!(b)),
            "[0-9]{1,12}(\\.[0-9]{1,3})?".prop_map(|s| json!(s)),
            Just(json!([1_700_000_000])),
            Just(json!({"secs": 1_700_000_000})),
        ]
    }

    /// Non-negative and below 2^64 seconds (anything later no clock can hold).
    fn is_date(v: &Value) -> bool {
        v.as_f64()
            .is_some_and(|f| f.is_finite() && f >= 0.0 && f < u64::MAX as f64)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// `exp`, `nbf` and `iat` are read iff each one present is a non-negative JSON number,
        /// integer or not; anything else refuses the whole token.
        #[test]
        fn dates_are_numbers_or_the_token_is_refused(
            exp in claim_value(),
            nbf in proptest::option::of(claim_value()),
            iat in proptest::option::of(claim_value()),
        ) {
            let mut claims = json!({"sub": "user_1", "exp": exp});
            if let Some(v) = &nbf {
                claims["nbf"] = v.clone();
            }
            if let Some(v) = &iat {
                claims["iat"] = v.clone();
            }
            let expected = is_date(&exp)
                && nbf.as_ref().is_none_or(is_date)
                && iat.as_ref().is_none_or(is_date);
            let parsed = serde_json::from_value::<Claims>(claims.clone());
            prop_assert_eq!(parsed.is_ok(), expected, "{}", claims);
            if let Ok(c) = parsed {
                let instant = c.exp.instant();
                prop_assert!(instant.is_some() || exp.as_f64().is_some_and(|f| f > 1e15));
            }
        }
    }
}
