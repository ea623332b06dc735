//! The site agent (`headcount site`): one process per site serving all its desks at once —
//! standard input, files that scanner software appends to ([`follow`]), and the local desk
//! endpoint (`client::desk`) — in front of one [`Reporter`]. Each line gets an immediate answer
//! (counted / already checked in / refused) and the operator sees the running count per session
//! and whether the aggregator is connected.
//!
//! Exit codes of `headcount site` ([`ExitStatus`]): 0 everything acknowledged and nothing refused;
//! 3 not everything acknowledged within `--flush-timeout` (state kept, resent on the next start);
//! 4 the aggregator refused this agent for good (token, site, desk, session: fix the flag named);
//! 5 everything acknowledged, but some lines or reports were refused (listed above the summary);
//! 1 cannot start (state file, flags); 2 bad command line.

pub mod follow;
pub mod line;
pub mod run;
pub mod schedule;

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use serde::Serialize;

use self::line::Line;
use super::reporter::{BadgeOutcome, Pending, Reporter, ReporterError};
use crate::server::aggregator::now_ms;

/// How a line source's lines are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Every line is a badge (the default): counted once per session at this site.
    #[default]
    Badge,
    /// `+N`/`N` is N people counted without badges; `=N reason` sets the count (a correction).
    Count,
}

/// The answer to one line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Counted now (+1, or +N for a head count).
    Counted,
    /// The badge was already counted this session; nothing changed.
    AlreadyCheckedIn,
    /// A correction was recorded.
    Corrected,
    /// Refused: nothing was recorded.
    Refused,
    /// An empty line: nothing to do.
    Blank,
}

/// What the agent answers for a line (also the desk endpoint's JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Answer {
    /// What happened.
    pub outcome: Outcome,
    /// The badge as counted (normalised), if the line was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub badge: Option<String>,
    /// The session it counted for, when one was chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<u32>,
    /// The session's name (`N "name"`).
    pub session_name: String,
    /// This agent's count for the session afterwards (people checked in here).
    pub count: i64,
    /// A sentence for the operator.
    pub message: String,
}

/// Process exit status of the agent (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: everything acknowledged, nothing refused.
    Acknowledged = 0,
    /// 3: not everything acknowledged in time.
    NotAcknowledged = 3,
    /// 4: refused for good by the aggregator (configuration to fix).
    Permanent = 4,
    /// 5: acknowledged, but some lines or reports were refused.
    Refused = 5,
}

/// One agent: a reporter plus the session choice and the tallies shown to the operator.
pub struct Agent {
    reporter: Reporter,
    session: Option<u32>,
    /// Lines refused since start (nothing recorded for them).
    refused: AtomicU64,
    /// Badges counted / repeats since start.
    counted: AtomicU64,
    repeats: AtomicU64,
    /// Refusal messages, for the summary (the first 20).
    refusals: Mutex<Vec<String>>,
}

/// A line handed to the reporter, its answer to come (or already known).
enum Queued {
    Now(Answer),
    Badge(String, u32, Pending<BadgeOutcome>),
    HeadCount(u32, u32, Pending<()>),
    Correct(i64, u32, Pending<()>),
}

impl Agent {
    /// An agent over `reporter`; `session`: fixed by `--session`, or `None` to follow the
    /// schedule.
    pub fn new(reporter: Reporter, session: Option<u32>) -> Self {
        Self {
            reporter,
            session,
            refused: AtomicU64::new(0),
            counted: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            refusals: Mutex::new(Vec::new()),
        }
    }

    /// The reporter.
    pub fn reporter(&self) -> &Reporter {
        &self.reporter
    }

    /// The reporter, ending the agent (to shut it down or, in tests, kill it).
    pub fn into_reporter(self) -> Reporter {
        self.reporter
    }

    /// The session a check-in now belongs to.
    pub fn session_now(&self) -> Result<u32, schedule::ScheduleError> {
        schedule::current(&self.reporter.status().schedule, self.session, now_ms())
    }

    /// Handles one raw line from `source` (for messages) read in `mode`.
    pub async fn line(&self, raw: &[u8], mode: Mode, source: &str) -> Answer {
        self.queue_line(raw, mode, source).await.await
    }

