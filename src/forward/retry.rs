//! Pure retry arithmetic: exponential backoff with jitter, and the message lifetime.

use std::time::Duration;

/// Delay before attempt number `attempts + 1`, given `attempts` failed attempts so far
/// (≥ 1): `initial · 2^(attempts-1)`, capped at `max`, then spread by ±20 % using `jitter`
/// (a number in [0, 1)) so that messages deferred together do not retry together.
pub fn backoff(attempts: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = attempts.saturating_sub(1).min(32);
    let base = initial.saturating_mul(1u32 << exp.min(31)).min(max);
    let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
    base.mul_f64(factor)
        .min(max)
        .max(Duration::from_secs(1).min(initial))
}

/// Has a message received at `received_at` (epoch seconds) outlived `lifetime` at `now`?
pub fn expired(received_at: u64, now: u64, lifetime: Duration) -> bool {
    now.saturating_sub(received_at) >= lifetime.as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn doubles_and_caps() {
        assert_eq!(backoff(1, MIN, HOUR, 0.5), MIN);
        assert_eq!(backoff(2, MIN, HOUR, 0.5), 2 * MIN);
        assert_eq!(backoff(3, MIN, HOUR, 0.5), 4 * MIN);
        assert_eq!(backoff(10, MIN, HOUR, 0.5), HOUR);
        assert_eq!(backoff(u32::MAX, MIN, HOUR, 0.5), HOUR);
    }

    #[test]
    fn jitter_spreads_within_twenty_percent_and_never_exceeds_max() {
        assert_eq!(backoff(1, MIN, HOUR, 0.0), Duration::from_secs(48));
        assert_eq!(backoff(1, MIN, HOUR, 0.999_999).as_secs(), 71);
        assert_eq!(backoff(20, MIN, HOUR, 1.0), HOUR);
    }

    #[test]
    fn lifetime() {
        let five_days = Duration::from_secs(5 * 86400);
        assert!(!expired(1000, 1000 + 5 * 86400 - 1, five_days));
        assert!(expired(1000, 1000 + 5 * 86400, five_days));
        assert!(
            !expired(2000, 1000, five_days),
            "clock going backwards is not expiry"
        );
    }
}
