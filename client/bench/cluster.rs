//! `bench cluster`: one node with its journal beside three nodes on a three-member etcd (a
//! [`LocalEtcd`] of the installed `etcd`), in one run: saturate and paced load on each (streams
//! spread over the nodes), etcd's writes per second, the watch lag between nodes, then on the
//! cluster the national reference peak through real site agents and the failover of a third of
//! the sites when their node is killed with SIGKILL.

use serde::Serialize;

use super::{
    BenchArgs, BenchError, Ctx,
    cluster_faults::{FAILOVER_TARGET, FailoverReport, PEAK_P99_TARGET_MS, PeakReport, failover, reference_peak},
    cluster_load::{PhaseFigures, Side, phase},
    latency::Latency,
    process::ServerProcess,
};
use crate::client::cluster::etcd::LocalEtcd;

/// Aggregator nodes of the cluster side, and etcd members under them.
pub const NODES: usize = 3;

/// One side's figures (1 node with its journal, or the nodes over etcd).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SideReport {
    /// Aggregator nodes.
    pub nodes: u32,
    /// etcd members (0: the single node's own journal).
    pub etcd_members: u32,
    /// Saturate: reports applied per second, summed over the nodes.
    pub saturate_applied_per_second: f64,
    /// Saturate: ack latency from the actual send (service time with the window full).
    pub saturate_ack: Latency,
    /// Saturate: etcd raft proposals committed per second (each is one write request).
    pub saturate_etcd_writes_per_second: f64,
    /// Saturate: keys etcd stored per second.
    pub saturate_etcd_keys_put_per_second: f64,
    /// Saturate: journal group commits per second (single node).
    pub saturate_journal_flushes_per_second: f64,
    /// Saturate: server CPU, cores, summed over the nodes.
    pub saturate_server_cpu_cores: f64,
    /// Saturate: node A's ack → node B answering at that revision.
    pub saturate_watch_lag: Latency,
    /// Paced: reports per second offered (`--rate`).
    pub paced_offered_per_second: f64,
    /// Paced: reports applied per second.
    pub paced_applied_per_second: f64,
    /// Paced: ack latency from the intended send time.
    pub paced_ack: Latency,
    /// Paced: batches not acknowledged within the drain (the side could not keep up).
    pub paced_unacknowledged: u64,
    /// Paced: etcd raft proposals committed per second.
    pub paced_etcd_writes_per_second: f64,
    /// Paced: keys etcd stored per second.
    pub paced_etcd_keys_put_per_second: f64,
    /// Paced: journal group commits per second (single node).
    pub paced_journal_flushes_per_second: f64,
    /// Paced: node A's ack → node B answering at that revision.
    pub paced_watch_lag: Latency,
}

impl SideReport {
    fn set(&mut self, saturate: PhaseFigures, paced: PhaseFigures, rate: u64) {
        self.saturate_applied_per_second = saturate.applied_per_second;
        self.saturate_ack = saturate.ack;
        self.saturate_etcd_writes_per_second = saturate.etcd_writes_per_second;
        self.saturate_etcd_keys_put_per_second = saturate.etcd_keys_put_per_second;
        self.saturate_journal_flushes_per_second = saturate.journal_flushes_per_second;
        self.saturate_server_cpu_cores = saturate.server_cpu_cores;
        self.saturate_watch_lag = saturate.watch_lag;
        self.paced_offered_per_second = rate as f64;
        self.paced_applied_per_second = paced.applied_per_second;
        self.paced_ack = paced.ack;
        self.paced_unacknowledged = paced.unacknowledged;
        self.paced_etcd_writes_per_second = paced.etcd_writes_per_second;
        self.paced_etcd_keys_put_per_second = paced.etcd_keys_put_per_second;
        self.paced_journal_flushes_per_second = paced.journal_flushes_per_second;
        self.paced_watch_lag = paced.watch_lag;
    }
}

/// What `bench cluster` measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterReport {
    /// Streams (one per site) of every phase.
    pub streams: u32,
    /// Seconds of each load phase (`--duration`).
    pub phase_seconds: f64,
    /// 1 node with its journal.
    pub single: SideReport,
    /// The nodes over etcd.
    pub cluster: SideReport,
    /// The reference peak on the cluster.
    pub reference_peak: PeakReport,
    /// Failover of the sites of a killed node.
    pub failover: FailoverReport,
}

/// Starts `NODES` aggregator processes on `etcd` (`--node node-K`).
fn start_nodes(ctx: &Ctx, args: &BenchArgs, etcd: &LocalEtcd) -> Result<Vec<ServerProcess>, BenchError> {
    let endpoints = etcd.endpoints().join(",");
    (0..NODES)
        .map(|k| {
            let mut spec = ctx.spec(args, "127.0.0.1:0")?;
            // Cluster nodes keep no journal (etcd is their store); the directory is not used.
            spec.data_dir = Some(ctx.scratch.path().join(format!("node-{k}")));
            spec.extra.extend(["--etcd".to_owned(), endpoints.clone(), "--node".to_owned(), format!("node-{k}")]);
            Ok(ServerProcess::start(&spec, ctx.scratch.path())?)
        })
        .collect()
}

