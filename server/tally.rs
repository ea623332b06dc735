//! Rollup tallies kept on write: per (level, node, session) counters, so any total is an O(1) read.
//!
//! Every applied report adds its delta to four nodes (site, commune, province, national). The
//! national node is touched by every report and a province node by ~1/34 of them; with one atomic
//! each, all cores would fight over one cache line (measured upstream: two threads slower than
//! one). Those hot nodes are therefore split into shards chosen by site index, each on its own
//! cache lines, and summed on read. Communes and sites are touched rarely enough to keep a single,
//! unpadded cell: 16 bytes instead of 128 keeps their 54,000 cells (0.9 MB instead of 6.9 MB)
//! mostly in cache.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering::Relaxed};

use super::registry::Registry;

/// A level of the hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// The country (one node).
    National,
    /// Provinces.
    Province,
    /// Communes.
    Commune,
    /// Sites.
    Site,
}

/// A node of the hierarchy: a level and an index within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Node {
    /// Level.
    pub level: Level,
    /// Index at that level (0 for national).
    pub index: u32,
}

impl Node {
    /// The national node.
    pub const NATIONAL: Node = Node { level: Level::National, index: 0 };
}

#[derive(Default)]
#[repr(align(16))]
struct Cell {
    count: AtomicI64,
    /// Monotonic ms of the last change (max over writers; 0: never). Shown as wall time by
    /// [`super::clock::Clock::to_wall`], so a step of the wall clock neither freezes nor
    /// reorders it.
    changed_ms: AtomicI64,
}

/// Cells per 128 bytes (two cache lines, the unit the adjacent-line prefetcher pulls in).
const CELLS_PER_128_BYTES: usize = 128 / std::mem::size_of::<Cell>();

/// The counters of one level.
struct LevelCells {
    sessions: usize,
    shards: usize,
    /// 1 for unpadded levels; [`CELLS_PER_128_BYTES`] for sharded ones, so that no two shards
    /// share a cache line (a 16-byte-aligned cell never straddles one).
    stride: usize,
    cells: Box<[Cell]>,
    /// Sites reporting, per node (maintained by the liveness tracker).
    reporting: Box<[AtomicU32]>,
    /// Sites over capacity, per node and per session plus one slot for "any session".
    over_capacity: Box<[AtomicU32]>,
}

impl LevelCells {
    fn new(nodes: usize, sessions: usize, shards: usize) -> Self {
        let stride = if shards > 1 { CELLS_PER_128_BYTES } else { 1 };
        Self {
            sessions,
            shards,
            stride,
            cells: (0..nodes * sessions * shards * stride).map(|_| Cell::default()).collect(),
            reporting: (0..nodes).map(|_| AtomicU32::new(0)).collect(),
            over_capacity: (0..nodes * (sessions + 1)).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    #[inline]
    fn cell(&self, node: u32, session: usize, shard: usize) -> &Cell {
        &self.cells[((node as usize * self.sessions + session) * self.shards + shard % self.shards) * self.stride]
    }

    fn read(&self, node: u32, session: Option<usize>) -> (i64, i64) {
        let sessions = match session {
            Some(s) => s..s + 1,
            None => 0..self.sessions,
        };
        let mut count = 0;
        let mut changed = 0;
        for s in sessions {
            for shard in 0..self.shards {
                let c = self.cell(node, s, shard);
                count += c.count.load(Relaxed);
                changed = changed.max(c.changed_ms.load(Relaxed));
            }
        }
        (count, changed)
    }
}

/// A point-in-time reading of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    /// Checked-in delegates.
    pub count: i64,
    /// Monotonic ms of the last change (0: never); see [`super::clock::Clock::to_wall`].
    pub changed_ms: i64,
    /// Sites reporting.
    pub reporting: u32,
    /// Sites over capacity.
    pub over_capacity: u32,
}

/// All rollups.
pub struct Tallies {
    levels: [LevelCells; 4],
    site_province: Box<[u32]>,
    site_commune: Box<[u32]>,
    sessions: usize,
}

const NATIONAL_SHARDS: usize = 32;
const PROVINCE_SHARDS: usize = 4;

impl Tallies {
    /// Zeroed tallies shaped like the registry.
    pub fn new(registry: &Registry) -> Self {
        let sessions = registry.sessions.len();
        Self {
            levels: [
                LevelCells::new(1, sessions, NATIONAL_SHARDS),
                LevelCells::new(registry.provinces.len(), sessions, PROVINCE_SHARDS),
                LevelCells::new(registry.communes.len(), sessions, 1),
                LevelCells::new(registry.sites.len(), sessions, 1),
            ],
            site_province: registry.sites.iter().map(|s| s.province).collect(),
            site_commune: registry.sites.iter().map(|s| s.commune).collect(),
            sessions,
        }
    }

