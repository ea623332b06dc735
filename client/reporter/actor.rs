//! The reporter's actor: the one task that owns the state, applies commands in group commits,
//! opens and resumes the stream, sends what is unacknowledged and reconciles acks.
//!
//! Rule for every change of the state: build the next state, save it, and only then make it the
//! state in memory. A failed save leaves memory and file as they were.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::Arc,
};

use rand::Rng;
use tokio::{
    sync::{mpsc, watch},
    time::{Instant, sleep_until},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, Streaming, transport::Channel};

use super::{
    BadgeOutcome, Command, ReporterConfig, ReporterError, ReporterStatus,
    backoff::Backoff,
    session_label,
    state::{LocalState, ScheduledSession, StateStore},
};
use crate::proto::metadata::{AGENT_HEADER, DESK_HEADER, SITE_HEADER};
use crate::proto::v1::{
    Ack, Heartbeat, Report, ReportBatch, ReportRequest, ReportResponse, Resume, ingest_client::IngestClient,
    report_request, report_response,
};

/// An open, resumed stream.
struct Conn {
    tx: mpsc::Sender<ReportRequest>,
    rx: Streaming<ReportResponse>,
    /// Highest seq sent per session on this stream.
    sent: BTreeMap<u32, u64>,
    /// Count sent with each (session, seq) not yet answered, to undo a refused change.
    in_flight: HashMap<(u32, u64), i64>,
    last_send: Instant,
}

type Opening = Pin<Box<dyn Future<Output = Result<(Conn, Resume), Status>> + Send>>;

/// Outbound buffer per stream: how many batches may wait for HTTP/2 flow control.
const OUTBOUND: usize = 16;

/// The next seq after `seq`, without overflow (the aggregator may send `u64::MAX`).
fn bump(session: u32, seq: u64) -> Result<u64, ReporterError> {
    seq.checked_add(1).ok_or(ReporterError::SeqExhausted(session))
}

/// Statuses that retrying cannot fix: stop and tell the operator what to change.
fn permanent(code: Code) -> bool {
    matches!(code, Code::Unauthenticated | Code::PermissionDenied | Code::NotFound | Code::InvalidArgument)
}

/// What the operator must fix for a permanent refusal.
fn advice(config: &ReporterConfig, status: &Status) -> String {
    let (site, desk, msg) = (&config.site, config.desk, status.message());
    match status.code() {
        Code::Unauthenticated => format!(
            "the aggregator refused the token ({msg}): check --token / HEADCOUNT_TOKEN (a new one: `headcount token site {site}`)"
        ),
        Code::PermissionDenied => {
            format!("the token does not allow reporting for site {site} ({msg}): check --site and --token")
        }
        Code::NotFound => {
            format!("the aggregator does not know site {site} desk {desk} ({msg}): check --site and --desk")
        }
        _ => format!(
            "the aggregator refused this agent's settings ({msg}): check --site, --desk and the state file's install_id"
        ),
    }
}

pub(super) struct Actor {
    client: IngestClient<Channel>,
    config: ReporterConfig,
    auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    backoff: Backoff,
    store: Arc<dyn StateStore>,
    state: LocalState,
    /// The state has changes not yet saved (a new install id): saved before the first stream.
    unsaved: bool,
    settled: BTreeMap<u32, u64>,
    conn: Option<Conn>,
    status: watch::Sender<ReporterStatus>,
    commands: mpsc::Receiver<Command>,
}

impl Actor {
    pub(super) fn new(
        channel: Channel,
        config: ReporterConfig,
        auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        store: Arc<dyn StateStore>,
        mut state: LocalState,
        status: watch::Sender<ReporterStatus>,
        commands: mpsc::Receiver<Command>,
    ) -> Self {
        let unsaved = config.agent_install && state.install_id.is_empty();
        if unsaved {
            state.install_id = hex::encode(rand::rng().random::<[u8; 16]>());
        }
        Self {
            client: IngestClient::new(channel),
            backoff: Backoff::new(config.backoff),
            config,
            auth,
            store,
            state,
            unsaved,
            settled: BTreeMap::new(),
            conn: None,
            status,
            commands,
        }
    }

