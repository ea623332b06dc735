//! `headcount bench`: the project's load generator. Starts the aggregator as a separate process
//! on 127.0.0.1, drives it from this process and prints figures (or `--json`).
//!
//! Modes: `saturate` (N streams as fast as flow control allows), `paced` (a fixed national rate),
//! `idle` (open streams that only heartbeat: memory per stream), `storm` (kill -9 and restart the
//! aggregator: every stream reconnects at once), `recovery` (start-up time from a snapshot plus a
//! large journal).

pub mod process;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, transport::Channel};

use self::process::{ServerProcess, ServerSpec, sibling_binary};
use super::connect::{bearer, endpoint};
use crate::{
    proto::v1::{
        Report, ReportBatch, ReportRequest, Scope, ScopeKind, StatsRequest, TotalsRequest, WatchRequest,
        ingest_client::IngestClient, report_request, report_response, totals_client::TotalsClient,
    },
    server::{
        Auth,
        durability::{
            self,
            record::{Record, RegisterRecord},
            store::{Journal, write_snapshot},
        },
        registry::{
            Registry,
            generate::{GenerateOptions, generate},
        },
    },
};

const SECRET: &str = "headcount benchmark secret (loopback only)";

/// Benchmark modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Streams send as fast as acks and flow control allow.
    Saturate,
    /// A fixed total rate (reports per second) spread over the streams.
    Paced,
    /// Streams open and only heartbeat: memory per stream.
    Idle,
    /// Kill -9 and restart the aggregator; every stream reconnects at once.
    Storm,
    /// Start-up time from a snapshot plus a journal of `--records` records.
    Recovery,
}

/// Flags of `headcount bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value = "saturate")]
    pub mode: Mode,
    /// Concurrent reporter streams (one per site).
    #[arg(long, default_value_t = 10_035)]
    pub streams: u32,
    /// HTTP/2 connections the streams share.
    #[arg(long, default_value_t = 50)]
    pub connections: u32,
    /// How long load runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Reports per batch (one per session, cycling).
    #[arg(long, default_value_t = 4)]
    pub reports_per_batch: u32,
    /// Batches in flight per stream (saturate). The site agent pipelines up to 16; with 2, a
    /// journal's commit wait dominates the round trip and the run measures latency, not capacity.
    #[arg(long, default_value_t = 8)]
    pub window: u32,
    /// Mean total reports per second (paced).
    #[arg(long, default_value_t = 1_000_000)]
    pub rate: u64,
    /// Paced load is bursty: every stream sends at Poisson-random times, and the rate follows a
    /// wave (two periods per run) between `2 − F` and `F` times the mean. 1 gives a flat Poisson
    /// rate; at most 2.
    #[arg(long, default_value_t = 1.8)]
    pub peak_factor: f64,
    /// Server tokio worker threads (default: one per core).
    #[arg(long)]
    pub server_threads: Option<usize>,
    /// Run the aggregator without its journal.
    #[arg(long)]
    pub in_memory: bool,
    /// Journal records for `recovery`.
    #[arg(long, default_value_t = 10_000_000)]
    pub records: u64,
    /// Concurrent handshakes the server admits (storm).
    #[arg(long, default_value_t = 512)]
    pub max_handshakes: usize,
    /// Serve dashboard reads from the aggregator's separate read listener (`--read-listen`), as
    /// a deployment under heavy ingest should; queries and the watch probe use it.
    #[arg(long)]
    pub separate_reads: bool,
    /// Extra flag for the server, e.g. `--server-arg=--flush-interval=10ms` (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    pub server_arg: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The shape of paced load: Poisson arrivals per stream, their rate following a sine wave with
/// two periods per run, peaking at `peak` times the mean.
#[derive(Debug, Clone)]
struct Burst {
    /// Wave amplitude: the rate runs between `1 − amplitude` and `1 + amplitude` times the mean.
    amplitude: f64,
    period: Duration,
}

impl Burst {
    fn new(peak: f64, run: Duration) -> Self {
        Self { amplitude: (peak.clamp(1.0, 2.0) - 1.0).min(0.95), period: (run / 2).max(Duration::from_millis(100)) }
    }

