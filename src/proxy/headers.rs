//! Header hygiene on the way upstream: client credentials removed, spoofable forwarding and
//! identity headers replaced by keygate's own, the request id carried through.

use std::net::IpAddr;

use ipnet::IpNet;
use pingora::http::RequestHeader;

use crate::auth::Identity;
use crate::config::IdentityHeaders;

/// Headers that carry the client's own credentials; they never reach the upstream.
const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];
const FORWARDING_HEADERS: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

/// Whether `peer` is a proxy whose forwarding headers may be trusted.
pub fn is_trusted(peer: Option<IpAddr>, trusted: &[IpNet]) -> bool {
    peer.is_some_and(|ip| trusted.iter().any(|n| n.contains(&ip)))
}

/// The client's address: the peer itself, or — when the peer is a trusted proxy — the
/// nearest address in its `X-Forwarded-For` chain that is not a trusted proxy too.
pub fn client_ip(
    peer: Option<IpAddr>,
    xff: Option<&http::HeaderValue>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let chain = xff.and_then(|v| v.to_str().ok()).unwrap_or("");
    let hops: Vec<IpAddr> = chain
        .split(',')
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    hops.iter()
        .rev()
        .find(|ip| !is_trusted(Some(**ip), trusted))
        .or(hops.first())
        .copied()
        .or(peer)
}

/// Everything the rewrite needs about the downstream request.
pub struct Forwarding<'a> {
    pub peer: Option<IpAddr>,
    pub peer_trusted: bool,
    pub tls: bool,
    pub host: Option<&'a str>,
    pub request_id: &'a str,
}

fn header_str<'h>(req: &'h RequestHeader, name: &str) -> Option<&'h str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

fn quote_forwarded_node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// Rewrite the upstream request headers in place.
pub fn rewrite(
    req: &mut RequestHeader,
    fwd: &Forwarding<'_>,
    identity: Option<&Identity>,
    identity_headers: &IdentityHeaders,
) -> pingora::Result<()> {
    for name in CREDENTIAL_HEADERS {
        req.remove_header(name);
    }

    // Forwarding: a trusted proxy's chain is extended; anyone else's is replaced.
    let prior_xff = fwd
        .peer_trusted
        .then(|| header_str(req, "x-forwarded-for").map(str::to_string))
        .flatten();
    let prior_forwarded = fwd
        .peer_trusted
        .then(|| header_str(req, "forwarded").map(str::to_string))
        .flatten();
    let proto = fwd
        .peer_trusted
        .then(|| header_str(req, "x-forwarded-proto").map(str::to_string))
        .flatten()
        .unwrap_or_else(|| if fwd.tls { "https" } else { "http" }.to_string());
    let host = fwd
        .peer_trusted
        .then(|| header_str(req, "x-forwarded-host").map(str::to_string))
        .flatten()
        .or_else(|| fwd.host.map(str::to_string));
    for name in FORWARDING_HEADERS {
        req.remove_header(name);
    }
    if let Some(peer) = fwd.peer {
        let xff = match prior_xff {
            Some(chain) => format!("{chain}, {peer}"),
            None => peer.to_string(),
        };
        req.insert_header("x-forwarded-for", xff)?;
        let mut element = format!("for={};proto={proto}", quote_forwarded_node(peer));
        if let Some(h) = host.as_deref() {
            element.push_str(";host=\"");
            element.push_str(&h.replace(['"', '\\'], ""));
            element.push('"');
        }
        let forwarded = match prior_forwarded {
            Some(chain) => format!("{chain}, {element}"),
            None => element,
        };
        req.insert_header("forwarded", forwarded)?;
    }
    req.insert_header("x-forwarded-proto", proto)?;
    if let Some(h) = host {
        req.insert_header("x-forwarded-host", h)?;
    }
    req.insert_header("x-request-id", fwd.request_id)?;

    // Identity: only keygate speaks for the caller.
    for name in identity_headers.names() {
        req.remove_header(name);
    }
    if let Some(id) = identity {
        if let Some(h) = &identity_headers.user {
            req.insert_header(h.clone(), id.subject.as_str())?;
        }
        if let (Some(h), Some(org)) = (&identity_headers.org, &id.org) {
            req.insert_header(h.clone(), org.id.as_str())?;
        }
        if let Some(h) = &identity_headers.scopes {
            req.insert_header(h.clone(), id.scopes.join(" "))?;
        }
        if let Some(h) = &identity_headers.token_kind {
            req.insert_header(h.clone(), id.kind.as_str())?;
        }
    }
    Ok(())
}

