//! Logging and metrics. Logs: `tracing` on stderr (batched: see `batch`), human or JSON;
//! `RUST_LOG` overrides the configured level. One line per request on the `keygate::access`
//! target (written by `access`, without `tracing`'s per-field formatting); security-relevant events (refusals, key stored/deleted/rotated/imported, decrypt
//! failures) on `keygate::audit`, each with an `event` field, so they can be routed on their
//! own. Metrics: `metrics`.

pub mod access;
pub mod batch;
pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Install the global subscriber once; later calls (tests) are ignored.
pub fn init(log: &LogSettings) {
    let mut filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},pingora=warn", log.level)));
    // Pingora's debug lines print whole upstream request heads, injected keys included:
    // never below info for its crates, whatever RUST_LOG asks.
    for directive in ["pingora=info", "pingora_core=info", "pingora_proxy=info"] {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
    let ansi = std::io::stderr().is_terminal();
    let result = if log.json {
        tracing_subscriber::fmt()
            .json()
            .with_writer(batch::BatchedStderr::new())
            .with_env_filter(filter)
            .with_current_span(false)
            .try_init()
    } else {
        tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_writer(batch::BatchedStderr::new())
            .with_env_filter(filter)
            .try_init()
    };
    if result.is_ok() {
        access::set_format(match (log.json, ansi) {
            (true, _) => access::Format::Json,
            (false, false) => access::Format::Text,
            (false, true) => access::Format::Tracing,
        });
    }
}

/// Log capture for unit tests.
///
/// tracing caches each callsite's interest process-wide and rebuilds that cache whenever a
/// subscriber comes or goes on any thread; a rebuild racing the installation of another
/// thread's subscriber can leave a callsite disabled for it. Tests that capture logs therefore
/// take turns, and rebuild the cache once their subscriber is installed.
#[cfg(test)]
pub(crate) mod capture {
    use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

    static TURN: Mutex<()> = Mutex::new(());

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Everything logged on this thread while it lives (fields drop in order: the subscriber
    /// goes before the turn is handed on).
    pub struct Capture {
        sink: Sink,
        _subscriber: tracing::subscriber::DefaultGuard,
        _turn: MutexGuard<'static, ()>,
    }

    impl Capture {
        /// Lines in tracing-subscriber's JSON shape.
        pub fn json() -> Self {
            Self::install(|sink| {
                tracing::subscriber::set_default(
                    tracing_subscriber::fmt()
                        .json()
                        .with_writer(move || sink.clone())
                        .finish(),
                )
            })
        }

        /// Plain text lines, no colours.
        pub fn text() -> Self {
            Self::install(|sink| {
                tracing::subscriber::set_default(
                    tracing_subscriber::fmt()
                        .with_ansi(false)
                        .with_writer(move || sink.clone())
                        .finish(),
                )
            })
        }

        fn install(set: impl FnOnce(Sink) -> tracing::subscriber::DefaultGuard) -> Self {
            let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
            let sink = Sink::default();
            let subscriber = set(sink.clone());
            tracing::callsite::rebuild_interest_cache();
            Self {
                sink,
                _subscriber: subscriber,
                _turn: turn,
            }
        }

        /// What was logged so far.
        pub fn text_so_far(&self) -> String {
            let bytes = self.sink.0.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }
}
