//! `headcount bench`: the project's load generator. Starts the aggregator as a separate process
//! on 127.0.0.1, drives it from this process and prints figures (or `--json`).
//!
//! Modes (see [`Mode`]): `agents` (the site agent library itself driving the load: the headline
//! user-facing figures), `saturate` and `paced` (raw streams in the agent's batch shape: at most
//! one report per register per batch), `stress` (the transport stress test: 64 reports per batch,
//! 16 per register — not what sites send), `idle` (memory per stream), `storm` (kill -9 and
//! restart: every site's resync must be acknowledged), `recovery` (start-up from a snapshot
//! plus a journal: the recovered totals must equal what was written) and `cluster` (one node
//! beside three nodes over a local three-member etcd, the reference peak and a failover).
//!
//! Every run is checked against the machine's and the aggregator's limits first
//! ([`preflight`]) and every loop is bounded in count and time.

mod agents;
pub mod cluster;
mod cluster_faults;
mod cluster_load;
pub mod latency;
mod lifecycle;
mod load;
mod preflight;
mod probes;
pub mod process;
mod recovery;
pub mod report;
mod schedule;
pub mod sse;
mod streams;
pub mod tls;

use std::time::Duration;

use serde::Serialize;

use self::process::{ServerSpec, sibling_binary};
pub use self::{
    latency::Latency,
    report::{BenchReport, print},
};
use super::limits::LimitError;
use crate::server::{
    Auth,
    registry::{
        Registry,
        generate::{GenerateOptions, generate},
    },
};

const SECRET: &str = "headcount benchmark secret (loopback only)";

/// Benchmark modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Site agents (the `Reporter` library, one per site) check in at `--rate` check-ins per
    /// second (Poisson, bursty); ack latency from the moment each check-in was due. The headline.
    Agents,
    /// Raw streams in the agent's batch shape (cumulative counts, at most one report per register
    /// per batch), as fast as `--window` batches in flight per stream allow: capacity.
    Saturate,
    /// Raw streams in the agent's batch shape at `--rate` reports per second; latency from the
    /// intended send time (corrected for coordinated omission).
    Paced,
    /// Transport stress test, NOT the agent's shape: `--reports-per-batch` (default 64) reports
    /// per batch, several successive ones per register, so most are superseded within the batch.
    Stress,
    /// Streams open and only heartbeat: memory per stream.
    Idle,
    /// Kill -9 and restart the aggregator; every stream reconnects at once and its resync must be
    /// acknowledged (fails otherwise).
    Storm,
    /// Start-up from a snapshot plus a journal of `--records` records; the recovered totals must
    /// equal what was written (fails otherwise).
    Recovery,
    /// Saturate and idle over plain text, then over TLS (a self-signed certificate generated for
    /// the run), and a reconnect storm of `--streams` fresh connections each way: throughput
    /// ratio, memory per idle stream and per connection, handshakes per second.
    Tls,
    /// Saturate-style ingest without, then with, `--viewers` live-page (SSE) viewers: server
    /// memory per viewer, freshness, and the ingest throughput ratio.
    Sse,
    /// 1 node with its journal beside 3 nodes on a 3-member etcd started for the run (the
    /// installed `etcd`): saturate and paced (`--rate`) on each, etcd writes/s, watch lag
    /// between nodes; then on the cluster the reference peak (1.5 M check-ins / 30 min, bursty)
    /// through site agents, and kill -9 of the node holding a third of the streams (failover).
    Cluster,
}

/// Flags of `headcount bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value = "agents")]
    pub mode: Mode,
    /// Concurrent reporter streams (one per site; one more site is kept for the freshness probe).
    #[arg(long, default_value_t = 10_034)]
    pub streams: u32,
    /// HTTP/2 connections the streams share (round-robin; at most one per stream).
    #[arg(long, default_value_t = 50)]
    pub connections: u32,
    /// How long load runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Reports per batch. saturate/paced: 1 to the number of sessions (4), one per session, as a
    /// site agent sends (default 1: one session is open at a time). stress: any (default 64).
    #[arg(long)]
    pub reports_per_batch: Option<u32>,
    /// Batches in flight per stream (saturate, stress; paced allows 64). The site agent queues
    /// up to 16.
    #[arg(long, default_value_t = 8)]
    pub window: u32,
    /// Mean total rate: check-ins per second (agents) or reports per second (paced). The
    /// default is 120 times the reference event's peak (1.5 M check-ins in 30 min ≈ 835/s).
    #[arg(long, default_value_t = 100_000)]
    pub rate: u64,
    /// Paced and agents load is bursty: every stream sends at Poisson-random times, and the rate
    /// follows a wave (two periods per run) between `2 − F` and `F` times the mean. 1 gives a flat
    /// Poisson rate; at most 2.
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
    /// Serve and load over TLS: a self-signed certificate is generated into the scratch
    /// directory, given to the server as --tls-cert/--tls-key and to the load generator as --ca
    /// (saturate, paced, stress, idle, storm; `bench tls` runs both side by side).
    #[arg(long)]
    pub tls: bool,
    /// Concurrent Server-Sent Events viewers (sse).
    #[arg(long, default_value_t = 10_035)]
    pub viewers: u32,
}