    /// [`Agent::line`] in two steps: parses the line and hands it to the reporter now, and returns
    /// its answer to come. An input that hands its lines over one after the other and then awaits
    /// the answers together is answered in its own order, and its lines are saved as one group.
    pub async fn queue_line<'a>(
        &'a self,
        raw: &[u8],
        mode: Mode,
        source: &'a str,
    ) -> impl std::future::Future<Output = Answer> + use<'a> {
        let parsed = match mode {
            Mode::Badge => line::badge(raw),
            Mode::Count => line::count(raw),
        };
        let queued = match parsed {
            Ok(Line::Blank) => Queued::Now(self.answer(Outcome::Blank, None, None, 0, String::new())),
            Ok(l) => self.queue_apply(l).await,
            Err(e) => Queued::Now(self.answer(Outcome::Refused, None, None, 0, e.to_string())),
        };
        async move {
            let answer = self.answered(queued).await;
            if answer.outcome == Outcome::Refused {
                self.refused.fetch_add(1, Relaxed);
                let mut r = self.refusals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if r.len() < 20 {
                    r.push(format!("{source}: {}", answer.message));
                }
            }
            answer
        }
    }

    async fn queue_apply(&self, l: Line) -> Queued {
        let session = match self.session_now() {
            Ok(s) => s,
            Err(e) => return Queued::Now(self.answer(Outcome::Refused, None, None, 0, e.to_string())),
        };
        match l {
            Line::Badge(b) => match self.reporter.queue_badge(session, b.clone()).await {
                Ok(p) => Queued::Badge(b, session, p),
                Err(e) => Queued::Now(self.refuse(Some(b), session, e)),
            },
            Line::HeadCount(n) => match self.reporter.queue_check_in(session, n).await {
                Ok(p) => Queued::HeadCount(n, session, p),
                Err(e) => Queued::Now(self.refuse(None, session, e)),
            },
            Line::Correct(n, reason) => match self.reporter.queue_correct(session, n, reason).await {
                Ok(p) => Queued::Correct(n, session, p),
                Err(e) => Queued::Now(self.refuse(None, session, e)),
            },
            Line::Blank => Queued::Now(self.answer(Outcome::Blank, None, None, 0, String::new())),
        }
    }

    async fn answered(&self, queued: Queued) -> Answer {
        let count = |r: &Reporter, session: u32| r.status().local.get(&session).map_or(0, |(_, c)| *c);
        match queued {
            Queued::Now(a) => a,
            Queued::Badge(b, session, p) => match p.await {
                Ok(o) if o.counted => {
                    self.counted.fetch_add(1, Relaxed);
                    self.answer(Outcome::Counted, Some(b), Some(session), o.count, "counted".into())
                }
                Ok(o) => {
                    self.repeats.fetch_add(1, Relaxed);
                    self.answer(Outcome::AlreadyCheckedIn, Some(b), Some(session), o.count, "already checked in".into())
                }
                Err(e) => self.refuse(Some(b), session, e),
            },
            Queued::HeadCount(n, session, p) => match p.await {
                Ok(()) => self.answer(
                    Outcome::Counted,
                    None,
                    Some(session),
                    count(&self.reporter, session),
                    format!("+{n} counted"),
                ),
                Err(e) => self.refuse(None, session, e),
            },
            Queued::Correct(n, session, p) => match p.await {
                Ok(()) => {
                    self.answer(Outcome::Corrected, None, Some(session), n, format!("count set to {n} (correction)"))
                }
                Err(e) => self.refuse(None, session, e),
            },
        }
    }

    fn refuse(&self, badge: Option<String>, session: u32, e: ReporterError) -> Answer {
        let count = self.reporter.status().local.get(&session).map_or(0, |(_, c)| *c);
        self.answer(Outcome::Refused, badge, Some(session), count, e.to_string())
    }

    fn answer(
        &self,
        outcome: Outcome,
        badge: Option<String>,
        session: Option<u32>,
        count: i64,
        message: String,
    ) -> Answer {
        let session_name = session.map(|s| self.reporter.status().session_name(s)).unwrap_or_default();
        Answer { outcome, badge, session, session_name, count, message }
    }

    /// Lines refused since start.
    pub fn refused_lines(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// Badges counted and repeats since start.
    pub fn badges(&self) -> (u64, u64) {
        (self.counted.load(Relaxed), self.repeats.load(Relaxed))
    }

    /// The first refusal messages, for the summary.
    pub fn refusals(&self) -> Vec<String> {
        self.refusals.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The exit status after a flush that returned `flushed`.
    pub fn exit_status(&self, flushed: &Result<(), ReporterError>) -> ExitStatus {
        let st = self.reporter.status();
        match flushed {
            Err(ReporterError::Fatal(_)) => ExitStatus::Permanent,
            _ if st.fatal.is_some() => ExitStatus::Permanent,
            Err(_) => ExitStatus::NotAcknowledged,
            Ok(()) if self.refused_lines() > 0 || st.refused > 0 => ExitStatus::Refused,
            Ok(()) => ExitStatus::Acknowledged,
        }
    }
}

/// One operator line for an answer, e.g. `counted            BADGE-1  session 1 "Sáng": 17 here`.
pub fn describe(a: &Answer, source: &str) -> String {
    let what = a.badge.as_deref().unwrap_or("");
    match a.outcome {
        Outcome::Counted => format!("counted             {what:<20} session {}: {} here", a.session_name, a.count),
        Outcome::AlreadyCheckedIn => {
            format!("already checked in  {what:<20} session {}: {} here", a.session_name, a.count)
        }
        Outcome::Corrected => format!("corrected           session {}: {}", a.session_name, a.message),
        Outcome::Refused => format!("REFUSED             {what:<20} ({source}) {} — not counted", a.message),
        Outcome::Blank => String::new(),
    }
}
