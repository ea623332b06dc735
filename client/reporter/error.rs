//! Why a reporter call failed: each variant says whether the change was recorded and what to fix.

use std::time::Duration;

use super::state::StoreError;
use crate::client::connect::ConnectError;

/// Why a reporter call failed. Every variant except `Fatal` and `FlushTimeout` means the change
/// was NOT recorded (neither in memory nor in the state file).
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
    /// The change would take the register above the aggregator's ceiling.
    #[error("session {session}: a count of {count} is above the ceiling of {max}; not recorded")]
    OutOfRange {
        /// Session.
        session: u32,
        /// The count it would have made.
        count: i64,
        /// The ceiling.
        max: i64,
    },
    /// A correction reason longer than the aggregator accepts.
    #[error("correction reason is {len} bytes, at most {max} allowed; not recorded (shorten it)")]
    ReasonTooLong {
        /// Its length, bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A session the aggregator's schedule does not have.
    #[error("session {session} is not in the event's schedule (sessions: {known}); not recorded")]
    UnknownSession {
        /// The session asked for.
        session: u32,
        /// The sessions there are, for the message.
        known: String,
    },
    /// A register's seq cannot be raised any further (the aggregator holds `u64::MAX`).
    #[error("session {0}: the register's seq is exhausted (the aggregator holds seq u64::MAX); not recorded")]
    SeqExhausted(u32),
    /// The aggregator refused this reporter for good (token, site, desk); nothing is retried.
    #[error("{0}")]
    Fatal(String),
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
