//! Durability: the aggregator's state survives `kill -9` and power loss with no external service.
//!
//! A flusher thread runs group commit: every `flush_interval` (or sooner, once `flush_records`
//! registers changed) it writes the *latest* state of each register changed since the previous
//! flush — so journal bandwidth is bounded by the number of registers, not the report rate —
//! plus queued corrections and curve samples, then fsyncs. Streams hold each ack until the flush
//! covering its batch is durable ("acked means durable"). A failed commit is kept, whole, and
//! retried with backoff (see [`journal`] for what happens to the file); nothing is published as
//! durable until it succeeds. Periodically, and on shutdown, it rotates the journal and writes a
//! snapshot (see [`snapshot`] for what it retires).
//!
//! This module knows nothing of the aggregator: the flusher reads the state through [`Source`].

pub mod failpoints;
pub mod frames;
pub mod fs;
pub mod journal;
pub mod record;
pub mod recover;
pub mod snapshot;
pub mod store;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;
use tokio::sync::watch;

use self::{
    failpoints::crash_point,
    fs::Io,
    record::Record,
    store::{DirLock, Journal, write_snapshot},
};
use super::registers::{Register, RegisterKey};

/// Channels the durable flush number is published on.
const DURABLE_SHARDS: usize = 64;

/// Settings of the data directory.
#[derive(Debug, Clone)]
pub struct DurabilityConfig {
    /// Where journals and snapshots live.
    pub dir: PathBuf,
    /// Longest time between group commits.
    pub flush_interval: Duration,
    /// Commit early once about this many registers changed.
    pub flush_records: usize,
    /// How often a snapshot is written (and the journal compacted behind it).
    pub snapshot_interval: Duration,
}

impl DurabilityConfig {
    /// Defaults for a directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            flush_interval: Duration::from_millis(2),
            flush_records: 8192,
            snapshot_interval: Duration::from_secs(60),
        }
    }
}

/// Durability state shared with the write path.
pub struct Durability {
    /// Number of the latest flush that has started collecting changes.
    started: AtomicU64,
    /// Number of the latest flush that is on disk, published on several channels so that
    /// thousands of waiting streams do not all register on one channel's waiter lists.
    durable: Box<[watch::Sender<u64>]>,
    /// Corrections and curve samples for the next flush. A std Mutex: push/swap only.
    pending: Mutex<Vec<Record>>,
    flusher: OnceLock<thread::Thread>,
    stop: AtomicBool,
    /// The flusher thread, joined on close.
    join: Mutex<Option<JoinHandle<()>>>,
    config: DurabilityConfig,
}

impl Durability {
    /// Shared state for a data directory (the flusher is started by [`start`]).
    pub fn new(config: DurabilityConfig) -> Self {
        Self {
            started: AtomicU64::new(0),
            durable: (0..DURABLE_SHARDS).map(|_| watch::Sender::new(0)).collect(),
            pending: Mutex::new(Vec::new()),
            flusher: OnceLock::new(),
            stop: AtomicBool::new(false),
            join: Mutex::new(None),
            config,
        }
    }

    /// The flush number that makes everything applied so far durable. Call after applying.
    pub fn target(&self) -> u64 {
        self.started.load(SeqCst) + 1
    }

    /// A receiver of the latest durable flush number (`shard`: any number, e.g. the site index).
    pub fn subscribe(&self, shard: usize) -> watch::Receiver<u64> {
        self.durable[shard % DURABLE_SHARDS].subscribe()
    }

    /// Queues a non-register record for the next flush. Put what it records into the state a
    /// snapshot reads (audit trail, curve) BEFORE queueing it: a snapshot taken in between must
    /// not miss it, since the journal holding it may be deleted behind that snapshot.
    pub fn push(&self, rec: Record) {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(rec);
    }

    /// The settings.
    pub fn config(&self) -> &DurabilityConfig {
        &self.config
    }

    /// Waits until everything applied before the call is durable. Errors when the journal stops
    /// (shutdown) first.
    pub async fn wait_durable(&self, shard: usize) -> Result<(), watch::error::RecvError> {
        let target = self.target();
        let mut rx = self.subscribe(shard);
        rx.wait_for(|n| *n >= target).await.map(|_| ())
    }

