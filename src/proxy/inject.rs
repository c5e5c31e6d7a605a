//! Where the user's key goes upstream: a query parameter or a header from a template, per
//! configuration. Client-supplied values under the same names are always removed first, so a
//! client can neither pick the key nor the base URL the upstream will use.

use std::borrow::Cow;

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

/// A query parameter's name, percent- and plus-decoded only when it needs to be.
fn param_name(raw: &str) -> Cow<'_, str> {
    if raw.bytes().any(|b| b == b'%' || b == b'+') {
        url::form_urlencoded::parse(raw.as_bytes())
            .next()
            .map(|(k, _)| Cow::Owned(k.into_owned()))
            .unwrap_or_default()
    } else {
        Cow::Borrowed(raw)
    }
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
            super::headers::remove(req, h);
        }
    }
    let values = key.map(|key| {
        [
            (&settings.api_key, Some(key.api_key.expose_secret())),
            (
                &settings.base_url,
                key.base_url.as_deref().or(default_base_url),
            ),
        ]
    });
    let mut query_values = false;
    for (target, value) in values.iter().flatten() {
        let (Some(target), Some(value)) = (target, value) else {
            continue;
        };
        match target {
            InjectTarget::Query(_) => query_values = true,
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
    let mut params = targets
        .iter()
        .copied()
        .flatten()
        .filter_map(InjectTarget::query_name)
        .peekable();
    if params.peek().is_none() {
        return Ok(());
    }
    let query = req.uri.query().unwrap_or("");
    if query.is_empty() && !query_values {
        return Ok(());
    }
    // One buffer for the new target: the path, the client's other parameters as they were
    // sent, then the injected ones.
    let path = req.uri.path();
    let mut target = String::with_capacity(path.len() + query.len() + 160);
    target.push_str(path);
    let mut separator = '?';
    let mut stripped = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = param_name(pair.split('=').next().unwrap_or(""));
        if params.clone().any(|p| is_param(&name, p)) {
            stripped = true;
            continue;
        }
        target.push(separator);
        target.push_str(pair);
        separator = '&';
    }
    if !stripped && !query_values {
        // Nothing removed, nothing to add: the target stays exactly as the client sent it.
        return Ok(());
    }
    for (target_kind, value) in values.iter().flatten() {
        let (Some(InjectTarget::Query(name)), Some(value)) = (target_kind, value) else {
            continue;
        };
        target.push(separator);
        target.extend(url::form_urlencoded::byte_serialize(name.as_bytes()));
        target.push('=');
        target.extend(url::form_urlencoded::byte_serialize(value.as_bytes()));
        separator = '&';
    }
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
    fn a_target_with_nothing_to_strip_or_add_is_left_as_sent() {
        let mut req = RequestHeader::build("GET", b"/mcp?x=1&&y=a+b%20c", None).expect("req");
        apply(&mut req, &node_settings(), None, None).expect("apply");
        assert_eq!(req.uri.to_string(), "/mcp?x=1&&y=a+b%20c");
    }

    #[test]
    fn encoded_parameter_names_are_decoded_before_matching() {
        let mut req = RequestHeader::build("GET", b"/mcp?api%4Bey=evil&base%55rl=x&keep=1", None)
            .expect("req");
        apply(
            &mut req,
            &node_settings(),
            Some(&key(Some("https://t.example"))),
            None,
        )
        .expect("apply");
        assert_eq!(
            req.uri.to_string(),
            "/mcp?keep=1&apiKey=tw_secret%26%3D%2F&baseUrl=https%3A%2F%2Ft.example"
        );
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
