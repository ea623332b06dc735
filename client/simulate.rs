//! The national simulation (the main job): an aggregator plus one reporter per site desk, check-ins
//! on realistic compressed curves with duplicates, forced reconnects, corrections and silent
//! sites; then every level's total is checked against the simulated ground truth.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinSet;
use tonic::transport::Channel;

pub(super) use super::simulate_plan::{DeskPlan, Plan, arrived, plan};
pub use super::simulate_report::{SimulationReport, print_report};
use super::{
    connect::{ConnectError, authorized, endpoint},
    dashboard::thousands,
    limits::{FD_RESERVE, check_ports, check_streams_per_connection, ensure_open_files},
    reporter::{Reporter, ReporterConfig, backoff::BackoffConfig, state::MemoryStore},
};
use crate::{
    proto::v1::{BreakdownOrder, BreakdownRequest, Scope, ScopeKind, WatchRequest, totals_client::TotalsClient},
    server::{
        Aggregator, AggregatorConfig, Auth, RunningServer, Transport,
        durability::DurabilityConfig,
        http,
        registry::{
            Registry,
            generate::{GenerateOptions, generate},
        },
    },
};

/// Flags of `headcount simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Number of sites in the generated registry (reference: 10,035).
    #[arg(long, default_value_t = 10_035)]
    pub sites: u32,
    /// Registry and traffic seed.
    #[arg(long, default_value_t = crate::server::registry::generate::DEFAULT_SEED)]
    pub seed: u64,
    /// Wall-clock length of the compressed event (all sessions).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Sites sharing one HTTP/2 connection (each site still has its own stream per desk).
    #[arg(long, default_value_t = 200)]
    pub sites_per_connection: u32,
    /// Give every site its own connection (needs a high `ulimit -n`).
    #[arg(long)]
    pub connection_per_site: bool,
    /// Sites that never connect (flagged silent).
    #[arg(long, default_value_t = 12)]
    pub silent_sites: u32,
    /// Probability that a reporter sends a batch twice.
    #[arg(long, default_value_t = 0.02)]
    pub duplicate_probability: f64,
    /// Forced stream reconnects spread over the run.
    #[arg(long, default_value_t = 500)]
    pub reconnects: u32,
    /// Desks that scan some badges twice and then correct their count.
    #[arg(long, default_value_t = 40)]
    pub corrections: u32,
    /// Ticks per second at which each desk hands its arrivals to its reporter.
    #[arg(long, default_value_t = 2)]
    pub ticks_per_second: u32,
    /// How long to wait for the last acknowledgements.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub flush_timeout: Duration,
    /// Run the aggregator without its journal (by default it journals to a temporary directory).
    #[arg(long)]
    pub in_memory: bool,
    /// The register model instead of the people model: one reporter per desk sending head counts
    /// (with duplicate batches, `--reconnects` forced stream reconnects and `--corrections`; the
    /// throughput model). By default (the people model) one site agent per site (its own install
    /// slot) serves all the site's desks, which scan delegates' badges (with repeat scans, also
    /// at another desk, answered "already checked in"); `--reconnects` agents are killed and
    /// restarted from their state; every level must equal the number of distinct delegates.
    #[arg(long)]
    pub registers: bool,
    /// Cluster mode: run N aggregator nodes (`headcount-server` processes) over etcd instead of
    /// one in-process aggregator, spread the sites over them (each agent given every node's
    /// address, its own first), kill -9 one node in the middle, and check every level on every
    /// node, the killed one restarted (see `simulate_cluster`). Needs `--etcd` or an installed `etcd`.
    #[arg(long, value_name = "N")]
    pub cluster: Option<u32>,
    /// With --cluster: etcd client URLs to use (default: a local 3-member etcd started for the run).
    #[arg(long, value_delimiter = ',', requires = "cluster")]
    pub etcd: Vec<String>,
    /// Print the final report as JSON (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Serve the live dashboard (page, JSON API, exports, /metrics) here while the simulation runs.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http_listen: std::net::SocketAddr,
    /// No dashboard.
    #[arg(long)]
    pub no_http: bool,
    /// After the verdict, keep the aggregator and its dashboard up until Ctrl-C.
    #[arg(long)]
    pub serve_after: bool,
}

impl Default for SimulateArgs {
    fn default() -> Self {
        Self {
            sites: 10_035,
            seed: crate::server::registry::generate::DEFAULT_SEED,
            duration: Duration::from_secs(30),
            sites_per_connection: 200,
            connection_per_site: false,
            silent_sites: 12,
            duplicate_probability: 0.02,
            reconnects: 500,
            corrections: 40,
            ticks_per_second: 2,
            flush_timeout: Duration::from_secs(120),
            in_memory: false,
            registers: false,
            json: false,
            quiet: true,
            http_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            no_http: false,
            serve_after: false,
            cluster: None,
            etcd: Vec::new(),
        }
    }
}

