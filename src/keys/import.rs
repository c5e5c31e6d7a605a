//! Reading the Node Twenty MCP server's stored keys, so its users can move to keygate without
//! re-entering them.
//!
//! It owns the Node server's at-rest format and the shapes of an export; it decrypts and hands
//! back plaintext records. It does not seal or store them (the vault does, under keygate's own
//! keyring), and it does not judge base URLs: they come back as stored, and the caller applies
//! keygate's base-URL allowlist before keeping one.
//!
//! # The Node format (checked against `jezweb/twenty-mcp`, `src/auth/encryption.ts` and
//! `src/auth/key-storage.ts`)
//!
//! Each user's Clerk `privateMetadata` holds `{twentyApiKey, twentyBaseUrl, twentyApiKeyUpdatedAt}`:
//!
//! - `twentyApiKey` = base64( IV (16 bytes) || GCM tag (16) || ciphertext ), AES-256-GCM with a
//!   16-byte IV and no associated data;
//! - the AES key = scrypt(secret as UTF-8, salt `"twenty-mcp-salt-v1"`, N = 16384, r = 8, p = 1,
//!   32 bytes) — Node's `scryptSync` defaults; the secret is the Node server's
//!   `API_KEY_ENCRYPTION_SECRET`, used verbatim as text (a hex secret is not hex-decoded), and the
//!   Node server refused secrets shorter than 32 characters;
//! - `twentyBaseUrl` is optional (an empty string means none, as in Node);
//! - `twentyApiKeyUpdatedAt` is an ISO-8601 / RFC 3339 string (`new Date().toISOString()`);
//!   integer Unix seconds are accepted too.
//!
//! # Accepted export shapes
//!
//! - a JSON object mapping user id -> record;
//! - a JSON array of objects, each with `"userId"` (or `"id"`) plus the record fields;
//! - in either, a Clerk user object whose `"private_metadata"` / `"privateMetadata"` holds the
//!   fields (a Clerk Backend API user list), and `{"data": [...]}` as the Clerk SDK pages users.
//!
//! Every entry ends up either in [`ImportReport::records`] or, with the reason, in
//! [`ImportReport::problems`]; none is skipped silently, and one bad entry never stops the rest.

use std::collections::HashSet;
use std::fmt;

use aes_gcm::aead::consts::U16;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::aes::Aes256;
use aes_gcm::{AesGcm, Nonce, Tag};
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use rand::rngs::OsRng;
use rand::RngCore;
use serde_json::{Map, Value};
use thiserror::Error;
use zeroize::Zeroizing;

/// The salt the Node server feeds scrypt.
pub const NODE_SALT: &str = "twenty-mcp-salt-v1";
/// Fewest characters (UTF-16 units, as JavaScript counts) the Node server allowed in its secret.
pub const NODE_MIN_SECRET_CHARS: usize = 32;

const NODE_SCRYPT_LOG_N: u8 = 14;
const NODE_SCRYPT_R: u32 = 8;
const NODE_SCRYPT_P: u32 = 1;
const IV_LEN: usize = 16;
const TAG_LEN: usize = 16;

/// AES-256-GCM with the 16-byte IV the Node server uses.
type NodeCipher = AesGcm<Aes256, U16>;

const B64_STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const B64_URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One user's decrypted record.
pub struct NodeRecord {
    pub user_id: String,
    pub api_key: Zeroizing<String>,
    pub base_url: Option<String>,
    /// Unix seconds.
    pub updated_at: Option<i64>,
}

impl fmt::Debug for NodeRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeRecord")
            .field("user_id", &self.user_id)
            .field("api_key", &"[redacted]")
            .field("base_url", &self.base_url)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// What an export yielded: the records that decrypted and the entries that did not.
#[derive(Debug, Default)]
pub struct ImportReport {
    pub records: Vec<NodeRecord>,
    pub problems: Vec<ImportProblem>,
}

/// One entry that could not be imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportProblem {
    /// The user id, or `"#<index>"` when the entry has none.
    pub entry: String,
    /// Why, never containing secret material.
    pub reason: String,
}

