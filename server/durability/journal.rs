//! One journal file, appended by the flusher thread only, with the rules that keep every
//! acknowledged record readable:
//!
//! - a journal gets its name only once its header is on disk (written to `journal-<gen>.tmp`,
//!   synced, linked to `journal-<gen>.log` which must not exist, directory synced), so a `.log`
//!   file with a damaged header is damage, not a crash;
//! - a group is written at the last committed offset and counts as committed only after
//!   `fdatasync` returns `Ok`;
//! - after any failed or short write, or a failed sync, the file is never written again: it is
//!   cut back to its committed length (best effort) and the group goes, whole, into a NEW journal
//!   whose header records that committed length, so recovery reads the old file only up to it.
//!   A failed sync is never retried on the same pages (Linux may have marked them clean).

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
}

impl Journal {
    /// Creates `journal-<generation>.log` with its header, durably. `prev_committed`: the
    /// committed length of journal `generation - 1` (0 if there is none).
    pub fn create(io: Arc<dyn Io>, dir: &Path, generation: u64, prev_committed: u64) -> Result<Self, StoreError> {
        let path = journal_path(dir, generation);
        let tmp = path.with_extension("tmp");
        let header = Header { generation, prev_committed }.encode(JOURNAL_MAGIC);
        let made = (|| {
            let mut file = io.create_new(&tmp).map_err(super::store::io(&tmp))?;
            file.write_all_at(&header, 0).map_err(super::store::io(&tmp))?;
            file.sync_all().map_err(super::store::io(&tmp))?;
            io.rename_new(&tmp, &path).map_err(super::store::io(&path))?;
            io.sync_dir(dir).map_err(super::store::io(dir))?;
            Ok(file)
        })();
        match made {
            Ok(file) => Ok(Self {
                io,
                dir: dir.to_path_buf(),
                path,
                file,
                generation,
                committed: HEADER_LEN as u64,
                broken: false,
            }),
            Err(e) => {
                // Nothing in a journal that never got its name was acknowledged.
                let _ = io.remove(&tmp);
                Err(e)
            }
        }
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
        crash_point("journal-before-write");
        if let Err(e) = self.file.write_all_at(buf, self.committed) {
            self.abandon();
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
