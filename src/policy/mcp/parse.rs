//! The MCP shape of a request: the JSON-RPC calls in a Streamable HTTP POST body, and the
//! `Mcp-Method` / `Mcp-Name` headers checked against them.
//!
//! # What was checked against the specification
//!
//! Sources: the MCP specification repository (`modelcontextprotocol/modelcontextprotocol`):
//! `docs/specification/2025-11-25/basic/transports.mdx`, the 2025-03-26 revision of the same
//! page, the draft `docs/specification/draft/basic/transports/streamable-http.mdx` (revision
//! 2026-07-28), SEP-2243 (`seps/2243-http-standardization.md`), and the TypeScript SDK change
//! that sends the headers (`modelcontextprotocol/typescript-sdk` PR 2178).
//!
//! - POST body: 2025-03-26 allows a single message or a batch array (requests and/or
//!   notifications, or responses); 2025-06-18 and 2025-11-25 allow "a single JSON-RPC request,
//!   notification, or response" (no batches); the 2026-07-28 draft allows a single request or
//!   notification only. So batches and responses are both accepted here: responses yield no call.
//! - Names: `tools/call` and `prompts/get` carry `params.name`, `resources/read` carries
//!   `params.uri` (SEP-2243 examples, draft "Standard Request Headers" table).
//! - Headers (draft, SEP-2243): `Mcp-Method` mirrors `method`; `Mcp-Name` mirrors `params.name`
//!   or `params.uri`, required for those three methods. Anything that processes the body MUST
//!   reject a mismatch (400, JSON-RPC `HeaderMismatch`, `-32020` in the current draft; SEP-2243
//!   still says `-32001`). Header values are case-sensitive; surrounding whitespace is trimmed
//!   ("Extra whitespace in header -> MUST accept"). A name that is not header-safe is sent as
//!   `=?base64?{standard Base64 of UTF-8}?=`; the markers are lowercase and exact (the draft
//!   overrides SEP-2243's older "case-insensitive prefix" test row) and must be decoded before
//!   comparing. The SDK derives `Mcp-Name` as `params.name`, else `params.uri`, for *any*
//!   method, so other methods carry an optional name the same way (e.g. `resources/subscribe`).
//! - The headers exist only from 2026-07-28 and older clients send none, so their absence is
//!   accepted here; a caller that knows the request is 2026-07-28 enforces presence.
//!
//! # Batches and headers
//!
//! No revision has both: batches exist only in 2025-03-26, the headers only from 2026-07-28. A
//! header is read as a claim about *every* call in the body, so each call must match it; a batch
//! mixing methods or names is refused rather than letting the header vouch for one element
//! while the others go unnoticed by anything that routes or limits on the header.
//!
//! # Parsing
//!
//! The body is walked with a small serde visitor rather than through `serde_json::Value`: only
//! the members that matter are kept, and an object that repeats one of them (`method`,
//! `params.name`, ...) or spells it in another case (`Method`) is refused. Parsers disagree on
//! such objects (first or last wins; Go's `encoding/json` matches keys case-insensitively), and
//! the gateway must never authorize a different call from the one the upstream runs.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

pub(super) const TOOLS_CALL: &str = "tools/call";
const PROMPTS_GET: &str = "prompts/get";
const RESOURCES_READ: &str = "resources/read";
const BASE64_PREFIX: &str = "=?base64?";
const BASE64_SUFFIX: &str = "?=";

/// One JSON-RPC request or notification in a POST body. Its strings borrow from the body
/// unless JSON escapes made a copy necessary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcCall<'a> {
    /// The JSON-RPC `method`, never empty.
    pub method: Cow<'a, str>,
    /// `params.name` for `tools/call` and `prompts/get`, `params.uri` for `resources/read`
    /// (required for those three); for other methods `params.name`, else `params.uri`, if set.
    pub name: Option<Cow<'a, str>>,
}

