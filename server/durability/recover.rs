//! Recovery: load the newest snapshot, replay the journals after it in order, and refuse to
//! start on anything that is damage rather than a crash's torn tail:
//!
//! - a corrupt snapshot (move it aside: the previous generation is kept, see
//!   [`super::snapshot`]);
//! - a damaged journal header, or a journal missing from the sequence;
//! - damage inside a journal that is not the last one: it is read up to the committed length the
//!   next journal's header records, and must be whole up to there (bytes after it were never
//!   acknowledged and are ignored);
//! - a record of a kind this build does not know.
//!
//! Only the tail of the LAST journal may be torn (a crash mid-write); it is cut with a warning.

use std::{
    collections::HashSet,
    fs::{File, OpenOptions},
    io::BufReader,
    path::{Path, PathBuf},
};

use rustc_hash::FxHashMap;

use super::{
    frames::Reader,
    record::{CurveRecord, HEADER_LEN, Header, InstallRecord, Record, Stop},
    store::{JOURNAL_MAGIC, SNAPSHOT_MAGIC, StoreError, check_format, io, list},
};
use crate::{proto::v1::Correction, server::registers::Register};

/// A register as stored: site id, desk number, session id.
pub type IdKey = (String, u32, u32);

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Latest state per register.
    pub registers: FxHashMap<IdKey, Register>,
    /// Audit trail, oldest first, without duplicates.
    pub corrections: Vec<Correction>,
    /// Curve samples, oldest first.
    pub curve: Vec<CurveRecord>,
    /// Agent install slot claims, in the order they were made.
    pub installs: Vec<InstallRecord>,
    /// Generation to continue with (a new journal is started at it).
    pub next_generation: u64,
    /// Committed length of journal `next_generation - 1` (0 if none): the new journal's header.
    pub last_committed: u64,
    /// Records replayed from journals.
    pub journal_records: u64,
    /// Bytes cut from the last journal's torn tail.
    pub bytes_dropped: u64,
    /// The snapshot loaded, if any.
    pub snapshot: Option<PathBuf>,
}

impl Recovered {
    fn apply(&mut self, rec: Record, seen: &mut HashSet<(String, u32, u32, u64)>) {
        match rec {
            Record::Register(r) => {
                let reg = self.registers.entry((r.site, r.desk, r.session)).or_default();
                if r.seq > reg.seq {
                    *reg = Register { seq: r.seq, count: r.count };
                }
            }
            Record::Correction(c) => {
                if seen.insert((c.site_id.clone(), c.desk, c.session, c.seq)) {
                    self.corrections.push(c);
                }
            }
            Record::Curve(c) => match self.curve.last_mut() {
                Some(last) if last.unix_ms == c.unix_ms => *last = c,
                Some(last) if last.unix_ms > c.unix_ms => {}
                _ => self.curve.push(c),
            },
            Record::Install(i) => self.installs.push(i),
            Record::End { .. } => {}
        }
    }
}

fn name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// Loads the newest snapshot and replays the journals after it (see the module doc). Call with
/// the directory's lock held: leftover temporary files of interrupted creations are deleted.
pub fn recover(dir: &Path) -> Result<Recovered, StoreError> {
    let (journals, snapshots, temporary) = list(dir)?;
    for t in temporary {
        tracing::info!(path = %t.display(), "deleting an unfinished file of an interrupted run");
        std::fs::remove_file(&t).map_err(io(&t))?;
    }
    let mut out = Recovered::default();
    let mut seen = HashSet::new();
    let mut base = 0;
    let mut after = "the start".to_owned();
    for (_, path) in snapshots.last().into_iter().chain(&journals) {
        check_format(path)?;
    }
    if let Some((g, path)) = snapshots.last() {
        load_snapshot(path, &mut out, &mut seen)?;
        base = *g;
        after = name(path);
        out.snapshot = Some(path.clone());
    }
    let replay: Vec<&(u64, PathBuf)> = journals.iter().filter(|(g, _)| *g >= base).collect();
    for (expect, (g, path)) in (base.max(1)..).zip(replay.iter()) {
        if *g != expect {
            return Err(StoreError::MissingJournal { dir: dir.to_path_buf(), generation: expect, after });
        }
        after = name(path);
    }
    if base > 0 && replay.is_empty() {
        return Err(StoreError::MissingJournal { dir: dir.to_path_buf(), generation: base, after });
    }
    let mut headers = Vec::with_capacity(replay.len());
    for (g, path) in &replay {
        let mut f = File::open(path).map_err(io(path))?;
        let damaged = |reason: String| StoreError::DamagedJournal { path: path.clone(), offset: 0, reason };
        let h = Header::read(&mut f, JOURNAL_MAGIC).map_err(|why| damaged(format!("header: {why}")))?;
        if h.generation != *g {
            return Err(damaged(format!("header says generation {}, the name says {g}", h.generation)));
        }
        headers.push(h);
    }
    for (i, (_, path)) in replay.iter().enumerate() {
        let limit = headers.get(i + 1).map(|h| h.prev_committed);
        out.last_committed = replay_journal(path, limit, &mut out, &mut seen)?;
    }
    out.next_generation = replay.last().map_or(base.max(1), |(g, _)| g + 1);
    Ok(out)
}

