//! `bench cluster`'s cluster-only runs: the reference peak through real site agents spread over
//! the nodes, and the failover of a third of the sites when their node is killed with SIGKILL.

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use tokio::{task::JoinSet, time::Instant};
use tonic::{Code, transport::Channel};

use super::{
    BenchArgs, BenchError, Ctx,
    agents::{Collected, collect, drive as drive_agent},
    cluster_load::{etcd_counters, interleaved},
    latency::{Latency, Samples, histogram, summarize},
    process::ServerProcess,
    schedule::Burst,
    streams::{OPEN_DEADLINE, RawStream, authorized, bounded, national, open, open_all},
};
use crate::{
    client::{
        cluster::etcd::LocalEtcd,
        connect::endpoint_with,
        reporter::{Reporter, ReporterConfig, backoff::BackoffConfig, state::MemoryStore},
    },
    proto::v1::{Report, ReportBatch, ReportRequest, TotalsRequest, report_request, totals_client::TotalsClient},
};

/// The national reference peak: 1.5 million check-ins in 30 minutes, per second.
pub const REFERENCE_RATE: f64 = 1_500_000.0 / 1_800.0;

/// Failover target: every stream of the killed node resumed and acknowledged elsewhere within.
pub const FAILOVER_TARGET: Duration = Duration::from_secs(5);

/// Reference-peak target: ack p99, ms.
pub const PEAK_P99_TARGET_MS: f64 = 100.0;

/// How long one ack may take before the stream counts as not acknowledged.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the nodes may take to agree on the final totals.
const CONVERGE: Duration = Duration::from_secs(30);

/// The reference peak on the cluster.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeakReport {
    /// Site agents (one per site, desk 1), spread round-robin over the nodes.
    pub agents: u32,
    /// Mean check-ins per second offered (1.5 M / 30 min).
    pub offered_per_second: f64,
    /// The rate's wave peaks at this times the mean (`--peak-factor`).
    pub peak_factor: f64,
    /// Seconds of load.
    pub seconds: f64,
    /// Check-ins made.
    pub check_ins: u64,
    /// Check-ins never acknowledged by the end of the drain.
    pub unacknowledged: u64,
    /// Check-in due → its agent sees it acknowledged.
    pub ack: Latency,
    /// Nodes whose national total of the session equals the check-ins made (must be all).
    pub nodes_exact: u32,
    /// etcd leader elections during the peak (each stalls acknowledgements for about an
    /// election timeout).
    pub etcd_leader_changes: u64,
    /// CPU of the etcd members during the peak, cores.
    pub etcd_cpu_cores: f64,
    /// CPU of the aggregator nodes during the peak, cores.
    pub server_cpu_cores: f64,
}

/// The failover of a killed node's sites.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FailoverReport {
    /// Streams over all nodes.
    pub streams: u32,
    /// Streams on the killed node.
    pub killed_node_streams: u32,
    /// Of those, streams whose resume on another node held their acknowledged state (must be all).
    pub resumed_durable: u32,
    /// Of those, streams whose resend was acknowledged on another node (must be all).
    pub resent_acknowledged: u32,
    /// SIGKILL → the last of them acknowledged on another node, seconds (target ≤ 5).
    pub seconds_to_all: f64,
    /// SIGKILL → each stream's resend acknowledged on another node.
    pub per_stream: Latency,
    /// Surviving nodes whose national total of the session is exact afterwards (must be all).
    pub survivors_exact: u32,
}

/// National total of `session` on the node at `url`, once it has applied `min_revision`.
async fn national_at(ctx: &Ctx, url: &str, session: u32, min_revision: u64) -> Result<i64, BenchError> {
    let ch = endpoint_with(url, &ctx.connect)?.connect_lazy();
    let mut req = authorized(TotalsRequest { scope: None, session: Some(session), min_revision })?;
    req.set_timeout(Duration::from_secs(10));
    Ok(bounded("GetTotals", TotalsClient::new(ch).get_totals(req)).await?.into_inner().count)
}

