//! A reporter's local state — its registers per session — and where it is kept. A save records
//! only what a commit changed (a [`Change`]: the changed registers and the badges they added), so
//! its cost does not grow with the seen-set. The file store keeps one file: a snapshot (written
//! atomically: temporary file, fsync, rename, fsync of the directory) followed by one JSON line
//! per change (appended and fsynced before the change is sent); once the lines outgrow the
//! snapshot, the reporter writes a new snapshot. A crash leaves the old or the new snapshot, and
//! at most a torn last line, which was never reported as saved and is ignored.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

pub use super::file_store::FileStore;

/// One session's register as the reporter knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRegister {
    /// Seq of the latest change (raised on every change, persisted before sending).
    pub seq: u64,
    /// Cumulative count.
    pub count: i64,
    /// Reason of a pending correction, sent with the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Set by a correction made before the first reconciliation: `count` is the desk's absolute
    /// count, not check-ins to add on top of the aggregator's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub absolute: bool,
    /// Badges counted in this session (normalised), so that a delegate counts once per session
    /// per site whichever desk of the agent scans them, across restarts. Saved with the count,
    /// in the same atomic write, before the count is sent.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub badges: BTreeSet<String>,
}

/// One session of the event's schedule, as the aggregator last sent it (kept so that an agent
/// started while the aggregator is unreachable still knows session names and times).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledSession {
    /// Session id.
    pub id: u32,
    /// Display name.
    pub name: String,
    /// Scheduled start, Unix ms (0: not scheduled).
    #[serde(default)]
    pub starts_unix_ms: i64,
    /// Scheduled end, Unix ms (0: open-ended).
    #[serde(default)]
    pub ends_unix_ms: i64,
    /// IANA time zone of the schedule (display).
    #[serde(default)]
    pub time_zone: String,
}

/// Everything a reporter persists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalState {
    /// Format version (1).
    pub version: u32,
    /// Site id.
    pub site: String,
    /// Desk number.
    pub desk: u32,
    /// True once the state has been reconciled with the aggregator at least once. Until then the
    /// counts are check-ins since a fresh install and are added on top of what the aggregator has.
    pub anchored: bool,
    /// Registers by session id.
    pub sessions: BTreeMap<u32, LocalRegister>,
    /// This agent install's random id (sent as `x-headcount-agent` by reporters configured with
    /// `agent_install`): generated once, kept for good, so the aggregator gives this install its
    /// own register slot. Copying the state file to a new laptop keeps the slot.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub install_id: String,
    /// The event's schedule from the last resume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<ScheduledSession>,
}

impl LocalRegister {
    /// Everything but the seen-set (cheap to copy and compare).
    pub fn head(&self) -> LocalRegister {
        LocalRegister { badges: BTreeSet::new(), reason: self.reason.clone(), ..*self }
    }

    /// True when everything but the seen-set is equal.
    pub fn same_head(&self, other: &LocalRegister) -> bool {
        (self.seq, self.count, &self.reason, self.absolute) == (other.seq, other.count, &other.reason, other.absolute)
    }
}

impl LocalState {
    /// The state without its seen-sets: what reconciliation changes, O(sessions) to copy.
    pub fn head(&self) -> LocalState {
        LocalState {
            version: self.version,
            site: self.site.clone(),
            desk: self.desk,
            anchored: self.anchored,
            sessions: self.sessions.iter().map(|(s, r)| (*s, r.head())).collect(),
            install_id: self.install_id.clone(),
            schedule: self.schedule.clone(),
        }
    }

    /// Applies a change (the registers it names take its values and gain its badges).
    pub fn apply(&mut self, change: &Change) {
        if let Some(h) = &change.header {
            self.anchored = h.anchored;
            self.install_id.clone_from(&h.install_id);
            self.schedule.clone_from(&h.schedule);
        }
        for (session, c) in &change.registers {
            let reg = self.sessions.entry(*session).or_default();
            (reg.seq, reg.count, reg.absolute) = (c.seq, c.count, c.absolute);
            reg.reason.clone_from(&c.reason);
            reg.badges.extend(c.added.iter().cloned());
        }
    }
}

/// What one commit changed: a line of the state file. Its size is that of the change, whatever
/// the size of the seen-sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The state's own fields, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<Header>,
    /// The registers that changed, by session id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub registers: BTreeMap<u32, RegisterChange>,
}

impl Change {
    /// True when it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.header.is_none() && self.registers.is_empty()
    }
}

/// The fields of [`LocalState`] that change (besides registers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// See [`LocalState::anchored`].
    pub anchored: bool,
    /// See [`LocalState::install_id`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub install_id: String,
    /// See [`LocalState::schedule`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<ScheduledSession>,
}

impl Header {
    /// The header fields of `state`.
    pub fn of(state: &LocalState) -> Self {
        Self { anchored: state.anchored, install_id: state.install_id.clone(), schedule: state.schedule.clone() }
    }
}

/// A register's new values and the badges the commit added to its seen-set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterChange {
    /// See [`LocalRegister::seq`].
    pub seq: u64,
    /// See [`LocalRegister::count`].
    pub count: i64,
    /// See [`LocalRegister::reason`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// See [`LocalRegister::absolute`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub absolute: bool,
    /// Badges added to the seen-set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<String>,
}

impl RegisterChange {
    /// The values of `reg` with `added` badges.
    pub fn of(reg: &LocalRegister, added: Vec<String>) -> Self {
        Self { seq: reg.seq, count: reg.count, reason: reg.reason.clone(), absolute: reg.absolute, added }
    }
}

/// A state store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a valid state.
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
}

/// Where a reporter keeps its state.
pub trait StateStore: Send + Sync + 'static {
    /// The saved state, if any.
    fn load(&self) -> Result<Option<LocalState>, StoreError>;
    /// Saves the whole state durably (the first save, and snapshots); returns only once it
    /// survives a crash (for durable stores).
    fn save(&self, state: &LocalState) -> Result<(), StoreError>;
    /// Records `change` durably on top of what is saved; returns only once it survives a crash.
    /// Either all of it is recorded or, on error, none of it. Stores should make this cost the
    /// size of the change; the default loads, applies and saves the whole state.
    fn append(&self, change: &Change) -> Result<(), StoreError> {
        let mut state = self.load()?.unwrap_or_default();
        state.apply(change);
        self.save(&state)
    }
    /// True when the store would like a fresh snapshot ([`StateStore::save`]) of the state: its
    /// changes have outgrown its last snapshot.
    fn wants_snapshot(&self) -> bool {
        false
    }
    /// True if `save` and `append` block on I/O (the reporter then runs them on the blocking pool).
    fn blocking(&self) -> bool;
}

/// Keeps state in memory only (simulations, tests): lost when the process ends.
#[derive(Debug, Default)]
pub struct MemoryStore {
    // A std Mutex: held only to apply a change or clone out, never across `.await`.
    state: Mutex<Option<LocalState>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl StateStore for MemoryStore {
    fn load(&self) -> Result<Option<LocalState>, StoreError> {
        Ok(self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
    fn save(&self, state: &LocalState) -> Result<(), StoreError> {
        *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(state.clone());
        Ok(())
    }
    fn append(&self, change: &Change) -> Result<(), StoreError> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert_default().apply(change);
        Ok(())
    }
    fn blocking(&self) -> bool {
        false
    }
}
