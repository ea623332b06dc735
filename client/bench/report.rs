//! What a benchmark run measured, and how it is printed for people (`--json` prints the struct).

use serde::Serialize;

use super::latency::Latency;

/// What a run measured. Fields a mode does not measure stay 0.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    /// Mode.
    pub mode: String,
    /// What one batch holds, in words (agent shape or transport stress).
    pub batch_shape: String,
    /// Streams (one per site).
    pub streams: u32,
    /// HTTP/2 connections.
    pub connections: u32,
    /// Journal on?
    pub journal: bool,
    /// Server worker threads (0: default).
    pub server_threads: usize,
    /// Seconds of load.
    pub seconds: f64,
    /// Offered load: check-ins (agents) or reports (paced) per second asked for; 0 when
    /// unpaced.
    pub offered_per_second: f64,
    /// Check-ins handed to the site agents (agents).
    pub check_ins: u64,
    /// Check-ins (agents) or batches (raw modes) never acknowledged within the drain time.
    pub unacknowledged: u64,
    /// Reports acknowledged as applied, counted by the load generator.
    pub reports_sent: u64,
    /// Reports the aggregator counted as applied (must equal `reports_sent` in raw modes).
    pub reports_applied_by_server: u64,
    /// Applied reports per second.
    pub applied_per_second: f64,
    /// Where ack latency is measured from: the intended (scheduled) time, or the actual send.
    pub latency_from: String,
    /// Ack latency.
    pub ack_latency: Latency,
    /// Report sent → visible on a watch stream; probes that never showed are misses.
    pub watch_freshness: Latency,
    /// GetTotals(national) latency while ingest runs.
    pub totals_query: Latency,
    /// Server RSS at the end, MB.
    pub server_rss_mb: f64,
    /// Server peak RSS, MB.
    pub server_peak_rss_mb: f64,
    /// Server RSS growth per stream (idle), bytes.
    pub bytes_per_stream: f64,
    /// Server CPU, cores used on average.
    pub server_cpu_cores: f64,
    /// Max/min reports applied across streams (steady state).
    pub fairness_max_over_min: f64,
    /// Seconds until every stream had its resume handshake.
    pub admit_all_seconds: f64,
    /// RESOURCE_EXHAUSTED answers while admitting (storm).
    pub admission_refusals: u64,
    /// Storm: streams whose acknowledged report came back in the resume after the restart
    /// (journal on; must be all of them).
    pub resumed_durable: u64,
    /// Storm: streams whose resync report was acknowledged after the restart (must be all).
    pub resync_acknowledged: u64,
    /// Recovery: totals compared with what was written (national, per session and all).
    pub totals_checked: u64,
    /// Server start-up to serving, seconds (recovery, storm restart).
    pub startup_seconds: f64,
    /// Journal group commits per second during the load.
    pub journal_flushes_per_second: f64,
    /// The SSE fan-out figures (sse).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sse: Option<super::sse::SseReport>,
    /// TLS beside plain text (tls).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::TlsReport>,
    /// One node beside the cluster, reference peak and failover (cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<super::cluster::ClusterReport>,
}

fn latency_line(out: &mut impl std::io::Write, what: &str, l: &Latency) {
    let _ = writeln!(
        out,
        "{what} ms: p50 {:.2} p99 {:.2} p999 {:.2} max {:.2} ({} samples, {} misses counted at the timeout)",
        l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.samples, l.misses
    );
}

/// Prints a report for people.
pub fn print(r: &BenchReport, out: &mut impl std::io::Write) {
    if let Some(sse) = &r.sse {
        return super::sse::print(sse, out);
    }
    if let Some(tls) = &r.tls {
        return super::tls::print(tls, out);
    }
    if let Some(cluster) = &r.cluster {
        return super::cluster::print(cluster, out);
    }
    let _ = writeln!(
        out,
        "mode {} | streams {} over {} connections | journal {} | server threads {}",
        r.mode,
        r.streams,
        r.connections,
        if r.journal { "on" } else { "off" },
        if r.server_threads == 0 { "default".to_owned() } else { r.server_threads.to_string() }
    );
    if !r.batch_shape.is_empty() {
        let _ = writeln!(out, "batches: {}", r.batch_shape);
    }
    match r.mode.as_str() {
        "agents" | "saturate" | "paced" | "stress" => {
            if r.mode == "agents" {
                let _ = writeln!(
                    out,
                    "check-ins: {} ({:.0}/s offered), {} not acknowledged by the end",
                    r.check_ins, r.offered_per_second, r.unacknowledged
                );
            } else if r.offered_per_second > 0.0 {
                let _ = writeln!(out, "offered {:.0} reports/s", r.offered_per_second);
            }
            if r.mode == "agents" {
                let _ = writeln!(
                    out,
                    "applied {:.0} reports/s ({} reports for {} check-ins in {:.1} s, counted by the aggregator)",
                    r.applied_per_second, r.reports_applied_by_server, r.check_ins, r.seconds
                );
            } else {
                let _ = writeln!(
                    out,
                    "applied {:.0} reports/s ({} in {:.1} s; aggregator counted {}, load generator {})",
                    r.applied_per_second,
                    r.reports_applied_by_server,
                    r.seconds,
                    r.reports_applied_by_server,
                    r.reports_sent
                );
            }
            latency_line(out, &format!("ack latency, from the {}:", r.latency_from), &r.ack_latency);
            latency_line(out, "watch freshness", &r.watch_freshness);
            latency_line(out, "totals query", &r.totals_query);
            let _ = writeln!(
                out,
                "server: RSS {:.0} MB (peak {:.0} MB), CPU {:.2} cores | fairness max/min {:.2} | all streams admitted in {:.2} s | {:.0} journal commits/s",
                r.server_rss_mb,
                r.server_peak_rss_mb,
                r.server_cpu_cores,
                r.fairness_max_over_min,
                r.admit_all_seconds,
                r.journal_flushes_per_second
            );
        }
        "idle" => {
            let _ = writeln!(
                out,
                "server RSS {:.0} MB (peak {:.0}), {:.0} bytes per idle stream, admitted in {:.2} s",
                r.server_rss_mb, r.server_peak_rss_mb, r.bytes_per_stream, r.admit_all_seconds
            );
        }
        "storm" => {
            let _ = writeln!(
                out,
                "restart → serving {:.2} s; restart → all {} streams reconnected and resynced {:.2} s; {} RESOURCE_EXHAUSTED; server peak RSS {:.0} MB",
                r.startup_seconds, r.streams, r.admit_all_seconds, r.admission_refusals, r.server_peak_rss_mb
            );
            let _ = writeln!(
                out,
                "checked: {} of {} acknowledged states back in the resume ({}), {} of {} resyncs acknowledged",
                r.resumed_durable,
                r.streams,
                if r.journal { "journal on: all required" } else { "in memory: none expected" },
                r.resync_acknowledged,
                r.streams
            );
        }
        "recovery" => {
            let _ = writeln!(
                out,
                "recovery of a snapshot + {} journal records: serving after {:.2} s; RSS {:.0} MB (peak {:.0} MB); {} totals equal what was written",
                r.reports_sent, r.startup_seconds, r.server_rss_mb, r.server_peak_rss_mb, r.totals_checked
            );
        }
        _ => {}
    }
}
