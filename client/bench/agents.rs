//! `agents`: the site agent library itself drives the load. One `Reporter` per site (desk 1,
//! in-memory state) checks in at Poisson-random times, the national rate following the burst
//! wave; each check-in's latency runs from the moment it was DUE to the moment the reporter saw
//! it acknowledged, so a load generator that falls behind shows its backlog. The batch shape is
//! whatever the agent sends (cumulative state, one report per changed session, coalesced under
//! load). At the end the national total of the session must equal the check-ins made.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    BenchArgs, BenchError, Ctx,
    latency::{Samples, histogram, summarize},
    load::DRAIN,
    probes::{freshness_probe, join_thread, on_own_thread, query_loop},
    process::ServerProcess,
    report::BenchReport,
    schedule::Burst,
    streams::{OPEN_DEADLINE, channels, national, server_stats},
};
use crate::client::{
    connect::endpoint,
    reporter::{Reporter, ReporterConfig, backoff::BackoffConfig, state::MemoryStore},
};

/// What one agent's driver did.
pub(super) struct AgentOutcome {
    pub(super) check_ins: u64,
    pub(super) unacknowledged: u64,
    pub(super) samples: Samples,
}

/// What every agent driver of a run did, together.
pub(super) struct Collected {
    pub(super) check_ins: u64,
    pub(super) unacknowledged: u64,
    /// Samples beyond the histogram's range.
    pub(super) misses: u64,
    /// Ack latencies of every driver, merged.
    pub(super) latency: hdrhistogram::Histogram<u64>,
}

/// Waits for every agent driver in `set` and merges their outcomes. Error: a driver panicked.
pub(super) async fn collect(set: &mut tokio::task::JoinSet<AgentOutcome>) -> Result<Collected, BenchError> {
    let mut c = Collected { check_ins: 0, unacknowledged: 0, misses: 0, latency: histogram() };
    while let Some(r) = set.join_next().await {
        let o = r.map_err(|e| BenchError::Mismatch(format!("agent driver failed: {e}")))?;
        c.check_ins += o.check_ins;
        c.unacknowledged += o.unacknowledged;
        c.misses += o.samples.merge_into(&mut c.latency);
    }
    Ok(c)
}

