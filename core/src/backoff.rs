//! Reconnect backoff with exponential growth and "equal jitter".
//!
//! Why: when a broker goes away, every mqtt_pg background worker (often one
//! per database, across many servers) tries to reconnect. Retrying at a fixed
//! short interval burns CPU in a hot loop and, once the broker returns, all
//! clients reconnect in the same instant (a thundering herd). Exponential
//! growth spaces the attempts out; jitter spreads the clients apart.
//!
//! "Equal jitter" (half the delay fixed, half random) is used rather than
//! "full jitter" (entirely random) because it guarantees a lower bound: the
//! delay for attempt `n` is never below half of the nominal delay, so even an
//! unlucky random draw never degenerates into an immediate retry. The upper
//! bound is the nominal delay itself, which is never above `max`.
//!
//! Randomness comes from the standard library only (`RandomState` seeds a
//! tiny xorshift generator): jitter needs to differ between processes and
//! between instances, not to be cryptographically strong, and the crate
//! should not grow a dependency for it.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Growth base used when `min` is zero.
///
/// A zero minimum means "retry the first time immediately"; doubling zero
/// would stay zero forever and spin, so later attempts grow from this value
/// instead (still capped at `max`).
const ZERO_MIN_GROWTH_BASE: Duration = Duration::from_millis(100);

