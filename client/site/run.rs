//! Running the agent: learn the schedule, start every input, print each line's answer and the
//! connection state, stop at the end of standard input (when it is the only input) or on
//! Ctrl-C / SIGTERM, flush, and choose the exit status.

use std::{future::Future, net::SocketAddr, path::PathBuf, pin::Pin, sync::Arc, time::Duration};

use futures_util::{StreamExt, stream::FuturesOrdered};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    sync::mpsc,
};

use super::{Agent, ExitStatus, Mode, describe, follow::follow};

/// Inputs and timings of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// How standard input's lines are read.
    pub stdin_mode: Mode,
    /// Files to follow (badge mode).
    pub follow: Vec<PathBuf>,
    /// How often followed files are polled.
    pub poll: Duration,
    /// The desk endpoint's address, if it is served.
    pub http: Option<SocketAddr>,
    /// How long to wait for the aggregator's schedule at start (when the state file has none).
    pub start_timeout: Duration,
    /// How long to wait for the last acknowledgement at the end.
    pub flush_timeout: Duration,
    /// Where to read the site's total over all its agents at the end (the site token may read).
    pub site_totals: Option<SiteTotals>,
}

/// How the agent reads its site's total at the aggregator (every agent install of the site).
#[derive(Debug, Clone)]
pub struct SiteTotals {
    /// A channel to the aggregator (used when the agent is not connected at the end; otherwise
    /// the aggregator it is connected to is asked).
    pub channel: tonic::transport::Channel,
    /// The site token.
    pub token: String,
    /// The site id.
    pub site: String,
}

/// Where operator lines go (stdout in the binary; a buffer in tests).
pub type Out = Arc<dyn Fn(String) + Send + Sync>;

/// Runs the agent over `stdin` and the inputs of `opts` until done; returns the exit status.
/// `stop` ends a run that has other inputs than standard input (Ctrl-C in the binary).
pub async fn run(
    agent: Arc<Agent>,
    stdin: impl AsyncRead + Unpin + Send + 'static,
    opts: RunOptions,
    out: Out,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
) -> ExitStatus {
    let reporter = agent.reporter();
    // The schedule: from the state file, or the first resume.
    let mut st = reporter.watch_status();
    let known = tokio::time::timeout(opts.start_timeout, st.wait_for(|s| !s.schedule.is_empty() || s.fatal.is_some()));
    if known.await.is_err() {
        out(format!(
            "the aggregator did not answer within {:?} and the state file has no schedule yet: {}",
            opts.start_timeout,
            reporter.status().last_error.unwrap_or_else(|| "no error reported".into())
        ));
        if agent.session.is_none() {
            out("pass --session ID to record check-ins while the aggregator is unreachable".into());
            return ExitStatus::NotAcknowledged;
        }
    }
    if let Some(f) = reporter.status().fatal {
        out(format!("STOPPED: {f}"));
        return ExitStatus::Permanent;
    }
    match agent.session_now() {
        Ok(s) => {
            let how = if agent.session.is_some() { "(--session)" } else { "(by the schedule)" };
            out(format!("session {} {how}", reporter.status().session_name(s)));
        }
        Err(e) => {
            out(format!("STOPPED: {e}"));
            return ExitStatus::Permanent;
        }
    }
    let watcher = tokio::spawn(show_status(agent.clone(), out.clone()));
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let stdin_only = opts.follow.is_empty() && opts.http.is_none();
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(read_stdin(agent.clone(), stdin, opts.stdin_mode, out.clone(), done_tx)));
    for path in &opts.follow {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
        tasks.push(tokio::spawn(follow(path.clone(), opts.poll, tx)));
        let (agent, out, source) = (agent.clone(), out.clone(), path.display().to_string());
        tasks.push(tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                let a = agent.line(&line, Mode::Badge, &source).await;
                print(&out, &a, &source);
            }
        }));
    }
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = opts.http {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                out(format!("desk page: http://{}/", listener.local_addr().unwrap_or(addr)));
                let agent = agent.clone();
                tasks.push(tokio::spawn(async move {
                    let stopped = async {
                        let _ = http_stopped.await;
                    };
                    if let Err(e) = crate::client::desk::serve(listener, agent, stopped).await {
                        tracing::error!(error = %e, "desk endpoint failed");
                    }
                }));
            }
            Err(e) => {
                out(format!("STOPPED: cannot listen on {addr} (--http): {e}"));
                watcher.abort();
                return ExitStatus::Permanent;
            }
        }
    }
    let mut fatal = reporter.watch_status();
    let fatal = fatal.wait_for(|s| s.fatal.is_some());
    tokio::select! {
        _ = done_rx.recv(), if stdin_only => {}
        () = stop => out("stopping: finishing what is being sent…".into()),
        _ = fatal => {}
    }
    let _ = http_stop.send(());
    for t in &tasks {
        t.abort();
    }
    let flushed = reporter.flush(opts.flush_timeout).await;
    watcher.abort();
    let status = agent.exit_status(&flushed);
    summary(&agent, &flushed, status, &out);
    if let Some(t) = &opts.site_totals {
        site_totals(&agent, t, &out).await;
    }
    status
}

