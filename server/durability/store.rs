//! The data directory: one owner at a time (an exclusive lock on `<dir>/lock`), `journal-<gen>.log`
//! files appended with group commit (see [`super::journal`]), `snapshot-<gen>.snap` files (see
//! [`super::snapshot`]), and the errors that make a directory unusable, each saying what to do.
//!
//! A snapshot of generation `g` holds everything written to journals before `g`; recovery (see
//! [`super::recover`]) loads the newest snapshot and replays journals `>= g` in order.

use std::{
    fs::{self, File, OpenOptions},
    path::{Path, PathBuf},
};

pub use super::{
    journal::Journal,
    recover::{Recovered, recover},
    snapshot::write_snapshot,
};

/// Magic of a journal file.
pub(crate) const JOURNAL_MAGIC: &[u8; 8] = b"HCJOURN2";
/// Magic of a snapshot file.
pub(crate) const SNAPSHOT_MAGIC: &[u8; 8] = b"HCSNAPS2";

/// A data directory that cannot be used; every message names the file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Another process owns the directory.
    #[error(
        "the data directory {dir} is in use by another headcount-server (its lock file {dir}/lock is held). \
         Two aggregators on one directory would delete each other's journals: stop the other one first, or give \
         this one its own --data-dir"
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// A snapshot is unreadable: refusing to start rather than serve wrong totals.
    #[error(
        "snapshot {path} is corrupt ({reason}). Refusing to start. Move this file out of the data directory: the \
         aggregator then starts from the previous snapshot and the journals kept after it, which together hold the \
         same state"
    )]
    CorruptSnapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A journal that is not the last one, or a journal header, is damaged: cutting it would
    /// silently drop acknowledged reports that later journals build on.
    #[error(
        "journal {path} is damaged at byte {offset} ({reason}) and it is not a torn tail that a crash can leave. \
         Refusing to start rather than drop acknowledged reports. Restore the file from a backup if you have one; \
         otherwise move it and every later journal-*.log out of the data directory (sites whose agents still run \
         resend what they hold when they reconnect)"
    )]
    DamagedJournal {
        /// The file.
        path: PathBuf,
        /// Where the damage starts, bytes from the start of the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A journal generation that recovery needs is not there.
    #[error(
        "{dir} has no journal-{generation:010}.log, which the state after {after} needs. Refusing to start rather \
         than serve totals with a hole. Put the file back, or move the later journals out of the directory"
    )]
    MissingJournal {
        /// The directory.
        dir: PathBuf,
        /// The missing generation.
        generation: u64,
        /// What precedes it (a snapshot or journal file name).
        after: String,
    },
    /// A file of an earlier data format.
    #[error(
        "{path} was written by an earlier headcount-server (data format 1); this build reads format 2. Finish the \
         event with the version that wrote it, or start this one with an empty --data-dir (every site resends its \
         state)"
    )]
    OldFormat {
        /// The file.
        path: PathBuf,
    },
    /// A record of a kind this build does not know.
    #[error(
        "{path} holds a record of kind {tag} that this build does not know (written by a newer headcount-server?). \
         Run the newer version on this data directory"
    )]
    UnknownRecord {
        /// The file.
        path: PathBuf,
        /// The record tag.
        tag: u8,
    },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// The exclusive ownership of a data directory, held until dropped (or the process dies: the
/// kernel releases the lock, so a crash never leaves a stale lock behind).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Creates `dir` if needed and takes its lock; fails at once if another process holds it.
pub fn lock(dir: &Path) -> Result<DirLock, StoreError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join("lock");
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock { _file: file }),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked { dir: dir.to_path_buf() }),
        Err(fs::TryLockError::Error(e)) => Err(StoreError::Io { path, source: e }),
    }
}

fn generation_of(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok()
}

/// `(generation, path)` of files of one kind, ascending.
pub type Generations = Vec<(u64, PathBuf)>;

/// Journals and snapshots of the directory, and the leftover temporary files of interrupted
/// creations (never renamed, so never acknowledged or trusted).
pub(crate) fn list(dir: &Path) -> Result<(Generations, Generations, Vec<PathBuf>), StoreError> {
    let mut journals = Vec::new();
    let mut snapshots = Vec::new();
    let mut temporary = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(g) = generation_of(&name, "journal-", ".log") {
            journals.push((g, entry.path()));
        } else if let Some(g) = generation_of(&name, "snapshot-", ".snap") {
            snapshots.push((g, entry.path()));
        } else if (name.starts_with("journal-") || name.starts_with("snapshot-")) && name.ends_with(".tmp") {
            temporary.push(entry.path());
        }
    }
    journals.sort();
    snapshots.sort();
    Ok((journals, snapshots, temporary))
}

/// Path of a journal.
pub(crate) fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("journal-{generation:010}.log"))
}

/// Path of a snapshot.
pub(crate) fn snapshot_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("snapshot-{generation:010}.snap"))
}

/// Refuses a file of the earlier data format by name (its magic ends in `1`).
pub(crate) fn check_format(path: &Path) -> Result<(), StoreError> {
    let mut magic = [0u8; 8];
    let n = std::io::Read::read(&mut File::open(path).map_err(io(path))?, &mut magic).map_err(io(path))?;
    if n == 8 && (&magic == b"HCJOURN1" || &magic == b"HCSNAPS1") {
        return Err(StoreError::OldFormat { path: path.to_path_buf() });
    }
    Ok(())
}
