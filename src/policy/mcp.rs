//! MCP authorization by JSON-RPC method and name: reading the calls out of a Streamable HTTP POST
//! body, checking the `Mcp-Method` / `Mcp-Name` headers against that body, the scope rules
//! (method glob, optional name glob -> scopes) and the organisation rules.
//!
//! This module owns the MCP *shape* of a request and the decisions made from it. It does not
//! read the HTTP request, cap or buffer the body, check `MCP-Protocol-Version` or sessions,
//! verify tokens, or turn a denial into a response (`proxy` and `error` do that).
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
use globset::{Candidate, GlobBuilder, GlobMatcher};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::auth::Identity;
pub use crate::config::file::{OrgRulesConfig, ScopeRuleConfig};

const TOOLS_CALL: &str = "tools/call";
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

// ---------------------------------------------------------------------------------------------
// Scope rules.

/// A compiled glob; plain strings and `*` skip the regex.
#[derive(Debug, Clone)]
pub(crate) enum Pattern {
    Any,
    Exact(String),
    Glob(GlobMatcher),
}

impl Pattern {
    pub(crate) fn compile(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("empty pattern".into());
        }
        if pattern == "*" {
            return Ok(Pattern::Any);
        }
        if !pattern.contains(['*', '?', '[', ']', '{', '}', '\\']) {
            return Ok(Pattern::Exact(pattern.to_owned()));
        }
        // `*` crosses `/` (method and URI segments are not paths); explicit escaping so the
        // meaning of `\` does not depend on the platform.
        GlobBuilder::new(pattern)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map(|g| Pattern::Glob(g.compile_matcher()))
            .map_err(|e| e.to_string())
    }

    pub(crate) fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(p) => p == s,
            Pattern::Glob(g) => g.is_match_candidate(&Candidate::from_bytes(s.as_bytes())),
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    method: Pattern,
    name: Option<Pattern>,
    scopes: Vec<String>,
}

impl Rule {
    fn matches(&self, call: &RpcCall<'_>) -> bool {
        self.method.matches(&call.method)
            && match (&self.name, &call.name) {
                (None, _) => true,
                (Some(p), Some(n)) => p.matches(n),
                (Some(_), None) => false,
            }
    }
}

/// Scope rules compiled once at startup; the first matching rule decides.
#[derive(Debug, Clone)]
pub struct ScopeRules {
    rules: Vec<Rule>,
}

/// RFC 6749 `scope-token`: `%x21 / %x23-5B / %x5D-7E`, so it fits a quoted `scope="…"`.
pub(crate) fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x5b | 0x5d..=0x7e))
}

