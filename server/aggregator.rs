//! The aggregator's shared state and its write path: apply a reporter's batches under the
//! counting rule, keep rollups, liveness and the audit trail. Identifying a reporter and its
//! resume handshake are in [`super::handshake`].
//!
//! `Aggregator` is a cheap `Clone` handle over `Arc<Shared>`; every gRPC stream holds one.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio_util::sync::CancellationToken;

pub use super::stats::Stats;
use super::{
    audit::Audit,
    clock::Clock,
    curve::Curve,
    durability::{self, Durability, record::Record},
    error::Error,
    installs::{Installs, is_install_desk},
    liveness::Liveness,
    registers::{Outcome, Register, RegisterKey, Registers},
    registry::Registry,
    replication::Replication,
    stats::StatCounter,
    tally::Tallies,
};
use crate::proto::v1::{Ack, Correction, RegisterState, Rejection, Report, ReportBatch};

/// Tunables of the aggregator's model (transport limits live in the server config).
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// A site that sent nothing for this long is silent.
    pub silent_after: Duration,
    /// How often silence and over-capacity are recomputed.
    pub sweep_interval: Duration,
    /// Hard ceiling on a register's count (above: `OUT_OF_RANGE`).
    pub max_count: i64,
    /// Most reports in one batch (above: the whole batch is rejected).
    pub max_batch: usize,
    /// Longest correction reason, bytes.
    pub max_reason: usize,
    /// Width of a check-in curve bucket.
    pub curve_bucket: Duration,
    /// How many curve buckets are kept.
    pub curve_capacity: usize,
    /// How many corrections the audit trail keeps.
    pub audit_capacity: usize,
    /// How often watchers get coalesced updates.
    pub publish_tick: Duration,
    /// Monotonic time for durations, wall time for display (injectable for tests).
    pub clock: Clock,
    /// Most agent installs (register slots) per site; beyond, a new install's stream is refused
    /// with `RESOURCE_EXHAUSTED`.
    pub max_agents_per_site: u16,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            silent_after: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(1),
            max_count: 100_000,
            max_batch: super::limits::DEFAULT_MAX_BATCH,
            max_reason: super::limits::DEFAULT_MAX_REASON,
            curve_bucket: Duration::from_secs(60),
            curve_capacity: 7 * 24 * 60,
            audit_capacity: 100_000,
            publish_tick: Duration::from_millis(250),
            clock: Clock::system(),
            max_agents_per_site: 16,
        }
    }
}

/// An authenticated reporter: one desk of one site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReporterId {
    /// Site index.
    pub site: u32,
    /// Desk number.
    pub desk: u16,
}

/// Everything the aggregator shares between streams.
pub struct Shared {
    /// The immutable registry.
    pub registry: Registry,
    /// Model tunables.
    pub config: AggregatorConfig,
    /// Register store: the source of truth.
    pub registers: Registers,
    /// Rollups derived from the registers.
    pub tallies: Tallies,
    /// Reporting / silent sites.
    pub liveness: Liveness,
    /// Sampled check-in curve.
    pub curve: Curve,
    /// Corrections.
    pub audit: Audit,
    /// Register slots of agent installs.
    pub installs: Installs,
    applied: StatCounter,
    unchanged: StatCounter,
    rejected: StatCounter,
    batches: StatCounter,
    /// Open ingest streams (not hot: changes per stream open/close).
    pub streams_open: AtomicU64,
    /// Cancelled when the aggregator shuts down; streams and watchers end with it.
    pub shutdown: CancellationToken,
    /// The journal (or, in cluster mode, the etcd committer's flush numbers), unless running in
    /// memory only.
    pub durability: Option<Arc<Durability>>,
    /// Cluster mode: revisions, fence, install claims (None on a single node).
    pub replication: Option<Arc<Replication>>,
}

/// Handle to the aggregator.
#[derive(Clone)]
pub struct Aggregator {
    shared: Arc<Shared>,
}