fn load_snapshot(
    path: &Path,
    out: &mut Recovered,
    seen: &mut HashSet<(String, u32, u32, u64)>,
) -> Result<(), StoreError> {
    let corrupt = |reason: String| StoreError::CorruptSnapshot { path: path.to_path_buf(), reason };
    let f = File::open(path).map_err(io(path))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    Header::read(&mut r, SNAPSHOT_MAGIC).map_err(corrupt)?;
    let mut reader = Reader::new(r);
    let mut n = 0u64;
    loop {
        match reader.next_record() {
            Ok(Record::End { records }) if records == n => break,
            Ok(Record::End { records }) => return Err(corrupt(format!("trailer says {records} records, found {n}"))),
            Ok(rec) => {
                out.apply(rec, seen);
                n += 1;
            }
            Err(Stop::End) => return Err(corrupt("no trailer (incomplete)".into())),
            Err(Stop::Bad(why)) => return Err(corrupt(why)),
            Err(Stop::UnknownTag(tag)) => return Err(StoreError::UnknownRecord { path: path.to_path_buf(), tag }),
        }
    }
    tracing::info!(path = %path.display(), records = n, "snapshot loaded");
    Ok(())
}

/// Replays one journal: up to `limit` bytes (a middle journal, which must be whole up to there)
/// or to its end (the last one, whose torn tail is cut). Returns its committed length.
fn replay_journal(
    path: &Path,
    limit: Option<u64>,
    out: &mut Recovered,
    seen: &mut HashSet<(String, u32, u32, u64)>,
) -> Result<u64, StoreError> {
    let f = OpenOptions::new().read(true).write(limit.is_none()).open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    Header::read(&mut r, JOURNAL_MAGIC).map_err(|why| StoreError::DamagedJournal {
        path: path.to_path_buf(),
        offset: 0,
        reason: why,
    })?;
    let mut reader = Reader::new(r);
    let at = |reader: &Reader<_>| HEADER_LEN as u64 + reader.good_bytes;
    let stop = loop {
        if limit.is_some_and(|l| at(&reader) >= l) {
            break Stop::End;
        }
        match reader.next_record() {
            Ok(rec) => {
                out.apply(rec, seen);
                out.journal_records += 1;
            }
            Err(stop) => break stop,
        }
    };
    let good = at(&reader);
    let damaged = |reason: String| StoreError::DamagedJournal { path: path.to_path_buf(), offset: good, reason };
    match (stop, limit) {
        (Stop::UnknownTag(tag), _) => Err(StoreError::UnknownRecord { path: path.to_path_buf(), tag }),
        (Stop::Bad(why), Some(l)) => Err(damaged(format!("{why}; the next journal says {l} bytes were committed"))),
        (Stop::End, Some(l)) if good != l => {
            Err(damaged(format!("{good} bytes readable, the next journal says {l} were committed")))
        }
        (Stop::End, Some(l)) => {
            if len > l {
                tracing::info!(
                    path = %path.display(), committed = l, ignored_bytes = len - l,
                    "ignoring bytes after the committed end (a write that failed and was redone in the next journal)"
                );
            }
            Ok(l)
        }
        (Stop::End, None) => Ok(good),
        (Stop::Bad(why), None) => {
            let dropped = len - good;
            tracing::warn!(
                path = %path.display(), reason = %why, kept_bytes = good, dropped_bytes = dropped,
                "the last journal's tail is torn (a crash mid-write); cut at the last whole record"
            );
            out.bytes_dropped += dropped;
            let f = reader.into_inner().into_inner();
            f.set_len(good).map_err(io(path))?;
            f.sync_all().map_err(io(path))?;
            Ok(good)
        }
    }
}
