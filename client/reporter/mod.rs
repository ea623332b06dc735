//! The site agent library: a `Reporter` owns one agent's registers (one per session), persists
//! every change before sending it, keeps one long-lived stream to the aggregator, resumes after
//! any disconnect and resends its latest unacknowledged state.
//!
//! Given several aggregator addresses ([`Reporter::spawn_with`]), it uses one at a time and fails
//! over to the next when its node is unreachable or its stream ends ([`failover`] has the rule);
//! the resume handshake on the new node tells what it holds, and everything not acknowledged
//! there is resent (the counting rule makes a resend change nothing twice).
//!
//! All state lives in one actor task ([`actor`]); the public handle talks to it over a bounded
//! channel. Commands that arrive together are applied together and persisted once (group
//! commit), so the agent coalesces under load: many check-ins become one report with one seq.
//!
//! People, not lines: [`Reporter::badge`] counts a badge once per session, whatever desk of the
//! agent scans it and across restarts (the seen-set is saved with the count, atomically, before
//! the count is sent). The in-memory state changes only together with its file: when a save
//! fails, both stay as they were and the caller is told.

mod actor;
pub mod backoff;
mod error;
mod failover;
mod file_store;
mod reconcile;
pub mod state;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tonic::transport::Channel;

pub use self::error::ReporterError;
use self::{
    backoff::BackoffConfig,
    state::{LocalState, ScheduledSession, StateStore},
};
use super::{
    aggregators::Aggregators,
    connect::{CONNECT_TIMEOUT, bearer},
};

/// Settings of one reporter.
#[derive(Debug, Clone)]
pub struct ReporterConfig {
    /// Site id.
    pub site: String,
    /// Desk number (1-based). With `agent_install`, a label the aggregator shows; the register is
    /// the install's own slot.
    pub desk: u32,
    /// The site's token.
    pub token: String,
    /// Send this install's id (`x-headcount-agent`, generated once and kept in the state) so the
    /// aggregator gives the install a register slot of its own: two agents for one site or one
    /// desk number are then both counted. Off: the register of the desk number (simulations).
    pub agent_install: bool,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// Timeout for opening a stream and receiving the resume handshake, per aggregator address
    /// tried (a node that accepts TCP but never answers is left after this long).
    pub connect_timeout: Duration,
    /// Heartbeat after this long without sending anything.
    pub heartbeat_interval: Duration,
    /// Fault injection for simulations: probability that a batch is sent twice.
    pub duplicate_probability: f64,
    /// Highest count of one register the aggregator accepts (its `--max-count`, 100,000 by
    /// default); a change beyond is refused here, before it touches the state.
    pub max_count: i64,
    /// Longest correction reason the aggregator accepts, bytes (256).
    pub max_reason: usize,
}

impl ReporterConfig {
    /// Defaults for a site desk.
    pub fn new(site: impl Into<String>, desk: u32, token: impl Into<String>) -> Self {
        Self {
            site: site.into(),
            desk,
            token: token.into(),
            agent_install: false,
            backoff: BackoffConfig::default(),
            connect_timeout: CONNECT_TIMEOUT,
            heartbeat_interval: Duration::from_secs(15),
            duplicate_probability: 0.0,
            max_count: 100_000,
            max_reason: 256,
        }
    }
}

/// What a reporter shows about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReporterStatus {
    /// A stream is open and resumed.
    pub connected: bool,
    /// The URL of the aggregator of the current (or last) resumed stream; empty before the first
    /// (`the aggregator` when the reporter was given a channel without a URL).
    pub aggregator: String,
    /// Local registers: session → (seq, count).
    pub local: BTreeMap<u32, (u64, i64)>,
    /// Highest seq per session the aggregator acknowledged (or refused for good).
    pub settled: BTreeMap<u32, u64>,
    /// Latest state per session the aggregator acknowledged as stored: (seq, count).
    pub acked: BTreeMap<u32, (u64, i64)>,
    /// Successful stream openings so far.
    pub connects: u64,
    /// Reports refused by the aggregator (conflicts included).
    pub rejections: u64,
    /// Reports refused for good (not conflicts): their change was undone locally, so the local
    /// state stays what the aggregator accepted plus what came after.
    pub refused: u64,
    /// Times an ack or resume showed another writer's state on this register.
    pub foreign: u64,
    /// The aggregator refused this reporter for good; nothing more is tried.
    pub fatal: Option<String>,
    /// Last connection error or rejection, for display.
    pub last_error: Option<String>,
    /// This install's register slot (0: no install id sent, or not resumed yet).
    pub agent_slot: u32,
    /// Agent installs the aggregator knows for this site, this one included.
    pub site_agents: u32,
    /// Agent installs that declared this desk number, this one included.
    pub desk_agents: u32,
    /// The event's schedule (from the last resume, or the state file).
    pub schedule: Vec<ScheduledSession>,
}

