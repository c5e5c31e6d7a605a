//! The key-at-rest hot path: opening a user's sealed 64-byte API key (every proxied request
//! whose key is not cached), sealing one (every `POST /api/keys` and rotation), and the
//! cached lookup every other proxied request takes.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;

use keygate::keys::crypto::Keyring;
use keygate::keys::embedded::EmbeddedStore;
use keygate::keys::store::Owner;
use keygate::keys::vault::Vault;
use secrecy::SecretString;

const SECRET: &str = "3c9f1a7e5b2d4c6e8a0f1b3d5c7e9a2b4d6f8a1c3e5b7d9f0a2c4e6b8d1f3a5c";
const SLOT: &str = "user:user_2bench0000000000000000000";

fn keyring() -> Keyring {
    Keyring::from_secrets(SECRET, &[]).expect("bench keyring")
}

fn api_key() -> Vec<u8> {
    let key: Vec<u8> = (0..64u8).map(|i| b'a' + i % 26).collect();
    assert_eq!(key.len(), 64);
    key
}

fn open(c: &mut Criterion) {
    let keyring = keyring();
    let sealed = keyring.seal(&api_key(), SLOT).expect("seal");
    let mut group = c.benchmark_group("vault");
    group.throughput(Throughput::Elements(1));
    group.bench_function("open_64_byte_key", |b| {
        b.iter(|| {
            keyring
                .open(black_box(&sealed), black_box(SLOT))
                .expect("open")
        })
    });
    group.finish();
}

fn seal(c: &mut Criterion) {
    let keyring = keyring();
    let plain = api_key();
    let mut group = c.benchmark_group("vault");
    group.throughput(Throughput::Elements(1));
    group.bench_function("seal_64_byte_key", |b| {
        b.iter(|| {
            keyring
                .seal(black_box(&plain), black_box(SLOT))
                .expect("seal")
        })
    });
    group.finish();
}

fn cached_lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("keygate-bench-vault-{}", std::process::id()));
    let store = Arc::new(EmbeddedStore::open(&dir).expect("store"));
    let env: std::collections::HashMap<String, String> = [
        ("AUTH_ENABLED", "false"),
        ("KEYGATE_UPSTREAM", "http://127.0.0.1:3000"),
        ("API_KEY_ENCRYPTION_SECRET", SECRET),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let settings = keygate::config::load(None, &env)
        .expect("bench config")
        .keys;
    let vault = Vault::new(store, Arc::new(keyring()), &settings);
    let owner = Owner::user("user_bench");
    let key = SecretString::from(String::from_utf8(api_key()).expect("ascii"));
    rt.block_on(vault.put(&owner, &key, None, None))
        .expect("put");
    rt.block_on(vault.lookup(&owner)).expect("warm");
    let mut group = c.benchmark_group("vault");
    group.bench_function("cached_lookup", |b| {
        b.iter(|| {
            rt.block_on(vault.lookup(black_box(&owner)))
                .expect("lookup")
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, open, seal, cached_lookup);
criterion_main!(benches);