    /// Starts a flush: its number, once everything applied so far will be taken by it (for a
    /// committer other than the journal's, e.g. cluster mode's etcd writer).
    pub fn begin_flush(&self) -> u64 {
        self.started.fetch_add(1, SeqCst) + 1
    }

    /// Moves the queued non-register records into `out`.
    pub fn take_pending(&self, out: &mut Vec<Record>) {
        out.append(&mut self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    /// Publishes flush `n` as committed: streams waiting for it acknowledge.
    pub fn publish(&self, n: u64) {
        for tx in self.durable.iter() {
            tx.send_replace(n);
        }
    }

    /// Whether [`close`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stop.load(SeqCst)
    }

    /// Runs `body` as this state's flusher thread (woken by [`Durability::wake`], joined by
    /// [`close`]) instead of the journal's.
    pub fn spawn_committer(self: &Arc<Self>, name: &str, body: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let handle = thread::Builder::new().name(name.into()).spawn(body)?;
        let _ = self.flusher.set(handle.thread().clone());
        *self.join.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
        Ok(())
    }

    /// Asks the flusher to commit now.
    pub fn wake(&self) {
        if let Some(t) = self.flusher.get() {
            t.unpark();
        }
    }
}

/// What the flusher needs from the state it makes durable (implemented by the aggregator; the
/// durability layer does not know the aggregator).
pub trait Source: Send + Sync + 'static {
    /// Registers changed since the previous call, with their current state.
    fn take_dirty(&self) -> Vec<(RegisterKey, Register)>;
    /// Appends the framed record of a register, keyed by ids (see [`Record::encode_register`]).
    fn encode_register(&self, key: RegisterKey, reg: Register, out: &mut Vec<u8>);
    /// Everything a snapshot holds: every register, the audit trail, the curve.
    fn snapshot(&self) -> Vec<Record>;
    /// Wakes `thread` when about `records` registers changed.
    fn set_flusher(&self, thread: thread::Thread, records: usize);
}

/// What the flusher thread owns.
pub struct Flusher {
    /// Shared with the write path.
    pub durability: Arc<Durability>,
    /// The state.
    pub source: Box<dyn Source>,
    /// The files.
    pub io: Arc<dyn Io>,
    /// The open journal.
    pub journal: Journal,
    /// The directory's lock, released when the flusher ends.
    pub lock: DirLock,
}

/// Starts the flusher thread.
pub fn start(f: Flusher) -> std::io::Result<()> {
    let d = f.durability.clone();
    let handle = thread::Builder::new().name("headcount-flusher".into()).spawn(move || run(f))?;
    let _ = d.flusher.set(handle.thread().clone());
    *d.join.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
    Ok(())
}

/// Final flush and snapshot, then joins the flusher (blocking; call off the async runtime).
pub fn close(d: &Durability) {
    d.stop.store(true, SeqCst);
    d.wake();
    let handle = d.join.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(h) = handle
        && h.join().is_err()
    {
        tracing::error!("flusher thread panicked");
    }
}

/// Rounds of failed commits after which a stopping flusher gives up (sites keep what was not
/// acknowledged and resend it).
const STOP_ATTEMPTS: u32 = 3;
/// First pause between attempts while the journal cannot be written; doubles up to
/// [`RETRY_PAUSE_MAX`].
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between attempts.
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(3);

