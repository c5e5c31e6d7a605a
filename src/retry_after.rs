//! What a `Retry-After` can say: a wait in whole seconds, rounded up, so a client that waits
//! what it is told never comes back too early. Shared by every limiter that refuses with a wait
//! (rate limits, lockouts, the Clerk call budget) and by the one map to HTTP responses.

use std::time::Duration;

/// `d` in whole seconds, rounded up.
pub fn whole_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_rounded_up_to_whole_seconds() {
        assert_eq!(
            whole_secs(Duration::from_millis(300)),
            Duration::from_secs(1)
        );
        assert_eq!(
            whole_secs(Duration::from_millis(1_001)),
            Duration::from_secs(2)
        );
        assert_eq!(whole_secs(Duration::from_secs(2)), Duration::from_secs(2));
        assert_eq!(whole_secs(Duration::ZERO), Duration::ZERO);
    }
}
