//! Reconnect delays per the gRPC connection-backoff spec: 1 s initial, ×1.6, ±20 % jitter, capped
//! at 120 s. Written out (a dozen lines) because the maintained backoff crates jitter differently
//! and the spec's exact shape is what spreads 10,000 reconnecting sites over time.

use std::time::Duration;

use rand::Rng;

/// Backoff parameters.
#[derive(Debug, Clone, Copy)]
pub struct BackoffConfig {
    /// First delay.
    pub initial: Duration,
    /// Growth factor per failed attempt.
    pub multiplier: f64,
    /// Relative jitter (0.2 = ±20 %).
    pub jitter: f64,
    /// Largest delay.
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self { initial: Duration::from_secs(1), multiplier: 1.6, jitter: 0.2, max: Duration::from_secs(120) }
    }
}

/// Backoff state of one reporter.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    current: Duration,
}

impl Backoff {
    /// Fresh state.
    pub fn new(config: BackoffConfig) -> Self {
        Self { config, current: config.initial }
    }

    /// The delay before the next attempt; grows the base for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let j = self.config.jitter;
        let factor = if j > 0.0 { rand::rng().random_range(1.0 - j..=1.0 + j) } else { 1.0 };
        let delay = self.current.mul_f64(factor);
        self.current = self.current.mul_f64(self.config.multiplier).min(self.config.max);
        delay
    }

    /// After a successful connection.
    pub fn reset(&mut self) {
        self.current = self.config.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_factor_within_jitter_and_caps() {
        let mut b = Backoff::new(BackoffConfig::default());
        let mut base = 1.0f64;
        for _ in 0..20 {
            let d = b.next_delay().as_secs_f64();
            assert!(d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9, "delay {d} outside {base} ± 20 %");
            base = (base * 1.6).min(120.0);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }
}
