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
use tonic::{Code, Request, Status, Streaming};

use super::{
    BadgeOutcome, Command, ReporterConfig, ReporterError, ReporterStatus,
    backoff::Backoff,
    failover::Targets,
    session_label,
    state::{Change, Header, LocalRegister, LocalState, RegisterChange, StateStore},
};
use crate::client::aggregators::{Aggregators, permanent};
use crate::proto::metadata::{AGENT_HEADER, DESK_HEADER, SITE_HEADER};
use crate::proto::v1::{
    Heartbeat, Report, ReportBatch, ReportRequest, ReportResponse, Resume, report_request, report_response,
};

/// An open, resumed stream.
pub(super) struct Conn {
    pub(super) tx: mpsc::Sender<ReportRequest>,
    pub(super) rx: Streaming<ReportResponse>,
    /// Highest seq sent per session on this stream.
    sent: BTreeMap<u32, u64>,
    /// Count sent with each (session, seq) not yet answered, to undo a refused change.
    pub(super) in_flight: HashMap<(u32, u64), i64>,
    last_send: Instant,
}

type Opening = Pin<Box<dyn Future<Output = Result<(Conn, Resume), Status>> + Send>>;

/// Outbound buffer per stream: how many batches may wait for HTTP/2 flow control.
const OUTBOUND: usize = 16;

/// The next seq after `seq`, without overflow (the aggregator may send `u64::MAX`).
pub(super) fn bump(session: u32, seq: u64) -> Result<u64, ReporterError> {
    seq.checked_add(1).ok_or(ReporterError::SeqExhausted(session))
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
    /// The aggregator addresses and the one in use.
    pub(super) targets: Targets,
    pub(super) config: ReporterConfig,
    pub(super) auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    pub(super) backoff: Backoff,
    pub(super) store: Arc<dyn StateStore>,
    pub(super) state: LocalState,
    /// The state is not in the store yet (a fresh one, or a new install id): saved whole before
    /// the first stream.
    pub(super) unsaved: bool,
    pub(super) settled: BTreeMap<u32, u64>,
    pub(super) conn: Option<Conn>,
    pub(super) status: watch::Sender<ReporterStatus>,
    pub(super) commands: mpsc::Receiver<Command>,
}