/// The whole export is unusable.
#[derive(Debug, Error)]
pub enum ImportError {
    /// Not JSON at all (position only; the content is never echoed).
    #[error("export is not valid JSON (line {line}, column {column})")]
    NotJson { line: usize, column: usize },
    /// JSON, but neither an object of records nor an array of users.
    #[error("export must be a JSON object (user id -> record) or an array of users, not {0}")]
    Shape(&'static str),
    /// The Node secret is shorter than the Node server ever accepted.
    #[error("the Node server's encryption secret must be at least 32 characters")]
    SecretTooShort,
    /// scrypt refused its parameters (never expected).
    #[error("deriving the Node server's key failed")]
    Kdf,
}

/// Decrypt every record of an export. Accepted shapes: a JSON object mapping user id -> record,
/// or a JSON array of objects each with "userId" (or "id") plus the record fields (Clerk users
/// exported with "private_metadata"/"privateMetadata" holding the fields are accepted too).
pub fn read_node_export(json: &[u8], node_secret: &str) -> Result<ImportReport, ImportError> {
    let doc: Value = serde_json::from_slice(json).map_err(|e| ImportError::NotJson {
        line: e.line(),
        column: e.column(),
    })?;
    let entries = entries(&doc)?;
    if node_secret.encode_utf16().count() < NODE_MIN_SECRET_CHARS {
        return Err(ImportError::SecretTooShort);
    }
    let cipher = node_cipher(node_secret)?;
    let mut report = ImportReport::default();
    let mut seen = HashSet::new();
    for entry in entries {
        let label = entry.label();
        match read_entry(&cipher, &entry) {
            Ok(record) if !seen.insert(record.user_id.clone()) => {
                report.problems.push(ImportProblem {
                    entry: label,
                    reason: "duplicate user id: an earlier entry for this user was kept".into(),
                })
            }
            Ok(record) => report.records.push(record),
            Err(reason) => report.problems.push(ImportProblem {
                entry: label,
                reason,
            }),
        }
    }
    Ok(report)
}

/// Encrypt exactly as the Node server does (random 16-byte IV) — used by tests to produce real records.
pub fn node_encrypt(plaintext: &str, node_secret: &str) -> String {
    match node_cipher(node_secret) {
        Ok(cipher) => encrypt_with(&cipher, plaintext.as_bytes()),
        // Unreachable with the fixed scrypt parameters; an empty value never imports.
        Err(_) => String::new(),
    }
}

fn node_cipher(node_secret: &str) -> Result<NodeCipher, ImportError> {
    let params = scrypt::Params::new(NODE_SCRYPT_LOG_N, NODE_SCRYPT_R, NODE_SCRYPT_P, 32)
        .map_err(|_| ImportError::Kdf)?;
    let mut key = Zeroizing::new([0u8; 32]);
    scrypt::scrypt(
        node_secret.as_bytes(),
        NODE_SALT.as_bytes(),
        &params,
        &mut key[..],
    )
    .map_err(|_| ImportError::Kdf)?;
    Ok(NodeCipher::new((&*key).into()))
}

fn encrypt_with(cipher: &NodeCipher, plaintext: &[u8]) -> String {
    let mut iv = [0u8; IV_LEN];
    OsRng.fill_bytes(&mut iv);
    let mut body = Zeroizing::new(plaintext.to_vec());
    let Ok(tag) = cipher.encrypt_in_place_detached(&Nonce::from(iv), b"", &mut body) else {
        // Only for plaintexts beyond 64 GiB; an empty value never imports.
        return String::new();
    };
    let mut out = Vec::with_capacity(IV_LEN + TAG_LEN + body.len());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&body);
    STANDARD.encode(out)
}

/// One entry of an export, before decryption.
struct Entry<'a> {
    index: usize,
    user_id: Option<&'a str>,
    value: &'a Value,
}

impl Entry<'_> {
    fn label(&self) -> String {
        match self.user_id {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => format!("#{}", self.index),
        }
    }
}

fn entries(doc: &Value) -> Result<Vec<Entry<'_>>, ImportError> {
    match doc {
        Value::Object(map) => match clerk_page(map) {
            Some(users) => Ok(array_entries(users)),
            None => Ok(map
                .iter()
                .enumerate()
                .map(|(index, (id, value))| Entry {
                    index,
                    user_id: Some(id.as_str()),
                    value,
                })
                .collect()),
        },
        Value::Array(items) => Ok(array_entries(items)),
        Value::Null => Err(ImportError::Shape("null")),
        Value::Bool(_) => Err(ImportError::Shape("a boolean")),
        Value::Number(_) => Err(ImportError::Shape("a number")),
        Value::String(_) => Err(ImportError::Shape("a string")),
    }
}

