//! Durability: the aggregator's state survives `kill -9` and power loss with no external service.
//!
//! A flusher thread runs group commit: every `flush_interval` (or sooner, once `flush_records`
//! registers changed) it writes the *latest* state of each register changed since the previous
//! flush — so journal bandwidth is bounded by the number of registers, not the report rate —
//! plus queued corrections and curve samples, then fsyncs. Streams hold each ack until the flush
//! covering its batch is durable ("acked means durable"). Periodically, and on shutdown, it
//! rotates the journal and writes a snapshot, which retires older journals.

pub mod record;
pub mod store;

use std::{
    path::PathBuf,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use self::{
    record::Record,
    store::{Journal, write_snapshot},
};
use super::{aggregator::Aggregator, registry::Registry};

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
    fingerprint: [u8; 32],
}

impl Durability {
    pub(crate) fn new(config: DurabilityConfig, fingerprint: [u8; 32]) -> Self {
        Self {
            started: AtomicU64::new(0),
            durable: (0..DURABLE_SHARDS).map(|_| watch::Sender::new(0)).collect(),
            pending: Mutex::new(Vec::new()),
            flusher: OnceLock::new(),
            stop: AtomicBool::new(false),
            join: Mutex::new(None),
            config,
            fingerprint,
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

    /// Queues a non-register record for the next flush.
    pub fn push(&self, rec: Record) {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(rec);
    }

    /// Asks the flusher to commit now.
    pub fn wake(&self) {
        if let Some(t) = self.flusher.get() {
            t.unpark();
        }
    }
}

/// SHA-256 of the registry's shape (site ids, desks, session ids): stored state is only valid
/// for the registry it was written with.
pub fn fingerprint(registry: &Registry) -> [u8; 32] {
    let mut h = Sha256::new();
    for s in &registry.sites {
        h.update(s.id.as_bytes());
        h.update([0]);
        h.update(s.desks.to_le_bytes());
    }
    for s in &registry.sessions {
        h.update(s.id.to_le_bytes());
    }
    h.finalize().into()
}

/// Starts the flusher thread for an aggregator opened with durability.
pub(crate) fn start(agg: &Aggregator, journal: Journal) -> std::io::Result<()> {
    let Some(d) = agg.shared().durability.as_ref() else { return Ok(()) };
    let a = agg.clone();
    let handle = thread::Builder::new().name("headcount-flusher".into()).spawn(move || run(a, journal))?;
    let _ = d.flusher.set(handle.thread().clone());
    agg.shared().registers.set_flusher(handle.thread().clone(), d.config.flush_records);
    *d.join.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
    Ok(())
}

/// Final flush and snapshot, then joins the flusher (blocking; call off the async runtime).
pub(crate) fn close(agg: &Aggregator) {
    let Some(d) = agg.shared().durability.as_ref() else { return };
    d.stop.store(true, SeqCst);
    d.wake();
    let handle = d.join.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(h) = handle
        && h.join().is_err()
    {
        tracing::error!("flusher thread panicked");
    }
}

fn run(agg: Aggregator, mut journal: Journal) {
    let Some(d) = agg.shared().durability.as_ref() else { return };
    let mut buf = Vec::with_capacity(1 << 20);
    let mut last_snapshot = Instant::now();
    let mut window = Instant::now();
    loop {
        let stopping = d.stop.load(SeqCst);
        if !stopping {
            thread::park_timeout(d.config.flush_interval);
        }
        let n = d.started.fetch_add(1, SeqCst) + 1;
        let dirty = agg.shared().registers.take_dirty();
        let opened = std::mem::replace(&mut window, Instant::now());
        let extra = std::mem::take(&mut *d.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if !dirty.is_empty() || !extra.is_empty() {
            let commit = Instant::now();
            buf.clear();
            for (key, reg) in &dirty {
                Record::Register { key: key.packed(), seq: reg.seq, count: reg.count }.encode(&mut buf);
            }
            for rec in &extra {
                rec.encode(&mut buf);
            }
            // Until the write succeeds nothing is acknowledged; sites keep their state and resend.
            let mut attempt = 0u32;
            while let Err(e) = journal.append(&buf) {
                attempt += 1;
                tracing::error!(error = %e, attempt, "journal write failed; acks are held until it succeeds");
                if d.stop.load(SeqCst) && attempt > 3 {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
            metrics::histogram!("headcount_journal_commit_seconds").record(commit.elapsed());
            metrics::histogram!("headcount_ack_wait_seconds").record(opened.elapsed());
        }
        for tx in d.durable.iter() {
            tx.send_replace(n);
        }
        if stopping || last_snapshot.elapsed() >= d.config.snapshot_interval {
            match snapshot(&agg, &mut journal) {
                Ok(path) => tracing::info!(path = %path.display(), "snapshot written"),
                Err(e) => tracing::error!(error = %e, "snapshot failed; journal kept"),
            }
            last_snapshot = Instant::now();
        }
        if stopping {
            return;
        }
    }
}

/// Rotates the journal, then writes a snapshot of everything (which covers the old journals).
fn snapshot(agg: &Aggregator, journal: &mut Journal) -> Result<PathBuf, store::StoreError> {
    let Some(d) = agg.shared().durability.as_ref() else { return Ok(PathBuf::new()) };
    *journal = journal.rotate()?;
    let s = agg.shared();
    let registers = s.registers.snapshot();
    let corrections = s.audit.all();
    let curve = s.curve.all();
    let records = registers
        .into_iter()
        .map(|(k, r)| Record::Register { key: k.packed(), seq: r.seq, count: r.count })
        .chain(corrections.into_iter().map(Record::Correction))
        .chain(curve.into_iter().map(|c| Record::Curve { unix_ms: c.unix_ms, counts: c.counts.into_vec() }));
    write_snapshot(&d.config.dir, journal.generation(), d.fingerprint, records)
}