/// Why an MCP POST body or its headers were refused; `Display` is safe to show clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum McpError {
    #[error("request body is not valid JSON")]
    NotJson,
    #[error("request body must be a JSON-RPC object or a batch array of objects")]
    NotAnObject,
    #[error("an empty batch is not a valid JSON-RPC request")]
    EmptyBatch,
    #[error("\"jsonrpc\" must be \"2.0\"")]
    BadVersion,
    #[error("\"method\" must be a non-empty string")]
    BadMethod,
    #[error("\"id\" must be a string, a number or null")]
    BadId,
    #[error("\"params\" must be an object or an array")]
    BadParams,
    #[error("a message must be a request (method) or a response (id and one of result or error)")]
    NotRequestOrResponse,
    #[error("a JSON-RPC member appears twice or in another letter case")]
    AmbiguousMember,
    #[error("{method} requires params.{field} (a non-empty string)")]
    MissingName {
        method: &'static str,
        field: &'static str,
    },
    #[error("the Mcp-Method header does not match the request body")]
    MethodHeaderMismatch,
    #[error("the Mcp-Name header does not match the request body")]
    NameHeaderMismatch,
    #[error("the Mcp-Method header is required when Mcp-Name is sent")]
    MissingMethodHeader,
    #[error("the Mcp-Name header is required for this method")]
    MissingNameHeader,
    #[error("the {header} header value is malformed")]
    InvalidHeaderValue { header: &'static str },
}

impl McpError {
    /// The JSON-RPC error code for a response body: -32700, -32600, -32602 or -32020.
    pub fn jsonrpc_code(&self) -> i32 {
        match self {
            McpError::NotJson => -32700,
            McpError::MissingName { .. } => -32602,
            McpError::MethodHeaderMismatch
            | McpError::NameHeaderMismatch
            | McpError::MissingMethodHeader
            | McpError::MissingNameHeader
            | McpError::InvalidHeaderValue { .. } => -32020,
            _ => -32600,
        }
    }
}

/// Parse a POST body: a single message or a batch array. Responses (objects with result/error
/// and no method) are allowed in a POST body and yield no call.
pub fn parse_body(body: &[u8]) -> Result<Vec<RpcCall<'_>>, McpError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let node = NodeSeed { top: true }
        .deserialize(&mut de)
        .map_err(|_| McpError::NotJson)?;
    de.end().map_err(|_| McpError::NotJson)?;
    match node {
        Node::Message(m) => Ok(m.into_call()?.into_iter().collect()),
        Node::Batch(items) => {
            if items.is_empty() {
                return Err(McpError::EmptyBatch);
            }
            let mut calls = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Node::Message(m) => calls.extend(m.into_call()?),
                    Node::Batch(_) | Node::NotObject => return Err(McpError::NotAnObject),
                }
            }
            Ok(calls)
        }
        Node::NotObject => Err(McpError::NotAnObject),
    }
}

/// The `Mcp-Method` / `Mcp-Name` headers must match the body when present (mismatch -> error).
/// With a batch every call must match them (see the module doc); with neither header, nothing
/// is checked (clients before 2026-07-28 send none).
pub fn check_headers(
    calls: &[RpcCall<'_>],
    mcp_method: Option<&str>,
    mcp_name: Option<&str>,
) -> Result<(), McpError> {
    if mcp_method.is_none() && mcp_name.is_none() {
        return Ok(());
    }
    let method = mcp_method
        .map(|v| plain_header_value(v, "Mcp-Method"))
        .transpose()?;
    let name = mcp_name.map(decode_name_header).transpose()?;
    let Some(method) = method else {
        return Err(McpError::MissingMethodHeader);
    };
    // A body of responses only has no method for the header to mirror.
    if calls.is_empty() {
        return Err(McpError::MethodHeaderMismatch);
    }
    for call in calls {
        if call.method != method {
            return Err(McpError::MethodHeaderMismatch);
        }
        match (name.as_deref(), call.name.as_deref()) {
            (Some(h), Some(b)) if h == b => {}
            (Some(_), _) => return Err(McpError::NameHeaderMismatch),
            (None, Some(_)) => return Err(McpError::MissingNameHeader),
            (None, None) => {}
        }
    }
    Ok(())
}

/// Trim HTTP whitespace and refuse anything but visible ASCII and inner spaces.
fn plain_header_value<'a>(value: &'a str, header: &'static str) -> Result<&'a str, McpError> {
    let v = value.trim_matches([' ', '\t']);
    if v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        Ok(v)
    } else {
        Err(McpError::InvalidHeaderValue { header })
    }
}