/// `{"data": [...], "totalCount"/"total_count": n}`, as Clerk pages its user list.
fn clerk_page(map: &Map<String, Value>) -> Option<&Vec<Value>> {
    let counted = map.contains_key("totalCount") || map.contains_key("total_count");
    match map.get("data") {
        Some(Value::Array(users)) if counted && map.len() == 2 => Some(users),
        _ => None,
    }
}

fn array_entries(items: &[Value]) -> Vec<Entry<'_>> {
    items
        .iter()
        .enumerate()
        .map(|(index, value)| Entry {
            index,
            user_id: ["userId", "id"]
                .iter()
                .find_map(|k| value.get(k).and_then(Value::as_str)),
            value,
        })
        .collect()
}

fn read_entry(cipher: &NodeCipher, entry: &Entry<'_>) -> Result<NodeRecord, String> {
    let Value::Object(obj) = entry.value else {
        return Err("entry is not a JSON object".into());
    };
    let user_id = match entry.user_id {
        Some(id) if !id.trim().is_empty() => id.to_string(),
        Some(_) => return Err("empty user id".into()),
        None => return Err("no \"userId\" or \"id\" string".into()),
    };
    let fields = record_fields(obj)?;
    let api_key = match fields.get("twentyApiKey") {
        None | Some(Value::Null) => return Err("no twentyApiKey (no stored key)".into()),
        Some(Value::String(s)) => decrypt(cipher, s)?,
        Some(_) => return Err("twentyApiKey is not a string".into()),
    };
    let base_url = match fields.get("twentyBaseUrl") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(s.trim().to_string()),
        Some(_) => return Err("twentyBaseUrl is not a string".into()),
    };
    let updated_at = match fields.get("twentyApiKeyUpdatedAt") {
        None | Some(Value::Null) => None,
        Some(v) => Some(timestamp(v)?),
    };
    Ok(NodeRecord {
        user_id,
        api_key,
        base_url,
        updated_at,
    })
}

/// The object holding the record fields: the entry itself, or a Clerk user's private metadata.
fn record_fields(obj: &Map<String, Value>) -> Result<&Map<String, Value>, String> {
    if obj.contains_key("twentyApiKey") {
        return Ok(obj);
    }
    for name in ["private_metadata", "privateMetadata"] {
        match obj.get(name) {
            Some(Value::Object(meta)) => return Ok(meta),
            None | Some(Value::Null) => {}
            Some(_) => return Err(format!("{name} is not an object")),
        }
    }
    Ok(obj)
}

fn decrypt(cipher: &NodeCipher, encoded: &str) -> Result<Zeroizing<String>, String> {
    let compact: String = encoded
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let raw = B64_STANDARD_LENIENT
        .decode(&compact)
        .or_else(|_| B64_URL_SAFE_LENIENT.decode(&compact))
        .map_err(|_| "twentyApiKey is not valid base64".to_string())?;
    if raw.len() < IV_LEN + TAG_LEN {
        return Err(format!(
            "twentyApiKey is {} bytes, shorter than the {} of IV and tag",
            raw.len(),
            IV_LEN + TAG_LEN
        ));
    }
    let iv: [u8; IV_LEN] = raw[..IV_LEN]
        .try_into()
        .map_err(|_| "twentyApiKey IV is malformed".to_string())?;
    let tag: [u8; TAG_LEN] = raw[IV_LEN..IV_LEN + TAG_LEN]
        .try_into()
        .map_err(|_| "twentyApiKey tag is malformed".to_string())?;
    let mut plain = Zeroizing::new(raw[IV_LEN + TAG_LEN..].to_vec());
    cipher
        .decrypt_in_place_detached(&Nonce::from(iv), b"", &mut plain, &Tag::from(tag))
        .map_err(|_| {
            "twentyApiKey does not decrypt: wrong Node secret, or the value is damaged".to_string()
        })?;
    let text = std::str::from_utf8(&plain)
        .map_err(|_| "decrypted twentyApiKey is not UTF-8 text".to_string())?;
    if text.is_empty() {
        return Err("decrypted twentyApiKey is empty".into());
    }
    Ok(Zeroizing::new(text.to_string()))
}

