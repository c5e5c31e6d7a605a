//! The two `KeyStore`s against their real backends: a `redis-server` child process (and a
//! three-node Redis Cluster) and a redb file in a temp directory. The same contract checks run
//! on both; outage and recovery checks kill and restart Redis under a live store.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keygate::keys::embedded::EmbeddedStore;
use keygate::keys::redis_store::RedisStore;
use keygate::keys::store::{Invalidation, KeyStore, Owner, StoreError, StoredRecord};
use keygate::redis::RedisSettings;
use tokio::sync::broadcast;

use crate::common::free_port;
use crate::common::redis::{RedisCluster, RedisServer};

const COMMAND_TIMEOUT: Duration = Duration::from_millis(300);

fn settings(url: &str, prefix: &str) -> RedisSettings {
    RedisSettings {
        url: url.to_string(),
        cluster: false,
        key_prefix: prefix.to_string(),
        connect_timeout: Duration::from_secs(1),
        command_timeout: COMMAND_TIMEOUT,
    }
}

fn redis_store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::new(settings(url, prefix)).expect("valid redis settings")
}

fn temp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "keygate-stores-{}-{name}-{}",
        std::process::id(),
        free_port()
    ))
}

fn record(sealed: &[u8]) -> StoredRecord {
    StoredRecord {
        sealed: sealed.to_vec(),
        base_url: Some("https://crm.example.com".into()),
        updated_at: 1_700_000_000,
    }
}

