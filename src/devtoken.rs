//! Offline development tokens: `keygate dev-token` signs an OAuth access token (`typ` at+jwt)
//! with the `[dev]` key from the config, for the issuer that `config/dev.toml` trusts through a
//! static JWKS file. Nothing here runs inside the gateway.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::config::Settings;

/// What to put in the token.
pub struct DevTokenRequest {
    pub subject: String,
    pub scopes: Vec<String>,
    pub ttl_secs: u64,
    pub org: Option<String>,
}

/// Sign a development access token for `settings.dev`.
pub fn mint(settings: &Settings, req: &DevTokenRequest) -> anyhow::Result<String> {
    let dev = settings
        .dev
        .as_ref()
        .context("the config has no [dev] section (see config/dev.toml)")?;
    let pem = std::fs::read(&dev.signing_key_file)
        .with_context(|| format!("reading {}", dev.signing_key_file.display()))?;
    let key =
        EncodingKey::from_rsa_pem(&pem).context("the dev signing key is not an RSA PEM key")?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock before 1970")?
        .as_secs();
    let mut header = Header::new(Algorithm::RS256);
    header.typ = Some("at+jwt".into());
    header.kid = Some(dev.kid.clone());
    let mut claims = serde_json::json!({
        "iss": dev.issuer,
        "sub": req.subject,
        "aud": settings.resource.url,
        "client_id": "keygate-dev",
        "scope": req.scopes.join(" "),
        "iat": now,
        "nbf": now,
        "exp": now + req.ttl_secs,
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    if let Some(org) = &req.org {
        claims["o"] = serde_json::json!({ "id": org });
    }
    jsonwebtoken::encode(&header, &claims, &key).context("signing the token")
}