fn run(mut f: Flusher) {
    f.source.set_flusher(thread::current(), f.durability.config.flush_records);
    let d = f.durability.clone();
    // Not yet committed: the latest state per register and the queued records, kept across
    // failed attempts (bounded by the number of registers, not by the report rate).
    let mut registers: FxHashMap<RegisterKey, Register> = FxHashMap::default();
    let mut extra: Vec<Record> = Vec::new();
    let mut buf = Vec::with_capacity(1 << 20);
    let mut last_snapshot = Instant::now();
    let mut after_snapshot = false;
    let mut failures = 0u32;
    let mut window = Instant::now();
    loop {
        let stopping = d.stop.load(SeqCst);
        if !stopping {
            let pause = match failures {
                0 => d.config.flush_interval,
                n => RETRY_PAUSE.saturating_mul(1 << (n - 1).min(5)).min(RETRY_PAUSE_MAX),
            };
            thread::park_timeout(pause);
        }
        let n = d.started.fetch_add(1, SeqCst) + 1;
        registers.extend(f.source.take_dirty());
        extra.append(&mut d.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if failures > 0 {
            coalesce_curve(&mut extra);
        }
        let opened = std::mem::replace(&mut window, Instant::now());
        if !registers.is_empty() || !extra.is_empty() {
            let commit_started = Instant::now();
            buf.clear();
            for (key, reg) in &registers {
                f.source.encode_register(*key, *reg, &mut buf);
            }
            for rec in &extra {
                rec.encode(&mut buf);
            }
            if let Err(e) = commit(&mut f.journal, &buf) {
                failures += 1;
                tracing::error!(
                    error = %e, attempt = failures, records = registers.len() + extra.len(),
                    "journal write failed; nothing is acknowledged until a new journal takes the whole group"
                );
                if stopping && failures >= STOP_ATTEMPTS {
                    tracing::error!("giving up at shutdown; sites resend what was not acknowledged");
                    return;
                }
                continue;
            }
            failures = 0;
            registers.clear();
            extra.clear();
            crash_point("flush-before-ack");
            if after_snapshot {
                crash_point("commit-after-snapshot");
            }
            metrics::histogram!("headcount_journal_commit_seconds").record(commit_started.elapsed());
            metrics::histogram!("headcount_ack_wait_seconds").record(opened.elapsed());
        }
        for tx in d.durable.iter() {
            tx.send_replace(n);
        }
        if stopping || last_snapshot.elapsed() >= d.config.snapshot_interval {
            match snapshot(&mut f) {
                Ok(path) => {
                    tracing::info!(path = %path.display(), "snapshot written");
                    after_snapshot = true;
                }
                Err(e) => tracing::error!(error = %e, "snapshot failed; the journals are kept"),
            }
            last_snapshot = Instant::now();
        }
        if stopping {
            return;
        }
    }
}

/// Keeps only the newest curve sample of each bucket (recovery keeps only that one anyway), so
/// that what waits for a failing journal stays bounded by buckets, not by sweeps.
fn coalesce_curve(extra: &mut Vec<Record>) {
    let mut seen = rustc_hash::FxHashSet::default();
    let keep: Vec<bool> = extra
        .iter()
        .rev()
        .map(|r| match r {
            Record::Curve(c) => seen.insert(c.unix_ms),
            _ => true,
        })
        .collect();
    let mut keep = keep.into_iter().rev();
    extra.retain(|_| keep.next().unwrap_or(true));
}

/// Commits a group; on a broken journal first moves to a new one (the group is written whole).
fn commit(journal: &mut Journal, buf: &[u8]) -> Result<(), store::StoreError> {
    if journal.is_broken() {
        let next = journal.next()?;
        tracing::warn!(from = %journal.path().display(), to = %next.path().display(), "journal continued in a new file");
        *journal = next;
    }
    journal.commit(buf)
}

/// Rotates the journal, then writes a snapshot of everything (which covers the older journals).
fn snapshot(f: &mut Flusher) -> Result<PathBuf, store::StoreError> {
    f.journal = f.journal.next()?;
    let records = f.source.snapshot();
    write_snapshot(&*f.io, &f.durability.config.dir, f.journal.generation(), records.into_iter())
}

#[cfg(test)]
mod tests {
    use super::{coalesce_curve, record::CurveRecord};
    use crate::{proto::v1::Correction, server::durability::record::Record};

    #[test]
    fn waiting_curve_samples_keep_the_newest_of_each_bucket_and_every_other_record() {
        let curve = |unix_ms, n| Record::Curve(CurveRecord { unix_ms, sessions: vec![n], rows: vec![] });
        let correction = Record::Correction(Correction { seq: 9, ..Correction::default() });
        let mut extra = vec![curve(0, 1), correction.clone(), curve(0, 2), curve(60, 3), curve(60, 4), curve(120, 5)];
        coalesce_curve(&mut extra);
        assert_eq!(extra, vec![correction, curve(0, 2), curve(60, 4), curve(120, 5)]);
    }
}
