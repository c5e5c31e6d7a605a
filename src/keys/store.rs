//! The storage seam of the key vault: what a store must do, and the records it keeps.
//!
//! A store keeps opaque sealed bytes per owner; it never sees a plaintext key and never
//! decides anything about crypto. Two implementations: `redis_store` (shared by replicas)
//! and `embedded` (one process, on disk).

use async_trait::async_trait;
use base64::Engine as _;

use crate::auth::Identity;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Whose key a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerKind {
    User,
    Org,
}

/// The owner of one record: a user (`user_…`) or, for org-level keys, an org (`org_…`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub kind: OwnerKind,
    pub id: String,
}

impl Owner {
    /// A user's slot.
    pub fn user(id: impl Into<String>) -> Self {
        Self {
            kind: OwnerKind::User,
            id: id.into(),
        }
    }

    /// An org's slot.
    pub fn org(id: impl Into<String>) -> Self {
        Self {
            kind: OwnerKind::Org,
            id: id.into(),
        }
    }

    /// Whose slot `identity`'s key lives in: the org's with `org_keys` and an org context,
    /// else the user's. Identity is (issuer, subject): the id is `<issuer>|<subject>` (or
    /// `|<org id>`), so equal subjects of two issuers never share a slot — except for
    /// `legacy_issuer`, whose slots stay `user:<subject>` as written before slots named the
    /// issuer (and as imported from the Node server). Issuers never contain `|` (checked at
    /// startup), so the id splits back at its first `|`.
    pub fn of(identity: &Identity, org_keys: bool, legacy_issuer: Option<&str>) -> Self {
        let id = |local: &str| {
            if legacy_issuer == Some(identity.issuer.as_str()) {
                local.to_string()
            } else {
                format!("{}|{local}", identity.issuer)
            }
        };
        match (&identity.org, org_keys) {
            (Some(org), true) => Self::org(id(&org.id)),
            _ => Self::user(id(&identity.subject)),
        }
    }

    /// The stable text form, `user:<id>` or `org:<id>`: storage key suffix and AEAD binding.
    pub fn slot(&self) -> String {
        match self.kind {
            OwnerKind::User => format!("user:{}", self.id),
            OwnerKind::Org => format!("org:{}", self.id),
        }
    }

    /// Parse [`Owner::slot`] back.
    pub fn from_slot(slot: &str) -> Option<Self> {
        if let Some(id) = slot.strip_prefix("user:") {
            Some(Self::user(id))
        } else {
            slot.strip_prefix("org:").map(Self::org)
        }
    }
}

/// A record as stored: the sealed API key plus metadata that is not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// The envelope produced by `crypto::Keyring::seal` (version, key id, nonce, ciphertext).
    pub sealed: Vec<u8>,
    /// The user's upstream base URL, when they set one.
    pub base_url: Option<String>,
    /// Unix seconds of the last write.
    pub updated_at: i64,
}

/// What a store's invalidation channel carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// One owner's record changed.
    Owner(Owner),
    /// Any record may have changed unannounced (a subscription was made again after a gap):
    /// everything cached is stale.
    All,
    /// The shared subscription is gone: changes may go unannounced until [`Invalidation::All`]
    /// follows. Cached records should be checked against the store while it answers.
    Lost,
}

/// Why a store could not do what was asked.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// Unreachable, timed out, or refused: try again later.
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// A record that cannot be read back (not ours, or damaged).
    #[error("key store record is corrupt: {0}")]
    Corrupt(String),
}

/// What every key store does.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The record for `owner`, if any.
    async fn get(&self, owner: &Owner) -> Result<Option<StoredRecord>, StoreError>;
    /// Write (create or replace) `owner`'s record; returns once the store acknowledged it. The
    /// change is announced to every subscriber in the same step: if it lands, so does its
    /// invalidation.
    async fn put(&self, owner: &Owner, record: &StoredRecord) -> Result<(), StoreError>;
    /// Delete `owner`'s record, announcing it as `put` does; `true` when there was one.
    async fn delete(&self, owner: &Owner) -> Result<bool, StoreError>;
    /// Replace `owner`'s record only if its current `sealed` bytes equal `expected` (used by
    /// rotation so a concurrent user write is never overwritten), announcing a replacement as
    /// `put` does; `true` when replaced.
    async fn replace_if(
        &self,
        owner: &Owner,
        expected: &[u8],
        record: &StoredRecord,
    ) -> Result<bool, StoreError>;
    /// Every owner that has a record.
    async fn owners(&self) -> Result<Vec<Owner>, StoreError>;
    /// Cheap liveness check, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Tell every replica sharing this store that `owner`'s record changed.
    async fn publish_invalidation(&self, owner: &Owner) -> Result<(), StoreError>;
    /// A stream of invalidations published by any replica (this one included), and of gaps in
    /// it. Stores that are not shared return a receiver that only sees this process's own
    /// changes.
    fn subscribe_invalidations(&self) -> tokio::sync::broadcast::Receiver<Invalidation>;
    /// A short name for logs and metrics ("redis", "embedded").
    fn name(&self) -> &'static str;
}

/// The record as stored: JSON with `sealed` in standard base64.
#[derive(Serialize, Deserialize)]
struct WireRecord {
    sealed: String,
    #[serde(default)]
    base_url: Option<String>,
    updated_at: i64,
}

/// Encode a record in the JSON form both stores keep.
pub(crate) fn encode_record(record: &StoredRecord) -> Result<Vec<u8>, StoreError> {
    let wire = WireRecord {
        sealed: base64::engine::general_purpose::STANDARD.encode(&record.sealed),
        base_url: record.base_url.clone(),
        updated_at: record.updated_at,
    };
    serde_json::to_vec(&wire).map_err(|e| StoreError::Corrupt(format!("cannot encode record: {e}")))
}

/// Decode [`encode_record`]'s form; anything else is [`StoreError::Corrupt`]. The error never
/// quotes the stored bytes.
pub(crate) fn decode_record(slot: &str, bytes: &[u8]) -> Result<StoredRecord, StoreError> {
    let wire: WireRecord = serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Corrupt(format!(
            "record for {slot} is not a valid record (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(wire.sealed.as_bytes())
        .map_err(|_| StoreError::Corrupt(format!("record for {slot}: sealed is not base64")))?;
    Ok(StoredRecord {
        sealed,
        base_url: wire.base_url,
        updated_at: wire.updated_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_corrupt() {
        let record = StoredRecord {
            sealed: vec![0, 1, 2, 255],
            base_url: Some("https://crm.example.com".into()),
            updated_at: 42,
        };
        let bytes = encode_record(&record).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["sealed"], "AAEC/w==");
        assert_eq!(decode_record("user:u", &bytes).unwrap(), record);
        for garbage in [
            &b"not json"[..],
            br#"{"sealed":"***","updated_at":1}"#,
            b"[]",
        ] {
            assert!(matches!(
                decode_record("user:u", garbage),
                Err(StoreError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn slots_round_trip() {
        let u = Owner::user("user_1");
        assert_eq!(u.slot(), "user:user_1");
        assert_eq!(Owner::from_slot(&u.slot()), Some(u));
        assert_eq!(Owner::from_slot("org:org_9"), Some(Owner::org("org_9")));
        assert_eq!(Owner::from_slot("x:1"), None);
    }
}
