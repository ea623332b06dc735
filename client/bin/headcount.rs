//! `headcount`: the national simulation (default), the site agent, the dashboard CLI, token minting
//! and registry generation. Thin: parses flags, sets up logging, calls the library.

use std::{io::Write, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use headcount::{
    client::{
        Reporter, ReporterConfig,
        aggregators::{Aggregators, ServerList},
        bench::{self, BenchArgs},
        connect::ConnectOptions,
        dashboard::parse_scope,
        queries,
        reporter::state::FileStore,
        simulate::{self, SimulateArgs},
        site,
    },
    logging::LogFormat,
    server::{
        auth::{Grant, ReadScope},
        registry::{
            csv as registry_csv,
            generate::{DEFAULT_SEED, GenerateOptions, generate},
        },
    },
};

/// Headcount: exact, live national check-in counting.
///
/// With no command, runs the national simulation (10,035 sites on an in-process aggregator, one
/// site agent per site scanning its delegates' badges at several desks, with repeat scans and
/// agent restarts) and checks every total against the number of distinct delegates.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Log format: `text` (colours only on a terminal) or `json` (one object per line).
    #[arg(long, global = true, env = "HEADCOUNT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the national simulation and verify every total (the default): the people model
    /// (badges, one agent per site), or the register model with `--registers`.
    Simulate(SimulateArgs),
    /// Site agent: counts each delegate's badge once per session (standard input, followed
    /// files, the desk page); exit 0 all acknowledged, 3 not acknowledged in time, 4 refused
    /// for good (fix the flag named), 5 some lines or reports refused.
    Site(SiteArgs),
    /// Print the totals of a scope and the table of its children.
    Totals(TotalsArgs),
    /// List the silent sites of a scope (no report or heartbeat lately).
    Silent(SilentArgs),
    /// Print the check-in curve (per bucket) of the nation or a province.
    Curve(ReadArgs),
    /// Print the corrections (audit trail), newest first.
    Corrections(CorrectionsArgs),
    /// Follow a scope live.
    Watch(WatchArgs),
    /// Mint tokens (needs the aggregator's secret).
    Token(TokenArgs),
    /// Write the reference registry as CSV files.
    Registry(RegistryArgs),
    /// Write per site a bundle (agent config, token, CA, instruction sheet in Vietnamese) and a
    /// mail-merge CSV, from the registry.
    Provision(headcount::client::provision::ProvisionArgs),
    /// Load-generate against a separate aggregator process on 127.0.0.1 and print figures.
    Bench(BenchArgs),
}

#[derive(Debug, clap::Args)]
struct SiteArgs {
    /// Aggregator URL, or several separated by commas (every address the organiser sent, e.g.
    /// `https://a:50051,https://b:50051`): the agent uses the first and moves to the next when
    /// its aggregator cannot be reached or its stream ends.
    #[arg(long, env = "HEADCOUNT_SERVER", default_value = "http://127.0.0.1:50051", value_name = "URL[,URL…]", value_parser = parse_servers)]
    server: ServerList,
    #[command(flatten)]
    tls: ConnectOptions,
    /// This site's id.
    #[arg(long, env = "HEADCOUNT_SITE")]
    site: String,
    /// The desk number this agent is known by (a label: every agent install has its own register).
    #[arg(long, env = "HEADCOUNT_DESK", default_value_t = 1)]
    desk: u32,
    /// Session the check-ins belong to (default: the current one by the event's schedule).
    #[arg(long, env = "HEADCOUNT_SESSION")]
    session: Option<u32>,
    /// This site's token (`headcount token site ID`).
    #[arg(long, env = "HEADCOUNT_TOKEN", hide_env_values = true)]
    token: String,
    /// Agent config file (TOML, as `headcount provision` writes it): fills the flags not given
    /// on the command line.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Local state file (written atomically before every send; its directory is created).
    /// Default: `headcount-SITE-DESK.json`.
    #[arg(long, env = "HEADCOUNT_STATE_FILE")]
    state_file: Option<PathBuf>,
    /// How standard input's lines are read: `badge` (each line a badge, counted once per session)
    /// or `count` (`+N` head counts and `=N reason` corrections; no badges).
    #[arg(long, value_enum, default_value_t = site::Mode::Badge)]
    mode: site::Mode,
    /// Also follow this file (badge mode), like `tail -F`; repeatable.
    #[arg(long, value_name = "FILE")]
    follow: Vec<PathBuf>,
    /// Serve the desk page and `POST /badge` on this address (loopback by default; give
    /// `0.0.0.0:7878` for phones on the site's LAN). Runs until Ctrl-C.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:7878")]
    http: Option<std::net::SocketAddr>,
    /// At start, how long to wait for the aggregator's schedule when the state file has none.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    start_timeout: Duration,
    /// At the end, how long to wait for the last acknowledgement.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    flush_timeout: Duration,
}