    fn level(&self, level: Level) -> &LevelCells {
        &self.levels[level as usize]
    }

    /// The four nodes a site rolls up into, site first.
    #[inline]
    pub fn path(&self, site: u32) -> [Node; 4] {
        [
            Node { level: Level::Site, index: site },
            Node { level: Level::Commune, index: self.site_commune[site as usize] },
            Node { level: Level::Province, index: self.site_province[site as usize] },
            Node::NATIONAL,
        ]
    }

    /// Adds `delta` check-ins of `session` at `site` to every level, changed at `now_ms`
    /// (monotonic). O(1), lock-free.
    #[inline]
    pub fn add(&self, site: u32, session: usize, delta: i64, now_ms: i64) {
        for node in self.path(site) {
            let cell = self.level(node.level).cell(node.index, session, site as usize);
            cell.count.fetch_add(delta, Relaxed);
            // The clock moves once a millisecond; a read first avoids taking the line
            // exclusively (a CAS loop) for the thousands of adds within the same millisecond.
            if cell.changed_ms.load(Relaxed) < now_ms {
                cell.changed_ms.fetch_max(now_ms, Relaxed);
            }
        }
    }

    /// Adds `delta` to the reporting-sites counter of every level above and at `site`.
    pub fn add_reporting(&self, site: u32, delta: i32) {
        for node in self.path(site) {
            let r = &self.level(node.level).reporting[node.index as usize];
            if delta >= 0 {
                r.fetch_add(delta.unsigned_abs(), Relaxed);
            } else {
                r.fetch_sub(delta.unsigned_abs(), Relaxed);
            }
        }
    }

    /// Replaces the over-capacity counters of a level (computed by the liveness sweep).
    /// `values[node * (sessions + 1) + slot]`, slot `sessions` meaning "any session".
    pub fn store_over_capacity(&self, level: Level, values: &[u32]) {
        for (cell, v) in self.level(level).over_capacity.iter().zip(values) {
            cell.store(*v, Relaxed);
        }
    }

    /// Reads a node for one session (`Some(index)`) or all sessions. O(sessions × shards).
    pub fn read(&self, node: Node, session: Option<usize>) -> Reading {
        let level = self.level(node.level);
        let (count, changed_ms) = level.read(node.index, session);
        let slot = session.unwrap_or(self.sessions);
        Reading {
            count,
            changed_ms,
            reporting: level.reporting[node.index as usize].load(Relaxed),
            over_capacity: level.over_capacity[node.index as usize * (self.sessions + 1) + slot].load(Relaxed),
        }
    }

