//! `[upstream]`: where requests go (resolved once at startup), its timeouts, and where the
//! user's key and base URL are injected (`[upstream.inject]`).

use std::net::SocketAddr;
use std::time::Duration;

use url::Url;

use super::file::{InjectFile, UpstreamFile};
use super::parse::{parse_header_name_allowing, parse_http_url, secs};
use super::Problems;

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub url: Url,
    pub tls: bool,
    /// Host name for SNI and the `Host` header.
    pub host: String,
    /// `host[:port]` as it goes in the `Host` header, built once.
    pub host_header: http::HeaderValue,
    /// Resolved once at startup; nothing resolves names on the request path.
    pub addr: SocketAddr,
    /// Path prefix of the upstream URL, without a trailing slash ("" for the root).
    pub base_path: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub preserve_host: bool,
    pub verify_tls: bool,
    pub inject: InjectSettings,
}
/// Where a value goes in the upstream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InjectTarget {
    /// A query parameter of this name.
    Query(String),
    /// A header; `{key}` in the template is replaced by the value.
    Header {
        name: http::HeaderName,
        template: String,
    },
}

impl InjectTarget {
    /// The query parameter name, when the target is one.
    pub fn query_name(&self) -> Option<&str> {
        match self {
            InjectTarget::Query(q) => Some(q),
            InjectTarget::Header { .. } => None,
        }
    }

    /// The header name, when the target is one.
    pub fn header_name(&self) -> Option<&http::HeaderName> {
        match self {
            InjectTarget::Header { name, .. } => Some(name),
            InjectTarget::Query(_) => None,
        }
    }
}

/// How the user's key and base URL are injected into upstream requests.
#[derive(Debug, Clone, Default)]
pub struct InjectSettings {
    pub api_key: Option<InjectTarget>,
    pub base_url: Option<InjectTarget>,
}

impl InjectTarget {
    /// A target from its `*_query` / `*_header` pair: one of them, or neither (`None`).
    fn from_options(
        field: &str,
        query: &Option<String>,
        header: &Option<String>,
        template: &str,
        problems: &mut Problems,
    ) -> Option<InjectTarget> {
        let query = query.as_deref().map(str::trim).filter(|q| !q.is_empty());
        let header = header.as_deref().map(str::trim).filter(|h| !h.is_empty());
        match (query, header) {
            (Some(_), Some(_)) => {
                problems.push(field, "set a query parameter or a header, not both");
                None
            }
            (Some(q), None) => {
                if q.contains(['&', '=', '#', ' ']) {
                    problems.push(field, format!("{q:?} is not a plain query parameter name"));
                    return None;
                }
                Some(InjectTarget::Query(q.to_string()))
            }
            (None, Some(h)) => {
                // Authorization is the usual home of an upstream API key.
                let name = parse_header_name_allowing(
                    field,
                    &Some(h.to_string()),
                    &["authorization"],
                    problems,
                )?;
                if !template.contains("{key}") {
                    problems.push(field, "the template must contain {key}");
                    return None;
                }
                Some(InjectTarget::Header {
                    name,
                    template: template.to_string(),
                })
            }
            (None, None) => None,
        }
    }
}

impl InjectSettings {
    /// Validate `[upstream.inject]`.
    fn from_file(f: &InjectFile, problems: &mut Problems) -> InjectSettings {
        InjectSettings {
            api_key: InjectTarget::from_options(
                "upstream.inject.api_key_*",
                &f.api_key_query,
                &f.api_key_header,
                &f.api_key_template,
                problems,
            ),
            base_url: InjectTarget::from_options(
                "upstream.inject.base_url_*",
                &f.base_url_query,
                &f.base_url_header,
                "{key}",
                problems,
            ),
        }
    }
}

impl UpstreamSettings {
    /// Validate `[upstream]`, resolving its host once; `None` when the URL is unusable.
    pub(crate) fn from_file(f: &UpstreamFile, problems: &mut Problems) -> Option<UpstreamSettings> {
        let upstream = parse_http_url("upstream.url (KEYGATE_UPSTREAM)", &f.url, problems)
            .and_then(|url| {
                let tls = url.scheme() == "https";
                let host = url.host_str()?.trim_matches(['[', ']']).to_string();
                let port = url.port_or_known_default()?;
                let authority = match url.port() {
                    Some(p) => format!("{}:{p}", url.host_str()?),
                    None => url.host_str()?.to_string(),
                };
                let addr = match std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port)) {
                    Ok(mut it) => it.next(),
                    Err(_) => None,
                };
                let Some(addr) = addr else {
                    problems.push(
                        "upstream.url (KEYGATE_UPSTREAM)",
                        format!("cannot resolve {host:?}"),
                    );
                    return None;
                };
                if url.query().is_some() || url.fragment().is_some() {
                    problems.push(
                        "upstream.url (KEYGATE_UPSTREAM)",
                        "must not carry a query or fragment",
                    );
                }
                let base_path = url.path().trim_end_matches('/').to_string();
                let Ok(host_header) = http::HeaderValue::from_str(&authority) else {
                    problems.push(
                        "upstream.url (KEYGATE_UPSTREAM)",
                        "host is not valid in a Host header",
                    );
                    return None;
                };
                Some(UpstreamSettings {
                    tls,
                    host,
                    host_header,
                    addr,
                    base_path,
                    url,
                    connect_timeout: secs(f.connect_timeout_secs.max(1)),
                    read_timeout: secs(f.read_timeout_secs.max(1)),
                    write_timeout: secs(f.write_timeout_secs.max(1)),
                    idle_timeout: secs(f.idle_timeout_secs),
                    preserve_host: f.preserve_host,
                    verify_tls: f.verify_tls,
                    inject: InjectSettings::default(),
                })
            });
        let inject = InjectSettings::from_file(&f.inject, problems);
        upstream.map(|u| UpstreamSettings { inject, ..u })
    }
}