fn print(out: &Out, a: &super::Answer, source: &str) {
    let text = describe(a, source);
    if !text.is_empty() {
        out(text);
    }
}

/// Reads standard input to its end. Lines already buffered are in flight together, so a fast
/// scanner or a replayed file costs one state save per burst (group commit), not per line; they
/// are handed to the reporter and answered in input order.
async fn read_stdin(agent: Arc<Agent>, input: impl AsyncRead + Unpin, mode: Mode, out: Out, done: mpsc::Sender<()>) {
    let mut input = BufReader::new(input);
    let mut number = 0u64;
    loop {
        let mut burst = Vec::new();
        loop {
            let mut line = Vec::new();
            match input.read_until(b'\n', &mut line).await {
                Ok(0) => break,
                Ok(_) => {
                    if line.ends_with(b"\n") {
                        line.pop();
                    }
                    number += 1;
                    burst.push((line, number));
                }
                Err(e) => {
                    out(format!("REFUSED reading standard input failed: {e}"));
                    break;
                }
            }
            if input.buffer().is_empty() || burst.len() >= 1024 {
                break;
            }
        }
        if burst.is_empty() {
            break;
        }
        // A burst's lines are in flight together (the agent saves them as one group), handed to
        // the reporter one after the other in input order, so the first copy of a repeated badge
        // is the one counted; then their answers are printed in the same order. (A task per line,
        // or futures racing for the reporter's channel, could hand them over in another order.)
        let sources: Vec<String> = burst.iter().map(|(_, number)| format!("line {number}")).collect();
        let mut answers = FuturesOrdered::new();
        for ((line, _), source) in burst.iter().zip(&sources) {
            answers.push_back(agent.queue_line(line, mode, source).await);
        }
        let mut sources = sources.iter();
        while let Some(a) = answers.next().await {
            print(&out, &a, sources.next().map_or("", String::as_str));
        }
    }
    let _ = done.send(()).await;
}