/// Runs `bench cluster`: the single node (saturate, paced), then the cluster (saturate, paced,
/// reference peak, failover). Fails when a count disagrees, the peak is not exact on every node,
/// or a failed-over stream lost its acknowledged state (targets missed are reported, not failed).
pub(super) async fn run(ctx: &Ctx, args: &BenchArgs) -> Result<ClusterReport, BenchError> {
    let mut out =
        ClusterReport { streams: args.streams, phase_seconds: args.duration.as_secs_f64(), ..Default::default() };
    {
        let mut spec = ctx.spec(args, "127.0.0.1:0")?;
        spec.data_dir = Some(ctx.scratch.path().join("single"));
        let single = [ServerProcess::start(&spec, ctx.scratch.path())?];
        let side = Side { servers: &single, etcd: None };
        let saturate = phase(ctx, args, &side, None).await?;
        let paced = phase(ctx, args, &side, Some(args.rate())).await?;
        out.single = SideReport { nodes: 1, ..Default::default() };
        out.single.set(saturate, paced, args.rate());
    }
    let etcd = LocalEtcd::start(NODES, &ctx.scratch.path().join("etcd")).await?;
    let mut nodes = start_nodes(ctx, args, &etcd)?;
    let side = Side { servers: &nodes, etcd: Some(&etcd) };
    let saturate = phase(ctx, args, &side, None).await?;
    let paced = phase(ctx, args, &side, Some(args.rate())).await?;
    out.cluster = SideReport { nodes: NODES as u32, etcd_members: etcd.len() as u32, ..Default::default() };
    out.cluster.set(saturate, paced, args.rate());
    out.reference_peak = reference_peak(ctx, args, &nodes).await?;
    out.failover = failover(ctx, args, &mut nodes).await?;
    drop(nodes);
    drop(etcd);
    Ok(out)
}

/// Prints the comparison for people.
pub fn print(r: &ClusterReport, out: &mut impl std::io::Write) {
    let (a, b) = (&r.single, &r.cluster);
    let lat = |l: &Latency| format!("{:.2} / {:.2}", l.p50_ms, l.p99_ms);
    let lag = |l: &Latency| if l.samples == 0 { "-".to_owned() } else { format!("{:.2} / {:.2}", l.p50_ms, l.p99_ms) };
    let num = |v: f64, on: bool| if on { format!("{v:.0}") } else { "-".to_owned() };
    let cluster_title = format!("{} nodes on {}-member etcd", b.nodes, b.etcd_members);
    let _ =
        writeln!(out, "bench cluster | {} streams (one per site), {:.0} s per load phase", r.streams, r.phase_seconds);
    let _ = writeln!(out, "{:<40} {:>22} {:>28}", "", "1 node + journal", cluster_title);
    let mut row = |what: &str, x: String, y: String| {
        let _ = writeln!(out, "{what:<40} {x:>22} {y:>28}");
    };
    row(
        "saturate: applied reports/s",
        num(a.saturate_applied_per_second, true),
        num(b.saturate_applied_per_second, true),
    );
    row("saturate: ack p50 / p99 ms (from send)", lat(&a.saturate_ack), lat(&b.saturate_ack));
    row(
        "saturate: etcd writes/s (keys put/s)",
        "-".into(),
        format!("{:.0} ({:.0})", b.saturate_etcd_writes_per_second, b.saturate_etcd_keys_put_per_second),
    );
    row("saturate: journal commits/s", num(a.saturate_journal_flushes_per_second, true), "-".into());
    row(
        "saturate: server CPU cores",
        format!("{:.2}", a.saturate_server_cpu_cores),
        format!("{:.2}", b.saturate_server_cpu_cores),
    );
    row("saturate: watch lag A→B p50 / p99 ms", lag(&a.saturate_watch_lag), lag(&b.saturate_watch_lag));
    row(
        &format!("paced {:.0}/s: applied reports/s", b.paced_offered_per_second),
        num(a.paced_applied_per_second, true),
        num(b.paced_applied_per_second, true),
    );
    row("paced: ack p50 / p99 ms (from schedule)", lat(&a.paced_ack), lat(&b.paced_ack));
    row("paced: batches unacknowledged", a.paced_unacknowledged.to_string(), b.paced_unacknowledged.to_string());
    row(
        "paced: etcd writes/s (keys put/s)",
        "-".into(),
        format!("{:.0} ({:.0})", b.paced_etcd_writes_per_second, b.paced_etcd_keys_put_per_second),
    );
    row("paced: journal commits/s", num(a.paced_journal_flushes_per_second, true), "-".into());
    row("paced: watch lag A→B p50 / p99 ms", lag(&a.paced_watch_lag), lag(&b.paced_watch_lag));
    let p = &r.reference_peak;
    let _ = writeln!(
        out,
        "reference peak on the cluster (1.5 M check-ins / 30 min = {:.0}/s mean, wave up to ×{:.1}, {} site agents, {:.0} s): \
         {} check-ins, ack p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms (target p99 ≤ {PEAK_P99_TARGET_MS:.0} ms: {}), \
         exact on {} of {} nodes",
        p.offered_per_second,
        p.peak_factor,
        p.agents,
        p.seconds,
        p.check_ins,
        p.ack.p50_ms,
        p.ack.p99_ms,
        p.ack.p999_ms,
        if p.ack.p99_ms <= PEAK_P99_TARGET_MS { "met" } else { "MISSED" },
        p.nodes_exact,
        b.nodes
    );
    let f = &r.failover;
    let _ = writeln!(
        out,
        "failover: kill -9 of node-0 holding {} of {} streams → all resumed on the other nodes and their resend \
         acknowledged in {:.2} s (target ≤ {:.0} s: {}); per stream p50 {:.0} ms p99 {:.0} ms; {} resumes held the \
         acknowledged state; exact on {} of {} survivors",
        f.killed_node_streams,
        f.streams,
        f.seconds_to_all,
        FAILOVER_TARGET.as_secs_f64(),
        if f.seconds_to_all <= FAILOVER_TARGET.as_secs_f64() { "met" } else { "MISSED" },
        f.per_stream.p50_ms,
        f.per_stream.p99_ms,
        f.resumed_durable,
        f.survivors_exact,
        b.nodes.saturating_sub(1)
    );
}
