//! Bounded in-process caches whose entries carry their own deadline.
//!
//! Every cache in keygate is a `quick_cache::sync::Cache`. The request path uses it directly
//! (the verified-token cache in `auth`, the key cache in `keys::vault`); everything that needs
//! entries to expire uses [`Expiring`], which stores each value with the instant it stops
//! being valid and treats an entry past it as absent (removing it on sight). That covers a
//! time to live (deadline = insertion + TTL), a time to idle ([`Expiring::get_extending`]),
//! a per-entry lifetime (the caller computes each deadline), an atomic read-modify-write
//! ([`Expiring::upsert`]) and a single-flight load ([`Expiring::get_or_try_insert`]).
//!
//! Why quick_cache (and not moka, which the gateway also used): measured with criterion
//! (median of a 3 s run, release build; 1,024 `[u8; 32]` keys holding an `Arc<String>`, the
//! comparison version of `benches/cache.rs`) on the shared 2-core x86_64 build machine,
//! 2026-11-30, under a load average of ~7, so absolute figures are inflated; the ratios are
//! what decided:
//!
//! | operation                 | quick_cache 0.7.0 | moka 0.12.16 (sync) |
//! |---------------------------|-------------------|---------------------|
//! | hit (`get`)               | 211 ns            | 1,017 ns            |
//! | hit, 2 threads at once    | 272 ns            | 1,094 ns            |
//! | insert (replace)          | 259 ns            | 2,659 ns            |
//!
//! A hit is what every authenticated request pays, so the request path wants the cheaper
//! one (about 5x on a hit, 10x on an insert); one crate for every cache means one set of
//! semantics to reason about.

use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;

use quick_cache::sync::{Cache, EntryAction, EntryResult};
use quick_cache::Equivalent;

/// What a key holds.
enum Slot<V, E> {
    /// A value, good until `until`.
    Live { value: V, until: Instant },
    /// A load that failed at `at`: kept only to hand its error to the callers that were
    /// waiting for that load. Never an answer to a lookup that started later.
    Failed { at: Instant, error: Arc<E> },
}

impl<V: Clone, E> Clone for Slot<V, E> {
    fn clone(&self) -> Self {
        match self {
            Slot::Live { value, until } => Slot::Live {
                value: value.clone(),
                until: *until,
            },
            Slot::Failed { at, error } => Slot::Failed {
                at: *at,
                error: error.clone(),
            },
        }
    }
}

impl<V, E> Slot<V, E> {
    fn live_at(&self, now: Instant) -> bool {
        matches!(self, Slot::Live { until, .. } if *until > now)
    }
}

/// A bounded cache of values that expire at a deadline of their own.
///
/// `E` is the error of [`Expiring::get_or_try_insert`]'s loads (unused otherwise).
pub struct Expiring<K, V, E = std::convert::Infallible> {
    inner: Cache<K, Slot<V, E>>,
}

