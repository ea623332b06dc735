//! The registers: one `{seq, count}` per (site, desk, session), and the rule that applies a report.
//!
//! This is the whole counting model. A report is applied only if its `seq` is newer than the
//! stored one; then the caller adds `count − previous count` to the rollups. Older or equal seqs
//! change nothing, so duplicates, reorders and resends are harmless. The map is a sharded
//! `DashMap`; a shard lock is held only for the compare-and-set of one register, never across an
//! `.await`, and the rollup update happens after it is released (deltas commute).

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;

/// Identifies a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegisterKey {
    /// Site index.
    pub site: u32,
    /// Desk number (1-based).
    pub desk: u16,
    /// Session index (not the wire id).
    pub session: u16,
}

impl RegisterKey {
    fn packed(self) -> u64 {
        (u64::from(self.site) << 32) | (u64::from(self.desk) << 16) | u64::from(self.session)
    }

    fn unpack(k: u64) -> Self {
        Self { site: (k >> 32) as u32, desk: (k >> 16) as u16, session: k as u16 }
    }
}

/// A register's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Register {
    /// Highest applied seq (0: never reported).
    pub seq: u64,
    /// Cumulative count at that seq.
    pub count: i64,
}

/// What applying a report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The register moved from `previous` to `current`.
    Applied {
        /// Before.
        previous: Register,
        /// After.
        current: Register,
    },
    /// Stale or duplicate: nothing changed; the stored state.
    Unchanged(Register),
    /// Same seq, different count: nothing changed; the stored state.
    Conflict(Register),
}

/// All registers.
#[derive(Debug, Default)]
pub struct Registers {
    map: DashMap<u64, Register, FxBuildHasher>,
}

impl Registers {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stored state of a register (zero if never reported).
    pub fn get(&self, key: RegisterKey) -> Register {
        self.map.get(&key.packed()).map(|r| *r).unwrap_or_default()
    }

    /// Applies `(seq, count)` to a register under the counting rule. `seq` must be ≥ 1.
    pub fn apply(&self, key: RegisterKey, seq: u64, count: i64) -> Outcome {
        let mut entry = self.map.entry(key.packed()).or_default();
        let stored = *entry;
        if seq < stored.seq || (seq == stored.seq && count == stored.count) {
            Outcome::Unchanged(stored)
        } else if seq == stored.seq {
            Outcome::Conflict(stored)
        } else {
            let current = Register { seq, count };
            *entry = current;
            Outcome::Applied { previous: stored, current }
        }
    }

    /// Sets a register unconditionally (recovery). Returns the previous state.
    pub fn restore(&self, key: RegisterKey, reg: Register) -> Register {
        self.map.insert(key.packed(), reg).unwrap_or_default()
    }

    /// Every register with its key (cloned out; no lock held after the call).
    pub fn snapshot(&self) -> Vec<(RegisterKey, Register)> {
        self.map.iter().map(|e| (RegisterKey::unpack(*e.key()), *e.value())).collect()
    }

    /// Number of registers ever written.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no register was ever written.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