/// `Mcp-Name` as the client meant it: plain, or `=?base64?…?=` decoded to UTF-8.
fn decode_name_header(value: &str) -> Result<Cow<'_, str>, McpError> {
    const BAD: McpError = McpError::InvalidHeaderValue { header: "Mcp-Name" };
    let v = plain_header_value(value, "Mcp-Name")?;
    let encoded = v
        .strip_prefix(BASE64_PREFIX)
        .and_then(|rest| rest.strip_suffix(BASE64_SUFFIX));
    match encoded {
        None => Ok(Cow::Borrowed(v)),
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| BAD)?;
            String::from_utf8(bytes).map(Cow::Owned).map_err(|_| BAD)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Body walking: only the members we need, with repeated or case-variant members flagged.

/// A JSON value reduced to what the checks need.
enum Atom<'de> {
    Str(Cow<'de, str>),
    Num,
    Null,
    Other,
}

impl<'de> Atom<'de> {
    fn is_valid_id(&self) -> bool {
        matches!(self, Atom::Str(_) | Atom::Num | Atom::Null)
    }

    fn non_empty_str(self) -> Option<Cow<'de, str>> {
        match self {
            Atom::Str(s) if !s.is_empty() => Some(s),
            _ => None,
        }
    }
}

impl<'de> de::Deserialize<'de> for Atom<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AtomVisitor)
    }
}

struct AtomVisitor;

impl<'de> Visitor<'de> for AtomVisitor {
    type Value = Atom<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Atom<'de>, E> {
        Ok(Atom::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Atom<'de>, E> {
        Ok(Atom::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Atom<'de>, E> {
        Ok(Atom::Str(Cow::Owned(v)))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Atom<'de>, E> {
        Ok(Atom::Num)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Atom<'de>, E> {
        Ok(Atom::Num)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Atom<'de>, E> {
        Ok(Atom::Num)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Atom<'de>, E> {
        Ok(Atom::Other)
    }
    fn visit_unit<E>(self) -> Result<Atom<'de>, E> {
        Ok(Atom::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Atom<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Atom::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Atom<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Atom::Other)
    }
}

/// A member name, classified against the names we read at one level.
enum Key {
    Known(usize),
    CaseVariant,
    Other,
}

struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_str<E>(self, v: &str) -> Result<Key, E> {
        if let Some(i) = self.0.iter().position(|k| *k == v) {
            Ok(Key::Known(i))
        } else if self.0.iter().any(|k| k.eq_ignore_ascii_case(v)) {
            Ok(Key::CaseVariant)
        } else {
            Ok(Key::Other)
        }
    }
}

const MESSAGE_KEYS: &[&str] = &["jsonrpc", "method", "id", "params", "result", "error"];
const PARAMS_KEYS: &[&str] = &["name", "uri"];

/// `params` reduced to its shape and the two members that name a call.
enum Params<'de> {
    Object {
        name: Option<Atom<'de>>,
        uri: Option<Atom<'de>>,
    },
    Array,
    Invalid,
}

#[derive(Default)]
struct RawMessage<'de> {
    jsonrpc: Option<Atom<'de>>,
    method: Option<Atom<'de>>,
    id: Option<Atom<'de>>,
    params: Option<Params<'de>>,
    has_result: bool,
    has_error: bool,
    ambiguous: bool,
}

/// Put `value` in `slot`, or flag the object when the member was already seen.
fn set_once<T>(slot: &mut Option<T>, value: T, ambiguous: &mut bool) {
    if slot.is_some() {
        *ambiguous = true;
    } else {
        *slot = Some(value);
    }
}

