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