/// Whether `path` is free of dot segments, raw or percent-encoded, and of encoded slashes.
///
/// Route decisions (which paths accept session tokens, which are local) are made on the path
/// as sent; an upstream that normalises `/api/keys/../mcp` would otherwise see another route.
pub fn path_is_normalized(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return false;
    }
    !lower.split('/').any(|seg| {
        let decoded = seg.replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

/// A request id from the client is kept when it is short and plain; otherwise a new one.
pub fn request_id(incoming: Option<&str>) -> String {
    match incoming {
        Some(id)
            if !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) =>
        {
            id.to_string()
        }
        // A v4 UUID from the thread's userspace generator: no system call per request.
        _ => uuid::Builder::from_random_bytes(rand::random())
            .into_uuid()
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_and_encoded_separators_are_not_normal() {
        assert!(path_is_normalized("/mcp"));
        assert!(path_is_normalized("/api/keys/v1.2/x..y"));
        assert!(!path_is_normalized("/api/keys/../mcp"));
        assert!(!path_is_normalized("/api/keys/%2e%2E/mcp"));
        assert!(!path_is_normalized("/api/keys/./x"));
        assert!(!path_is_normalized("/api%2Fkeys"));
        assert!(!path_is_normalized("/api/keys/.."));
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_hop() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let xff = http::HeaderValue::from_static("6.6.6.6, 203.0.113.7, 10.0.0.5");
        let lb = Some("10.0.0.1".parse().expect("ip"));
        assert_eq!(
            client_ip(lb, Some(&xff), &trusted),
            Some("203.0.113.7".parse().expect("ip"))
        );
        // An untrusted peer's claims are ignored.
        let direct = Some("198.51.100.2".parse().expect("ip"));
        assert_eq!(client_ip(direct, Some(&xff), &trusted), direct);
        // A trusted peer without a chain is the client.
        assert_eq!(client_ip(lb, None, &trusted), lb);
    }

    #[test]
    fn request_ids_are_kept_only_when_safe() {
        assert_eq!(request_id(Some("abc-123")), "abc-123");
        assert_ne!(request_id(Some("bad id\r\n")), "bad id\r\n");
        assert_eq!(request_id(None).len(), 36);
    }

    #[test]
    fn untrusted_chain_is_replaced_and_credentials_removed() {
        let mut req = RequestHeader::build("GET", b"/mcp", None).expect("req");
        req.insert_header("authorization", "Bearer secret")
            .expect("h");
        req.insert_header("cookie", "a=b").expect("h");
        req.insert_header("x-forwarded-for", "6.6.6.6").expect("h");
        req.insert_header("x-user-id", "admin").expect("h");
        let ih = IdentityHeaders {
            user: Some(http::HeaderName::from_static("x-user-id")),
            ..IdentityHeaders::default()
        };
        let fwd = Forwarding {
            peer: Some("10.1.2.3".parse().expect("ip")),
            peer_trusted: false,
            tls: false,
            host: Some("gw.example.com"),
            request_id: "rid",
        };
        rewrite(&mut req, &fwd, None, &ih).expect("rewrite");
        assert!(req.headers.get("authorization").is_none());
        assert!(req.headers.get("cookie").is_none());
        assert!(req.headers.get("x-user-id").is_none());
        assert_eq!(req.headers["x-forwarded-for"], "10.1.2.3");
        assert_eq!(
            req.headers["forwarded"],
            "for=10.1.2.3;proto=http;host=\"gw.example.com\""
        );
    }

    #[test]
    fn trusted_chain_is_extended() {
        let mut req = RequestHeader::build("GET", b"/mcp", None).expect("req");
        req.insert_header("x-forwarded-for", "1.1.1.1").expect("h");
        req.insert_header("x-forwarded-proto", "https").expect("h");
        let fwd = Forwarding {
            peer: Some("10.0.0.9".parse().expect("ip")),
            peer_trusted: true,
            tls: false,
            host: None,
            request_id: "rid",
        };
        rewrite(&mut req, &fwd, None, &IdentityHeaders::default()).expect("rewrite");
        assert_eq!(req.headers["x-forwarded-for"], "1.1.1.1, 10.0.0.9");
        assert_eq!(req.headers["x-forwarded-proto"], "https");
    }
}
