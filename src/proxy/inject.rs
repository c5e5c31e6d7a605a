//! Where the user's key goes upstream: a query parameter or a header from a template, per
//! configuration. Client-supplied values under the same names are always removed first, so a
//! client can neither pick the key nor the base URL the upstream will use.

use http::HeaderValue;
use pingora::http::RequestHeader;
use secrecy::ExposeSecret;

use crate::config::{InjectSettings, InjectTarget};
use crate::keys::vault::UserKey;

fn is_param(name: &str, param: &str) -> bool {
    // `apiKey`, any case, and array forms such as `apiKey[]` or `apiKey[0]`.
    let base = name.split('[').next().unwrap_or(name);
    base.eq_ignore_ascii_case(param)
}

/// Rewrite `req` for the upstream: strip client values, then inject `key` (if any).
pub fn apply(
    req: &mut RequestHeader,
    settings: &InjectSettings,
    key: Option<&UserKey>,
    default_base_url: Option<&str>,
) -> pingora::Result<()> {
    let targets = [&settings.api_key, &settings.base_url];
    for target in targets.iter().copied().flatten() {
        if let Some(h) = target.header_name() {
            req.remove_header(h);
        }
    }
    let params: Vec<&str> = targets
        .iter()
        .copied()
        .flatten()
        .filter_map(InjectTarget::query_name)
        .collect();
    let mut added: Vec<(String, String)> = Vec::new();
    if let Some(key) = key {
        let base_url = key.base_url.as_deref().or(default_base_url);
        let values = [
            (&settings.api_key, Some(key.api_key.expose_secret())),
            (&settings.base_url, base_url),
        ];
        for (target, value) in values {
            let (Some(target), Some(value)) = (target, value) else {
                continue;
            };
            match target {
                InjectTarget::Query(name) => added.push((name.clone(), value.to_string())),
                InjectTarget::Header { name, template } => {
                    let mut v =
                        HeaderValue::from_str(&template.replace("{key}", value)).map_err(|e| {
                            pingora::Error::because(
                                pingora::ErrorType::InternalError,
                                "injected header value",
                                e,
                            )
                        })?;
                    v.set_sensitive(true);
                    req.insert_header(name.clone(), v)?;
                }
            }
        }
    }
    if params.is_empty() && added.is_empty() {
        return Ok(());
    }
    let path = req.uri.path().to_string();
    let query = req.uri.query().unwrap_or("");
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    let mut kept_raw: Vec<&str> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let raw_name = pair.split('=').next().unwrap_or("");
        let name = url::form_urlencoded::parse(raw_name.as_bytes())
            .next()
            .map(|(k, _)| k.into_owned())
            .unwrap_or_default();
        if !params.iter().any(|p| is_param(&name, p)) {
            kept_raw.push(pair);
        }
    }
    for (name, value) in &added {
        out.append_pair(name, value);
    }
    let injected = out.finish();
    let mut new_query = kept_raw.join("&");
    if !injected.is_empty() {
        if !new_query.is_empty() {
            new_query.push('&');
        }
        new_query.push_str(&injected);
    }
    let target = if new_query.is_empty() {
        path
    } else {
        format!("{path}?{new_query}")
    };
    let uri = http::Uri::try_from(target).map_err(|e| {
        pingora::Error::because(pingora::ErrorType::InternalError, "injected query", e)
    })?;
    req.set_uri(uri);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn node_settings() -> InjectSettings {
        InjectSettings {
            api_key: Some(InjectTarget::Query("apiKey".into())),
            base_url: Some(InjectTarget::Query("baseUrl".into())),
        }
    }

    fn key(base: Option<&str>) -> UserKey {
        UserKey {
            api_key: SecretString::from("tw_secret&=/".to_string()),
            base_url: base.map(str::to_string),
        }
    }

    #[test]
    fn client_values_are_replaced_and_others_kept() {
        let mut req = RequestHeader::build(
            "POST",
            b"/mcp?sessionId=1&apiKey=evil&APIKEY=evil2&apiKey%5B%5D=evil3&baseUrl=https://evil",
            None,
        )
        .expect("req");
        apply(
            &mut req,
            &node_settings(),
            Some(&key(None)),
            Some("https://api.twenty.com"),
        )
        .expect("apply");
        assert_eq!(
            req.uri.to_string(),
            "/mcp?sessionId=1&apiKey=tw_secret%26%3D%2F&baseUrl=https%3A%2F%2Fapi.twenty.com"
        );
    }

    #[test]
    fn without_a_key_client_values_are_still_removed() {
        let mut req = RequestHeader::build("GET", b"/mcp?apiKey=evil", None).expect("req");
        apply(&mut req, &node_settings(), None, None).expect("apply");
        assert_eq!(req.uri.to_string(), "/mcp");
    }

    #[test]
    fn header_templates_are_filled_and_marked_sensitive() {
        let settings = InjectSettings {
            api_key: Some(InjectTarget::Header {
                name: http::header::AUTHORIZATION,
                template: "Bearer {key}".into(),
            }),
            base_url: None,
        };
        let mut req = RequestHeader::build("GET", b"/graphql", None).expect("req");
        req.insert_header("authorization", "Bearer client")
            .expect("h");
        let k = UserKey {
            api_key: SecretString::from("tw_1".to_string()),
            base_url: None,
        };
        apply(&mut req, &settings, Some(&k), None).expect("apply");
        let v = &req.headers["authorization"];
        assert_eq!(v, "Bearer tw_1");
        assert!(v.is_sensitive());
        assert_eq!(req.uri.to_string(), "/graphql");
    }
}
