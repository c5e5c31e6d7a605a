//! `[auth]`: whether tokens are checked and required, their bounds, the identity headers sent
//! upstream; and what the issuer sections (`[clerk]`, `[[issuers]]`) share: the allowed
//! algorithms, the claim maps, and the checks across them (at least one issuer, none twice).

use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::claims::{ClaimMap, ClaimPath};
use super::file::{self, AuthFile};
use super::parse::{normal_paths, parse_header_name, secs};
use super::Problems;

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub enabled: bool,
    pub required: bool,
    pub max_token_bytes: usize,
    pub leeway: Duration,
    pub verified_cache_max_entries: u64,
    pub session_token_paths: Vec<String>,
    pub identity_headers: IdentityHeaders,
}

/// Header names that carry the verified identity upstream; `None` = not sent.
#[derive(Debug, Clone, Default)]
pub struct IdentityHeaders {
    pub user: Option<http::HeaderName>,
    pub org: Option<http::HeaderName>,
    pub scopes: Option<http::HeaderName>,
    pub token_kind: Option<http::HeaderName>,
    /// The issuer that vouched for the user: identity is (issuer, subject).
    pub issuer: Option<http::HeaderName>,
}

impl IdentityHeaders {
    /// Every configured name, so client-sent copies can be stripped.
    pub fn names(&self) -> impl Iterator<Item = &http::HeaderName> {
        [
            &self.user,
            &self.org,
            &self.scopes,
            &self.token_kind,
            &self.issuer,
        ]
        .into_iter()
        .flatten()
    }
}

impl AuthSettings {
    /// Validate `[auth]`.
    pub(crate) fn from_file(f: &AuthFile, problems: &mut Problems) -> AuthSettings {
        if f.max_token_bytes < 64 || f.max_token_bytes > 1024 * 1024 {
            problems.push("auth.max_token_bytes", "must be between 64 and 1048576");
        }
        if f.leeway_secs > 60 {
            problems.push("auth.leeway_secs", "must be at most 60 seconds");
        }
        let ih = &f.identity_headers;
        let identity_headers = IdentityHeaders {
            user: parse_header_name("auth.identity_headers.user", &ih.user, problems),
            org: parse_header_name("auth.identity_headers.org", &ih.org, problems),
            scopes: parse_header_name("auth.identity_headers.scopes", &ih.scopes, problems),
            token_kind: parse_header_name(
                "auth.identity_headers.token_kind",
                &ih.token_kind,
                problems,
            ),
            issuer: parse_header_name("auth.identity_headers.issuer", &ih.issuer, problems),
        };

        AuthSettings {
            enabled: f.enabled,
            required: f.required,
            max_token_bytes: f.max_token_bytes,
            leeway: secs(f.leeway_secs),
            verified_cache_max_entries: f.verified_cache_max_entries.max(1),
            session_token_paths: normal_paths(
                problems,
                "auth.session_token_paths",
                &f.session_token_paths,
            ),
            identity_headers,
        }
    }
}

/// An algorithm an issuer may sign with: asymmetric only.
fn asymmetric_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// An issuer's `algorithms` list: at least one, each asymmetric.
pub(crate) fn parse_algorithms(
    field: &str,
    raw: &[String],
    problems: &mut Problems,
) -> Vec<Algorithm> {
    let mut out = Vec::new();
    for name in raw {
        match asymmetric_algorithm(name) {
            Some(alg) => out.push(alg),
            None => problems.push(
                field,
                format!("{name:?} is not an allowed algorithm (asymmetric only: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"),
            ),
        }
    }
    if raw.is_empty() {
        problems.push(field, "at least one algorithm is required");
    }
    out
}

/// A `claims` table as a [`ClaimMap`]; a path that does not
/// parse is a problem naming the option.
pub(crate) fn claim_map(field: &str, f: &file::ClaimsFile, problems: &mut Problems) -> ClaimMap {
    let mut path = |name: &str, raw: &Option<file::ClaimPathFile>| {
        let parsed = match raw.as_ref()? {
            file::ClaimPathFile::Path(p) => ClaimPath::parse(p),
            file::ClaimPathFile::Segments(s) => ClaimPath::from_segments(s.clone()),
        };
        parsed
            .map_err(|e| problems.push(format!("{field}.{name}"), format!("the claim path {e}")))
            .ok()
    };
    ClaimMap {
        user_id: path("user_id", &f.user_id),
        org_id: path("org_id", &f.org_id),
        org_role: path("org_role", &f.org_role),
        roles: path("roles", &f.roles),
        email: path("email", &f.email),
        email_verified: path("email_verified", &f.email_verified),
        scopes: path("scopes", &f.scopes),
    }
}
