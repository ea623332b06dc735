//! The site agent library: a `Reporter` owns one desk's registers, persists every change before
//! sending it, keeps one long-lived stream to the aggregator, resumes after any disconnect and
//! resends its latest unacknowledged state.
//!
//! All state lives in one actor task; the public handle talks to it over a bounded channel.
//! Commands that arrive together are applied together and persisted once (group commit), so the
//! agent coalesces under load: many check-ins become one report with one seq.

pub mod backoff;
pub mod state;

use std::{collections::BTreeMap, future::Future, pin::Pin, sync::Arc, time::Duration};

use rand::Rng;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::{Instant, sleep_until},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, Streaming, transport::Channel};

use self::{
    backoff::{Backoff, BackoffConfig},
    state::{LocalState, StateStore, StoreError},
};
use super::connect::{CONNECT_TIMEOUT, ConnectError, bearer};
use crate::proto::metadata::{DESK_HEADER, SITE_HEADER};
use crate::proto::v1::{
    Ack, Heartbeat, Report, ReportBatch, ReportRequest, Resume, ingest_client::IngestClient, report_request,
    report_response,
};

/// Settings of one reporter.
#[derive(Debug, Clone)]
pub struct ReporterConfig {
    /// Site id.
    pub site: String,
    /// Desk number (1-based).
    pub desk: u32,
    /// The site's token.
    pub token: String,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// Timeout for opening a stream and receiving the resume handshake.
    pub connect_timeout: Duration,
    /// Heartbeat after this long without sending anything.
    pub heartbeat_interval: Duration,
    /// Fault injection for simulations: probability that a batch is sent twice.
    pub duplicate_probability: f64,
}

impl ReporterConfig {
    /// Defaults for a site desk.
    pub fn new(site: impl Into<String>, desk: u32, token: impl Into<String>) -> Self {
        Self {
            site: site.into(),
            desk,
            token: token.into(),
            backoff: BackoffConfig::default(),
            connect_timeout: CONNECT_TIMEOUT,
            heartbeat_interval: Duration::from_secs(15),
            duplicate_probability: 0.0,
        }
    }
}

/// Why a reporter call failed.
#[derive(Debug, thiserror::Error)]
pub enum ReporterError {
    /// The local state could not be read or written; the check-in was NOT recorded.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The state file belongs to another site or desk.
    #[error("state file is for site {site:?} desk {desk}, not this reporter")]
    WrongState {
        /// Site in the file.
        site: String,
        /// Desk in the file.
        desk: u32,
    },
    /// Bad connection settings.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A negative correction.
    #[error("a count cannot be negative ({0})")]
    Negative(i64),
    /// The reporter task has stopped.
    #[error("reporter stopped")]
    Stopped,
    /// `flush` did not see everything acknowledged in time.
    #[error("not everything acknowledged after {waited:?} (last error: {last_error})")]
    FlushTimeout {
        /// How long it waited.
        waited: Duration,
        /// Last connection or rejection error.
        last_error: String,
    },
}

/// What a reporter shows about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReporterStatus {
    /// A stream is open and resumed.
    pub connected: bool,
    /// Local registers: session → (seq, count).
    pub local: BTreeMap<u32, (u64, i64)>,
    /// Highest seq per session the aggregator acknowledged (or refused for good).
    pub settled: BTreeMap<u32, u64>,
    /// Latest state per session the aggregator acknowledged as stored: (seq, count).
    pub acked: BTreeMap<u32, (u64, i64)>,
    /// Successful stream openings so far.
    pub connects: u64,
    /// Reports refused by the aggregator.
    pub rejections: u64,
    /// Last connection error or rejection, for display.
    pub last_error: Option<String>,
}

impl ReporterStatus {
    /// True when every local change is acknowledged (or refused for good).
    pub fn all_settled(&self) -> bool {
        self.local.iter().all(|(s, (seq, _))| self.settled.get(s).copied().unwrap_or(0) >= *seq)
    }
}

enum Command {
    CheckIn { session: u32, n: u32, reply: oneshot::Sender<Result<(), ReporterError>> },
    Correct { session: u32, count: i64, reason: String, reply: oneshot::Sender<Result<(), ReporterError>> },
    Reconnect,
}