impl Actor {
    /// `saved`: the store holds `state` (it was loaded from there).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        aggregators: Aggregators,
        config: ReporterConfig,
        auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        store: Arc<dyn StateStore>,
        mut state: LocalState,
        saved: bool,
        status: watch::Sender<ReporterStatus>,
        commands: mpsc::Receiver<Command>,
    ) -> Self {
        let unsaved = !saved || (config.agent_install && state.install_id.is_empty());
        if config.agent_install && state.install_id.is_empty() {
            state.install_id = hex::encode(rand::rng().random::<[u8; 16]>());
        }
        Self {
            targets: Targets::new(aggregators),
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
            match self.save_full().await {
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
                                Ok(()) => {
                                    self.targets.resumed();
                                    let url = self.targets.url().to_owned();
                                    tracing::info!(site = %self.config.site, desk = self.config.desk, aggregator = %url, "connected");
                                    self.status.send_modify(|s| { s.connected = true; s.connects += 1; s.aggregator = url; });
                                }
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
                            let why = format!("{}: {:?}: {}", self.targets.url(), status.code(), status.message());
                            tracing::warn!(
                                site = %self.config.site, desk = self.config.desk, aggregator = %self.targets.url(),
                                code = ?status.code(), message = status.message(), "cannot open stream"
                            );
                            let delay = self.targets.open_failed(&mut self.backoff, &self.config.site, self.config.desk, &why);
                            self.set_error(why);
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
                        Ok(None) => {
                            let why = format!("{}: the aggregator ended the stream", self.targets.url());
                            self.targets.lost(&self.config.site, self.config.desk, &why);
                            self.set_error(why);
                            self.conn = None;
                        }
                        Err(status) if permanent(status.code()) => {
                            let advice = advice(&self.config, &status);
                            tracing::error!(site = %self.config.site, desk = self.config.desk, code = ?status.code(), "{advice}");
                            self.conn = None;
                            self.set_fatal(advice);
                        }
                        Err(status) => {
                            tracing::info!(
                                site = %self.config.site, desk = self.config.desk, aggregator = %self.targets.url(),
                                code = ?status.code(), message = status.message(), "stream ended"
                            );
                            let why = format!("{}: {:?}: {}", self.targets.url(), status.code(), status.message());
                            self.targets.lost(&self.config.site, self.config.desk, &why);
                            self.set_error(why);
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

    pub(super) fn set_error(&self, e: String) {
        self.status.send_modify(|s| s.last_error = Some(e));
    }

    pub(super) fn set_fatal(&self, e: String) {
        self.status.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(e.clone());
            s.fatal = Some(e);
        });
    }

    pub(super) fn publish_local(&self) {
        let local = self.state.sessions.iter().map(|(s, r)| (*s, (r.seq, r.count))).collect();
        let settled = self.settled.clone();
        self.status.send_modify(|s| {
            s.local = local;
            s.settled = settled;
        });
    }

    /// Opens a stream and waits for the resume handshake.
    fn open(&self) -> Opening {
        let mut client = self.targets.client();
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

    /// Saves the whole state (on the blocking pool for file stores, which needs a copy): the
    /// first save, and snapshots when the store asks for one.
    pub(super) async fn save_full(&self) -> Result<(), ReporterError> {
        if self.store.blocking() {
            let store = self.store.clone();
            let copy = self.state.clone();
            tokio::task::spawn_blocking(move || store.save(&copy)).await.map_err(|_| ReporterError::Stopped)??;
        } else {
            self.store.save(&self.state)?;
        }
        Ok(())
    }

    /// Records `change` in the store (on the blocking pool for file stores), then, when the store
    /// asks for it, writes a snapshot (its cost, O(state), comes once the changes since the last
    /// one have grown as large as the state: constant per change on average).
    async fn append(&self, change: &Change) -> Result<(), ReporterError> {
        if self.store.blocking() {
            let store = self.store.clone();
            let copy = change.clone();
            tokio::task::spawn_blocking(move || store.append(&copy)).await.map_err(|_| ReporterError::Stopped)??;
        } else {
            self.store.append(change)?;
        }
        Ok(())
    }

    /// A snapshot when the store asks for one; a failure only delays it (the changes are saved).
    async fn snapshot_if_wanted(&self) {
        if self.store.wants_snapshot()
            && let Err(e) = self.save_full().await
        {
            tracing::warn!(
                site = %self.config.site, desk = self.config.desk, error = %e,
                "cannot write a snapshot of the state file (the check-ins are saved); retrying later"
            );
        }
    }

    /// Saves `next` — a state without seen-sets ([`LocalState::head`]) — as a change of the
    /// registers and fields that differ, then makes it the state (seen-sets kept).
    pub(super) async fn commit(&mut self, next: LocalState) -> Result<(), ReporterError> {
        let mut change = Change::default();
        if Header::of(&next) != Header::of(&self.state) {
            change.header = Some(Header::of(&next));
        }
        for (session, reg) in &next.sessions {
            if self.state.sessions.get(session).is_none_or(|r| !r.same_head(reg)) {
                change.registers.insert(*session, RegisterChange::of(reg, Vec::new()));
            }
        }
        if change.is_empty() {
            return Ok(());
        }
        self.append(&change).await?;
        self.state.apply(&change);
        self.snapshot_if_wanted().await;
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

    /// Applies a command and everything queued behind it, persists once, then answers them all;
    /// a failed save undoes the group in memory (an undo log, not a copy of the state: the
    /// badges seen are not cloned per commit). Returns true if a reconnect was asked for.
    async fn handle_commands(&mut self, first: Command) -> bool {
        let mut undo: BTreeMap<u32, Undo> = BTreeMap::new();
        let mut replies: Vec<Box<dyn FnOnce(Option<Failure>) + Send>> = Vec::new();
        let mut reconnect = false;
        let mut cmd = Some(first);
        let max = self.config.max_count;
        while let Some(c) = cmd.take() {
            match c {
                Command::CheckIn { session, n, reply } => match self.check_session(session) {
                    Err(e) => drop(reply.send(Err(e))),
                    Ok(()) => {
                        let reg = touch(&mut self.state, &mut undo, session);
                        let count = reg.count + i64::from(n);
                        if count > max {
                            drop(reply.send(Err(ReporterError::OutOfRange { session, count, max })));
                        } else {
                            reg.count = count;
                            replies
                                .push(Box::new(move |e| drop(reply.send(e.map_or(Ok(()), |e| Err(e.into_error()))))));
                        }
                    }
                },
                Command::Badge { session, badge, reply } => match self.check_session(session) {
                    Err(e) => drop(reply.send(Err(e))),
                    Ok(()) => {
                        let reg = touch(&mut self.state, &mut undo, session);
                        if reg.badges.contains(&badge) {
                            let out = BadgeOutcome { counted: false, count: reg.count };
                            replies
                                .push(Box::new(move |e| drop(reply.send(e.map_or(Ok(out), |e| Err(e.into_error()))))));
                        } else if reg.count >= max {
                            drop(reply.send(Err(ReporterError::OutOfRange { session, count: reg.count + 1, max })));
                        } else {
                            reg.badges.insert(badge.clone());
                            reg.count += 1;
                            let out = BadgeOutcome { counted: true, count: reg.count };
                            if let Some(u) = undo.get_mut(&session) {
                                u.added.push(badge);
                            }
                            replies
                                .push(Box::new(move |e| drop(reply.send(e.map_or(Ok(out), |e| Err(e.into_error()))))));
                        }
                    }
                },
                Command::Correct { session, count, reason, reply } => match self.check_session(session) {
                    Err(e) => drop(reply.send(Err(e))),
                    Ok(()) => {
                        let anchored = self.state.anchored;
                        let reg = touch(&mut self.state, &mut undo, session);
                        reg.count = count;
                        reg.reason = Some(reason);
                        reg.absolute |= !anchored;
                        replies.push(Box::new(move |e| drop(reply.send(e.map_or(Ok(()), |e| Err(e.into_error()))))));
                    }
                },
                Command::Reconnect => reconnect = true,
            }
            if replies.len() < 4096 {
                cmd = self.commands.try_recv().ok();
            }
        }
        // One seq per changed session per group commit; the change saved is what the group did
        // (its registers and the badges it added), not the whole state.
        let mut failure: Option<Failure> = None;
        let mut change = Change::default();
        for (session, u) in &mut undo {
            let Some(reg) = self.state.sessions.get_mut(session) else { continue };
            let changed = u.before.as_ref().is_none_or(|b| b.count != reg.count || b.reason != reg.reason);
            if changed {
                match bump(*session, reg.seq) {
                    Ok(s) => reg.seq = s,
                    Err(_) => failure = Some(Failure::Seq(*session)),
                }
            }
            if changed || u.before.as_ref().is_some_and(|b| b.absolute != reg.absolute) {
                change.registers.insert(*session, RegisterChange::of(reg, std::mem::take(&mut u.added)));
            }
        }
        if failure.is_none()
            && !change.is_empty()
            && let Err(e) = self.append(&change).await
        {
            tracing::error!(
                site = %self.config.site, desk = self.config.desk,
                error = %e, "check-ins not recorded: state could not be saved"
            );
            failure = Some(Failure::Store(e.to_string()));
        }
        if failure.is_some() {
            for (session, mut u) in undo {
                if let Some(c) = change.registers.get_mut(&session) {
                    u.added.append(&mut c.added);
                }
                u.restore(&mut self.state, session);
            }
        } else {
            self.publish_local();
            if !change.is_empty() {
                self.snapshot_if_wanted().await;
            }
        }
        for r in replies {
            r(failure.clone());
        }
        reconnect
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

/// A register as it was before a group commit touched it, and the badges the group added.
struct Undo {
    /// `None`: the session had no register.
    before: Option<LocalRegister>,
    added: Vec<String>,
}

impl Undo {
    fn restore(self, state: &mut LocalState, session: u32) {
        match self.before {
            None => {
                state.sessions.remove(&session);
            }
            Some(b) => {
                if let Some(reg) = state.sessions.get_mut(&session) {
                    for badge in &self.added {
                        reg.badges.remove(badge);
                    }
                    (reg.seq, reg.count, reg.reason, reg.absolute) = (b.seq, b.count, b.reason, b.absolute);
                }
            }
        }
    }
}

/// The register of `session`, noting its state before the group's first change of it.
fn touch<'a>(state: &'a mut LocalState, undo: &mut BTreeMap<u32, Undo>, session: u32) -> &'a mut LocalRegister {
    undo.entry(session).or_insert_with(|| Undo {
        // Everything but the badges (restored from `added`).
        before: state.sessions.get(&session).map(|r| LocalRegister {
            badges: Default::default(),
            reason: r.reason.clone(),
            ..*r
        }),
        added: Vec::new(),
    });
    state.sessions.entry(session).or_default()
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
