//! Envelope encryption of stored API keys: the only place keygate seals or opens a key at rest.
//!
//! It owns the keyring built from `API_KEY_ENCRYPTION_SECRET` (plus retired secrets kept only to
//! decrypt), the envelope byte format, and the associated data that binds a ciphertext to its
//! owner. It does not store anything, decide who may read a key, or rotate records (the vault
//! does, using [`Keyring::key_id_of`]); reading the Node server's own format is `keys::import`.
//!
//! # Accepted secrets
//!
//! Leading and trailing whitespace is ignored (a secrets file often ends with a newline).
//!
//! | form | example | read as |
//! |---|---|---|
//! | 64 hex characters (either case) | `openssl rand -hex 32` | those 32 bytes |
//! | base64 of exactly 32 bytes, standard (`+/`) or URL-safe (`-_`) alphabet, padded (44 characters ending in `=`) | `openssl rand -base64 32` | those 32 bytes |
//! | anything else of at least 32 characters | a long passphrase | scrypt(passphrase, salt `"keygate/api-key-encryption/v1"`, N = 2^15, r = 8, p = 1) → 32 bytes |
//!
//! A string that fits the hex form is always hex, and one that fits the base64 form is always
//! base64. Unpadded base64 (43 characters) is deliberately read as a passphrase: a 43-character
//! passphrase of letters and dashes would otherwise be mistaken for a raw key and lose its
//! stretching. The same 32 bytes given as hex or as padded base64 are the same key.
//!
//! Rejected, with an error that names which secret is wrong but never shows it: an empty
//! secret; anything shorter than 32 characters; a hex/base64 key whose 32 bytes take fewer than
//! 16 distinct values, repeat a shorter pattern, or mostly step by one constant amount (a
//! sequence); a passphrase with fewer than 10 distinct characters, that repeats a shorter piece,
//! that is mostly a run of consecutive characters, or that contains an obvious placeholder
//! ("changeme", "replace-me", "your-secret", "placeholder", "example").
//!
//! # Keys and key ids
//!
//! From the 32 bytes above, HKDF-SHA256 (no salt) derives two independent values:
//!
//! - the AES-256-GCM key: info `"keygate/api-key-encryption/v1 aes-256-gcm key"`, 32 bytes;
//! - the key id: info `"keygate/api-key-encryption/v1 key id"`, 4 bytes, written as 8 lowercase
//!   hex characters. It names the key without revealing it; two different secrets get different
//!   ids (a collision among configured secrets is refused at startup).
//!
//! Changing any label, salt or parameter here makes every stored record unreadable: the golden
//! test vectors below pin them.
//!
//! # Envelope layout (format version 1)
//!
//! ```text
//! offset   size  field
//! 0        1     format version, 0x01
//! 1        8     key id, 8 lowercase hex ASCII characters
//! 9        12    nonce, random per seal (OS RNG)
//! 21       n     AES-256-GCM ciphertext (n = plaintext length)
//! 21 + n   16    GCM tag
//! ```
//!
//! Total: 37 + n bytes. The associated data (authenticated, not stored) is
//!
//! ```text
//! version (1) || key id (8) || len(kind) u64 BE || kind || len(owner slot) u64 BE || owner slot
//! ```
//!
//! with kind `"api_key"` and the owner slot such as `"user:user_123"`, so an envelope copied to
//! another owner's record, or relabelled with another version or key id, fails to open.
//!
//! # Format version 2 (written since base URLs are authenticated)
//!
//! The same layout with version byte 0x02; its associated data adds the record's base URL — the
//! one other stored field that steers where the key is sent:
//!
//! ```text
//! (version 1's fields) || 0x00                                  no base URL
//! (version 1's fields) || 0x01 || len(base url) u64 BE || url   with one
//! ```
//!
//! so a base URL changed in the store makes the record fail to open. Version 1 envelopes still
//! open (their base URL is not bound; the vault re-checks it against the allowlist when it
//! injects, and `keygate keys rotate` rewrites them as version 2).

use std::fmt;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hkdf::Hkdf;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

/// The envelope format version this build writes.
pub const FORMAT_VERSION: u8 = 2;
/// The first format, without the base URL in its associated data; still opened.
pub const FORMAT_VERSION_1: u8 = 1;
/// The record kind bound into every API-key envelope.
pub const RECORD_KIND_API_KEY: &str = "api_key";
/// Salt (label) of the scrypt stretch applied to passphrase secrets.
pub const PASSPHRASE_SALT: &str = "keygate/api-key-encryption/v1";
/// Fewest characters a secret may have, whatever its form.
pub const MIN_SECRET_CHARS: usize = 32;
/// Fewest distinct characters a passphrase may have.
pub const MIN_PASSPHRASE_DISTINCT_CHARS: usize = 10;

