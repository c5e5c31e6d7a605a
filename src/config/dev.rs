//! `[dev]`: the development issuer (a local signing key), and the checks that keep its
//! authorization server, which signs tokens for anyone, to offline development.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use url::Url;

use super::file::{self, FileConfig};
use super::issuers::IssuerSettings;
use super::parse::resolve_path;
use super::Problems;

#[derive(Debug, Clone)]
pub struct DevSettings {
    pub issuer: String,
    pub signing_key_file: PathBuf,
    pub kid: String,
    /// Serve the dev issuer as an OAuth 2.1 authorization server (see `auth::dev_issuer`).
    pub authorization_server: bool,
}

/// The request paths the dev issuer's own paths must stay clear of.
fn mcp_and_keys_paths(mcp_paths: &[String]) -> Vec<String> {
    let mut paths: Vec<String> = mcp_paths
        .iter()
        .filter_map(|p| crate::paths::normal_config_path(p))
        .collect();
    paths.push(crate::paths::KEYS_PATH.to_string());
    paths
}

/// The dev authorization server mints tokens for anyone who asks: it runs only where nothing
/// else is trusted (no Clerk, no issuer but the dev one) and, unless `dev.allow_non_loopback`
/// says otherwise, only on a loopback listener.
fn check_dev_authorization_server(
    d: &file::DevFile,
    dev: Option<&DevSettings>,
    clerk: bool,
    issuers: &[IssuerSettings],
    listen: Option<&SocketAddr>,
    reserved: &[String],
    problems: &mut Problems,
) {
    const FIELD: &str = "dev.authorization_server";
    if clerk {
        problems.push(
            FIELD,
            "is refused while Clerk is configured ([clerk]): the dev authorization server signs \
             tokens for anyone and is for offline development only",
        );
    }
    for i in issuers.iter().filter(|i| i.issuer != d.issuer) {
        problems.push(
            FIELD,
            format!(
                "is refused while another issuer is trusted ([[issuers]] {:?}): the dev \
                 authorization server is for offline development only",
                i.issuer
            ),
        );
    }
    if !issuers.iter().any(|i| i.issuer == d.issuer) {
        problems.push(
            FIELD,
            format!(
                "needs an [[issuers]] entry for the dev issuer {:?} (jwks_file = the dev JWKS), \
                 or keygate refuses the tokens it issues",
                d.issuer
            ),
        );
    }
    if let Some(addr) = listen {
        if !addr.ip().is_loopback() && !d.allow_non_loopback {
            problems.push(
                FIELD,
                format!(
                    "is refused on server.listen {addr}, which is not a loopback address: set \
                     dev.allow_non_loopback = true to serve it there anyway"
                ),
            );
        }
    }
    match Url::parse(&d.issuer) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && u.query().is_none()
                && u.fragment().is_none() =>
        {
            let path = u.path().trim_end_matches('/');
            let normal = crate::paths::normal_config_path(path);
            let clear = normal.as_deref().is_some_and(|n| {
                n == path
                    && !reserved
                        .iter()
                        .any(|r| n.starts_with(r.as_str()) || r.starts_with(n))
            });
            if path.is_empty() || !clear {
                problems.push(
                    "dev.issuer",
                    format!(
                        "{:?} must have a lowercase path of its own (like /dev-issuer), apart \
                         from the MCP paths and /api/keys, to serve the authorization server",
                        d.issuer
                    ),
                );
            }
        }
        _ => problems.push(
            "dev.issuer",
            format!(
                "{:?} is not an http(s) URL without query or fragment",
                d.issuer
            ),
        ),
    }
    if let Some(dev) = dev {
        if let Err(e) = dev.signing_key() {
            problems.push("dev.signing_key_file", e.to_string());
        }
    }
}
/// Why the `[dev]` signing key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DevKeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not an RSA private key in PEM form")]
    NotRsa(String),
}

impl DevSettings {
    /// The signing key, read from `signing_key_file`: an RSA private key in PEM form.
    pub fn signing_key(&self) -> Result<jsonwebtoken::EncodingKey, DevKeyError> {
        let path = self.signing_key_file.display().to_string();
        let pem = std::fs::read(&self.signing_key_file).map_err(|source| DevKeyError::Read {
            path: path.clone(),
            source,
        })?;
        jsonwebtoken::EncodingKey::from_rsa_pem(&pem).map_err(|_| DevKeyError::NotRsa(path))
    }

    /// Validate `[dev]`; with `authorization_server`, only where nothing else is trusted.
    pub(crate) fn from_file(
        f: &FileConfig,
        base: &Path,
        issuers: &[IssuerSettings],
        listen: Option<SocketAddr>,
        problems: &mut Problems,
    ) -> Option<DevSettings> {
        let dev = f.dev.as_ref().map(|d| DevSettings {
            issuer: d.issuer.clone(),
            signing_key_file: resolve_path(base, &d.signing_key_file),
            kid: d.kid.clone(),
            authorization_server: d.authorization_server,
        });
        if let Some(d) = f.dev.as_ref().filter(|d| d.authorization_server) {
            check_dev_authorization_server(
                d,
                dev.as_ref(),
                f.clerk.is_some(),
                issuers,
                listen.as_ref(),
                &mcp_and_keys_paths(&f.policy.mcp_paths),
                problems,
            );
        }
        dev
    }
}