/// Why the simulation could not run (a mismatch is not an error: it is in the report).
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// Server start failed.
    #[error("cannot start the aggregator: {0}")]
    Start(#[from] std::io::Error),
    /// Connection setup failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A reporter could not start or flush.
    #[error("reporter: {0}")]
    Reporter(#[from] super::reporter::ReporterError),
    /// A totals query failed.
    #[error("totals query: {0}")]
    Query(#[from] tonic::Status),
    /// Bad flags.
    #[error("{0}")]
    Args(String),
}

/// Runs the simulation against an in-process aggregator on 127.0.0.1.
pub async fn run(args: &SimulateArgs) -> Result<SimulationReport, SimulateError> {
    if let Some(nodes) = args.cluster {
        return super::simulate_cluster::run(args, nodes).await;
    }
    if args.sites == 0 || args.ticks_per_second == 0 || args.sites_per_connection == 0 {
        return Err(SimulateError::Args("--sites, --ticks-per-second and --sites-per-connection must be > 0".into()));
    }
    let registry = generate(&GenerateOptions { sites: args.sites, seed: args.seed, ..GenerateOptions::default() });
    // People model: every site's agent is a fresh install whose first stream waits for two
    // journal flushes (its slot claim, then its resume), and all of them start within the first
    // tick (a real event spreads them over the morning). Admit them all at once rather than
    // refusing most with RESOURCE_EXHAUSTED and letting them back off (that path has its own tests).
    let max_concurrent_handshakes = if args.registers { 512 } else { registry.sites.len().max(512) };
    let transport = Transport { max_streams_per_connection: 4096, max_concurrent_handshakes, ..Transport::default() };
    check_limits(args, &registry, &transport)?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
    let plan = plan(&registry, args.silent_sites, args.corrections, &mut rng);
    let secret: [u8; 32] = rng.random();
    let auth = Auth::new(&secret).map_err(|e| SimulateError::Args(e.to_string()))?;
    let config = AggregatorConfig {
        publish_tick: Duration::from_millis(100),
        curve_bucket: (args.duration / 60).max(Duration::from_millis(100)),
        silent_after: args.duration.max(Duration::from_secs(10)),
        ..AggregatorConfig::default()
    };
    let session_count = registry.sessions.len();
    let data_dir = tempfile::Builder::new().prefix("headcount-sim-").tempdir()?;
    let agg = if args.in_memory {
        Aggregator::new(registry.clone(), config)
    } else {
        Aggregator::open(registry.clone(), config, DurabilityConfig::new(data_dir.path()))
            .map_err(|e| SimulateError::Args(format!("cannot open the data directory: {e}")))?
            .0
    };
    let server = RunningServer::start(
        "127.0.0.1:0".parse().map_err(|_| SimulateError::Args("addr".into()))?,
        agg,
        auth.clone(),
        transport,
    )
    .await?;
    let url = server.url();
    if !args.no_http {
        let l = std::net::TcpListener::bind(args.http_listen)?;
        let (addr, _) = http::spawn(l, server.aggregator.clone(), auth.clone(), http::HttpConfig::default())?;
        if !args.quiet || args.serve_after {
            eprintln!("Dashboard: http://{addr}/login?token={}", auth.read_token("simulation"));
        }
    }

    // Connections: shared by `sites_per_connection` sites, or one per site.
    let per_conn = if args.connection_per_site { 1 } else { args.sites_per_connection } as usize;
    let n_conns = registry.sites.len().div_ceil(per_conn);
    let ep = endpoint(&url)?;
    let channels: Vec<Channel> = (0..n_conns).map(|_| ep.connect_lazy()).collect();

    let backoff =
        BackoffConfig { initial: Duration::from_millis(200), max: Duration::from_secs(5), ..BackoffConfig::default() };
    let mut reporters: Vec<Arc<Reporter>> = Vec::with_capacity(plan.desks.len());
    for dp in &plan.desks {
        let site = &registry.sites[dp.site as usize];
        if !args.registers {
            break; // badge mode: each site's driver runs (and restarts) its own agent
        }
        let mut cfg = ReporterConfig::new(site.id.clone(), dp.desk, auth.site_token(&site.id));
        cfg.backoff = backoff;
        cfg.duplicate_probability = args.duplicate_probability;
        let ch = channels[dp.site as usize / per_conn].clone();
        reporters.push(Arc::new(Reporter::spawn(ch, cfg, Arc::new(MemoryStore::new()))?));
    }

    let total: u64 = plan.desks.iter().flat_map(|d| d.totals.iter()).map(|&n| u64::from(n)).sum();
    let progress = Arc::new(AtomicU64::new(0));
    let show = !args.json && !args.quiet;
    let bar = if show { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} check-ins  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let read_token = auth.read_token("simulation");
    let watcher = tokio::spawn(watch_national(channels[0].clone(), read_token.clone(), bar.clone(), progress.clone()));

    let start = Instant::now();
    tracing::info!(reporters = reporters.len(), "reporters spawned");
    let duration = args.duration;
    let tick = Duration::from_secs(1) / args.ticks_per_second;
    let mut desks = JoinSet::new();
    let restarts = Arc::new(AtomicU64::new(0));
    // Badge mode: the site agents, kept running (heartbeats) until the totals are verified.
    // A std Mutex: held only to push or take.
    let agents: Arc<std::sync::Mutex<Vec<Arc<Reporter>>>> = Arc::default();
    if !args.registers {
        // One agent per site serving its desks (consecutive in the plan), some restarted.
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
        for (desks_of_site, restarts_planned) in per_site.iter().zip(restart_counts) {
            let site = &registry.sites[desks_of_site[0].site as usize];
            let mut config = ReporterConfig::new(site.id.clone(), 1, auth.site_token(&site.id));
            config.backoff = backoff;
            config.duplicate_probability = args.duplicate_probability;
            config.agent_install = true;
            // Badge runs take longer than `--duration`: keep finished sites "reporting".
            config.heartbeat_interval = args.duration.max(Duration::from_secs(10)) / 3;
            let one = super::simulate_badges::Site {
                aggregators: super::aggregators::Aggregators::single(
                    channels[desks_of_site[0].site as usize / per_conn].clone(),
                ),
                config,
                desks: desks_of_site.iter().map(|d| d.totals.clone()).collect(),
                sessions: registry.sessions.iter().map(|s| s.id).collect(),
                seed: args.seed ^ (u64::from(desks_of_site[0].site) << 8),
                restarts: restarts_planned,
            };
            let timing = super::simulate_badges::Timing {
                duration,
                tick,
                phase: Duration::from_micros(rng.random_range(0..tick.as_micros() as u64)),
                flush_timeout: args.flush_timeout,
            };
            let (progress, restarts, agents) = (progress.clone(), restarts.clone(), agents.clone());
            desks.spawn(async move {
                let (n, agent) = super::simulate_badges::drive_site(one, timing, arrived, progress).await?;
                restarts.fetch_add(u64::from(n), Relaxed);
                agents.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(agent);
                Ok(false)
            });
        }
    }
    for (k, dp) in plan.desks.iter().enumerate().take(reporters.len()) {
        let reporter = reporters[k].clone();
        let session_ids: Vec<u32> = registry.sessions.iter().map(|s| s.id).collect();
        let totals = dp.totals.clone();
        let correction = dp.correction;
        let progress = progress.clone();
        let phase = Duration::from_micros(rng.random_range(0..tick.as_micros() as u64));
        desks.spawn(drive_desk(reporter, session_ids, totals, correction, duration, tick, phase, progress));
    }
    // Forced reconnects at random moments.
    let chaos = {
        let reporters = reporters.clone();
        let n = args.reconnects;
        let seed = args.seed;
        tokio::spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc4a05);
            let step = duration / n.max(1);
            for _ in 0..if reporters.is_empty() { 0 } else { n } {
                tokio::time::sleep(step).await;
                let r = &reporters[rng.random_range(0..reporters.len())];
                let _ = r.reconnect().await;
            }
        })
    };
    let mut corrections = 0;
    while let Some(res) = desks.join_next().await {
        match res {
            Ok(Ok(did)) => corrections += u32::from(did),
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(SimulateError::Args(format!("desk task failed: {e}"))),
        }
    }
    let _ = chaos.await;
    tracing::info!(elapsed = ?start.elapsed(), "desks done");
    bar.set_message("waiting for the last acknowledgements");
    for r in &reporters {
        r.flush(args.flush_timeout).await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    server.aggregator.sweep_now();
    let stats = server.aggregator.stats();
    watcher.abort();
    bar.finish_and_clear();

    tracing::info!(elapsed = ?start.elapsed(), "flushed");
    // Badge mode: agent restarts (each one also a reconnect).
    let reconnects: u64 =
        reporters.iter().map(|r| r.status().connects.saturating_sub(1)).sum::<u64>() + restarts.load(Relaxed);
    let (checked, mismatches) =
        verify(channels[0].clone(), &read_token, &registry, &plan.expected, session_count).await?;
    tracing::info!(elapsed = ?start.elapsed(), "verified");
    let silent = {
        let mut c = TotalsClient::new(channels[0].clone());
        let req = authorized(crate::proto::v1::SilentSitesRequest { scope: None, limit: 0 }, &read_token)?;
        c.silent_sites(req).await?.into_inner().total_silent
    };
    let agents = std::mem::take(&mut *agents.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    for r in reporters.into_iter().chain(agents) {
        if let Ok(r) = Arc::try_unwrap(r) {
            r.shutdown().await;
        }
    }
    let mut mismatches = mismatches;
    if silent as usize != plan.silent.len() {
        mismatches.push(format!("{silent} sites flagged silent, {} never connected", plan.silent.len()));
    }
    let report = SimulationReport {
        sites: registry.sites.len(),
        reporters: plan.desks.len(),
        connections: n_conns,
        check_ins: total,
        reports_applied: stats.applied,
        reports_unchanged: stats.unchanged,
        reports_rejected: stats.rejected,
        reconnects,
        corrections,
        silent_sites: silent,
        seconds,
        check_ins_per_second: total as f64 / seconds.max(1e-9),
        totals_checked: checked,
        mismatch_count: mismatches.len(),
        mismatches: mismatches.into_iter().take(20).collect(),
        cluster: None,
    };
    if args.serve_after {
        // The verdict now; the caller does not print it again.
        let mut out = std::io::stdout().lock();
        if args.json {
            let _ = serde_json::to_writer_pretty(&mut out, &report);
            let _ = writeln!(out);
        } else {
            print_report(&report, &mut out);
        }
        let _ = out.flush();
        drop(out);
        eprintln!("The aggregator and its dashboard stay up; Ctrl-C stops them.");
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!(elapsed = ?start.elapsed(), "stopping");
    let _ = server.stop().await;
    tracing::info!(elapsed = ?start.elapsed(), "stopped");
    Ok(report)
}

/// Refuses at once a run the aggregator or the machine cannot carry: more desk streams on one
/// connection than the aggregator admits, more open files (both ends of every connection live in
/// this process) than `RLIMIT_NOFILE` allows after raising the soft limit to the hard one, more
/// connections than ephemeral ports.
pub(super) fn check_limits(
    args: &SimulateArgs,
    registry: &Registry,
    transport: &Transport,
) -> Result<(), SimulateError> {
    let per_conn = if args.connection_per_site { 1 } else { args.sites_per_connection as usize };
    let busiest = registry
        .sites
        .chunks(per_conn)
        .map(|sites| sites.iter().map(|s| u64::from(s.desks)).sum::<u64>())
        .max()
        .unwrap_or(0);
    let most_desks = registry.sites.iter().map(|s| u64::from(s.desks)).max().unwrap_or(1).max(1);
    check_streams_per_connection(
        busiest,
        transport.max_streams_per_connection,
        &format!("--sites-per-connection {} (one stream per desk)", args.sites_per_connection),
        &format!(
            "Use --sites-per-connection {} or fewer.",
            (u64::from(transport.max_streams_per_connection) / most_desks).max(1)
        ),
    )
    .map_err(|e| SimulateError::Args(e.to_string()))?;
    let connections = registry.sites.len().div_ceil(per_conn) as u64;
    let what = if args.connection_per_site {
        format!("--connection-per-site ({connections} connections, both ends in this process)")
    } else {
        format!("{connections} connections (both ends in this process)")
    };
    let fix = if args.connection_per_site {
        "drop --connection-per-site (sites then share connections, --sites-per-connection)."
    } else {
        "raise --sites-per-connection."
    };
    ensure_open_files(2 * connections + FD_RESERVE, &what, fix).map_err(|e| SimulateError::Args(e.to_string()))?;
    check_ports(connections, &what, fix).map_err(|e| SimulateError::Args(e.to_string()))?;
    Ok(())
}

/// Feeds one desk's arrivals to its reporter on each tick, session after session.
/// Returns whether it performed a correction.
#[allow(clippy::too_many_arguments)]
pub(super) async fn drive_desk(
    reporter: Arc<Reporter>,
    sessions: Vec<u32>,
    totals: Vec<u32>,
    correction: Option<(usize, u32)>,
    duration: Duration,
    tick: Duration,
    phase: Duration,
    progress: Arc<AtomicU64>,
) -> Result<bool, super::reporter::ReporterError> {
    let window = duration / sessions.len().max(1) as u32;
    let start = tokio::time::Instant::now() + phase;
    let mut corrected = false;
    for (s, (&id, &target)) in sessions.iter().zip(&totals).enumerate() {
        let begin = start + window * s as u32;
        let mut sent = 0u32;
        let mut at = begin;
        while sent < target {
            at += tick;
            tokio::time::sleep_until(at).await;
            let x = (at - begin).as_secs_f64() / window.as_secs_f64();
            let due = ((f64::from(target) * arrived(x)).round() as u32).min(target);
            if x >= 1.0 || due > sent {
                let n = if x >= 1.0 { target - sent } else { due - sent };
                reporter.check_in(id, n).await?;
                progress.fetch_add(u64::from(n), Relaxed);
                sent += n;
            }
        }
        if let Some((cs, extra)) = correction
            && cs == s
        {
            // Badges scanned twice by mistake, then corrected away.
            reporter.check_in(id, extra).await?;
            reporter.correct(id, i64::from(target), "badges scanned twice").await?;
            corrected = true;
        }
    }
    Ok(corrected)
}

/// Shows the aggregator's live national total (from a Watch stream) next to the progress bar.
pub(super) async fn watch_national(channel: Channel, token: String, bar: ProgressBar, progress: Arc<AtomicU64>) {
    let mut client = TotalsClient::new(channel);
    let Ok(req) = authorized(WatchRequest { scope: None, session: None, include_children: false }, &token) else {
        return;
    };
    let Ok(resp) = client.watch(req).await else { return };
    let mut stream = resp.into_inner();
    while let Ok(Some(u)) = stream.message().await {
        bar.set_position(progress.load(Relaxed));
        if let Some(t) = u.totals {
            bar.set_message(format!(
                "national {} ({:.1} %), {}/{} sites reporting",
                thousands(t.count),
                t.turnout_pct,
                t.sites_reporting,
                t.sites_total
            ));
        }
    }
}

/// Compares every level's totals (per session and all sessions) with the ground truth.
pub(super) async fn verify(
    channel: Channel,
    token: &str,
    registry: &Registry,
    expected: &[Vec<i64>],
    sessions: usize,
) -> Result<(usize, Vec<String>), SimulateError> {
    let mut client = TotalsClient::new(channel);
    let mut checked = 0;
    let mut bad = Vec::new();
    let want = |sites: &mut dyn Iterator<Item = u32>, s: Option<usize>| -> i64 {
        sites
            .map(|i| match s {
                Some(s) => expected[i as usize][s],
                None => expected[i as usize].iter().sum(),
            })
            .sum()
    };
    let session_opts: Vec<Option<usize>> = std::iter::once(None).chain((0..sessions).map(Some)).collect();
    for s in session_opts {
        let session = s.map(|k| registry.sessions[k].id);
        let mut scopes = vec![Scope { kind: ScopeKind::National as i32, id: String::new() }];
        scopes
            .extend(registry.provinces.iter().map(|p| Scope { kind: ScopeKind::Province as i32, id: p.code.clone() }));
        scopes.extend(registry.communes.iter().map(|c| Scope { kind: ScopeKind::Commune as i32, id: c.id.clone() }));
        for scope in scopes {
            let req = authorized(
                BreakdownRequest { scope: Some(scope.clone()), session, order: BreakdownOrder::Id as i32, limit: 0 },
                token,
            )?;
            let b = client.breakdown(req).await?.into_inner();
            let parent = b.parent.unwrap_or_default();
            let expect_parent = match ScopeKind::try_from(scope.kind) {
                Ok(ScopeKind::Province) => {
                    let p = registry.province(&scope.id).unwrap_or(0);
                    want(&mut (0..registry.sites.len() as u32).filter(|&i| registry.sites[i as usize].province == p), s)
                }
                Ok(ScopeKind::Commune) => {
                    let c = registry.commune(&scope.id).unwrap_or(0);
                    want(&mut registry.communes[c as usize].sites.iter().copied(), s)
                }
                _ => want(&mut (0..registry.sites.len() as u32), s),
            };
            checked += 1;
            if parent.count != expect_parent {
                bad.push(format!("{} session {session:?}: {} != expected {expect_parent}", parent.name, parent.count));
            }
            // Commune breakdowns list sites: check each site too.
            if scope.kind == ScopeKind::Commune as i32 {
                for child in &b.children {
                    let id = child.scope.as_ref().map_or("", |x| x.id.as_str());
                    let i = registry.site(id).unwrap_or(0);
                    let e = want(&mut std::iter::once(i), s);
                    checked += 1;
                    if child.count != e {
                        bad.push(format!("site {id} session {session:?}: {} != expected {e}", child.count));
                    }
                }
            }
        }
    }
    Ok((checked, bad))
}
