//! Messages per second over the last minute, for `mqtt_broker_status`.
//!
//! A ring of per-second counts that lives in shared memory (so it is `Copy` and fixed-size):
//! the worker adds to it as batches commit, any backend reads it. Seconds that passed without
//! an `add` are zeroed when the ring next moves, and a reader ignores slots older than a
//! minute, so a ring nobody has written to for a while reads as zero without anyone tending it.

/// Seconds the rate is averaged over.
pub const WINDOW: usize = 60;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RateWindow {
    /// The second (since the Unix epoch) that `counts[last % WINDOW]` belongs to.
    last: i64,
    counts: [u32; WINDOW],
}

impl Default for RateWindow {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl RateWindow {
    pub const EMPTY: RateWindow = RateWindow {
        last: 0,
        counts: [0; WINDOW],
    };

    /// Count `n` events in second `now`. A `now` earlier than the last second written (the
    /// clock stepped back) counts in the last second instead of rewriting history.
    pub fn add(&mut self, now: i64, n: u64) {
        if now > self.last {
            let gap = (now - self.last).min(WINDOW as i64);
            for s in 1..=gap {
                self.counts[slot(self.last + s)] = 0;
            }
            self.last = now;
        }
        let c = &mut self.counts[slot(self.last)];
        *c = c.saturating_add(n.min(u64::from(u32::MAX)) as u32);
    }

    /// Events per second over the `WINDOW` seconds up to and including `now`.
    pub fn per_second(&self, now: i64) -> f64 {
        let mut total = 0u64;
        for age in 0..WINDOW as i64 {
            let second = now - age;
            if second <= self.last && self.last - second < WINDOW as i64 {
                total += u64::from(self.counts[slot(second)]);
            }
        }
        total as f64 / WINDOW as f64
    }
}

fn slot(second: i64) -> usize {
    second.rem_euclid(WINDOW as i64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_is_zero() {
        assert_eq!(RateWindow::EMPTY.per_second(1_000_000), 0.0);
    }

    #[test]
    fn a_steady_rate_reads_back() {
        let mut r = RateWindow::EMPTY;
        for s in 1_000..1_120 {
            r.add(s, 50);
        }
        assert_eq!(r.per_second(1_119), 50.0);
    }

    #[test]
    fn old_counts_fall_out_of_the_window() {
        let mut r = RateWindow::EMPTY;
        r.add(1_000, 600);
        assert_eq!(r.per_second(1_000), 10.0);
        assert_eq!(r.per_second(1_059), 10.0);
        assert_eq!(r.per_second(1_060), 0.0, "a minute later nothing is left");
        // written again much later: the old slot does not come back
        r.add(5_000, 60);
        assert_eq!(r.per_second(5_000), 1.0);
    }

    #[test]
    fn a_gap_clears_the_seconds_between() {
        let mut r = RateWindow::EMPTY;
        for s in 0..60 {
            r.add(10_000 + s, 1);
        }
        r.add(10_000 + 90, 6);
        // seconds 10_031..=10_059 are still inside the window, 10_060..10_089 were empty
        assert_eq!(r.per_second(10_090), (29.0 + 6.0) / 60.0);
    }

    #[test]
    fn clock_stepping_back_adds_to_the_last_second() {
        let mut r = RateWindow::EMPTY;
        r.add(2_000, 6);
        r.add(1_990, 54);
        assert_eq!(r.per_second(2_000), 1.0);
    }

    proptest! {
        /// The rate equals the events of the last minute divided by 60, whatever the pattern.
        #[test]
        fn matches_a_plain_count(events in proptest::collection::vec((0i64..300, 0u64..1_000), 0..200),
                                 probe in 0i64..400) {
            let mut sorted = events.clone();
            sorted.sort();
            let mut r = RateWindow::EMPTY;
            let start = 1_000_000;
            for (s, n) in &sorted {
                r.add(start + s, *n);
            }
            let now = start + probe.max(sorted.last().map_or(0, |e| e.0));
            let expected: u64 = sorted.iter()
                .filter(|(s, _)| now - (start + s) < WINDOW as i64)
                .map(|(_, n)| n)
                .sum();
            prop_assert_eq!(r.per_second(now), expected as f64 / 60.0);
        }
    }
}