/// Fewest distinct byte values 32 raw key bytes may have: random ones have ~30, and fewer
/// than 16 happens to random bytes with odds far below 2^-100.
const MIN_RAW_DISTINCT_BYTES: usize = 16;
const SCRYPT_LOG_N: u8 = 15;
const SCRYPT_R: u32 = 8;
const SCRYPT_P: u32 = 1;
const HKDF_INFO_AES_KEY: &[u8] = b"keygate/api-key-encryption/v1 aes-256-gcm key";
const HKDF_INFO_KEY_ID: &[u8] = b"keygate/api-key-encryption/v1 key id";
const PLACEHOLDERS: &[&str] = &[
    "changeme",
    "change-me",
    "change_me",
    "replaceme",
    "replace-me",
    "replace_me",
    "your-secret",
    "your_secret",
    "yoursecret",
    "placeholder",
    "example",
];

const KEY_LEN: usize = 32;
const KEY_ID_BYTES: usize = 4;
const KEY_ID_LEN: usize = 2 * KEY_ID_BYTES;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const NONCE_AT: usize = 1 + KEY_ID_LEN;
const BODY_AT: usize = NONCE_AT + NONCE_LEN;
/// Bytes an envelope adds to its plaintext.
pub const ENVELOPE_OVERHEAD: usize = BODY_AT + TAG_LEN;

const B64_STANDARD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);
const B64_URL_SAFE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

/// A problem with the configured secrets; names the secret, never shows it.
#[derive(Debug, Error)]
pub enum KeyringError {
    /// The secret is empty (or only whitespace).
    #[error("{which} is empty")]
    Empty { which: String },
    /// Fewer than [`MIN_SECRET_CHARS`] characters.
    #[error(
        "{which} is too short: use 64 hex characters or base64 of 32 random bytes \
         (e.g. `openssl rand -hex 32`), or a passphrase of at least 32 characters"
    )]
    TooShort { which: String },
    /// Long enough, but obviously guessable.
    #[error("{which} is too weak: {reason}")]
    Weak { which: String, reason: &'static str },
    /// Two different secrets derive the same key id (astronomically unlikely; refuse rather
    /// than let one key shadow the other).
    #[error("{which} and {other} are different secrets with the same key id {id}; replace one")]
    KeyIdCollision {
        which: String,
        other: String,
        id: String,
    },
    /// A key derivation function refused its input (never expected with fixed parameters).
    #[error("{which}: key derivation failed")]
    Kdf { which: String },
}

/// Why an envelope could not be sealed or opened. Messages carry no secret material.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CryptoError {
    /// Sealed under a key that is neither active nor among the previous secrets.
    #[error("sealed under key id {0}, which is not in the keyring (is its secret among the previous secrets?)")]
    UnknownKeyId(String),
    /// Written by a format version this build does not read.
    #[error("unsupported envelope format version {0}")]
    UnsupportedVersion(u8),
    /// Not an envelope: too short, or a key id that is not lowercase hex.
    #[error("malformed envelope")]
    Malformed,
    /// Authentication failed: altered bytes, the wrong key, or an envelope moved from another
    /// owner's record.
    #[error("envelope failed authentication (altered, wrong key, or bound to another owner)")]
    Failed,
    /// The operating system's random number generator failed.
    #[error("no randomness available for a nonce")]
    Rng,
    /// The plaintext exceeds what AES-GCM can seal.
    #[error("plaintext too large to seal")]
    TooLarge,
}

/// One key. The raw key bytes are wiped as soon as the cipher is built; the cipher's expanded
/// key schedule lives as long as the keyring (aes-gcm wipes it only with the `aes/zeroize`
/// feature).
struct KeyEntry {
    id: String,
    cipher: Aes256Gcm,
}