fn read_message<'de, A: MapAccess<'de>>(mut map: A) -> Result<RawMessage<'de>, A::Error> {
    let mut m = RawMessage::default();
    while let Some(key) = map.next_key_seed(KeySeed(MESSAGE_KEYS))? {
        match key {
            Key::Known(0) => set_once(&mut m.jsonrpc, map.next_value()?, &mut m.ambiguous),
            Key::Known(1) => set_once(&mut m.method, map.next_value()?, &mut m.ambiguous),
            Key::Known(2) => set_once(&mut m.id, map.next_value()?, &mut m.ambiguous),
            Key::Known(3) => {
                let (params, ambiguous) = map.next_value_seed(ParamsSeed)?;
                m.ambiguous |= ambiguous;
                set_once(&mut m.params, params, &mut m.ambiguous);
            }
            Key::Known(4) | Key::Known(5) => {
                map.next_value::<IgnoredAny>()?;
                let seen = if matches!(key, Key::Known(4)) {
                    &mut m.has_result
                } else {
                    &mut m.has_error
                };
                m.ambiguous |= *seen;
                *seen = true;
            }
            Key::CaseVariant => {
                map.next_value::<IgnoredAny>()?;
                m.ambiguous = true;
            }
            Key::Known(_) | Key::Other => {
                map.next_value::<IgnoredAny>()?;
            }
        }
    }
    Ok(m)
}

/// Reads `params`; the flag says a naming member was repeated or case-varied.
struct ParamsSeed;

impl<'de> DeserializeSeed<'de> for ParamsSeed {
    type Value = (Params<'de>, bool);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParamsSeed {
    type Value = (Params<'de>, bool);
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("params")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut name, mut uri, mut ambiguous) = (None, None, false);
        while let Some(key) = map.next_key_seed(KeySeed(PARAMS_KEYS))? {
            match key {
                Key::Known(0) => set_once(&mut name, map.next_value()?, &mut ambiguous),
                Key::Known(1) => set_once(&mut uri, map.next_value()?, &mut ambiguous),
                Key::CaseVariant => {
                    map.next_value::<IgnoredAny>()?;
                    ambiguous = true;
                }
                Key::Known(_) | Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((Params::Object { name, uri }, ambiguous))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok((Params::Array, false))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok((Params::Invalid, false))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok((Params::Invalid, false))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok((Params::Invalid, false))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok((Params::Invalid, false))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok((Params::Invalid, false))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok((Params::Invalid, false))
    }
}

impl<'de> RawMessage<'de> {
    /// Validate the message; a request or notification becomes a call, a response nothing.
    fn into_call(self) -> Result<Option<RpcCall<'de>>, McpError> {
        if self.ambiguous {
            return Err(McpError::AmbiguousMember);
        }
        if !matches!(&self.jsonrpc, Some(Atom::Str(v)) if v == "2.0") {
            return Err(McpError::BadVersion);
        }
        if self.id.as_ref().is_some_and(|id| !id.is_valid_id()) {
            return Err(McpError::BadId);
        }
        let Some(method) = self.method else {
            // A response: an id and exactly one of result / error, nothing of a request.
            if self.has_result == self.has_error || self.id.is_none() || self.params.is_some() {
                return Err(McpError::NotRequestOrResponse);
            }
            return Ok(None);
        };
        if self.has_result || self.has_error {
            return Err(McpError::NotRequestOrResponse);
        }
        let method = method.non_empty_str().ok_or(McpError::BadMethod)?;
        let (name, uri) = match self.params {
            None | Some(Params::Array) => (None, None),
            Some(Params::Object { name, uri }) => (name, uri),
            Some(Params::Invalid) => return Err(McpError::BadParams),
        };
        let missing = |method, field| McpError::MissingName { method, field };
        let name = match method.as_ref() {
            TOOLS_CALL => Some(
                name.and_then(Atom::non_empty_str)
                    .ok_or(missing(TOOLS_CALL, "name"))?,
            ),
            PROMPTS_GET => Some(
                name.and_then(Atom::non_empty_str)
                    .ok_or(missing(PROMPTS_GET, "name"))?,
            ),
            RESOURCES_READ => Some(
                uri.and_then(Atom::non_empty_str)
                    .ok_or(missing(RESOURCES_READ, "uri"))?,
            ),
            _ => name
                .and_then(Atom::non_empty_str)
                .or_else(|| uri.and_then(Atom::non_empty_str)),
        };
        Ok(Some(RpcCall { method, name }))
    }
}

/// A top-level body or one batch element.
enum Node<'de> {
    Message(RawMessage<'de>),
    Batch(Vec<Node<'de>>),
    NotObject,
}

/// Reads a node; only the top level may be a batch.
struct NodeSeed {
    top: bool,
}

impl<'de> DeserializeSeed<'de> for NodeSeed {
    type Value = Node<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Node<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeSeed {
    type Value = Node<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON-RPC message or batch")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Node<'de>, A::Error> {
        read_message(map).map(Node::Message)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        if !self.top {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Node::NotObject);
        }
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(NodeSeed { top: false })? {
            items.push(item);
        }
        Ok(Node::Batch(items))
    }
    fn visit_str<E>(self, _: &str) -> Result<Node<'de>, E> {
        Ok(Node::NotObject)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Node<'de>, E> {
        Ok(Node::NotObject)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Node<'de>, E> {
        Ok(Node::NotObject)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Node<'de>, E> {
        Ok(Node::NotObject)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Node<'de>, E> {
        Ok(Node::NotObject)
    }
    fn visit_unit<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::NotObject)
    }
}

