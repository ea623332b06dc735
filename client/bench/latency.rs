//! Latency recording: raw samples per stream (cheap), merged into one HDR histogram per figure;
//! samples measured from the INTENDED time (the schedule), so a load generator that falls behind
//! shows its backlog instead of hiding it (coordinated omission); a sample that never arrived is
//! a miss, counted and placed at the timeout in the percentiles.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

/// Latency summary, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Measurements, misses included.
    pub samples: u64,
    /// Measurements that never completed within their timeout (a probe that never showed up, an
    /// ack that never came); each is counted in the percentiles at the timeout.
    pub misses: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

/// Highest value recorded (µs): longer measurements are clamped to it.
const MAX_US: u64 = 600_000_000;

/// An empty histogram: microseconds up to 600 s, 3 significant digits.
pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// Summarises a histogram in which `misses` of the values are misses placed at their timeout.
pub(super) fn summarize(h: &Histogram<u64>, misses: u64) -> Latency {
    let ms = |v: u64| v as f64 / 1000.0;
    Latency {
        samples: h.len(),
        misses,
        p50_ms: ms(h.value_at_quantile(0.5)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// One stream's samples: 4 bytes each (a histogram per stream would cost the load generator
/// 1.5 GB for 10,000 streams and skew the run), merged at the end.
#[derive(Debug, Default)]
pub(super) struct Samples {
    micros: Vec<u32>,
    misses: u64,
}

impl Samples {
    /// Records the time from `from` (the intended time) to now.
    pub(super) fn since(&mut self, from: Instant) {
        self.micros.push(from.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }

    /// Records a measured duration.
    pub(super) fn record(&mut self, d: Duration) {
        self.micros.push(d.as_micros().min(u128::from(u32::MAX)) as u32);
    }

    /// Records a measurement that did not complete within `timeout`.
    pub(super) fn miss(&mut self, timeout: Duration) {
        self.micros.push(timeout.as_micros().min(u128::from(u32::MAX)) as u32);
        self.misses += 1;
    }

    /// Adds these samples to `h`; returns the misses among them.
    pub(super) fn merge_into(self, h: &mut Histogram<u64>) -> u64 {
        for v in self.micros {
            let _ = h.record(u64::from(v).clamp(1, MAX_US));
        }
        self.misses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_count_at_the_timeout_in_the_percentiles() {
        let mut s = Samples::default();
        for _ in 0..98 {
            s.micros.push(1_000);
        }
        s.miss(Duration::from_secs(5));
        s.miss(Duration::from_secs(5));
        let mut h = histogram();
        let misses = s.merge_into(&mut h);
        let l = summarize(&h, misses);
        assert_eq!((l.samples, l.misses), (100, 2));
        assert!((l.p50_ms - 1.0).abs() < 0.01, "{l:?}");
        assert!(l.p99_ms >= 4_990.0, "a 2 % miss rate must show in p99: {l:?}");
    }
}