/// Wall-clock Unix milliseconds (display only: durations use [`Clock::mono_ms`]).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Aggregator {
    /// A fresh in-memory aggregator (all registers zero): everything is lost on exit.
    pub fn new(registry: Registry, config: AggregatorConfig) -> Self {
        Self::build(registry, config, None, None)
    }

    /// Flushes, writes a final snapshot and stops the journal (blocking; no-op in memory).
    pub fn close(&self) {
        if let Some(d) = &self.shared.durability {
            durability::close(d);
        }
    }

    /// The flush number after which everything applied so far is durable (None: in memory).
    pub fn durable_target(&self) -> Option<u64> {
        self.shared.durability.as_ref().map(|d| d.target())
    }

    pub(crate) fn build(
        registry: Registry,
        config: AggregatorConfig,
        durability: Option<Arc<Durability>>,
        replication: Option<Arc<Replication>>,
    ) -> Self {
        let tallies = Tallies::new(&registry);
        let liveness = Liveness::new(registry.sites.len(), config.silent_after.as_millis() as i64);
        let curve = Curve::new(config.curve_bucket.as_millis() as i64, config.curve_capacity);
        let audit = Audit::new(config.audit_capacity);
        let installs = Installs::new(config.max_agents_per_site);
        Self {
            shared: Arc::new(Shared {
                registry,
                config,
                registers: Registers::new(durability.is_some()),
                tallies,
                liveness,
                curve,
                audit,
                installs,
                applied: StatCounter::new(),
                unchanged: StatCounter::new(),
                rejected: StatCounter::new(),
                batches: StatCounter::new(),
                streams_open: AtomicU64::new(0),
                shutdown: CancellationToken::new(),
                durability,
                replication,
            }),
        }
    }

    /// The shared state (read side).
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// Statistics since start.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            applied: s.applied.get(),
            unchanged: s.unchanged.get(),
            rejected: s.rejected.get(),
            batches: s.batches.get(),
            streams_open: s.streams_open.load(Relaxed),
        }
    }

    /// Checks a report without touching any state.
    fn validate(&self, report: &Report) -> Result<u16, Error> {
        let s = &self.shared;
        let session = s.registry.session(report.session).ok_or(Error::UnknownSession(report.session))?;
        if report.seq == 0 {
            return Err(Error::InvalidArgument("seq must be >= 1".into()));
        }
        if report.count < 0 {
            return Err(Error::InvalidArgument(format!("count {} is negative", report.count)));
        }
        if report.count > s.config.max_count {
            return Err(Error::OutOfRange(format!(
                "count {} is above the ceiling of {} per desk and session",
                report.count, s.config.max_count
            )));
        }
        if report.reason.len() > s.config.max_reason {
            return Err(Error::InvalidArgument(format!(
                "reason is {} bytes, at most {} allowed",
                report.reason.len(),
                s.config.max_reason
            )));
        }
        Ok(session)
    }

    /// Applies a batch report by report and builds its ack. Each session's reports go to their
    /// register in one run under its shard lock, and the run's net change is added to the rollups
    /// before that lock is released (see [`Registers::apply_run`]): one add per session per
    /// batch (the eight shared counters a report would touch were a fifth of the aggregator's time
    /// at 64 reports per batch), and the rollups of two streams writing one register land in the
    /// order their changes were applied, so no reader sees a total that never existed.
    pub fn apply_batch(&self, r: ReporterId, batch: &ReportBatch) -> Ack {
        let s = &self.shared;
        let now = s.config.clock.mono_ms();
        s.batches.add(r.site, 1);
        s.liveness.touch(r.site, now, &s.tallies);
        let mut ack = Ack::default();
        if batch.reports.len() > s.config.max_batch {
            // ONE rejection for the whole batch, whatever its length: a rejection per report
            // would let a small message of empty reports cost many times its size to answer.
            s.rejected.add(r.site, batch.reports.len() as u64);
            let err = Error::InvalidArgument(format!(
                "batch has {} reports, at most {} allowed; nothing of it was applied",
                batch.reports.len(),
                s.config.max_batch
            ));
            tracing::info!(
                site = %s.registry.sites[r.site as usize].id, desk = r.desk, reports = batch.reports.len(),
                "oversized batch refused"
            );
            ack.rejections.push(Rejection {
                code: err.code() as i32,
                message: err.to_string(),
                ..Rejection::default()
            });
            return ack;
        }
        // Valid reports with their session index; invalid ones are refused before any lock.
        let mut valid: Vec<(u16, &Report)> = Vec::with_capacity(batch.reports.len());
        for report in &batch.reports {
            match self.validate(report) {
                Ok(session) => valid.push((session, report)),
                Err(err) => self.refuse(r, report, &err, &mut ack),
            }
        }
        let mut changed = 0u64;
        let mut done = vec![false; valid.len()];
        for first in 0..valid.len() {
            if done[first] {
                continue;
            }
            let session = valid[first].0;
            let run: Vec<&Report> = (first..valid.len())
                .filter(|&j| valid[j].0 == session)
                .map(|j| {
                    done[j] = true;
                    valid[j].1
                })
                .collect();
            let key = RegisterKey { site: r.site, desk: r.desk, session };
            let mut outcomes = Vec::with_capacity(run.len());
            s.registers.apply_run(
                key,
                run.iter().map(|rep| (rep.seq, rep.count)),
                |i, o| outcomes.push((i, o)),
                |delta| s.tallies.add(r.site, session as usize, delta, now),
            );
            let mut last: Option<Register> = None;
            for (i, outcome) in outcomes {
                let report = run[i];
                match outcome {
                    Outcome::Applied { previous, current } => {
                        changed += 1;
                        last = Some(current);
                        if current.count < previous.count {
                            self.record_correction(r, report, previous, current);
                        }
                    }
                    Outcome::Unchanged(stored) => last = Some(stored),
                    Outcome::Conflict(stored) => {
                        tracing::warn!(
                            site = %s.registry.sites[r.site as usize].id, desk = r.desk, session = report.session,
                            seq = report.seq, stored = stored.count, reported = report.count,
                            "conflicting report rejected"
                        );
                        let err = Error::Conflict { seq: report.seq, stored: stored.count, reported: report.count };
                        self.refuse(r, report, &err, &mut ack);
                    }
                }
            }
            if let Some(reg) = last {
                ack.applied.push(RegisterState { session: valid[first].1.session, seq: reg.seq, count: reg.count });
            }
        }
        s.applied.add(r.site, changed);
        s.unchanged.add(r.site, batch.reports.len() as u64 - changed - ack.rejections.len() as u64);
        if is_install_desk(r.desk) {
            ack.site_agents = s.installs.count(r.site);
        }
        ack
    }

    /// Records a refused report in the statistics and the ack.
    fn refuse(&self, r: ReporterId, report: &Report, err: &Error, ack: &mut Ack) {
        let s = &self.shared;
        s.rejected.add(r.site, 1);
        tracing::debug!(
            site = %s.registry.sites[r.site as usize].id, desk = r.desk,
            session = report.session, seq = report.seq, error = %err, "report rejected"
        );
        ack.rejections.push(self.rejection(r, report, err));
    }

    /// Adds a lowering of a register to the audit trail (and the journal).
    fn record_correction(&self, r: ReporterId, report: &Report, previous: Register, current: Register) {
        let s = &self.shared;
        let c = Correction {
            site_id: s.registry.sites[r.site as usize].id.clone(),
            desk: u32::from(r.desk),
            session: report.session,
            seq: report.seq,
            previous_count: previous.count,
            count: current.count,
            reason: report.reason.clone(),
            // Displayed: the wall clock (monotonic time orders nothing here).
            unix_ms: s.config.clock.wall_ms(),
        };
        // Audit first: a snapshot taken before the push must hold it (see `Durability::push`).
        // In cluster mode the trail is etcd's: every node (this one too) adds it from the watch,
        // in revision order.
        if s.replication.is_none() {
            s.audit.record(c.clone());
        }
        if let Some(d) = &s.durability {
            durability::failpoints::crash_point("correction-before-journal");
            d.push(Record::Correction(c));
        }
    }

    fn rejection(&self, r: ReporterId, report: &Report, err: &Error) -> Rejection {
        let s = &self.shared;
        metrics::counter!("headcount_report_rejections_total", "code" => format!("{:?}", err.code())).increment(1);
        let current = s.registry.session(report.session).map(|session| {
            let reg = s.registers.get(RegisterKey { site: r.site, desk: r.desk, session });
            RegisterState { session: report.session, seq: reg.seq, count: reg.count }
        });
        Rejection {
            session: report.session,
            seq: report.seq,
            code: err.code() as i32,
            message: super::limits::cut_message(err.to_string()),
            current,
        }
    }

    /// Asks every stream and watcher to end.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }
}
