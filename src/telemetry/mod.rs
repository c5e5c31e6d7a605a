//! Logging: `tracing` with human or JSON output; `RUST_LOG` overrides the configured level.
//! Access lines go to the `keygate::access` target, denials to `keygate::deny`.

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Install the global subscriber once; later calls (tests) are ignored.
pub fn init(log: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},pingora=warn", log.level)));
    let result = if log.json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(false)
            .try_init()
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).try_init()
    };
    let _ = result;
}