/// Prints connection changes and warnings as they happen.
async fn show_status(agent: Arc<Agent>, out: Out) {
    let mut rx = agent.reporter().watch_status();
    let (mut connected, mut agents, mut foreign, mut refused) = (None, 0u32, 0u64, 0u64);
    loop {
        let st = rx.borrow_and_update().clone();
        // A failover can go from one connected stream to the next between two looks.
        let now = (st.connected, st.connected.then(|| st.aggregator.clone()));
        if connected != Some(now.clone()) {
            connected = Some(now);
            if st.connected {
                out(format!("connected to {} (this agent's register slot: {})", st.aggregator, st.agent_slot));
            } else {
                out(format!(
                    "NOT CONNECTED: {} — check-ins are kept in the state file and sent on reconnect",
                    st.last_error.clone().unwrap_or_else(|| "connecting".into())
                ));
            }
        }
        if st.site_agents > 1 && st.site_agents != agents {
            out(format!(
                "note: {} agent installs report for this site (each counted on its own; the site total is their sum). \
                 If this laptop replaces another, stop the other one.",
                st.site_agents
            ));
        }
        agents = st.site_agents;
        if st.foreign > foreign {
            out("WARNING: another writer changed this agent's register (same state file on two laptops?); re-sending this agent's count".into());
            foreign = st.foreign;
        }
        if st.refused > refused {
            out(format!(
                "REFUSED by the aggregator: {} — that change was undone here",
                st.last_error.clone().unwrap_or_default()
            ));
            refused = st.refused;
        }
        if let Some(f) = &st.fatal {
            out(format!("STOPPED: {f}"));
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn summary(agent: &Agent, flushed: &Result<(), crate::client::ReporterError>, status: ExitStatus, out: &Out) {
    let st = agent.reporter().status();
    let (counted, repeats) = agent.badges();
    let counts = st
        .local
        .iter()
        .map(|(s, (_, c))| {
            let acked = st.acked.get(s).map_or(0, |(_, c)| *c);
            format!("session {}: {c} here, {acked} acknowledged", st.session_name(*s))
        })
        .collect::<Vec<_>>()
        .join("; ");
    out(format!(
        "{counted} badges counted, {repeats} already checked in, {} lines refused. {counts}",
        agent.refused_lines()
    ));
    for r in agent.refusals() {
        out(format!("  refused: {r}"));
    }
    let verdict = match (status, flushed) {
        (ExitStatus::Acknowledged, _) => "all acknowledged".to_owned(),
        (ExitStatus::Refused, _) => format!(
            "REFUSED: {} lines and {} reports were refused (listed above); the rest is acknowledged",
            agent.refused_lines(),
            st.refused
        ),
        (ExitStatus::Permanent, _) => format!("STOPPED: {}", st.fatal.clone().unwrap_or_default()),
        (ExitStatus::NotAcknowledged, Err(e)) => {
            format!("NOT ACKNOWLEDGED: {e}; the state file keeps everything and it is resent on the next start")
        }
        (ExitStatus::NotAcknowledged, Ok(())) => "NOT ACKNOWLEDGED".to_owned(),
    };
    out(verdict);
}

/// Prints the site's total per session at the aggregator: the sum over every agent of the site,
/// so an operator sees when another agent also counts for it.
async fn site_totals(agent: &Agent, t: &SiteTotals, out: &Out) {
    use crate::proto::v1::{Scope, ScopeKind, TotalsRequest, totals_client::TotalsClient};
    let st = agent.reporter().status();
    // The aggregator the agent is connected to (failover), else the one given.
    let connected = agent.reporter().aggregators().iter().find(|a| st.connected && a.url == st.aggregator);
    let mut client = TotalsClient::new(connected.map_or_else(|| t.channel.clone(), |a| a.channel.clone()));
    for session in st.local.keys() {
        let scope = Scope { kind: ScopeKind::Site as i32, id: t.site.clone() };
        let Ok(req) = crate::client::connect::authorized(
            TotalsRequest { scope: Some(scope), session: Some(*session), min_revision: 0 },
            &t.token,
        ) else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(5), client.get_totals(req)).await {
            Ok(Ok(r)) => out(format!(
                "site {} session {}: {} checked in at the aggregator (all agents of the site)",
                t.site,
                st.session_name(*session),
                r.into_inner().count
            )),
            Ok(Err(e)) => out(format!("cannot read the site's total: {}", e.message())),
            Err(_) => out("cannot read the site's total: no answer within 5 s".into()),
        }
    }
}