impl<K, V, E> Expiring<K, V, E>
where
    K: Eq + Hash + Clone,
    V: Clone,
{
    /// A cache keeping at most `capacity` entries (expired ones included until removed).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Cache::new(capacity.max(1)),
        }
    }

    /// The value of `key`, if present and not expired; an expired entry is removed.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        let now = Instant::now();
        match self.inner.get(key)? {
            Slot::Live { value, until } if until > now => Some(value),
            _ => {
                self.inner.remove_if(key, |s| !s.live_at(now));
                None
            }
        }
    }

    /// As [`Expiring::get`], and a live entry's deadline moves to `until` (a time to idle).
    pub fn get_extending<Q>(&self, key: &Q, until: Instant) -> Option<V>
    where
        Q: Hash + Equivalent<K> + ToOwned<Owned = K> + ?Sized,
    {
        let now = Instant::now();
        let found = self.inner.entry(key, None, |_, slot| match slot {
            Slot::Live { value, until: t } if *t > now => {
                *t = until;
                EntryAction::Retain(Some(value.clone()))
            }
            _ => EntryAction::Remove,
        });
        match found {
            EntryResult::Retained(v) => v,
            // Absent: the guard is dropped unused, which leaves the key absent.
            _ => None,
        }
    }

    /// Keep `value` under `key` until `until`.
    pub fn insert(&self, key: K, value: V, until: Instant) {
        self.inner.insert(key, Slot::Live { value, until });
    }

    /// Take `key`'s value out, if present and not expired.
    pub fn remove<Q>(&self, key: &Q) -> Option<V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        let now = Instant::now();
        match self.inner.remove(key)? {
            (_, Slot::Live { value, until }) if until > now => Some(value),
            _ => None,
        }
    }

    /// Forget everything.
    pub fn clear(&self) {
        self.inner.clear();
    }

    /// How many entries are held (expired ones not yet removed included).
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// The keys held (expired ones not yet removed included).
    pub fn keys(&self) -> Vec<K> {
        self.inner.iter().map(|(k, _)| k).collect()
    }

    /// Atomically (no other call on `key` interleaves): a live value is handed to `on_live`,
    /// which may change it and its deadline, and its answer is returned; when `key` is absent
    /// or expired, `vacant` gives the value to keep, its deadline and the answer.
    pub fn upsert<Q, T>(
        &self,
        key: &Q,
        on_live: impl FnOnce(&mut V, &mut Instant) -> T,
        vacant: impl FnOnce() -> (V, Instant, T),
    ) -> T
    where
        Q: Hash + Equivalent<K> + ToOwned<Owned = K> + ?Sized,
    {
        let now = Instant::now();
        let found = self.inner.entry(key, None, |_, slot| match slot {
            Slot::Live { value, until } if *until > now => {
                EntryAction::Retain(on_live(value, until))
            }
            _ => EntryAction::ReplaceWithGuard,
        });
        match found {
            EntryResult::Retained(answer) => answer,
            EntryResult::Vacant(guard) | EntryResult::Replaced(guard, _) => {
                let (value, until, answer) = vacant();
                let _ = guard.insert(Slot::Live { value, until });
                answer
            }
            // Neither happens without a timeout or a `Remove`; keep the value regardless.
            EntryResult::Removed(..) | EntryResult::Timeout => {
                let (value, until, answer) = vacant();
                self.inner
                    .insert(key.to_owned(), Slot::Live { value, until });
                answer
            }
        }
    }

    /// The live value of `key`, or the one `load` gives (with its deadline), loaded once for
    /// all the callers that miss at the same time: they wait for that load and share its
    /// value or its error. An error is not kept for later callers; if the loading caller is
    /// cancelled, a waiting one loads instead.
    pub async fn get_or_try_insert<Q, F>(&self, key: &Q, load: F) -> Result<V, Arc<E>>
    where
        Q: Hash + Equivalent<K> + ToOwned<Owned = K> + ?Sized,
        F: Future<Output = Result<(V, Instant), E>>,
    {
        let started = Instant::now();
        if let Some(Slot::Live { value, until }) = self.inner.get(key) {
            if until > started {
                return Ok(value);
            }
        }
        let found = self
            .inner
            .entry_async(key, |_, slot| match slot {
                Slot::Live { value, until } if *until > Instant::now() => {
                    EntryAction::Retain(Ok(value.clone()))
                }
                // The load this call waited for failed: share its error.
                Slot::Failed { at, error } if *at >= started => {
                    EntryAction::Retain(Err(error.clone()))
                }
                _ => EntryAction::ReplaceWithGuard,
            })
            .await;
        let guard = match found {
            EntryResult::Retained(answer) => return answer,
            EntryResult::Vacant(guard) | EntryResult::Replaced(guard, _) => Some(guard),
            EntryResult::Removed(..) | EntryResult::Timeout => None,
        };
        let slot = match load.await {
            Ok((value, until)) => Slot::Live { value, until },
            Err(e) => Slot::Failed {
                at: Instant::now(),
                error: Arc::new(e),
            },
        };
        if let Some(guard) = guard {
            let _ = guard.insert(slot.clone());
        }
        match slot {
            Slot::Live { value, .. } => Ok(value),
            Slot::Failed { error, .. } => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn an_entry_past_its_deadline_is_absent_and_removed() {
        let c: Expiring<String, u32> = Expiring::new(10);
        c.insert("live".into(), 1, soon(60_000));
        c.insert("dead".into(), 2, Instant::now());
        assert_eq!(c.get("live"), Some(1));
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("dead"), None);
        assert_eq!(c.len(), 1, "the expired entry is removed when seen");
        c.insert("dead".into(), 2, Instant::now());
        assert_eq!(
            c.remove("dead"),
            None,
            "an expired entry is not taken out as live"
        );
        assert_eq!(c.remove("live"), Some(1));
        assert!(c.is_empty());
    }

    #[test]
    fn get_extending_moves_the_deadline_of_live_entries_only() {
        let c: Expiring<String, u32> = Expiring::new(10);
        c.insert("k".into(), 1, soon(60_000));
        let later = soon(120_000);
        assert_eq!(c.get_extending("k", later), Some(1));
        match c.inner.get("k") {
            Some(Slot::Live { until, .. }) => assert_eq!(until, later),
            _ => panic!("entry lost"),
        }
        c.insert("gone".into(), 2, Instant::now());
        assert_eq!(c.get_extending("gone", later), None);
        assert_eq!(c.get_extending("never", later), None);
        assert_eq!(
            c.len(),
            1,
            "the expired entry is removed, the absent one not created"
        );
    }

    #[test]
    fn the_cache_is_bounded() {
        let c: Expiring<u32, u32> = Expiring::new(50);
        for i in 0..2_000 {
            c.insert(i, i, soon(60_000));
        }
        assert!(c.len() <= 50, "{}", c.len());
    }

    #[test]
    fn upsert_is_atomic() {
        // Threads race to claim the same keys: each key is claimed once, and every thread is
        // told the claimant that the cache holds.
        const KEYS: usize = 500;
        let c: Expiring<String, usize> = Expiring::new(KEYS * 2);
        let claims = AtomicUsize::new(0);
        let answers: Vec<Vec<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let (c, claims) = (&c, &claims);
                    s.spawn(move || {
                        (0..KEYS)
                            .map(|k| {
                                c.upsert(
                                    format!("k{k}").as_str(),
                                    |v, _| *v,
                                    || {
                                        claims.fetch_add(1, Ordering::SeqCst);
                                        (t, soon(60_000), t)
                                    },
                                )
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(claims.load(Ordering::SeqCst), KEYS, "one claim per key");
        for k in 0..KEYS {
            let held = c.get(format!("k{k}").as_str());
            for a in &answers {
                assert_eq!(Some(a[k]), held, "key {k}");
            }
        }
    }

    #[test]
    fn upsert_replaces_an_expired_entry() {
        let c: Expiring<String, u32> = Expiring::new(10);
        c.insert("k".into(), 1, Instant::now());
        let got = c.upsert("k", |v, _| *v, || (2, soon(60_000), 2));
        assert_eq!(got, 2);
        assert_eq!(c.get("k"), Some(2));
        let kept = c.upsert(
            "k",
            |v, until| {
                *until = soon(120_000);
                *v
            },
            || (3, soon(60_000), 3),
        );
        assert_eq!(kept, 2);
    }

    type Answer = Result<u32, Arc<String>>;

    /// `callers` tasks miss `key` at once, each offering a load that waits until every
    /// caller is queued and then gives `outcome`. Returns their answers and the loads made.
    async fn race(
        c: &Arc<Expiring<u8, u32, String>>,
        callers: usize,
        outcome: Result<u32, String>,
    ) -> (Vec<Answer>, usize) {
        let loads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let entered = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (c, loads, gate) = (c.clone(), loads.clone(), gate.clone());
                let (entered, outcome) = (entered.clone(), outcome.clone());
                tokio::spawn(async move {
                    entered.fetch_add(1, Ordering::SeqCst);
                    c.get_or_try_insert(&1, async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        let _open = gate.acquire().await;
                        outcome.map(|v| (v, soon(60_000)))
                    })
                    .await
                })
            })
            .collect();
        // On this one-thread runtime a task that has entered has run up to where it waits
        // (on the gate, or behind the load): every caller is queued once all have entered.
        let deadline = Instant::now() + Duration::from_secs(10);
        while entered.load(Ordering::SeqCst) < callers {
            assert!(Instant::now() < deadline, "callers did not start");
            tokio::task::yield_now().await;
        }
        gate.add_permits(callers);
        let mut answers = Vec::new();
        for t in tasks {
            let got = tokio::time::timeout(Duration::from_secs(10), t).await;
            answers.push(got.expect("every caller answers").unwrap());
        }
        (answers, loads.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn concurrent_misses_load_once_and_share_the_value() {
        let c = Arc::new(Expiring::new(4));
        let (answers, loads) = race(&c, 16, Ok(7)).await;
        assert!(answers.iter().all(|a| a == &Ok(7)), "{answers:?}");
        assert_eq!(loads, 1);
    }

    #[tokio::test]
    async fn a_failed_load_is_shared_with_its_waiters_and_not_kept() {
        let c = Arc::new(Expiring::new(4));
        let (answers, loads) = race(&c, 8, Err("down".into())).await;
        assert!(
            answers
                .iter()
                .all(|a| a.as_ref().is_err_and(|e| e.as_str() == "down")),
            "{answers:?}"
        );
        assert_eq!(loads, 1, "the waiters shared the failure");
        // A later caller loads again.
        let got = c
            .get_or_try_insert(&1, async { Ok((9, soon(60_000))) })
            .await;
        assert_eq!(got, Ok(9));
        assert_eq!(c.get(&1), Some(9));
    }

    #[tokio::test]
    async fn an_expired_value_is_loaded_again() {
        let c: Expiring<u8, u32, String> = Expiring::new(4);
        c.insert(1, 1, Instant::now());
        let got = c
            .get_or_try_insert(&1, async { Ok((2, soon(60_000))) })
            .await;
        assert_eq!(got, Ok(2));
    }
}