/// Handle to a running reporter. Dropping it stops the reporter (after its pending commands).
pub struct Reporter {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<ReporterStatus>,
    task: JoinHandle<()>,
}

impl Reporter {
    /// Loads the state from `store` and starts reporting over `channel` (which may be shared).
    pub fn spawn(channel: Channel, config: ReporterConfig, store: Arc<dyn StateStore>) -> Result<Self, ReporterError> {
        let state = match store.load()? {
            Some(s) if s.site != config.site || s.desk != config.desk => {
                return Err(ReporterError::WrongState { site: s.site, desk: s.desk });
            }
            Some(s) => s,
            None => LocalState { version: 1, site: config.site.clone(), desk: config.desk, ..LocalState::default() },
        };
        let auth = bearer(&config.token)?;
        let (commands, rx) = mpsc::channel(256);
        let status = ReporterStatus {
            local: state.sessions.iter().map(|(s, r)| (*s, (r.seq, r.count))).collect(),
            ..ReporterStatus::default()
        };
        let (status_tx, status) = watch::channel(status);
        let actor = Actor {
            client: IngestClient::new(channel),
            backoff: Backoff::new(config.backoff),
            config,
            auth,
            store,
            state,
            settled: BTreeMap::new(),
            conn: None,
            status: status_tx,
            commands: rx,
        };
        // No span on the task (it would be entered on every poll, 20,000 times over in the
        // simulation); log lines carry site and desk.
        let task = tokio::spawn(actor.run());
        Ok(Self { commands, status, task })
    }

    async fn call(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), ReporterError>>) -> Command,
    ) -> Result<(), ReporterError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| ReporterError::Stopped)?;
        rx.await.map_err(|_| ReporterError::Stopped)?
    }

    /// Records `n` check-ins for `session`. Returns once they are persisted locally; they are
    /// sent (and resent until acknowledged) in the background.
    pub async fn check_in(&self, session: u32, n: u32) -> Result<(), ReporterError> {
        self.call(|reply| Command::CheckIn { session, n, reply }).await
    }

    /// Sets the desk's count for `session` (e.g. lowers it after a scanning mistake) with a reason
    /// for the audit trail.
    pub async fn correct(&self, session: u32, count: i64, reason: impl Into<String>) -> Result<(), ReporterError> {
        if count < 0 {
            return Err(ReporterError::Negative(count));
        }
        let reason = reason.into();
        self.call(|reply| Command::Correct { session, count, reason, reply }).await
    }

    /// Drops the current stream and reconnects (fault injection, or after a network change).
    pub async fn reconnect(&self) -> Result<(), ReporterError> {
        self.commands.send(Command::Reconnect).await.map_err(|_| ReporterError::Stopped)
    }

    /// The latest status.
    pub fn status(&self) -> ReporterStatus {
        self.status.borrow().clone()
    }

    /// A receiver that changes with the status.
    pub fn watch_status(&self) -> watch::Receiver<ReporterStatus> {
        self.status.clone()
    }

    /// Waits until every local change is acknowledged, at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), ReporterError> {
        let mut rx = self.status.clone();
        match tokio::time::timeout(timeout, rx.wait_for(ReporterStatus::all_settled)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ReporterError::Stopped),
            Err(_) => Err(ReporterError::FlushTimeout {
                waited: timeout,
                last_error: self.status.borrow().last_error.clone().unwrap_or_else(|| "none".into()),
            }),
        }
    }

    /// Stops the reporter (state is already persisted) and waits for its task.
    pub async fn shutdown(self) {
        drop(self.commands);
        let _ = self.task.await;
    }
}

/// An open, resumed stream.
struct Conn {
    tx: mpsc::Sender<ReportRequest>,
    rx: Streaming<crate::proto::v1::ReportResponse>,
    /// Highest seq sent per session on this stream.
    sent: BTreeMap<u32, u64>,
    last_send: Instant,
}

type Opening = Pin<Box<dyn Future<Output = Result<(Conn, Resume), Status>> + Send>>;

/// Outbound buffer per stream: how many batches may wait for HTTP/2 flow control.
const OUTBOUND: usize = 16;

