//! `headcount-server`: the aggregator. Parses flags, sets up logging, binds, serves until
//! SIGINT/SIGTERM, then drains gracefully.

use std::process::ExitCode;

use clap::Parser;
use headcount::server::{Aggregator, Auth, config::ServerArgs, serve};
use tokio::net::TcpListener;

/// Headcount aggregator: receives site check-in streams and serves live national totals.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    headcount::logging::init(cli.server.log_format, "info");
    match run(cli.server).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: through the log (stderr, in the chosen format) when it shows errors, else
            // plainly — a fatal error is never silenced by RUST_LOG.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!(error = %e, "headcount-server stopped");
            } else {
                eprintln!("headcount-server: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(args: ServerArgs) -> Result<(), String> {
    args.validate().map_err(|e| e.to_string())?;
    // Crash points for tests; inert unless FAILPOINTS names them.
    headcount::server::durability::failpoints::configure_from_env()?;
    let auth = Auth::from_sources(&args.auth_sources()?).map_err(|e| e.to_string())?.with_quotas(args.quotas());
    auth.spawn_watcher(headcount::server::auth::watch::DEFAULT_PERIOD);
    tracing::info!(keys = ?auth.key_ids(), revoked_file = ?args.revoked, "credentials loaded");
    let registry = args.registry().map_err(|e| e.to_string())?;
    args.validate_for(&registry).map_err(|e| e.to_string())?;
    tracing::info!(
        sites = registry.sites.len(),
        communes = registry.communes.len(),
        provinces = registry.provinces.len(),
        sessions = registry.sessions.len(),
        registered = registry.registered_total(),
        "registry loaded"
    );
    let agg = match (args.cluster()?, args.durability()) {
        (Some(cluster), _) => {
            let node = cluster.node.clone();
            let agg =
                Aggregator::open_cluster(registry, args.aggregator(), cluster).await.map_err(|e| e.to_string())?;
            tracing::info!(%node, etcd = %args.etcd.join(","), "cluster node");
            agg
        }
        (None, Some(d)) => {
            let dir = d.dir.clone();
            let (agg, report) = Aggregator::open(registry, args.aggregator(), d).map_err(|e| e.to_string())?;
            tracing::info!(
                data_dir = %dir.display(), registers = report.registers, journal_records = report.journal_records,
                bytes_dropped = report.bytes_dropped, "recovered"
            );
            agg
        }
        (None, None) => {
            tracing::warn!("--in-memory: all state is lost when this process exits");
            Aggregator::new(registry, args.aggregator())
        }
    };
    let tls = args.tls().map_err(|e| format!("{e} (--tls-cert/--tls-key/--client-ca)"))?;
    let mut transport = args.transport();
    transport.tls = tls.clone();
    let mut http_config = args.http();
    http_config.tls = tls.clone();
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some(t) = &tls {
        tracing::info!(cert = %t.settings().cert.display(), mtls = t.settings().client_ca.is_some(), "TLS on every listener");
    }
    let listener =
        TcpListener::bind(args.listen).await.map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    if let Some(read) = args.read_listen {
        let l = std::net::TcpListener::bind(read).map_err(|e| format!("cannot listen on {read}: {e}"))?;
        tracing::info!(addr = %l.local_addr().map_err(|e| e.to_string())?, "serving reads");
        headcount::server::serve::spawn_read_server(l, agg.clone(), auth.clone(), transport.clone())
            .map_err(|e| format!("cannot start the read thread: {e}"))?;
    }
    if let Some(http) = args.http_listen {
        let l =
            std::net::TcpListener::bind(http).map_err(|e| format!("cannot listen on {http} (--http-listen): {e}"))?;
        let (addr, _) = headcount::server::http::spawn(l, agg.clone(), auth.clone(), http_config)
            .map_err(|e| format!("cannot start the HTTP thread: {e}"))?;
        tracing::info!(url = %format!("{scheme}://{addr}/"), public = args.http_public, "serving the dashboard");
    }
    let addr = listener.local_addr().map_err(|e| format!("cannot read the bound address: {e}"))?;
    if let Some(path) = &args.addr_file {
        // Written atomically so a reader never sees a partial address.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    tracing::info!(%addr, "serving");
    // systemd `Type=notify`: READY once the listeners are bound, STOPPING on the way out; a
    // no-op without $NOTIFY_SOCKET.
    let signalled = shutdown_signal();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let stop = async {
        signalled.await;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    };
    serve(listener, agg, auth, transport, stop).await.map_err(|e| e.to_string())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled: a SIGTERM right after READY (systemd) is a drain, not a kill.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
