//! `bench tls`: the cost of TLS. Saturate and idle over plain text, then over TLS with a
//! self-signed certificate generated for the run (rcgen), and a reconnect storm (fresh
//! connections, each a full TCP + TLS + HTTP/2 handshake) each way.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use super::{BenchArgs, BenchError, Ctx, Mode, lifecycle, load, process::ServerProcess, report::BenchReport};
use crate::client::connect::{ConnectOptions, endpoint_with};

/// Fresh connections being set up at once in the reconnect storm.
const STORM_CONCURRENCY: usize = 256;
/// Longest the whole storm may take.
const STORM_DEADLINE: Duration = Duration::from_secs(300);

/// TLS beside plain text.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TlsReport {
    /// Saturate over plain text, reports applied per second.
    pub plain_applied_per_second: f64,
    /// Saturate over TLS, reports applied per second.
    pub tls_applied_per_second: f64,
    /// TLS throughput / plain throughput.
    pub throughput_ratio: f64,
    /// Server CPU cores, plain and TLS saturate.
    pub plain_cpu_cores: f64,
    /// Server CPU cores under TLS saturate.
    pub tls_cpu_cores: f64,
    /// Idle: server bytes per open stream, plain text.
    pub plain_bytes_per_stream: f64,
    /// Idle: server bytes per open stream, TLS.
    pub tls_bytes_per_stream: f64,
    /// Idle: what TLS adds per connection, bytes ((TLS RSS − plain RSS) / connections).
    pub tls_extra_bytes_per_connection: f64,
    /// Connections of the idle and saturate runs.
    pub connections: u32,
    /// Fresh connections in each reconnect storm.
    pub storm_connections: u32,
    /// Plain-text connections set up per second (TCP + HTTP/2).
    pub plain_connects_per_second: f64,
    /// TLS connections set up per second (TCP + TLS + HTTP/2): handshakes per second.
    pub tls_handshakes_per_second: f64,
    /// Storm connections that failed (either way).
    pub storm_failures: u64,
}

/// Generates a self-signed certificate for 127.0.0.1 into the scratch directory and switches the
/// context to TLS (server flags and the load generator's CA).
pub(super) fn enable(ctx: &mut Ctx) -> Result<(), BenchError> {
    let dir = ctx.scratch.path();
    let (cert, key) = (dir.join("tls-cert.pem"), dir.join("tls-key.pem"));
    if !cert.exists() {
        let bad = |e: rcgen::Error| BenchError::Args(format!("cannot generate the benchmark certificate: {e}"));
        let generated =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).map_err(bad)?;
        std::fs::write(&cert, generated.cert.pem())?;
        std::fs::write(&key, generated.signing_key.serialize_pem())?;
    }
    ctx.connect = ConnectOptions { ca: Some(cert.clone()), ..ConnectOptions::default() };
    ctx.tls = Some((cert, key));
    Ok(())
}

fn disable(ctx: &mut Ctx) {
    ctx.connect = ConnectOptions::default();
    ctx.tls = None;
}

/// Plain text, then TLS: saturate, idle and a reconnect storm.
pub(super) async fn run(ctx: &mut Ctx, args: &BenchArgs) -> Result<TlsReport, BenchError> {
    let saturate = BenchArgs { mode: Mode::Saturate, ..args.clone() };
    let idle = BenchArgs { mode: Mode::Idle, ..args.clone() };
    let base = |a: &BenchArgs| BenchReport {
        mode: a.mode.name(),
        streams: a.streams,
        connections: a.effective_connections(),
        ..BenchReport::default()
    };
    let mut out =
        TlsReport { connections: args.effective_connections(), storm_connections: args.streams, ..Default::default() };
    for tls in [false, true] {
        if tls {
            enable(ctx)?;
        } else {
            disable(ctx);
        }
        let mut sat = base(&saturate);
        load::run(ctx, &saturate, &mut sat).await?;
        let mut idl = base(&idle);
        lifecycle::idle(ctx, &idle, &mut idl).await?;
        let (rate, failures) = storm(ctx, args).await?;
        out.storm_failures += failures;
        if tls {
            out.tls_applied_per_second = sat.applied_per_second;
            out.tls_cpu_cores = sat.server_cpu_cores;
            out.tls_bytes_per_stream = idl.bytes_per_stream;
            out.tls_extra_bytes_per_connection = (idl.bytes_per_stream - out.plain_bytes_per_stream)
                * f64::from(args.streams)
                / f64::from(out.connections.max(1));
            out.tls_handshakes_per_second = rate;
        } else {
            out.plain_applied_per_second = sat.applied_per_second;
            out.plain_cpu_cores = sat.server_cpu_cores;
            out.plain_bytes_per_stream = idl.bytes_per_stream;
            out.plain_connects_per_second = rate;
        }
    }
    disable(ctx);
    out.throughput_ratio = if out.plain_applied_per_second > 0.0 {
        out.tls_applied_per_second / out.plain_applied_per_second
    } else {
        0.0
    };
    Ok(out)
}

/// `--streams` fresh connections (at most [`STORM_CONCURRENCY`] at once), each connected and
/// dropped: connections per second and failures.
async fn storm(ctx: &Ctx, args: &BenchArgs) -> Result<(f64, u64), BenchError> {
    let server = ServerProcess::start(&ctx.spec(args, "127.0.0.1:0")?, ctx.scratch.path())?;
    let ep = endpoint_with(&server.url(), &ctx.connect)?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    let (mut launched, mut failures) = (0u32, 0u64);
    while launched < args.streams || !set.is_empty() {
        if started.elapsed() > STORM_DEADLINE {
            return Err(BenchError::Mismatch(format!("reconnect storm not done within {STORM_DEADLINE:?}")));
        }
        if launched < args.streams && set.len() < STORM_CONCURRENCY {
            let ep = ep.clone();
            set.spawn(async move { ep.connect().await.is_ok() });
            launched += 1;
            continue;
        }
        match set.join_next().await {
            Some(Ok(true)) => {}
            _ => failures += 1,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((f64::from(args.streams) / seconds.max(1e-9), failures))
}

/// Prints the comparison for people.
pub fn print(r: &TlsReport, out: &mut impl std::io::Write) {
    let _ = writeln!(
        out,
        "saturate: plain {:.0} reports/s ({:.2} cores), TLS {:.0} reports/s ({:.2} cores): ratio {:.2}",
        r.plain_applied_per_second, r.plain_cpu_cores, r.tls_applied_per_second, r.tls_cpu_cores, r.throughput_ratio
    );
    let _ = writeln!(
        out,
        "idle: {:.0} bytes per stream plain, {:.0} over TLS; TLS adds {:.0} bytes per connection ({} connections)",
        r.plain_bytes_per_stream, r.tls_bytes_per_stream, r.tls_extra_bytes_per_connection, r.connections
    );
    let _ = writeln!(
        out,
        "reconnect storm of {} fresh connections: plain {:.0} connects/s, TLS {:.0} handshakes/s, {} failed",
        r.storm_connections, r.plain_connects_per_second, r.tls_handshakes_per_second, r.storm_failures
    );
}
