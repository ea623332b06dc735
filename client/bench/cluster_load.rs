//! `bench cluster`'s load phases: saturate or paced raw streams spread round-robin over the
//! nodes of one side (1 node with its journal, or N nodes over etcd), with etcd's own write
//! counters read before and after, and the watch-lag probe between two nodes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};
use tonic::transport::Channel;

use super::{
    BenchArgs, BenchError, Ctx,
    cluster_faults::interleaved,
    latency::{Latency, Samples, histogram, summarize},
    load::{DRAIN, drive},
    probes::{join_thread, on_own_thread},
    process::ServerProcess,
    schedule::Burst,
    streams::{authorized, open, open_all, server_stats},
};
use crate::{
    client::{cluster::etcd::LocalEtcd, connect::endpoint_with},
    proto::v1::{
        Report, ReportBatch, ReportRequest, Scope, ScopeKind, TotalsRequest, report_request,
        totals_client::TotalsClient,
    },
    server::Auth,
};

/// How long one watch-lag probe may wait for the other node before it counts as a miss.
const LAG_TIMEOUT: Duration = Duration::from_secs(5);

/// Most probes one run sends (one every 50 ms: 2 hours' worth).
const LAG_PROBES_MAX: u64 = 150_000;

/// The nodes of one side and the etcd cluster under them (None: the single node with its journal).
pub(super) struct Side<'a> {
    pub(super) servers: &'a [ServerProcess],
    pub(super) etcd: Option<&'a LocalEtcd>,
}

/// What one phase measured.
#[derive(Debug, Default)]
pub(super) struct PhaseFigures {
    pub(super) applied_per_second: f64,
    pub(super) ack: Latency,
    pub(super) unacknowledged: u64,
    pub(super) etcd_writes_per_second: f64,
    pub(super) etcd_keys_put_per_second: f64,
    pub(super) journal_flushes_per_second: f64,
    pub(super) watch_lag: Latency,
    pub(super) server_cpu_cores: f64,
}

/// etcd's cumulative write counters of one member: (raft proposals committed, keys put).
async fn etcd_counters(etcd: Option<&LocalEtcd>) -> Result<(f64, f64), BenchError> {
    let Some(etcd) = etcd else { return Ok((0.0, 0.0)) };
    let url = etcd.endpoint(0);
    let addr = url.trim_start_matches("http://").to_owned();
    let body = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    })
    .await
    .map_err(|_| BenchError::Mismatch(format!("etcd at {url} did not serve /metrics within 5 s")))??;
    let metric = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| BenchError::Mismatch(format!("etcd at {url}/metrics has no {name}")))
    };
    Ok((metric("etcd_server_proposals_committed_total")?, metric("etcd_mvcc_put_total")?))
}

