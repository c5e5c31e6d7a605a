//! Header hygiene on the way upstream: client credentials removed, spoofable forwarding and
//! identity headers replaced by keygate's own, the request id carried through; the client's
//! address behind trusted proxies; and the request-head rules every request must meet (one
//! valid `Host`, no repeated single-valued MCP header).

use std::net::IpAddr;

use http::header::{HeaderName, AUTHORIZATION, COOKIE, FORWARDED, PROXY_AUTHORIZATION};
use http::HeaderValue;
use ipnet::IpNet;
use pingora::http::RequestHeader;

use crate::auth::Identity;
use crate::config::IdentityHeaders;
use crate::error::GatewayError;

/// Headers that carry the client's own credentials; they never reach the upstream.
const CREDENTIAL_HEADERS: [HeaderName; 3] = [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE];
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Carried from the client (or generated) to the upstream and back in every response.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The names keygate adds, as they go on the wire. Pingora keeps each header's case: given a
/// `&'static str` it stores the name without copying it (a `HeaderName` costs a copy).
pub mod wire {
    pub const X_FORWARDED_FOR: &str = "X-Forwarded-For";
    pub const X_FORWARDED_PROTO: &str = "X-Forwarded-Proto";
    pub const X_FORWARDED_HOST: &str = "X-Forwarded-Host";
    pub const FORWARDED: &str = "Forwarded";
    pub const X_REQUEST_ID: &str = "X-Request-Id";
}

/// The request's id: the client's `X-Request-Id` when it is short and plain, else a new UUID.
/// Kept as a header value, so sending it upstream and back costs no copy.
#[derive(Debug, Clone)]
pub struct RequestId(HeaderValue);

impl RequestId {
    pub fn as_str(&self) -> &str {
        // Only visible ASCII is ever stored (see `request_id`).
        self.0.to_str().unwrap_or("")
    }

    pub fn header_value(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self(HeaderValue::from_static(""))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `peer` is a proxy whose forwarding headers may be trusted.
pub fn is_trusted(peer: Option<IpAddr>, trusted: &[IpNet]) -> bool {
    peer.is_some_and(|ip| trusted.iter().any(|n| n.contains(&ip)))
}

/// The client's address: the peer itself, or — when the peer is a trusted proxy — the
/// nearest hop of its `X-Forwarded-For` chain that is not a trusted proxy too.
///
/// Every field line counts, joined in order (a proxy may append its own line rather than
/// extend the client's). The walk goes from the right: trusted hops are passed, the first
/// untrusted one is the client. A hop that cannot be read (`unknown`, an obfuscated name, a
/// broken address) ends the walk as well, but it names nobody: the client is then the nearest
/// trusted hop to its right, or the peer — never a hop further left, which anyone could have
/// written. A chain of trusted hops only yields the leftmost of them. Hops may be `a.b.c.d`,
/// `a.b.c.d:port`, a bare IPv6 address, `[v6]` or `[v6]:port`; IPv4-mapped IPv6 addresses
/// are the IPv4 client they map (the peer's too).
pub fn client_ip(
    peer: Option<IpAddr>,
    headers: &http::HeaderMap,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer.map(|ip| ip.to_canonical());
    if !is_trusted(peer, trusted) {
        return peer;
    }
    // The nearest hop vouched for so far.
    let mut nearest = peer;
    for line in headers.get_all(X_FORWARDED_FOR).iter().rev() {
        let Ok(line) = line.to_str() else {
            return nearest;
        };
        for hop in line.rsplit(',').map(str::trim).filter(|h| !h.is_empty()) {
            match parse_hop(hop) {
                Some(ip) if is_trusted(Some(ip), trusted) => nearest = Some(ip),
                Some(ip) => return Some(ip),
                None => return nearest,
            }
        }
    }
    nearest
}

/// One `X-Forwarded-For` hop: an address with or without a port, IPv6 bare or bracketed,
/// in canonical form.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let ip = if let Ok(ip) = hop.parse::<IpAddr>() {
        ip
    } else if let Ok(addr) = hop.parse::<std::net::SocketAddr>() {
        addr.ip()
    } else {
        let inner = hop.strip_prefix('[')?.strip_suffix(']')?;
        IpAddr::V6(inner.parse().ok()?)
    };
    Some(ip.to_canonical())
}

