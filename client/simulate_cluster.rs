//! `headcount simulate --cluster N`: the main job on N aggregator nodes over etcd. The nodes are
//! real `headcount-server` processes (the binary beside this one) on the etcd cluster given with
//! `--etcd`, or on a local three-member etcd started for the run ([`LocalEtcd`], needs `etcd`
//! installed). Site i starts on node i mod N and its agent is given every node's address, its
//! own first, so it fails over by itself. Halfway through the event one node is killed with
//! SIGKILL (no graceful flush: its streams die mid-flight); after the last acknowledgement it is
//! restarted, and every level of every session is checked on EVERY node, the restarted one too.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::{
    aggregators::{Aggregator, Aggregators},
    bench::process::{ServerSpec, sibling_binary},
    cluster::{etcd::LocalEtcd, nodes::NodeSet},
    connect::{authorized, endpoint},
    reporter::{Reporter, ReporterConfig, backoff::BackoffConfig, state::MemoryStore},
    simulate::{
        DeskPlan, Plan, SimulateArgs, SimulateError, SimulationReport, arrived, check_limits, drive_desk, plan, verify,
        watch_national,
    },
    simulate_badges::{Site, Timing, drive_site},
};
use crate::{
    proto::v1::{SilentSitesRequest, StatsRequest, TotalsRequest, totals_client::TotalsClient},
    server::{
        Auth, Transport,
        registry::{
            Registry,
            generate::{GenerateOptions, generate},
        },
    },
};

/// How long every node may take to show the expected national total after the last ack.
const CONVERGE: Duration = Duration::from_secs(60);

/// What cluster mode adds to the simulation report.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterOutcome {
    /// Aggregator nodes.
    pub nodes: u32,
    /// The etcd client URLs the nodes used.
    pub etcd: Vec<String>,
    /// True when the run started its own local etcd.
    pub local_etcd: bool,
    /// The node killed with SIGKILL halfway through (then restarted before the checks).
    pub killed: String,
    /// Seconds into the event at which it was killed.
    pub killed_at_seconds: f64,
    /// Nodes on which every level was checked (all of them, the restarted one included).
    pub nodes_verified: Vec<String>,
}

/// Node `k`'s name.
fn node_name(k: usize) -> String {
    format!("sim-node-{k}")
}

