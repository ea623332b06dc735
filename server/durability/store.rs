//! The data directory: `journal-<gen>.log` files (appended with group commit) and
//! `snapshot-<gen>.snap` files (written to a temporary file, fsynced, renamed, directory fsynced).
//! A snapshot of generation `g` holds everything written to journals before `g`; recovery loads
//! the newest snapshot and replays journals `>= g` in order.

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    io::{BufReader, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use rustc_hash::FxHashMap;

use super::record::{HEADER_LEN, Header, Reader, Record, Stop, write_durable};
use crate::{
    proto::v1::Correction,
    server::{curve::Sample, registers::Register},
};

const JOURNAL_MAGIC: &[u8; 8] = b"HCJOURN1";
const SNAPSHOT_MAGIC: &[u8; 8] = b"HCSNAPS1";

/// A data directory that cannot be used.
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
    /// A snapshot is unreadable: refusing to start rather than serve wrong totals.
    #[error(
        "snapshot {path} is corrupt ({reason}). Refusing to start. Move it out of the data directory to start from the \
         older snapshot and journals that remain (sites then resend what is missing), or start with an empty \
         --data-dir and let every site resend its state."
    )]
    CorruptSnapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The directory was written for another registry.
    #[error(
        "{path} was written for a different registry (sites, desks or sessions changed). Start with the original \
         registry files, or with an empty --data-dir"
    )]
    RegistryChanged {
        /// The file.
        path: PathBuf,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Latest state per packed register key.
    pub registers: FxHashMap<u64, Register>,
    /// Audit trail, oldest first, without duplicates.
    pub corrections: Vec<Correction>,
    /// Curve samples, oldest first.
    pub curve: Vec<Sample>,
    /// Agent install slots: (site index, install).
    pub installs: Vec<(u32, crate::server::installs::Install)>,
    /// Generation to continue with (a new journal is started at it).
    pub next_generation: u64,
    /// Records replayed from journals.
    pub journal_records: u64,
    /// Bytes cut from torn or corrupt journal tails.
    pub bytes_dropped: u64,
    /// The snapshot loaded, if any.
    pub snapshot: Option<PathBuf>,
}

impl Recovered {
    fn apply(&mut self, rec: Record, seen: &mut HashSet<(String, u32, u32, u64)>) {
        match rec {
            Record::Register { key, seq, count } => {
                let r = self.registers.entry(key).or_default();
                if seq > r.seq {
                    *r = Register { seq, count };
                }
            }
            Record::Correction(c) => {
                if seen.insert((c.site_id.clone(), c.desk, c.session, c.seq)) {
                    self.corrections.push(c);
                }
            }
            Record::Curve { unix_ms, counts } => match self.curve.last_mut() {
                Some(last) if last.unix_ms == unix_ms => last.counts = counts.into(),
                Some(last) if last.unix_ms > unix_ms => {}
                _ => self.curve.push(Sample { unix_ms, counts: counts.into() }),
            },
            Record::Install { site, slot, desk, id } => {
                self.installs.push((site, crate::server::installs::Install { id, desk, slot }));
            }
            Record::End { .. } => {}
        }
    }
}

fn generation_of(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok()
}

/// `(generation, path)` of files of one kind, ascending.
type Generations = Vec<(u64, PathBuf)>;

/// Journals and snapshots of the directory.
fn list(dir: &Path) -> Result<(Generations, Generations), StoreError> {
    let mut journals = Vec::new();
    let mut snapshots = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(g) = generation_of(&name, "journal-", ".log") {
            journals.push((g, entry.path()));
        } else if let Some(g) = generation_of(&name, "snapshot-", ".snap") {
            snapshots.push((g, entry.path()));
        } else if name.ends_with(".tmp") {
            // A snapshot interrupted by a crash: never renamed, so never trusted.
            let _ = fs::remove_file(entry.path());
        }
    }
    journals.sort();
    snapshots.sort();
    Ok((journals, snapshots))
}

