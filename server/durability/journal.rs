//! One journal file, appended by the flusher thread only, with the rules that keep every
//! acknowledged record readable:
//!
//! - a journal gets its name only once its header is on disk (written to `journal-<gen>.tmp`,
//!   synced, linked to `journal-<gen>.log` which must not exist, directory synced), so a `.log`
//!   file with a damaged header is damage, not a crash;
//! - a group is written at the last committed offset and counts as committed only after
//!   `fdatasync` returns `Ok`;
//! - after a failed or short write the file is cut back to its committed length and synced
//!   before anything else is written to it; if that cut fails, or after any failed sync, the
//!   file is never written again and the group goes, whole, into a NEW journal whose header
//!   records the old one's committed length, so recovery reads the old file only up to it. A
//!   failed sync is never retried on the same pages (Linux may have marked them clean).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    failpoints::crash_point,
    fs::{DurableFile, Io},
    record::{HEADER_LEN, Header},
    store::{JOURNAL_MAGIC, StoreError, io, journal_path},
};

/// An open journal.
pub struct Journal {
    io: Arc<dyn Io>,
    dir: PathBuf,
    path: PathBuf,
    file: Box<dyn DurableFile>,
    generation: u64,
    /// Bytes known to be on disk (header included).
    committed: u64,
    /// A write or sync failed: this file takes no more writes (see the module doc).
    broken: bool,
    /// The directory entry of this file is durable.
    dir_synced: bool,
}

impl Journal {
    /// Creates `journal-<generation>.log` with its header, durably. `prev_committed`: the
    /// committed length of journal `generation - 1` (0 if there is none).
    pub fn create(io: Arc<dyn Io>, dir: &Path, generation: u64, prev_committed: u64) -> Result<Self, StoreError> {
        let path = journal_path(dir, generation);
        let tmp = path.with_extension("tmp");
        let header = Header { generation, prev_committed }.encode(JOURNAL_MAGIC);
        let named = (|| {
            let mut file = io.create_new(&tmp).map_err(super::store::io(&tmp))?;
            file.write_all_at(&header, 0).map_err(super::store::io(&tmp))?;
            file.sync_all().map_err(super::store::io(&tmp))?;
            io.rename_new(&tmp, &path).map_err(super::store::io(&path))?;
            Ok(file)
        })();
        let file = match named {
            Ok(file) => file,
            Err(e) => {
                // Nothing in a journal that never got its name was acknowledged.
                let _ = io.remove(&tmp);
                return Err(e);
            }
        };
        let mut journal = Self {
            io,
            dir: dir.to_path_buf(),
            path,
            file,
            generation,
            committed: HEADER_LEN as u64,
            broken: false,
            dir_synced: false,
        };
        // Named: from now on this is the journal (its header fixes the previous one's length).
        // Its name must be durable before anything is committed in it; retried by `commit`.
        if let Err(e) = journal.sync_dir() {
            tracing::warn!(path = %journal.path.display(), error = %e, "cannot sync the data directory; retried before the next commit");
        }
        Ok(journal)
    }

    fn sync_dir(&mut self) -> Result<(), StoreError> {
        if !self.dir_synced {
            self.io.sync_dir(&self.dir).map_err(io(&self.dir))?;
            self.dir_synced = true;
        }
        Ok(())
    }

    /// Writes an encoded group at the committed offset and syncs it. `Ok`: the group is on disk.
    /// `Err`: nothing of it counts, and this journal is broken: call [`Journal::next`] and write
    /// the whole group again there.
    pub fn commit(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        if self.broken {
            return Err(StoreError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("journal closed after an earlier write or sync failure"),
            });
        }
        self.sync_dir()?;
        crash_point("journal-before-write");
        if let Err(e) = self.file.write_all_at(buf, self.committed) {
            // The pages were never reported clean: cutting them off leaves the file as it was.
            if let Err(cut) = self.file.set_len(self.committed).and_then(|()| self.file.sync_all()) {
                tracing::warn!(path = %self.path.display(), error = %cut, "cannot cut a failed write off the journal");
                self.broken = true;
            }
            return Err(io(&self.path)(e));
        }
        crash_point("journal-after-write");
        if let Err(e) = self.file.sync_data() {
            self.abandon();
            return Err(io(&self.path)(e));
        }
        crash_point("journal-after-sync");
        self.committed += buf.len() as u64;
        Ok(())
    }

    /// Marks the file broken and cuts what may have been written after the committed offset.
    fn abandon(&mut self) {
        self.broken = true;
        if let Err(e) = self.file.set_len(self.committed).and_then(|()| self.file.sync_all()) {
            // Harmless: the next journal's header says where this one's committed bytes end.
            tracing::warn!(path = %self.path.display(), error = %e, "cannot cut the failed write off the journal");
        }
    }

    /// True once a write or sync failed on this file.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Current generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes committed (header included).
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The path of this journal.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the next generation's journal, whose header records this one's committed length.
    pub fn next(&self) -> Result<Journal, StoreError> {
        Journal::create(self.io.clone(), &self.dir, self.generation + 1, self.committed)
    }
}
