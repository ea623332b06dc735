//! The registers: one `{seq, count}` per (site, desk, session), and the rule that applies a report.
//!
//! This is the whole counting model. A report is applied only if its `seq` is newer than the
//! stored one; then the caller adds `count − previous count` to the rollups. Older or equal seqs
//! change nothing, so duplicates, reorders and resends are harmless. The map is a sharded
//! `DashMap`; a shard lock is held only for the compare-and-set of one register and the rollup of its
//! change (atomics), never across an `.await`, so that readers see one register's changes in order.

use std::sync::Mutex;

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
    /// The key as one integer (site, desk, session).
    pub fn packed(self) -> u64 {
        (u64::from(self.site) << 32) | (u64::from(self.desk) << 16) | u64::from(self.session)
    }

    /// The inverse of [`RegisterKey::packed`].
    pub fn unpack(k: u64) -> Self {
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

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    reg: Register,
    /// Changed since the journal last wrote it (and queued in `dirty`).
    dirty: bool,
}

const DIRTY_SHARDS: usize = 16;

/// All registers.
#[derive(Debug)]
pub struct Registers {
    map: DashMap<u64, Slot, FxBuildHasher>,
    /// Keys changed since the last journal flush, each queued once (see `Slot::dirty`); `None`
    /// when nothing is journaled. Sharded by site; a std Mutex held only to push or swap.
    dirty: Option<Box<[Mutex<Vec<u64>>]>>,
    /// The journal flusher and the per-shard queue length at which it is woken early.
    flusher: std::sync::OnceLock<(std::thread::Thread, usize)>,
}

impl Default for Registers {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Registers {
    /// An empty store; `track_dirty` queues changed registers for the journal.
    pub fn new(track_dirty: bool) -> Self {
        Self {
            map: DashMap::with_hasher(FxBuildHasher),
            dirty: track_dirty.then(|| (0..DIRTY_SHARDS).map(|_| Mutex::new(Vec::new())).collect()),
            flusher: std::sync::OnceLock::new(),
        }
    }

    /// The stored state of a register (zero if never reported).
    pub fn get(&self, key: RegisterKey) -> Register {
        self.map.get(&key.packed()).map(|r| r.reg).unwrap_or_default()
    }

    /// Applies `(seq, count)` to a register under the counting rule. `seq` must be ≥ 1.
    pub fn apply(&self, key: RegisterKey, seq: u64, count: i64) -> Outcome {
        let mut out = Outcome::Unchanged(Register::default());
        self.apply_run(key, std::iter::once((seq, count)), |_, o| out = o, |_| {});
        out
    }

    /// Applies a run of reports to ONE register, in order, under one hold of its shard lock, and
    /// calls `rollup` with the run's net change in count *before* releasing it (when non-zero).
    ///
    /// Holding the lock across the rollup orders the rollups of two streams that write the same
    /// register (two writers for one desk): without it, a correction to 0 from one stream could
    /// reach the totals before the rise to 1,000 it corrects, and a reader would see −1,000.
    /// `rollup` must not touch the register map (it adds to the tallies' atomics only).
    pub fn apply_run(
        &self,
        key: RegisterKey,
        reports: impl IntoIterator<Item = (u64, i64)>,
        mut each: impl FnMut(usize, Outcome),
        rollup: impl FnOnce(i64),
    ) {
        let mut entry = self.map.entry(key.packed()).or_default();
        let mut delta = 0i64;
        let mut changed = false;
        for (i, (seq, count)) in reports.into_iter().enumerate() {
            let stored = entry.reg;
            let outcome = if seq < stored.seq || (seq == stored.seq && count == stored.count) {
                Outcome::Unchanged(stored)
            } else if seq == stored.seq {
                Outcome::Conflict(stored)
            } else {
                let current = Register { seq, count };
                entry.reg = current;
                delta += count - stored.count;
                changed = true;
                Outcome::Applied { previous: stored, current }
            };
            each(i, outcome);
        }
        if changed
            && let Some(dirty) = &self.dirty
            && !entry.dirty
        {
            entry.dirty = true;
            // Lock order: map shard, then dirty shard. `take_dirty` never holds both.
            let mut queue =
                dirty[key.site as usize % DIRTY_SHARDS].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.push(key.packed());
            if let Some((thread, early)) = self.flusher.get()
                && queue.len() == *early
            {
                thread.unpark();
            }
        }
        if delta != 0 {
            rollup(delta);
        }
    }