    /// The time to a stream's next send, given its mean interval and the time into the run: a
    /// non-homogeneous Poisson process, drawn by thinning (candidates at the peak rate, each kept
    /// with probability rate/peak), so the wave keeps its shape even when a stream's mean
    /// interval is long against the wave's period.
    fn next_gap(&self, mean: Duration, elapsed: Duration) -> Duration {
        let peak = 1.0 + self.amplitude;
        let mut gap = Duration::ZERO;
        // Each candidate is kept with probability ≥ (1 − a)/(1 + a) ≥ 2.5 %: 1,000 candidates
        // all rejected has probability < 1e-11.
        for _ in 0..1_000 {
            let exponential = -(1.0 - rand::random_range(0.0..1.0f64)).ln();
            gap += mean.mul_f64(exponential / peak);
            let t = (elapsed + gap).as_secs_f64();
            let rate = 1.0 + self.amplitude * (std::f64::consts::TAU * t / self.period.as_secs_f64()).sin();
            if rand::random_range(0.0..1.0f64) < rate / peak {
                break;
            }
        }
        gap
    }
}

/// Latency summary, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub samples: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

fn summarize(h: &Histogram<u64>) -> Latency {
    let ms = |v: u64| v as f64 / 1000.0;
    Latency {
        samples: h.len(),
        p50_ms: ms(h.value_at_quantile(0.5)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

fn histogram() -> Histogram<u64> {
    // Microseconds up to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    /// Mode.
    pub mode: String,
    /// Streams.
    pub streams: u32,
    /// Connections.
    pub connections: u32,
    /// Journal on?
    pub journal: bool,
    /// Server worker threads (0: default).
    pub server_threads: usize,
    /// Seconds of load.
    pub seconds: f64,
    /// Reports acknowledged as applied, counted by the load generator.
    pub reports_sent: u64,
    /// Reports the aggregator counted as applied (must equal `reports_sent`).
    pub reports_applied_by_server: u64,
    /// Applied reports per second.
    pub applied_per_second: f64,
    /// Send → ack latency.
    pub ack_latency: Latency,
    /// Report sent → visible on a watch stream.
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
    /// Max/min reports applied across streams.
    pub fairness_max_over_min: f64,
    /// Seconds until every stream had its resume handshake.
    pub admit_all_seconds: f64,
    /// RESOURCE_EXHAUSTED answers while admitting (storm).
    pub admission_refusals: u64,
    /// Server start-up to serving, seconds (recovery, storm restart).
    pub startup_seconds: f64,
    /// Journal group commits per second during the load.
    pub journal_flushes_per_second: f64,
}

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Process or file trouble.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Connection trouble.
    #[error("{0}")]
    Connect(#[from] super::connect::ConnectError),
    /// An RPC failed.
    #[error("rpc: {0}")]
    Status(#[from] tonic::Status),
    /// The data directory could not be prepared.
    #[error("store: {0}")]
    Store(#[from] crate::server::durability::store::StoreError),
    /// Counts disagree.
    #[error("{0}")]
    Mismatch(String),
}

struct Ctx {
    registry: Registry,
    auth: Auth,
    scratch: tempfile::TempDir,
}

impl Ctx {
    fn spec(&self, args: &BenchArgs, listen: &str) -> Result<ServerSpec, BenchError> {
        Ok(ServerSpec {
            binary: sibling_binary()?,
            listen: listen.to_owned(),
            data_dir: (!args.in_memory).then(|| self.scratch.path().join("data")),
            worker_threads: args.server_threads,
            secret: SECRET.to_owned(),
            extra: ["--max-concurrent-handshakes".to_owned(), args.max_handshakes.to_string()]
                .into_iter()
                .chain(args.server_arg.iter().cloned())
                .collect(),
        })
    }
}

/// Runs a benchmark.
pub async fn run(args: &BenchArgs) -> Result<BenchReport, BenchError> {
    let ctx = Ctx {
        registry: generate(&GenerateOptions::default()),
        auth: Auth::new(SECRET.as_bytes()).map_err(|e| BenchError::Mismatch(e.to_string()))?,
        scratch: tempfile::Builder::new().prefix("headcount-bench-").tempdir()?,
    };
    let mut report = BenchReport {
        mode: format!("{:?}", args.mode).to_lowercase(),
        streams: args.streams.min(ctx.registry.sites.len() as u32 - 1),
        connections: args.connections.max(1),
        journal: !args.in_memory,
        server_threads: args.server_threads.unwrap_or(0),
        ..BenchReport::default()
    };
    match args.mode {
        Mode::Saturate | Mode::Paced => load(&ctx, args, &mut report).await?,
        Mode::Idle => idle(&ctx, args, &mut report).await?,
        Mode::Storm => storm(&ctx, args, &mut report).await?,
        Mode::Recovery => recovery(&ctx, args, &mut report)?,
    }
    Ok(report)
}

fn channels(url: &str, n: u32) -> Result<Vec<Channel>, BenchError> {
    let ep = endpoint(url)?;
    Ok((0..n).map(|_| ep.connect_lazy()).collect())
}

/// One raw reporter stream: the sender for requests and the inbound acks.
struct RawStream {
    tx: mpsc::Sender<ReportRequest>,
    rx: tonic::Streaming<crate::proto::v1::ReportResponse>,
    /// seq per session as resumed.
    resumed: Vec<(u32, u64)>,
}

async fn open(channel: Channel, auth: &Auth, site: &str, desk: u32) -> Result<RawStream, tonic::Status> {
    let (tx, rx) = mpsc::channel(64);
    let mut req = Request::new(ReceiverStream::new(rx));
    let md = req.metadata_mut();
    md.insert("authorization", bearer(&auth.site_token(site)).map_err(|e| tonic::Status::internal(e.to_string()))?);
    md.insert("x-headcount-site", site.parse().map_err(|_| tonic::Status::internal("site"))?);
    md.insert("x-headcount-desk", desk.into());
    let mut rx = IngestClient::new(channel).report(req).await?.into_inner();
    match rx.message().await? {
        Some(crate::proto::v1::ReportResponse { kind: Some(report_response::Kind::Resume(r)) }) => {
            Ok(RawStream { tx, rx, resumed: r.registers.iter().map(|x| (x.session, x.seq)).collect() })
        }
        _ => Err(tonic::Status::internal("no resume")),
    }
}

/// A request with the benchmark's read token (minted once).
fn authorized<T>(msg: T) -> Result<Request<T>, BenchError> {
    static READ_TOKEN: std::sync::LazyLock<Option<String>> =
        std::sync::LazyLock::new(|| Auth::new(SECRET.as_bytes()).ok().map(|a| a.read_token("bench")));
    let token = READ_TOKEN.as_deref().ok_or_else(|| BenchError::Mismatch("benchmark secret rejected".into()))?;
    Ok(super::connect::authorized(msg, token)?)
}

/// (reports applied, durable flushes) as counted by the aggregator.
async fn server_stats(ch: Channel) -> Result<(u64, u64), BenchError> {
    let s = TotalsClient::new(ch).stats(authorized(StatsRequest {})?).await?.into_inner();
    Ok((s.reports_applied, s.durable_flush))
}

/// Opens every stream (sites 1..=streams, desk 1); returns them and the time to admit all.
async fn open_all(
    ctx: &Ctx,
    chans: &[Channel],
    streams: u32,
    refusals: &AtomicU64,
) -> Result<(Vec<RawStream>, f64), BenchError> {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..streams as usize {
        let ch = chans[i % chans.len()].clone();
        let site = ctx.registry.sites[i + 1].id.clone();
        let auth = ctx.auth.clone();
        set.spawn(async move {
            let mut delay = Duration::from_millis(50);
            let mut refused = 0u64;
            for _ in 0..200 {
                match open(ch.clone(), &auth, &site, 1).await {
                    Ok(s) => return Ok((i, s, refused)),
                    // Refused (admission) or a connection reset while thousands connect at once.
                    Err(st)
                        if matches!(
                            st.code(),
                            Code::ResourceExhausted | Code::Unavailable | Code::Unknown | Code::Cancelled
                        ) =>
                    {
                        refused += u64::from(st.code() == Code::ResourceExhausted);
                        let j: f64 = rand::random_range(0.8..1.2);
                        tokio::time::sleep(delay.mul_f64(j)).await;
                        delay = (delay.mul_f64(1.6)).min(Duration::from_secs(2));
                    }
                    Err(st) => return Err(st),
                }
            }
            Err(tonic::Status::deadline_exceeded("could not open a stream in 200 attempts"))
        });
    }
    let mut out: Vec<Option<RawStream>> = (0..streams).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, s, refused) = r.map_err(|e| BenchError::Mismatch(e.to_string()))??;
        refusals.fetch_add(refused, Relaxed);
        out[i] = Some(s);
    }
    Ok((out.into_iter().flatten().collect(), started.elapsed().as_secs_f64()))
}

/// saturate / paced.
async fn load(ctx: &Ctx, args: &BenchArgs, report: &mut BenchReport) -> Result<(), BenchError> {
    let mut spec = ctx.spec(args, "127.0.0.1:0")?;
    let read_url = if args.separate_reads {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        spec.extra.extend(["--read-listen".to_owned(), format!("127.0.0.1:{port}")]);
        Some(format!("http://127.0.0.1:{port}"))
    } else {
        None
    };
    let server = ServerProcess::start(&spec, ctx.scratch.path())?;
    let url = server.url();
    let chans = channels(&url, report.connections)?;
    let refusals = AtomicU64::new(0);
    let (streams, admit) = open_all(ctx, &chans, report.streams, &refusals).await?;
    report.admit_all_seconds = admit;
    let query_ch = endpoint(read_url.as_deref().unwrap_or(&url))?
        .connect()
        .await
        .map_err(|e| BenchError::Mismatch(e.to_string()))?;
    let (applied_before, flushes_before) = server_stats(query_ch.clone()).await?;
    let cpu_before = server.cpu_seconds();

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(Mutex::new(histogram()));
    let per_stream = Arc::new((0..streams.len()).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let sessions: Vec<u32> = ctx.registry.sessions.iter().map(|s| s.id).collect();
    let rpb = args.reports_per_batch.max(1) as usize;
    // Paced: each stream sends one batch every `interval`.
    let interval = (args.mode == Mode::Paced).then(|| {
        let batches_per_sec = (args.rate as f64 / rpb as f64 / streams.len().max(1) as f64).max(0.01);
        Duration::from_secs_f64(1.0 / batches_per_sec)
    });
    let window = if interval.is_some() { 64 } else { args.window.max(1) as usize };
    let burst = Burst::new(args.peak_factor, args.duration);
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (k, s) in streams.into_iter().enumerate() {
        let stop = stop.clone();
        let acks = acks.clone();
        let per_stream = per_stream.clone();
        let sessions = sessions.clone();
        // The first send is a Poisson arrival too (a uniform first phase would add sends).
        let phase = interval.map(|i| burst.next_gap(i, Duration::ZERO));
        let burst = burst.clone();
        set.spawn(async move {
            let RawStream { tx, mut rx, resumed } = s;
            let mut seq = resumed.iter().map(|r| r.1).max().unwrap_or(0);
            let mut in_flight = std::collections::VecDeque::new();
            // Raw samples (µs); one 150 KB histogram per stream would cost the load generator
            // 1.5 GB for 10,000 streams and skew the run.
            let mut local: Vec<u32> = Vec::new();
            let mut next_send = tokio::time::Instant::now() + phase.unwrap_or_default();
            let mut sent_reports = 0u64;
            loop {
                let can_send = !stop.load(Relaxed) && in_flight.len() < window;
                let ready = interval.is_none() || tokio::time::Instant::now() >= next_send;
                if can_send && ready {
                    let reports = (0..rpb)
                        .map(|j| {
                            seq += 1;
                            Report {
                                session: sessions[j % sessions.len()],
                                seq,
                                count: seq as i64,
                                reason: String::new(),
                            }
                        })
                        .collect();
                    let msg = ReportRequest { kind: Some(report_request::Kind::Batch(ReportBatch { reports })) };
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                    in_flight.push_back(Instant::now());
                    sent_reports += rpb as u64;
                    if let Some(i) = interval {
                        next_send += burst.next_gap(i, started.elapsed());
                    }
                    continue;
                }
                if in_flight.is_empty() && stop.load(Relaxed) {
                    break;
                }
                let wait = if in_flight.is_empty() {
                    match interval {
                        Some(_) => {
                            tokio::time::sleep_until(
                                next_send.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                            )
                            .await;
                            continue;
                        }
                        None => continue,
                    }
                } else if let Some(_i) = interval {
                    match tokio::time::timeout_at(next_send, rx.message()).await {
                        Ok(m) => m,
                        Err(_) => continue,
                    }
                } else {
                    rx.message().await
                };
                match wait {
                    Ok(Some(crate::proto::v1::ReportResponse { kind: Some(report_response::Kind::Ack(a)) })) => {
                        if let Some(t) = in_flight.pop_front() {
                            local.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        }
                        let applied = (rpb as u64).saturating_sub(a.rejections.len() as u64);
                        per_stream[k].fetch_add(applied, Relaxed);
                    }
                    _ => break,
                }
            }
            if let Ok(mut h) = acks.lock() {
                for v in local {
                    let _ = h.record(u64::from(v).max(1));
                }
            }
            sent_reports
        });
    }
    // Totals queries and a watch-freshness probe while ingest runs.
    // The measuring clients run on their own threads and connections, so the load generator's
    // busy run queue does not inflate what they measure.
    let read_at = read_url.clone().unwrap_or_else(|| url.clone());
    let query = {
        let (stop, read_at) = (stop.clone(), read_at.clone());
        on_own_thread(move || async move {
            match endpoint(&read_at) {
                Ok(ep) => match ep.connect().await {
                    Ok(ch) => query_loop(ch, stop).await,
                    Err(_) => Latency::default(),
                },
                Err(_) => Latency::default(),
            }
        })?
    };
    let probe = {
        let (stop, auth, site, ingest_at) =
            (stop.clone(), ctx.auth.clone(), ctx.registry.sites[0].id.clone(), url.clone());
        on_own_thread(move || async move {
            let (Ok(i), Ok(r)) = (endpoint(&ingest_at), endpoint(&read_at)) else {
                return (Latency::default(), 0);
            };
            freshness_probe(i.connect_lazy(), r.connect_lazy(), auth, site, stop).await
        })?
    };
    let mut peak_rss = 0;
    // Fairness is measured in the steady state: from a quarter of the run to the stop. At the
    // start every stream fills its window at once and the first ~80,000 batches drain in an
    // arbitrary order, which would charge 1–2 s of start-up queueing to whichever streams
    // queued last.
    let snapshot = || per_stream.iter().map(|c| c.load(Relaxed)).collect::<Vec<u64>>();
    let warm = Instant::now() + args.duration / 4;
    let end = Instant::now() + args.duration;
    let mut at_warm = vec![0; per_stream.len()];
    let mut warmed = false;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak_rss = peak_rss.max(server.memory().0);
        if !warmed && Instant::now() >= warm {
            at_warm = snapshot();
            warmed = true;
        }
    }
    let steady: Vec<u64> = snapshot().iter().zip(&at_warm).map(|(end, warm)| end - warm).collect();
    stop.store(true, Relaxed);
    let mut sent = 0;
    while let Some(r) = set.join_next().await {
        sent += r.map_err(|e| BenchError::Mismatch(e.to_string()))?;
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
    report.reports_applied_by_server = applied;
    report.applied_per_second = applied as f64 / seconds;
    report.ack_latency = acks.lock().map(|h| summarize(&h)).unwrap_or_default();
    let (rss, hwm) = server.memory();
    report.server_rss_mb = rss as f64 / 1e6;
    report.server_peak_rss_mb = hwm.max(peak_rss) as f64 / 1e6;
    report.server_cpu_cores = cpu / seconds;
    let (mx, mn) = steady.iter().fold((0, u64::MAX), |(a, b), &v| (a.max(v), b.min(v)));
    report.fairness_max_over_min = if mn == 0 { f64::INFINITY } else { mx as f64 / mn as f64 };
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

/// Runs a future on a new thread with its own single-threaded runtime.
fn on_own_thread<F, Fut, T>(make: F) -> std::io::Result<std::thread::JoinHandle<Option<T>>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::Builder::new().name("bench-probe".into()).spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().ok().map(|rt| rt.block_on(make()))
    })
}

fn join_thread<T>(h: std::thread::JoinHandle<Option<T>>) -> Result<T, BenchError> {
    h.join()
        .map_err(|_| BenchError::Mismatch("probe thread panicked".into()))?
        .ok_or_else(|| BenchError::Mismatch("probe runtime did not start".into()))
}

async fn query_loop(ch: Channel, stop: Arc<AtomicBool>) -> Latency {
    let mut c = TotalsClient::new(ch);
    let mut h = histogram();
    while !stop.load(Relaxed) {
        let Ok(req) = authorized(TotalsRequest { scope: None, session: None }) else { break };
        let t = Instant::now();
        if c.get_totals(req).await.is_err() {
            break;
        }
        let _ = h.record(t.elapsed().as_micros() as u64);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    summarize(&h)
}

/// Reports a new count for one reserved site every 50 ms and times until a watch shows it.
async fn freshness_probe(
    ingest: Channel,
    read: Channel,
    auth: Auth,
    site: String,
    stop: Arc<AtomicBool>,
) -> (Latency, u64) {
    let mut h = histogram();
    let mut probes = 0u64;
    let Ok(mut s) = open(ingest, &auth, &site, 1).await else { return (summarize(&h), probes) };
    let Ok(req) = authorized(WatchRequest {
        scope: Some(Scope { kind: ScopeKind::Site as i32, id: site.clone() }),
        session: None,
        include_children: false,
    }) else {
        return (summarize(&h), probes);
    };
    let Ok(resp) = TotalsClient::new(read).watch(req).await else { return (summarize(&h), probes) };
    let mut watch = resp.into_inner();
    let mut seq = s.resumed.iter().map(|r| r.1).max().unwrap_or(0);
    let base = match watch.message().await {
        Ok(Some(u)) => u.totals.map_or(0, |t| t.count),
        _ => return (summarize(&h), probes),
    };
    let session = 1;
    let mut count = 0i64;
    while !stop.load(Relaxed) {
        seq += 1;
        count += 1;
        let msg = ReportRequest {
            kind: Some(report_request::Kind::Batch(ReportBatch {
                reports: vec![Report { session, seq, count: base + count, reason: String::new() }],
            })),
        };
        let sent = Instant::now();
        if s.tx.send(msg).await.is_err() {
            break;
        }
        probes += 1;
        let target = base + count;
        let seen = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(u)) = watch.message().await {
                if u.totals.is_some_and(|t| t.count >= target) {
                    return true;
                }
            }
            false
        })
        .await;
        if matches!(seen, Ok(true)) {
            let _ = h.record(sent.elapsed().as_micros() as u64);
        }
        let _ = s.rx.message().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (summarize(&h), probes)
}

/// idle: RSS growth per open, heartbeating stream.
async fn idle(ctx: &Ctx, args: &BenchArgs, report: &mut BenchReport) -> Result<(), BenchError> {
    let server = ServerProcess::start(&ctx.spec(args, "127.0.0.1:0")?, ctx.scratch.path())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Baseline before any connection, so the figure includes connection cost (which matters
    // with one connection per site and is negligible with shared connections).
    let (before, _) = server.memory();
    let chans = channels(&server.url(), report.connections)?;
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

/// storm: streams open, the aggregator is killed and restarted on the same port, and every
/// stream reopens at once (retrying RESOURCE_EXHAUSTED with jittered backoff) and resends.
async fn storm(ctx: &Ctx, args: &BenchArgs, report: &mut BenchReport) -> Result<(), BenchError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("127.0.0.1:{port}");
    let spec = ctx.spec(args, &listen)?;
    let mut server = ServerProcess::start(&spec, ctx.scratch.path())?;
    let url = server.url();
    let chans = channels(&url, report.connections)?;
    let refusals = AtomicU64::new(0);
    let (streams, _) = open_all(ctx, &chans, report.streams, &refusals).await?;
    // Each stream reports once so there is state to resync.
    for s in &streams {
        let msg = ReportRequest {
            kind: Some(report_request::Kind::Batch(ReportBatch {
                reports: vec![Report { session: 1, seq: 1, count: 7, reason: String::new() }],
            })),
        };
        let _ = s.tx.send(msg).await;
    }
    for mut s in streams {
        let _ = s.rx.message().await;
    }
    server.kill9();
    let restarted = Instant::now();
    let server = ServerProcess::start(&spec, ctx.scratch.path())?;
    report.startup_seconds = server.startup().as_secs_f64();
    let chans = channels(&url, report.connections)?;
    let refusals = AtomicU64::new(0);
    let (streams, _) = open_all(ctx, &chans, report.streams, &refusals).await?;
    // Resync: each stream resends its latest state (seq 2) and waits for the ack.
    let mut set = tokio::task::JoinSet::new();
    for mut s in streams {
        set.spawn(async move {
            let msg = ReportRequest {
                kind: Some(report_request::Kind::Batch(ReportBatch {
                    reports: vec![Report { session: 1, seq: 2, count: 7, reason: String::new() }],
                })),
            };
            let _ = s.tx.send(msg).await;
            let _ = s.rx.message().await;
            s
        });
    }
    let mut kept = Vec::new();
    while let Some(r) = set.join_next().await {
        kept.push(r.map_err(|e| BenchError::Mismatch(e.to_string()))?);
    }
    report.admit_all_seconds = restarted.elapsed().as_secs_f64();
    report.admission_refusals = refusals.load(Relaxed);
    let (rss, hwm) = server.memory();
    report.server_rss_mb = rss as f64 / 1e6;
    report.server_peak_rss_mb = hwm as f64 / 1e6;
    let national = TotalsClient::new(chans[0].clone())
        .get_totals(authorized(TotalsRequest { scope: None, session: Some(1) })?)
        .await?
        .into_inner()
        .count;
    if national != 7 * i64::from(report.streams) {
        return Err(BenchError::Mismatch(format!(
            "after the storm national is {national}, expected {}",
            7 * report.streams
        )));
    }
    drop(kept);
    Ok(())
}

/// recovery: a snapshot of the reference registry plus a journal of `records` records.
fn recovery(ctx: &Ctx, args: &BenchArgs, report: &mut BenchReport) -> Result<(), BenchError> {
    let dir: PathBuf = ctx.scratch.path().join("data");
    std::fs::create_dir_all(&dir)?;
    let reg = &ctx.registry;
    let keys: Vec<(&str, u32, u32)> = reg
        .sites
        .iter()
        .flat_map(|s| {
            (1..=u32::from(s.desks)).flat_map(move |d| reg.sessions.iter().map(move |k| (s.id.as_str(), d, k.id)))
        })
        .collect();
    let record = |(site, desk, session): (&str, u32, u32), seq: u64, count: i64| {
        Record::Register(RegisterRecord { site: site.to_owned(), desk, session, seq, count })
    };
    let io: std::sync::Arc<dyn durability::fs::Io> = std::sync::Arc::new(durability::fs::RealIo);
    write_snapshot(&*io, &dir, 1, keys.iter().map(|k| record(*k, 1, 10)))?;
    let mut journal = Journal::create(io, &dir, 1, 0)?;
    let mut buf = Vec::with_capacity(8 << 20);
    for r in 0..args.records {
        let k = keys[(r % keys.len() as u64) as usize];
        record(k, 2 + r, 10 + (r % 100) as i64).encode(&mut buf);
        if buf.len() >= 8 << 20 {
            journal.commit(&buf)?;
            buf.clear();
        }
    }
    journal.commit(&buf)?;
    drop(journal);
    let mut a = args.clone();
    a.in_memory = false;
    let server = ServerProcess::start(&ctx.spec(&a, "127.0.0.1:0")?, ctx.scratch.path())?;
    report.startup_seconds = server.startup().as_secs_f64();
    let (rss, hwm) = server.memory();
    report.server_rss_mb = rss as f64 / 1e6;
    report.server_peak_rss_mb = hwm as f64 / 1e6;
    report.reports_sent = args.records;
    Ok(())
}

/// Prints a report for people.
pub fn print(r: &BenchReport, out: &mut impl std::io::Write) {
    let _ = writeln!(
        out,
        "mode {} | streams {} over {} connections | journal {} | server threads {}",
        r.mode,
        r.streams,
        r.connections,
        if r.journal { "on" } else { "off" },
        if r.server_threads == 0 { "default".to_owned() } else { r.server_threads.to_string() }
    );
    match r.mode.as_str() {
        "saturate" | "paced" => {
            let _ = writeln!(
                out,
                "applied {:.0} reports/s ({} in {:.1} s; aggregator counted {}, load generator {})",
                r.applied_per_second,
                r.reports_applied_by_server,
                r.seconds,
                r.reports_applied_by_server,
                r.reports_sent
            );
            let l = &r.ack_latency;
            let _ = writeln!(
                out,
                "ack latency ms: p50 {:.2} p99 {:.2} p999 {:.2} max {:.2}",
                l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms
            );
            let w = &r.watch_freshness;
            let _ =
                writeln!(out, "watch freshness ms: p50 {:.1} p99 {:.1} ({} samples)", w.p50_ms, w.p99_ms, w.samples);
            let q = &r.totals_query;
            let _ = writeln!(out, "totals query ms: p50 {:.2} p99 {:.2} ({} samples)", q.p50_ms, q.p99_ms, q.samples);
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
        }
        _ => {
            let _ = writeln!(
                out,
                "recovery of a snapshot + {} journal records: serving after {:.2} s; RSS {:.0} MB (peak {:.0} MB)",
                r.reports_sent, r.startup_seconds, r.server_rss_mb, r.server_peak_rss_mb
            );
        }
    }
}