/// Everything the rewrite needs about the downstream request.
pub struct Forwarding<'a> {
    pub peer: Option<IpAddr>,
    pub peer_trusted: bool,
    pub tls: bool,
    /// The host the client asked for (its `Host`, or the authority of its target).
    pub host: Option<HeaderValue>,
    pub request_id: &'a RequestId,
}

/// A forwarding header's value from a trusted peer (visible ASCII only), or none.
fn trusted_value<'r>(
    req: &'r RequestHeader,
    fwd: &Forwarding<'_>,
    name: &HeaderName,
) -> Option<&'r HeaderValue> {
    if !fwd.peer_trusted {
        return None;
    }
    req.headers.get(name).filter(|v| v.to_str().is_ok())
}

/// A trusted peer's chain in a list header: all its field lines, in order (each visible
/// ASCII, or the chain is not kept). Empty when the peer is not trusted.
fn trusted_chain<'r>(
    req: &'r RequestHeader,
    fwd: &Forwarding<'_>,
    name: &HeaderName,
) -> Vec<&'r HeaderValue> {
    if !fwd.peer_trusted {
        return Vec::new();
    }
    let lines: Vec<&HeaderValue> = req.headers.get_all(name).iter().collect();
    if lines.iter().all(|v| v.to_str().is_ok()) {
        lines
    } else {
        Vec::new()
    }
}

/// `line, line, …, element`, or `element` alone, as one header value. Buffers are filled to
/// their exact capacity, so each value costs one allocation.
fn chain_value(chain: &[&HeaderValue], element: Vec<u8>) -> pingora::Result<HeaderValue> {
    let bytes = if chain.is_empty() {
        element
    } else {
        let len = chain.iter().map(|v| v.len() + 2).sum::<usize>() + element.len();
        let mut v = Vec::with_capacity(len);
        for line in chain {
            v.extend_from_slice(line.as_bytes());
            v.extend_from_slice(b", ");
        }
        v.extend_from_slice(&element);
        v
    };
    HeaderValue::from_maybe_shared(bytes::Bytes::from(bytes)).map_err(|e| {
        pingora::Error::because(pingora::ErrorType::InternalError, "forwarding header", e)
    })
}

/// Remove a header; a lookup first spares Pingora's two-map removal when it is absent.
pub(crate) fn remove(req: &mut RequestHeader, name: &HeaderName) {
    if req.headers.contains_key(name) {
        req.remove_header(name);
    }
}