/// The active key (seals and opens) and retired keys (open only), each named by its key id.
pub struct Keyring {
    active: KeyEntry,
    retired: Vec<KeyEntry>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.active.id)
            .field(
                "retired",
                &self
                    .retired
                    .iter()
                    .map(|k| k.id.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keyring {
    /// `active` is API_KEY_ENCRYPTION_SECRET; `previous` are retired secrets kept only to decrypt.
    pub fn from_secrets(active: &str, previous: &[&str]) -> Result<Self, KeyringError> {
        let active_which = "the active encryption secret".to_string();
        let (active_key, active_id) = derive_key(active, &active_which)?;
        let active_entry = KeyEntry::new(&active_key, active_id);
        let mut seen: Vec<(String, String, Zeroizing<[u8; KEY_LEN]>)> =
            vec![(active_which, active_entry.id.clone(), active_key)];
        let mut retired = Vec::new();
        for (i, secret) in previous.iter().enumerate() {
            let which = format!("previous encryption secret #{}", i + 1);
            let (key, id) = derive_key(secret, &which)?;
            if let Some((other, _, other_key)) = seen.iter().find(|(_, seen_id, _)| *seen_id == id)
            {
                if !same_bytes(&key[..], &other_key[..]) {
                    return Err(KeyringError::KeyIdCollision {
                        which,
                        other: other.clone(),
                        id,
                    });
                }
                // The same secret twice (or the active one again): nothing new to hold.
                continue;
            }
            retired.push(KeyEntry::new(&key, id.clone()));
            seen.push((which, id, key));
        }
        Ok(Self {
            active: active_entry,
            retired,
        })
    }

    /// The id of the key new envelopes are sealed under.
    pub fn active_key_id(&self) -> &str {
        &self.active.id
    }

    /// Ids of the retired keys, which only open.
    pub fn retired_key_ids(&self) -> impl Iterator<Item = &str> {
        self.retired.iter().map(|k| k.id.as_str())
    }

    /// Seal `plaintext` for the record slot `owner_slot` (e.g. "user:user_123"), for a record
    /// without a base URL.
    pub fn seal(&self, plaintext: &[u8], owner_slot: &str) -> Result<Vec<u8>, CryptoError> {
        self.seal_record(plaintext, owner_slot, None)
    }

    /// Open an envelope sealed for `owner_slot` and a record without a base URL; the plaintext
    /// is wiped when dropped.
    pub fn open(&self, sealed: &[u8], owner_slot: &str) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.open_record(sealed, owner_slot, None)
    }

    /// Seal `plaintext` for `owner_slot` and the record's `base_url`, both bound into the
    /// envelope (format version 2).
    pub fn seal_record(
        &self,
        plaintext: &[u8],
        owner_slot: &str,
        base_url: Option<&str>,
    ) -> Result<Vec<u8>, CryptoError> {
        self.seal_kind(plaintext, RECORD_KIND_API_KEY, owner_slot, base_url)
    }

    /// Open a record's envelope: a version 2 envelope opens only with the `base_url` it was
    /// sealed with; a version 1 envelope binds no base URL.
    pub fn open_record(
        &self,
        sealed: &[u8],
        owner_slot: &str,
        base_url: Option<&str>,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.open_kind(sealed, RECORD_KIND_API_KEY, owner_slot, base_url)
    }

    /// The format version of an envelope, when it is one this build reads.
    pub fn version_of(sealed: &[u8]) -> Option<u8> {
        Header::parse(sealed).ok().map(|h| h.version)
    }

    /// The key id a sealed envelope names (rotation uses it to find records not under the active key).
    pub fn key_id_of(sealed: &[u8]) -> Option<String> {
        let header = Header::parse(sealed).ok()?;
        Some(String::from_utf8_lossy(header.key_id).into_owned())
    }

    fn seal_kind(
        &self,
        plaintext: &[u8],
        kind: &str,
        owner_slot: &str,
        base_url: Option<&str>,
    ) -> Result<Vec<u8>, CryptoError> {
        let key = &self.active;
        let mut nonce = [0u8; NONCE_LEN];
        OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|_| CryptoError::Rng)?;
        let mut out = Vec::with_capacity(ENVELOPE_OVERHEAD + plaintext.len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(key.id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let aad = associated_data(
            FORMAT_VERSION,
            key.id.as_bytes(),
            kind,
            owner_slot,
            base_url,
        );
        match key
            .cipher
            .encrypt_in_place_detached(&Nonce::from(nonce), &aad, &mut out[BODY_AT..])
        {
            Ok(tag) => {
                // Capacity was reserved up front, so this never reallocates.
                out.extend_from_slice(&tag);
                Ok(out)
            }
            Err(_) => {
                out.zeroize();
                Err(CryptoError::TooLarge)
            }
        }
    }

    fn open_kind(
        &self,
        sealed: &[u8],
        kind: &str,
        owner_slot: &str,
        base_url: Option<&str>,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let header = Header::parse(sealed)?;
        let key = self.find(header.key_id).ok_or_else(|| {
            CryptoError::UnknownKeyId(String::from_utf8_lossy(header.key_id).into_owned())
        })?;
        let nonce: [u8; NONCE_LEN] = sealed[NONCE_AT..BODY_AT]
            .try_into()
            .map_err(|_| CryptoError::Malformed)?;
        let tag_at = sealed.len() - TAG_LEN;
        let tag: [u8; TAG_LEN] = sealed[tag_at..]
            .try_into()
            .map_err(|_| CryptoError::Malformed)?;
        let aad = associated_data(header.version, header.key_id, kind, owner_slot, base_url);
        let mut plain = Zeroizing::new(sealed[BODY_AT..tag_at].to_vec());
        key.cipher
            .decrypt_in_place_detached(&Nonce::from(nonce), &aad, &mut plain, &Tag::from(tag))
            .map_err(|_| CryptoError::Failed)?;
        Ok(plain)
    }

    fn find(&self, key_id: &[u8]) -> Option<&KeyEntry> {
        std::iter::once(&self.active)
            .chain(&self.retired)
            .find(|k| k.id.as_bytes() == key_id)
    }
}

impl KeyEntry {
    fn new(key: &[u8; KEY_LEN], id: String) -> Self {
        Self {
            id,
            cipher: Aes256Gcm::new(key.into()),
        }
    }
}

/// The fixed-position fields of an envelope, checked.
struct Header<'a> {
    version: u8,
    key_id: &'a [u8],
}

impl<'a> Header<'a> {
    fn parse(sealed: &'a [u8]) -> Result<Self, CryptoError> {
        let version = *sealed.first().ok_or(CryptoError::Malformed)?;
        if version != FORMAT_VERSION && version != FORMAT_VERSION_1 {
            return Err(CryptoError::UnsupportedVersion(version));
        }
        if sealed.len() < ENVELOPE_OVERHEAD {
            return Err(CryptoError::Malformed);
        }
        let key_id = &sealed[1..NONCE_AT];
        if !key_id
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            return Err(CryptoError::Malformed);
        }
        Ok(Self { version, key_id })
    }
}

