//! The small parsers the sections share: addresses, URLs, header names, paths, durations. Each
//! records a problem naming the option and returns `None` (or skips the value) on a bad one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use super::Problems;

pub(crate) fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

pub(crate) fn parse_addr(field: &str, raw: &str, problems: &mut Problems) -> Option<SocketAddr> {
    match raw.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(field, format!("{raw:?} is not an ip:port address"));
            None
        }
    }
}

pub(crate) fn parse_http_url(field: &str, raw: &str, problems: &mut Problems) -> Option<Url> {
    match Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Some(u),
        Ok(_) => {
            problems.push(field, format!("{raw:?} must be an http(s) URL with a host"));
            None
        }
        Err(e) => {
            problems.push(field, format!("{raw:?} is not a URL: {e}"));
            None
        }
    }
}

/// Headers keygate owns or the transport owns: never configurable as carriers.
const RESERVED_HEADERS: [&str; 4] = ["cookie", "host", "content-length", "transfer-encoding"];

pub(crate) fn parse_header_name(
    field: &str,
    raw: &Option<String>,
    problems: &mut Problems,
) -> Option<http::HeaderName> {
    parse_header_name_allowing(field, raw, &[], problems)
}

pub(crate) fn parse_header_name_allowing(
    field: &str,
    raw: &Option<String>,
    allowed: &[&str],
    problems: &mut Problems,
) -> Option<http::HeaderName> {
    let raw = raw.as_deref()?.trim();
    if raw.is_empty() {
        return None;
    }
    match http::HeaderName::from_bytes(raw.as_bytes()) {
        Ok(h) => {
            let reserved =
                RESERVED_HEADERS.contains(&h.as_str()) || h == http::header::AUTHORIZATION;
            if reserved && !allowed.contains(&h.as_str()) {
                problems.push(field, format!("{raw:?} cannot be used here"));
                return None;
            }
            Some(h)
        }
        Err(_) => {
            problems.push(field, format!("{raw:?} is not a valid header name"));
            None
        }
    }
}

/// Configured paths in their normal form (see `proxy::route`); a path that has none is a
/// problem naming `field`.
pub(crate) fn normal_paths(problems: &mut Problems, field: &str, raw: &[String]) -> Vec<String> {
    raw.iter()
        .filter_map(|p| {
            let normal = crate::paths::normal_config_path(p);
            if normal.is_none() {
                problems.push(
                    field.to_string(),
                    format!("{p:?} must be an absolute path without dot segments, encoded separators, query or fragment"),
                );
            }
            normal
        })
        .collect()
}

pub(crate) fn resolve_path(base: &Path, raw: &str) -> PathBuf {
    let p = PathBuf::from(raw);
    if p.is_absolute() || p.exists() {
        p
    } else {
        base.join(p)
    }
}

/// A value that is not one of an option's choices; says which ones are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} must be {choices}")]
pub struct NotAChoice {
    /// The value as written.
    pub value: String,
    /// The choices, as the message lists them (`"a", "b" or "c"`).
    pub choices: &'static str,
}

impl NotAChoice {
    pub(crate) fn new(value: &str, choices: &'static str) -> NotAChoice {
        NotAChoice {
            value: value.to_string(),
            choices,
        }
    }
}