/// The textual form of an address, written without allocating.
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> Self {
        use std::io::Write as _;
        let mut buf = [0u8; 48];
        let mut rest = &mut buf[..];
        // The longest address text (IPv4-mapped IPv6) is 45 bytes: this cannot fail.
        let _ = write!(rest, "{ip}");
        let len = 48 - rest.len();
        Self { buf, len }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Rewrite the upstream request headers in place.
pub fn rewrite(
    req: &mut RequestHeader,
    fwd: &Forwarding<'_>,
    identity: Option<&Identity>,
    identity_headers: &IdentityHeaders,
) -> pingora::Result<()> {
    for name in &CREDENTIAL_HEADERS {
        remove(req, name);
    }

    // Forwarding: a trusted proxy's chain is extended; anyone else's is replaced.
    let proto = trusted_value(req, fwd, &X_FORWARDED_PROTO)
        .cloned()
        .unwrap_or(HeaderValue::from_static(if fwd.tls {
            "https"
        } else {
            "http"
        }));
    let host = trusted_value(req, fwd, &X_FORWARDED_HOST)
        .cloned()
        .or_else(|| fwd.host.clone());
    if let Some(peer) = fwd.peer {
        let node = IpText::new(peer);
        let xff = chain_value(
            &trusted_chain(req, fwd, &X_FORWARDED_FOR),
            node.as_bytes().to_vec(),
        )?;
        let proto = proto.as_bytes();
        // The host goes in quoted, so only visible ASCII without quotes or backslashes.
        let host = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .map_or(&b""[..], str::as_bytes);
        let quoted = |b: &&u8| !matches!(**b, b'"' | b'\\');
        let host_len = host.iter().filter(quoted).count();
        let len = 4 + node.len + usize::from(peer.is_ipv6()) * 4 + 7 + proto.len();
        let len = len + if host.is_empty() { 0 } else { 8 + host_len };
        let mut element = Vec::with_capacity(len);
        element.extend_from_slice(b"for=");
        if peer.is_ipv6() {
            element.extend_from_slice(b"\"[");
            element.extend_from_slice(node.as_bytes());
            element.extend_from_slice(b"]\"");
        } else {
            element.extend_from_slice(node.as_bytes());
        }
        element.extend_from_slice(b";proto=");
        element.extend_from_slice(proto);
        if !host.is_empty() {
            element.extend_from_slice(b";host=\"");
            element.extend(host.iter().filter(quoted));
            element.push(b'"');
        }
        debug_assert_eq!(element.len(), len, "the Forwarded element is sized exactly");
        let forwarded = chain_value(&trusted_chain(req, fwd, &FORWARDED), element)?;
        req.insert_header(wire::X_FORWARDED_FOR, xff)?;
        req.insert_header(wire::FORWARDED, forwarded)?;
    } else {
        remove(req, &X_FORWARDED_FOR);
        remove(req, &FORWARDED);
    }
    req.insert_header(wire::X_FORWARDED_PROTO, proto)?;
    match host {
        Some(h) => req.insert_header(wire::X_FORWARDED_HOST, h)?,
        None => remove(req, &X_FORWARDED_HOST),
    }
    req.insert_header(wire::X_REQUEST_ID, fwd.request_id.header_value())?;

    // Identity: only keygate speaks for the caller.
    for name in identity_headers.names() {
        remove(req, name);
    }
    if let Some(id) = identity {
        if let Some(h) = &identity_headers.user {
            req.insert_header(h, id.subject.as_str())?;
        }
        if let (Some(h), Some(org)) = (&identity_headers.org, &id.org) {
            req.insert_header(h, org.id.as_str())?;
        }
        if let Some(h) = &identity_headers.scopes {
            req.insert_header(h, id.scopes.join(" "))?;
        }
        if let Some(h) = &identity_headers.token_kind {
            req.insert_header(h, id.kind.as_str())?;
        }
        if let Some(h) = &identity_headers.issuer {
            req.insert_header(h, id.issuer.as_str())?;
        }
    }
    Ok(())
}

/// Request headers that may appear at most once: a second copy could be read by the upstream
/// where keygate checked the first.
const SINGLE_VALUED: [(HeaderName, &str); 4] = [
    (
        HeaderName::from_static("mcp-session-id"),
        "Mcp-Session-Id must appear at most once",
    ),
    (
        HeaderName::from_static("mcp-protocol-version"),
        "MCP-Protocol-Version must appear at most once",
    ),
    (
        HeaderName::from_static("mcp-method"),
        "Mcp-Method must appear at most once",
    ),
    (
        HeaderName::from_static("mcp-name"),
        "Mcp-Name must appear at most once",
    ),
];

/// Rules on the request head that hold for every route, local answers included: exactly one
/// valid `Host` on HTTP/1.1 (RFC 9112 section 3.2; at most one, valid, on other versions,
/// where HTTP/2 names the authority in its own pseudo-header), and no repeated single-valued
/// MCP header.
pub fn check_request_head(req: &RequestHeader) -> Result<(), GatewayError> {
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version == http::Version::HTTP_11 => {
            return Err(GatewayError::BadRequest("Host header is required".into()));
        }
        (None, _) => {}
        (Some(_), Some(_)) => {
            return Err(GatewayError::BadRequest(
                "Host header must appear once".into(),
            ));
        }
        (Some(host), None) if !is_valid_host(host.as_bytes()) => {
            return Err(GatewayError::BadRequest(
                "Host header is not a valid host".into(),
            ));
        }
        (Some(_), None) => {}
    }
    for (name, problem) in &SINGLE_VALUED {
        let mut values = req.headers.get_all(name).iter();
        if values.next().is_some() && values.next().is_some() {
            return Err(GatewayError::BadRequest((*problem).into()));
        }
    }
    Ok(())
}