fn associated_data(
    version: u8,
    key_id: &[u8],
    kind: &str,
    owner_slot: &str,
    base_url: Option<&str>,
) -> Vec<u8> {
    let url_len = base_url.map_or(0, |u| 8 + u.len());
    let mut aad =
        Vec::with_capacity(1 + key_id.len() + 17 + kind.len() + owner_slot.len() + url_len);
    aad.push(version);
    aad.extend_from_slice(key_id);
    aad.extend_from_slice(&(kind.len() as u64).to_be_bytes());
    aad.extend_from_slice(kind.as_bytes());
    aad.extend_from_slice(&(owner_slot.len() as u64).to_be_bytes());
    aad.extend_from_slice(owner_slot.as_bytes());
    if version >= FORMAT_VERSION {
        match base_url {
            None => aad.push(0),
            Some(url) => {
                aad.push(1);
                aad.extend_from_slice(&(url.len() as u64).to_be_bytes());
                aad.extend_from_slice(url.as_bytes());
            }
        }
    }
    aad
}

/// The AES key and key id of one secret.
fn derive_key(
    secret: &str,
    which: &str,
) -> Result<(Zeroizing<[u8; KEY_LEN]>, String), KeyringError> {
    let material = key_material(secret, which)?;
    let hk = Hkdf::<Sha256>::new(None, &material[..]);
    let kdf = || KeyringError::Kdf {
        which: which.to_string(),
    };
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    hk.expand(HKDF_INFO_AES_KEY, &mut key[..])
        .map_err(|_| kdf())?;
    let mut id = [0u8; KEY_ID_BYTES];
    hk.expand(HKDF_INFO_KEY_ID, &mut id).map_err(|_| kdf())?;
    Ok((key, to_hex(&id)))
}

/// The 32 bytes a secret stands for, by the rules in the module doc.
fn key_material(secret: &str, which: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyringError> {
    let s = secret.trim();
    if s.is_empty() {
        return Err(KeyringError::Empty {
            which: which.to_string(),
        });
    }
    if s.len() == 2 * KEY_LEN && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        let key = decode_hex(s);
        return check_raw(key, which);
    }
    if s.len() == 44 && s.ends_with('=') {
        let mut buf = Zeroizing::new([0u8; 48]);
        for engine in [&B64_STANDARD, &B64_URL_SAFE] {
            if let Ok(KEY_LEN) = engine.decode_slice(s, &mut buf[..]) {
                let mut key = Zeroizing::new([0u8; KEY_LEN]);
                key.copy_from_slice(&buf[..KEY_LEN]);
                return check_raw(key, which);
            }
        }
    }
    if s.chars().count() < MIN_SECRET_CHARS {
        return Err(KeyringError::TooShort {
            which: which.to_string(),
        });
    }
    check_passphrase(s, which)?;
    let params = scrypt::Params::new(SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P, KEY_LEN).map_err(|_| {
        KeyringError::Kdf {
            which: which.to_string(),
        }
    })?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    scrypt::scrypt(
        s.as_bytes(),
        PASSPHRASE_SALT.as_bytes(),
        &params,
        &mut key[..],
    )
    .map_err(|_| KeyringError::Kdf {
        which: which.to_string(),
    })?;
    Ok(key)
}

