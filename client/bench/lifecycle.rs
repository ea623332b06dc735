//! Modes about streams rather than reports: `idle` (memory per open, heartbeating stream) and
//! `storm` (kill -9 and restart the aggregator; every stream reconnects at once, and each
//! site's resync must be acknowledged).

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use super::{
    BenchArgs, BenchError, Ctx,
    process::ServerProcess,
    report::BenchReport,
    streams::{RawStream, channels, national, open_all},
};
use crate::proto::v1::{Ack, Report, ReportBatch, ReportRequest, report_request};

/// How long one ack may take in `storm` before the site counts as not acknowledged.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The count every storm site reports.
const STORM_COUNT: i64 = 7;

/// idle: RSS growth per open, heartbeating stream.
pub(super) async fn idle(ctx: &Ctx, args: &BenchArgs, report: &mut BenchReport) -> Result<(), BenchError> {
    let server = ServerProcess::start(&ctx.spec(args, "127.0.0.1:0")?, ctx.scratch.path())?;
    // Let the server finish its start-up allocations before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Baseline before any connection, so the figure includes connection cost (which matters
    // with one connection per site and is negligible with shared connections).
    let (before, _) = server.memory();
    let chans = channels(&server.url(), report.connections, &ctx.connect)?;
    let refusals = AtomicU64::new(0);
    let (streams, admit) = open_all(ctx, &chans, report.streams, &refusals).await?;
    for s in &streams {
        let _ = s.tx.try_send(ReportRequest { kind: Some(report_request::Kind::Heartbeat(Default::default())) });
    }
    tokio::time::sleep(args.duration.min(Duration::from_secs(5))).await;
    let (after, hwm) = server.memory();
    report.admit_all_seconds = admit;
    report.server_rss_mb = after as f64 / 1e6;
    report.server_peak_rss_mb = hwm as f64 / 1e6;
    report.bytes_per_stream = (after.saturating_sub(before)) as f64 / streams.len().max(1) as f64;
    drop(streams);
    Ok(())
}

fn one_report(seq: u64) -> ReportRequest {
    ReportRequest {
        kind: Some(report_request::Kind::Batch(ReportBatch {
            reports: vec![Report { session: 1, seq, count: STORM_COUNT, reason: String::new() }],
        })),
    }
}

/// True if `ack` shows session 1 stored at `seq` or newer with the storm count, no rejection.
fn acknowledges(ack: &Ack, seq: u64) -> bool {
    ack.rejections.is_empty() && ack.applied.iter().any(|a| a.session == 1 && a.seq >= seq && a.count == STORM_COUNT)
}

/// Sends `seq` on every stream and waits for each ack; returns the streams and, per failure, the
/// site index and what went wrong.
async fn report_on_all(streams: Vec<RawStream>, seq: u64) -> (Vec<RawStream>, Vec<(usize, String)>) {
    let mut set = tokio::task::JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        set.spawn(async move {
            let outcome = match s.tx.send(one_report(seq)).await {
                Err(_) => Err("stream closed before the report".to_owned()),
                Ok(()) => match s.ack_within(ACK_TIMEOUT).await {
                    Ok(a) if acknowledges(&a, seq) => Ok(()),
                    Ok(a) => Err(format!("ack does not show seq {seq} count {STORM_COUNT}: {a:?}")),
                    Err(e) => Err(e),
                },
            };
            (i, s, outcome)
        });
    }
    let (mut kept, mut failed) = (Vec::new(), Vec::new());
    while let Some(r) = set.join_next().await {
        match r {
            Ok((i, s, outcome)) => {
                kept.push(s);
                if let Err(e) = outcome {
                    failed.push((i, e));
                }
            }
            Err(e) => failed.push((usize::MAX, format!("task failed: {e}"))),
        }
    }
    (kept, failed)
}

fn fail(ctx: &Ctx, what: &str, total: u32, failed: &[(usize, String)]) -> BenchError {
    let (i, why) = &failed[0];
    let site = ctx.registry.sites.get(i + 1).map_or("?", |s| s.id.as_str());
    BenchError::Mismatch(format!("storm: {} of {total} sites: {what} (first: site {site}: {why})", failed.len()))
}

/// storm: every stream reports once and must be acknowledged; the aggregator is killed and
/// restarted on the same port; every stream reopens at once (retrying RESOURCE_EXHAUSTED with
/// jittered backoff). With the journal, each resume must hold the acknowledged state; every
/// stream then resends its latest state (a newer seq) and each resync must be acknowledged; the
/// national total must be exact. Any failure fails the run.
pub(super) async fn storm(ctx: &Ctx, args: &BenchArgs, report: &mut BenchReport) -> Result<(), BenchError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let spec = ctx.spec(args, &format!("127.0.0.1:{port}"))?;
    let mut server = ServerProcess::start(&spec, ctx.scratch.path())?;
    let url = server.url();
    let refusals = AtomicU64::new(0);
    let (streams, _) =
        open_all(ctx, &channels(&url, report.connections, &ctx.connect)?, report.streams, &refusals).await?;
    let (streams, failed) = report_on_all(streams, 1).await;
    if !failed.is_empty() {
        return Err(fail(ctx, "first report not acknowledged before the kill", report.streams, &failed));
    }
    server.kill9();
    drop(streams);
    let restarted = Instant::now();
    let server = ServerProcess::start(&spec, ctx.scratch.path())?;
    report.startup_seconds = server.startup().as_secs_f64();
    let chans = channels(&url, report.connections, &ctx.connect)?;
    let refusals = AtomicU64::new(0);
    let (streams, _) = open_all(ctx, &chans, report.streams, &refusals).await?;
    // Acked means durable: with the journal, every resume holds the acknowledged (seq 1, 7).
    let durable: Vec<(usize, String)> = streams
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.resumed.iter().any(|r| r.0 == 1 && r.1 >= 1 && r.2 == STORM_COUNT))
        .map(|(i, s)| (i, format!("resumed {:?}", s.resumed)))
        .collect();
    report.resumed_durable = (streams.len() - durable.len()) as u64;
    if report.journal && !durable.is_empty() {
        return Err(fail(ctx, "acknowledged state missing from the resume after kill -9", report.streams, &durable));
    }
    let (kept, failed) = report_on_all(streams, 2).await;
    report.admit_all_seconds = restarted.elapsed().as_secs_f64();
    report.admission_refusals = refusals.load(Relaxed);
    report.resync_acknowledged = (kept.len() - failed.len()) as u64;
    if !failed.is_empty() {
        return Err(fail(ctx, "resync not acknowledged after the restart", report.streams, &failed));
    }
    let (rss, hwm) = server.memory();
    report.server_rss_mb = rss as f64 / 1e6;
    report.server_peak_rss_mb = hwm as f64 / 1e6;
    let national = national(chans[0].clone(), Some(1)).await?;
    let expected = STORM_COUNT * i64::from(report.streams);
    if national != expected {
        return Err(BenchError::Mismatch(format!(
            "storm: after the restart national is {national}, expected {expected}"
        )));
    }
    drop(kept);
    Ok(())
}
