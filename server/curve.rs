//! The check-in curve: cumulative national and per-province counts per session, sampled at each
//! bucket boundary by a background task. Sampling reads the rollups (O(provinces × sessions)),
//! so the curve costs nothing on the ingest path.

use std::{collections::VecDeque, sync::Mutex};

use super::tally::{Level, Node, Tallies};

/// One sample: counts for national (row 0) then each province, per session.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Start of the bucket the sample closes, Unix ms.
    pub unix_ms: i64,
    /// `counts[row * sessions + session]`.
    pub counts: Box<[i64]>,
}

/// The sampled curve, bounded in length.
#[derive(Debug)]
pub struct Curve {
    bucket_ms: i64,
    capacity: usize,
    // A std Mutex: touched once per bucket and per curve query, never across `.await`.
    samples: Mutex<VecDeque<Sample>>,
}

impl Curve {
    /// An empty curve with the given bucket width, keeping at most `capacity` samples.
    pub fn new(bucket_ms: i64, capacity: usize) -> Self {
        Self { bucket_ms: bucket_ms.max(1), capacity: capacity.max(2), samples: Mutex::new(VecDeque::new()) }
    }

    /// Bucket width.
    pub fn bucket_ms(&self) -> i64 {
        self.bucket_ms
    }

    /// Reads every row of the tallies now.
    pub fn read(tallies: &Tallies, provinces: usize, unix_ms: i64) -> Sample {
        let sessions = tallies.sessions();
        let mut counts = Vec::with_capacity((provinces + 1) * sessions);
        let rows = std::iter::once(Node::NATIONAL)
            .chain((0..provinces as u32).map(|index| Node { level: Level::Province, index }));
        for node in rows {
            for s in 0..sessions {
                counts.push(tallies.read(node, Some(s)).count);
            }
        }
        Sample { unix_ms, counts: counts.into() }
    }

    /// Appends a sample, or updates the last one if it is for the same bucket. A sample older
    /// than the last (the wall clock stepped back) updates the last one's counts under its own
    /// label: the curve stays live and its labels in order until the clock catches up.
    pub fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(last) = samples.back_mut()
            && last.unix_ms >= sample.unix_ms
        {
            last.counts = sample.counts;
            return;
        }
        if samples.len() == self.capacity {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Start of the bucket containing `unix_ms`.
    pub fn bucket_start(&self, unix_ms: i64) -> i64 {
        unix_ms - unix_ms.rem_euclid(self.bucket_ms)
    }

    /// Points `(bucket start, cumulative count)` of one row, summed over `sessions`, oldest first.
    pub fn points(&self, row: usize, sessions: std::ops::Range<usize>, per_row: usize) -> Vec<(i64, i64)> {
        let samples = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        samples.iter().map(|s| (s.unix_ms, sessions.clone().map(|k| s.counts[row * per_row + k]).sum())).collect()
    }

    /// All samples, oldest first (for snapshots).
    pub fn all(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect()
    }
}
