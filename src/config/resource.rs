//! `[resource]`: the protected resource keygate fronts (RFC 9728): its canonical URL, the
//! audience tokens must carry, and where its metadata document is served.

use std::net::SocketAddr;

use super::file::ResourceFile;
use super::parse::parse_http_url;
use super::Problems;

#[derive(Debug, Clone)]
pub struct ResourceSettings {
    /// The canonical resource URL (`MCP_SERVER_URL`), the `aud` access tokens must carry.
    pub url: String,
    pub protected_paths: Vec<String>,
    pub scopes_supported: Vec<String>,
    pub resource_name: Option<String>,
    pub documentation: Option<String>,
    /// Where this resource's RFC 9728 document is served, for `WWW-Authenticate`.
    pub metadata_url: String,
}

impl ResourceSettings {
    /// Validate `[resource]`; the URL defaults to `http://localhost:<listen port>/mcp`.
    pub(crate) fn from_file(
        f: &ResourceFile,
        listen: Option<SocketAddr>,
        problems: &mut Problems,
    ) -> ResourceSettings {
        let resource_url = if f.url.is_empty() {
            match listen {
                Some(a) => format!("http://localhost:{}/mcp", a.port()),
                None => String::new(),
            }
        } else {
            f.url.clone()
        };
        let resource_parsed =
            parse_http_url("resource.url (MCP_SERVER_URL)", &resource_url, problems);
        if let Some(u) = &resource_parsed {
            if u.fragment().is_some() {
                problems.push(
                    "resource.url (MCP_SERVER_URL)",
                    "must not carry a fragment (RFC 8707)",
                );
            }
        }
        for p in &f.protected_paths {
            if !p.starts_with('/') || p.contains(['?', '#']) {
                problems.push(
                    "resource.protected_paths",
                    format!("{p:?} must be a path starting with /"),
                );
            }
        }
        let metadata_url = resource_parsed
            .as_ref()
            .map(|u| {
                let mut origin = u.origin().ascii_serialization();
                origin.push_str("/.well-known/oauth-protected-resource");
                let path = u.path().trim_end_matches('/');
                if !path.is_empty() {
                    origin.push_str(path);
                }
                origin
            })
            .unwrap_or_default();

        ResourceSettings {
            url: resource_url,
            protected_paths: f.protected_paths.clone(),
            scopes_supported: f.scopes_supported.clone(),
            resource_name: f.resource_name.clone(),
            documentation: f.documentation.clone(),
            metadata_url,
        }
    }
}
