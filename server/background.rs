//! The aggregator's background work: once per sweep interval, silent sites and over-capacity
//! sites are recomputed ([`super::liveness`]) and a curve sample is taken from the rollups (and
//! journaled, on a single node).

use std::time::Duration;

use super::{
    aggregator::Aggregator,
    curve::Curve,
    durability::record::{CurveRecord, Record},
};

impl Aggregator {
    /// Runs the periodic sweep (silence, over-capacity) and curve sampling until shutdown.
    pub fn spawn_background(&self) -> tokio::task::JoinHandle<()> {
        let agg = self.clone();
        tokio::spawn(async move {
            let s = agg.shared();
            let period = s.config.sweep_interval.min(s.config.curve_bucket).max(Duration::from_millis(10));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = s.shutdown.cancelled() => break,
                }
                agg.sweep_now();
            }
        })
    }

    /// One sweep and one curve sample, now.
    pub fn sweep_now(&self) {
        let s = self.shared();
        let jump = s.config.clock.reanchor();
        if jump != 0 {
            tracing::warn!(jump_ms = jump, "the wall clock moved; displayed times follow it, durations do not");
        }
        s.liveness.sweep(s.config.clock.mono_ms(), &s.registry, &s.tallies);
        let bucket = s.curve.bucket_start(s.config.clock.wall_ms());
        let sample = Curve::read(&s.tallies, s.registry.provinces.len(), bucket);
        // Curve first: a snapshot taken before the push must hold it (see `push`).
        // Not in cluster mode: each node samples its own curve from the (replicated) rollups.
        let record = s
            .durability
            .as_ref()
            .filter(|_| s.replication.is_none())
            .map(|_| Record::Curve(CurveRecord::from_sample(&s.registry, &sample)));
        s.curve.push(sample);
        if let (Some(d), Some(record)) = (&s.durability, record) {
            d.push(record);
        }
    }
}