fn check_raw(
    key: Zeroizing<[u8; KEY_LEN]>,
    which: &str,
) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyringError> {
    let mut present = Zeroizing::new([0u8; 256]);
    for b in key.iter() {
        present[usize::from(*b)] = 1;
    }
    let distinct = present.iter().filter(|p| **p == 1).count();
    if distinct < MIN_RAW_DISTINCT_BYTES || repeats(&key[..]) || runs_in_steps(&key[..]) {
        return Err(KeyringError::Weak {
            which: which.to_string(),
            reason: "its 32 bytes are a repeated pattern or a sequence, not random \
                     (try `openssl rand -hex 32`)",
        });
    }
    Ok(key)
}

/// Whether `s` is one shorter piece repeated (`abcabcabc…`, `0123456789abcdef` four times).
fn repeats<T: PartialEq>(s: &[T]) -> bool {
    (1..=s.len() / 2).any(|period| s.iter().zip(&s[period..]).all(|(a, b)| a == b))
}

/// Whether most neighbours differ by one constant step (`abcdefgh…`, `0246…`, `zyxw…`):
/// three quarters of the steps at least.
fn runs_in_steps(s: &[u8]) -> bool {
    if s.len() < 4 {
        return false;
    }
    let steps: Vec<u8> = s.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    let most = steps
        .iter()
        .map(|d| steps.iter().filter(|e| *e == d).count())
        .max()
        .unwrap_or(0);
    most * 4 >= steps.len() * 3
}

fn check_passphrase(s: &str, which: &str) -> Result<(), KeyringError> {
    let weak = |reason| KeyringError::Weak {
        which: which.to_string(),
        reason,
    };
    let mut distinct = 0;
    for (i, c) in s.char_indices() {
        if !s[..i].contains(c) {
            distinct += 1;
            if distinct >= MIN_PASSPHRASE_DISTINCT_CHARS {
                break;
            }
        }
    }
    if distinct < MIN_PASSPHRASE_DISTINCT_CHARS {
        return Err(weak("a passphrase needs at least 10 distinct characters"));
    }
    let chars: Vec<char> = s.chars().collect();
    if repeats(&chars) {
        return Err(weak("a passphrase must not be one piece repeated"));
    }
    if runs_in_steps(s.as_bytes()) {
        return Err(weak(
            "a passphrase must not be a run of consecutive characters",
        ));
    }
    let lower = Zeroizing::new(s.to_lowercase());
    if PLACEHOLDERS.iter().any(|p| lower.contains(p)) {
        return Err(weak("it looks like a placeholder from an example"));
    }
    Ok(())
}

/// 64 hex digits (checked by the caller) as the key's 32 bytes.
fn decode_hex(s: &str) -> Zeroizing<[u8; KEY_LEN]> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if hex::decode_to_slice(s, &mut key[..]).is_err() {
        // Unreachable for checked input; an all-zero key is refused as weak anyway.
        key.fill(0);
    }
    key
}