struct Actor {
    client: IngestClient<Channel>,
    config: ReporterConfig,
    auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    backoff: Backoff,
    store: Arc<dyn StateStore>,
    state: LocalState,
    settled: BTreeMap<u32, u64>,
    conn: Option<Conn>,
    status: watch::Sender<ReporterStatus>,
    commands: mpsc::Receiver<Command>,
}

impl Actor {
    async fn run(mut self) {
        let mut opening: Option<Opening> = Some(self.open());
        let mut retry_at: Option<Instant> = None;
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => {
                        let reconnect = self.handle_commands(cmd).await;
                        if reconnect && self.conn.take().is_some() {
                            retry_at = Some(Instant::now());
                            self.set_connected(false);
                        }
                    }
                    None => break,
                },
                opened = async { opening.as_mut().expect("guarded by if").await }, if opening.is_some() => {
                    opening = None;
                    match opened {
                        Ok((conn, resume)) => {
                            self.backoff.reset();
                            self.conn = Some(conn);
                            if let Err(e) = self.on_resume(resume).await {
                                tracing::error!(
                                    site = %self.config.site, desk = self.config.desk,
                                    error = %e, "cannot persist resumed state"
                                );
                                self.conn = None;
                            } else {
                                self.status.send_modify(|s| { s.connected = true; s.connects += 1; });
                            }
                        }
                        Err(status) => {
                            let delay = self.backoff.next_delay();
                            tracing::warn!(
                                site = %self.config.site, desk = self.config.desk,
                                code = ?status.code(), message = status.message(), retry_in = ?delay, "cannot open stream"
                            );
                            self.set_error(format!("{:?}: {}", status.code(), status.message()));
                            retry_at = Some(Instant::now() + delay);
                        }
                    }
                }
                msg = async { self.conn.as_mut().expect("guarded by if").rx.message().await }, if self.conn.is_some() => {
                    match msg {
                        Ok(Some(resp)) => match resp.kind {
                            Some(report_response::Kind::Ack(ack)) => self.on_ack(ack).await,
                            Some(report_response::Kind::Resume(_)) | None => {
                                tracing::warn!(
                                    site = %self.config.site, desk = self.config.desk,
                                    "unexpected message on a resumed stream; reconnecting"
                                );
                                self.conn = None;
                            }
                        },
                        Ok(None) => { self.conn = None; }
                        Err(status) => {
                            tracing::info!(
                                site = %self.config.site, desk = self.config.desk,
                                code = ?status.code(), message = status.message(), "stream ended"
                            );
                            self.set_error(format!("{:?}: {}", status.code(), status.message()));
                            self.conn = None;
                        }
                    }
                }
                () = async { sleep_until(retry_at.expect("guarded by if")).await }, if retry_at.is_some() && opening.is_none() && self.conn.is_none() => {
                    retry_at = None;
                    opening = Some(self.open());
                }
                _ = heartbeat.tick() => {
                    if let Some(conn) = &mut self.conn
                        && conn.last_send.elapsed() >= self.config.heartbeat_interval
                    {
                        let hb = ReportRequest { kind: Some(report_request::Kind::Heartbeat(Heartbeat {})) };
                        if conn.tx.try_send(hb).is_ok() {
                            conn.last_send = Instant::now();
                        }
                    }
                }
            }
            self.pump();
            if self.conn.is_none() && opening.is_none() && retry_at.is_none() {
                self.set_connected(false);
                retry_at = Some(Instant::now() + self.backoff.next_delay());
            }
        }
    }

    fn set_connected(&self, connected: bool) {
        self.status.send_modify(|s| s.connected = connected);
    }

    fn set_error(&self, e: String) {
        self.status.send_modify(|s| s.last_error = Some(e));
    }

    fn publish_local(&self) {
        let local = self.state.sessions.iter().map(|(s, r)| (*s, (r.seq, r.count))).collect();
        let settled = self.settled.clone();
        self.status.send_modify(|s| {
            s.local = local;
            s.settled = settled;
        });
    }

    /// Opens a stream and waits for the resume handshake.
    fn open(&self) -> Opening {
        let mut client = self.client.clone();
        let auth = self.auth.clone();
        let site = self.config.site.clone();
        let desk = self.config.desk;
        let timeout = self.config.connect_timeout;
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(OUTBOUND);
            let mut req = Request::new(ReceiverStream::new(rx));
            let md = req.metadata_mut();
            md.insert("authorization", auth);
            md.insert(SITE_HEADER, site.parse().map_err(|_| Status::invalid_argument("site id is not ASCII"))?);
            md.insert(DESK_HEADER, desk.into());
            let call = async {
                let mut inbound = client.report(req).await?.into_inner();
                match inbound.message().await? {
                    Some(crate::proto::v1::ReportResponse { kind: Some(report_response::Kind::Resume(r)) }) => {
                        Ok((inbound, r))
                    }
                    _ => Err(Status::internal("aggregator did not start with a resume handshake")),
                }
            };
            let (rx, resume) = tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| Status::deadline_exceeded("no resume handshake within the connect timeout"))??;
            Ok((Conn { tx, rx, sent: BTreeMap::new(), last_send: Instant::now() }, resume))
        })
    }

    /// Persists the state (on the blocking pool for file stores).
    async fn persist(&self) -> Result<(), ReporterError> {
        if self.store.blocking() {
            let store = self.store.clone();
            let state = self.state.clone();
            tokio::task::spawn_blocking(move || store.save(&state)).await.map_err(|_| ReporterError::Stopped)??;
        } else {
            self.store.save(&self.state)?;
        }
        Ok(())
    }

    /// Applies a command and everything queued behind it, persists once, then answers them all.
    /// Returns true if a reconnect was asked for.
    async fn handle_commands(&mut self, first: Command) -> bool {
        let before = self.state.clone();
        let mut replies = Vec::new();
        let mut reconnect = false;
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Command::CheckIn { session, n, reply } => {
                    let reg = self.state.sessions.entry(session).or_default();
                    reg.count += i64::from(n);
                    replies.push(reply);
                }
                Command::Correct { session, count, reason, reply } => {
                    let anchored = self.state.anchored;
                    let reg = self.state.sessions.entry(session).or_default();
                    reg.count = count;
                    reg.reason = Some(reason);
                    reg.absolute |= !anchored;
                    replies.push(reply);
                }
                Command::Reconnect => reconnect = true,
            }
            if replies.len() < 4096 {
                next = self.commands.try_recv().ok();
            }
        }
        // One seq per changed session per group commit.
        for (session, reg) in &mut self.state.sessions {
            let changed = before.sessions.get(session).is_none_or(|b| b.count != reg.count || b.reason != reg.reason);
            if changed {
                reg.seq += 1;
            }
        }
        if !replies.is_empty() && self.state != before {
            if let Err(e) = self.persist().await {
                tracing::error!(
                    site = %self.config.site, desk = self.config.desk,
                    error = %e, "check-ins not recorded: state could not be saved"
                );
                self.state = before;
                let msg = e.to_string();
                for r in replies {
                    let _ = r.send(Err(ReporterError::Store(StoreError::Io {
                        path: "state".into(),
                        source: std::io::Error::other(msg.clone()),
                    })));
                }
                return reconnect;
            }
            self.publish_local();
        }
        for r in replies {
            let _ = r.send(Ok(()));
        }
        reconnect
    }

    /// Reconciles local state with what the aggregator holds.
    async fn on_resume(&mut self, resume: Resume) -> Result<(), ReporterError> {
        let before = self.state.clone();
        // Only what this aggregator holds now counts as settled: after a restart that lost
        // state, sessions it does not mention are resent in full.
        self.settled.clear();
        for reg in &resume.registers {
            let local = self.state.sessions.entry(reg.session).or_default();
            if !before.anchored {
                // Fresh install: local counts are check-ins since then, on top of the aggregator's
                // (unless a correction set the desk's absolute count).
                if !local.absolute {
                    local.count += reg.count;
                }
                local.seq = if local.seq > 0 { reg.seq + 1 } else { reg.seq };
            } else if reg.seq > local.seq {
                tracing::warn!(
                    site = %self.config.site, desk = self.config.desk, session = reg.session,
                    local_seq = local.seq,
                    server_seq = reg.seq,
                    "aggregator holds a newer state than this desk; adopting it (is another reporter using this desk?)"
                );
                local.seq = reg.seq;
                local.count = reg.count;
                local.reason = None;
            } else if reg.seq == local.seq && reg.count != local.count {
                tracing::error!(
                    site = %self.config.site, desk = self.config.desk, session = reg.session,
                    seq = reg.seq,
                    local = local.count,
                    server = reg.count,
                    "same seq, different count; re-sending the local count with a newer seq"
                );
                local.seq += 1;
            }
            self.settled.insert(reg.session, reg.seq.min(local.seq));
        }
        self.status.send_modify(|s| {
            s.acked.clear();
            for r in &resume.registers {
                s.acked.insert(r.session, (r.seq, r.count));
            }
        });
        self.state.anchored = true;
        for reg in self.state.sessions.values_mut() {
            reg.absolute = false;
        }
        if self.state != before {
            self.persist().await?;
        }
        self.publish_local();
        Ok(())
    }

    async fn on_ack(&mut self, ack: Ack) {
        self.status.send_modify(|s| {
            for a in &ack.applied {
                let e = s.acked.entry(a.session).or_insert((0, 0));
                if a.seq >= e.0 {
                    *e = (a.seq, a.count);
                }
            }
        });
        for a in &ack.applied {
            let s = self.settled.entry(a.session).or_default();
            *s = (*s).max(a.seq);
            if let Some(reg) = self.state.sessions.get_mut(&a.session)
                && reg.seq <= a.seq
            {
                reg.reason = None;
            }
        }
        let mut rebased = false;
        for r in &ack.rejections {
            let code = Code::from_i32(r.code);
            self.status.send_modify(|s| {
                s.rejections += 1;
                s.last_error = Some(format!("session {} seq {}: {}", r.session, r.seq, r.message));
            });
            if code == Code::Aborted {
                // Conflict: our count is the desk's truth; move past the aggregator's seq.
                if let (Some(reg), Some(cur)) = (self.state.sessions.get_mut(&r.session), &r.current) {
                    tracing::error!(
                        site = %self.config.site, desk = self.config.desk,
                        session = r.session, seq = r.seq, "conflict; re-sending with a newer seq"
                    );
                    reg.seq = reg.seq.max(cur.seq) + 1;
                    rebased = true;
                }
            } else {
                tracing::error!(
                    site = %self.config.site, desk = self.config.desk,
                    session = r.session, seq = r.seq, code = ?code, message = %r.message, "report refused"
                );
                let s = self.settled.entry(r.session).or_default();
                *s = (*s).max(r.seq);
            }
        }
        if rebased && let Err(e) = self.persist().await {
            tracing::error!(
                site = %self.config.site, desk = self.config.desk,
                error = %e, "cannot persist rebased state"
            );
        }
        self.publish_local();
    }

    /// Sends every session whose latest state is neither acknowledged nor in flight.
    fn pump(&mut self) {
        let Some(conn) = &mut self.conn else { return };
        let reports: Vec<Report> = self
            .state
            .sessions
            .iter()
            .filter(|(s, r)| {
                r.seq > self.settled.get(s).copied().unwrap_or(0) && r.seq > conn.sent.get(s).copied().unwrap_or(0)
            })
            .map(|(s, r)| Report {
                session: *s,
                seq: r.seq,
                count: r.count,
                reason: r.reason.clone().unwrap_or_default(),
            })
            .collect();
        if reports.is_empty() {
            return;
        }
        let msg = ReportRequest { kind: Some(report_request::Kind::Batch(ReportBatch { reports })) };
        let duplicate = self.config.duplicate_probability > 0.0
            && rand::rng().random_bool(self.config.duplicate_probability.min(1.0));
        match conn.tx.try_send(msg.clone()) {
            Ok(()) => {
                if let Some(report_request::Kind::Batch(b)) = &msg.kind {
                    for r in &b.reports {
                        conn.sent.insert(r.session, r.seq);
                    }
                }
                conn.last_send = Instant::now();
                if duplicate {
                    let _ = conn.tx.try_send(msg);
                }
            }
            Err(mpsc::error::TrySendError::Full(_)) => {} // sent after the next ack frees room
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.conn = None;
                self.set_connected(false);
            }
        }
    }
}
