//! The key-at-rest hot path: opening a user's sealed 64-byte API key (every proxied request
//! whose key is not cached) and sealing one (every `POST /api/keys` and rotation).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keygate::keys::crypto::Keyring;

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

criterion_group!(benches, open, seal);
criterion_main!(benches);
