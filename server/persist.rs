//! The bridge between the aggregator and its data directory: opening (lock, recover, map the
//! stored state onto the registry, start the flusher) and what the flusher journals and
//! snapshots ([`Source`]).
//!
//! Files are keyed by ids (site id, desk, session id, province code), mapped to the registry's
//! indexes here, so adding sites (anywhere in the CSV), desks, sessions or provinces, reordering
//! them and renaming keep all state. Removing a site, desk or session that holds a count is
//! refused at start with a message naming it. Moving a site to another commune or province moves
//! its counts with it (rollups are rebuilt from the registers); past curve samples keep showing
//! them where they were.

use std::{path::PathBuf, sync::Arc, thread};

use super::{
    aggregator::{Aggregator, AggregatorConfig},
    durability::{
        self, Durability, DurabilityConfig, Flusher, Source,
        fs::{Io, RealIo},
        record::{CurveRecord, InstallRecord, Record, RegisterRecord},
        store::{self, Journal, Recovered},
    },
    installs::{INSTALL_DESK_BASE, Install, is_install_desk},
    registers::{Register, RegisterKey},
    registry::Registry,
};

/// What `Aggregator::open` restored.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Registers restored.
    pub registers: usize,
    /// Journal records replayed.
    pub journal_records: u64,
    /// Bytes cut from the last journal's torn tail.
    pub bytes_dropped: u64,
    /// Snapshot loaded.
    pub snapshot: Option<PathBuf>,
    /// Registers skipped because their site, desk or session left the registry while they
    /// held a count of zero.
    pub skipped: u64,
}

/// Why a durable aggregator cannot open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data directory is unusable (the message says what to do).
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The stored state holds counts the registry no longer has a place for.
    #[error(
        "the data directory holds counts that the registry no longer has a place for: {0}. Removing a site, desk \
         or session that holds counts would drop them from the totals. Put them back in the registry files \
         (adding, reordering and renaming are fine), or start with an empty --data-dir and let sites resend"
    )]
    RegistryMismatch(String),
    /// The flusher thread cannot start.
    #[error("cannot start the journal flusher: {0}")]
    Thread(#[from] std::io::Error),
}

impl Aggregator {
    /// An aggregator backed by a data directory: takes the directory's lock, recovers the
    /// snapshot and journals, then journals every change and acknowledges only durable state.
    pub fn open(
        registry: Registry,
        config: AggregatorConfig,
        durability: DurabilityConfig,
    ) -> Result<(Self, RecoveryReport), OpenError> {
        Self::open_with_io(registry, config, durability, Arc::new(RealIo))
    }

    /// [`Aggregator::open`] writing through `io` (tests inject failures with it).
    pub fn open_with_io(
        registry: Registry,
        config: AggregatorConfig,
        durability: DurabilityConfig,
        io: Arc<dyn Io>,
    ) -> Result<(Self, RecoveryReport), OpenError> {
        let started = std::time::Instant::now();
        // Before any other file of the directory is read or touched.
        let lock = store::lock(&durability.dir)?;
        let recovered = store::recover(&durability.dir)?;
        let dir = durability.dir.clone();
        let d = Arc::new(Durability::new(durability));
        let agg = Self::build(registry, config, Some(d.clone()), None);
        let (next_generation, last_committed) = (recovered.next_generation, recovered.last_committed);
        let report = restore(&agg, recovered)?;
        let journal = Journal::create(io.clone(), &dir, next_generation, last_committed)?;
        durability::start(Flusher { durability: d, source: Box::new(agg.clone()), io, journal, lock })?;
        tracing::info!(
            registers = report.registers, journal_records = report.journal_records,
            bytes_dropped = report.bytes_dropped, elapsed = ?started.elapsed(), "state recovered"
        );
        Ok((agg, report))
    }
}

/// Most problems listed in one refusal.
const LISTED: usize = 10;