impl ReporterStatus {
    /// True when every local change is acknowledged (or refused for good).
    pub fn all_settled(&self) -> bool {
        self.local.iter().all(|(s, (seq, _))| self.settled.get(s).copied().unwrap_or(0) >= *seq)
    }

    /// The name of a session from the schedule, or `session N`.
    pub fn session_name(&self, session: u32) -> String {
        session_label(&self.schedule, session)
    }
}

/// `N "name"`, or `N` when the schedule does not name it.
pub fn session_label(schedule: &[ScheduledSession], session: u32) -> String {
    match schedule.iter().find(|s| s.id == session) {
        Some(s) if !s.name.is_empty() => format!("{session} \"{}\"", s.name),
        _ => session.to_string(),
    }
}

/// What scanning a badge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadgeOutcome {
    /// True: counted now. False: already checked in this session (nothing changed).
    pub counted: bool,
    /// The agent's count for the session afterwards.
    pub count: i64,
}

type Reply<T> = oneshot::Sender<Result<T, ReporterError>>;

/// The answer to a command already handed to the reporter (`queue_*`): resolves once the command
/// is applied and saved, or refused; `Stopped` if the reporter stopped first.
pub struct Pending<T>(oneshot::Receiver<Result<T, ReporterError>>);

impl<T> std::future::Future for Pending<T> {
    type Output = Result<T, ReporterError>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(ReporterError::Stopped)))
    }
}

enum Command {
    CheckIn { session: u32, n: u32, reply: Reply<()> },
    Badge { session: u32, badge: String, reply: Reply<BadgeOutcome> },
    Correct { session: u32, count: i64, reason: String, reply: Reply<()> },
    Reconnect,
}

/// Handle to a running reporter. Dropping it stops the reporter (after its pending commands).
pub struct Reporter {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<ReporterStatus>,
    task: JoinHandle<()>,
    max_reason: usize,
    max_count: i64,
    aggregators: Aggregators,
}

impl Reporter {
    /// Loads the state from `store` and starts reporting over `channel` (which may be shared).
    pub fn spawn(channel: Channel, config: ReporterConfig, store: Arc<dyn StateStore>) -> Result<Self, ReporterError> {
        Self::spawn_with(Aggregators::single(channel), config, store)
    }

