//! The verified identity a request carries once its token has been accepted: the mapped facts
//! (issuer, subject, org, roles, email, scopes, second-factor time) every policy, rate key, key
//! slot and identity header reads. How tokens become one is `auth::jwt`, `auth::clerk` and
//! `auth::claims`.

use std::time::SystemTime;

/// What kind of credential proved the identity; kinds are never interchangeable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// A Clerk browser session token (`typ` JWT, carries `sid`).
    ClerkSession,
    /// An OAuth access token in JWT form (`typ` at+jwt), from Clerk or another issuer.
    OAuthJwt,
    /// A Clerk opaque OAuth access token (`oat_…`).
    OAuthOpaque,
    /// A Clerk machine-to-machine token (`mt_…`).
    M2m,
    /// A Clerk API key (`ak_…`).
    ApiKey,
}

impl TokenKind {
    /// A short, stable label for logs, metrics and the identity header.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::ClerkSession => "session",
            TokenKind::OAuthJwt => "oauth_jwt",
            TokenKind::OAuthOpaque => "oauth_opaque",
            TokenKind::M2m => "m2m",
            TokenKind::ApiKey => "api_key",
        }
    }
}

/// Organisation context from a Clerk token (`o` claim) or an org-owned API key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrgContext {
    pub id: String,
    pub slug: Option<String>,
    pub role: Option<String>,
    pub permissions: Vec<String>,
}

/// Who is calling, as proven by a verified token.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The subject: a user id (`user_…`), machine id (`mch_…`) or org id for org API keys.
    pub subject: String,
    pub issuer: String,
    pub kind: TokenKind,
    pub scopes: Vec<String>,
    pub client_id: Option<String>,
    pub org: Option<OrgContext>,
    /// When the credential stops being valid; caches never keep it past this.
    pub expires_at: Option<SystemTime>,
    /// Roles from the issuer's mapped roles claim, plus the org role when there is one.
    pub roles: Vec<String>,
    /// The mapped email address, when the token carries one.
    pub email: Option<String>,
    /// The issuer's `email_verified`, when it says (absent: the issuer does not tell).
    pub email_verified: Option<bool>,
    /// When a second factor was last verified (Clerk `fva`, OIDC `amr` + `auth_time`).
    pub second_factor_at: Option<SystemTime>,
}

impl Identity {
    /// Whether the identity holds `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// A bare identity of `kind` (no scopes, org, roles, email or MFA facts).
    pub fn new(issuer: &str, subject: &str, kind: TokenKind) -> Self {
        Self {
            subject: subject.to_string(),
            issuer: issuer.to_string(),
            kind,
            scopes: Vec::new(),
            client_id: None,
            org: None,
            expires_at: None,
            roles: Vec::new(),
            email: None,
            email_verified: None,
            second_factor_at: None,
        }
    }

    /// Whether the credential is an OAuth access token (a client that can step up).
    pub fn is_oauth(&self) -> bool {
        matches!(self.kind, TokenKind::OAuthJwt | TokenKind::OAuthOpaque)
    }
}
