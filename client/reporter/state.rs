//! A reporter's local state — its registers per session — and where it is kept. The file store
//! writes atomically (temporary file, fsync, rename, fsync of the directory), so a crash leaves
//! either the old or the new state, never a torn one.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

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
    /// Saves durably; returns only once the state survives a crash (for durable stores).
    fn save(&self, state: &LocalState) -> Result<(), StoreError>;
    /// True if `save` blocks on I/O (the reporter then runs it on the blocking pool).
    fn blocking(&self) -> bool;
}

/// Keeps state in memory only (simulations, tests): lost when the process ends.
#[derive(Debug, Default)]
pub struct MemoryStore {
    // A std Mutex: held only to clone in or out, never across `.await`.
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
    fn blocking(&self) -> bool {
        false
    }
}

/// Keeps state in a JSON file, replaced atomically on every save.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// A store at `path` (created on first save; see [`FileStore::prepare`] for its directory).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Creates the file's directory if missing and checks that a file can be written there, so
    /// that a wrong `--state-file` is refused at start, not at the first check-in.
    pub fn prepare(&self) -> Result<(), StoreError> {
        let dir = self.dir();
        std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        tempfile::NamedTempFile::new_in(dir).map(drop).map_err(|e| self.io(e))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io { path: self.path.clone(), source }
    }

    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Result<Option<LocalState>, StoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path: self.path.clone(), source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    fn save(&self, state: &LocalState) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| self.io(std::io::Error::other(e)))?;
        let dir = self.dir();
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| self.io(e))?;
        tmp.write_all(&bytes).map_err(|e| self.io(e))?;
        tmp.as_file().sync_all().map_err(|e| self.io(e))?;
        tmp.persist(&self.path).map_err(|e| self.io(e.error))?;
        sync_dir(dir).map_err(|e| self.io(e))
    }

    fn blocking(&self) -> bool {
        true
    }
}

/// Makes a rename in `dir` durable. On Unix the directory itself is fsynced. Windows cannot open
/// a directory as a file (`File::open(dir)` fails there, which would refuse every check-in) and
/// has no directory fsync: NTFS journals the rename's metadata, and the file's own data was
/// flushed (`sync_all`) before the rename.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

/// See the Unix version: nothing to do where directories cannot be opened as files.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}
