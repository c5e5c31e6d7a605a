//! The vault: seals, stores, finds and deletes each owner's upstream API key, with a bounded
//! in-process cache in front of the store that every replica invalidates on writes, and one
//! shared store read for concurrent lookups of the same uncached owner.
//!
//! The cache follows the store's invalidations. While that stream has a gap (the shared
//! subscription is lost), a cached key is checked against the store before use and served
//! from the cache only when the store cannot answer (degrade, don't stop); once subscribed
//! again, every key read before that moment is treated the same way (changes made meanwhile
//! went unannounced), so a store still unreachable then costs no cached key.
//!
//! It owns the rules that tie crypto and storage together (a decrypt failure is an error, never
//! "no key"; a write is acknowledged only once the store acknowledged it). HTTP shapes live in
//! `keys::api`; where the key goes upstream lives in `proxy::inject`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use thiserror::Error;

use super::check::{KeyRules, Rejected};
use super::crypto::{Keyring, FORMAT_VERSION};
use super::store::{Invalidation, KeyStore, Owner, StoreError, StoredRecord};
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
    /// Never treated as "no key": the request fails closed (500). Also a record that is not
    /// an envelope at all, or whose base URL is no longer allowed.
    #[error("stored key cannot be decrypted")]
    Decrypt,
    /// A key or base URL that may not be stored (400); the same rules for every way in.
    #[error("{0}")]
    Invalid(#[from] Rejected),
    /// Sealing failed (no randomness): nothing was stored.
    #[error("the key could not be sealed")]
    Seal,
}

/// Outcome of `keygate keys rotate`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RotateReport {
    pub rotated: usize,
    pub already_current: usize,
    pub changed_meanwhile: usize,
    pub failed: Vec<(String, String)>,
}

/// A lookup's outcome as cached: the key, or the fact that there is none.
#[derive(Clone)]
struct Cached {
    key: Option<Arc<UserKey>>,
    loaded: Instant,
}

/// One store read in flight for an owner; concurrent lookups wait for it rather than
/// reading the store again, and all get its outcome, error included.
type Load = Arc<tokio::sync::OnceCell<Result<Option<Arc<UserKey>>, VaultError>>>;