/// Loads the newest snapshot and replays the journals after it; cuts torn journal tails.
pub fn recover(dir: &Path, fingerprint: [u8; 32]) -> Result<Recovered, StoreError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let (journals, snapshots) = list(dir)?;
    let mut out = Recovered::default();
    let mut seen = HashSet::new();
    let mut base = 0;
    if let Some((g, path)) = snapshots.last() {
        let corrupt = |reason: String| StoreError::CorruptSnapshot { path: path.clone(), reason };
        let f = File::open(path).map_err(io(path))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        let header = Header::read(&mut r, SNAPSHOT_MAGIC).map_err(corrupt)?;
        if header.fingerprint != fingerprint {
            return Err(StoreError::RegistryChanged { path: path.clone() });
        }
        let mut reader = Reader::new(r);
        let mut n = 0u64;
        loop {
            match reader.next_record() {
                Ok(Record::End { records }) if records == n => break,
                Ok(Record::End { records }) => {
                    return Err(corrupt(format!("trailer says {records} records, found {n}")));
                }
                Ok(rec) => {
                    out.apply(rec, &mut seen);
                    n += 1;
                }
                Err(Stop::End) => return Err(corrupt("no trailer (incomplete)".into())),
                Err(Stop::Bad(why)) => return Err(corrupt(why)),
            }
        }
        base = *g;
        out.snapshot = Some(path.clone());
        tracing::info!(path = %path.display(), records = n, "snapshot loaded");
    }
    let mut last = base;
    for (g, path) in journals.iter().filter(|(g, _)| *g >= base) {
        last = last.max(*g);
        let f = OpenOptions::new().read(true).write(true).open(path).map_err(io(path))?;
        let len = f.metadata().map_err(io(path))?.len();
        let mut r = BufReader::with_capacity(1 << 20, f);
        let header = match Header::read(&mut r, JOURNAL_MAGIC) {
            Ok(h) => h,
            Err(why) => {
                // A journal whose header never reached the disk holds nothing acknowledged.
                tracing::warn!(path = %path.display(), reason = %why, bytes = len, "unreadable journal header; ignoring the file");
                out.bytes_dropped += len;
                let _ = fs::remove_file(path);
                continue;
            }
        };
        if header.fingerprint != fingerprint {
            return Err(StoreError::RegistryChanged { path: path.clone() });
        }
        let mut reader = Reader::new(r);
        let stop = loop {
            match reader.next_record() {
                Ok(rec) => {
                    out.apply(rec, &mut seen);
                    out.journal_records += 1;
                }
                Err(stop) => break stop,
            }
        };
        let good = HEADER_LEN as u64 + reader.good_bytes;
        if let Stop::Bad(why) = stop {
            let dropped = len - good;
            tracing::warn!(
                path = %path.display(), reason = %why, kept_bytes = good, dropped_bytes = dropped,
                "journal tail is torn or corrupt; cut at the last good record"
            );
            out.bytes_dropped += dropped;
            let f = reader.into_inner().into_inner();
            f.set_len(good).map_err(io(path))?;
            f.sync_all().map_err(io(path))?;
        }
    }
    out.next_generation = last + 1;
    Ok(out)
}

/// An open journal, appended by the flusher thread only.
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    generation: u64,
    fingerprint: [u8; 32],
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl Journal {
    /// Creates `journal-<generation>.log` with its header, durably.
    pub fn create(dir: &Path, generation: u64, fingerprint: [u8; 32]) -> Result<Self, StoreError> {
        let path = dir.join(format!("journal-{generation:010}.log"));
        let mut file = OpenOptions::new().create(true).write(true).truncate(true).open(&path).map_err(io(&path))?;
        file.write_all(&Header { generation, fingerprint }.encode(JOURNAL_MAGIC)).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))?;
        sync_dir(dir)?;
        file.seek(SeekFrom::End(0)).map_err(io(&path))?;
        Ok(Self { dir: dir.to_path_buf(), path, file, generation, fingerprint })
    }

    /// Appends encoded records and makes them durable.
    pub fn append(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        write_durable(&mut self.file, buf).map_err(io(&self.path))
    }

    /// Current generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Starts the next generation's journal; returns the new journal.
    pub fn rotate(&self) -> Result<Journal, StoreError> {
        Journal::create(&self.dir, self.generation + 1, self.fingerprint)
    }
}

/// Writes `snapshot-<generation>.snap` atomically from `records`, then deletes journals and
/// snapshots it makes obsolete (generations below it).
pub fn write_snapshot(
    dir: &Path,
    generation: u64,
    fingerprint: [u8; 32],
    records: impl Iterator<Item = Record>,
) -> Result<PathBuf, StoreError> {
    let path = dir.join(format!("snapshot-{generation:010}.snap"));
    let tmp = dir.join(format!("snapshot-{generation:010}.tmp"));
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&tmp).map_err(io(&tmp))?;
    let mut buf = Header { generation, fingerprint }.encode(SNAPSHOT_MAGIC);
    let mut n = 0u64;
    for rec in records {
        rec.encode(&mut buf);
        n += 1;
        if buf.len() >= 1 << 20 {
            f.write_all(&buf).map_err(io(&tmp))?;
            buf.clear();
        }
    }
    Record::End { records: n }.encode(&mut buf);
    f.write_all(&buf).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)?;
    let (journals, snapshots) = list(dir)?;
    for (g, p) in journals.into_iter().chain(snapshots) {
        if g < generation {
            let _ = fs::remove_file(p);
        }
    }
    Ok(path)
}