/// How many nodes show `expected` as the national total of `session`, waiting at most
/// [`CONVERGE`] for each.
async fn nodes_showing(ctx: &Ctx, urls: &[String], session: u32, min_revision: u64, expected: i64) -> u32 {
    let deadline = Instant::now() + CONVERGE;
    let mut exact = 0;
    for u in urls {
        loop {
            if national_at(ctx, u, session, min_revision).await.is_ok_and(|n| n == expected) {
                exact += 1;
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    exact
}

/// The reference peak: one site agent per stream, on node i mod N, checking in at
/// [`REFERENCE_RATE`] (Poisson, following `--peak-factor`'s wave) for `--duration`; then every
/// node's national total of the last session must equal what it was plus the check-ins.
pub(super) async fn reference_peak(
    ctx: &Ctx,
    args: &BenchArgs,
    servers: &[ServerProcess],
    etcd: &LocalEtcd,
) -> Result<PeakReport, BenchError> {
    let urls: Vec<String> = servers.iter().map(ServerProcess::url).collect();
    let chans = interleaved(ctx, args, &urls)?;
    let session = ctx.registry.sessions[ctx.registry.sessions.len() - 1].id;
    let before = national(chans[0].clone(), Some(session)).await?;
    let backoff =
        BackoffConfig { initial: Duration::from_millis(200), max: Duration::from_secs(5), ..BackoffConfig::default() };
    let mut reporters = Vec::with_capacity(args.streams as usize);
    for i in 0..args.streams as usize {
        let site = &ctx.registry.sites[i + 1];
        let mut cfg = ReporterConfig::new(site.id.clone(), 1, ctx.auth.site_token(&site.id));
        cfg.backoff = backoff;
        let r = Reporter::spawn(chans[i % chans.len()].clone(), cfg, Arc::new(MemoryStore::new()))
            .map_err(|e| BenchError::Args(format!("cannot start the reporter of site {}: {e}", site.id)))?;
        reporters.push(Arc::new(r));
    }
    let deadline = Instant::now() + OPEN_DEADLINE;
    for (i, r) in reporters.iter().enumerate() {
        let mut st = r.watch_status();
        if !matches!(tokio::time::timeout_at(deadline, st.wait_for(|s| s.connected)).await, Ok(Ok(_))) {
            return Err(BenchError::Mismatch(format!(
                "reference peak: only {i} of {} agents connected within {OPEN_DEADLINE:?}",
                reporters.len()
            )));
        }
    }
    let mean = Duration::from_secs_f64(reporters.len() as f64 / REFERENCE_RATE);
    let burst = Burst::new(args.peak_factor, args.duration);
    let stopped = tokio_util::sync::CancellationToken::new();
    let etcd_before = etcd_counters(Some(etcd)).await?;
    let cpu = || servers.iter().map(ServerProcess::cpu_seconds).sum::<f64>();
    let cpu_before = cpu();
    let started = Instant::now();
    let mut set = JoinSet::new();
    for r in &reporters {
        let phase = burst.next_gap(mean, Duration::ZERO);
        set.spawn(drive_agent(r.clone(), session, mean, phase, burst.clone(), started, stopped.clone()));
    }
    tokio::time::sleep(args.duration).await;
    stopped.cancel();
    let Collected { check_ins, unacknowledged, misses, latency: h } = collect(&mut set).await?;
    let seconds = started.elapsed().as_secs_f64();
    let etcd_after = etcd_counters(Some(etcd)).await?;
    let server_cpu_cores = (cpu() - cpu_before) / seconds;
    drop(reporters);
    let expected = before + check_ins as i64;
    let nodes_exact = nodes_showing(ctx, &urls, session, 0, expected).await;
    let report = PeakReport {
        agents: args.streams,
        offered_per_second: REFERENCE_RATE,
        peak_factor: args.peak_factor,
        seconds,
        check_ins,
        unacknowledged,
        ack: summarize(&h, misses),
        nodes_exact,
        etcd_leader_changes: (etcd_after.leader_changes - etcd_before.leader_changes) as u64,
        etcd_cpu_cores: (etcd_after.cpu_seconds - etcd_before.cpu_seconds) / seconds,
        server_cpu_cores,
    };
    if unacknowledged > 0 || nodes_exact != urls.len() as u32 {
        return Err(BenchError::Mismatch(format!(
            "reference peak: {unacknowledged} of {check_ins} check-ins unacknowledged; {nodes_exact} of {} nodes show \
             the national total {expected} of session {session}",
            urls.len()
        )));
    }
    Ok(report)
}

/// One report of `session` at (seq, count).
fn one_report(session: u32, seq: u64, count: i64) -> ReportRequest {
    ReportRequest {
        kind: Some(report_request::Kind::Batch(ReportBatch {
            reports: vec![Report { session, seq, count, reason: String::new() }],
        })),
    }
}

/// Sends (seq, count) on `s` and waits for an ack showing it applied; returns its revision.
async fn report_acked(s: &mut RawStream, session: u32, seq: u64, count: i64) -> Result<u64, String> {
    s.tx.send(one_report(session, seq, count)).await.map_err(|_| "stream closed before the report".to_owned())?;
    let a = s.ack_within(ACK_TIMEOUT).await?;
    if a.rejections.is_empty() && a.applied.iter().any(|r| r.session == session && r.seq >= seq && r.count == count) {
        Ok(a.revision)
    } else {
        Err(format!("ack does not show seq {seq} count {count}: {a:?}"))
    }
}

/// Failover: `--streams` streams spread over the nodes each report once and are acknowledged;
/// node 0 is killed with SIGKILL; each of its streams notices its stream end, reopens on a
/// surviving node (retrying refusals with jittered backoff), checks that the resume holds its
/// acknowledged state, resends a newer state and waits for the ack. Every survivor must then
/// show the exact national total of the session. Node 0 stays dead.
pub(super) async fn failover(
    ctx: &Ctx,
    args: &BenchArgs,
    servers: &mut [ServerProcess],
) -> Result<FailoverReport, BenchError> {
    let n = servers.len();
    let urls: Vec<String> = servers.iter().map(ServerProcess::url).collect();
    let chans = interleaved(ctx, args, &urls)?;
    let session = ctx.registry.sessions[1.min(ctx.registry.sessions.len() - 1)].id;
    let refusals = std::sync::atomic::AtomicU64::new(0);
    let (streams, _) = open_all(ctx, &chans, args.streams, &refusals).await?;
    // First report on every stream; (index, stream, acknowledged seq and count).
    let mut set = JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        set.spawn(async move {
            let (seq, count) = s.resumed.iter().find(|r| r.0 == session).map_or((0, 0), |r| (r.1, r.2));
            let acked = report_acked(&mut s, session, seq + 1, count + 1).await;
            (i, s, seq + 1, count + 1, acked)
        });
    }
    let mut held = Vec::new();
    while let Some(r) = set.join_next().await {
        let (i, s, seq, count, acked) = r.map_err(|e| BenchError::Mismatch(format!("stream task failed: {e}")))?;
        acked.map_err(|e| BenchError::Mismatch(format!("failover: first report of stream {i}: {e}")))?;
        held.push((i, s, seq, count));
    }
    servers[0].kill9();
    let killed = Instant::now();
    let mut moving = JoinSet::new();
    let mut staying = Vec::new();
    let mut final_counts = 0i64;
    for (i, s, seq, count) in held {
        if i % n != 0 {
            final_counts += count;
            staying.push(s);
            continue;
        }
        let target = chans[(i / n) % (chans.len() / n) * n + 1 + (i / n) % (n - 1)].clone();
        let (auth, site) = (ctx.auth.clone(), ctx.registry.sites[i + 1].id.clone());
        moving.spawn(async move {
            let outcome = move_stream(s, target, &auth, &site, session, seq, count).await;
            (count + 1, outcome.map(|(durable, rev)| (durable, rev, killed.elapsed())))
        });
    }
    let mut report = FailoverReport { streams: args.streams, ..FailoverReport::default() };
    let (mut samples, mut max_rev, mut failures) = (Samples::default(), 0u64, Vec::new());
    while let Some(r) = moving.join_next().await {
        let (count, outcome) = r.map_err(|e| BenchError::Mismatch(format!("failover task failed: {e}")))?;
        report.killed_node_streams += 1;
        final_counts += count;
        match outcome {
            Ok((durable, rev, took)) => {
                report.resumed_durable += u32::from(durable);
                report.resent_acknowledged += 1;
                max_rev = max_rev.max(rev);
                report.seconds_to_all = report.seconds_to_all.max(took.as_secs_f64());
                samples.record(took);
            }
            Err(e) => {
                samples.miss(ACK_TIMEOUT);
                failures.push(e);
            }
        }
    }
    let mut h = histogram();
    let misses = samples.merge_into(&mut h);
    report.per_stream = summarize(&h, misses);
    report.survivors_exact = nodes_showing(ctx, &urls[1..], session, max_rev, final_counts).await;
    drop(staying);
    if !failures.is_empty()
        || report.resumed_durable != report.killed_node_streams
        || report.survivors_exact != (n - 1) as u32
    {
        return Err(BenchError::Mismatch(format!(
            "failover: {} of {} streams failed (first: {}); {} of them resumed with their acknowledged state; {} of {} \
             survivors show the exact national total {final_counts} of session {session}",
            failures.len(),
            report.killed_node_streams,
            failures.first().map_or("none", String::as_str),
            report.resumed_durable,
            report.survivors_exact,
            n - 1
        )));
    }
    Ok(report)
}

/// One stream of the killed node: waits for its end, reopens on `target` (retrying refusals and
/// resets within [`OPEN_DEADLINE`]), and resends (seq + 1, count + 1). Returns whether the resume
/// held the acknowledged (seq, count), and the resend's ack revision.
async fn move_stream(
    mut old: RawStream,
    target: Channel,
    auth: &crate::server::Auth,
    site: &str,
    session: u32,
    seq: u64,
    count: i64,
) -> Result<(bool, u64), String> {
    // The kill resets the connection: the stream ends at once (bounded anyway).
    let _ = tokio::time::timeout(ACK_TIMEOUT, async { while let Ok(Some(_)) = old.rx.message().await {} }).await;
    drop(old);
    let deadline = Instant::now() + OPEN_DEADLINE;
    let mut delay = Duration::from_millis(50);
    let mut s = loop {
        match open(target.clone(), auth, site, 1).await {
            Ok(s) => break s,
            Err(st)
                if matches!(
                    st.code(),
                    Code::ResourceExhausted | Code::Unavailable | Code::Unknown | Code::Cancelled
                ) && Instant::now() + delay < deadline =>
            {
                tokio::time::sleep(delay.mul_f64(rand::random_range(0.8..1.2))).await;
                delay = delay.mul_f64(1.6).min(Duration::from_secs(1));
            }
            Err(st) => return Err(format!("site {site}: reopen: {:?} {}", st.code(), st.message())),
        }
    };
    let durable = s.resumed.iter().any(|r| r.0 == session && r.1 >= seq && r.2 == count);
    let rev = report_acked(&mut s, session, seq + 1, count + 1).await.map_err(|e| format!("site {site}: {e}"))?;
    Ok((durable, rev))
}