    /// [`Reporter::spawn`] over several aggregator addresses: starts on the first, fails over to
    /// the next when a stream ends or cannot be opened (see the module docs).
    pub fn spawn_with(
        aggregators: Aggregators,
        config: ReporterConfig,
        store: Arc<dyn StateStore>,
    ) -> Result<Self, ReporterError> {
        let (state, saved) = match store.load()? {
            Some(s) if s.site != config.site || s.desk != config.desk => {
                return Err(ReporterError::WrongState { site: s.site, desk: s.desk });
            }
            Some(s) => (s, true),
            None => (
                LocalState { version: 1, site: config.site.clone(), desk: config.desk, ..LocalState::default() },
                false,
            ),
        };
        let auth = bearer(&config.token)?;
        let (commands, rx) = mpsc::channel(256);
        let status = ReporterStatus {
            local: state.sessions.iter().map(|(s, r)| (*s, (r.seq, r.count))).collect(),
            schedule: state.schedule.clone(),
            ..ReporterStatus::default()
        };
        let (status_tx, status) = watch::channel(status);
        let (max_reason, max_count) = (config.max_reason, config.max_count);
        let actor = actor::Actor::new(aggregators.clone(), config, auth, store, state, saved, status_tx, rx);
        // No span on the task (it would be entered on every poll, 20,000 times over in the
        // simulation); log lines carry site and desk.
        let task = tokio::spawn(actor.run());
        Ok(Self { commands, status, task, max_reason, max_count, aggregators })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ReporterError> {
        self.queue(make).await?.await
    }

    /// Hands a command to the actor (which applies commands in the order they are handed over)
    /// and returns its answer to come.
    async fn queue<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<Pending<T>, ReporterError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| ReporterError::Stopped)?;
        Ok(Pending(rx))
    }

    /// [`Reporter::badge`] in two steps: hands the badge over now and returns the outcome to
    /// come. Commands are applied in the order they are handed over, so an input that hands its
    /// lines over one after the other, then awaits the outcomes together, is answered in its own
    /// order (the first copy of a repeated badge is the one counted) and still saved as one group.
    pub async fn queue_badge(&self, session: u32, badge: String) -> Result<Pending<BadgeOutcome>, ReporterError> {
        self.queue(|reply| Command::Badge { session, badge, reply }).await
    }

    /// [`Reporter::check_in`] in two steps (see [`Reporter::queue_badge`]).
    pub async fn queue_check_in(&self, session: u32, n: u32) -> Result<Pending<()>, ReporterError> {
        if i64::from(n) > self.max_count {
            return Err(ReporterError::OutOfRange { session, count: i64::from(n), max: self.max_count });
        }
        self.queue(|reply| Command::CheckIn { session, n, reply }).await
    }

    /// Records `n` check-ins for `session` (a head count, no badges). Returns once they are
    /// persisted locally; they are sent (and resent until acknowledged) in the background.
    pub async fn check_in(&self, session: u32, n: u32) -> Result<(), ReporterError> {
        if i64::from(n) > self.max_count {
            return Err(ReporterError::OutOfRange { session, count: i64::from(n), max: self.max_count });
        }
        self.call(|reply| Command::CheckIn { session, n, reply }).await
    }

    /// Records a scanned badge (already normalised, see `client::site::badge`) for `session`:
    /// counted once per session, whichever input it came from; a repeat changes nothing. Returns
    /// once the outcome is persisted locally.
    pub async fn badge(&self, session: u32, badge: impl Into<String>) -> Result<BadgeOutcome, ReporterError> {
        let badge = badge.into();
        self.call(|reply| Command::Badge { session, badge, reply }).await
    }

    /// Sets the agent's count for `session` (e.g. lowers it after a scanning mistake) with a
    /// reason for the audit trail. A negative count, a count above the ceiling or a reason longer
    /// than the aggregator accepts is refused here, before it touches the state.
    pub async fn correct(&self, session: u32, count: i64, reason: impl Into<String>) -> Result<(), ReporterError> {
        self.queue_correct(session, count, reason.into()).await?.await
    }

    /// [`Reporter::correct`] in two steps (see [`Reporter::queue_badge`]).
    pub async fn queue_correct(&self, session: u32, count: i64, reason: String) -> Result<Pending<()>, ReporterError> {
        if count < 0 {
            return Err(ReporterError::Negative(count));
        }
        if count > self.max_count {
            return Err(ReporterError::OutOfRange { session, count, max: self.max_count });
        }
        if reason.len() > self.max_reason {
            return Err(ReporterError::ReasonTooLong { len: reason.len(), max: self.max_reason });
        }
        self.queue(|reply| Command::Correct { session, count, reason, reply }).await
    }

    /// Drops the current stream and reconnects (fault injection, or after a network change).
    pub async fn reconnect(&self) -> Result<(), ReporterError> {
        self.commands.send(Command::Reconnect).await.map_err(|_| ReporterError::Stopped)
    }

    /// The aggregators this reporter may use, in order.
    pub fn aggregators(&self) -> &Aggregators {
        &self.aggregators
    }

    /// The latest status.
    pub fn status(&self) -> ReporterStatus {
        self.status.borrow().clone()
    }

    /// A receiver that changes with the status.
    pub fn watch_status(&self) -> watch::Receiver<ReporterStatus> {
        self.status.clone()
    }

    /// Waits until every local change is acknowledged, at most `timeout`. Fails at once with
    /// `Fatal` when the aggregator refused the reporter for good.
    pub async fn flush(&self, timeout: Duration) -> Result<(), ReporterError> {
        let mut rx = self.status.clone();
        let done = |s: &ReporterStatus| s.all_settled() || s.fatal.is_some();
        match tokio::time::timeout(timeout, rx.wait_for(done)).await {
            Ok(Ok(s)) => match &s.fatal {
                Some(f) => Err(ReporterError::Fatal(f.clone())),
                None => Ok(()),
            },
            Ok(Err(_)) => Err(ReporterError::Stopped),
            Err(_) => Err(ReporterError::FlushTimeout {
                waited: timeout,
                last_error: self.status.borrow().last_error.clone().unwrap_or_else(|| "none".into()),
            }),
        }
    }

    /// Stops the reporter at once, as if its process died: nothing more is sent or saved (what
    /// was saved stays saved). For fault injection in tests and simulations.
    pub fn kill(self) {
        self.task.abort();
    }

    /// [`Reporter::kill`], then waits until the task is gone (its last poll finished): after this
    /// nothing of it runs any more, as after a process crash.
    pub async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Stops the reporter (state is already persisted) and waits for its task.
    pub async fn shutdown(self) {
        drop(self.commands);
        let _ = self.task.await;
    }
}
