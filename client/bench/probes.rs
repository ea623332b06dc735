//! Measuring clients that run beside the load, each on its own thread and runtime so the load
//! generator's busy run queue does not inflate what they measure: totals queries, and the watch
//! freshness probe (a report on a reserved site until a watch shows it; one that never shows up
//! within [`FRESHNESS_TIMEOUT`] is a miss, counted in the percentiles at the timeout).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;
use tonic::transport::Channel;

use super::{
    BenchError,
    latency::{Latency, Samples, histogram, summarize},
    streams::{authorized, open},
};
use crate::{
    proto::v1::{
        Report, ReportBatch, ReportRequest, Scope, ScopeKind, TotalsRequest, WatchRequest, report_request,
        totals_client::TotalsClient,
    },
    server::Auth,
};

/// How long a probe report may take to show on the watch before it counts as a miss.
pub(super) const FRESHNESS_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a future on a new thread with its own single-threaded runtime.
pub(super) fn on_own_thread<F, Fut, T>(make: F) -> std::io::Result<std::thread::JoinHandle<Option<T>>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::Builder::new().name("bench-probe".into()).spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().ok().map(|rt| rt.block_on(make()))
    })
}

/// Joins a thread started by [`on_own_thread`].
pub(super) fn join_thread<T>(h: std::thread::JoinHandle<Option<T>>) -> Result<T, BenchError> {
    h.join()
        .map_err(|_| BenchError::Mismatch("probe thread panicked".into()))?
        .ok_or_else(|| BenchError::Mismatch("probe runtime did not start".into()))
}

/// `GetTotals(national)` every 5 ms until `stop`; a failed query is a miss at its duration.
pub(super) async fn query_loop(ch: Channel, stop: Arc<AtomicBool>) -> Latency {
    let mut c = TotalsClient::new(ch);
    let mut h = histogram();
    let mut samples = Samples::default();
    let timeout = Duration::from_secs(5);
    while !stop.load(Relaxed) {
        let Ok(req) = authorized(TotalsRequest { scope: None, session: None, min_revision: 0 }) else { break };
        let t = Instant::now();
        match tokio::time::timeout(timeout, c.get_totals(req)).await {
            Ok(Ok(_)) => samples.since(t),
            _ => samples.miss(t.elapsed().max(timeout)),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let misses = samples.merge_into(&mut h);
    summarize(&h, misses)
}

/// Reports a new count for one reserved site (session `session`) every 50 ms and times until a
/// watch of that site shows it. Returns the latency and the number of reports it sent.
pub(super) async fn freshness_probe(
    ingest: Channel,
    read: Channel,
    auth: Auth,
    site: String,
    session: u32,
    stop: Arc<AtomicBool>,
) -> (Latency, u64) {
    let mut h = histogram();
    let mut samples = Samples::default();
    let mut probes = 0u64;
    let Ok(mut s) = open(ingest, &auth, &site, 1).await else { return (summarize(&h, 0), probes) };
    let Ok(req) = authorized(WatchRequest {
        scope: Some(Scope { kind: ScopeKind::Site as i32, id: site.clone() }),
        session: Some(session),
        include_children: false,
    }) else {
        return (summarize(&h, 0), probes);
    };
    let Ok(resp) = TotalsClient::new(read).watch(req).await else { return (summarize(&h, 0), probes) };
    let mut watch = resp.into_inner();
    let (mut seq, base) = s.resumed.iter().find(|r| r.0 == session).map_or((0, 0), |&(_, seq, count)| (seq, count));
    let mut count = base;
    let mut watching = matches!(tokio::time::timeout(FRESHNESS_TIMEOUT, watch.message()).await, Ok(Ok(Some(_))));
    while watching && !stop.load(Relaxed) {
        seq += 1;
        count += 1;
        let msg = ReportRequest {
            kind: Some(report_request::Kind::Batch(ReportBatch {
                reports: vec![Report { session, seq, count, reason: String::new() }],
            })),
        };
        let sent = Instant::now();
        if s.tx.send(msg).await.is_err() {
            samples.miss(FRESHNESS_TIMEOUT);
            break;
        }
        probes += 1;
        let seen = tokio::time::timeout(FRESHNESS_TIMEOUT, async {
            loop {
                match watch.message().await {
                    Ok(Some(u)) if u.totals.as_ref().is_some_and(|t| t.count >= count) => return true,
                    Ok(Some(_)) => {}
                    _ => return false,
                }
            }
        })
        .await;
        match seen {
            Ok(true) => samples.since(sent),
            Ok(false) => {
                // The watch ended: this probe and the run's remaining ones are lost.
                samples.miss(FRESHNESS_TIMEOUT);
                watching = false;
            }
            Err(_) => samples.miss(FRESHNESS_TIMEOUT),
        }
        if s.ack_within(FRESHNESS_TIMEOUT).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let misses = samples.merge_into(&mut h);
    (summarize(&h, misses), probes)
}
