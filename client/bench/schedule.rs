//! When paced load is due: Poisson arrivals per stream, their rate following a sine wave with two
//! periods per run. Latency is measured from these intended times, not from the actual sends.

use std::time::Duration;

/// The shape of paced load: the rate runs between `1 − amplitude` and `1 + amplitude` times the
/// mean.
#[derive(Debug, Clone)]
pub(super) struct Burst {
    amplitude: f64,
    period: Duration,
}

impl Burst {
    /// A wave peaking at `peak` (1 to 2) times the mean, two periods over `run`.
    pub(super) fn new(peak: f64, run: Duration) -> Self {
        Self { amplitude: (peak.clamp(1.0, 2.0) - 1.0).min(0.95), period: (run / 2).max(Duration::from_millis(100)) }
    }

    /// The time to a stream's next send, given its mean interval and the time into the run: a
    /// non-homogeneous Poisson process, drawn by thinning (candidates at the peak rate, each kept
    /// with probability rate/peak), so the wave keeps its shape even when a stream's mean
    /// interval is long against the wave's period.
    pub(super) fn next_gap(&self, mean: Duration, elapsed: Duration) -> Duration {
        let peak = 1.0 + self.amplitude;
        let mut gap = Duration::ZERO;
        // Each candidate is kept with probability ≥ (1 − a)/(1 + a) ≥ 2.5 %: 1,000 candidates
        // all rejected has probability < 1e-11.
        for _ in 0..1_000 {
            let exponential = -(1.0 - rand::random_range(0.0..1.0f64)).ln();
            gap += mean.mul_f64(exponential / peak);
            let t = (elapsed + gap).as_secs_f64();
            let rate = 1.0 + self.amplitude * (std::f64::consts::TAU * t / self.period.as_secs_f64()).sin();
            if rand::random_range(0.0..1.0f64) < rate / peak {
                break;
            }
        }
        gap
    }
}