/// Runs the simulation on `n` nodes (2 to 9: a node is killed, the others carry on).
pub async fn run(args: &SimulateArgs, n: u32) -> Result<SimulationReport, SimulateError> {
    if !(2..=9).contains(&n) {
        return Err(SimulateError::Args(format!("--cluster {n}: use 2 to 9 nodes (one is killed halfway)")));
    }
    if args.serve_after || args.in_memory {
        return Err(SimulateError::Args(
            "--cluster does not combine with --serve-after or --in-memory (cluster nodes keep no journal: etcd is \
             their store)"
                .into(),
        ));
    }
    if args.sites == 0 || args.ticks_per_second == 0 || args.sites_per_connection == 0 {
        return Err(SimulateError::Args("--sites, --ticks-per-second and --sites-per-connection must be > 0".into()));
    }
    let n = n as usize;
    let registry = generate(&GenerateOptions { sites: args.sites, seed: args.seed, ..GenerateOptions::default() });
    let transport = Transport { max_streams_per_connection: 4096, ..Transport::default() };
    check_limits(args, &registry, &transport)?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
    let plan = plan(&registry, args.silent_sites, args.corrections, &mut rng);
    let secret = hex::encode(rng.random::<[u8; 32]>());
    let auth = Auth::new(secret.as_bytes()).map_err(|e| SimulateError::Args(e.to_string()))?;
    let scratch = tempfile::Builder::new().prefix("headcount-sim-cluster-").tempdir()?;

    let (etcd_urls, local) = if args.etcd.is_empty() {
        let local = LocalEtcd::start(3, &scratch.path().join("etcd"))
            .await
            .map_err(|e| SimulateError::Args(format!("--cluster without --etcd starts a local etcd: {e}")))?;
        (local.endpoints(), Some(local))
    } else {
        (args.etcd.clone(), None)
    };
    // A prefix of its own: a given etcd may hold other events, or earlier runs.
    let prefix = format!("/headcount-sim-{:016x}", rng.random::<u64>());
    let mut nodes = start_nodes(args, &registry, n, &secret, &etcd_urls, &prefix, scratch.path())?;
    let urls: Vec<String> = (0..n).filter_map(|k| nodes.url(k)).collect();

    // Connections: per node, shared by `sites_per_connection` sites (one per site if asked).
    let per_conn = if args.connection_per_site { 1 } else { args.sites_per_connection } as usize;
    let per_node = registry.sites.len().div_ceil(n).div_ceil(per_conn).max(1);
    let channels: Vec<Vec<Channel>> = urls
        .iter()
        .map(|u| endpoint(u).map(|ep| (0..per_node).map(|_| ep.connect_lazy()).collect()))
        .collect::<Result<_, _>>()?;
    let backoff =
        BackoffConfig { initial: Duration::from_millis(200), max: Duration::from_secs(5), ..BackoffConfig::default() };
    // Site i: its own node first, then the others in turn.
    let aggregators_of = |site: usize| {
        let (home, conn) = (site % n, site / n / per_conn % per_node);
        let list = (0..n)
            .map(|j| (home + j) % n)
            .map(|k| Aggregator { url: urls[k].clone(), channel: channels[k][conn].clone() })
            .collect();
        Aggregators::from_list(list).ok_or_else(|| SimulateError::Args("no aggregator node".into()))
    };
    let mut reporters: Vec<Arc<Reporter>> = Vec::with_capacity(plan.desks.len());
    for dp in plan.desks.iter().filter(|_| args.registers) {
        let site = &registry.sites[dp.site as usize];
        let mut cfg = ReporterConfig::new(site.id.clone(), dp.desk, auth.site_token(&site.id));
        cfg.backoff = backoff;
        cfg.duplicate_probability = args.duplicate_probability;
        reporters.push(Arc::new(Reporter::spawn_with(
            aggregators_of(dp.site as usize)?,
            cfg,
            Arc::new(MemoryStore::new()),
        )?));
    }

    let total: u64 = plan.desks.iter().flat_map(|d| d.totals.iter()).map(|&n| u64::from(n)).sum();
    let progress = Arc::new(AtomicU64::new(0));
    let show = !args.json && !args.quiet;
    let bar = if show { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
    let read_token = auth.read_token("simulation");
    // The progress watch reads the last node: the first is the one killed.
    let watcher =
        tokio::spawn(watch_national(channels[n - 1][0].clone(), read_token.clone(), bar.clone(), progress.clone()));
    let start = Instant::now();
    let tick = Duration::from_secs(1) / args.ticks_per_second;
    let mut desks = JoinSet::new();
    let restarts = Arc::new(AtomicU64::new(0));
    // People model: the site agents, kept running (heartbeats) until every node is verified.
    // A std Mutex: held only to push or take.
    let agents: Arc<std::sync::Mutex<Vec<Arc<Reporter>>>> = Arc::default();
    if !args.registers {
        for site in badge_sites(&registry, &plan, args, &auth, backoff, &mut rng, &aggregators_of)? {
            let phase = Duration::from_micros(rng.random_range(0..tick.as_micros() as u64));
            let timing = Timing { duration: args.duration, tick, phase, flush_timeout: args.flush_timeout };
            let (progress, restarts, agents) = (progress.clone(), restarts.clone(), agents.clone());
            desks.spawn(async move {
                let (n, agent) = drive_site(site, timing, arrived, progress).await?;
                restarts.fetch_add(u64::from(n), std::sync::atomic::Ordering::Relaxed);
                agents.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(agent);
                Ok(false)
            });
        }
    }
    for (dp, reporter) in plan.desks.iter().zip(&reporters) {
        let session_ids: Vec<u32> = registry.sessions.iter().map(|s| s.id).collect();
        let phase = Duration::from_micros(rng.random_range(0..tick.as_micros() as u64));
        desks.spawn(drive_desk(
            reporter.clone(),
            session_ids,
            dp.totals.clone(),
            dp.correction,
            args.duration,
            tick,
            phase,
            progress.clone(),
        ));
    }
    let chaos = spawn_reconnects(reporters.clone(), args.reconnects, args.duration, args.seed);
    // Halfway: kill -9 the first node (its sites fail over to the next address they were given).
    tokio::time::sleep(args.duration / 2).await;
    nodes.kill9(0);
    let killed_at = start.elapsed().as_secs_f64();
    tracing::info!(node = %node_name(0), at = killed_at, "node killed (SIGKILL)");
    let mut corrections = 0;
    while let Some(res) = desks.join_next().await {
        match res {
            Ok(Ok(did)) => corrections += u32::from(did),
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(SimulateError::Args(format!("desk task failed: {e}"))),
        }
    }
    let _ = chaos.await;
    for r in &reporters {
        r.flush(args.flush_timeout).await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    watcher.abort();
    bar.finish_and_clear();
    // The killed node comes back: it lists the nation from etcd and must be exact too.
    nodes.restart(0)?;
    let reconnects: u64 = reporters.iter().map(|r| r.status().connects.saturating_sub(1)).sum::<u64>()
        + restarts.load(std::sync::atomic::Ordering::Relaxed);

    let expected_total: i64 = plan.expected.iter().flatten().sum();
    let (mut checked, mut mismatches, mut verified) = (0, Vec::new(), Vec::new());
    let (mut applied, mut unchanged, mut rejected, mut silent_seen) = (0, 0, 0, Vec::new());
    for k in 0..n {
        let name = node_name(k);
        let Some(url) = nodes.url(k) else { continue };
        let ch = endpoint(&url)?.connect_lazy();
        converge(ch.clone(), &read_token, expected_total, plan.silent.len()).await;
        let (c, bad) = verify(ch.clone(), &read_token, &registry, &plan.expected, registry.sessions.len()).await?;
        checked += c;
        mismatches.extend(bad.into_iter().map(|m| format!("{name}: {m}")));
        let mut client = TotalsClient::new(ch);
        let silent = client
            .silent_sites(authorized(SilentSitesRequest { scope: None, limit: 0 }, &read_token)?)
            .await?
            .into_inner()
            .total_silent;
        silent_seen.push((name.clone(), silent));
        let s = client.stats(authorized(StatsRequest {}, &read_token)?).await?.into_inner();
        (applied, unchanged, rejected) =
            (applied + s.reports_applied, unchanged + s.reports_unchanged, rejected + s.reports_rejected);
        verified.push(name);
    }
    for (name, silent) in &silent_seen {
        if *silent as usize != plan.silent.len() {
            mismatches.push(format!("{name}: {silent} sites flagged silent, {} never connected", plan.silent.len()));
        }
    }
    let agents = std::mem::take(&mut *agents.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    for r in reporters.into_iter().chain(agents) {
        if let Ok(r) = Arc::try_unwrap(r) {
            r.shutdown().await;
        }
    }
    drop(nodes);
    let local_etcd = local.is_some();
    drop(local);
    Ok(SimulationReport {
        sites: registry.sites.len(),
        reporters: plan.desks.len(),
        connections: per_node * n,
        check_ins: total,
        reports_applied: applied,
        reports_unchanged: unchanged,
        reports_rejected: rejected,
        reconnects,
        corrections,
        silent_sites: silent_seen.last().map_or(0, |s| s.1),
        seconds,
        check_ins_per_second: total as f64 / seconds.max(1e-9),
        totals_checked: checked,
        mismatch_count: mismatches.len(),
        mismatches: mismatches.into_iter().take(20).collect(),
        cluster: Some(ClusterOutcome {
            nodes: n as u32,
            etcd: etcd_urls,
            local_etcd,
            killed: node_name(0),
            killed_at_seconds: killed_at,
            nodes_verified: verified,
        }),
    })
}

/// People model: one agent per site serving the site's desks (consecutive in the plan), with
/// `--reconnects` crash-and-restarts spread at random over the sites, as the single-node
/// simulation builds them; each agent is given `aggregators_of(site)`.
fn badge_sites(
    registry: &Registry,
    plan: &Plan,
    args: &SimulateArgs,
    auth: &Auth,
    backoff: BackoffConfig,
    rng: &mut ChaCha8Rng,
    aggregators_of: &dyn Fn(usize) -> Result<Aggregators, SimulateError>,
) -> Result<Vec<Site>, SimulateError> {
    let mut per_site: Vec<Vec<&DeskPlan>> = Vec::new();
    for dp in &plan.desks {
        match per_site.last_mut() {
            Some(v) if v[0].site == dp.site => v.push(dp),
            _ => per_site.push(vec![dp]),
        }
    }
    let mut restart_counts = vec![0u32; per_site.len()];
    for _ in 0..if per_site.is_empty() { 0 } else { args.reconnects } {
        restart_counts[rng.random_range(0..per_site.len())] += 1;
    }
    per_site
        .iter()
        .zip(restart_counts)
        .map(|(desks, restarts)| {
            let index = desks[0].site as usize;
            let site = &registry.sites[index];
            let mut config = ReporterConfig::new(site.id.clone(), 1, auth.site_token(&site.id));
            config.backoff = backoff;
            config.duplicate_probability = args.duplicate_probability;
            config.agent_install = true;
            // Badge runs take longer than `--duration`: keep finished sites "reporting".
            config.heartbeat_interval = args.duration.max(Duration::from_secs(10)) / 3;
            Ok(Site {
                aggregators: aggregators_of(index)?,
                config,
                desks: desks.iter().map(|d| d.totals.clone()).collect(),
                sessions: registry.sessions.iter().map(|s| s.id).collect(),
                seed: args.seed ^ ((index as u64) << 8),
                restarts,
            })
        })
        .collect()
}

/// Starts `n` node processes on etcd, serving the simulation's registry (written as CSV) with
/// the simulation's model settings.
fn start_nodes(
    args: &SimulateArgs,
    registry: &Registry,
    n: usize,
    secret: &str,
    etcd: &[String],
    prefix: &str,
    scratch: &std::path::Path,
) -> Result<NodeSet, SimulateError> {
    let (sites, sessions) = (scratch.join("sites.csv"), scratch.join("sessions.csv"));
    crate::server::registry::csv::write(registry, std::fs::File::create(&sites)?, std::fs::File::create(&sessions)?)
        .map_err(|e| SimulateError::Args(format!("cannot write the registry for the nodes: {e}")))?;
    let fmt = |d: Duration| humantime::format_duration(d).to_string();
    let binary = sibling_binary()?;
    if !binary.is_file() {
        return Err(SimulateError::Args(format!(
            "--cluster runs the nodes as `headcount-server` processes, expected at {} (build it: cargo build --release)",
            binary.display()
        )));
    }
    let mut specs = Vec::with_capacity(n);
    // The people model starts every site's agent (a fresh install) within the first tick: admit
    // them at once, as the single-node simulation does.
    let handshakes = if args.registers { 512 } else { registry.sites.len().max(512) };
    for k in 0..n {
        let extra: Vec<String> = [
            ("--sites", sites.display().to_string()),
            ("--sessions", sessions.display().to_string()),
            ("--etcd", etcd.join(",")),
            ("--node", node_name(k)),
            ("--etcd-prefix", prefix.to_owned()),
            ("--publish-tick", "100ms".to_owned()),
            ("--curve-bucket", fmt((args.duration / 60).max(Duration::from_millis(100)))),
            ("--silent-after", fmt(args.duration.max(Duration::from_secs(10)))),
            ("--max-streams-per-connection", "4096".to_owned()),
            ("--max-concurrent-handshakes", handshakes.to_string()),
        ]
        .into_iter()
        .flat_map(|(f, v)| [f.to_owned(), v])
        .collect();
        let spec = ServerSpec {
            binary: binary.clone(),
            listen: "127.0.0.1:0".into(),
            // Unused in cluster mode (etcd is the store); given so the node takes no default path.
            data_dir: Some(scratch.join(node_name(k))),
            worker_threads: None,
            secret: secret.to_owned(),
            extra,
        };
        specs.push(spec);
    }
    Ok(NodeSet::start(specs, scratch)?)
}

/// Forced reconnects of random reporters, spread over the run.
fn spawn_reconnects(
    reporters: Vec<Arc<Reporter>>,
    n: u32,
    duration: Duration,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc4a05);
        let step = duration / n.max(1);
        for _ in 0..if reporters.is_empty() { 0 } else { n } {
            tokio::time::sleep(step).await;
            let _ = reporters[rng.random_range(0..reporters.len())].reconnect().await;
        }
    })
}