/// Runs saturate (`rate` None) or paced load for `--duration` over `--streams` streams spread
/// round-robin over the side's nodes (stream i on node i mod N), with the watch-lag probe from
/// the first node to the second when there are two or more. Fails when a node counted other
/// than what the load generator saw acknowledged.
pub(super) async fn phase(
    ctx: &Ctx,
    args: &BenchArgs,
    side: &Side<'_>,
    rate: Option<u64>,
) -> Result<PhaseFigures, BenchError> {
    let urls: Vec<String> = side.servers.iter().map(ServerProcess::url).collect();
    let chans = interleaved(ctx, args, &urls)?;
    let refusals = AtomicU64::new(0);
    let (streams, _) = open_all(ctx, &chans, args.streams, &refusals).await?;
    let mut stats_chans = Vec::new();
    for u in &urls {
        stats_chans.push(
            endpoint_with(u, &ctx.connect)?
                .connect()
                .await
                .map_err(|e| BenchError::Mismatch(format!("cannot connect the stats client to {u}: {e}")))?,
        );
    }
    let stats = |chans: Vec<Channel>| async move {
        let (mut applied, mut flushes) = (0, 0);
        for ch in chans {
            let (a, f) = server_stats(ch).await?;
            applied += a;
            flushes += f;
        }
        Ok::<_, BenchError>((applied, flushes))
    };
    let (applied_before, flushes_before) = stats(stats_chans.clone()).await?;
    let etcd_before = etcd_counters(side.etcd).await?;
    let cpu = || side.servers.iter().map(ServerProcess::cpu_seconds).sum::<f64>();
    let cpu_before = cpu();

    let sessions: Vec<u32> = ctx.registry.sessions.iter().map(|s| s.id).collect();
    let interval = rate.map(|r| {
        let batches_per_sec = (r as f64 / streams.len().max(1) as f64).max(0.01);
        Duration::from_secs_f64(1.0 / batches_per_sec)
    });
    let window = if interval.is_some() { 64 } else { args.window as usize };
    let burst = Burst::new(args.peak_factor, args.duration);
    let stopped = tokio_util::sync::CancellationToken::new();
    let counted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for s in streams {
        let (stopped, counted, sessions, burst) = (stopped.clone(), counted.clone(), sessions.clone(), burst.clone());
        let phase = interval.map(|i| burst.next_gap(i, Duration::ZERO));
        let counter = move |applied: u64| {
            counted.fetch_add(applied, Relaxed);
        };
        set.spawn(drive(s, sessions, 1, window, interval.zip(phase), burst, started, stopped, counter));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let probe = match &urls[..] {
        [a, b, ..] => {
            let (a, b) = (endpoint_with(a, &ctx.connect)?, endpoint_with(b, &ctx.connect)?);
            let (auth, site, session, stop) =
                (ctx.auth.clone(), ctx.registry.sites[0].id.clone(), sessions[0], stop.clone());
            Some(on_own_thread(move || async move {
                lag_probe(a.connect_lazy(), b.connect_lazy(), auth, site, session, stop).await
            })?)
        }
        _ => None,
    };
    tokio::time::sleep(args.duration).await;
    stop.store(true, Relaxed);
    stopped.cancel();
    let (mut sent, mut unacknowledged, mut misses) = (0, 0, 0);
    let mut h = histogram();
    while let Some(r) = set.join_next().await {
        let o = r.map_err(|e| BenchError::Mismatch(format!("stream task failed: {e}")))?;
        sent += o.sent_reports;
        unacknowledged += o.unacknowledged;
        misses += o.samples.merge_into(&mut h);
    }
    let seconds = started.elapsed().as_secs_f64();
    let (watch_lag, probes) = match probe {
        Some(p) => join_thread(p)?,
        None => (Latency::default(), 0),
    };
    let etcd_after = etcd_counters(side.etcd).await?;
    let (applied_after, flushes_after) = stats(stats_chans).await?;
    let applied = applied_after - applied_before - probes;
    let counted = counted.load(Relaxed);
    // With unacknowledged batches at the drain's end a node may have applied more than was seen
    // acknowledged; never less.
    if (unacknowledged == 0 && (sent != counted || counted != applied)) || counted > applied {
        return Err(BenchError::Mismatch(format!(
            "{} nodes: load generator sent {sent} reports and saw {counted} acknowledged ({unacknowledged} batches \
             unacknowledged within {DRAIN:?} of the stop); the nodes counted {applied} applied",
            urls.len()
        )));
    }
    Ok(PhaseFigures {
        applied_per_second: applied as f64 / seconds,
        ack: summarize(&h, misses),
        unacknowledged,
        etcd_writes_per_second: (etcd_after.0 - etcd_before.0) / seconds,
        etcd_keys_put_per_second: (etcd_after.1 - etcd_before.1) / seconds,
        journal_flushes_per_second: if side.etcd.is_none() {
            (flushes_after - flushes_before) as f64 / seconds
        } else {
            0.0
        },
        watch_lag,
        server_cpu_cores: (cpu() - cpu_before) / seconds,
    })
}

/// Every 50 ms until `stop`: a report on one reserved site through node A; once A acknowledges
/// it (at etcd revision R), a `GetTotals` of that site on node B asking for at least R. The lag
/// is A's ack → B's answer (B answers as soon as it has applied R, so this is how far B's watch
/// trails A's commit, plus one loopback call). Returns the lag and the reports sent.
async fn lag_probe(
    a: Channel,
    b: Channel,
    auth: Auth,
    site: String,
    session: u32,
    stop: Arc<AtomicBool>,
) -> (Latency, u64) {
    let mut h = histogram();
    let mut samples = Samples::default();
    let mut probes = 0u64;
    let Ok(mut s) = open(a, &auth, &site, 1).await else { return (summarize(&h, 0), probes) };
    let (mut seq, mut count) = s.resumed.iter().find(|r| r.0 == session).map_or((0, 0), |&(_, seq, c)| (seq, c));
    let mut totals = TotalsClient::new(b);
    while !stop.load(Relaxed) && probes < LAG_PROBES_MAX {
        seq += 1;
        count += 1;
        let msg = ReportRequest {
            kind: Some(report_request::Kind::Batch(ReportBatch {
                reports: vec![Report { session, seq, count, reason: String::new() }],
            })),
        };
        if s.tx.send(msg).await.is_err() {
            break;
        }
        probes += 1;
        let Ok(ack) = s.ack_within(LAG_TIMEOUT).await else { break };
        let acked = Instant::now();
        let Ok(mut req) = authorized(TotalsRequest {
            scope: Some(Scope { kind: ScopeKind::Site as i32, id: site.clone() }),
            session: Some(session),
            min_revision: ack.revision,
        }) else {
            break;
        };
        req.set_timeout(LAG_TIMEOUT);
        match tokio::time::timeout(LAG_TIMEOUT, totals.get_totals(req)).await {
            Ok(Ok(t)) if t.get_ref().count >= count => samples.since(acked),
            _ => samples.miss(LAG_TIMEOUT),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let misses = samples.merge_into(&mut h);
    (summarize(&h, misses), probes)
}