/// Retry `f` until it returns `Some`, or panic after `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publish `owner` from `publisher` until `rx` hears it (the Redis listener subscribes in the
/// background; other owners' invalidations, such as those of writes, are skipped), or panic
/// after `limit`; returns what was heard.
async fn publish_until_heard(
    publisher: &dyn KeyStore,
    rx: &mut broadcast::Receiver<Invalidation>,
    owner: &Owner,
    limit: Duration,
) -> Owner {
    let deadline = Instant::now() + limit;
    loop {
        if publisher.publish_invalidation(owner).await.is_ok() {
            while let Some(heard) = next_owner(rx, Duration::from_millis(200)).await {
                if heard == *owner {
                    return heard;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no invalidation heard for {}",
            owner.slot()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next single-owner invalidation `rx` hears within `limit` (gap notices skipped).
async fn next_owner(rx: &mut broadcast::Receiver<Invalidation>, limit: Duration) -> Option<Owner> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(Invalidation::Owner(owner))) => return Some(owner),
            Ok(Ok(_)) => continue,
            _ => return None,
        }
    }
}

/// The next notice `rx` hears within `limit`, whatever it is.
async fn next_notice(
    rx: &mut broadcast::Receiver<Invalidation>,
    limit: Duration,
) -> Option<Invalidation> {
    tokio::time::timeout(limit, rx.recv()).await.ok()?.ok()
}

/// Write with a raw connection, bypassing the store.
fn raw_redis(url: &str, cmd: &::redis::Cmd) {
    let client = ::redis::Client::open(url).expect("raw client");
    let mut conn = client.get_connection().expect("raw connection");
    cmd.query::<()>(&mut conn).expect("raw command");
}

// ---- the contract, for any store ----

async fn put_get_delete(store: &dyn KeyStore) {
    let owner = Owner::user("user_pgd");
    assert_eq!(store.get(&owner).await.expect("get missing"), None);
    store.put(&owner, &record(b"one")).await.expect("put");
    assert_eq!(store.get(&owner).await.expect("get"), Some(record(b"one")));
    let mut second = record(&[0, 255, 7, 8]);
    second.base_url = None;
    store.put(&owner, &second).await.expect("overwrite");
    assert_eq!(store.get(&owner).await.expect("get"), Some(second));
    // A user and an org with the same id are different owners.
    assert_eq!(store.get(&Owner::org("user_pgd")).await.expect("get"), None);
    assert!(
        store.delete(&owner).await.expect("delete"),
        "delete found nothing"
    );
    assert_eq!(store.get(&owner).await.expect("get deleted"), None);
    assert!(
        !store.delete(&owner).await.expect("delete again"),
        "deleted twice"
    );
    store.ping().await.expect("ping");
}

async fn owners_are_exactly_the_stored_ones(store: &dyn KeyStore) {
    assert_eq!(store.owners().await.expect("owners of empty"), vec![]);
    let kept = [
        Owner::user("user_a"),
        Owner::user("user_b"),
        Owner::org("org_c"),
    ];
    for o in &kept {
        store
            .put(o, &record(o.slot().as_bytes()))
            .await
            .expect("put");
    }
    let gone = Owner::user("user_gone");
    store.put(&gone, &record(b"x")).await.expect("put");
    store.delete(&gone).await.expect("delete");
    let mut listed: Vec<String> = store
        .owners()
        .await
        .expect("owners")
        .iter()
        .map(Owner::slot)
        .collect();
    listed.sort();
    let mut expected: Vec<String> = kept.iter().map(Owner::slot).collect();
    expected.sort();
    assert_eq!(listed, expected);
}

async fn replace_if_needs_matching_bytes(store: &dyn KeyStore) {
    let owner = Owner::user("user_cas");
    assert!(
        !store
            .replace_if(&owner, b"anything", &record(b"new"))
            .await
            .expect("cas on missing"),
        "replaced a record that does not exist"
    );
    assert_eq!(store.get(&owner).await.expect("get"), None);
    store.put(&owner, &record(b"v1")).await.expect("put");
    assert!(!store
        .replace_if(&owner, b"v0", &record(b"v2"))
        .await
        .expect("cas mismatch"));
    assert!(!store
        .replace_if(&owner, b"v1-longer", &record(b"v2"))
        .await
        .expect("cas prefix"));
    assert_eq!(store.get(&owner).await.expect("get"), Some(record(b"v1")));
    let mut v2 = record(b"v2");
    v2.updated_at += 5;
    assert!(store
        .replace_if(&owner, b"v1", &v2)
        .await
        .expect("cas match"));
    assert_eq!(store.get(&owner).await.expect("get"), Some(v2));
    assert!(
        !store
            .replace_if(&owner, b"v1", &record(b"v3"))
            .await
            .expect("stale cas"),
        "replaced twice from the same expected bytes"
    );
}

async fn own_invalidations_are_received(store: &dyn KeyStore) {
    let mut rx = store.subscribe_invalidations();
    let owner = Owner::org("org_inv");
    // Redis needs the listener subscribed first; publish until one arrives.
    let got = publish_until_heard(store, &mut rx, &owner, Duration::from_secs(10)).await;
    assert_eq!(got, owner);
}

// ---- embedded ----

#[tokio::test]
async fn embedded_put_get_delete() {
    let dir = temp_dir("pgd");
    let store = EmbeddedStore::open(&dir).expect("open");
    assert_eq!(store.name(), "embedded");
    put_get_delete(&store).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn embedded_owners_lists_exactly_the_stored_owners() {
    let dir = temp_dir("owners");
    let store = EmbeddedStore::open(&dir).expect("open");
    owners_are_exactly_the_stored_ones(&store).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn embedded_replace_if_only_on_matching_bytes() {
    let dir = temp_dir("cas");
    let store = EmbeddedStore::open(&dir).expect("open");
    replace_if_needs_matching_bytes(&store).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn embedded_invalidations_reach_local_subscribers() {
    let dir = temp_dir("inv");
    let store = EmbeddedStore::open(&dir).expect("open");
    own_invalidations_are_received(&store).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn embedded_data_survives_reopening() {
    let dir = temp_dir("reopen").join("nested");
    let owner = Owner::user("user_durable");
    {
        let store = EmbeddedStore::open(&dir).expect("open");
        store.put(&owner, &record(b"durable")).await.expect("put");
        store
            .put(&Owner::org("org_d"), &record(b"o"))
            .await
            .expect("put");
        store.delete(&Owner::org("org_d")).await.expect("delete");
    }
    assert!(
        dir.join("keys.redb").is_file(),
        "no keys.redb in the directory"
    );
    let store = EmbeddedStore::open(&dir).expect("reopen");
    assert_eq!(
        store.get(&owner).await.expect("get"),
        Some(record(b"durable"))
    );
    assert_eq!(store.owners().await.expect("owners"), vec![owner]);
    drop(store);
    let _ = std::fs::remove_dir_all(dir.parent().expect("parent"));
}

#[tokio::test]
async fn embedded_garbage_record_is_corrupt() {
    let dir = temp_dir("corrupt");
    drop(EmbeddedStore::open(&dir).expect("create"));
    {
        let db = redb::Database::create(dir.join("keys.redb")).expect("raw db");
        let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("records");
        let txn = db.begin_write().expect("txn");
        txn.open_table(table)
            .expect("table")
            .insert("user:user_bad", b"not json at all".as_slice())
            .expect("insert");
        txn.commit().expect("commit");
    }
    let store = EmbeddedStore::open(&dir).expect("open");
    let owner = Owner::user("user_bad");
    assert!(matches!(
        store.get(&owner).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.replace_if(&owner, b"x", &record(b"y")).await,
        Err(StoreError::Corrupt(_))
    ));
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- redis ----

#[tokio::test]
async fn redis_put_get_delete() {
    let redis = RedisServer::start();
    let store = redis_store(&redis.url(), "keygate:");
    assert_eq!(store.name(), "redis");
    put_get_delete(&store).await;
}

#[tokio::test]
async fn redis_records_use_the_documented_key_and_json() {
    let redis = RedisServer::start();
    let store = redis_store(&redis.url(), "kg:");
    store
        .put(&Owner::user("user_1"), &record(&[1, 2, 3]))
        .await
        .expect("put");
    let client = ::redis::Client::open(redis.url()).expect("raw client");
    let mut conn = client.get_connection().expect("raw connection");
    let raw: String = ::redis::cmd("GET")
        .arg("kg:key:{user:user_1}")
        .query(&mut conn)
        .expect("raw get");
    let json: serde_json::Value = serde_json::from_str(&raw).expect("json");
    assert_eq!(json["sealed"], "AQID");
    assert_eq!(json["base_url"], "https://crm.example.com");
    assert_eq!(json["updated_at"], 1_700_000_000);
}

#[tokio::test]
async fn redis_owners_lists_exactly_the_stored_owners() {
    let redis = RedisServer::start();
    // Another deployment's prefix on the same Redis (with glob characters in it) is not ours.
    let other = redis_store(&redis.url(), "keygate*");
    other
        .put(&Owner::user("user_other"), &record(b"o"))
        .await
        .expect("put other");
    let store = redis_store(&redis.url(), "keygate");
    owners_are_exactly_the_stored_ones(&store).await;
}

#[tokio::test]
async fn redis_owners_pages_through_many_keys() {
    let redis = RedisServer::start();
    let store = redis_store(&redis.url(), "keygate:");
    for i in 0..1200 {
        store
            .put(&Owner::user(format!("user_{i}")), &record(b"k"))
            .await
            .expect("put");
    }
    let owners = store.owners().await.expect("owners");
    assert_eq!(owners.len(), 1200);
}

#[tokio::test]
async fn redis_replace_if_only_on_matching_bytes() {
    let redis = RedisServer::start();
    let store = redis_store(&redis.url(), "keygate:");
    replace_if_needs_matching_bytes(&store).await;
}

#[tokio::test]
async fn redis_garbage_or_foreign_values_are_corrupt() {
    let redis = RedisServer::start();
    let store = redis_store(&redis.url(), "keygate:");
    let owner = Owner::user("user_bad");
    raw_redis(
        &redis.url(),
        ::redis::cmd("SET")
            .arg("keygate:key:{user:user_bad}")
            .arg("\u{1}garbage"),
    );
    assert!(matches!(
        store.get(&owner).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.replace_if(&owner, b"x", &record(b"y")).await,
        Err(StoreError::Corrupt(_))
    ));
    let wrong_type = Owner::org("org_list");
    raw_redis(
        &redis.url(),
        ::redis::cmd("RPUSH")
            .arg("keygate:key:{org:org_list}")
            .arg("a"),
    );
    assert!(matches!(
        store.get(&wrong_type).await,
        Err(StoreError::Corrupt(_))
    ));
    // A corrupt record does not poison the connection for others.
    put_get_delete(&store).await;
}

#[tokio::test]
async fn redis_invalidation_from_one_replica_reaches_another() {
    let redis = RedisServer::start();
    let a = redis_store(&redis.url(), "keygate:");
    let b = redis_store(&redis.url(), "keygate:");
    let mut on_b = b.subscribe_invalidations();
    // Wait for B's listener: A publishes until B hears something.
    publish_until_heard(
        &a,
        &mut on_b,
        &Owner::user("warmup"),
        Duration::from_secs(10),
    )
    .await;
    while on_b.try_recv().is_ok() {}
    let owner = Owner::org("org_changed");
    a.publish_invalidation(&owner).await.expect("publish");
    let got = next_owner(&mut on_b, Duration::from_secs(1))
        .await
        .expect("B heard nothing within a second");
    assert_eq!(got, owner);
    // A different prefix is a different deployment: it hears nothing.
    let stranger = redis_store(&redis.url(), "other:");
    let mut on_stranger = stranger.subscribe_invalidations();
    stranger.ping().await.expect("ping");
    a.publish_invalidation(&owner).await.expect("publish");
    assert!(
        next_owner(&mut on_stranger, Duration::from_millis(300))
            .await
            .is_none(),
        "another prefix received our invalidation"
    );
}

#[tokio::test]
async fn redis_writes_and_deletes_announce_themselves_in_the_same_step() {
    let redis = RedisServer::start();
    let a = redis_store(&redis.url(), "keygate:");
    let b = redis_store(&redis.url(), "keygate:");
    let mut on_b = b.subscribe_invalidations();
    publish_until_heard(
        &a,
        &mut on_b,
        &Owner::user("warmup"),
        Duration::from_secs(10),
    )
    .await;
    while on_b.try_recv().is_ok() {}
    // No publish_invalidation call: the write itself is announced.
    let owner = Owner::user("user_written");
    a.put(&owner, &record(b"v1")).await.expect("put");
    assert_eq!(
        next_owner(&mut on_b, Duration::from_secs(1)).await,
        Some(owner.clone())
    );
    assert!(a
        .replace_if(&owner, b"v1", &record(b"v2"))
        .await
        .expect("cas"));
    assert_eq!(
        next_owner(&mut on_b, Duration::from_secs(1)).await,
        Some(owner.clone())
    );
    assert!(a.delete(&owner).await.expect("delete"));
    assert_eq!(
        next_owner(&mut on_b, Duration::from_secs(1)).await,
        Some(owner.clone())
    );
}

#[tokio::test]
async fn embedded_writes_and_deletes_announce_themselves() {
    let store = EmbeddedStore::open(&temp_dir("announce")).expect("open");
    let mut rx = store.subscribe_invalidations();
    let owner = Owner::user("user_written");
    store.put(&owner, &record(b"v1")).await.expect("put");
    assert_eq!(rx.try_recv().ok(), Some(Invalidation::Owner(owner.clone())));
    store.delete(&owner).await.expect("delete");
    assert_eq!(rx.try_recv().ok(), Some(Invalidation::Owner(owner.clone())));
}

#[tokio::test]
async fn a_gap_in_the_subscription_is_announced_lost_then_all() {
    let mut redis = RedisServer::start();
    let store = redis_store(&redis.url(), "keygate:");
    let mut rx = store.subscribe_invalidations();
    assert_eq!(
        next_notice(&mut rx, Duration::from_secs(10)).await,
        Some(Invalidation::All),
        "subscribing announces that anything may have changed before"
    );
    redis.restart();
    assert_eq!(
        next_notice(&mut rx, Duration::from_secs(10)).await,
        Some(Invalidation::Lost)
    );
    assert_eq!(
        next_notice(&mut rx, Duration::from_secs(10)).await,
        Some(Invalidation::All)
    );
}

#[tokio::test]
async fn redis_own_invalidations_are_received() {
    let redis = RedisServer::start();
    let store = redis_store(&redis.url(), "keygate:");
    own_invalidations_are_received(&store).await;
}

#[tokio::test]
async fn redis_down_answers_unavailable_quickly_and_recovers_after_restart() {
    let mut redis = RedisServer::start();
    let store = redis_store(&redis.url(), "keygate:");
    let owner = Owner::user("user_outage");
    store.put(&owner, &record(b"before")).await.expect("put");
    let mut rx = store.subscribe_invalidations();
    own_invalidations_are_received(&store).await;
    while rx.try_recv().is_ok() {}

    redis.stop();
    let started = Instant::now();
    let got = store.get(&owner).await;
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
    let put = store.put(&owner, &record(b"during")).await;
    assert!(matches!(put, Err(StoreError::Unavailable(_))), "{put:?}");
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "outage answers took {:?}",
        started.elapsed()
    );

    redis.restart();
    eventually(
        "store works after restart",
        Duration::from_secs(10),
        || async { store.put(&owner, &record(b"after")).await.ok() },
    )
    .await;
    assert_eq!(
        store.get(&owner).await.expect("get"),
        Some(record(b"after"))
    );
    // The pub/sub listener came back too.
    let changed = Owner::user("user_after_restart");
    let got = publish_until_heard(&store, &mut rx, &changed, Duration::from_secs(10)).await;
    assert_eq!(got, changed);
}

#[tokio::test]
async fn redis_restarted_while_idle_costs_no_failed_call() {
    let mut redis = RedisServer::start();
    let store = redis_store(&redis.url(), "keygate:");
    let owner = Owner::user("user_idle");
    store.put(&owner, &record(b"before")).await.expect("put");
    // Redis restarts (data gone) while the store holds an idle connection to the old process.
    redis.restart();
    assert_eq!(
        store.get(&owner).await.expect("first call after restart"),
        None
    );
    store.put(&owner, &record(b"after")).await.expect("put");
    assert_eq!(
        store.get(&owner).await.expect("get"),
        Some(record(b"after"))
    );
}

#[tokio::test]
async fn redis_unresponsive_answers_unavailable_within_the_command_timeout() {
    let redis = RedisServer::start();
    let store = redis_store(&redis.url(), "keygate:");
    store.ping().await.expect("ping");
    // Freeze the server: it holds connections open but answers nothing.
    raw_redis(
        &redis.url(),
        ::redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("ALL"),
    );
    let started = Instant::now();
    let got = store.get(&Owner::user("user_paused")).await;
    let took = started.elapsed();
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
    assert!(
        took < Duration::from_secs(2),
        "a paused redis held a get for {took:?}"
    );
    // Once the pause ends the store works again.
    eventually(
        "store works after the pause",
        Duration::from_secs(10),
        || async { store.ping().await.ok() },
    )
    .await;
}

#[tokio::test]
async fn redis_store_created_while_redis_is_down_works_once_it_starts() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let store = redis_store(&url, "keygate:");
    let mut rx = store.subscribe_invalidations();
    let got = store.get(&Owner::user("user_early")).await;
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));

    let _redis = RedisServer::start_on(port);
    eventually(
        "store works once redis starts",
        Duration::from_secs(10),
        || async { store.ping().await.ok() },
    )
    .await;
    put_get_delete(&store).await;
    let owner = Owner::user("user_late");
    let got = publish_until_heard(&store, &mut rx, &owner, Duration::from_secs(10)).await;
    assert_eq!(got, owner);
}

#[tokio::test]
async fn redis_password_in_the_url_authenticates_and_is_never_echoed() {
    let redis = RedisServer::start_with_args(&["--requirepass", "s3cret-pw"]);
    let port = redis.port();
    let good = redis_store(&format!("redis://:s3cret-pw@127.0.0.1:{port}"), "keygate:");
    put_get_delete(&good).await;
    let wrong = redis_store(&format!("redis://:wrong-pw@127.0.0.1:{port}"), "keygate:");
    let err = wrong
        .ping()
        .await
        .expect_err("a wrong password was accepted");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-pw"), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    let none = redis_store(&format!("redis://127.0.0.1:{port}"), "keygate:");
    assert!(matches!(
        none.get(&Owner::user("u")).await,
        Err(StoreError::Unavailable(_))
    ));
}

#[test]
fn redis_store_built_and_subscribed_outside_a_runtime_starts_listening_inside_one() {
    let redis = RedisServer::start();
    let store = redis_store(&redis.url(), "keygate:");
    // No runtime here: subscribing must not panic; the listener starts with the first async call.
    let mut rx = store.subscribe_invalidations();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let owner = Owner::user("user_outside");
    let got = runtime.block_on(publish_until_heard(
        &store,
        &mut rx,
        &owner,
        Duration::from_secs(10),
    ));
    assert_eq!(got, owner);
    let bad = RedisStore::new(settings("http://:secret@127.0.0.1:1", "keygate:"));
    match bad {
        Err(e) => assert!(!e.to_string().contains("secret"), "{e}"),
        Ok(_) => panic!("accepted an http:// url"),
    }
}

// ---- redis cluster ----

#[tokio::test]
async fn redis_cluster_store_honours_the_contract_across_masters() {
    let cluster = RedisCluster::start();
    let store = RedisStore::new(RedisSettings {
        cluster: true,
        connect_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(2),
        ..settings(&cluster.url(), "keygate:")
    })
    .expect("cluster settings");
    put_get_delete(&store).await;
    replace_if_needs_matching_bytes(&store).await;
    store
        .delete(&Owner::user("user_cas"))
        .await
        .expect("cleanup");
    owners_are_exactly_the_stored_ones(&store).await;
    // Enough owners that every master holds some; owners() must find them all.
    for i in 0..60 {
        store
            .put(&Owner::user(format!("user_spread_{i}")), &record(b"s"))
            .await
            .expect("put");
    }
    for node in &cluster.nodes {
        let client = ::redis::Client::open(node.url()).expect("node client");
        let mut conn = client.get_connection().expect("node connection");
        let here: i64 = ::redis::cmd("DBSIZE").query(&mut conn).expect("dbsize");
        assert!(here > 0, "a master holds no keys; the test proves nothing");
    }
    assert_eq!(store.owners().await.expect("owners").len(), 63);
    own_invalidations_are_received(&store).await;
}
