//! Raw-stream load (`saturate`, `paced`, `stress`): one stream per site, each sending batches of
//! cumulative reports and counting what its acks say was applied. `saturate` and `paced` use the
//! site agent's batch shape (at most one report per register per batch); `stress` puts several
//! successive reports of each register in one batch, a transport stress test.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    BenchArgs, BenchError, Ctx, Mode,
    latency::{Samples, histogram, summarize},
    probes::{freshness_probe, join_thread, on_own_thread, query_loop},
    process::ServerProcess,
    report::BenchReport,
    schedule::Burst,
    streams::{RawStream, channels, open_all, server_stats},
};
use crate::{
    client::connect::endpoint_with,
    proto::v1::{Report, ReportBatch, ReportRequest, ReportResponse, report_request, report_response},
};

/// After the stop, how long a stream waits for the acks of its batches in flight before they
/// count as unacknowledged.
pub(super) const DRAIN: Duration = Duration::from_secs(15);

/// What one stream did.
pub(super) struct StreamOutcome {
    pub(super) sent_reports: u64,
    pub(super) unacknowledged: u64,
    pub(super) samples: Samples,
}

/// saturate / paced / stress.
pub(super) async fn run(ctx: &Ctx, args: &BenchArgs, report: &mut BenchReport) -> Result<(), BenchError> {
    let mut spec = ctx.spec(args, "127.0.0.1:0")?;
    let read_url = if args.separate_reads {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        spec.extra.extend(["--read-listen".to_owned(), format!("127.0.0.1:{port}")]);
        Some(format!("{}://127.0.0.1:{port}", ctx.scheme()))
    } else {
        None
    };
    let server = ServerProcess::start(&spec, ctx.scratch.path())?;
    let url = server.url();
    let chans = channels(&url, report.connections, &ctx.connect)?;
    let refusals = AtomicU64::new(0);
    let (streams, admit) = open_all(ctx, &chans, report.streams, &refusals).await?;
    report.admit_all_seconds = admit;
    let query_ch = endpoint_with(read_url.as_deref().unwrap_or(&url), &ctx.connect)?
        .connect()
        .await
        .map_err(|e| BenchError::Mismatch(format!("cannot connect the stats client: {e}")))?;
    let (applied_before, flushes_before) = server_stats(query_ch.clone()).await?;
    let cpu_before = server.cpu_seconds();

    let stop = Arc::new(AtomicBool::new(false));
    // Streams wait on this at the stop rather than polling `stop`: 10,000 timers firing to look at
    // a flag would load the generator and show up as latency in paced runs.
    let stopped = tokio_util::sync::CancellationToken::new();
    let per_stream = Arc::new((0..streams.len()).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let sessions: Vec<u32> = ctx.registry.sessions.iter().map(|s| s.id).collect();
    let rpb = args.batch_size() as usize;
    report.batch_shape = if args.mode == Mode::Stress {
        format!(
            "TRANSPORT STRESS, not what sites send: {rpb} reports per batch over {} sessions, so up to {} successive \
             reports of one register in a batch (all but the last superseded at once)",
            sessions.len(),
            rpb.div_ceil(sessions.len())
        )
    } else {
        format!(
            "site agent shape: {rpb} report(s) per batch, one per session (register), cumulative counts; one \
             session open at a time sends 1"
        )
    };
    // Paced: each stream sends one batch per `interval` on average.
    let interval = (args.mode == Mode::Paced).then(|| {
        let batches_per_sec = (args.rate() as f64 / rpb as f64 / streams.len().max(1) as f64).max(0.01);
        Duration::from_secs_f64(1.0 / batches_per_sec)
    });
    report.offered_per_second = if interval.is_some() { args.rate() as f64 } else { 0.0 };
    report.latency_from = if interval.is_some() {
        "intended send time (schedule; corrected for coordinated omission)".into()
    } else {
        "actual send time (saturated: service time with the window full, not a user latency)".into()
    };
    let window = if interval.is_some() { 64 } else { args.window as usize };
    let burst = Burst::new(args.peak_factor, args.duration);
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (k, s) in streams.into_iter().enumerate() {
        let (stopped, per_stream, sessions, burst) =
            (stopped.clone(), per_stream.clone(), sessions.clone(), burst.clone());
        // The first send is a Poisson arrival too (a uniform first phase would add sends).
        let phase = interval.map(|i| burst.next_gap(i, Duration::ZERO));
        let counter = move |applied: u64| {
            per_stream[k].fetch_add(applied, Relaxed);
        };
        set.spawn(drive(s, sessions, rpb, window, interval.zip(phase), burst, started, stopped, counter));
    }
    // Totals queries and a watch-freshness probe while ingest runs, on their own threads.
    let read_at = read_url.clone().unwrap_or_else(|| url.clone());
    let query = {
        let (stop, read_at, opts) = (stop.clone(), read_at.clone(), ctx.connect.clone());
        on_own_thread(move || async move {
            match endpoint_with(&read_at, &opts) {
                Ok(ep) => match ep.connect().await {
                    Ok(ch) => query_loop(ch, stop).await,
                    Err(_) => Default::default(),
                },
                Err(_) => Default::default(),
            }
        })?
    };
    let probe_session = sessions[0];
    let probe = {
        let (stop, auth, site, ingest_at) =
            (stop.clone(), ctx.auth.clone(), ctx.registry.sites[0].id.clone(), url.clone());
        let opts = ctx.connect.clone();
        on_own_thread(move || async move {
            let (Ok(i), Ok(r)) = (endpoint_with(&ingest_at, &opts), endpoint_with(&read_at, &opts)) else {
                return (Default::default(), 0);
            };
            freshness_probe(i.connect_lazy(), r.connect_lazy(), auth, site, probe_session, stop).await
        })?
    };
    let mut peak_rss = 0;
    // Fairness is measured in the steady state: from a quarter of the run to the stop. At the
    // start every stream fills its window at once and the first batches drain in an arbitrary
    // order, which would charge start-up queueing to whichever streams queued last.
    let snapshot = || per_stream.iter().map(|c| c.load(Relaxed)).collect::<Vec<u64>>();
    let warm = Instant::now() + args.duration / 4;
    let end = Instant::now() + args.duration;
    let mut at_warm = vec![0; per_stream.len()];
    let mut warmed = false;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200).min(end - Instant::now())).await;
        peak_rss = peak_rss.max(server.memory().0);
        if !warmed && Instant::now() >= warm {
            at_warm = snapshot();
            warmed = true;
        }
    }
    let steady: Vec<u64> = snapshot().iter().zip(&at_warm).map(|(end, warm)| end - warm).collect();
    stop.store(true, Relaxed);
    stopped.cancel();
    let (mut sent, mut unacknowledged) = (0, 0);
    let mut h = histogram();
    let mut misses = 0;
    while let Some(r) = set.join_next().await {
        let o = r.map_err(|e| BenchError::Mismatch(format!("stream task failed: {e}")))?;
        sent += o.sent_reports;
        unacknowledged += o.unacknowledged;
        misses += o.samples.merge_into(&mut h);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = server.cpu_seconds() - cpu_before;
    report.totals_query = join_thread(query)?;
    let (freshness, probes) = join_thread(probe)?;
    report.watch_freshness = freshness;
    let (applied_after, flushes_after) = server_stats(query_ch).await?;
    let applied = applied_after - applied_before - probes;
    report.journal_flushes_per_second = (flushes_after - flushes_before) as f64 / seconds;
    let counted: u64 = per_stream.iter().map(|c| c.load(Relaxed)).sum();
    report.seconds = seconds;
    report.reports_sent = counted;
    report.unacknowledged = unacknowledged;
    report.reports_applied_by_server = applied;
    report.applied_per_second = applied as f64 / seconds;
    report.ack_latency = summarize(&h, misses);
    let (rss, hwm) = server.memory();
    report.server_rss_mb = rss as f64 / 1e6;
    report.server_peak_rss_mb = hwm.max(peak_rss) as f64 / 1e6;
    report.server_cpu_cores = cpu / seconds;
    let (mx, mn) = steady.iter().fold((0, u64::MAX), |(a, b), &v| (a.max(v), b.min(v)));
    report.fairness_max_over_min = if mn == 0 { f64::INFINITY } else { mx as f64 / mn as f64 };
    if unacknowledged > 0 {
        return Err(BenchError::Mismatch(format!(
            "{unacknowledged} batches were never acknowledged within {DRAIN:?} of the stop"
        )));
    }
    if sent != counted {
        return Err(BenchError::Mismatch(format!("load generator sent {sent} reports but saw {counted} acknowledged")));
    }
    if counted != applied {
        return Err(BenchError::Mismatch(format!(
            "load generator saw {counted} reports acknowledged, aggregator counted {applied} applied"
        )));
    }
    Ok(())
}