impl BenchArgs {
    /// Reports per batch for this mode (the flag, or the mode's default).
    pub fn batch_size(&self) -> u32 {
        self.reports_per_batch.unwrap_or(if self.mode == Mode::Stress { 64 } else { 1 })
    }

    /// The mean rate (check-ins or reports per second).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Connections actually used: `--connections`, at most one per stream.
    pub fn effective_connections(&self) -> u32 {
        self.connections.min(self.streams).max(1)
    }

    /// The value of a server flag passed with `--server-arg` (`--flag=value` or `--flag value`).
    pub fn server_flag(&self, flag: &str) -> Option<&str> {
        let mut args = self.server_arg.iter();
        while let Some(a) = args.next() {
            if let Some(v) = a.strip_prefix(flag).and_then(|rest| rest.strip_prefix('=')) {
                return Some(v);
            }
            if a == flag {
                return args.next().map(String::as_str);
            }
        }
        None
    }
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
    /// The run does not fit the machine's or the aggregator's limits (refused before starting).
    #[error("{0}")]
    Limit(#[from] LimitError),
    /// Flags that do not make sense together (refused before starting).
    #[error("{0}")]
    Args(String),
    /// The local etcd cluster cannot run (`bench cluster`).
    #[error("{0}")]
    Etcd(#[from] crate::client::cluster::etcd::EtcdError),
    /// A check of the run failed: counts disagree, a resync was not acknowledged, a recovered
    /// total differs from what was written.
    #[error("{0}")]
    Mismatch(String),
}

/// What every mode shares: the registry, the token minter and a scratch directory.
struct Ctx {
    registry: Registry,
    auth: Auth,
    scratch: tempfile::TempDir,
    /// How the load generator connects (the CA of the run's certificate with TLS).
    connect: super::connect::ConnectOptions,
    /// The server's certificate and key with TLS (given as `--tls-cert`/`--tls-key`).
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Ctx {
    /// `https` with TLS, else `http`.
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn spec(&self, args: &BenchArgs, listen: &str) -> Result<ServerSpec, BenchError> {
        let mut extra = vec!["--max-concurrent-handshakes".to_owned(), args.max_handshakes.to_string()];
        // One read token drives every SSE viewer: lift the per-token watcher cap (256).
        if args.mode == Mode::Sse && args.server_flag("--max-watchers-per-token").is_none() {
            extra.extend(["--max-watchers-per-token".to_owned(), "0".to_owned()]);
        }
        // Counts grow by one per report per register; the production ceiling (100,000 per desk
        // and session) would refuse a long saturated run on few streams.
        if args.server_flag("--max-count").is_none() {
            extra.extend(["--max-count".to_owned(), "1000000000".to_owned()]);
        }
        extra.extend(args.server_arg.iter().cloned());
        if let Some((cert, key)) = &self.tls {
            extra.extend(["--tls-cert".to_owned(), cert.display().to_string()]);
            extra.extend(["--tls-key".to_owned(), key.display().to_string()]);
        }
        Ok(ServerSpec {
            binary: sibling_binary()?,
            listen: listen.to_owned(),
            data_dir: (!args.in_memory).then(|| self.scratch.path().join("data")),
            worker_threads: args.server_threads,
            secret: SECRET.to_owned(),
            extra,
        })
    }
}

/// Runs a benchmark: checks the limits, then the mode.
pub async fn run(args: &BenchArgs) -> Result<BenchReport, BenchError> {
    let registry = generate(&GenerateOptions::default());
    preflight::check(args, &registry)?;
    let mut ctx = Ctx {
        registry,
        auth: Auth::new(SECRET.as_bytes()).map_err(|e| BenchError::Args(e.to_string()))?,
        scratch: tempfile::Builder::new().prefix("headcount-bench-").tempdir()?,
        connect: super::connect::ConnectOptions::default(),
        tls: None,
    };
    if args.tls {
        if !matches!(args.mode, Mode::Saturate | Mode::Paced | Mode::Stress | Mode::Idle | Mode::Storm) {
            return Err(BenchError::Args(format!(
                "--tls applies to saturate, paced, stress, idle and storm, not {}; `bench tls` compares both",
                args.mode.name()
            )));
        }
        tls::enable(&mut ctx)?;
    }
    let mut report = BenchReport {
        mode: args.mode.name(),
        streams: args.streams,
        connections: args.effective_connections(),
        journal: !args.in_memory,
        server_threads: args.server_threads.unwrap_or(0),
        ..BenchReport::default()
    };
    match args.mode {
        Mode::Agents => agents::run(&ctx, args, &mut report).await?,
        Mode::Saturate | Mode::Paced | Mode::Stress => load::run(&ctx, args, &mut report).await?,
        Mode::Idle => lifecycle::idle(&ctx, args, &mut report).await?,
        Mode::Storm => lifecycle::storm(&ctx, args, &mut report).await?,
        Mode::Tls => report.tls = Some(tls::run(&mut ctx, args).await?),
        Mode::Sse => report.sse = Some(sse::run(&ctx, args, args.viewers).await?),
        Mode::Recovery => recovery::run(&ctx, args, &mut report).await?,
        Mode::Cluster => report.cluster = Some(cluster::run(&ctx, args).await?),
    }
    Ok(report)
}
