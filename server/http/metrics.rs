//! `/metrics` in the Prometheus text format. Two sources, so the ingest path gains no work:
//!
//! * the aggregator's own counters (`Aggregator::stats`, the rollups, the live feed), read at
//!   scrape time: reports applied / unchanged / rejected, batches, streams open, checked in and
//!   sites with check-ins per session, sites reporting and silent, SSE viewers;
//! * the `metrics` facade recorded where events are rare or per group commit — rejections by
//!   gRPC code, refused handshakes, journal commit time, ack wait, gRPC watchers — rendered by
//!   `metrics-exporter-prometheus` (installed once per process, with the HTTP side).

use std::{fmt::Write as _, sync::OnceLock, time::Duration};

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::{HttpState, access, error::HttpError};
use crate::server::tally::{Level, Node};

/// Histogram buckets for every `*_seconds` metric: 0.5 ms … 2.5 s.
const SECONDS_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// The process-wide recorder (None if another recorder was installed first).
pub fn install() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .and_then(PrometheusBuilder::install_recorder);
            match built {
                Ok(handle) => {
                    describe();
                    // Histograms buffer samples until upkeep folds them in.
                    let upkeep = handle.clone();
                    let spawned = std::thread::Builder::new().name("headcount-metrics".into()).spawn(move || {
                        loop {
                            std::thread::sleep(Duration::from_secs(5));
                            upkeep.run_upkeep();
                        }
                    });
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "no metrics upkeep thread; histograms fold in at scrape");
                    }
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics shows aggregator counters only");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("headcount_report_rejections_total", "Rejected reports by gRPC code.");
    describe_counter!("headcount_handshakes_refused_total", "Ingest stream openings refused, by reason.");
    describe_histogram!(
        "headcount_journal_commit_seconds",
        Unit::Seconds,
        "Journal group commit: write and fdatasync."
    );
    describe_histogram!(
        "headcount_ack_wait_seconds",
        Unit::Seconds,
        "Per group commit, the longest an ack in it waited: from the commit window opening to durable."
    );
    describe_gauge!("headcount_watchers", "Open gRPC Watch streams.");
    describe_histogram!(
        "headcount_etcd_commit_seconds",
        Unit::Seconds,
        "Cluster mode: one group commit to etcd (all its transactions)."
    );
    describe_counter!(
        "headcount_etcd_commit_failures_total",
        "Cluster mode: group commits etcd did not take (retried)."
    );
}

/// Appends one metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The scrape-time part of the exposition for this aggregator.
pub fn aggregator_metrics(st: &HttpState) -> String {
    let agg = &st.agg;
    let s = agg.stats();
    let r = agg.registry();
    let tallies = &agg.shared().tallies;
    let mut out = String::new();
    let one = |v: u64| vec![(String::new(), v as f64)];
    family(&mut out, "headcount_reports_applied_total", "counter", "Reports that changed a register.", &one(s.applied));
    family(&mut out, "headcount_reports_unchanged_total", "counter", "Stale or duplicate reports.", &one(s.unchanged));
    family(&mut out, "headcount_reports_rejected_total", "counter", "Rejected reports.", &one(s.rejected));
    family(&mut out, "headcount_batches_total", "counter", "Report batches received.", &one(s.batches));
    family(&mut out, "headcount_streams_open", "gauge", "Open ingest streams.", &one(s.streams_open));
    family(
        &mut out,
        "headcount_registers",
        "gauge",
        "Registers (site, desk, session) held.",
        &one(agg.shared().registers.len() as u64),
    );
    if let Some(rep) = &agg.shared().replication {
        family(
            &mut out,
            "headcount_etcd_revision_applied",
            "gauge",
            "Cluster mode: the etcd revision this node has applied (compare across nodes: watch lag).",
            &one(rep.applied()),
        );
        family(
            &mut out,
            "headcount_etcd_revision_committed",
            "gauge",
            "Cluster mode: the etcd revision of this node's latest committed group write.",
            &one(rep.committed()),
        );
        family(
            &mut out,
            "headcount_cluster_node_healthy",
            "gauge",
            "Cluster mode: 1 while this node reaches etcd and accepts streams, 0 while fenced off.",
            &one(u64::from(rep.is_healthy())),
        );
    }
    let national = tallies.read(Node::NATIONAL, None);
    family(
        &mut out,
        "headcount_sites_reporting",
        "gauge",
        "Sites reporting (not silent).",
        &one(u64::from(national.reporting)),
    );
    family(
        &mut out,
        "headcount_sites_silent",
        "gauge",
        "Sites silent (no report or heartbeat lately).",
        &one(r.sites.len() as u64 - u64::from(national.reporting)),
    );
    family(&mut out, "headcount_sites_total", "gauge", "Sites in the registry.", &one(r.sites.len() as u64));
    let per_session = |f: &dyn Fn(Option<usize>) -> f64| -> Vec<(String, f64)> {
        std::iter::once(("{session=\"all\"}".to_owned(), f(None)))
            .chain(r.sessions.iter().enumerate().map(|(k, sess)| (format!("{{session=\"{}\"}}", sess.id), f(Some(k)))))
            .collect()
    };
    family(
        &mut out,
        "headcount_checked_in",
        "gauge",
        "National check-ins.",
        &per_session(&|k| tallies.read(Node::NATIONAL, k).count as f64),
    );
    // O(sites) at scrape time, never on the ingest path.
    let with_checkins = |k: Option<usize>| {
        (0..r.sites.len() as u32).filter(|&index| tallies.read(Node { level: Level::Site, index }, k).count > 0).count()
            as f64
    };
    family(
        &mut out,
        "headcount_sites_with_checkins",
        "gauge",
        "Sites with at least one check-in.",
        &per_session(&with_checkins),
    );
    family(&mut out, "headcount_sse_viewers", "gauge", "Open Server-Sent Events connections.", &one(st.live.viewers()));
    family(
        &mut out,
        "headcount_sse_frames_total",
        "counter",
        "Live frames serialised (once per changed topic per tick, shared by all viewers).",
        &one(st.live.frames()),
    );
    out
}

/// `GET /metrics` (token needed: `Authorization: Bearer` in the scrape config).
pub async fn render(State(st): State<HttpState>, headers: HeaderMap) -> Result<Response, HttpError> {
    access::check(&st, &headers, false)?;
    let mut body = install().map(PrometheusHandle::render).unwrap_or_default();
    body.push_str(&aggregator_metrics(&st));
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    Ok(r)
}