/// Waits (at most [`CONVERGE`]) until the node shows `expected` as the national total and
/// `silent` silent sites: every acknowledged change is in etcd and the node's watch brings it;
/// its liveness sweep (every second) sees the streams held on other nodes. The verification that
/// follows reports whatever is still missing.
async fn converge(ch: Channel, token: &str, expected: i64, silent: usize) {
    let mut client = TotalsClient::new(ch);
    let deadline = Instant::now() + CONVERGE;
    let call = Duration::from_secs(5);
    while Instant::now() < deadline {
        let (Ok(totals), Ok(silents)) = (
            authorized(TotalsRequest { scope: None, session: None, min_revision: 0 }, token),
            authorized(SilentSitesRequest { scope: None, limit: 0 }, token),
        ) else {
            return;
        };
        let count = tokio::time::timeout(call, client.get_totals(totals)).await;
        let flagged = tokio::time::timeout(call, client.silent_sites(silents)).await;
        if let (Ok(Ok(t)), Ok(Ok(f))) = (count, flagged)
            && t.get_ref().count == expected
            && f.get_ref().total_silent as usize == silent
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints the cluster part of the report for people.
pub fn print(c: &ClusterOutcome, out: &mut impl std::io::Write) {
    let _ = writeln!(
        out,
        "Cluster: {} nodes on {} etcd ({}); {} killed with SIGKILL {:.1} s into the event, its sites failed over, \
         then restarted. Every total checked on: {}.",
        c.nodes,
        if c.local_etcd { "a local 3-member" } else { "the given" },
        c.etcd.join(","),
        c.killed,
        c.killed_at_seconds,
        c.nodes_verified.join(", ")
    );
}