impl ScopeRules {
    /// Compile config rules, naming the rule index and the bad glob or scope on error.
    pub fn compile(rules: &[ScopeRuleConfig]) -> Result<Self, String> {
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let method = Pattern::compile(&r.method).map_err(|e| {
                format!("scope_rules[{i}].method: invalid glob {:?}: {e}", r.method)
            })?;
            let name = match &r.name {
                None => None,
                Some(n) => Some(
                    Pattern::compile(n)
                        .map_err(|e| format!("scope_rules[{i}].name: invalid glob {n:?}: {e}"))?,
                ),
            };
            if let Some(bad) = r.scopes.iter().find(|s| !is_scope_token(s)) {
                return Err(format!(
                    "scope_rules[{i}].scopes: {bad:?} is not a valid OAuth scope token"
                ));
            }
            compiled.push(Rule {
                method,
                name,
                scopes: r.scopes.clone(),
            });
        }
        Ok(Self { rules: compiled })
    }

    /// The scopes a call needs: the first rule whose method (and name, if the rule has one)
    /// matches; no rule -> none needed.
    pub fn required(&self, call: &RpcCall<'_>) -> &[String] {
        self.rules
            .iter()
            .find(|r| r.matches(call))
            .map(|r| r.scopes.as_slice())
            .unwrap_or(&[])
    }

    /// Check every call against `granted`; on denial, return all the scopes the request needs
    /// (union over the calls, sorted, deduplicated) for the `WWW-Authenticate` `scope`.
    pub fn authorize(&self, calls: &[RpcCall<'_>], granted: &[String]) -> Result<(), Vec<String>> {
        let allowed = calls
            .iter()
            .all(|c| self.required(c).iter().all(|s| granted.contains(s)));
        if allowed {
            return Ok(());
        }
        let mut needed: Vec<String> = calls
            .iter()
            .flat_map(|c| self.required(c).iter().cloned())
            .collect();
        needed.sort_unstable();
        needed.dedup();
        Err(needed)
    }

    /// The Twenty default as config rules, so it can be shown, extended or put after own rules.
    ///
    /// Protocol housekeeping (`initialize`, `ping`, `notifications/*`, and `server/discover`,
    /// which replaces `initialize` in 2026-07-28) needs no scope: it carries no CRM data, the
    /// token is already authenticated, and requiring `twenty:read` would stop a token holding
    /// only `twenty:write` from connecting, or from cancelling a call, instead of answering the
    /// first data call with a precise `insufficient_scope`. Read-named tools (`get_*`, `list_*`,
    /// `search_*`, `find_*`, `filter_*`, as the Twenty server names them) need `twenty:read`;
    /// every other tool needs `twenty:write`, so an unknown tool fails closed. Everything else
    /// (listing, `resources/*`, `prompts/*`, completion, unknown methods) needs `twenty:read`.
    pub fn twenty_default_config() -> Vec<ScopeRuleConfig> {
        let rule = |method: &str, name: Option<&str>, scopes: &[&str]| ScopeRuleConfig {
            method: method.to_owned(),
            name: name.map(str::to_owned),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        };
        vec![
            rule("initialize", None, &[]),
            rule("ping", None, &[]),
            rule("notifications/*", None, &[]),
            rule("server/discover", None, &[]),
            rule(
                TOOLS_CALL,
                Some("{get,list,search,find,filter}_*"),
                &["twenty:read"],
            ),
            rule(TOOLS_CALL, None, &["twenty:write"]),
            rule("*", None, &["twenty:read"]),
        ]
    }

    /// The default for the Twenty MCP server (see [`ScopeRules::twenty_default_config`]).
    pub fn twenty_default() -> Self {
        // The patterns are constants covered by a test; should they ever fail to compile, fall
        // back to demanding both scopes for everything rather than allowing anything.
        Self::compile(&Self::twenty_default_config()).unwrap_or_else(|_| Self {
            rules: vec![Rule {
                method: Pattern::Any,
                name: None,
                scopes: vec!["twenty:read".into(), "twenty:write".into()],
            }],
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Org rules.

/// Why the org rules refused an identity; `Display` is safe to show clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrgDenial {
    #[error("this endpoint requires a token issued for an organization")]
    NoOrg,
    #[error("the token's organization is not allowed here")]
    OrgNotAllowed,
    #[error("the token's organization role is not allowed here")]
    RoleNotAllowed,
}

/// Org rules: with `allowed_org_ids` non-empty, the identity must carry one of them; with
/// `required_role`, its org role must equal it exactly (Clerk roles look like "org:admin"). A
/// token without org context is refused when any org rule is set.
pub fn check_org(rules: &OrgRulesConfig, identity: &Identity) -> Result<(), OrgDenial> {
    if !rules.is_active() {
        return Ok(());
    }
    let org = identity.org.as_ref().ok_or(OrgDenial::NoOrg)?;
    if !rules.allowed_org_ids.is_empty() && !rules.allowed_org_ids.contains(&org.id) {
        return Err(OrgDenial::OrgNotAllowed);
    }
    if let Some(role) = &rules.required_role {
        if org.role.as_deref() != Some(role.as_str()) {
            return Err(OrgDenial::RoleNotAllowed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{OrgContext, TokenKind};

    fn call<'a>(method: &'a str, name: Option<&'a str>) -> RpcCall<'a> {
        RpcCall {
            method: method.into(),
            name: name.map(Into::into),
        }
    }

    fn parse(body: &str) -> Result<Vec<RpcCall<'_>>, McpError> {
        parse_body(body.as_bytes())
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn rule(method: &str, name: Option<&str>, scopes: &[&str]) -> ScopeRuleConfig {
        ScopeRuleConfig {
            method: method.into(),
            name: name.map(Into::into),
            scopes: strings(scopes),
        }
    }

    // --- parse_body ---------------------------------------------------------------------

    #[test]
    fn single_request_without_name() {
        let calls = parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#);
        assert_eq!(calls, Ok(vec![call("tools/list", None)]));
    }

    #[test]
    fn tools_call_takes_params_name() {
        let body = r#"{"jsonrpc":"2.0","id":"a","method":"tools/call",
            "params":{"name":"get_contact","arguments":{"id":"1","name":"not this"}}}"#;
        assert_eq!(
            parse(body),
            Ok(vec![call("tools/call", Some("get_contact"))])
        );
    }

    #[test]
    fn prompts_get_takes_params_name() {
        let body = r#"{"jsonrpc":"2.0","id":2,"method":"prompts/get","params":{"name":"review"}}"#;
        assert_eq!(parse(body), Ok(vec![call("prompts/get", Some("review"))]));
    }

    #[test]
    fn resources_read_takes_params_uri_not_name() {
        let body = r#"{"jsonrpc":"2.0","id":3,"method":"resources/read",
            "params":{"uri":"twenty://people/1","name":"decoy"}}"#;
        assert_eq!(
            parse(body),
            Ok(vec![call("resources/read", Some("twenty://people/1"))])
        );
    }

    #[test]
    fn other_methods_carry_an_optional_name_like_the_sdk_header() {
        let body = r#"{"jsonrpc":"2.0","id":4,"method":"resources/subscribe","params":{"uri":"twenty://x"}}"#;
        assert_eq!(
            parse(body),
            Ok(vec![call("resources/subscribe", Some("twenty://x"))])
        );
    }

    #[test]
    fn notification_is_a_call() {
        let calls = parse(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert_eq!(calls, Ok(vec![call("notifications/initialized", None)]));
    }

    #[test]
    fn response_yields_no_call() {
        assert_eq!(parse(r#"{"jsonrpc":"2.0","id":7,"result":{}}"#), Ok(vec![]));
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":null,"error":{"code":-1,"message":"x"}}"#),
            Ok(vec![])
        );
    }

    #[test]
    fn batch_keeps_order_and_skips_responses() {
        let body = r#"[
            {"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_company"}},
            {"jsonrpc":"2.0","id":9,"result":{}},
            {"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}},
            {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"create_note"}}
        ]"#;
        assert_eq!(
            parse(body),
            Ok(vec![
                call("tools/call", Some("get_company")),
                call("notifications/cancelled", None),
                call("tools/call", Some("create_note")),
            ])
        );
    }

    #[test]
    fn malformed_json_is_not_json() {
        assert_eq!(parse(r#"{"jsonrpc":"2.0","#), Err(McpError::NotJson));
        assert_eq!(parse(""), Err(McpError::NotJson));
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","method":"ping"} {}"#),
            Err(McpError::NotJson)
        );
    }

    #[test]
    fn scalars_and_nested_batches_are_not_messages() {
        assert_eq!(parse(r#""tools/call""#), Err(McpError::NotAnObject));
        assert_eq!(parse("42"), Err(McpError::NotAnObject));
        assert_eq!(parse("null"), Err(McpError::NotAnObject));
        assert_eq!(
            parse(r#"[[{"jsonrpc":"2.0","method":"ping"}]]"#),
            Err(McpError::NotAnObject)
        );
        assert_eq!(
            parse(r#"[{"jsonrpc":"2.0","method":"ping"}, 1]"#),
            Err(McpError::NotAnObject)
        );
    }

    #[test]
    fn empty_batch_is_refused() {
        assert_eq!(parse("[]"), Err(McpError::EmptyBatch));
    }

    #[test]
    fn jsonrpc_version_must_be_2_0() {
        assert_eq!(
            parse(r#"{"method":"ping","id":1}"#),
            Err(McpError::BadVersion)
        );
        assert_eq!(
            parse(r#"{"jsonrpc":"1.0","method":"ping","id":1}"#),
            Err(McpError::BadVersion)
        );
        assert_eq!(
            parse(r#"{"jsonrpc":2.0,"method":"ping","id":1}"#),
            Err(McpError::BadVersion)
        );
    }

    #[test]
    fn method_must_be_a_non_empty_string() {
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":5}"#),
            Err(McpError::BadMethod)
        );
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":""}"#),
            Err(McpError::BadMethod)
        );
    }

    #[test]
    fn id_must_be_string_number_or_null() {
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#),
            Err(McpError::BadId)
        );
    }

    #[test]
    fn params_must_be_structured() {
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":"x"}"#),
            Err(McpError::BadParams)
        );
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":null}"#),
            Err(McpError::BadParams)
        );
    }

    #[test]
    fn neither_request_nor_response_is_refused() {
        // No method and no result/error.
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1}"#),
            Err(McpError::NotRequestOrResponse)
        );
        // A method and a result: the gateway and the upstream could read it differently.
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","result":{}}"#),
            Err(McpError::NotRequestOrResponse)
        );
        // Both result and error; and a response without an id.
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1,"result":{},"error":{}}"#),
            Err(McpError::NotRequestOrResponse)
        );
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","result":{}}"#),
            Err(McpError::NotRequestOrResponse)
        );
    }

    #[test]
    fn repeated_or_case_variant_members_are_refused() {
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","Method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_a","name":"delete_b"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_a","NAME":"delete_b"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_a"},"params":{"name":"b"}}"#,
        ] {
            assert_eq!(parse(body), Err(McpError::AmbiguousMember), "{body}");
        }
    }

    #[test]
    fn each_named_method_requires_its_name() {
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{}}}"#),
            Err(McpError::MissingName {
                method: "tools/call",
                field: "name"
            })
        );
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get"}"#),
            Err(McpError::MissingName {
                method: "prompts/get",
                field: "name"
            })
        );
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"name":"x"}}"#),
            Err(McpError::MissingName {
                method: "resources/read",
                field: "uri"
            })
        );
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#),
            Err(McpError::MissingName {
                method: "tools/call",
                field: "name"
            })
        );
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["get_x"]}"#),
            Err(McpError::MissingName {
                method: "tools/call",
                field: "name"
            })
        );
    }

    #[test]
    fn error_codes_follow_json_rpc_and_the_draft() {
        assert_eq!(McpError::NotJson.jsonrpc_code(), -32700);
        assert_eq!(McpError::EmptyBatch.jsonrpc_code(), -32600);
        assert_eq!(
            McpError::MissingName {
                method: "tools/call",
                field: "name"
            }
            .jsonrpc_code(),
            -32602
        );
        assert_eq!(McpError::NameHeaderMismatch.jsonrpc_code(), -32020);
    }

    // --- check_headers ------------------------------------------------------------------

    #[test]
    fn no_headers_is_accepted() {
        assert_eq!(
            check_headers(&[call("tools/call", Some("x"))], None, None),
            Ok(())
        );
    }

    #[test]
    fn matching_headers_are_accepted_with_whitespace_trimmed() {
        let calls = [call("tools/call", Some("get_contact"))];
        assert_eq!(
            check_headers(&calls, Some("tools/call"), Some(" get_contact\t")),
            Ok(())
        );
        let calls = [call("tools/list", None)];
        assert_eq!(check_headers(&calls, Some("tools/list"), None), Ok(()));
    }

    #[test]
    fn method_header_mismatch_is_refused() {
        let calls = [call("prompts/get", Some("x"))];
        assert_eq!(
            check_headers(&calls, Some("tools/call"), Some("x")),
            Err(McpError::MethodHeaderMismatch)
        );
        // Values are case-sensitive.
        assert_eq!(
            check_headers(&calls, Some("PROMPTS/GET"), Some("x")),
            Err(McpError::MethodHeaderMismatch)
        );
    }

    #[test]
    fn name_header_mismatch_is_refused() {
        let calls = [call("tools/call", Some("delete_company"))];
        assert_eq!(
            check_headers(&calls, Some("tools/call"), Some("get_company")),
            Err(McpError::NameHeaderMismatch)
        );
    }

    #[test]
    fn name_header_without_name_in_body_is_refused() {
        let calls = [call("tools/list", None)];
        assert_eq!(
            check_headers(&calls, Some("tools/list"), Some("get_company")),
            Err(McpError::NameHeaderMismatch)
        );
    }

    #[test]
    fn missing_name_or_method_header_is_refused_once_headers_are_used() {
        let calls = [call("tools/call", Some("get_company"))];
        assert_eq!(
            check_headers(&calls, Some("tools/call"), None),
            Err(McpError::MissingNameHeader)
        );
        assert_eq!(
            check_headers(&calls, None, Some("get_company")),
            Err(McpError::MissingMethodHeader)
        );
    }

    #[test]
    fn base64_name_header_is_decoded_and_markers_are_exact() {
        // "Hello, 世界" from the draft's encoding table.
        let calls = [call("resources/read", Some("Hello, 世界"))];
        assert_eq!(
            check_headers(
                &calls,
                Some("resources/read"),
                Some("=?base64?SGVsbG8sIOS4lueVjA==?=")
            ),
            Ok(())
        );
        // Uppercase markers are a literal value, not an encoding.
        let calls = [call("tools/call", Some("calc"))];
        assert_eq!(
            check_headers(&calls, Some("tools/call"), Some("=?BASE64?Y2FsYw==?=")),
            Err(McpError::NameHeaderMismatch)
        );
        assert_eq!(
            check_headers(&calls, Some("tools/call"), Some("=?base64?Y2FsYw==?=")),
            Ok(())
        );
    }

    #[test]
    fn malformed_header_values_are_refused() {
        let calls = [call("tools/call", Some("calc"))];
        let bad = Err(McpError::InvalidHeaderValue { header: "Mcp-Name" });
        // Missing padding, bad alphabet, control character, non-ASCII.
        for v in [
            "=?base64?Y2FsYw?=",
            "=?base64?Y2F!!sYw==?=",
            "ca\u{1}lc",
            "cälc",
        ] {
            assert_eq!(
                check_headers(&calls, Some("tools/call"), Some(v)),
                bad,
                "{v}"
            );
        }
        assert_eq!(
            check_headers(&calls, Some("tools/c\u{7f}all"), Some("calc")),
            Err(McpError::InvalidHeaderValue {
                header: "Mcp-Method"
            })
        );
    }

    #[test]
    fn headers_with_a_response_only_body_are_refused() {
        assert_eq!(
            check_headers(&[], Some("tools/call"), Some("x")),
            Err(McpError::MethodHeaderMismatch)
        );
    }

    #[test]
    fn headers_must_describe_every_call_in_a_batch() {
        let same = [
            call("tools/call", Some("get_a")),
            call("tools/call", Some("get_a")),
        ];
        assert_eq!(
            check_headers(&same, Some("tools/call"), Some("get_a")),
            Ok(())
        );
        let mixed = [
            call("tools/call", Some("get_a")),
            call("tools/call", Some("delete_b")),
        ];
        assert_eq!(
            check_headers(&mixed, Some("tools/call"), Some("get_a")),
            Err(McpError::NameHeaderMismatch)
        );
        let methods = [call("tools/list", None), call("tools/call", Some("get_a"))];
        assert_eq!(
            check_headers(&methods, Some("tools/list"), None),
            Err(McpError::MethodHeaderMismatch)
        );
    }

    // --- scope rules --------------------------------------------------------------------

    #[test]
    fn first_matching_rule_wins() {
        let rules = ScopeRules::compile(&[
            rule("tools/call", Some("get_*"), &["read"]),
            rule("tools/call", None, &["write"]),
            rule("tools/call", Some("get_secret"), &["admin"]),
        ])
        .unwrap();
        assert_eq!(
            rules.required(&call("tools/call", Some("get_secret"))),
            ["read"]
        );
        assert_eq!(
            rules.required(&call("tools/call", Some("delete_x"))),
            ["write"]
        );
    }

    #[test]
    fn rule_with_name_does_not_match_a_call_without_one() {
        let rules =
            ScopeRules::compile(&[rule("*", Some("*"), &["named"]), rule("*", None, &["any"])])
                .unwrap();
        assert_eq!(rules.required(&call("tools/list", None)), ["any"]);
        assert_eq!(rules.required(&call("prompts/get", Some("p"))), ["named"]);
    }

    #[test]
    fn no_matching_rule_needs_nothing() {
        let rules = ScopeRules::compile(&[rule("tools/call", None, &["write"])]).unwrap();
        assert!(rules.required(&call("tools/list", None)).is_empty());
        assert_eq!(rules.authorize(&[call("tools/list", None)], &[]), Ok(()));
    }

    #[test]
    fn globs_match_prefixes_alternations_and_cross_slashes() {
        let rules = ScopeRules::compile(&[
            rule("tools/call", Some("get_*"), &["a"]),
            rule(
                "resources/read",
                Some("twenty://{people,companies}/*"),
                &["b"],
            ),
            rule("notifications/*", None, &["c"]),
            rule("*", None, &["d"]),
        ])
        .unwrap();
        assert_eq!(
            rules.required(&call("tools/call", Some("get_company"))),
            ["a"]
        );
        // Case-sensitive, anchored.
        assert_eq!(
            rules.required(&call("tools/call", Some("Get_company"))),
            ["d"]
        );
        assert_eq!(
            rules.required(&call("tools/call", Some("xget_company"))),
            ["d"]
        );
        assert_eq!(
            rules.required(&call("resources/read", Some("twenty://people/1/notes"))),
            ["b"]
        );
        assert_eq!(
            rules.required(&call("resources/read", Some("twenty://tasks/1"))),
            ["d"]
        );
        assert_eq!(
            rules.required(&call("notifications/roots/list_changed", None)),
            ["c"]
        );
        assert_eq!(rules.required(&call("anything/else", None)), ["d"]);
    }

    #[test]
    fn compile_errors_name_the_rule_and_the_glob() {
        let err = ScopeRules::compile(&[
            rule("ping", None, &[]),
            rule("tools/call", Some("get_[a-"), &["x"]),
        ])
        .unwrap_err();
        assert!(err.contains("scope_rules[1].name"), "{err}");
        assert!(err.contains("get_[a-"), "{err}");

        let err = ScopeRules::compile(&[rule("tools/{call", None, &["x"])]).unwrap_err();
        assert!(err.contains("scope_rules[0].method"), "{err}");

        let err = ScopeRules::compile(&[rule("", None, &["x"])]).unwrap_err();
        assert!(err.contains("scope_rules[0].method"), "{err}");

        let err = ScopeRules::compile(&[rule("ping", None, &["a b"])]).unwrap_err();
        assert!(err.contains("scope_rules[0].scopes"), "{err}");
        let err = ScopeRules::compile(&[rule("ping", None, &["a\"b"])]).unwrap_err();
        assert!(err.contains("scope_rules[0].scopes"), "{err}");
    }

    #[test]
    fn all_scopes_of_a_rule_are_required() {
        let rules = ScopeRules::compile(&[rule("*", None, &["a", "b"])]).unwrap();
        let calls = [call("ping", None)];
        assert_eq!(rules.authorize(&calls, &strings(&["a", "b", "c"])), Ok(()));
        assert_eq!(
            rules.authorize(&calls, &strings(&["a"])),
            Err(strings(&["a", "b"]))
        );
    }

    #[test]
    fn batch_with_one_unauthorized_call_is_denied_with_the_union() {
        let rules = ScopeRules::compile(&[
            rule("tools/call", Some("get_*"), &["read"]),
            rule("tools/call", None, &["write", "read"]),
            rule("prompts/get", None, &["prompts"]),
        ])
        .unwrap();
        let calls = [
            call("tools/call", Some("get_a")),
            call("prompts/get", Some("p")),
            call("tools/call", Some("delete_b")),
            call("tools/call", Some("get_c")),
        ];
        assert_eq!(
            rules.authorize(&calls, &strings(&["read", "prompts"])),
            Err(strings(&["prompts", "read", "write"]))
        );
        assert_eq!(
            rules.authorize(&calls, &strings(&["read", "prompts", "write"])),
            Ok(())
        );
        // A body of responses only needs nothing.
        assert_eq!(rules.authorize(&[], &[]), Ok(()));
    }

    #[test]
    fn twenty_default_config_compiles() {
        assert!(ScopeRules::compile(&ScopeRules::twenty_default_config()).is_ok());
    }

    #[test]
    fn twenty_default_read_tool_vs_write_tool() {
        let rules = ScopeRules::twenty_default();
        let read = strings(&["twenty:read"]);
        for name in [
            "get_contact",
            "list_all_objects",
            "search_companies",
            "find_orphaned_records",
            "filter_activities",
        ] {
            let c = [call("tools/call", Some(name))];
            assert_eq!(rules.authorize(&c, &read), Ok(()), "{name}");
        }
        for name in ["create_contact", "update_company", "delete_note", "getaway"] {
            let c = [call("tools/call", Some(name))];
            assert_eq!(
                rules.authorize(&c, &read),
                Err(strings(&["twenty:write"])),
                "{name}"
            );
        }
        let write = strings(&["twenty:write"]);
        let c = [call("tools/call", Some("create_contact"))];
        assert_eq!(rules.authorize(&c, &write), Ok(()));
    }

    #[test]
    fn twenty_default_listing_and_reading_need_read() {
        let rules = ScopeRules::twenty_default();
        for c in [
            call("tools/list", None),
            call("resources/list", None),
            call("resources/read", Some("twenty://people/1")),
            call("prompts/list", None),
            call("prompts/get", Some("summary")),
            call("completion/complete", None),
        ] {
            assert_eq!(rules.required(&c), ["twenty:read"], "{c:?}");
        }
    }

    #[test]
    fn twenty_default_housekeeping_needs_no_scope() {
        let rules = ScopeRules::twenty_default();
        // A write-only token can still connect, ping and cancel.
        let write_only = strings(&["twenty:write"]);
        let calls = [
            call("initialize", None),
            call("notifications/initialized", None),
            call("ping", None),
            call("notifications/cancelled", None),
            call("server/discover", None),
        ];
        assert_eq!(rules.authorize(&calls, &write_only), Ok(()));
        assert_eq!(rules.authorize(&calls, &[]), Ok(()));
    }

    // --- org rules ----------------------------------------------------------------------

    fn identity(org: Option<(&str, Option<&str>)>) -> Identity {
        Identity {
            subject: "user_1".into(),
            issuer: "https://clerk.example.com".into(),
            kind: TokenKind::OAuthJwt,
            scopes: vec![],
            client_id: None,
            org: org.map(|(id, role)| OrgContext {
                id: id.into(),
                slug: None,
                role: role.map(Into::into),
                permissions: vec![],
            }),
            expires_at: None,
            roles: vec![],
            email: None,
            email_verified: None,
            second_factor_at: None,
        }
    }

    #[test]
    fn no_org_rules_allow_everyone() {
        let rules = OrgRulesConfig::default();
        assert!(!rules.is_active());
        assert_eq!(check_org(&rules, &identity(None)), Ok(()));
    }

    #[test]
    fn org_allowlist() {
        let rules = OrgRulesConfig {
            allowed_org_ids: strings(&["org_a", "org_b"]),
            required_role: None,
        };
        assert_eq!(check_org(&rules, &identity(Some(("org_b", None)))), Ok(()));
        assert_eq!(
            check_org(&rules, &identity(Some(("org_c", Some("org:admin"))))),
            Err(OrgDenial::OrgNotAllowed)
        );
    }

    #[test]
    fn org_role_must_equal_exactly() {
        let rules = OrgRulesConfig {
            allowed_org_ids: vec![],
            required_role: Some("org:admin".into()),
        };
        assert_eq!(
            check_org(&rules, &identity(Some(("org_x", Some("org:admin"))))),
            Ok(())
        );
        for role in [Some("org:member"), Some("admin"), None] {
            assert_eq!(
                check_org(&rules, &identity(Some(("org_x", role)))),
                Err(OrgDenial::RoleNotAllowed),
                "{role:?}"
            );
        }
    }

    #[test]
    fn org_allowlist_and_role_both_apply() {
        let rules = OrgRulesConfig {
            allowed_org_ids: strings(&["org_a"]),
            required_role: Some("org:admin".into()),
        };
        assert_eq!(
            check_org(&rules, &identity(Some(("org_a", Some("org:member"))))),
            Err(OrgDenial::RoleNotAllowed)
        );
        assert_eq!(
            check_org(&rules, &identity(Some(("org_b", Some("org:admin"))))),
            Err(OrgDenial::OrgNotAllowed)
        );
    }

    #[test]
    fn token_without_org_is_refused_when_any_org_rule_is_set() {
        for rules in [
            OrgRulesConfig {
                allowed_org_ids: strings(&["org_a"]),
                required_role: None,
            },
            OrgRulesConfig {
                allowed_org_ids: vec![],
                required_role: Some("org:admin".into()),
            },
        ] {
            assert_eq!(check_org(&rules, &identity(None)), Err(OrgDenial::NoOrg));
        }
    }

    #[test]
    fn org_rules_config_rejects_unknown_fields() {
        let ok: Result<OrgRulesConfig, _> =
            serde_json::from_str(r#"{"allowed_org_ids":["org_a"]}"#);
        assert!(ok.is_ok_and(|r| r.required_role.is_none() && r.allowed_org_ids == ["org_a"]));
        let bad: Result<OrgRulesConfig, _> = serde_json::from_str(r#"{"allowed_orgs":[]}"#);
        assert!(bad.is_err());
        let bad: Result<ScopeRuleConfig, _> =
            serde_json::from_str(r#"{"method":"*","scopes":[],"scope":"x"}"#);
        assert!(bad.is_err());
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
