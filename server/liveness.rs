//! Which sites are reporting: per-site last-seen times, the "reporting" flag kept on the rollups,
//! and a periodic sweep that flags silent sites and recounts over-capacity sites.
//!
//! Times here are monotonic milliseconds ([`super::clock::Clock::mono_ms`], never 0; 0 means
//! "never seen"): a step of the wall clock changes no site's silence.
//!
//! The hot path only stores a timestamp and, on a silent → reporting transition (rare), bumps the
//! reporting counters up the tree. The sweep (once per `sweep` interval, off the ingest path) is
//! the only O(sites) work in the aggregator.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicBool, AtomicI64, Ordering::Relaxed},
};

use super::{
    registry::Registry,
    tally::{Level, Node, Tallies},
};

/// Per-site liveness state.
pub struct Liveness {
    last_seen: Box<[AtomicI64]>,
    reporting: Box<[AtomicBool]>,
    silent_after_ms: i64,
    // Written once per sweep, read by silent-site queries; a std RwLock, never held across `.await`.
    silent: RwLock<Arc<Vec<u32>>>,
}

impl Liveness {
    /// All sites silent (never seen).
    pub fn new(sites: usize, silent_after_ms: i64) -> Self {
        Self {
            last_seen: (0..sites).map(|_| AtomicI64::new(0)).collect(),
            reporting: (0..sites).map(|_| AtomicBool::new(false)).collect(),
            silent_after_ms,
            silent: RwLock::new(Arc::new((0..sites as u32).collect())),
        }
    }

    /// Marks `site` as seen at `now_ms` (monotonic).
    #[inline]
    pub fn touch(&self, site: u32, now_ms: i64, tallies: &Tallies) {
        let i = site as usize;
        self.last_seen[i].store(now_ms, Relaxed);
        if !self.reporting[i].load(Relaxed) && self.reporting[i].compare_exchange(false, true, Relaxed, Relaxed).is_ok()
        {
            tallies.add_reporting(site, 1);
        }
    }

    /// Last time `site` was seen, monotonic ms (0: never).
    pub fn last_seen(&self, site: u32) -> i64 {
        self.last_seen[site as usize].load(Relaxed)
    }

    /// Silent sites as of the last sweep (site indices), in site-id order.
    pub fn silent(&self) -> Arc<Vec<u32>> {
        self.silent.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether a site last seen at `seen` (0: never) is silent at `now_ms`.
    fn is_silent(&self, seen: i64, now_ms: i64) -> bool {
        seen == 0 || now_ms.saturating_sub(seen) > self.silent_after_ms
    }

    /// Flags sites silent for longer than the interval, rebuilds the silent list and recounts
    /// over-capacity sites at every level.
    pub fn sweep(&self, now_ms: i64, registry: &Registry, tallies: &Tallies) {
        let sessions = tallies.sessions();
        let slots = sessions + 1;
        let mut silent = Vec::new();
        let mut over = [
            vec![0u32; slots],
            vec![0u32; registry.provinces.len() * slots],
            vec![0u32; registry.communes.len() * slots],
            vec![0u32; registry.sites.len() * slots],
        ];
        for (i, site) in registry.sites.iter().enumerate() {
            let idx = i as u32;
            if self.is_silent(self.last_seen[i].load(Relaxed), now_ms) {
                if self.reporting[i].compare_exchange(true, false, Relaxed, Relaxed).is_ok() {
                    tallies.add_reporting(idx, -1);
                    // A report may have landed between the load and the flip: undo if so.
                    let seen = self.last_seen[i].load(Relaxed);
                    if !self.is_silent(seen, now_ms) {
                        self.touch(idx, seen, tallies);
                    }
                }
                if !self.reporting[i].load(Relaxed) {
                    silent.push(idx);
                }
            }
            let path = tallies.path(idx);
            let mut any = false;
            for s in 0..sessions {
                let count = tallies.read(Node { level: Level::Site, index: idx }, Some(s)).count;
                if count > i64::from(site.registered) {
                    any = true;
                    for node in &path {
                        over[node.level as usize][node.index as usize * slots + s] += 1;
                    }
                }
            }
            if any {
                for node in &path {
                    over[node.level as usize][node.index as usize * slots + sessions] += 1;
                }
            }
        }
        for (level, values) in [Level::National, Level::Province, Level::Commune, Level::Site].into_iter().zip(&over) {
            tallies.store_over_capacity(level, values);
        }
        // Listed by site id (the answer's documented order), not by registry position.
        silent.sort_unstable_by(|a, b| registry.sites[*a as usize].id.cmp(&registry.sites[*b as usize].id));
        *self.silent.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(silent);
    }
}