    /// Number of sessions.
    pub fn sessions(&self) -> usize {
        self.sessions
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::server::registry::generate::{GenerateOptions, generate};

    /// A registry with sites in every national and province shard.
    fn registry() -> Registry {
        generate(&GenerateOptions { sites: 300, ..GenerateOptions::default() })
    }

    #[test]
    fn every_node_and_session_reads_the_sum_of_its_sites() {
        let reg = registry();
        let t = Tallies::new(&reg);
        assert_eq!(t.sessions(), reg.sessions.len());
        // model[(level, index, session)] = count
        let mut model: HashMap<(Level, u32, usize), i64> = HashMap::new();
        for (i, site) in reg.sites.iter().enumerate() {
            let session = i % reg.sessions.len();
            let delta = (i as i64 % 7) + 1;
            t.add(i as u32, session, delta, 1_000 + i as i64);
            // A correction lowers the count again for some.
            if i % 5 == 0 {
                t.add(i as u32, session, -1, 1_000 + i as i64);
            }
            let net = delta - i64::from(i % 5 == 0);
            for (level, index) in [
                (Level::Site, i as u32),
                (Level::Commune, site.commune),
                (Level::Province, site.province),
                (Level::National, 0),
            ] {
                *model.entry((level, index, session)).or_default() += net;
            }
        }
        let nodes = [
            (Level::National, 1),
            (Level::Province, reg.provinces.len()),
            (Level::Commune, reg.communes.len()),
            (Level::Site, reg.sites.len()),
        ];
        for (level, n) in nodes {
            for index in 0..n as u32 {
                let node = Node { level, index };
                let mut all = 0;
                for s in 0..reg.sessions.len() {
                    let want = model.get(&(level, index, s)).copied().unwrap_or(0);
                    assert_eq!(t.read(node, Some(s)).count, want, "{node:?} session {s}");
                    all += want;
                }
                assert_eq!(t.read(node, None).count, all, "{node:?} all sessions");
            }
        }
    }

    #[test]
    fn the_last_change_time_is_the_latest_add() {
        let reg = registry();
        let t = Tallies::new(&reg);
        assert_eq!(t.read(Node::NATIONAL, None).changed_ms, 0, "never changed");
        t.add(5, 1, 3, 2_000);
        t.add(6, 1, 3, 1_500); // an older clock reading does not move it back
        let site = Node { level: Level::Site, index: 5 };
        assert_eq!(t.read(site, Some(1)).changed_ms, 2_000);
        assert_eq!(t.read(site, Some(0)).changed_ms, 0, "other session untouched");
        assert_eq!(t.read(Node::NATIONAL, Some(1)).changed_ms, 2_000);
        t.add(6, 1, 1, 2_500);
        assert_eq!(t.read(Node::NATIONAL, None).changed_ms, 2_500);
        assert_eq!(t.read(Node { level: Level::Site, index: 6 }, None).changed_ms, 2_500);
    }

    #[test]
    fn reporting_sites_roll_up_and_down() {
        let reg = registry();
        let t = Tallies::new(&reg);
        t.add_reporting(0, 1);
        t.add_reporting(1, 1);
        t.add_reporting(0, -1);
        let s1 = &reg.sites[1];
        assert_eq!(t.read(Node::NATIONAL, None).reporting, 1);
        assert_eq!(t.read(Node { level: Level::Site, index: 1 }, None).reporting, 1);
        assert_eq!(t.read(Node { level: Level::Site, index: 0 }, None).reporting, 0);
        assert_eq!(t.read(Node { level: Level::Commune, index: s1.commune }, None).reporting, 1);
        assert_eq!(t.read(Node { level: Level::Province, index: s1.province }, Some(2)).reporting, 1);
    }

    #[test]
    fn over_capacity_is_read_per_node_and_session_slot() {
        let reg = registry();
        let t = Tallies::new(&reg);
        let slots = reg.sessions.len() + 1;
        let values: Vec<u32> = (0..reg.provinces.len() * slots).map(|v| v as u32 + 1).collect();
        t.store_over_capacity(Level::Province, &values);
        for p in 0..reg.provinces.len() {
            let node = Node { level: Level::Province, index: p as u32 };
            for s in 0..reg.sessions.len() {
                assert_eq!(t.read(node, Some(s)).over_capacity, values[p * slots + s]);
            }
            assert_eq!(t.read(node, None).over_capacity, values[p * slots + reg.sessions.len()]);
        }
        assert_eq!(t.read(Node::NATIONAL, None).over_capacity, 0, "other levels untouched");
    }

    #[test]
    fn a_site_rolls_up_into_its_own_commune_and_province() {
        let reg = registry();
        let t = Tallies::new(&reg);
        for (i, s) in reg.sites.iter().enumerate() {
            let p = t.path(i as u32);
            assert_eq!(p[0], Node { level: Level::Site, index: i as u32 });
            assert_eq!(p[1], Node { level: Level::Commune, index: s.commune });
            assert_eq!(p[2], Node { level: Level::Province, index: s.province });
            assert_eq!(p[3], Node::NATIONAL);
        }
    }
}