    pub(super) async fn run(mut self) {
        let mut opening: Option<Opening> = None;
        if self.unsaved {
            // The install id must be on disk before the aggregator sees it: a slot claimed for an
            // id this agent then forgets would be an orphan.
            let next = self.state.clone();
            match self.commit(next).await {
                Ok(()) => self.unsaved = false,
                Err(e) => self.set_fatal(format!("cannot save the state file: {e}")),
            }
        }
        if self.status.borrow().fatal.is_none() {
            opening = Some(self.open());
        }
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
                            match self.on_resume(resume).await {
                                Ok(()) => self.status.send_modify(|s| { s.connected = true; s.connects += 1; }),
                                Err(e @ ReporterError::SeqExhausted(_)) => {
                                    self.conn = None;
                                    self.set_fatal(format!("{e}; ask the aggregator's operator"));
                                }
                                Err(e) => {
                                    tracing::error!(
                                        site = %self.config.site, desk = self.config.desk,
                                        error = %e, "cannot reconcile with the aggregator; state unchanged, retrying"
                                    );
                                    self.set_error(e.to_string());
                                    self.conn = None;
                                }
                            }
                        }
                        Err(status) if permanent(status.code()) => {
                            let advice = advice(&self.config, &status);
                            tracing::error!(site = %self.config.site, desk = self.config.desk, code = ?status.code(), "{advice}");
                            self.set_fatal(advice);
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
                        Err(status) if permanent(status.code()) => {
                            let advice = advice(&self.config, &status);
                            tracing::error!(site = %self.config.site, desk = self.config.desk, code = ?status.code(), "{advice}");
                            self.conn = None;
                            self.set_fatal(advice);
                        }
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
            let fatal = self.status.borrow().fatal.is_some();
            if self.conn.is_none() && opening.is_none() && retry_at.is_none() && !fatal {
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

    fn set_fatal(&self, e: String) {
        self.status.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(e.clone());
            s.fatal = Some(e);
        });
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
        let install = self.config.agent_install.then(|| self.state.install_id.clone());
        let timeout = self.config.connect_timeout;
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(OUTBOUND);
            let mut req = Request::new(ReceiverStream::new(rx));
            let md = req.metadata_mut();
            md.insert("authorization", auth);
            md.insert(SITE_HEADER, site.parse().map_err(|_| Status::invalid_argument("site id is not ASCII"))?);
            md.insert(DESK_HEADER, desk.into());
            if let Some(id) = install {
                md.insert(AGENT_HEADER, id.parse().map_err(|_| Status::invalid_argument("install id is not ASCII"))?);
            }
            let call = async {
                let mut inbound = client.report(req).await?.into_inner();
                match inbound.message().await? {
                    Some(ReportResponse { kind: Some(report_response::Kind::Resume(r)) }) => Ok((inbound, r)),
                    _ => Err(Status::internal("aggregator did not start with a resume handshake")),
                }
            };
            let (rx, resume) = tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| Status::deadline_exceeded("no resume handshake within the connect timeout"))??;
            let conn = Conn { tx, rx, sent: BTreeMap::new(), in_flight: HashMap::new(), last_send: Instant::now() };
            Ok((conn, resume))
        })
    }

    /// Saves `next` (on the blocking pool for file stores), then makes it the state.
    async fn commit(&mut self, next: LocalState) -> Result<(), ReporterError> {
        if self.store.blocking() {
            let store = self.store.clone();
            let copy = next.clone();
            tokio::task::spawn_blocking(move || store.save(&copy)).await.map_err(|_| ReporterError::Stopped)??;
        } else {
            self.store.save(&next)?;
        }
        self.state = next;
        Ok(())
    }

    /// Refuses a session the schedule does not have (when a schedule is known).
    fn check_session(&self, session: u32) -> Result<(), ReporterError> {
        let schedule = &self.state.schedule;
        if schedule.is_empty() || schedule.iter().any(|s| s.id == session) {
            return Ok(());
        }
        let known = schedule.iter().map(|s| session_label(schedule, s.id)).collect::<Vec<_>>().join(", ");
        Err(ReporterError::UnknownSession { session, known })
    }

    /// Applies a command and everything queued behind it to a copy of the state, persists once,
    /// then answers them all. Returns true if a reconnect was asked for.
    async fn handle_commands(&mut self, first: Command) -> bool {
        let mut next = self.state.clone();
        let mut replies: Vec<Box<dyn FnOnce(Option<Failure>) + Send>> = Vec::new();
        let mut reconnect = false;
        let mut cmd = Some(first);
        let max = self.config.max_count;
        while let Some(c) = cmd.take() {
            match c {
                Command::CheckIn { session, n, reply } => {
                    if let Err(e) = self.check_session(session) {
                        drop(reply.send(Err(e)));
                    } else {
                        let reg = next.sessions.entry(session).or_default();
                        let count = reg.count + i64::from(n);
                        if count > max {
                            drop(reply.send(Err(ReporterError::OutOfRange { session, count, max })));
                        } else {
                            reg.count = count;
                            replies
                                .push(Box::new(move |e| drop(reply.send(e.map_or(Ok(()), |e| Err(e.into_error()))))));
                        }
                    }
                }
                Command::Badge { session, badge, reply } => match self.check_session(session) {
                    Err(e) => drop(reply.send(Err(e))),
                    Ok(()) => {
                        let reg = next.sessions.entry(session).or_default();
                        if reg.badges.contains(&badge) {
                            let out = BadgeOutcome { counted: false, count: reg.count };
                            replies
                                .push(Box::new(move |e| drop(reply.send(e.map_or(Ok(out), |e| Err(e.into_error()))))));
                        } else if reg.count >= max {
                            drop(reply.send(Err(ReporterError::OutOfRange { session, count: reg.count + 1, max })));
                        } else {
                            reg.badges.insert(badge);
                            reg.count += 1;
                            let out = BadgeOutcome { counted: true, count: reg.count };
                            replies
                                .push(Box::new(move |e| drop(reply.send(e.map_or(Ok(out), |e| Err(e.into_error()))))));
                        }
                    }
                },
                Command::Correct { session, count, reason, reply } => {
                    if let Err(e) = self.check_session(session) {
                        drop(reply.send(Err(e)));
                    } else {
                        let anchored = next.anchored;
                        let reg = next.sessions.entry(session).or_default();
                        reg.count = count;
                        reg.reason = Some(reason);
                        reg.absolute |= !anchored;
                        replies.push(Box::new(move |e| drop(reply.send(e.map_or(Ok(()), |e| Err(e.into_error()))))));
                    }
                }
                Command::Reconnect => reconnect = true,
            }
            if replies.len() < 4096 {
                cmd = self.commands.try_recv().ok();
            }
        }
        // One seq per changed session per group commit.
        let mut failure: Option<Failure> = None;
        for (session, reg) in &mut next.sessions {
            let changed =
                self.state.sessions.get(session).is_none_or(|b| b.count != reg.count || b.reason != reg.reason);
            if changed {
                match bump(*session, reg.seq) {
                    Ok(s) => reg.seq = s,
                    Err(_) => failure = Some(Failure::Seq(*session)),
                }
            }
        }
        if failure.is_none() && next != self.state {
            if let Err(e) = self.commit(next).await {
                tracing::error!(
                    site = %self.config.site, desk = self.config.desk,
                    error = %e, "check-ins not recorded: state could not be saved"
                );
                failure = Some(Failure::Store(e.to_string()));
            } else {
                self.publish_local();
            }
        }
        for r in replies {
            r(failure.clone());
        }
        reconnect
    }

    /// Reconciles local state with what the aggregator holds (all or nothing: saved first).
    async fn on_resume(&mut self, resume: Resume) -> Result<(), ReporterError> {
        let mut next = self.state.clone();
        // Only what this aggregator holds now counts as settled: after a restart that lost
        // state, sessions it does not mention are resent in full.
        let mut settled = BTreeMap::new();
        let (site, desk) = (self.config.site.clone(), self.config.desk);
        for reg in &resume.registers {
            let local = next.sessions.entry(reg.session).or_default();
            if !self.state.anchored {
                // Fresh install: local counts are check-ins since then, on top of the aggregator's
                // (unless a correction set the agent's absolute count).
                if !local.absolute {
                    local.count = local.count.saturating_add(reg.count);
                }
                local.seq = if local.seq > 0 { bump(reg.session, reg.seq)? } else { reg.seq };
            } else if reg.seq > local.seq {
                tracing::warn!(
                    site = %site, desk, session = reg.session, local_seq = local.seq, server_seq = reg.seq,
                    "aggregator holds a newer state than this agent; adopting it (state file restored from an old copy, \
                     or another agent with the same install id or desk?)"
                );
                local.seq = reg.seq;
                local.count = reg.count;
                local.reason = None;
            } else if reg.seq == local.seq && reg.count != local.count {
                tracing::error!(
                    site = %site, desk, session = reg.session, seq = reg.seq, local = local.count, server = reg.count,
                    "same seq, different count (another writer on this register); re-sending the local count with a newer seq"
                );
                local.seq = bump(reg.session, local.seq)?;
            }
            settled.insert(reg.session, reg.seq.min(local.seq));
        }
        next.anchored = true;
        for reg in next.sessions.values_mut() {
            reg.absolute = false;
        }
        if !resume.schedule.is_empty() {
            next.schedule = resume
                .schedule
                .iter()
                .map(|s| ScheduledSession {
                    id: s.id,
                    name: s.name.clone(),
                    starts_unix_ms: s.starts_unix_ms,
                    ends_unix_ms: s.ends_unix_ms,
                    time_zone: s.time_zone.clone(),
                })
                .collect();
        }
        if next != self.state {
            self.commit(next).await?;
        }
        self.settled = settled;
        let schedule = self.state.schedule.clone();
        self.status.send_modify(|s| {
            s.acked = resume.registers.iter().map(|r| (r.session, (r.seq, r.count))).collect();
            s.agent_slot = resume.agent_slot;
            s.site_agents = resume.site_agents;
            s.desk_agents = resume.desk_agents;
            s.schedule = schedule;
        });
        if resume.desk_agents > 1 || resume.site_agents > 1 {
            tracing::warn!(
                site = %site, desk, slot = resume.agent_slot, site_agents = resume.site_agents,
                desk_agents = resume.desk_agents,
                "other agent installs also report for this site; each has its own register and all are counted"
            );
        }
        self.publish_local();
        Ok(())
    }

    /// Reconciles an ack: settles what it covers, detects another writer's state, rebases after
    /// conflicts and undoes refused changes — saved before anything changes in memory.
    async fn on_ack(&mut self, ack: Ack) {
        let mut next = self.state.clone();
        let mut settled = self.settled.clone();
        let mut refused = 0u64;
        let mut foreign = 0u64;
        let mut failure: Option<ReporterError> = None;
        let (site, desk) = (self.config.site.clone(), self.config.desk);
        let mut answered: Vec<(u32, u64)> = Vec::new();
        for a in &ack.applied {
            let Some(reg) = next.sessions.get_mut(&a.session) else { continue };
            let s = settled.entry(a.session).or_default();
            if a.seq > reg.seq || (a.seq == reg.seq && a.count != reg.count) {
                // Not our state: another writer moved this register. Our count is this agent's
                // truth; re-send it above their seq instead of taking their state as our ack.
                tracing::error!(
                    site = %site, desk, session = a.session, seq = a.seq, count = a.count, local_seq = reg.seq,
                    local = reg.count, "another writer's state on this agent's register; re-sending the local count"
                );
                foreign += 1;
                match bump(a.session, a.seq.max(reg.seq)) {
                    Ok(seq) => reg.seq = seq,
                    Err(e) => failure = Some(e),
                }
                *s = (*s).max(a.seq.min(reg.seq.saturating_sub(1)));
            } else {
                *s = (*s).max(a.seq);
                if reg.seq <= a.seq {
                    reg.reason = None;
                }
            }
            answered.push((a.session, a.seq));
        }
        for r in &ack.rejections {
            let code = Code::from_i32(r.code);
            let Some(reg) = next.sessions.get_mut(&r.session) else { continue };
            if code == Code::Aborted {
                // Conflict: another count at our seq. Our count is this agent's truth; move past.
                if let Some(cur) = &r.current {
                    tracing::error!(site = %site, desk, session = r.session, seq = r.seq, "conflict; re-sending with a newer seq");
                    match bump(r.session, reg.seq.max(cur.seq)) {
                        Ok(seq) => reg.seq = seq,
                        Err(e) => failure = Some(e),
                    }
                }
            } else {
                // Refused for good: undo that report's change, keep what came after it, and
                // never send its content again (e.g. a reason the aggregator does not accept).
                refused += 1;
                let (cur_seq, cur_count) = r.current.as_ref().map_or((0, 0), |c| (c.seq, c.count));
                let sent = self.conn.as_ref().and_then(|c| c.in_flight.get(&(r.session, r.seq)).copied());
                let since = sent.map_or(0, |sent| reg.count - sent);
                let count = (cur_count + since).max(0);
                tracing::error!(
                    site = %site, desk, session = r.session, seq = r.seq, code = ?code, message = %r.message,
                    lost = sent.map_or(0, |s| s - cur_count), "report refused by the aggregator; its change is undone"
                );
                reg.count = count;
                reg.reason = None;
                let s = settled.entry(r.session).or_default();
                match bump(r.session, reg.seq.max(cur_seq)) {
                    Ok(seq) => {
                        reg.seq = seq;
                        // Nothing left to send when the aggregator already holds this count.
                        *s = if count == cur_count { seq } else { (*s).max(r.seq) };
                    }
                    Err(e) => failure = Some(e),
                }
            }
            answered.push((r.session, r.seq));
        }
        if let Some(e) = failure {
            self.set_fatal(format!("{e}; ask the aggregator's operator"));
            return;
        }
        let last_error = ack.rejections.last().map(|r| format!("session {} seq {}: {}", r.session, r.seq, r.message));
        if next != self.state
            && let Err(e) = self.commit(next).await
        {
            tracing::error!(site = %site, desk, error = %e, "cannot save the reconciled state; reconnecting to retry");
            self.set_error(e.to_string());
            self.conn = None;
            return;
        }
        self.settled = settled;
        if let Some(conn) = &mut self.conn {
            for (session, seq) in answered {
                conn.in_flight.retain(|(s, q), _| *s != session || *q > seq);
            }
        }
        self.status.send_modify(|s| {
            for a in &ack.applied {
                let e = s.acked.entry(a.session).or_insert((0, 0));
                if a.seq >= e.0 {
                    *e = (a.seq, a.count);
                }
            }
            s.rejections += ack.rejections.len() as u64;
            s.refused += refused;
            s.foreign += foreign;
            if last_error.is_some() {
                s.last_error = last_error;
            }
        });
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
                        conn.in_flight.insert((r.session, r.seq), r.count);
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

/// Why a group commit recorded nothing (told to every command of the group).
#[derive(Debug, Clone)]
enum Failure {
    /// A session's seq is exhausted.
    Seq(u32),
    /// The save failed.
    Store(String),
}

impl Failure {
    fn into_error(self) -> ReporterError {
        match self {
            Failure::Seq(session) => ReporterError::SeqExhausted(session),
            Failure::Store(message) => ReporterError::Store(super::state::StoreError::Io {
                path: "state".into(),
                source: std::io::Error::other(message),
            }),
        }
    }
}
