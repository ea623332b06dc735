//! Which session a check-in belongs to: the one given with `--session`, or the current one of the
//! event's schedule (which the aggregator sends in every resume).
//!
//! A session is current from the end of the session before it (check-in opens early: the bursts
//! come in the hour before the start) until its own end. After the last session's end there is
//! no current session. Times are Unix milliseconds, so no time-zone arithmetic happens here; the
//! schedule's time zone is shown to the operator with the times (formatted with `jiff` on the
//! aggregator side).

use crate::client::reporter::{session_label, state::ScheduledSession};

/// Why no session can be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// `--session` names a session the schedule does not have.
    #[error("session {session} is not in the event's schedule (sessions: {known}); fix --session")]
    Unknown {
        /// Asked.
        session: u32,
        /// Known, for the message.
        known: String,
    },
    /// The schedule has no times (or the event is over), and no `--session` was given.
    #[error("no session is running now by the event's schedule (sessions: {0}); pass --session ID")]
    NoCurrent(String),
}

/// Every session as `N "name"`, comma-separated.
pub fn list(schedule: &[ScheduledSession]) -> String {
    if schedule.is_empty() {
        return "none known".into();
    }
    schedule.iter().map(|s| session_label(schedule, s.id)).collect::<Vec<_>>().join(", ")
}

/// The session a check-in at `now_ms` belongs to.
///
/// ```
/// use headcount::client::{reporter::state::ScheduledSession, site::schedule::current};
/// let s = |id, starts_unix_ms, ends_unix_ms| ScheduledSession { id, starts_unix_ms, ends_unix_ms, ..Default::default() };
/// let day = [s(1, 1_000, 2_000), s(2, 3_000, 4_000)];
/// assert_eq!(current(&day, None, 500), Ok(1)); // before the start: check-in is open
/// assert_eq!(current(&day, None, 2_500), Ok(2)); // between sessions: the next one
/// assert!(current(&day, None, 4_500).is_err()); // after the last
/// assert_eq!(current(&day, Some(2), 500), Ok(2));
/// assert!(current(&day, Some(3), 500).is_err());
/// ```
pub fn current(schedule: &[ScheduledSession], fixed: Option<u32>, now_ms: i64) -> Result<u32, ScheduleError> {
    if let Some(session) = fixed {
        if schedule.is_empty() || schedule.iter().any(|s| s.id == session) {
            return Ok(session);
        }
        return Err(ScheduleError::Unknown { session, known: list(schedule) });
    }
    let mut timed: Vec<&ScheduledSession> = schedule.iter().filter(|s| s.starts_unix_ms > 0).collect();
    timed.sort_by_key(|s| s.starts_unix_ms);
    timed
        .iter()
        .find(|s| s.ends_unix_ms == 0 || now_ms < s.ends_unix_ms)
        .map(|s| s.id)
        .ok_or_else(|| ScheduleError::NoCurrent(list(schedule)))
}
