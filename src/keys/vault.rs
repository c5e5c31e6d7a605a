//! The vault: seals, stores, finds and deletes each owner's upstream API key, with a bounded
//! in-process cache in front of the store that every replica invalidates on writes.
//!
//! It owns the rules that tie crypto and storage together (a decrypt failure is an error, never
//! "no key"; a write is acknowledged only once the store acknowledged it). HTTP shapes live in
//! `keys::api`; where the key goes upstream lives in `proxy::inject`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use thiserror::Error;

use super::crypto::Keyring;
use super::store::{KeyStore, Owner, StoreError, StoredRecord};
use crate::config::KeysSettings;
use crate::telemetry::metrics::Metrics;

/// A decrypted key, ready to inject.
pub struct UserKey {
    pub api_key: SecretString,
    pub base_url: Option<String>,
}

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserKey")
            .field("api_key", &"[redacted]")
            .field("base_url", &self.base_url)
            .finish()
    }
}

/// What `GET /api/keys` reports: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMetadata {
    pub updated_at: i64,
    pub base_url: Option<String>,
}

/// Why the vault could not answer.
#[derive(Debug, Clone, Error)]
pub enum VaultError {
    /// The store cannot be reached: retry later (503).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A stored record does not open under any key we hold, or is not bound to this owner.
    /// Never treated as "no key": the request fails closed (500).
    #[error("stored key cannot be decrypted")]
    Decrypt,
}

/// Outcome of `keygate keys rotate`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RotateReport {
    pub rotated: usize,
    pub already_current: usize,
    pub changed_meanwhile: usize,
    pub failed: Vec<(String, String)>,
}

/// The vault.
pub struct Vault {
    store: Arc<dyn KeyStore>,
    keyring: Arc<Keyring>,
    cache: moka::future::Cache<Owner, Option<Arc<UserKey>>>,
    metrics: Option<Arc<Metrics>>,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Vault {
    /// Build a vault over `store` with `keyring`.
    pub fn new(store: Arc<dyn KeyStore>, keyring: Arc<Keyring>, settings: &KeysSettings) -> Self {
        Self {
            store,
            keyring,
            cache: moka::future::Cache::builder()
                .max_capacity(settings.cache_max_entries)
                .time_to_live(settings.cache_ttl)
                .build(),
            metrics: None,
        }
    }

    /// Record store operations, cache lookups and decrypt failures in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Run one store operation, timing it and counting its result.
    async fn timed<T>(
        &self,
        op: &str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = fut.await;
        if let Some(m) = &self.metrics {
            let store = self.store.name();
            m.store_duration
                .with_label_values(&[store, op])
                .observe(started.elapsed().as_secs_f64());
            let outcome = if result.is_ok() { "ok" } else { "error" };
            m.store_ops.with_label_values(&[store, op, outcome]).inc();
        }
        result
    }

    /// The store behind the vault.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The owner's key, from the cache or the store. `Ok(None)`: no key stored.
    pub async fn lookup(&self, owner: &Owner) -> Result<Option<Arc<UserKey>>, VaultError> {
        let missed = AtomicBool::new(false);
        let result = self
            .cache
            .try_get_with_by_ref(owner, async {
                missed.store(true, Ordering::Relaxed);
                let Some(record) = self.timed("get", self.store.get(owner)).await? else {
                    return Ok(None);
                };
                Ok(Some(Arc::new(self.open(owner, &record)?)))
            })
            .await
            .map_err(|e: Arc<VaultError>| (*e).clone());
        if let Some(m) = &self.metrics {
            if missed.load(Ordering::Relaxed) {
                m.key_cache_miss.inc();
            } else {
                m.key_cache_hit.inc();
            }
            if matches!(result, Err(VaultError::Decrypt)) {
                m.decrypt_failures.inc();
            }
        }
        result
    }

    fn open(&self, owner: &Owner, record: &StoredRecord) -> Result<UserKey, VaultError> {
        let plain = self
            .keyring
            .open(&record.sealed, &owner.slot())
            .map_err(|e| {
                tracing::error!(
                    target: "keygate::audit",
                    event = "key_decrypt_failed",
                    owner = %owner.slot(),
                    error = %e,
                    "stored API key failed to decrypt"
                );
                VaultError::Decrypt
            })?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| VaultError::Decrypt)?;
        Ok(UserKey {
            api_key: SecretString::from(text),
            base_url: record.base_url.clone(),
        })
    }

