//! Authentication's own errors: why a token was refused ([`AuthError`], a 401) and why the
//! `Authorization` header could not be read ([`BearerError`]). Their HTTP responses are
//! `crate::error`'s.

use thiserror::Error;

/// Why a token was not accepted. The `Display` text is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token exceeds the maximum size")]
    TooLarge,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm is not allowed")]
    AlgorithmNotAllowed,
    #[error("token header names keys or extensions that are not accepted")]
    ForbiddenHeader,
    #[error("token has no key id")]
    MissingKid,
    #[error("token issuer is not trusted")]
    UnknownIssuer,
    #[error("token signing key is unknown")]
    UnknownKey,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not yet valid")]
    NotYetValid,
    #[error("token lacks a required claim")]
    MissingClaim,
    #[error("token was not issued for this resource")]
    WrongAudience,
    #[error("this kind of token is not accepted here")]
    WrongKind,
    #[error("token was issued to an unauthorized party")]
    UnauthorizedParty,
    #[error("session is not fully signed in")]
    PendingSession,
    #[error("token has been revoked")]
    Revoked,
    #[error("token is not valid")]
    Invalid,
}

impl AuthError {
    /// A stable, low-cardinality label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::TooLarge => "too_large",
            AuthError::Malformed => "malformed",
            AuthError::AlgorithmNotAllowed => "algorithm",
            AuthError::ForbiddenHeader => "forbidden_header",
            AuthError::MissingKid => "missing_kid",
            AuthError::UnknownIssuer => "unknown_issuer",
            AuthError::UnknownKey => "unknown_key",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::MissingClaim => "missing_claim",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::WrongKind => "wrong_kind",
            AuthError::UnauthorizedParty => "unauthorized_party",
            AuthError::PendingSession => "pending_session",
            AuthError::Revoked => "revoked",
            AuthError::Invalid => "invalid",
        }
    }
}

/// Why the `Authorization` header did not yield a bearer token to verify.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BearerError {
    /// More than one `Authorization` header: a bad request, not a bad token.
    #[error("Multiple Authorization headers are not allowed")]
    Repeated,
    /// The credential is a bearer token that is refused before verification.
    #[error(transparent)]
    Token(#[from] AuthError),
}

impl BearerError {
    /// A stable, low-cardinality label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            BearerError::Repeated => "bad_request",
            BearerError::Token(e) => e.reason(),
        }
    }
}
