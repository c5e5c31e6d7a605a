//! What an OAuth 2.1 MCP client fetches to find its way: the RFC 9728 protected-resource
//! metadata (built once at startup from configuration, never from `Host`), and the
//! authorization server's own metadata, fetched from the issuer, cached, and passed through
//! byte for byte so its `issuer` matches where clients expect it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use url::Url;

use crate::cache::Expiring;
use crate::config::Settings;

/// How long a fetched authorization-server document is served before it is fetched again.
const DOCUMENT_TTL: Duration = Duration::from_secs(3600);

/// The RFC 9728 document and the paths it is served at.
pub struct ResourceMetadata {
    body: Bytes,
    paths: Vec<String>,
}

impl ResourceMetadata {
    /// Build the document from settings.
    pub fn new(settings: &Settings) -> Self {
        let mut servers: Vec<String> = Vec::new();
        // The dev authorization server, when on, is the one to ask (validation leaves no other).
        if let Some(d) = settings.dev.as_ref().filter(|d| d.authorization_server) {
            servers.push(d.issuer.trim_end_matches('/').to_string());
        }
        if let Some(c) = &settings.clerk {
            servers.push(c.issuer.clone());
        }
        servers.extend(settings.issuers.iter().map(|i| i.issuer.clone()));
        servers.dedup_by(|a, b| a.trim_end_matches('/') == b.trim_end_matches('/'));
        let r = &settings.resource;
        let mut doc = serde_json::json!({
            "resource": r.url,
            "authorization_servers": servers,
            "bearer_methods_supported": ["header"],
        });
        if !r.scopes_supported.is_empty() {
            doc["scopes_supported"] = serde_json::json!(r.scopes_supported);
        }
        if let Some(name) = &r.resource_name {
            doc["resource_name"] = serde_json::json!(name);
        }
        if let Some(d) = &r.documentation {
            doc["resource_documentation"] = serde_json::json!(d);
        }
        let base = "/.well-known/oauth-protected-resource";
        let mut paths = vec![base.to_string()];
        for p in &r.protected_paths {
            paths.push(format!("{base}{}", p.trim_end_matches('/')));
        }
        if let Ok(u) = Url::parse(&r.url) {
            let p = u.path().trim_end_matches('/');
            if !p.is_empty() {
                paths.push(format!("{base}{p}"));
            }
        }
        paths.sort();
        paths.dedup();
        Self {
            body: Bytes::from(doc.to_string()),
            paths,
        }
    }

    /// Whether `path` is one of the metadata URLs.
    pub fn serves(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p == path)
    }

    /// The JSON document.
    pub fn body(&self) -> Bytes {
        self.body.clone()
    }
}

/// Which authorization-server document a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AsDocument {
    /// RFC 8414 `/.well-known/oauth-authorization-server`.
    OAuth,
    /// OpenID Connect discovery `/.well-known/openid-configuration`.
    OpenId,
}

impl AsDocument {
    /// Recognise the well-known path.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/.well-known/oauth-authorization-server" => Some(AsDocument::OAuth),
            "/.well-known/openid-configuration" => Some(AsDocument::OpenId),
            _ => None,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            AsDocument::OAuth => "/.well-known/oauth-authorization-server",
            AsDocument::OpenId => "/.well-known/openid-configuration",
        }
    }
}

/// The primary issuer's metadata, fetched on demand and cached.
pub struct AuthServerMetadata {
    /// Documents served as they are instead of fetched: the dev authorization server's.
    local: Option<(Bytes, Bytes)>,
    issuer: Option<String>,
    client: reqwest::Client,
    timeout: Duration,
    max_bytes: usize,
    cache: Expiring<AsDocument, Bytes, String>,
}

impl AuthServerMetadata {
    /// The primary issuer is Clerk when configured, else the first `[[issuers]]` entry that
    /// is fetched over HTTP.
    pub fn new(settings: &Settings, client: reqwest::Client) -> Self {
        let issuer = settings
            .clerk
            .as_ref()
            .map(|c| c.issuer.clone())
            .or_else(|| {
                settings
                    .issuers
                    .iter()
                    .find(|i| !matches!(i.keys, crate::config::KeySource::File(_)))
                    .map(|i| i.issuer.clone())
            });
        Self {
            local: None,
            issuer,
            client,
            timeout: settings.jwks.fetch_timeout,
            max_bytes: 256 * 1024,
            cache: Expiring::new(4),
        }
    }

    /// Serve these documents (RFC 8414, OpenID Connect) instead of any issuer's: keygate's
    /// own dev authorization server answers at the root well-known paths too.
    pub fn with_local(mut self, oauth: Bytes, openid: Bytes) -> Self {
        self.local = Some((oauth, openid));
        self
    }

    /// The document, or `Ok(None)` when there is no HTTP issuer to ask.
    pub async fn get(&self, doc: AsDocument) -> Result<Option<Bytes>, Arc<String>> {
        if let Some((oauth, openid)) = &self.local {
            return Ok(Some(match doc {
                AsDocument::OAuth => oauth.clone(),
                AsDocument::OpenId => openid.clone(),
            }));
        }
        let Some(issuer) = self.issuer.as_deref() else {
            return Ok(None);
        };
        let url = format!("{}{}", issuer.trim_end_matches('/'), doc.suffix());
        self.cache
            .get_or_try_insert(&doc, async {
                let resp = self
                    .client
                    .get(&url)
                    .timeout(self.timeout)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!("status {}", resp.status()));
                }
                let body = resp.bytes().await.map_err(|e| e.to_string())?;
                if body.len() > self.max_bytes {
                    return Err("document too large".to_string());
                }
                serde_json::from_slice::<serde_json::Value>(&body)
                    .map_err(|e| format!("not JSON: {e}"))?;
                Ok((body, Instant::now() + DOCUMENT_TTL))
            })
            .await
            .map(Some)
    }
}