    /// Metadata of the owner's record, straight from the store.
    pub async fn metadata(&self, owner: &Owner) -> Result<Option<KeyMetadata>, VaultError> {
        Ok(self
            .timed("get", self.store.get(owner))
            .await?
            .map(|r| KeyMetadata {
                updated_at: r.updated_at,
                base_url: r.base_url,
            }))
    }

    /// Seal and store the owner's key; returns once the store acknowledged the write.
    /// `updated_at` defaults to now (imports keep the original time).
    pub async fn put(
        &self,
        owner: &Owner,
        api_key: &SecretString,
        base_url: Option<String>,
        updated_at: Option<i64>,
    ) -> Result<(), VaultError> {
        let sealed = self
            .keyring
            .seal(api_key.expose_secret().as_bytes(), &owner.slot())
            .map_err(|_| VaultError::Decrypt)?;
        let record = StoredRecord {
            sealed,
            base_url,
            updated_at: updated_at.unwrap_or_else(now_secs),
        };
        self.timed("put", self.store.put(owner, &record)).await?;
        self.invalidate(owner).await;
        Ok(())
    }

    /// Delete the owner's key; `true` when there was one.
    pub async fn delete(&self, owner: &Owner) -> Result<bool, VaultError> {
        let existed = self.timed("delete", self.store.delete(owner)).await?;
        self.invalidate(owner).await;
        Ok(existed)
    }

    async fn invalidate(&self, owner: &Owner) {
        self.cache.invalidate(owner).await;
        if let Err(e) = self.store.publish_invalidation(owner).await {
            // Other replicas fall back to their cache TTL.
            tracing::warn!(error = %e, "could not publish a key invalidation");
        }
    }

    /// Drop cached keys whenever any replica reports a change. Runs until the store's
    /// invalidation channel closes.
    pub async fn follow_invalidations(self: Arc<Self>) {
        let mut rx = self.store.subscribe_invalidations();
        loop {
            match rx.recv().await {
                Ok(owner) => self.cache.invalidate(&owner).await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    self.cache.invalidate_all();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Re-encrypt every record that is not under the active key. Safe while serving: a record
    /// a user changed meanwhile is left alone (compare-and-swap).
    pub async fn rotate(&self) -> Result<RotateReport, VaultError> {
        let mut report = RotateReport::default();
        let active = self.keyring.active_key_id().to_string();
        for owner in self.store.owners().await? {
            let Some(record) = self.store.get(&owner).await? else {
                continue;
            };
            if Keyring::key_id_of(&record.sealed).as_deref() == Some(active.as_str()) {
                report.already_current += 1;
                continue;
            }
            let slot = owner.slot();
            let plain = match self.keyring.open(&record.sealed, &slot) {
                Ok(p) => p,
                Err(e) => {
                    report.failed.push((slot, e.to_string()));
                    continue;
                }
            };
            let sealed = match self.keyring.seal(&plain, &slot) {
                Ok(s) => s,
                Err(e) => {
                    report.failed.push((slot, e.to_string()));
                    continue;
                }
            };
            let new = StoredRecord {
                sealed,
                base_url: record.base_url.clone(),
                updated_at: record.updated_at,
            };
            if self.store.replace_if(&owner, &record.sealed, &new).await? {
                report.rotated += 1;
                self.invalidate(&owner).await;
            } else {
                report.changed_meanwhile += 1;
            }
        }
        Ok(report)
    }
}