    /// Wakes `thread` whenever about `records` registers are queued for the journal.
    pub fn set_flusher(&self, thread: std::thread::Thread, records: usize) {
        let _ = self.flusher.set((thread, (records / DIRTY_SHARDS).max(1)));
    }

    /// Registers changed since the previous call, with their current state; clears their flag.
    pub fn take_dirty(&self) -> Vec<(RegisterKey, Register)> {
        let Some(dirty) = &self.dirty else { return Vec::new() };
        let mut out = Vec::new();
        for shard in dirty.iter() {
            let keys = std::mem::take(&mut *shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            for k in keys {
                if let Some(mut slot) = self.map.get_mut(&k) {
                    slot.dirty = false;
                    out.push((RegisterKey::unpack(k), slot.reg));
                }
            }
        }
        out
    }

    /// Sets a register if `reg` is newer than the stored one (recovery). Returns the previous
    /// state when it changed.
    pub fn restore(&self, key: RegisterKey, reg: Register) -> Option<Register> {
        let mut entry = self.map.entry(key.packed()).or_default();
        if reg.seq > entry.reg.seq {
            let previous = entry.reg;
            entry.reg = reg;
            Some(previous)
        } else {
            None
        }
    }

    /// Applies a register state another cluster node committed (from etcd's list or watch)
    /// under the counting rule — only a higher seq changes it — and calls `rollup` with the change
    /// in count before releasing the register's lock, as [`Self::apply_run`] does. Not queued for
    /// writing: it is already in etcd. Returns whether it changed.
    pub fn merge(&self, key: RegisterKey, reg: Register, rollup: impl FnOnce(i64)) -> bool {
        let mut entry = self.map.entry(key.packed()).or_default();
        if reg.seq <= entry.reg.seq {
            return false;
        }
        let delta = reg.count - entry.reg.count;
        entry.reg = reg;
        if delta != 0 {
            rollup(delta);
        }
        true
    }

    /// Every register with its key (cloned out; no lock held after the call).
    pub fn snapshot(&self) -> Vec<(RegisterKey, Register)> {
        self.map.iter().map(|e| (RegisterKey::unpack(*e.key()), e.value().reg)).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(site: u32, desk: u16, session: u16) -> RegisterKey {
        RegisterKey { site, desk, session }
    }

    #[test]
    fn packing_round_trips_every_field() {
        for k in [key(0, 0, 0), key(10_034, 3, 2), key(u32::MAX, u16::MAX, u16::MAX), key(1, 2, 3)] {
            assert_eq!(RegisterKey::unpack(k.packed()), k);
        }
        assert_ne!(key(1, 2, 3).packed(), key(1, 3, 2).packed());
        assert_ne!(key(1, 0, 0).packed(), key(0, 1, 0).packed());
    }

    #[test]
    fn the_counting_rule_applies_only_newer_seqs() {
        let r = Registers::new(false);
        let k = key(7, 1, 0);
        let zero = Register::default();
        assert_eq!(r.apply(k, 2, 5), Outcome::Applied { previous: zero, current: Register { seq: 2, count: 5 } });
        // Older: unchanged, answered with what is stored.
        assert_eq!(r.apply(k, 1, 9), Outcome::Unchanged(Register { seq: 2, count: 5 }));
        // Same seq, same count: a duplicate.
        assert_eq!(r.apply(k, 2, 5), Outcome::Unchanged(Register { seq: 2, count: 5 }));
        // Same seq, another count: a conflict, nothing changes.
        assert_eq!(r.apply(k, 2, 6), Outcome::Conflict(Register { seq: 2, count: 5 }));
        assert_eq!(r.get(k), Register { seq: 2, count: 5 });
        // Newer with a lower count: a correction is applied.
        assert_eq!(
            r.apply(k, 3, 1),
            Outcome::Applied { previous: Register { seq: 2, count: 5 }, current: Register { seq: 3, count: 1 } }
        );
        // Newer with the same count is applied too (a new seq).
        assert!(matches!(r.apply(k, 9, 1), Outcome::Applied { .. }));
        assert_eq!(r.get(k), Register { seq: 9, count: 1 });
        // Other registers are untouched.
        assert_eq!(r.get(key(7, 1, 1)), zero);
        assert_eq!(r.get(key(7, 2, 0)), zero);
    }

    #[test]
    fn changed_registers_are_queued_once_for_the_journal_whatever_the_site() {
        let r = Registers::new(true);
        // Sites well beyond the shard count: the shard is the site modulo the shard count.
        let keys = [key(0, 1, 0), key(17, 1, 1), key(300, 2, 0), key(10_034, 1, 3)];
        for (i, k) in keys.iter().enumerate() {
            r.apply(*k, 1, i as i64);
            r.apply(*k, 2, i as i64 + 10);
        }
        r.apply(keys[0], 1, 99); // stale: not queued again, state unchanged
        let mut dirty = r.take_dirty();
        dirty.sort_by_key(|(k, _)| k.packed());
        let mut want: Vec<(RegisterKey, Register)> =
            keys.iter().enumerate().map(|(i, k)| (*k, Register { seq: 2, count: i as i64 + 10 })).collect();
        want.sort_by_key(|(k, _)| k.packed());
        assert_eq!(dirty, want);
        assert!(r.take_dirty().is_empty(), "taken once");
        r.apply(keys[2], 3, 1);
        assert_eq!(r.take_dirty(), vec![(keys[2], Register { seq: 3, count: 1 })]);
        // Without a journal nothing is queued.
        let plain = Registers::new(false);
        plain.apply(keys[1], 1, 1);
        assert!(plain.take_dirty().is_empty());
    }

    #[test]
    fn the_flusher_is_woken_once_a_shard_holds_its_share_of_the_early_commit() {
        let r = Registers::new(true);
        // 40 records over 16 shards: woken at 2 queued in one shard.
        r.set_flusher(std::thread::current(), 40);
        r.apply(key(0, 1, 0), 1, 1);
        r.apply(key(16, 1, 0), 1, 1); // same shard as site 0: the second queued key
        // Returns at once when unparked; the deadline only bounds a missing wake.
        let waited = std::time::Instant::now();
        std::thread::park_timeout(std::time::Duration::from_secs(30));
        assert!(waited.elapsed() < std::time::Duration::from_secs(30), "the flusher was never woken");
    }

    #[test]
    fn restore_keeps_the_newest_state() {
        let r = Registers::new(false);
        let k = key(3, 1, 2);
        assert_eq!(r.restore(k, Register { seq: 4, count: 8 }), Some(Register::default()));
        assert_eq!(r.restore(k, Register { seq: 4, count: 9 }), None, "equal seq: kept");
        assert_eq!(r.restore(k, Register { seq: 3, count: 1 }), None, "older: kept");
        assert_eq!(r.get(k), Register { seq: 4, count: 8 });
        assert_eq!(r.restore(k, Register { seq: 5, count: 2 }), Some(Register { seq: 4, count: 8 }));
        assert_eq!(r.get(k), Register { seq: 5, count: 2 });
    }

    #[test]
    fn snapshot_and_len_list_every_written_register() {
        let r = Registers::new(false);
        assert!(r.is_empty());
        assert_eq!(r.len(), 0);
        r.apply(key(1, 1, 0), 1, 3);
        r.apply(key(2, 1, 0), 1, 4);
        assert!(!r.is_empty());
        assert_eq!(r.len(), 2);
        let mut s = r.snapshot();
        s.sort_by_key(|(k, _)| k.packed());
        assert_eq!(
            s,
            vec![(key(1, 1, 0), Register { seq: 1, count: 3 }), (key(2, 1, 0), Register { seq: 1, count: 4 })]
        );
    }
}