/// Distinguishes instances created in the same instant on the same thread.
static SEED_COUNTER: AtomicU64 = AtomicU64::new(0);

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Exponential reconnect backoff with equal jitter.
///
/// Attempt `n` (counting from 0 since creation or [`Backoff::reset`]) has a
/// nominal delay of `min * 2^n`, capped at `max`; the returned delay is
/// uniformly distributed in `[nominal / 2, nominal]`.
///
/// Not `Clone` on purpose: a clone would share the random state and so
/// produce exactly the same jitter as the original, defeating its purpose.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Creates a backoff that starts at `min` and never exceeds `max`.
    ///
    /// If `min > max`, `min` is clamped to `max` (a misconfiguration is
    /// better served by a sensible delay than by a panic in a background
    /// worker). A zero `min` is allowed: the first retry is then immediate and
    /// subsequent ones grow as if `min` were 100 ms (capped at `max`). With
    /// `max` zero every delay is zero; that is the caller's explicit choice.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self::with_seed(min, max, fresh_seed())
    }

    fn with_seed(min: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            min: min.min(max),
            max,
            attempt: 0,
            // xorshift must never be seeded with zero (it would stay zero).
            rng: if seed == 0 {
                0x9E37_79B9_7F4A_7C15
            } else {
                seed
            },
        }
    }

    /// Returns how long to wait before the next attempt and counts it.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.nominal_nanos(self.attempt);
        self.attempt = self.attempt.saturating_add(1);

        // Equal jitter: the fixed part is the larger half, so the result is
        // in [ceil(nominal / 2), nominal].
        let random_span = nominal / 2;
        let fixed = nominal - random_span;
        let jitter = if random_span == 0 {
            0
        } else {
            u128::from(self.next_u64()) % (random_span + 1)
        };
        nanos_to_duration(fixed + jitter)
    }

    /// Starts over from `min`; call after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Number of delays handed out since creation or the last reset
    /// (saturating at `u32::MAX`).
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// `min * 2^attempt` capped at `max`, in nanoseconds.
    fn nominal_nanos(&self, attempt: u32) -> u128 {
        let max = self.max.as_nanos();
        if attempt == 0 {
            return self.min.as_nanos();
        }
        let base = if self.min.is_zero() {
            ZERO_MIN_GROWTH_BASE.as_nanos().min(max)
        } else {
            self.min.as_nanos()
        };
        if base == 0 {
            return 0;
        }
        // base << attempt overflows (or exceeds max) exactly when
        // base > max >> attempt; checking first avoids both.
        if attempt >= 128 || base > (max >> attempt) {
            max
        } else {
            (base << attempt).min(max)
        }
    }

    /// xorshift64* — small, fast, statistically fine for jitter.
    fn next_u64(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A per-instance seed: `RandomState` carries per-process random keys (and
/// differs between calls on the same thread); hashing a global counter into
/// it makes every instance distinct even if that ever changed.
fn fresh_seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(SEED_COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// Converts nanoseconds back to a `Duration`. Callers only pass values at
/// most `max.as_nanos()`, which always fits.
fn nanos_to_duration(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 10^9 and therefore fits in u32.
    Duration::new(secs, (nanos % NANOS_PER_SEC) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Asserts `d` lies in the equal-jitter window of `nominal`.
    fn assert_in_window(d: Duration, nominal: Duration) {
        let low = nominal - nominal / 2;
        assert!(
            d >= low && d <= nominal,
            "{d:?} not in [{low:?}, {nominal:?}]"
        );
    }

    #[test]
    fn first_delay_is_around_min() {
        for _ in 0..200 {
            let mut b = Backoff::new(ms(1_000), ms(60_000));
            assert_eq!(b.attempts(), 0);
            assert_in_window(b.next_delay(), ms(1_000));
            assert_eq!(b.attempts(), 1);
        }
    }

    #[test]
    fn grows_exponentially_then_caps() {
        let mut b = Backoff::new(ms(100), ms(10_000));
        // 100, 200, 400, 800, 1600, 3200, 6400, then capped at 10000.
        let nominal = [
            100, 200, 400, 800, 1_600, 3_200, 6_400, 10_000, 10_000, 10_000,
        ];
        for (i, n) in nominal.iter().enumerate() {
            assert_in_window(b.next_delay(), ms(*n));
            assert_eq!(b.attempts(), i as u32 + 1);
        }
    }

    #[test]
    fn never_exceeds_max_and_never_below_half_nominal() {
        let max = ms(30_000);
        let min = ms(250);
        let mut b = Backoff::new(min, max);
        for attempt in 0..500u32 {
            let d = b.next_delay();
            assert!(d <= max, "attempt {attempt}: {d:?} > {max:?}");
            let nominal = min
                .checked_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
                .unwrap_or(max)
                .min(max);
            assert_in_window(d, nominal);
        }
    }

    #[test]
    fn no_overflow_with_huge_attempt_counts_or_durations() {
        let mut b = Backoff::new(ms(1), ms(5_000));
        b.attempt = u32::MAX - 1;
        assert_in_window(b.next_delay(), ms(5_000));
        assert_eq!(b.attempts(), u32::MAX);
        assert_in_window(b.next_delay(), ms(5_000));
        assert_eq!(b.attempts(), u32::MAX, "attempt counter saturates");

        let mut huge = Backoff::new(Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            assert_in_window(huge.next_delay(), Duration::MAX);
        }
        let mut big = Backoff::new(Duration::from_secs(u64::MAX / 4), Duration::MAX);
        for _ in 0..200 {
            assert!(big.next_delay() <= Duration::MAX);
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(ms(100), ms(60_000));
        for _ in 0..10 {
            b.next_delay();
        }
        assert_eq!(b.attempts(), 10);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_in_window(b.next_delay(), ms(100));
        assert_in_window(b.next_delay(), ms(200));
    }

    #[test]
    fn min_equal_max_is_constant_nominal() {
        let mut b = Backoff::new(ms(2_000), ms(2_000));
        for _ in 0..100 {
            assert_in_window(b.next_delay(), ms(2_000));
        }
    }

    #[test]
    fn min_above_max_is_clamped() {
        let mut b = Backoff::new(ms(10_000), ms(1_000));
        for _ in 0..100 {
            assert_in_window(b.next_delay(), ms(1_000));
        }
    }

    #[test]
    fn zero_min_retries_once_immediately_then_grows() {
        let mut b = Backoff::new(Duration::ZERO, ms(10_000));
        assert_eq!(b.next_delay(), Duration::ZERO);
        assert_in_window(b.next_delay(), ms(200));
        assert_in_window(b.next_delay(), ms(400));
        for _ in 0..20 {
            b.next_delay();
        }
        assert_in_window(b.next_delay(), ms(10_000));
    }

    #[test]
    fn zero_min_with_small_max_respects_max() {
        let mut b = Backoff::new(Duration::ZERO, ms(30));
        assert_eq!(b.next_delay(), Duration::ZERO);
        for _ in 0..50 {
            assert_in_window(b.next_delay(), ms(30));
        }
    }

    #[test]
    fn zero_max_means_zero_delays() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        for _ in 0..10 {
            assert_eq!(b.next_delay(), Duration::ZERO);
        }
        let mut clamped = Backoff::new(ms(5), Duration::ZERO);
        assert_eq!(clamped.next_delay(), Duration::ZERO);
    }

    #[test]
    fn tiny_durations_do_not_panic() {
        let mut b = Backoff::new(Duration::from_nanos(1), Duration::from_nanos(3));
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(d >= Duration::from_nanos(1) && d <= Duration::from_nanos(3));
        }
    }

    #[test]
    fn two_instances_jitter_differently() {
        let mut a = Backoff::new(ms(1_000), ms(60_000));
        let mut b = Backoff::new(ms(1_000), ms(60_000));
        let sa: Vec<Duration> = (0..20).map(|_| a.next_delay()).collect();
        let sb: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert_ne!(sa, sb);
    }

    #[test]
    fn jitter_varies_within_one_instance() {
        let mut b = Backoff::new(ms(10_000), ms(10_000));
        let first = b.next_delay();
        assert!(
            (0..50).any(|_| b.next_delay() != first),
            "delays never varied"
        );
    }

    #[test]
    fn jitter_covers_the_window() {
        // With a fixed seed the sequence is deterministic; check that the
        // draws spread over both halves of the random span.
        let mut b = Backoff::with_seed(ms(1_000), ms(1_000), 42);
        let (mut low, mut high) = (false, false);
        for _ in 0..200 {
            let d = b.next_delay();
            assert_in_window(d, ms(1_000));
            if d < ms(750) {
                low = true;
            } else {
                high = true;
            }
        }
        assert!(low && high);
    }

    #[test]
    fn zero_seed_is_replaced() {
        let mut b = Backoff::with_seed(ms(1_000), ms(1_000), 0);
        assert_ne!(b.rng, 0);
        let first = b.next_delay();
        assert!((0..50).any(|_| b.next_delay() != first));
    }

    #[test]
    fn seeds_differ() {
        assert_ne!(fresh_seed(), fresh_seed());
    }

    #[test]
    fn nanos_conversion_round_trips() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_millis(1_500),
            Duration::from_secs(86_400),
            Duration::MAX,
        ] {
            assert_eq!(nanos_to_duration(d.as_nanos()), d);
        }
    }
}