fn timestamp(value: &Value) -> Result<i64, String> {
    let bad = || "twentyApiKeyUpdatedAt is not an RFC 3339 time or Unix seconds".to_string();
    let when = match value {
        Value::String(s) => {
            time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
                .map_err(|_| bad())?
        }
        Value::Number(n) => n
            .as_i64()
            .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
            .ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok(when.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "node-side secret used for a golden test vector, 32+ chars";

    fn cipher() -> NodeCipher {
        node_cipher(SECRET).expect("derive")
    }

    fn read(doc: &Value) -> ImportReport {
        read_node_export(doc.to_string().as_bytes(), SECRET).expect("usable export")
    }

    fn keys(report: &ImportReport) -> Vec<(&str, &str)> {
        report
            .records
            .iter()
            .map(|r| (r.user_id.as_str(), r.api_key.as_str()))
            .collect()
    }

    #[test]
    fn decrypts_values_written_by_node() {
        // Produced by Node 20's crypto (scryptSync + aes-256-gcm, 16-byte IV) the way the Node
        // server does, with SECRET.
        let doc = json!({
            "user_golden": {
                "twentyApiKey": "vtyfJAMEtV1FJ2hs158gny0YLDaBl+6yIC2jc76I7qg+DSuVecoMZl045/DY6SjaHBMFfhxUC445yCYhY793yKyX",
                "twentyBaseUrl": "https://crm.example.com",
                "twentyApiKeyUpdatedAt": "2024-05-06T07:08:09.123Z"
            },
            "user_second": {
                "twentyApiKey": "ZTGn9tLm7Coe7quAj3Z2l6GAzdbDGliQC/5Ru3XoOGHNTW0AUVX45Z0="
            }
        });
        let report = read(&doc);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(
            keys(&report),
            vec![
                ("user_golden", "tw_golden_Ünïcode_key_0123456789"),
                ("user_second", "tw_second")
            ]
        );
        let golden = &report.records[0];
        assert_eq!(golden.base_url.as_deref(), Some("https://crm.example.com"));
        assert_eq!(golden.updated_at, Some(1_714_979_289));
        assert_eq!(report.records[1].base_url, None);
        assert_eq!(report.records[1].updated_at, None);

        let wrong = read_node_export(
            doc.to_string().as_bytes(),
            "a different secret of at least 32 characters",
        )
        .expect("usable export");
        assert!(wrong.records.is_empty());
        assert_eq!(wrong.problems.len(), 2);
        assert!(wrong.problems[0].reason.contains("wrong Node secret"));
    }

    #[test]
    fn node_encrypt_has_the_node_layout() {
        let sealed = node_encrypt("tw_layout", SECRET);
        let raw = STANDARD.decode(&sealed).expect("standard base64");
        assert_eq!(raw.len(), 16 + 16 + "tw_layout".len());
        let c = cipher();
        let again = STANDARD
            .decode(encrypt_with(&c, b"tw_layout"))
            .expect("base64");
        assert_ne!(raw[..16], again[..16], "the IV must be random");
        let iv: [u8; 16] = raw[..16].try_into().expect("iv");
        let tag: [u8; 16] = raw[16..32].try_into().expect("tag");
        let mut body = raw[32..].to_vec();
        c.decrypt_in_place_detached(&Nonce::from(iv), b"", &mut body, &Tag::from(tag))
            .expect("IV || tag || ciphertext");
        assert_eq!(body, b"tw_layout");
    }

    #[test]
    fn mixed_export_keeps_good_records_and_reports_every_bad_one() {
        let c = cipher();
        let good = encrypt_with(&c, b"tw_good_1");
        let mut tampered = STANDARD
            .decode(encrypt_with(&c, b"tw_tampered"))
            .expect("b64");
        tampered[20] ^= 1;
        let doc = json!([
            {"userId": "user_good", "twentyApiKey": good, "twentyBaseUrl": "https://api.twenty.com",
             "twentyApiKeyUpdatedAt": "2024-01-02T03:04:05Z"},
            {"id": "user_clerk", "private_metadata": {
                "twentyApiKey": encrypt_with(&c, b"tw_clerk"), "twentyBaseUrl": "",
                "twentyApiKeyUpdatedAt": 1_700_000_000}},
            {"id": "user_clerk_sdk", "privateMetadata": {"twentyApiKey": encrypt_with(&c, b"tw_sdk")}},
            {"userId": "user_bad_b64", "twentyApiKey": "not base64 at all!"},
            {"userId": "user_tampered", "twentyApiKey": STANDARD.encode(&tampered)},
            {"userId": "user_no_key", "twentyBaseUrl": "https://api.twenty.com"},
            {"id": "user_clerk_no_key", "private_metadata": {}},
            {"userId": "user_not_utf8", "twentyApiKey": encrypt_with(&c, &[0xff, 0xfe, 0x00])},
            {"userId": "user_empty", "twentyApiKey": encrypt_with(&c, b"")},
            {"userId": "user_bad_time", "twentyApiKey": encrypt_with(&c, b"tw_t"),
             "twentyApiKeyUpdatedAt": "yesterday"},
            {"userId": "user_short", "twentyApiKey": STANDARD.encode([0u8; 20])},
            {"userId": "user_key_type", "twentyApiKey": 42},
            {"userId": "user_url_type", "twentyApiKey": encrypt_with(&c, b"tw_u"), "twentyBaseUrl": 7},
            {"twentyApiKey": encrypt_with(&c, b"tw_anonymous")},
            "not an object",
            {"userId": "user_good", "twentyApiKey": encrypt_with(&c, b"tw_good_again")},
        ]);
        let report = read(&doc);
        assert_eq!(
            keys(&report),
            vec![
                ("user_good", "tw_good_1"),
                ("user_clerk", "tw_clerk"),
                ("user_clerk_sdk", "tw_sdk")
            ]
        );
        assert_eq!(
            report.records[0].base_url.as_deref(),
            Some("https://api.twenty.com")
        );
        assert_eq!(report.records[0].updated_at, Some(1_704_164_645));
        assert_eq!(report.records[1].base_url, None);
        assert_eq!(report.records[1].updated_at, Some(1_700_000_000));

        let expected = [
            ("user_bad_b64", "not valid base64"),
            ("user_tampered", "does not decrypt"),
            ("user_no_key", "no twentyApiKey"),
            ("user_clerk_no_key", "no twentyApiKey"),
            ("user_not_utf8", "not UTF-8"),
            ("user_empty", "is empty"),
            ("user_bad_time", "twentyApiKeyUpdatedAt"),
            ("user_short", "shorter than"),
            ("user_key_type", "twentyApiKey is not a string"),
            ("user_url_type", "twentyBaseUrl is not a string"),
            ("#13", "no \"userId\""),
            ("#14", "not a JSON object"),
            ("user_good", "duplicate user id"),
        ];
        assert_eq!(
            report.problems.len(),
            expected.len(),
            "{:?}",
            report.problems
        );
        for (problem, (entry, reason)) in report.problems.iter().zip(expected) {
            assert_eq!(problem.entry, entry);
            assert!(problem.reason.contains(reason), "{problem:?}");
            assert!(!problem.reason.contains("tw_"), "{problem:?}");
        }
        let shown = format!("{report:?}");
        assert!(
            !shown.contains("tw_good_1") && shown.contains("[redacted]"),
            "{shown}"
        );
    }

    #[test]
    fn object_and_paged_shapes_are_accepted() {
        let c = cipher();
        let map = json!({
            "user_a": {"twentyApiKey": encrypt_with(&c, b"tw_a")},
            "user_b": {"private_metadata": {"twentyApiKey": encrypt_with(&c, b"tw_b")}},
            "user_c": {"twentyBaseUrl": "https://api.twenty.com"}
        });
        let report = read(&map);
        assert_eq!(keys(&report), vec![("user_a", "tw_a"), ("user_b", "tw_b")]);
        assert_eq!(
            report.problems,
            vec![ImportProblem {
                entry: "user_c".into(),
                reason: "no twentyApiKey (no stored key)".into()
            }]
        );
        let paged = json!({
            "data": [{"id": "user_p", "privateMetadata": {"twentyApiKey": encrypt_with(&c, b"tw_p")}}],
            "totalCount": 1
        });
        let report = read(&paged);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(keys(&report), vec![("user_p", "tw_p")]);
    }

    #[test]
    fn unusable_exports_are_errors() {
        assert!(matches!(
            read_node_export(b"{\"user\": ", SECRET),
            Err(ImportError::NotJson { line: 1, .. })
        ));
        assert!(matches!(
            read_node_export(b"\"tw_secret_here\"", SECRET),
            Err(ImportError::Shape("a string"))
        ));
        assert!(matches!(
            read_node_export(b"42", SECRET),
            Err(ImportError::Shape("a number"))
        ));
        assert!(matches!(
            read_node_export(b"{}", "short secret"),
            Err(ImportError::SecretTooShort)
        ));
        let err = read_node_export(b"[{\"twentyApiKey\": \"tw_leak", SECRET)
            .expect_err("truncated")
            .to_string();
        assert!(!err.contains("tw_leak"), "{err}");
    }
}