/// RFC 3986 `host [ ":" port ]` with a non-empty host: an IPv6 literal in brackets, or a
/// reg-name (which covers IPv4 addresses): unreserved, percent-encoded and sub-delim
/// characters only.
fn is_valid_host(value: &[u8]) -> bool {
    let (host_ok, port) = if let Some(rest) = value.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = std::str::from_utf8(&rest[..end])
            .is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok());
        (literal, &rest[end + 1..])
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        (is_reg_name(&value[..end]), &value[end..])
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    host_ok && port_ok
}

/// A non-empty RFC 3986 reg-name.
fn is_reg_name(name: &[u8]) -> bool {
    if name.is_empty() {
        return false;
    }
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'%' => {
                let hex = name.get(i + 1..i + 3);
                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
                continue;
            }
            b if b.is_ascii_alphanumeric() => {}
            b'-' | b'.' | b'_' | b'~' => {}
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// A request id from the client is kept when it is short and plain; otherwise a new one.
pub fn request_id(incoming: Option<&HeaderValue>) -> RequestId {
    match incoming {
        Some(id)
            if !id.is_empty()
                && id.len() <= 128
                && id
                    .as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) =>
        {
            RequestId(id.clone())
        }
        // A v4 UUID from the thread's userspace generator: no system call per request.
        _ => {
            let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
            let mut buf = uuid::Uuid::encode_buffer();
            let text = uuid.hyphenated().encode_lower(&mut buf);
            RequestId(HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// Request headers with one `X-Forwarded-For` field line per entry of `lines`.
    fn xff(lines: &[&'static str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for line in lines {
            h.append(X_FORWARDED_FOR, HeaderValue::from_static(line));
        }
        h
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_hop() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let chain = xff(&["6.6.6.6, 203.0.113.7, 10.0.0.5"]);
        let lb = Some(ip("10.0.0.1"));
        assert_eq!(client_ip(lb, &chain, &trusted), Some(ip("203.0.113.7")));
        // An untrusted peer's claims are ignored.
        let direct = Some(ip("198.51.100.2"));
        assert_eq!(client_ip(direct, &chain, &trusted), direct);
        // A trusted peer without a chain is the client.
        assert_eq!(client_ip(lb, &xff(&[]), &trusted), lb);
        // A chain of trusted proxies only: the furthest of them.
        assert_eq!(
            client_ip(lb, &xff(&["10.0.0.7, 10.0.0.5"]), &trusted),
            Some(ip("10.0.0.7"))
        );
    }

    #[test]
    fn every_forwarded_for_field_line_is_read_in_order() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let lb = Some(ip("10.0.0.1"));
        // The client's own line first, the proxy's appended line after it.
        let chain = xff(&["6.6.6.6", "203.0.113.7"]);
        assert_eq!(client_ip(lb, &chain, &trusted), Some(ip("203.0.113.7")));
        let chain = xff(&["6.6.6.6, 7.7.7.7", "10.0.0.4, 10.0.0.5", "10.0.0.6"]);
        assert_eq!(client_ip(lb, &chain, &trusted), Some(ip("7.7.7.7")));
        // Empty list elements are list syntax, not hops.
        let chain = xff(&["6.6.6.6", "203.0.113.7,", " , 10.0.0.5"]);
        assert_eq!(client_ip(lb, &chain, &trusted), Some(ip("203.0.113.7")));
    }

    #[test]
    fn hops_with_ports_brackets_and_mapped_addresses_are_parsed() {
        let trusted: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().expect("net"),
            "2001:db8:ffff::/48".parse().expect("net"),
        ];
        let lb = Some(ip("10.0.0.1"));
        for (hop, client) in [
            ("203.0.113.7:4711", "203.0.113.7"),
            ("2001:db8::7", "2001:db8::7"),
            ("[2001:db8::7]", "2001:db8::7"),
            ("[2001:db8::7]:4711", "2001:db8::7"),
            ("::ffff:203.0.113.7", "203.0.113.7"),
            ("[::ffff:203.0.113.7]:80", "203.0.113.7"),
        ] {
            let mut h = http::HeaderMap::new();
            let line = format!("6.6.6.6, {hop}, 10.0.0.5:80, [2001:db8:ffff::1]:443");
            h.append(X_FORWARDED_FOR, line.parse().expect("value"));
            assert_eq!(client_ip(lb, &h, &trusted), Some(ip(client)), "{hop}");
        }
        // A trusted proxy seen through an IPv4-mapped peer address is still trusted.
        let mapped = Some(ip("::ffff:10.0.0.1"));
        assert_eq!(
            client_ip(mapped, &xff(&["203.0.113.7"]), &trusted),
            Some(ip("203.0.113.7"))
        );
        // And an untrusted mapped peer is the same client as its IPv4 form.
        let mapped = Some(ip("::ffff:198.51.100.2"));
        assert_eq!(
            client_ip(mapped, &xff(&["6.6.6.6"]), &trusted),
            Some(ip("198.51.100.2"))
        );
    }

    #[test]
    fn an_unparseable_hop_ends_the_walk_and_is_never_skipped() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let lb = Some(ip("10.0.0.1"));
        for garbage in [
            "unknown",
            "[2001:db8::x]",
            "203.0.113.7:x",
            "2001:db8::1:4711:x",
            "_hidden",
            "203.0.113.7 6.6.6.6",
            "[203.0.113.7]",
        ] {
            let mut h = http::HeaderMap::new();
            h.append(X_FORWARDED_FOR, "6.6.6.6".parse().expect("value"));
            h.append(X_FORWARDED_FOR, garbage.parse().expect("value"));
            // Nothing trusted to its right: the peer itself is the client.
            assert_eq!(client_ip(lb, &h, &trusted), lb, "{garbage}");
            // A trusted hop to its right: that hop is the client.
            h.append(X_FORWARDED_FOR, "10.0.0.5".parse().expect("value"));
            assert_eq!(
                client_ip(lb, &h, &trusted),
                Some(ip("10.0.0.5")),
                "{garbage}"
            );
        }
        // A field line that is not text is one unparseable hop too.
        let mut h = xff(&["6.6.6.6"]);
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"\xff203.0.113.7").expect("value"),
        );
        assert_eq!(client_ip(lb, &h, &trusted), lb);
    }

    fn head(version: http::Version, headers: &[(&'static str, &'static [u8])]) -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/mcp", None).expect("req");
        req.set_version(version);
        for (name, value) in headers {
            let value = HeaderValue::from_bytes(value).expect("value");
            req.append_header(*name, value).expect("h");
        }
        req
    }

    #[test]
    fn http11_needs_exactly_one_valid_host() {
        let v11 = http::Version::HTTP_11;
        for good in [
            &b"localhost"[..],
            b"example.com:8080",
            b"127.0.0.1",
            b"127.0.0.1:80",
            b"[::1]",
            b"[2001:db8::1]:443",
            b"a-b_c~d.%41!$&'()*+,;=",
            b"example.com:",
        ] {
            let req = head(v11, &[("host", good)]);
            assert!(check_request_head(&req).is_ok(), "{good:?}");
        }
        for bad in [
            &b""[..],
            b"a b",
            b"host:80:x",
            b"example.com:8o",
            b":80",
            b"exa\tmple",
            b"ex\"ample",
            b"example.com/x",
            b"user@example.com",
            b"[::1",
            b"[::1]x",
            b"[v1.x]",
            b"[example.com]",
            b"%4",
            b"%zz.example",
            b"caf\xc3\xa9.example",
        ] {
            let req = head(v11, &[("host", bad)]);
            assert!(check_request_head(&req).is_err(), "{bad:?}");
        }
        assert!(check_request_head(&head(v11, &[])).is_err(), "no Host");
        let two = head(v11, &[("host", b"a.example"), ("host", b"a.example")]);
        assert!(check_request_head(&two).is_err(), "two Hosts");
    }

    #[test]
    fn other_versions_may_omit_host_but_not_repeat_or_garble_it() {
        for version in [http::Version::HTTP_10, http::Version::HTTP_2] {
            assert!(check_request_head(&head(version, &[])).is_ok());
            assert!(check_request_head(&head(version, &[("host", b"a b")])).is_err());
            let two = head(version, &[("host", b"a"), ("host", b"b")]);
            assert!(check_request_head(&two).is_err());
        }
    }

    #[test]
    fn single_valued_mcp_headers_may_not_repeat() {
        let v11 = http::Version::HTTP_11;
        for name in [
            "mcp-session-id",
            "mcp-protocol-version",
            "mcp-method",
            "mcp-name",
        ] {
            let once = head(v11, &[("host", b"h"), (name, b"a")]);
            assert!(check_request_head(&once).is_ok(), "{name}");
            let twice = head(v11, &[("host", b"h"), (name, b"a"), (name, b"a")]);
            let err = check_request_head(&twice).expect_err(name);
            assert!(matches!(err, GatewayError::BadRequest(_)), "{name}");
        }
    }

    #[test]
    fn request_ids_are_kept_only_when_safe() {
        let id = |v: &'static [u8]| HeaderValue::from_bytes(v).expect("value");
        assert_eq!(request_id(Some(&id(b"abc-123"))).as_str(), "abc-123");
        assert_ne!(request_id(Some(&id(b"bad id"))).as_str(), "bad id");
        let fresh = request_id(None);
        assert_eq!(fresh.as_str().len(), 36);
        assert!(uuid::Uuid::parse_str(fresh.as_str()).is_ok());
        assert_ne!(fresh.as_str(), request_id(None).as_str());
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
            host: Some(HeaderValue::from_static("gw.example.com")),
            request_id: &request_id(Some(&HeaderValue::from_static("rid"))),
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
        assert_eq!(req.headers["x-forwarded-proto"], "http");
        assert_eq!(req.headers["x-forwarded-host"], "gw.example.com");
        assert_eq!(req.headers["x-request-id"], "rid");
        // Added headers go on the wire in their usual case.
        let mut wire = Vec::new();
        req.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).expect("utf-8");
        for line in [
            "X-Forwarded-For: 10.1.2.3\r\n",
            "X-Forwarded-Proto: http\r\n",
            "X-Forwarded-Host: gw.example.com\r\n",
            "X-Request-Id: rid\r\n",
        ] {
            assert!(wire.contains(line), "{line:?} missing from {wire:?}");
        }
    }

    /// A plain-HTTP request relayed by the trusted proxy 10.0.0.9, without a Host.
    fn via_trusted_proxy(request_id: &RequestId) -> Forwarding<'_> {
        Forwarding {
            peer: Some("10.0.0.9".parse().expect("ip")),
            peer_trusted: true,
            tls: false,
            host: None,
            request_id,
        }
    }

    #[test]
    fn trusted_chain_is_extended() {
        let mut req = RequestHeader::build("GET", b"/mcp", None).expect("req");
        req.insert_header("x-forwarded-for", "1.1.1.1").expect("h");
        req.insert_header("x-forwarded-proto", "https").expect("h");
        req.insert_header("x-forwarded-host", "app.example.com")
            .expect("h");
        let rid = request_id(None);
        let fwd = via_trusted_proxy(&rid);
        rewrite(&mut req, &fwd, None, &IdentityHeaders::default()).expect("rewrite");
        assert_eq!(req.headers["x-forwarded-for"], "1.1.1.1, 10.0.0.9");
        assert_eq!(req.headers["x-forwarded-proto"], "https");
        assert_eq!(req.headers["x-forwarded-host"], "app.example.com");
    }

    #[test]
    fn every_field_line_of_a_trusted_chain_is_extended() {
        let mut req = RequestHeader::build("GET", b"/mcp", None).expect("req");
        req.append_header("x-forwarded-for", "1.1.1.1").expect("h");
        req.append_header("x-forwarded-for", "2.2.2.2, 3.3.3.3")
            .expect("h");
        req.append_header("forwarded", "for=1.1.1.1").expect("h");
        req.append_header("forwarded", "for=2.2.2.2").expect("h");
        let rid = request_id(None);
        let fwd = via_trusted_proxy(&rid);
        rewrite(&mut req, &fwd, None, &IdentityHeaders::default()).expect("rewrite");
        assert_eq!(
            req.headers["x-forwarded-for"],
            "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"
        );
        assert_eq!(req.headers.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(
            req.headers["forwarded"],
            "for=1.1.1.1, for=2.2.2.2, for=10.0.0.9;proto=http"
        );
        assert_eq!(req.headers.get_all("forwarded").iter().count(), 1);
    }

    #[test]
    fn forwarded_quotes_ipv6_and_drops_quote_characters_from_the_host() {
        let mut req = RequestHeader::build("GET", b"/mcp", None).expect("req");
        req.insert_header("forwarded", "for=6.6.6.6").expect("h");
        let fwd = Forwarding {
            peer: Some("::ffff:255.255.255.255".parse().expect("ip")),
            peer_trusted: false,
            tls: true,
            host: Some(HeaderValue::from_static("gw.example.com\"\\x")),
            request_id: &request_id(None),
        };
        rewrite(&mut req, &fwd, None, &IdentityHeaders::default()).expect("rewrite");
        assert_eq!(req.headers["x-forwarded-for"], "::ffff:255.255.255.255");
        assert_eq!(
            req.headers["forwarded"],
            "for=\"[::ffff:255.255.255.255]\";proto=https;host=\"gw.example.comx\""
        );
        assert_eq!(req.headers.get_all("forwarded").iter().count(), 1);
    }

    #[test]
    fn a_trusted_forwarded_chain_is_extended_and_no_peer_means_no_chain() {
        let mut req = RequestHeader::build("GET", b"/mcp", None).expect("req");
        req.insert_header("forwarded", "for=1.1.1.1").expect("h");
        let rid = request_id(None);
        let mut fwd = via_trusted_proxy(&rid);
        rewrite(&mut req, &fwd, None, &IdentityHeaders::default()).expect("rewrite");
        assert_eq!(
            req.headers["forwarded"],
            "for=1.1.1.1, for=10.0.0.9;proto=http"
        );

        // Without a peer address keygate cannot vouch for any hop: the chains go.
        let mut req = RequestHeader::build("GET", b"/mcp", None).expect("req");
        req.insert_header("forwarded", "for=1.1.1.1").expect("h");
        req.insert_header("x-forwarded-for", "1.1.1.1").expect("h");
        req.insert_header("x-forwarded-host", "evil.example.com")
            .expect("h");
        fwd.peer = None;
        fwd.peer_trusted = false;
        rewrite(&mut req, &fwd, None, &IdentityHeaders::default()).expect("rewrite");
        assert!(req.headers.get("forwarded").is_none());
        assert!(req.headers.get("x-forwarded-for").is_none());
        assert!(req.headers.get("x-forwarded-host").is_none());
    }
}
