//! The one path normal form, shared by the configuration (configured paths: `policy.mcp_paths`,
//! rate-rule `paths`, `auth.session_token_paths`, dev-mode paths) and the request path's route
//! decision ([`crate::proxy::route`]): both compare through these very functions, so a policy is
//! never skipped because a path was spelled differently. The normal form is described in
//! [`crate::proxy::route`]'s module docs. This module imports nothing from the crate.

use std::borrow::Cow;

/// The vault's own path.
pub const KEYS_PATH: &str = "/api/keys";

/// A path that no upstream may be handed: the request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Request path must not contain dot segments or encoded separators")]
pub struct PathRefused;

impl PathRefused {
    /// The refusal's text, for the 400 body.
    pub fn as_str(self) -> &'static str {
        "Request path must not contain dot segments or encoded separators"
    }
}

/// A configured path (`policy.mcp_paths`, rate-rule `paths`, `auth.session_token_paths`) in
/// normal form, so that it compares with request paths the same way. `None` when it is not an
/// absolute path that normalises cleanly.
pub fn normal_config_path(raw: &str) -> Option<String> {
    if !raw.starts_with('/') || raw.contains(['?', '#']) {
        return None;
    }
    let normal = normalize(raw).ok()?;
    // A configured prefix names segments, not a trailing slash: "/mcp/" is "/mcp".
    let trimmed = normal.strip_suffix('/').filter(|t| !t.is_empty());
    Some(trimmed.unwrap_or(&normal).to_string())
}

/// Bytes that never change under normalisation: a path made only of these, without `//`,
/// is its own normal form.
fn plain(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~')
}

/// The normal form of a request path (see the module docs), or refused.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathRefused> {
    let bytes = path.as_bytes();
    let canonical = bytes.first() == Some(&b'/')
        && bytes.iter().all(|&b| plain(b))
        && !bytes.windows(2).any(|w| w == b"//");
    if canonical {
        // Only dot segments can still be wrong.
        if path.split('/').any(|s| s == "." || s == "..") {
            return Err(PathRefused);
        }
        return Ok(Cow::Borrowed(path));
    }
    if bytes.contains(&b'\\') {
        return Err(PathRefused);
    }
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len() + 1);
    let trailing = bytes.last() == Some(&b'/') && bytes.len() > 1;
    for raw in bytes.split(|&b| b == b'/') {
        let seg = decode_segment(raw)?;
        // Servlet-style path parameters: everything from the first `;` of a segment.
        let seg = match seg.iter().position(|&b| b == b';') {
            Some(i) => &seg[..i],
            None => &seg[..],
        };
        if seg == b"." || seg == b".." {
            return Err(PathRefused);
        }
        if seg.is_empty() {
            continue;
        }
        out.push(b'/');
        out.extend(seg.iter().map(u8::to_ascii_lowercase));
    }
    if out.is_empty() || trailing {
        out.push(b'/');
    }
    Ok(Cow::Owned(String::from_utf8_lossy(&out).into_owned()))
}

/// One segment with its percent-escapes decoded — repeatedly, so a double-encoded name
/// (`%256d`) is read as an upstream that decodes twice would read it. An escape that decodes to
/// a separator (`/`, `\`) in any round is refused; a malformed one is kept as it is.
fn decode_segment(raw: &[u8]) -> Result<Cow<'_, [u8]>, PathRefused> {
    let mut seg = Cow::Borrowed(raw);
    for _ in 0..4 {
        if !has_escape(&seg) {
            return Ok(seg);
        }
        seg = Cow::Owned(decode_once(&seg)?);
    }
    // Encoded more than four times over: no upstream means that.
    Err(PathRefused)
}

/// Whether `seg` holds a well-formed percent-escape.
fn has_escape(seg: &[u8]) -> bool {
    seg.windows(3)
        .any(|w| w[0] == b'%' && hex(w[1]).is_some() && hex(w[2]).is_some())
}

fn decode_once(raw: &[u8]) -> Result<Vec<u8>, PathRefused> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                let b = h << 4 | l;
                if b == b'/' || b == b'\\' {
                    return Err(PathRefused);
                }
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