/// One stream's loop: keep `window` batches in flight (saturate) or send on the schedule
/// (`paced`: mean interval and first phase), until `stop`; then wait at most [`DRAIN`] for the
/// acks still due. Latency is measured from the intended send time when paced.
#[allow(clippy::too_many_arguments)]
pub(super) async fn drive(
    s: RawStream,
    sessions: Vec<u32>,
    rpb: usize,
    window: usize,
    paced: Option<(Duration, Duration)>,
    burst: Burst,
    started: Instant,
    stop: tokio_util::sync::CancellationToken,
    applied: impl Fn(u64),
) -> StreamOutcome {
    let RawStream { tx, mut rx, resumed } = s;
    // Per-register seq and cumulative count (count = seq: one more check-in per report).
    let mut seqs: Vec<u64> = sessions
        .iter()
        .map(|&id| resumed.iter().find(|r| r.0 == id).map_or(0, |r| r.1.max(r.2.max(0) as u64)))
        .collect();
    let mut in_flight: VecDeque<Instant> = VecDeque::new();
    let mut samples = Samples::default();
    let mut next_send = Instant::now() + paced.map_or(Duration::ZERO, |p| p.1);
    let mut sent_reports = 0u64;
    let mut drain_until: Option<Instant> = None;
    loop {
        let stopping = stop.is_cancelled();
        if stopping && drain_until.is_none() {
            drain_until = Some(Instant::now() + DRAIN);
        }
        let ready = paced.is_none() || Instant::now() >= next_send;
        if !stopping && in_flight.len() < window && ready {
            let reports = (0..rpb)
                .map(|j| {
                    let r = j % sessions.len();
                    seqs[r] += 1;
                    Report { session: sessions[r], seq: seqs[r], count: seqs[r] as i64, reason: String::new() }
                })
                .collect();
            let msg = ReportRequest { kind: Some(report_request::Kind::Batch(ReportBatch { reports })) };
            if tx.send(msg).await.is_err() {
                break;
            }
            // Paced: the batch was due at `next_send`, however late it actually went out.
            in_flight.push_back(if paced.is_some() { next_send } else { Instant::now() });
            sent_reports += rpb as u64;
            if let Some((mean, _)) = paced {
                next_send += burst.next_gap(mean, started.elapsed());
            }
            continue;
        }
        if in_flight.is_empty() {
            if stopping {
                break;
            }
            if paced.is_some() {
                tokio::select! {
                    () = tokio::time::sleep_until(next_send) => {}
                    () = stop.cancelled() => {}
                }
            }
            continue;
        }
        let until = match (drain_until, paced) {
            (Some(d), _) => d,
            (None, Some(_)) => next_send,
            (None, None) => Instant::now() + DRAIN,
        };
        let wait = match tokio::time::timeout_at(until, rx.message()).await {
            Ok(m) => m,
            Err(_) if drain_until.is_some() || paced.is_none() => break,
            Err(_) => continue,
        };
        match wait {
            Ok(Some(ReportResponse { kind: Some(report_response::Kind::Ack(a)) })) => {
                if let Some(t) = in_flight.pop_front() {
                    samples.since(t);
                }
                applied((rpb as u64).saturating_sub(a.rejections.len() as u64));
            }
            _ => break,
        }
    }
    for _ in &in_flight {
        samples.miss(DRAIN);
    }
    StreamOutcome { sent_reports, unacknowledged: in_flight.len() as u64, samples }
}
