//! The cache every request consults: a hit (`get` of a present `[u8; 32]` key holding an
//! `Arc`, as the verified-token and key caches do), an insert, and a hit with two threads
//! reading at once; the same hit through `keygate::cache::Expiring` (a value with its own
//! deadline, as the Clerk outcome cache uses). The figures that chose this crate over moka
//! are in src/cache.rs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use keygate::cache::Expiring;

const ENTRIES: usize = 1_024;

fn keys() -> Vec<[u8; 32]> {
    (0..ENTRIES as u64)
        .map(|i| {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&i.to_le_bytes());
            k[8..16].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
            k
        })
        .collect()
}

type Value = Arc<String>;

fn bench(c: &mut Criterion) {
    let keys = keys();
    let value: Value = Arc::new("identity".to_string());
    let mut group = c.benchmark_group("cache");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));

    let cache = quick_cache::sync::Cache::<[u8; 32], Value>::new(ENTRIES * 4);
    for k in &keys {
        cache.insert(*k, value.clone());
    }
    group.bench_function(BenchmarkId::new("hit", "quick_cache"), |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % ENTRIES;
            std::hint::black_box(cache.get(&keys[i]))
        })
    });
    group.bench_function(BenchmarkId::new("insert", "quick_cache"), |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % ENTRIES;
            cache.insert(keys[i], value.clone())
        })
    });
    group.bench_function(BenchmarkId::new("hit_2_threads", "quick_cache"), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..2usize {
                    let (cache, keys) = (&cache, &keys);
                    s.spawn(move || {
                        for n in 0..iters as usize {
                            std::hint::black_box(cache.get(&keys[(n + t * 512) % ENTRIES]));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });

    let expiring: Expiring<[u8; 32], Value> = Expiring::new(ENTRIES * 4);
    let until = Instant::now() + Duration::from_secs(3600);
    for k in &keys {
        expiring.insert(*k, value.clone(), until);
    }
    group.bench_function(BenchmarkId::new("hit", "expiring"), |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) % ENTRIES;
            std::hint::black_box(expiring.get(&keys[i]))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
