//! The state file: a snapshot of the whole state followed by one JSON line per change, so that a
//! save costs the size of the change (a few badges), not of the seen-set.
//!
//! Layout: the snapshot (pretty JSON of [`LocalState`], written atomically: temporary file,
//! fsync, rename, fsync of the directory), then [`Change`]s, one compact JSON object per line,
//! each appended and fsynced (`fdatasync`) before the caller hears it is saved. Loading applies
//! the lines to the snapshot in order. A crash while appending can leave a torn last line: it was
//! never reported as saved, so it is ignored and cut off before the next append. Once the lines
//! outgrow the snapshot (and 64 KiB), [`StateStore::wants_snapshot`] asks the reporter for a
//! new snapshot, which replaces the file atomically: the work per badge stays constant.

use std::{
    fs::{File, OpenOptions},
    io::{Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

use super::state::{Change, LocalState, StateStore, StoreError};

/// Lines of changes below this size never ask for a snapshot, bytes.
const MIN_SNAPSHOT_LOG: u64 = 64 * 1024;

/// Keeps state in one file: a snapshot and the changes since (see the module doc).
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    // A std Mutex: held only during a (blocking) save or append, never across `.await`; the
    // reporter makes one call at a time anyway.
    log: Mutex<Log>,
}

/// Where the file's valid content ends.
#[derive(Debug, Default)]
struct Log {
    /// Open for appending (dropped when a snapshot replaces the file).
    file: Option<File>,
    /// `good` and `snapshot` are known (after a load or a save).
    known: bool,
    /// End of the last complete change, bytes.
    good: u64,
    /// End of the snapshot, bytes.
    snapshot: u64,
    /// Bytes past `good` may exist (a torn line, a failed append): cut them before appending.
    dirty: bool,
}

impl FileStore {
    /// A store at `path` (created on first save; see [`FileStore::prepare`] for its directory).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), log: Mutex::default() }
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

    fn corrupt(&self, source: serde_json::Error) -> StoreError {
        StoreError::Corrupt { path: self.path.clone(), source }
    }

    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Parses the file: the state, where the snapshot ends, where the last complete change ends,
    /// and whether a torn line follows.
    fn parse(&self, bytes: &[u8]) -> Result<(LocalState, u64, u64, bool), StoreError> {
        let mut values = serde_json::Deserializer::from_slice(bytes).into_iter::<serde_json::Value>();
        let first = match values.next() {
            Some(v) => v.map_err(|e| self.corrupt(e))?,
            None => return Err(self.corrupt(serde_json::Error::io(std::io::Error::other("empty state file")))),
        };
        let mut state: LocalState = serde_json::from_value(first).map_err(|e| self.corrupt(e))?;
        let snapshot = values.byte_offset() as u64;
        let mut good = snapshot;
        loop {
            let change = match values.next() {
                None => return Ok((state, snapshot, good, false)),
                Some(Ok(v)) => v,
                // A torn last line: nothing complete follows the last good change.
                Some(Err(e)) if e.is_eof() || !bytes[good as usize..].trim_ascii().contains(&b'\n') => {
                    return Ok((state, snapshot, good, true));
                }
                Some(Err(e)) => return Err(self.corrupt(e)),
            };
            let change: Change = serde_json::from_value(change).map_err(|e| self.corrupt(e))?;
            state.apply(&change);
            good = values.byte_offset() as u64;
        }
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Result<Option<LocalState>, StoreError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let (state, snapshot, good, torn) = self.parse(&bytes)?;
        if torn {
            tracing::warn!(file = %self.path.display(), "state file ends with a torn line (a crash while saving); ignoring it");
        }
        // Without a torn line only whitespace follows `good`.
        let good = if torn { good } else { bytes.len() as u64 };
        *self.lock() = Log { file: None, known: true, good, snapshot, dirty: torn };
        Ok(Some(state))
    }

    fn save(&self, state: &LocalState) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec_pretty(state).map_err(|e| self.io(std::io::Error::other(e)))?;
        bytes.push(b'\n');
        let mut log = self.lock();
        let dir = self.dir();
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| self.io(e))?;
        tmp.write_all(&bytes).map_err(|e| self.io(e))?;
        tmp.as_file().sync_all().map_err(|e| self.io(e))?;
        // From here the old file may be replaced: forget its handle and length whatever happens.
        *log = Log::default();
        tmp.persist(&self.path).map_err(|e| self.io(e.error))?;
        sync_dir(dir).map_err(|e| self.io(e))?;
        let len = bytes.len() as u64;
        *log = Log { file: None, known: true, good: len, snapshot: len, dirty: false };
        Ok(())
    }

    fn append(&self, change: &Change) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(change).map_err(|e| self.io(std::io::Error::other(e)))?;
        line.push(b'\n');
        if !self.lock().known {
            // Where the valid content ends is not known yet: read it.
            if self.load()?.is_none() {
                return Err(self.io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the state file is missing (deleted while the agent runs?); restart the agent",
                )));
            }
        }
        let mut log = self.lock();
        if log.file.is_none() {
            log.file = Some(OpenOptions::new().write(true).open(&self.path).map_err(|e| self.io(e))?);
        }
        let (good, dirty) = (log.good, log.dirty);
        let result = log.file.as_mut().map_or(Ok(()), |f| {
            if dirty {
                f.set_len(good)?;
            }
            f.seek(SeekFrom::Start(good))?;
            f.write_all(&line)?;
            f.sync_data()
        });
        match result {
            Ok(()) => {
                log.good += line.len() as u64;
                log.dirty = false;
                Ok(())
            }
            Err(e) => {
                // Part of the line may be in the file: cut it before the next append.
                log.dirty = true;
                Err(self.io(e))
            }
        }
    }

    fn wants_snapshot(&self) -> bool {
        let log = self.lock();
        log.known && log.good - log.snapshot > log.snapshot.max(MIN_SNAPSHOT_LOG)
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
