//! The site agent's input loop: reads check-ins from a scanner's output (standard input) and
//! hands them to a [`Reporter`]; at end of input waits until everything is acknowledged.
//!
//! Input, one item per line: any non-empty line is one check-in (a scanned badge code); `+N` is
//! N check-ins; `=N reason…` sets the desk's count to N (a correction, with a reason).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::reporter::{Reporter, ReporterError};

/// One parsed input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// N check-ins.
    CheckIn(u32),
    /// Set the count, with a reason.
    Correct(i64, String),
    /// Blank line: nothing.
    Blank,
}

/// A line that cannot be understood.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong.
    pub message: String,
}

/// Parses one line.
///
/// ```
/// use headcount::client::site::{Line, parse_line};
/// assert_eq!(parse_line("BADGE-0042", 1).expect("a badge"), Line::CheckIn(1));
/// assert_eq!(parse_line("+12", 2).expect("a count"), Line::CheckIn(12));
/// assert_eq!(parse_line("=40 scanned twice", 3).expect("a correction"), Line::Correct(40, "scanned twice".into()));
/// assert!(parse_line("=-1 oops", 4).is_err());
/// ```
pub fn parse_line(text: &str, line: u64) -> Result<Line, ParseError> {
    let t = text.trim();
    let err = |message: String| ParseError { line, message };
    if t.is_empty() {
        return Ok(Line::Blank);
    }
    if let Some(n) = t.strip_prefix('+') {
        let n: u32 = n.trim().parse().map_err(|_| err(format!("`+N` needs a count, found {t:?}")))?;
        return Ok(Line::CheckIn(n));
    }
    if let Some(rest) = t.strip_prefix('=') {
        let (n, reason) = rest.trim().split_once(char::is_whitespace).unwrap_or((rest.trim(), ""));
        let n: i64 = n.parse().map_err(|_| err(format!("`=N reason` needs a count, found {t:?}")))?;
        if n < 0 {
            return Err(err(format!("a count cannot be negative ({n})")));
        }
        return Ok(Line::Correct(n, reason.trim().to_owned()));
    }
    Ok(Line::CheckIn(1))
}

/// What the agent did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteSummary {
    /// Check-ins read.
    pub check_ins: u64,
    /// Corrections read.
    pub corrections: u64,
    /// Lines skipped as malformed.
    pub malformed: u64,
}

/// Why the agent stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// Reading input failed.
    #[error("reading input: {0}")]
    Input(#[from] std::io::Error),
    /// The reporter failed.
    #[error(transparent)]
    Reporter(#[from] ReporterError),
}

/// Reads `input` to its end, reporting for `session`; then flushes (at most `flush_timeout`).
/// Lines already buffered are coalesced into one call, so a fast scanner or a replayed file costs
/// one local write per burst, not per line.
pub async fn run(
    reporter: &Reporter,
    session: u32,
    input: BufReader<impl AsyncRead + Unpin>,
    flush_timeout: Duration,
) -> Result<SiteSummary, SiteError> {
    let mut summary = SiteSummary::default();
    let mut lines = input.lines();
    let mut pending = 0u32;
    let mut number = 0u64;
    while let Some(text) = lines.next_line().await? {
        number += 1;
        match parse_line(&text, number) {
            Ok(Line::CheckIn(n)) => {
                pending = pending.saturating_add(n);
                summary.check_ins += u64::from(n);
            }
            Ok(Line::Correct(count, reason)) => {
                if pending > 0 {
                    reporter.check_in(session, std::mem::take(&mut pending)).await?;
                }
                reporter.correct(session, count, reason).await?;
                summary.corrections += 1;
            }
            Ok(Line::Blank) => {}
            Err(e) => {
                tracing::warn!(error = %e, "skipping malformed input line");
                summary.malformed += 1;
            }
        }
        if pending > 0 && lines.get_ref().buffer().is_empty() {
            reporter.check_in(session, std::mem::take(&mut pending)).await?;
        }
    }
    if pending > 0 {
        reporter.check_in(session, pending).await?;
    }
    reporter.flush(flush_timeout).await?;
    Ok(summary)
}