#[derive(Debug, clap::Args)]
struct ReadArgs {
    /// Aggregator URL, or several separated by commas (the next is asked when one cannot be
    /// reached).
    #[arg(long, env = "HEADCOUNT_SERVER", default_value = "http://127.0.0.1:50051", value_name = "URL[,URL…]", value_parser = parse_servers)]
    server: ServerList,
    #[command(flatten)]
    tls: ConnectOptions,
    /// A read token (`headcount token read`).
    #[arg(long, env = "HEADCOUNT_TOKEN", hide_env_values = true)]
    token: String,
    /// `national`, `province:CODE`, `commune:ID` or `site:ID`.
    #[arg(long, default_value = "national")]
    scope: String,
    /// Session id (default: all sessions).
    #[arg(long)]
    session: Option<u32>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct TotalsArgs {
    #[command(flatten)]
    read: ReadArgs,
    /// Children order: `id`, `count` (largest first) or `turnout` (laggards first).
    #[arg(long, default_value = "id", value_parser = queries::parse_order)]
    order: headcount::proto::v1::BreakdownOrder,
    /// At most this many children (0: all).
    #[arg(long, default_value_t = 0)]
    limit: u32,
    /// CSV output (the scope's row, then its children) for spreadsheets.
    #[arg(long, conflicts_with = "json")]
    csv: bool,
}

#[derive(Debug, clap::Args)]
struct SilentArgs {
    #[command(flatten)]
    read: ReadArgs,
    /// At most this many sites listed (0: all); the total is always printed.
    #[arg(long, default_value_t = 0)]
    limit: u32,
}

#[derive(Debug, clap::Args)]
struct CorrectionsArgs {
    /// Aggregator URL, or several separated by commas (the next is asked when one cannot be
    /// reached).
    #[arg(long, env = "HEADCOUNT_SERVER", default_value = "http://127.0.0.1:50051", value_name = "URL[,URL…]", value_parser = parse_servers)]
    server: ServerList,
    #[command(flatten)]
    tls: ConnectOptions,
    /// A read token (`headcount token read`).
    #[arg(long, env = "HEADCOUNT_TOKEN", hide_env_values = true)]
    token: String,
    /// At most this many, newest first (0: all).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct WatchArgs {
    #[command(flatten)]
    read: ReadArgs,
    /// Include the children's table in each update.
    #[arg(long)]
    children: bool,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// The signing keys and the validity (--expires) of the token.
    #[command(flatten)]
    credentials: headcount::client::credentials::CredentialArgs,
    #[command(subcommand)]
    kind: TokenKind,
}

#[derive(Debug, Subcommand)]
enum TokenKind {
    /// A token that reports for one site.
    Site {
        /// Site id.
        id: String,
    },
    /// A read-only token.
    Read {
        /// Whose token (shows in logs).
        #[arg(default_value = "dashboard")]
        label: String,
        /// Confine the token to one province (its code): a provincial dashboard.
        #[arg(long)]
        province: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct RegistryArgs {
    /// Directory to write `sites.csv` and `sessions.csv` into.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Number of sites.
    #[arg(long, default_value_t = 10_035)]
    sites: u32,
}

/// `--server`: one URL or several separated by commas.
fn parse_servers(s: &str) -> Result<ServerList, String> {
    s.parse()
}

/// Lazy channels to every `--server` address; the error names the flag.
fn aggregators(server: &ServerList, tls: &ConnectOptions) -> Result<Aggregators, String> {
    Aggregators::connect_lazy(server, tls).map_err(|e| format!("--server: {e}"))
}

fn main() -> ExitCode {
    // `headcount site --config FILE`: the file's settings become flags (the command line wins).
    let site_flags = |flag: &str| {
        use clap::CommandFactory;
        Cli::command().find_subcommand("site").is_some_and(|c| c.get_arguments().any(|a| a.get_long() == Some(flag)))
    };
    let args = match headcount::client::site_config::expand(std::env::args_os().collect(), site_flags) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("headcount site: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(args);
    headcount::logging::init(cli.log_format, "warn");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("headcount: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let command =
        cli.command.unwrap_or_else(|| Command::Simulate(SimulateArgs { quiet: false, ..SimulateArgs::default() }));
    match runtime.block_on(run(command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("headcount: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C, or SIGTERM (a service manager stopping the agent).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Writes a report as pretty JSON or through its human-readable printer.
fn emit<W: Write, R: serde::Serialize>(
    out: &mut W,
    json: bool,
    report: &R,
    print: fn(&R, &mut W),
) -> Result<(), Box<dyn std::error::Error>> {
    if json {
        serde_json::to_writer_pretty(&mut *out, report)?;
        writeln!(out)?;
    } else {
        print(report, out);
    }
    Ok(())
}

async fn run(command: Command) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut stdout = std::io::stdout().lock();
    match command {
        Command::Simulate(args) => {
            if !args.json {
                let on = match args.cluster {
                    Some(n) => format!("{n} aggregator nodes over etcd"),
                    None => "an in-process aggregator".to_owned(),
                };
                eprintln!("Simulating {} sites over {:?} on {on} (127.0.0.1)…", args.sites, args.duration);
            }
            let report = simulate::run(&args).await?;
            // With --serve-after the verdict was printed before serving on.
            if !args.serve_after {
                emit(&mut stdout, args.json, &report, simulate::print_report)?;
            }
            Ok(if report.exact() { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        Command::Site(args) => {
            // The agent prints from its tasks (other threads): holding the stdout lock here
            // would block the first of them forever.
            drop(stdout);
            let state_file =
                args.state_file.unwrap_or_else(|| PathBuf::from(format!("headcount-{}-{}.json", args.site, args.desk)));
            let store = FileStore::new(&state_file);
            if let Err(e) = store.prepare() {
                eprintln!("headcount site: {e}\nFix --state-file (its directory must be writable).");
                return Ok(ExitCode::FAILURE);
            }
            let aggregators = match aggregators(&args.server, &args.tls) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("headcount site: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let site_totals = site::run::SiteTotals {
                channel: aggregators.first(),
                token: args.token.clone(),
                site: args.site.clone(),
            };
            let config =
                ReporterConfig { agent_install: true, ..ReporterConfig::new(args.site.clone(), args.desk, args.token) };
            let reporter = Reporter::spawn_with(aggregators, config, Arc::new(store))?;
            let agent = Arc::new(site::Agent::new(reporter, args.session));
            let opts = site::run::RunOptions {
                stdin_mode: args.mode,
                follow: args.follow,
                poll: Duration::from_millis(250),
                http: args.http,
                start_timeout: args.start_timeout,
                flush_timeout: args.flush_timeout,
                site_totals: Some(site_totals),
            };
            let out: site::run::Out = Arc::new(|line| println!("{line}"));
            let stop = Box::pin(stop_signal());
            let status = site::run::run(agent.clone(), tokio::io::stdin(), opts, out, stop).await;
            println!("State is kept in {}.", state_file.display());
            Ok(ExitCode::from(status as u8))
        }
        Command::Totals(args) => {
            let r = args.read;
            let aggs = aggregators(&r.server, &r.tls)?;
            let output = if args.csv {
                queries::Output::Csv
            } else if r.json {
                queries::Output::Json
            } else {
                queries::Output::Table
            };
            let options = queries::TotalsOptions { order: args.order, limit: args.limit, output };
            let scope = parse_scope(&r.scope)?;
            let totals = async |ch| queries::totals(ch, &r.token, scope.clone(), r.session, options, &mut stdout).await;
            queries::on_first_answering(&aggs, totals).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Silent(args) => {
            let r = args.read;
            let (aggs, scope) = (aggregators(&r.server, &r.tls)?, parse_scope(&r.scope)?);
            let silent = async |ch| queries::silent(ch, &r.token, scope.clone(), args.limit, r.json, &mut stdout).await;
            queries::on_first_answering(&aggs, silent).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Curve(r) => {
            let (aggs, scope) = (aggregators(&r.server, &r.tls)?, parse_scope(&r.scope)?);
            let curve = async |ch| queries::curve(ch, &r.token, scope.clone(), r.session, r.json, &mut stdout).await;
            queries::on_first_answering(&aggs, curve).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Corrections(args) => {
            let aggs = aggregators(&args.server, &args.tls)?;
            let corrections =
                async |ch| queries::corrections(ch, &args.token, args.limit, args.json, &mut stdout).await;
            queries::on_first_answering(&aggs, corrections).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch(args) => {
            let r = args.read;
            let aggs = aggregators(&r.server, &r.tls)?;
            let opts = headcount::client::watch::WatchOptions {
                scope: parse_scope(&r.scope)?,
                session: r.session,
                include_children: args.children,
                json: r.json,
                max_updates: args.count,
                duration: args.duration,
                redraw: std::io::IsTerminal::is_terminal(&std::io::stdout()) && !r.json,
                backoff: headcount::client::reporter::backoff::BackoffConfig::default(),
            };
            headcount::client::watch::run_with(&aggs, &r.token, &opts, &mut stdout, &mut std::io::stderr()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(args) => {
            let c = &args.credentials;
            let auth = c.auth()?;
            let token = match args.kind {
                TokenKind::Site { id } => c.mint(&auth, Grant::Site(id.clone()), &id)?,
                TokenKind::Read { label, province } => {
                    let scope = province.map_or(ReadScope::National, ReadScope::Province);
                    c.mint(&auth, Grant::Read(scope), &label)?
                }
            };
            if let Ok(c) = auth.check(&token) {
                eprintln!(
                    "token id {} (list it in the revocation file to revoke this token), key {}",
                    c.token_id, c.key_id
                );
            }
            writeln!(stdout, "{token}")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Provision(args) => {
            let report = headcount::client::provision::run(&args)?;
            eprintln!("wrote {} site bundles; mail merge: {}", report.bundles, report.mail_merge.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            let report = bench::run(&args).await?;
            emit(&mut stdout, args.json, &report, bench::print)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Registry(args) => {
            let registry =
                generate(&GenerateOptions { sites: args.sites, seed: args.seed, ..GenerateOptions::default() });
            std::fs::create_dir_all(&args.out)?;
            let sites = std::fs::File::create(args.out.join("sites.csv"))?;
            let sessions = std::fs::File::create(args.out.join("sessions.csv"))?;
            registry_csv::write(&registry, sites, sessions)?;
            eprintln!(
                "wrote {} sites in {} communes and {} provinces ({} registered), {} sessions to {}",
                registry.sites.len(),
                registry.communes.len(),
                registry.provinces.len(),
                registry.registered_total(),
                registry.sessions.len(),
                args.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