/// The vault.
pub struct Vault {
    store: Arc<dyn KeyStore>,
    keyring: Arc<Keyring>,
    /// Decrypted keys by owner, each good for `ttl` after it was read.
    cache: quick_cache::sync::Cache<Owner, Cached>,
    ttl: Duration,
    /// Store reads in flight. An invalidation removes the owner's entry, so a read that
    /// started before a write never puts the old key in the cache.
    loading: Mutex<HashMap<Owner, Load>>,
    /// The invalidation stream has a gap: cached keys are re-read, and used only when the
    /// store cannot answer.
    unsynced: AtomicBool,
    /// When the subscription was last made again, in nanoseconds after `epoch`: keys read
    /// before then are checked against the store as during a gap.
    resynced: AtomicU64,
    epoch: Instant,
    metrics: Option<Arc<Metrics>>,
    /// What may be stored, and what a stored base URL must still be when it is injected.
    rules: KeyRules,
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
            cache: quick_cache::sync::Cache::new(
                usize::try_from(settings.cache_max_entries).unwrap_or(usize::MAX),
            ),
            ttl: settings.cache_ttl,
            loading: Mutex::new(HashMap::new()),
            unsynced: AtomicBool::new(false),
            resynced: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics: None,
            rules: KeyRules::new(settings),
        }
    }

    /// What a key and base URL must be to enter the vault (built once, from the settings).
    pub fn rules(&self) -> &KeyRules {
        &self.rules
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
        let hit = self
            .cache
            .get(owner)
            .filter(|hit| hit.loaded.elapsed() < self.ttl);
        if let Some(hit) = &hit {
            if !self.unsynced.load(Ordering::Acquire) && !self.read_before_resync(hit.loaded) {
                if let Some(m) = &self.metrics {
                    m.key_cache_hit.inc();
                }
                return Ok(hit.key.clone());
            }
        }
        // Stamped with when the read began: a resubscription during the read makes it suspect.
        let started = Instant::now();
        let load = self.loading().entry(owner.clone()).or_default().clone();
        let missed = AtomicBool::new(false);
        let result = load
            .get_or_init(|| async {
                missed.store(true, Ordering::Relaxed);
                let record = self.timed("get", self.store.get(owner)).await;
                let Some(record) = self.readable(owner, record)? else {
                    return Ok(None);
                };
                Ok(Some(Arc::new(self.open(owner, &record)?)))
            })
            .await
            .clone();
        {
            // The first waiter to get here retires the read and caches what it found, unless
            // an invalidation came in meanwhile (then the read may predate the write).
            let mut loading = self.loading();
            if loading.get(owner).is_some_and(|l| Arc::ptr_eq(l, &load)) {
                loading.remove(owner);
                if let Ok(key) = &result {
                    let cached = Cached {
                        key: key.clone(),
                        loaded: started,
                    };
                    self.cache.insert(owner.clone(), cached);
                }
            }
        }
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
        match (result, hit) {
            // Unsynced and the store is away: what this replica knows keeps working.
            (Err(VaultError::Store(e)), Some(hit)) => {
                tracing::debug!(error = %e, "key store unavailable; serving the cached key");
                Ok(hit.key)
            }
            (result, _) => result,
        }
    }

    /// Whether a key read at `loaded` predates the last resubscription.
    fn read_before_resync(&self, loaded: Instant) -> bool {
        let at = u64::try_from(loaded.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX);
        at < self.resynced.load(Ordering::Acquire)
    }

    fn loading(&self) -> std::sync::MutexGuard<'_, HashMap<Owner, Load>> {
        // The map holds no invariant a panicking holder could break: keep using it.
        self.loading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forget the owner's cached key and any read of it in flight.
    fn forget(&self, owner: &Owner) {
        let mut loading = self.loading();
        loading.remove(owner);
        self.cache.remove(owner);
    }

    /// Forget every cached key.
    fn forget_all(&self) {
        let mut loading = self.loading();
        loading.clear();
        self.cache.clear();
    }

    /// A store answer, with a record that is damaged beyond reading (not an envelope, not
    /// JSON, a value of the wrong type) turned into the same fail-closed error as one that
    /// does not decrypt: permanent, audited, never "retry later".
    fn readable(
        &self,
        owner: &Owner,
        got: Result<Option<StoredRecord>, StoreError>,
    ) -> Result<Option<StoredRecord>, VaultError> {
        match got {
            Err(StoreError::Corrupt(reason)) => {
                tracing::error!(
                    target: "keygate::audit",
                    event = "key_decrypt_failed",
                    owner = %owner.slot(),
                    error = %reason,
                    "stored API key record is damaged"
                );
                Err(VaultError::Decrypt)
            }
            other => Ok(other?),
        }
    }

    fn open(&self, owner: &Owner, record: &StoredRecord) -> Result<UserKey, VaultError> {
        let refuse = |error: &dyn std::fmt::Display| {
            tracing::error!(
                target: "keygate::audit",
                event = "key_decrypt_failed",
                owner = %owner.slot(),
                error = %error,
                "stored API key failed to decrypt"
            );
            VaultError::Decrypt
        };
        // A base URL decides where the key goes: checked again on every read, whatever wrote it.
        if let Some(url) = record.base_url.as_deref() {
            if !self.rules.stored_base_url_ok(url) {
                return Err(refuse(
                    &"its base URL is not on keys.allowed_base_url_hosts",
                ));
            }
        }
        let plain = self
            .keyring
            .open_record(&record.sealed, &owner.slot(), record.base_url.as_deref())
            .map_err(|e| refuse(&e))?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| refuse(&"not UTF-8"))?;
        // Older records went in by other ways: the key must still be one `put` would store.
        let key = self
            .rules
            .api_key(&text)
            .map_err(|e| refuse(&e))?
            .to_string();
        Ok(UserKey {
            api_key: SecretString::from(key),
            base_url: record.base_url.clone(),
        })
    }

    /// Metadata of the owner's record, straight from the store.
    pub async fn metadata(&self, owner: &Owner) -> Result<Option<KeyMetadata>, VaultError> {
        let record = self.timed("get", self.store.get(owner)).await;
        Ok(self.readable(owner, record)?.map(|r| KeyMetadata {
            updated_at: r.updated_at,
            base_url: r.base_url,
        }))
    }

    /// Check, seal and store the owner's key; returns once the store acknowledged the write.
    /// Every way in (`/api/keys`, import) comes through here, so every key meets the same
    /// rules ([`KeyRules`]). `updated_at` defaults to now (imports keep the original time).
    pub async fn put(
        &self,
        owner: &Owner,
        api_key: &SecretString,
        base_url: Option<String>,
        updated_at: Option<i64>,
    ) -> Result<(), VaultError> {
        let key = self.rules.api_key(api_key.expose_secret())?;
        let base_url = base_url.map(|b| self.rules.base_url(&b)).transpose()?;
        let sealed = self
            .keyring
            .seal_record(key.as_bytes(), &owner.slot(), base_url.as_deref())
            .map_err(|_| VaultError::Seal)?;
        let record = StoredRecord {
            sealed,
            base_url,
            updated_at: updated_at.unwrap_or_else(now_secs),
        };
        // The store announces the change to every replica in the same step as the write.
        self.timed("put", self.store.put(owner, &record)).await?;
        self.forget(owner);
        Ok(())
    }

    /// Delete the owner's key; `true` when there was one.
    pub async fn delete(&self, owner: &Owner) -> Result<bool, VaultError> {
        let existed = self.timed("delete", self.store.delete(owner)).await?;
        self.forget(owner);
        Ok(existed)
    }

    /// Drop cached keys whenever any replica reports a change; across a gap in the reports,
    /// check cached keys against the store, then drop them all. Runs until the store's
    /// invalidation channel closes.
    pub async fn follow_invalidations(self: Arc<Self>) {
        let mut rx = self.store.subscribe_invalidations();
        loop {
            match rx.recv().await {
                Ok(Invalidation::Owner(owner)) => self.forget(&owner),
                Ok(Invalidation::Lost) => {
                    self.unsynced.store(true, Ordering::Release);
                }
                Ok(Invalidation::All) => {
                    let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    self.resynced
                        .fetch_max(now.saturating_add(1), Ordering::AcqRel);
                    self.unsynced.store(false, Ordering::Release);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    self.forget_all();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Re-encrypt every record that is not under the active key or not in the current format
    /// (so base URLs become authenticated). Safe while serving: a record a user changed
    /// meanwhile is left alone (compare-and-swap). A record whose base URL is no longer allowed
    /// is reported as failed, never re-sealed.
    pub async fn rotate(&self) -> Result<RotateReport, VaultError> {
        let mut report = RotateReport::default();
        let active = self.keyring.active_key_id().to_string();
        for owner in self.store.owners().await? {
            let Some(record) = self.store.get(&owner).await? else {
                continue;
            };
            if Keyring::key_id_of(&record.sealed).as_deref() == Some(active.as_str())
                && Keyring::version_of(&record.sealed) == Some(FORMAT_VERSION)
            {
                report.already_current += 1;
                continue;
            }
            let slot = owner.slot();
            let base_url = record.base_url.as_deref();
            if base_url.is_some_and(|b| !self.rules.stored_base_url_ok(b)) {
                report.failed.push((
                    slot,
                    "base URL is not on keys.allowed_base_url_hosts".into(),
                ));
                continue;
            }
            let plain = match self.keyring.open_record(&record.sealed, &slot, base_url) {
                Ok(p) => p,
                Err(e) => {
                    report.failed.push((slot, e.to_string()));
                    continue;
                }
            };
            let sealed = match self.keyring.seal_record(&plain, &slot, base_url) {
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
                self.forget(&owner);
            } else {
                report.changed_meanwhile += 1;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::Semaphore;

    /// An in-memory store that counts reads and can hold them: a read takes its snapshot of
    /// the record, then waits for a permit when the gate is closed.
    #[derive(Default)]
    struct GatedStore {
        records: Mutex<HashMap<Owner, StoredRecord>>,
        gets: AtomicUsize,
        gate: Option<Semaphore>,
        fail: AtomicBool,
        invalidations: std::sync::OnceLock<tokio::sync::broadcast::Sender<Invalidation>>,
    }

    impl GatedStore {
        fn gated() -> Self {
            Self {
                gate: Some(Semaphore::new(0)),
                ..Self::default()
            }
        }
        fn open_gate(&self) {
            if let Some(g) = &self.gate {
                g.add_permits(1000);
            }
        }
        fn gets(&self) -> usize {
            self.gets.load(Ordering::SeqCst)
        }
        fn sender(&self) -> &tokio::sync::broadcast::Sender<Invalidation> {
            self.invalidations
                .get_or_init(|| tokio::sync::broadcast::channel(16).0)
        }
    }

    #[async_trait]
    impl KeyStore for GatedStore {
        async fn get(&self, owner: &Owner) -> Result<Option<StoredRecord>, StoreError> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            let snapshot = self.records.lock().expect("lock").get(owner).cloned();
            if let Some(g) = &self.gate {
                g.acquire().await.expect("gate").forget();
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            Ok(snapshot)
        }
        async fn put(&self, owner: &Owner, record: &StoredRecord) -> Result<(), StoreError> {
            let mut records = self.records.lock().expect("lock");
            records.insert(owner.clone(), record.clone());
            Ok(())
        }
        async fn delete(&self, owner: &Owner) -> Result<bool, StoreError> {
            Ok(self.records.lock().expect("lock").remove(owner).is_some())
        }
        async fn replace_if(
            &self,
            owner: &Owner,
            _expected: &[u8],
            record: &StoredRecord,
        ) -> Result<bool, StoreError> {
            self.put(owner, record).await.map(|()| true)
        }
        async fn owners(&self) -> Result<Vec<Owner>, StoreError> {
            Ok(self.records.lock().expect("lock").keys().cloned().collect())
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        async fn publish_invalidation(&self, owner: &Owner) -> Result<(), StoreError> {
            let _ = self.sender().send(Invalidation::Owner(owner.clone()));
            Ok(())
        }
        fn subscribe_invalidations(&self) -> tokio::sync::broadcast::Receiver<Invalidation> {
            self.sender().subscribe()
        }
        fn name(&self) -> &'static str {
            "gated"
        }
    }

    fn vault(store: &Arc<GatedStore>, ttl: Duration) -> Arc<Vault> {
        let mut s = crate::keys::test_settings();
        s.cache_ttl = ttl;
        let keyring = crate::keys::test_keyring();
        Arc::new(Vault::new(store.clone(), keyring, &s))
    }

    /// A vault over `store` whose cache keeps entries for `ttl`, with `key` stored for user_1.
    async fn vault_with_key(
        store: GatedStore,
        ttl: Duration,
        key: &str,
    ) -> (Arc<GatedStore>, Arc<Vault>, Owner) {
        let store = Arc::new(store);
        let v = vault(&store, ttl);
        let owner = Owner::user("user_1");
        v.put(&owner, &secret(key), None, None).await.expect("put");
        (store, v, owner)
    }

    fn secret(v: &str) -> SecretString {
        SecretString::from(v.to_string())
    }

    fn key_of(found: Result<Option<Arc<UserKey>>, VaultError>) -> String {
        let key = found.expect("lookup").expect("a key");
        key.api_key.expose_secret().to_string()
    }

    /// Let spawned lookups run up to their first wait.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn spawn_lookups(v: &Arc<Vault>, owner: &Owner, n: usize) -> Vec<LookupTask> {
        (0..n)
            .map(|_| {
                let (v, owner) = (v.clone(), owner.clone());
                tokio::spawn(async move { v.lookup(&owner).await })
            })
            .collect()
    }

    type LookupTask = tokio::task::JoinHandle<Result<Option<Arc<UserKey>>, VaultError>>;

    /// Let the held store reads finish; what each lookup got.
    async fn release(
        store: &GatedStore,
        tasks: Vec<LookupTask>,
    ) -> Vec<Result<Option<Arc<UserKey>>, VaultError>> {
        store.open_gate();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    }

    #[tokio::test]
    async fn concurrent_cold_lookups_share_one_store_read() {
        let (store, v, owner) =
            vault_with_key(GatedStore::gated(), Duration::from_secs(60), "tw_1").await;
        let waiters = spawn_lookups(&v, &owner, 5);
        settle().await;
        assert_eq!(store.gets(), 1, "the other lookups wait for the first read");
        for found in release(&store, waiters).await {
            assert_eq!(key_of(found), "tw_1");
        }
        assert_eq!(key_of(v.lookup(&owner).await), "tw_1");
        assert_eq!(store.gets(), 1, "then the key is served from the cache");
    }

    #[tokio::test]
    async fn a_store_error_reaches_every_waiter_and_is_not_cached() {
        let (store, v, owner) =
            vault_with_key(GatedStore::gated(), Duration::from_secs(60), "tw_1").await;
        store.fail.store(true, Ordering::SeqCst);
        let waiters = spawn_lookups(&v, &owner, 3);
        settle().await;
        for found in release(&store, waiters).await {
            assert!(matches!(found, Err(VaultError::Store(_))));
        }
        assert_eq!(store.gets(), 1);
        store.fail.store(false, Ordering::SeqCst);
        assert_eq!(key_of(v.lookup(&owner).await), "tw_1");
        assert_eq!(store.gets(), 2, "the next lookup asks the store again");
    }

    #[tokio::test]
    async fn a_write_during_a_read_keeps_the_old_key_out_of_the_cache() {
        let (store, v, owner) =
            vault_with_key(GatedStore::gated(), Duration::from_secs(60), "tw_old").await;
        // The read takes its snapshot (the old key), then the user writes a new one.
        let reader = spawn_lookups(&v, &owner, 1);
        settle().await;
        v.put(&owner, &secret("tw_new"), None, None)
            .await
            .expect("put");
        for found in release(&store, reader).await {
            assert_eq!(key_of(found), "tw_old");
        }
        assert_eq!(key_of(v.lookup(&owner).await), "tw_new");
        assert_eq!(store.gets(), 2);
    }

    #[tokio::test]
    async fn cached_keys_and_absences_expire_after_the_ttl() {
        let (store, v, owner) =
            vault_with_key(GatedStore::default(), Duration::from_millis(50), "tw_1").await;
        let nobody = Owner::user("user_2");
        assert_eq!(key_of(v.lookup(&owner).await), "tw_1");
        assert!(v.lookup(&nobody).await.expect("lookup").is_none());
        assert_eq!(key_of(v.lookup(&owner).await), "tw_1");
        assert!(v.lookup(&nobody).await.expect("lookup").is_none());
        assert_eq!(store.gets(), 2);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(key_of(v.lookup(&owner).await), "tw_1");
        assert!(v.lookup(&nobody).await.expect("lookup").is_none());
        assert_eq!(store.gets(), 4);
    }

    #[tokio::test]
    async fn an_invalidation_from_another_replica_drops_the_cached_key() {
        let (store, v, owner) =
            vault_with_key(GatedStore::default(), Duration::from_secs(60), "tw_1").await;
        let follower = tokio::spawn(v.clone().follow_invalidations());
        settle().await;
        assert_eq!(key_of(v.lookup(&owner).await), "tw_1");
        // Another replica writes straight to the shared store and announces it.
        let sealed = v.keyring.seal(b"tw_2", &owner.slot()).expect("seal");
        let record = StoredRecord {
            sealed,
            base_url: None,
            updated_at: 1,
        };
        store.put(&owner, &record).await.expect("put");
        assert_eq!(key_of(v.lookup(&owner).await), "tw_1", "still cached");
        store.publish_invalidation(&owner).await.expect("publish");
        settle().await;
        assert_eq!(key_of(v.lookup(&owner).await), "tw_2");
        follower.abort();
    }

    #[tokio::test]
    async fn across_a_subscription_gap_cached_keys_are_rechecked_then_all_dropped() {
        let (store, v, owner) =
            vault_with_key(GatedStore::default(), Duration::from_secs(60), "tw_1").await;
        let follower = tokio::spawn(v.clone().follow_invalidations());
        settle().await;
        assert_eq!(key_of(v.lookup(&owner).await), "tw_1");
        assert_eq!(store.gets(), 1);
        let _ = store.sender().send(Invalidation::Lost);
        settle().await;
        // Changed unannounced during the gap: the cached key is checked against the store.
        let sealed = v.keyring.seal(b"tw_2", &owner.slot()).expect("seal");
        let record = StoredRecord {
            sealed,
            base_url: None,
            updated_at: 1,
        };
        store.put(&owner, &record).await.expect("put");
        assert_eq!(key_of(v.lookup(&owner).await), "tw_2");
        // The store away: the cached key keeps working.
        store.fail.store(true, Ordering::SeqCst);
        assert_eq!(key_of(v.lookup(&owner).await), "tw_2");
        let nobody = Owner::user("user_2");
        assert!(matches!(v.lookup(&nobody).await, Err(VaultError::Store(_))));
        // Subscribed again while the store is still away: cached keys keep working.
        let _ = store.sender().send(Invalidation::All);
        settle().await;
        assert_eq!(key_of(v.lookup(&owner).await), "tw_2");
        // Once it answers, every key read before the resubscription is read again, once.
        store.fail.store(false, Ordering::SeqCst);
        let before = store.gets();
        assert_eq!(key_of(v.lookup(&owner).await), "tw_2");
        assert_eq!(store.gets(), before + 1, "re-read after the gap");
        assert_eq!(key_of(v.lookup(&owner).await), "tw_2");
        assert_eq!(store.gets(), before + 1, "then served from the cache");
        follower.abort();
    }
}