/// Property tests: what the inspector decides about a body is what the upstream (a
/// last-member-wins JSON parser, like `JSON.parse`) will act on, for hostile bodies too.
#[cfg(test)]
mod prop {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::parse_body;

    /// A JSON string literal for `s`, sometimes with its letters as `\u` escapes.
    fn lit(s: &str, escape: bool) -> String {
        if escape {
            let mut out = String::from("\"");
            for c in s.chars() {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            out.push('"');
            out
        } else {
            serde_json::to_string(s).unwrap_or_default()
        }
    }

    fn key() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "jsonrpc",
            "method",
            "Method",
            "METHOD",
            "params",
            "id",
            "name",
            "Name",
            "uri",
            "arguments",
            "result",
            "error",
            "x",
        ])
    }

    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "\"2.0\"",
                "\"tools/call\"",
                "\"tools/list\"",
                "\"delete_person\"",
                "\"get_person\"",
                "\"\"",
                "1",
                "null",
                "true",
                "[]",
                "{}",
                "\"resources/read\"",
                "\"prompts/get\"",
                "\"file:///x\"",
            ])
            .prop_map(str::to_string),
            (
                prop::sample::select(vec!["tools/call", "get_person", "delete_person", "2.0"]),
                any::<bool>()
            )
                .prop_map(|(s, e)| lit(s, e)),
        ]
    }

    /// Objects up to three levels deep, members possibly repeated or escaped.
    fn object() -> impl Strategy<Value = String> {
        let member = (key(), any::<bool>(), scalar());
        let leaf = prop::collection::vec(member, 0..6).prop_map(|ms| {
            let body: Vec<String> = ms
                .iter()
                .map(|(k, e, v)| format!("{}:{}", lit(k, *e), v))
                .collect();
            format!("{{{}}}", body.join(","))
        });
        leaf.prop_recursive(2, 24, 6, |inner| {
            prop::collection::vec((key(), any::<bool>(), prop_oneof![scalar(), inner]), 0..6)
                .prop_map(|ms| {
                    let body: Vec<String> = ms
                        .iter()
                        .map(|(k, e, v)| format!("{}:{}", lit(k, *e), v))
                        .collect();
                    format!("{{{}}}", body.join(","))
                })
        })
    }

    fn members_to_object(ms: &[(String, String)]) -> String {
        let body: Vec<String> = ms.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        format!("{{{}}}", body.join(","))
    }

    /// A valid-looking request (method, params with a name) with hostile extras mixed in:
    /// repeated or case-varied members, escaped member names, nested junk, any order.
    fn message() -> impl Strategy<Value = String> {
        let method = prop::sample::select(vec![
            "tools/call",
            "tools/list",
            "resources/read",
            "prompts/get",
            "ping",
        ]);
        let name = prop::sample::select(vec!["get_person", "delete_person", "file:///x"]);
        let extra = (key(), any::<bool>(), prop_oneof![scalar(), object()])
            .prop_map(|(k, e, v)| (lit(k, e), v));
        let param_extra = (key(), any::<bool>(), scalar()).prop_map(|(k, e, v)| (lit(k, e), v));
        (
            method,
            name,
            prop::collection::vec(any::<bool>(), 5),
            prop::collection::vec(param_extra, 0..3),
            prop::collection::vec(extra, 0..3),
            any::<u64>(),
        )
            .prop_map(|(method, name, esc, pextra, extra, seed)| {
                let name_key = if method == "resources/read" {
                    "uri"
                } else {
                    "name"
                };
                let mut params = vec![(lit(name_key, esc[0]), lit(name, esc[1]))];
                params.extend(pextra);
                let mut ms = vec![
                    (lit("jsonrpc", esc[2]), "\"2.0\"".to_string()),
                    (lit("id", false), "1".to_string()),
                    (lit("method", esc[3]), lit(method, esc[4])),
                    (lit("params", false), members_to_object(&params)),
                ];
                ms.extend(extra);
                // A deterministic shuffle from the case's seed.
                let mut order: Vec<(u64, (String, String))> = ms
                    .into_iter()
                    .enumerate()
                    .map(|(i, m)| (seed.rotate_left(i as u32 * 7) ^ (i as u64), m))
                    .collect();
                order.sort_by_key(|(k, _)| *k);
                members_to_object(&order.into_iter().map(|(_, m)| m).collect::<Vec<_>>())
            })
    }

    fn body() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => message(),
            1 => object(),
            1 => prop::collection::vec(message(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
        ]
    }

    /// The method and name an upstream reads from one message.
    fn upstream_view(m: &Value) -> (Option<String>, Option<String>) {
        let method = m.get("method").and_then(Value::as_str).map(str::to_string);
        let params = m.get("params");
        let field = |f: &str| {
            params
                .and_then(|p| p.get(f))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let name = match method.as_deref() {
            Some("resources/read") => field("uri"),
            _ => field("name").or_else(|| field("uri")),
        };
        (method, name)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Whenever the inspector accepts a body, every request an upstream would act on is
        /// among its calls, with the same method and name.
        #[test]
        fn accepted_bodies_mean_to_the_upstream_what_they_mean_to_keygate(body in body()) {
            if let Ok(calls) = parse_body(body.as_bytes()) {
                let value: Value = serde_json::from_str(&body)
                    .map_err(|e| TestCaseError::fail(format!("accepted non-JSON {body}: {e}")))?;
                let messages: Vec<&Value> = match &value {
                    Value::Array(items) => items.iter().collect(),
                    v => vec![v],
                };
                let requests: Vec<(Option<String>, Option<String>)> = messages
                    .iter()
                    .map(|m| upstream_view(m))
                    .filter(|(method, _)| method.is_some())
                    .collect();
                prop_assert_eq!(requests.len(), calls.len(), "{}", body);
                for ((method, name), call) in requests.iter().zip(&calls) {
                    prop_assert_eq!(method.as_deref(), Some(call.method.as_ref()), "{}", body);
                    if let Some(n) = call.name.as_deref() {
                        prop_assert_eq!(name.as_deref(), Some(n), "{}", body);
                    }
                    if call.method == "tools/call" {
                        prop_assert_eq!(name.as_deref(), call.name.as_deref(), "{}", body);
                    }
                }
            }
        }

        /// Any bytes at all are decided without a panic.
        #[test]
        fn any_bytes_are_decided(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_body(&bytes);
        }
    }
}