/// Maps recovered state onto the registry; refuses counts that lost their place.
fn restore(agg: &Aggregator, rec: Recovered) -> Result<RecoveryReport, OpenError> {
    let s = agg.shared();
    let reg = &s.registry;
    let mut report = RecoveryReport {
        journal_records: rec.journal_records,
        bytes_dropped: rec.bytes_dropped,
        snapshot: rec.snapshot.clone(),
        ..RecoveryReport::default()
    };
    let mut problems = Vec::new();
    let mut places = Vec::with_capacity(rec.registers.len());
    for ((site_id, desk, session_id), r) in rec.registers {
        let site = reg.site(&site_id);
        let session = reg.session(session_id);
        let place = match (site, session) {
            (Some(site), Some(session)) if desk >= 1 && desk <= u32::from(reg.sites[site as usize].desks) => {
                Some(RegisterKey { site, desk: desk as u16, session })
            }
            // An agent install's slot (see `server/installs.rs`): its place is the site itself.
            (Some(site), Some(session)) if u16::try_from(desk).is_ok_and(is_install_desk) => {
                Some(RegisterKey { site, desk: desk as u16, session })
            }
            _ => None,
        };
        match place {
            Some(key) => places.push((key, r)),
            None if r.count == 0 => report.skipped += 1,
            None => {
                let why = match (site, session) {
                    (None, _) => "site not in the registry".to_owned(),
                    (_, None) => "session not in the registry".to_owned(),
                    (Some(i), _) => format!("the site has {} desks", reg.sites[i as usize].desks),
                };
                problems.push(format!("site {site_id} desk {desk} session {session_id} holds {} ({why})", r.count));
            }
        }
    }
    if !problems.is_empty() {
        problems.sort();
        let more = problems.len().saturating_sub(LISTED);
        problems.truncate(LISTED);
        let mut msg = problems.join("; ");
        if more > 0 {
            msg.push_str(&format!("; and {more} more"));
        }
        return Err(OpenError::RegistryMismatch(msg));
    }
    let now = s.config.clock.mono_ms();
    for (key, r) in places {
        if let Some(previous) = s.registers.restore(key, r) {
            s.tallies.add(key.site, key.session as usize, r.count - previous.count, now);
            report.registers += 1;
        }
    }
    for i in rec.installs {
        match (reg.site(&i.site), u16::try_from(i.slot)) {
            (Some(site), Ok(slot)) if (1..=u16::MAX - INSTALL_DESK_BASE).contains(&slot) => {
                s.installs.restore(site, Install { id: i.id, desk: i.desk, slot });
            }
            // A site that left the registry: its registers were refused above if they held counts.
            _ => report.skipped += 1,
        }
    }
    for c in rec.corrections {
        s.audit.restore(c);
    }
    for c in rec.curve {
        s.curve.push(c.to_sample(reg));
    }
    Ok(report)
}

impl Source for Aggregator {
    fn take_dirty(&self) -> Vec<(RegisterKey, Register)> {
        self.shared().registers.take_dirty()
    }

    fn encode_register(&self, key: RegisterKey, r: Register, out: &mut Vec<u8>) {
        let reg = self.registry();
        let site = reg.sites.get(key.site as usize).map_or("", |s| s.id.as_str());
        let session = reg.sessions.get(key.session as usize).map_or(0, |s| s.id);
        Record::encode_register(site, u32::from(key.desk), session, r.seq, r.count, out);
    }

    fn snapshot(&self) -> Vec<Record> {
        let s = self.shared();
        let registers = s.registers.snapshot();
        let mut out = Vec::with_capacity(registers.len() + 64);
        let reg = &s.registry;
        out.extend(registers.into_iter().map(|(k, r)| {
            Record::Register(RegisterRecord {
                site: reg.sites.get(k.site as usize).map(|x| x.id.clone()).unwrap_or_default(),
                desk: u32::from(k.desk),
                session: reg.sessions.get(k.session as usize).map_or(0, |x| x.id),
                seq: r.seq,
                count: r.count,
            })
        }));
        out.extend(s.audit.all().into_iter().map(Record::Correction));
        out.extend(s.curve.all().iter().map(|c| Record::Curve(CurveRecord::from_sample(&s.registry, c))));
        out.extend(s.installs.all().into_iter().map(|(site, i)| {
            Record::Install(InstallRecord {
                site: s.registry.sites.get(site as usize).map(|x| x.id.clone()).unwrap_or_default(),
                slot: u32::from(i.slot),
                desk: i.desk,
                id: i.id,
            })
        }));
        out
    }

    fn set_flusher(&self, thread: thread::Thread, records: usize) {
        self.shared().registers.set_flusher(thread, records);
    }
}
