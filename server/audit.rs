//! The audit trail of corrections (reports that lowered a count): a bounded in-memory ring,
//! newest last, plus a structured `info!` log line for each.

use std::{collections::VecDeque, sync::Mutex};

use crate::proto::v1::Correction;

/// Bounded ring of corrections.
#[derive(Debug)]
pub struct Audit {
    // A std Mutex: corrections are rare and no `.await` happens under the lock.
    ring: Mutex<VecDeque<Correction>>,
    capacity: usize,
}

impl Audit {
    /// A ring keeping the `capacity` newest corrections.
    pub fn new(capacity: usize) -> Self {
        Self { ring: Mutex::new(VecDeque::with_capacity(capacity.min(1024))), capacity }
    }

    /// Records a correction.
    pub fn record(&self, c: Correction) {
        tracing::info!(
            site = %c.site_id, desk = c.desk, session = c.session, seq = c.seq,
            previous = c.previous_count, count = c.count, reason = %c.reason,
            "correction applied"
        );
        let mut ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(c);
    }

    /// Re-inserts a recovered correction (no log line).
    pub fn restore(&self, c: Correction) {
        let mut ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(c);
    }

    /// The newest `limit` corrections (0: all), newest first.
    pub fn newest(&self, limit: usize) -> Vec<Correction> {
        let ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = if limit == 0 { ring.len() } else { limit.min(ring.len()) };
        ring.iter().rev().take(n).cloned().collect()
    }

    /// All kept corrections, oldest first (for snapshots).
    pub fn all(&self) -> Vec<Correction> {
        let ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.iter().cloned().collect()
    }
}
