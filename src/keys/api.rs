//! The `/api/keys` shapes, kept compatible with the Node Twenty MCP server: parse and check a
//! `POST` body, render `GET` metadata and the success messages. The proxy calls these; the
//! vault does the storing. The stored key is never echoed.

use secrecy::SecretString;
use serde::Deserialize;

use super::check::{KeyRules, Rejected};
use super::vault::KeyMetadata;

/// `POST /api/keys` success body.
pub const STORED: &str = r#"{"success":true,"message":"API key stored successfully"}"#;
/// `DELETE /api/keys` success body.
pub const DELETED: &str = r#"{"success":true,"message":"API key deleted successfully"}"#;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PostBody {
    api_key: Option<serde_json::Value>,
    base_url: Option<serde_json::Value>,
}

/// Why a `POST /api/keys` body is refused (400; the text is the response's description).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    #[error("Invalid JSON body")]
    Json,
    #[error("API key is required")]
    MissingKey,
    #[error("API key must be a string")]
    KeyNotString,
    #[error("baseUrl must be a string")]
    BaseUrlNotString,
    /// The key or base URL breaks a rule every way into the vault shares.
    #[error(transparent)]
    Rejected(#[from] Rejected),
}

/// A checked `POST /api/keys` body.
pub struct NewKey {
    pub api_key: SecretString,
    pub base_url: Option<String>,
}

/// Check a `POST` body: JSON, an `apiKey` string within the length limit, and a `baseUrl`
/// whose host is on the allowlist.
pub fn parse_post(body: &[u8], rules: &KeyRules) -> Result<NewKey, PostError> {
    let parsed: PostBody = serde_json::from_slice(body).map_err(|_| PostError::Json)?;
    let api_key = match parsed.api_key {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Null) | None => return Err(PostError::MissingKey),
        Some(_) => return Err(PostError::KeyNotString),
    };
    let api_key = rules.api_key(&api_key)?.to_string();
    let base_url = match parsed.base_url {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => None,
        Some(serde_json::Value::String(s)) => Some(rules.base_url(&s)?),
        Some(_) => return Err(PostError::BaseUrlNotString),
    };
    Ok(NewKey {
        api_key: SecretString::from(api_key),
        base_url,
    })
}

fn rfc3339(secs: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(secs).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// `GET /api/keys` body.
pub fn metadata_body(meta: Option<&KeyMetadata>) -> String {
    let mut doc = serde_json::json!({ "hasKey": meta.is_some() });
    if let Some(m) = meta {
        if let Some(t) = rfc3339(m.updated_at) {
            doc["updatedAt"] = serde_json::json!(t);
        }
        if let Some(b) = &m.base_url {
            doc["baseUrl"] = serde_json::json!(b);
        }
    }
    doc.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeysSettings;
    use secrecy::ExposeSecret;

    /// The validated defaults, with a small key limit and a loopback host allowed.
    fn settings() -> KeysSettings {
        let mut keys = crate::keys::test_settings();
        keys.allowed_base_url_hosts.push("localhost".into());
        keys.max_key_bytes = 64;
        keys
    }

    fn reason(body: &str) -> String {
        match parse_post(body.as_bytes(), &KeyRules::new(&settings())) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn post_bodies_are_checked() {
        let ok = parse_post(
            br#"{"apiKey":" tw_1 ","baseUrl":"https://api.twenty.com/"}"#,
            &KeyRules::new(&settings()),
        )
        .expect("valid");
        assert_eq!(ok.api_key.expose_secret(), "tw_1");
        assert_eq!(ok.base_url.as_deref(), Some("https://api.twenty.com"));
        assert_eq!(reason("{"), "Invalid JSON body");
        assert_eq!(reason("{}"), "API key is required");
        assert_eq!(reason(r#"{"apiKey":""}"#), "API key is required");
        assert_eq!(reason(r#"{"apiKey":5}"#), "API key must be a string");
        assert_eq!(
            reason(&format!(r#"{{"apiKey":"{}"}}"#, "k".repeat(65))),
            "API key is too long"
        );
        assert_eq!(
            reason(r#"{"apiKey":"a b"}"#),
            "API key must not contain spaces or control characters"
        );
        assert!(
            reason(r#"{"apiKey":"k","baseUrl":"https://evil.example.com"}"#)
                .starts_with("baseUrl host is not allowed")
        );
        assert_eq!(
            reason(r#"{"apiKey":"k","baseUrl":"http://api.twenty.com"}"#),
            "baseUrl must use https"
        );
        assert_eq!(
            reason(r#"{"apiKey":"k","baseUrl":"http://localhost:3001"}"#),
            "ok"
        );
        assert_eq!(
            reason(r#"{"apiKey":"k","baseUrl":"https://u:p@api.twenty.com"}"#),
            "baseUrl must not carry credentials"
        );
    }

    #[test]
    fn metadata_renders_rfc3339() {
        assert_eq!(metadata_body(None), r#"{"hasKey":false}"#);
        let body = metadata_body(Some(&KeyMetadata {
            updated_at: 1_700_000_000,
            base_url: Some("https://api.twenty.com".into()),
        }));
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["hasKey"], true);
        assert_eq!(v["updatedAt"], "2023-11-14T22:13:20Z");
        assert_eq!(v["baseUrl"], "https://api.twenty.com");
    }
}
