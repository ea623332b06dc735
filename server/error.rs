//! The aggregator's error type and the one place that chooses a gRPC status code for each error.

use tonic::{Code, Status};

/// Why the aggregator refused something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No or malformed credentials.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Valid credentials that do not allow this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A site id not in the registry.
    #[error("unknown site {0:?}")]
    UnknownSite(String),
    /// A desk number outside `1..=desks` of the site.
    #[error("site {site} has desks 1..={desks}, not desk {desk}")]
    UnknownDesk {
        /// Site id.
        site: String,
        /// Asked desk.
        desk: u32,
        /// Desks the site has.
        desks: u16,
    },
    /// A session id not in the registry.
    #[error("unknown session {0}")]
    UnknownSession(u32),
    /// A scope id not in the registry.
    #[error("unknown {kind} {id:?}")]
    UnknownScope {
        /// Scope kind.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// A malformed request.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A value beyond what the aggregator accepts.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// Same seq, different count.
    #[error("conflict: seq {seq} already applied with count {stored}, report says {reported}")]
    Conflict {
        /// The seq.
        seq: u64,
        /// Stored count.
        stored: i64,
        /// Reported count.
        reported: i64,
    },
    /// An admission limit; retry later.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The aggregator is shutting down or cannot make the state durable.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl Error {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::UnknownSite(_)
            | Error::UnknownDesk { .. }
            | Error::UnknownSession(_)
            | Error::UnknownScope { .. } => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Conflict { .. } => Code::Aborted,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