/// Runs the agents mode.
pub(super) async fn run(ctx: &Ctx, args: &BenchArgs, report: &mut BenchReport) -> Result<(), BenchError> {
    let server = ServerProcess::start(&ctx.spec(args, "127.0.0.1:0")?, ctx.scratch.path())?;
    let url = server.url();
    let chans = channels(&url, report.connections, &ctx.connect)?;
    let sessions: Vec<u32> = ctx.registry.sessions.iter().map(|s| s.id).collect();
    // The agents check in to the last session, the freshness probe reports on the first.
    let (probe_session, session) = (sessions[0], sessions[sessions.len() - 1]);
    report.batch_shape = "whatever the site agent (Reporter) sends: cumulative state, one report per changed \
                          session, check-ins coalesced while a batch is queued"
        .into();
    report.latency_from = "intended check-in time (schedule) to the reporter seeing it acknowledged".into();
    let backoff =
        BackoffConfig { initial: Duration::from_millis(200), max: Duration::from_secs(5), ..BackoffConfig::default() };
    let mut reporters = Vec::with_capacity(report.streams as usize);
    for i in 0..report.streams as usize {
        let site = &ctx.registry.sites[i + 1];
        let mut cfg = ReporterConfig::new(site.id.clone(), 1, ctx.auth.site_token(&site.id));
        cfg.backoff = backoff;
        let ch = chans[i % chans.len()].clone();
        let r = Reporter::spawn(ch, cfg, Arc::new(MemoryStore::new()))
            .map_err(|e| BenchError::Args(format!("cannot start the reporter of site {}: {e}", site.id)))?;
        reporters.push(Arc::new(r));
    }
    let admitting = std::time::Instant::now();
    let deadline = Instant::now() + OPEN_DEADLINE;
    for (i, r) in reporters.iter().enumerate() {
        let mut st = r.watch_status();
        if !matches!(tokio::time::timeout_at(deadline, st.wait_for(|s| s.connected)).await, Ok(Ok(_))) {
            return Err(BenchError::Mismatch(format!(
                "only {i} of {} reporters connected within {OPEN_DEADLINE:?} (last error of the next: {})",
                reporters.len(),
                r.status().last_error.unwrap_or_else(|| "none".into())
            )));
        }
    }
    report.admit_all_seconds = admitting.elapsed().as_secs_f64();
    let query_ch = endpoint(&url)?
        .connect()
        .await
        .map_err(|e| BenchError::Mismatch(format!("cannot connect the stats client: {e}")))?;
    let (applied_before, flushes_before) = server_stats(query_ch.clone()).await?;
    let cpu_before = server.cpu_seconds();

    let rate = args.rate() as f64;
    report.offered_per_second = rate;
    let mean = Duration::from_secs_f64(reporters.len() as f64 / rate);
    let burst = Burst::new(args.peak_factor, args.duration);
    let stop = Arc::new(AtomicBool::new(false));
    // The drivers wait on this rather than polling `stop`: 10,000 timers firing to look at a flag
    // would load the generator and show up as latency.
    let stopped = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for r in &reporters {
        let phase = burst.next_gap(mean, Duration::ZERO);
        set.spawn(drive(r.clone(), session, mean, phase, burst.clone(), started, stopped.clone()));
    }
    let query = {
        let (stop, url) = (stop.clone(), url.clone());
        on_own_thread(move || async move {
            match endpoint(&url) {
                Ok(ep) => match ep.connect().await {
                    Ok(ch) => query_loop(ch, stop).await,
                    Err(_) => Default::default(),
                },
                Err(_) => Default::default(),
            }
        })?
    };
    let probe = {
        let (stop, auth, site, url) = (stop.clone(), ctx.auth.clone(), ctx.registry.sites[0].id.clone(), url.clone());
        on_own_thread(move || async move {
            let Ok(ep) = endpoint(&url) else { return (Default::default(), 0) };
            freshness_probe(ep.connect_lazy(), ep.connect_lazy(), auth, site, probe_session, stop).await
        })?
    };
    let mut peak_rss = 0;
    let end = Instant::now() + args.duration;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200).min(end - Instant::now())).await;
        peak_rss = peak_rss.max(server.memory().0);
    }
    stop.store(true, Relaxed);
    stopped.cancel();
    let Collected { check_ins, unacknowledged, misses, latency: h } = collect(&mut set).await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = server.cpu_seconds() - cpu_before;
    report.totals_query = join_thread(query)?;
    let (freshness, probes) = join_thread(probe)?;
    report.watch_freshness = freshness;
    let (applied_after, flushes_after) = server_stats(query_ch.clone()).await?;
    let applied = applied_after - applied_before - probes;
    report.seconds = seconds;
    report.check_ins = check_ins;
    report.unacknowledged = unacknowledged;
    report.reports_applied_by_server = applied;
    report.applied_per_second = applied as f64 / seconds;
    report.ack_latency = summarize(&h, misses);
    report.journal_flushes_per_second = (flushes_after - flushes_before) as f64 / seconds;
    let (rss, hwm) = server.memory();
    report.server_rss_mb = rss as f64 / 1e6;
    report.server_peak_rss_mb = hwm.max(peak_rss) as f64 / 1e6;
    report.server_cpu_cores = cpu / seconds;
    if unacknowledged > 0 {
        return Err(BenchError::Mismatch(format!(
            "{unacknowledged} of {check_ins} check-ins were not acknowledged within {DRAIN:?} of the stop"
        )));
    }
    let national = national(query_ch, Some(session)).await?;
    if national != check_ins as i64 {
        return Err(BenchError::Mismatch(format!(
            "agents made {check_ins} check-ins, all acknowledged, but the national total of session {session} is \
             {national}"
        )));
    }
    drop(reporters);
    Ok(())
}

/// One agent's driver: a check-in at each scheduled time, until `stop`; then waits at most
/// [`DRAIN`] for the last acknowledgements. A check-in is acknowledged once the reporter's acked
/// seq for the session reaches the seq it was given.
pub(super) async fn drive(
    reporter: Arc<Reporter>,
    session: u32,
    mean: Duration,
    phase: Duration,
    burst: Burst,
    started: Instant,
    stop: tokio_util::sync::CancellationToken,
) -> AgentOutcome {
    let mut status = reporter.watch_status();
    let mut pending: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut samples = Samples::default();
    let mut next = Instant::now() + phase;
    let mut check_ins = 0u64;
    let mut drain_until: Option<Instant> = None;
    loop {
        {
            let acked = status.borrow_and_update().acked.get(&session).map_or(0, |a| a.0);
            while let Some(&(due, _)) = pending.front().filter(|p| p.1 <= acked) {
                samples.since(due);
                pending.pop_front();
            }
        }
        let stopping = stop.is_cancelled();
        if stopping && drain_until.is_none() {
            drain_until = Some(Instant::now() + DRAIN);
        }
        if !stopping && Instant::now() >= next {
            let due = next;
            if reporter.check_in(session, 1).await.is_err() {
                break;
            }
            check_ins += 1;
            let seq = reporter.status().local.get(&session).map_or(0, |l| l.0);
            pending.push_back((due, seq));
            next += burst.next_gap(mean, started.elapsed());
            continue;
        }
        if stopping && pending.is_empty() {
            break;
        }
        let until = drain_until.unwrap_or(next);
        tokio::select! {
            () = stop.cancelled(), if !stopping => {}
            () = tokio::time::sleep_until(until) => {
                if drain_until.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
            changed = status.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    let unacknowledged = pending.len() as u64;
    for _ in &pending {
        samples.miss(DRAIN);
    }
    AgentOutcome { check_ins, unacknowledged, samples }
}
