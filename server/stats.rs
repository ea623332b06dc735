//! The aggregator's statistics: sharded counters bumped on the hot path (one cache line per
//! shard, summed when read) and the snapshot of them that `Stats` queries return.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crossbeam_utils::CachePadded;

const STAT_SHARDS: usize = 16;

/// Sharded monotone counter for statistics (hot: bumped per report).
pub(crate) struct StatCounter([CachePadded<AtomicU64>; STAT_SHARDS]);

impl StatCounter {
    pub(crate) fn new() -> Self {
        Self(std::array::from_fn(|_| CachePadded::new(AtomicU64::new(0))))
    }
    #[inline]
    pub(crate) fn add(&self, shard: u32, n: u64) {
        self.0[shard as usize % STAT_SHARDS].fetch_add(n, Relaxed);
    }
    pub(crate) fn get(&self) -> u64 {
        self.0.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// Counters describing what the aggregator did since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Reports that changed a register.
    pub applied: u64,
    /// Stale or duplicate reports (no change).
    pub unchanged: u64,
    /// Rejected reports.
    pub rejected: u64,
    /// Batches received.
    pub batches: u64,
    /// Ingest streams open now.
    pub streams_open: u64,
}
