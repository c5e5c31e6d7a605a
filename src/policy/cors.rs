//! Browser origins: the allowlist, preflight answers (given before authentication) and the
//! CORS headers added to responses for allowed origins.

use crate::config::CorsSettings;

/// Request headers an MCP browser client sends.
pub const ALLOW_HEADERS: &str = "Authorization, Content-Type, Mcp-Session-Id, MCP-Protocol-Version, Mcp-Method, Mcp-Name, Last-Event-ID";
/// Response headers a browser client must be able to read.
pub const EXPOSE_HEADERS: &str = "Mcp-Session-Id, WWW-Authenticate";
/// Methods the proxied routes accept.
pub const ALLOW_METHODS: &str = "GET, POST, DELETE, OPTIONS";

/// The origin allowlist.
pub struct Cors {
    allowed: Vec<String>,
    any: bool,
    max_age: String,
}

impl Cors {
    /// Build from settings.
    pub fn new(s: &CorsSettings) -> Self {
        Self {
            allowed: s.allowed_origins.clone(),
            any: s.allow_any_origin,
            max_age: s.max_age.as_secs().to_string(),
        }
    }

    /// Whether a browser at `origin` may call the protected routes.
    pub fn allows(&self, origin: &str) -> bool {
        self.any || self.allowed.iter().any(|o| o == origin)
    }

    /// Headers for an allowed preflight.
    pub fn preflight_headers(&self, origin: &str) -> [(&'static str, String); 6] {
        [
            ("access-control-allow-origin", origin.to_string()),
            ("access-control-allow-methods", ALLOW_METHODS.to_string()),
            ("access-control-allow-headers", ALLOW_HEADERS.to_string()),
            ("access-control-expose-headers", EXPOSE_HEADERS.to_string()),
            ("access-control-max-age", self.max_age.clone()),
            ("vary", "Origin".to_string()),
        ]
    }

    /// Headers added to an actual response for an allowed origin.
    pub fn response_headers(origin: &str) -> [(&'static str, String); 3] {
        [
            ("access-control-allow-origin", origin.to_string()),
            ("access-control-expose-headers", EXPOSE_HEADERS.to_string()),
            ("vary", "Origin".to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allowlist_is_exact() {
        let c = Cors::new(&CorsSettings {
            allowed_origins: vec!["https://app.example.com".into()],
            allow_any_origin: false,
            max_age: Duration::from_secs(60),
        });
        assert!(c.allows("https://app.example.com"));
        assert!(!c.allows("https://app.example.com.evil.test"));
        assert!(!c.allows("null"));
    }
}