fn to_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Constant-time comparison of key material.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f000112233445566778899aabbccddeeff";
    const HEX_OTHER: &str = "ffeeddccbbaa99887766554433221100f1e2d3c4b5a6978879695a4b3c2d1e0f";
    const SLOT: &str = "user:user_123";
    /// Key id of `HEX`, pinned: a change means every stored record would stop opening.
    const HEX_ID: &str = "90f79ded";
    /// `b"tw_golden_api_key"` sealed under `HEX` for `SLOT` by format version 1 (cross-checked
    /// with an independent Python implementation of the module doc).
    const GOLDEN: &str =
        "013930663739646564bb4722cd7dac8d84076bb0fd3363343eb2ab5e85407039e9f1e6997\
                          d876cbfef6237cd5b7b86b96014e5c9ee57";

    fn ring(active: &str, previous: &[&str]) -> Keyring {
        match Keyring::from_secrets(active, previous) {
            Ok(k) => k,
            Err(e) => panic!("keyring: {e}"),
        }
    }

    fn id_of(secret: &str) -> String {
        ring(secret, &[]).active_key_id().to_string()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn round_trip() {
        let k = ring(HEX, &[]);
        for plain in [&b"tw_abc.def-123"[..], b"", &[0u8; 300]] {
            let sealed = k.seal(plain, SLOT).expect("seal");
            assert_eq!(sealed.len(), ENVELOPE_OVERHEAD + plain.len());
            assert_eq!(k.open(&sealed, SLOT).expect("open").as_slice(), plain);
        }
    }

    #[test]
    fn envelope_layout() {
        let k = ring(HEX, &[]);
        let sealed = k.seal(b"secret-key", SLOT).expect("seal");
        assert_eq!(sealed.len(), 1 + 8 + 12 + 10 + 16);
        assert_eq!(sealed[0], FORMAT_VERSION);
        assert_eq!(&sealed[1..9], HEX_ID.as_bytes());
        assert!(!sealed.windows(10).any(|w| w == b"secret-key"));
    }

    #[test]
    fn golden_envelope_still_opens() {
        let k = ring(HEX, &[]);
        assert_eq!(k.active_key_id(), HEX_ID);
        let plain = k.open(&unhex(GOLDEN), SLOT).expect("golden envelope");
        assert_eq!(plain.as_slice(), b"tw_golden_api_key");
    }

    #[test]
    fn the_base_url_is_bound_into_version_2_envelopes() {
        let k = ring(HEX, &[]);
        let url = Some("https://crm.example.com");
        let sealed = k.seal_record(b"tw_key", SLOT, url).expect("seal");
        assert_eq!(sealed[0], FORMAT_VERSION);
        assert_eq!(
            k.open_record(&sealed, SLOT, url).expect("open").as_slice(),
            b"tw_key"
        );
        for other in [None, Some("http://169.254.169.254/latest"), Some("")] {
            assert_eq!(
                k.open_record(&sealed, SLOT, other),
                Err(CryptoError::Failed),
                "{other:?}"
            );
        }
        // No base URL and an empty one are different records.
        let none = k.seal(b"tw_key", SLOT).expect("seal");
        assert!(k.open_record(&none, SLOT, Some("")).is_err());
        // Version 1 records (golden vector) still open, whatever base URL they carry.
        let golden = unhex(GOLDEN);
        assert_eq!(golden[0], FORMAT_VERSION_1);
        assert!(k
            .open_record(&golden, SLOT, Some("https://x.example"))
            .is_ok());
        assert_eq!(Keyring::version_of(&golden), Some(FORMAT_VERSION_1));
        assert_eq!(Keyring::version_of(&sealed), Some(FORMAT_VERSION));
    }

    #[test]
    fn each_seal_uses_a_fresh_nonce() {
        let k = ring(HEX, &[]);
        let a = k.seal(b"same", SLOT).expect("seal");
        let b = k.seal(b"same", SLOT).expect("seal");
        assert_ne!(a[NONCE_AT..BODY_AT], b[NONCE_AT..BODY_AT]);
        assert_ne!(a[BODY_AT..], b[BODY_AT..]);
    }

    #[test]
    fn another_owner_slot_fails() {
        let k = ring(HEX, &[]);
        let sealed = k.seal(b"tw_1", SLOT).expect("seal");
        for other in [
            "user:user_1234",
            "user:user_12",
            "org:user_123",
            "user_123",
            "",
        ] {
            assert_eq!(k.open(&sealed, other), Err(CryptoError::Failed), "{other}");
        }
    }

    #[test]
    fn record_kind_is_bound() {
        let k = ring(HEX, &[]);
        let sealed = k.seal_kind(b"tw_1", "api_key", SLOT, None).expect("seal");
        assert_eq!(
            k.open_kind(&sealed, "org_key", SLOT, None),
            Err(CryptoError::Failed)
        );
        assert!(k.open_kind(&sealed, "api_key", SLOT, None).is_ok());
    }

    #[test]
    fn every_flipped_byte_fails() {
        let k = ring(HEX, &[]);
        let sealed = k.seal(b"tw_flip_me", SLOT).expect("seal");
        for i in 0..sealed.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = sealed.clone();
                bad[i] ^= bit;
                assert!(k.open(&bad, SLOT).is_err(), "byte {i} bit {bit:#x}");
            }
        }
        let mut bad = sealed.clone();
        bad[0] = 3;
        assert_eq!(k.open(&bad, SLOT), Err(CryptoError::UnsupportedVersion(3)));
        // A version 2 envelope relabelled as version 1 (to shed its base URL binding) fails.
        let mut relabelled = sealed.clone();
        relabelled[0] = FORMAT_VERSION_1;
        assert!(k.open(&relabelled, SLOT).is_err());
        let tag_at = sealed.len() - TAG_LEN;
        let mut bad = sealed.clone();
        bad[tag_at] ^= 1;
        assert_eq!(k.open(&bad, SLOT), Err(CryptoError::Failed));
        assert_eq!(
            k.open(&sealed[..ENVELOPE_OVERHEAD - 1], SLOT),
            Err(CryptoError::Malformed)
        );
        assert_eq!(k.open(&[], SLOT), Err(CryptoError::Malformed));
    }

    #[test]
    fn key_id_is_authenticated() {
        // Two ids over the same AES key: only the associated data can tell them apart.
        let key = derive_key(HEX, "test").expect("derive").0;
        let k = Keyring {
            active: KeyEntry::new(&key, "aaaaaaaa".into()),
            retired: vec![KeyEntry::new(&key, "bbbbbbbb".into())],
        };
        let mut sealed = k.seal(b"tw_1", SLOT).expect("seal");
        sealed[1..NONCE_AT].copy_from_slice(b"bbbbbbbb");
        assert_eq!(k.open(&sealed, SLOT), Err(CryptoError::Failed));
        sealed[1..NONCE_AT].copy_from_slice(b"aaaaaaaa");
        assert!(k.open(&sealed, SLOT).is_ok());
    }

    #[test]
    fn retired_keys_open_only_when_configured() {
        let old = ring(HEX_OTHER, &[]);
        let sealed = old.seal(b"tw_old", SLOT).expect("seal");
        let rotated = ring(HEX, &[HEX_OTHER]);
        assert_eq!(
            rotated
                .open(&sealed, SLOT)
                .expect("retired key opens")
                .as_slice(),
            b"tw_old"
        );
        let resealed = rotated.seal(b"tw_old", SLOT).expect("seal");
        assert_eq!(Keyring::key_id_of(&resealed).as_deref(), Some(HEX_ID));
        let forgot = ring(HEX, &[]);
        assert_eq!(
            forgot.open(&sealed, SLOT),
            Err(CryptoError::UnknownKeyId(old.active_key_id().to_string()))
        );
    }

    #[test]
    fn key_id_of_reads_the_header() {
        let k = ring(HEX, &[]);
        let sealed = k.seal(b"tw_1", SLOT).expect("seal");
        assert_eq!(Keyring::key_id_of(&sealed).as_deref(), Some(HEX_ID));
        assert_eq!(Keyring::key_id_of(&unhex(GOLDEN)).as_deref(), Some(HEX_ID));
        assert_eq!(Keyring::key_id_of(&sealed[..ENVELOPE_OVERHEAD - 1]), None);
        let mut other_version = sealed.clone();
        other_version[0] = 0;
        assert_eq!(Keyring::key_id_of(&other_version), None);
        let mut not_hex = sealed;
        not_hex[1] = b'G';
        assert_eq!(Keyring::key_id_of(&not_hex), None);
        assert_eq!(Keyring::key_id_of(b""), None);
    }

    #[test]
    fn every_secret_form_maps_to_a_stable_id() {
        assert_eq!(id_of(HEX), HEX_ID);
        assert_eq!(id_of(&HEX.to_uppercase()), HEX_ID);
        assert_eq!(id_of(&format!("  {HEX}\n")), HEX_ID);
        // One 32-byte value as hex, standard and URL-safe base64.
        let forms = [
            "020430f8995907f9dc239f96f16764888b7513ba387be950ce407f5839a39581",
            "AgQw+JlZB/ncI5+W8WdkiIt1E7o4e+lQzkB/WDmjlYE=",
            "AgQw-JlZB_ncI5-W8WdkiIt1E7o4e-lQzkB_WDmjlYE=",
            " AgQw-JlZB_ncI5-W8WdkiIt1E7o4e-lQzkB_WDmjlYE=\n",
        ];
        let ids: Vec<String> = forms.iter().map(|s| id_of(s)).collect();
        assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
        assert_eq!(ids[0].len(), 8);
        assert_ne!(ids[0], HEX_ID);
        // Passphrases go through scrypt; the id is pinned like the others.
        assert_eq!(
            id_of("a passphrase of more than thirty-two characters, for tests"),
            "0085ce08"
        );
    }

    #[test]
    fn different_secrets_get_different_ids_and_keys() {
        let a = ring(HEX, &[]);
        let b = ring(HEX_OTHER, &[]);
        assert_ne!(a.active_key_id(), b.active_key_id());
        assert_eq!(a.active_key_id(), ring(HEX, &[]).active_key_id());
        let sealed = a.seal(b"tw_1", SLOT).expect("seal");
        let mut relabelled = sealed.clone();
        relabelled[1..NONCE_AT].copy_from_slice(b.active_key_id().as_bytes());
        assert_eq!(b.open(&relabelled, SLOT), Err(CryptoError::Failed));
    }

    #[test]
    fn previous_secrets_are_deduplicated() {
        let k = ring(HEX, &[HEX_OTHER, HEX_OTHER, HEX, &HEX_OTHER.to_uppercase()]);
        let other = id_of(HEX_OTHER);
        assert_eq!(
            k.retired_key_ids().collect::<Vec<_>>(),
            vec![other.as_str()]
        );
        assert_eq!(k.active_key_id(), HEX_ID);
    }

    #[test]
    fn weak_and_short_secrets_are_rejected() {
        let cases: &[(&str, &str)] = &[
            ("", "is empty"),
            (" \n ", "is empty"),
            ("short-secret", "too short"),
            ("only thirty-one characters long", "too short"),
            (&"a".repeat(64), "too weak"),
            (&"0".repeat(64), "too weak"),
            (&"0123".repeat(16), "too weak"),
            ("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "too weak"),
            (&"x".repeat(40), "too weak"),
            (&"abcabc123".repeat(5), "too weak"),
            // Repeats and sequences with enough distinct values to pass a count.
            (&"0123456789abcdef".repeat(4), "too weak"),
            (&"0123456789abcdefghij".repeat(2), "too weak"),
            ("abcdefghijklmnopqrstuvwxyz0123456789", "too weak"),
            ("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", "too weak"),
            (&"00112233445566778899aabbccddeeff".repeat(2), "too weak"),
            ("please-changeme-before-deploying-this-thing", "too weak"),
            ("an example secret for the keygate docs page", "too weak"),
        ];
        for (secret, expected) in cases {
            let err = match Keyring::from_secrets(secret, &[]) {
                Ok(_) => panic!("accepted a bad secret: {secret:?}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(expected), "{secret:?}: {err}");
            assert!(err.contains("the active encryption secret"), "{err}");
            if !secret.trim().is_empty() {
                assert!(
                    !err.contains(secret.trim()),
                    "error shows the secret: {err}"
                );
                assert!(!format!("{err:?}").contains(secret.trim()));
            }
        }
        let err =
            Keyring::from_secrets(HEX, &[HEX_OTHER, "short"]).expect_err("weak previous secret");
        assert!(
            err.to_string().contains("previous encryption secret #2"),
            "{err}"
        );
    }

    #[test]
    fn debug_shows_ids_only() {
        let k = ring(HEX, &[HEX_OTHER]);
        let shown = format!("{k:?}");
        assert!(shown.contains(HEX_ID), "{shown}");
        assert!(shown.contains(&id_of(HEX_OTHER)), "{shown}");
        let (aes_key, _) = derive_key(HEX, "test").expect("derive");
        for secret in [HEX, HEX_OTHER, &to_hex(&aes_key[..])] {
            assert!(!shown.contains(secret), "{shown}");
            assert!(!shown.to_uppercase().contains(&secret.to_uppercase()));
        }
        assert!(shown.len() < 80, "{shown}");
    }
}

/// Property tests over the envelope decoder, which reads whatever the store holds.
#[cfg(test)]
mod prop {
    use proptest::prelude::*;

    use super::Keyring;

    const HEX: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f000112233445566778899aabbccddeeff";

    fn ring() -> Keyring {
        Keyring::from_secrets(HEX, &[]).unwrap_or_else(|e| panic!("keyring: {e}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never open (and never panic), whatever they start with.
        #[test]
        fn arbitrary_bytes_never_open(mut bytes in prop::collection::vec(any::<u8>(), 0..128), v1 in any::<bool>()) {
            if v1 && !bytes.is_empty() {
                bytes[0] = 1;
            }
            prop_assert!(ring().open(&bytes, "user:u").is_err());
            let _ = Keyring::key_id_of(&bytes);
        }

        /// A sealed record opens for its own slot only, and any change to any byte of it, or
        /// any truncation or extension, makes it fail to open.
        #[test]
        fn every_byte_of_an_envelope_is_authenticated(
            key in prop::collection::vec(any::<u8>(), 1..96),
            slot in "[a-z]{1,8}:[a-zA-Z0-9_|:/.]{1,24}",
            other in "[a-z]{1,8}:[a-zA-Z0-9_|:/.]{1,24}",
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            cut in any::<prop::sample::Index>(),
            tail in prop::collection::vec(any::<u8>(), 1..4),
        ) {
            let ring = ring();
            let sealed = ring.seal(&key, &slot).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let opened = ring.open(&sealed, &slot).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(opened.as_slice(), key.as_slice());
            if other != slot {
                prop_assert!(ring.open(&sealed, &other).is_err());
            }
            let mut changed = sealed.clone();
            changed[at.index(sealed.len())] ^= flip;
            prop_assert!(ring.open(&changed, &slot).is_err());
            prop_assert!(ring.open(&sealed[..cut.index(sealed.len())], &slot).is_err());
            let mut longer = sealed.clone();
            longer.extend_from_slice(&tail);
            prop_assert!(ring.open(&longer, &slot).is_err());
        }
    }
}
