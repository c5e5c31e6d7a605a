//! The embedded key store: sealed records in a redb file on local disk, for a single keygate
//! process running without Redis.
//!
//! It owns the database file `keys.redb` in the configured directory and one table, slot →
//! JSON record (the same form the Redis store keeps, see `store::encode_record`). redb is
//! blocking, so every call runs on tokio's blocking pool; writes return once their transaction
//! committed durably. Invalidations only reach this process's own subscribers. It does not
//! share data between processes: redb locks the file, so a second process opening the same
//! directory fails at startup instead of corrupting it.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::store::{decode_record, encode_record};
use super::store::{Invalidation, KeyStore, Owner, StoreError, StoredRecord};

/// The one table: owner slot → JSON record.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// The database file's name inside the configured directory.
const FILE_NAME: &str = "keys.redb";
/// Buffered invalidations per subscriber before it sees `Lagged`.
const INVALIDATION_BUFFER: usize = 1024;

/// The [`KeyStore`] backed by a local redb file.
pub struct EmbeddedStore {
    db: Arc<Database>,
    invalidations: broadcast::Sender<Invalidation>,
}

impl EmbeddedStore {
    /// Open (or create, with its directory) `dir/keys.redb`. Blocking; call it at startup.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        restrict_permissions(&path);
        // Create the table up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(db_error)?;
        txn.open_table(RECORDS).map_err(db_error)?;
        txn.commit().map_err(db_error)?;
        let (invalidations, _) = broadcast::channel(INVALIDATION_BUFFER);
        Ok(Self {
            db: Arc::new(db),
            invalidations,
        })
    }

    /// A closure announcing a change of `owner`'s record to this process's subscribers, run
    /// right after the commit (on the blocking pool, so it runs even if the caller is gone).
    fn announcer(&self, owner: &Owner) -> impl FnOnce() + Send + 'static {
        let sender = self.invalidations.clone();
        let owner = owner.clone();
        move || {
            // No receivers is fine: nobody caches yet.
            let _ = sender.send(Invalidation::Owner(owner));
        }
    }

    /// Run blocking redb work on the blocking pool.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(|e| StoreError::Unavailable(format!("embedded store task failed: {e}")))?
    }
}

#[async_trait]
impl KeyStore for EmbeddedStore {
    async fn get(&self, owner: &Owner) -> Result<Option<StoredRecord>, StoreError> {
        let slot = owner.slot();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_error)?;
            let table = txn.open_table(RECORDS).map_err(db_error)?;
            let raw = table.get(slot.as_str()).map_err(db_error)?;
            raw.map(|value| decode_record(&slot, value.value()))
                .transpose()
        })
        .await
    }

    async fn put(&self, owner: &Owner, record: &StoredRecord) -> Result<(), StoreError> {
        let slot = owner.slot();
        let value = encode_record(record)?;
        let announce = self.announcer(owner);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_error)?;
            {
                let mut table = txn.open_table(RECORDS).map_err(db_error)?;
                table
                    .insert(slot.as_str(), value.as_slice())
                    .map_err(db_error)?;
            }
            txn.commit().map_err(db_error)?;
            announce();
            Ok(())
        })
        .await
    }

    async fn delete(&self, owner: &Owner) -> Result<bool, StoreError> {
        let slot = owner.slot();
        let announce = self.announcer(owner);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_error)?;
            let removed = {
                let mut table = txn.open_table(RECORDS).map_err(db_error)?;
                let removed = table.remove(slot.as_str()).map_err(db_error)?.is_some();
                removed
            };
            txn.commit().map_err(db_error)?;
            announce();
            Ok(removed)
        })
        .await
    }

    async fn replace_if(
        &self,
        owner: &Owner,
        expected: &[u8],
        record: &StoredRecord,
    ) -> Result<bool, StoreError> {
        let slot = owner.slot();
        let expected = expected.to_vec();
        let value = encode_record(record)?;
        let announce = self.announcer(owner);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_error)?;
            let matches = {
                let mut table = txn.open_table(RECORDS).map_err(db_error)?;
                let current = match table.get(slot.as_str()).map_err(db_error)? {
                    Some(raw) => Some(decode_record(&slot, raw.value())?),
                    None => None,
                };
                let matches = current.is_some_and(|c| c.sealed == expected);
                if matches {
                    table
                        .insert(slot.as_str(), value.as_slice())
                        .map_err(db_error)?;
                }
                matches
            };
            if matches {
                txn.commit().map_err(db_error)?;
                announce();
            } else {
                txn.abort().map_err(db_error)?;
            }
            Ok(matches)
        })
        .await
    }

    async fn owners(&self) -> Result<Vec<Owner>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(db_error)?;
            let table = txn.open_table(RECORDS).map_err(db_error)?;
            let mut owners = Vec::new();
            for entry in table.iter().map_err(db_error)? {
                let (slot, _) = entry.map_err(db_error)?;
                match Owner::from_slot(slot.value()) {
                    Some(owner) => owners.push(owner),
                    None => tracing::warn!(
                        store = "embedded",
                        slot = slot.value(),
                        "ignoring a record that names no owner"
                    ),
                }
            }
            Ok(owners)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(db_error)?;
            txn.open_table(RECORDS).map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn publish_invalidation(&self, owner: &Owner) -> Result<(), StoreError> {
        // No receivers is fine: nobody caches yet.
        let _ = self.invalidations.send(Invalidation::Owner(owner.clone()));
        Ok(())
    }

    fn subscribe_invalidations(&self) -> broadcast::Receiver<Invalidation> {
        self.invalidations.subscribe()
    }

    fn name(&self) -> &'static str {
        "embedded"
    }
}

/// Map a redb failure: damage is `Corrupt`, everything else `Unavailable`.
fn db_error(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(what) => {
            StoreError::Corrupt(format!("embedded database is damaged: {what}"))
        }
        other => StoreError::Unavailable(format!("embedded store: {other}")),
    }
}

/// The file holds only sealed keys, but there is no reason for anyone else to read it.
fn restrict_permissions(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot restrict key store file permissions");
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sealed: &[u8]) -> StoredRecord {
        StoredRecord {
            sealed: sealed.to_vec(),
            base_url: None,
            updated_at: 1,
        }
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "keygate-embedded-unit-{}-{name}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ))
    }

    #[tokio::test]
    async fn writes_read_back_and_the_file_is_created_in_a_new_directory() {
        let dir = temp_dir("basic").join("nested");
        let store = EmbeddedStore::open(&dir).unwrap();
        assert!(dir.join(FILE_NAME).exists());
        let owner = Owner::org("org_1");
        store.put(&owner, &record(b"v1")).await.unwrap();
        assert_eq!(store.get(&owner).await.unwrap(), Some(record(b"v1")));
        assert!(!store
            .replace_if(&owner, b"nope", &record(b"v2"))
            .await
            .unwrap());
        assert!(store
            .replace_if(&owner, b"v1", &record(b"v2"))
            .await
            .unwrap());
        assert_eq!(store.get(&owner).await.unwrap(), Some(record(b"v2")));
        assert_eq!(store.owners().await.unwrap(), vec![owner.clone()]);
        assert!(store.delete(&owner).await.unwrap());
        assert!(!store.delete(&owner).await.unwrap());
        drop(store);
        let _ = std::fs::remove_dir_all(dir.parent().unwrap_or(&dir));
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_directory_is_refused() {
        let dir = temp_dir("lock");
        let _first = EmbeddedStore::open(&dir).unwrap();
        assert!(matches!(
            EmbeddedStore::open(&dir),
            Err(StoreError::Unavailable(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
