//! The one validation every key passes on its way into the vault — `POST /api/keys`,
//! `keygate keys import`, rotation — and that a stored base URL passes again each time it is
//! about to be injected.
//!
//! It owns what a valid upstream key and base URL look like; it does not parse request bodies
//! (`keys::api`) or store anything (`keys::vault`).

use url::Url;

use crate::config::KeysSettings;

/// Why a key or base URL is refused; `Display` is safe to show the client (never the key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("API key is required")]
    MissingKey,
    #[error("API key is too long")]
    KeyTooLong,
    #[error("API key must not contain spaces or control characters")]
    KeyCharacters,
    #[error("baseUrl is not a URL")]
    NotAUrl,
    #[error("baseUrl host is not allowed; allowed hosts: {0}")]
    HostNotAllowed(String),
    #[error("baseUrl must use https")]
    NotHttps,
    #[error("baseUrl must not carry credentials")]
    Credentials,
    #[error("baseUrl must not carry a query or fragment")]
    QueryOrFragment,
}

/// The rules, from the validated `[keys]` settings.
#[derive(Debug, Clone)]
pub struct KeyRules {
    max_key_bytes: usize,
    allowed_hosts: Vec<String>,
}

impl KeyRules {
    pub fn new(settings: &KeysSettings) -> Self {
        Self {
            max_key_bytes: settings.max_key_bytes,
            allowed_hosts: settings.allowed_base_url_hosts.clone(),
        }
    }

    /// A key as it may be stored: trimmed, non-empty, within the size limit, and free of
    /// spaces and control characters (CR/LF would split the header or query it goes into).
    pub fn api_key<'k>(&self, raw: &'k str) -> Result<&'k str, Rejected> {
        let key = raw.trim();
        if key.is_empty() {
            return Err(Rejected::MissingKey);
        }
        if key.len() > self.max_key_bytes {
            return Err(Rejected::KeyTooLong);
        }
        if key.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(Rejected::KeyCharacters);
        }
        Ok(key)
    }

    /// A base URL as it may be stored and injected, in its normal form (no trailing slash): a
    /// host on `keys.allowed_base_url_hosts`, https (http only to loopback), no credentials,
    /// query or fragment.
    pub fn base_url(&self, raw: &str) -> Result<String, Rejected> {
        let url = Url::parse(raw.trim()).map_err(|_| Rejected::NotAUrl)?;
        let host = url.host_str().map(str::to_ascii_lowercase);
        let allowed = host
            .as_deref()
            .is_some_and(|h| self.allowed_hosts.iter().any(|a| a == h));
        if !allowed {
            return Err(Rejected::HostNotAllowed(self.allowed_hosts.join(", ")));
        }
        let loopback = matches!(host.as_deref(), Some("localhost" | "127.0.0.1" | "[::1]"));
        if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
            return Err(Rejected::NotHttps);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Rejected::Credentials);
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(Rejected::QueryOrFragment);
        }
        Ok(url.as_str().trim_end_matches('/').to_string())
    }

    /// Whether a stored base URL may still be injected: it passes [`Self::base_url`] and is
    /// already in its normal form (anything else was not written by keygate).
    pub fn stored_base_url_ok(&self, stored: &str) -> bool {
        self.base_url(stored).is_ok_and(|normal| normal == stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> KeyRules {
        let mut keys = crate::keys::test_settings();
        keys.allowed_base_url_hosts.push("localhost".into());
        keys.max_key_bytes = 64;
        KeyRules::new(&keys)
    }

    #[test]
    fn keys_are_trimmed_and_checked() {
        let r = rules();
        assert_eq!(r.api_key(" tw_1 "), Ok("tw_1"));
        assert_eq!(r.api_key("  "), Err(Rejected::MissingKey));
        assert_eq!(r.api_key(&"k".repeat(65)), Err(Rejected::KeyTooLong));
        for bad in ["a b", "a\r\nX-Injected: 1", "a\tb", "a\u{7f}"] {
            assert_eq!(r.api_key(bad), Err(Rejected::KeyCharacters), "{bad:?}");
        }
    }

    #[test]
    fn base_urls_are_checked_and_normalised() {
        let r = rules();
        assert_eq!(
            r.base_url("https://api.twenty.com/").as_deref(),
            Ok("https://api.twenty.com")
        );
        assert!(matches!(
            r.base_url("http://169.254.169.254/latest"),
            Err(Rejected::HostNotAllowed(_))
        ));
        assert_eq!(r.base_url("http://api.twenty.com"), Err(Rejected::NotHttps));
        assert!(r.base_url("http://localhost:3001").is_ok());
        assert_eq!(
            r.base_url("https://u:p@api.twenty.com"),
            Err(Rejected::Credentials)
        );
        assert_eq!(
            r.base_url("https://api.twenty.com/?x=1"),
            Err(Rejected::QueryOrFragment)
        );
        assert!(r.stored_base_url_ok("https://api.twenty.com"));
        assert!(!r.stored_base_url_ok("https://api.twenty.com/"));
        assert!(!r.stored_base_url_ok("http://169.254.169.254/latest"));
    }
}
