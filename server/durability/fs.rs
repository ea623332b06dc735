//! The file operations the journal and snapshots use, behind a small trait so that tests can
//! inject a failure (no space, I/O error, short write) at every step; [`RealIo`] is the one used
//! in production.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::Path,
};

/// A file opened for writing by the journal or a snapshot.
pub trait DurableFile: Send {
    /// Writes all of `buf` at byte `offset`. On error some prefix of `buf` may have been written.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: the data written so far is on disk when this returns `Ok`.
    fn sync_data(&mut self) -> io::Result<()>;
    /// `fsync`: data and metadata (length) are on disk when this returns `Ok`.
    fn sync_all(&mut self) -> io::Result<()>;
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// Directory-level operations.
pub trait Io: Send + Sync + 'static {
    /// Creates a new file; fails with `AlreadyExists` if `path` exists.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DurableFile>>;
    /// Renames `from` to `to`; fails with `AlreadyExists` if `to` exists (never replaces).
    fn rename_new(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// `fsync` on a directory, so that creations, renames and removals in it are durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The operating system's files.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealIo;

struct RealFile(File);

impl DurableFile for RealFile {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.0, buf, offset)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Io for RealIo {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DurableFile>> {
        Ok(Box::new(RealFile(OpenOptions::new().write(true).create_new(true).open(path)?)))
    }
    fn rename_new(&self, from: &Path, to: &Path) -> io::Result<()> {
        // A hard link fails if `to` exists, unlike rename(2): a name is never replaced.
        match std::fs::hard_link(from, to) {
            Ok(()) => std::fs::remove_file(from),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
            // A filesystem without hard links: check, then rename (the directory's lock keeps
            // any other writer out between the two).
            Err(_) if to.try_exists()? => Err(io::Error::new(io::ErrorKind::AlreadyExists, "target exists")),
            Err(_) => std::fs::rename(from, to),
        }
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}
