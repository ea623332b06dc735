//! Every limit of the aggregator in one place: the defaults, the range each setting must lie in,
//! and the relations between them, checked once at start so that a bad setting refuses the start
//! with the flag's name and what to change, instead of failing later in the field.
//!
//! The relations (all checked by [`check`]):
//! * a batch within the documented limits (`--max-batch` reports, reasons of
//!   `--max-reason-bytes`) fits one message: `--max-message-bytes >= largest_batch_message()`;
//! * every ack fits one message: `--max-message-bytes >= largest_ack()` (a rejection's message is
//!   cut to [`MAX_REJECTION_MESSAGE`] bytes, an oversized batch gets ONE rejection);
//! * no total can overflow: `--max-count × registers <= i64::MAX` (registers = Σ desks × sessions;
//!   see [`check_registry`]), and `--max-count <= 10⁹` whatever the registry;
//! * `--connection-window >= --stream-window`.

use std::{fmt::Display, time::Duration};

use crate::proto::v1::{RegisterState, Rejection, Report};

/// Most reports per batch (default of `--max-batch`).
pub const DEFAULT_MAX_BATCH: usize = 1024;
/// Longest correction reason, bytes (default of `--max-reason-bytes`).
pub const DEFAULT_MAX_REASON: usize = 256;
/// Largest message, bytes (default of `--max-message-bytes`): 512 KiB, above the 290 KiB a full
/// batch of 1,024 reports with 256-byte reasons takes.
pub const DEFAULT_MAX_MESSAGE: usize = 512 * 1024;
/// Largest Totals request, bytes. Requests are a scope id and a few numbers; tonic reads a unary
/// request whole before any token is checked, so this, not `--max-message-bytes`, bounds what an
/// unauthenticated caller can make the aggregator hold per stream.
pub const MAX_TOTALS_REQUEST: usize = 16 * 1024;
/// Highest `--max-count` accepted, whatever the registry.
pub const MAX_COUNT_CEILING: i64 = 1_000_000_000;
/// A rejection's message is cut to this many bytes (at a character boundary).
pub const MAX_REJECTION_MESSAGE: usize = 128;
/// Largest `--max-message-bytes` accepted (a message is held whole while it is decoded).
pub const MAX_MESSAGE_CEILING: usize = 16 * 1024 * 1024;
/// Largest HTTP/2 window (RFC 9113 §6.9.1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// A setting outside its range, or two settings that do not fit together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value}: {rule}")]
pub struct LimitError {
    /// The flag, e.g. `--max-count`.
    pub flag: &'static str,
    /// The value given.
    pub value: String,
    /// What it must be, and why.
    pub rule: String,
}

/// The settings [`check`] looks at (the values of the flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--silent-after`.
    pub silent_after: Duration,
    /// `--publish-tick`.
    pub publish_tick: Duration,
    /// `--curve-bucket`.
    pub curve_bucket: Duration,
    /// `--max-count`.
    pub max_count: i64,
    /// `--max-agents-per-site`.
    pub max_agents_per_site: u16,
    /// `--max-batch`.
    pub max_batch: usize,
    /// `--max-reason-bytes`.
    pub max_reason: usize,
    /// `--max-message-bytes`.
    pub max_message_bytes: usize,
    /// `--max-streams-per-connection`.
    pub max_streams_per_connection: u32,
    /// `--stream-window`.
    pub stream_window: u32,
    /// `--connection-window`.
    pub connection_window: u32,
    /// `--keepalive-interval`.
    pub keepalive_interval: Duration,
    /// `--keepalive-timeout`.
    pub keepalive_timeout: Duration,
    /// `--flush-interval`.
    pub flush_interval: Duration,
    /// `--flush-records`.
    pub flush_records: usize,
    /// `--snapshot-interval`.
    pub snapshot_interval: Duration,
    /// `--max-concurrent-handshakes`.
    pub max_concurrent_handshakes: usize,
    /// `--grace`.
    pub grace: Duration,
}

fn within<T: PartialOrd + Display>(flag: &'static str, v: T, min: T, max: T, why: &str) -> Result<(), LimitError> {
    if v < min || v > max {
        return Err(LimitError { flag, value: v.to_string(), rule: format!("must be between {min} and {max}{why}") });
    }
    Ok(())
}

fn span(flag: &'static str, v: Duration, min: Duration, max: Duration, why: &str) -> Result<(), LimitError> {
    if v < min || v > max {
        let f = humantime::format_duration;
        return Err(LimitError {
            flag,
            value: f(v).to_string(),
            rule: format!("must be between {} and {}{why}", f(min), f(max)),
        });
    }
    Ok(())
}

/// The shortest duration accepted for a period: tests and demos use a few hundred ms.
const TENTH: Duration = Duration::from_millis(100);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Checks every setting's range and the relations between them. The first problem found is
/// returned; the message names the flag, the value and the rule.
pub fn check(s: &Settings) -> Result<(), LimitError> {
    span("--silent-after", s.silent_after, TENTH, DAY, " (site agents heartbeat every 15 s)")?;
    span("--publish-tick", s.publish_tick, Duration::from_millis(1), Duration::from_secs(60), "")?;
    span("--curve-bucket", s.curve_bucket, TENTH, DAY, "")?;
    within("--max-count", s.max_count, 1, MAX_COUNT_CEILING, " (per desk and session; totals must fit in 64 bits)")?;
    within(
        "--max-agents-per-site",
        s.max_agents_per_site,
        1,
        u16::MAX - super::installs::INSTALL_DESK_BASE,
        " (the register slots a site has for agent installs)",
    )?;
    within("--max-batch", s.max_batch, 1, 65_536, "")?;
    within("--max-reason-bytes", s.max_reason, 0, 4096, "")?;
    within("--max-streams-per-connection", s.max_streams_per_connection, 1, 100_000, "")?;
    within("--stream-window", s.stream_window, 1024, MAX_WINDOW, " (HTTP/2 allows at most 2^31 - 1)")?;
    within(
        "--connection-window",
        s.connection_window,
        s.stream_window.max(1024),
        MAX_WINDOW,
        " (at least --stream-window)",
    )?;
    span("--keepalive-interval", s.keepalive_interval, TENTH, Duration::from_secs(2 * 3600), "")?;
    span("--keepalive-timeout", s.keepalive_timeout, TENTH, Duration::from_secs(600), "")?;
    span("--flush-interval", s.flush_interval, Duration::from_micros(100), Duration::from_secs(10), "")?;
    within("--flush-records", s.flush_records, 1, 10_000_000, "")?;
    span("--snapshot-interval", s.snapshot_interval, TENTH, DAY, "")?;
    within("--max-concurrent-handshakes", s.max_concurrent_handshakes, 1, 1_000_000, "")?;
    span("--grace", s.grace, Duration::ZERO, Duration::from_secs(3600), "")?;
    let batch = largest_batch_message(s.max_batch, s.max_reason);
    let ack = largest_ack(s.max_batch);
    let need = batch.max(ack);
    within(
        "--max-message-bytes",
        s.max_message_bytes,
        need,
        MAX_MESSAGE_CEILING,
        &format!(
            " (a batch of --max-batch {} reports with --max-reason-bytes {} reasons takes up to {batch} bytes, \
             its ack up to {ack}: raise --max-message-bytes or lower those)",
            s.max_batch, s.max_reason
        ),
    )
}

/// Checks `--max-count` against the registry: the sum of every register at the ceiling must fit
/// in an `i64` (`registers` = Σ over sites of desks × sessions).
pub fn check_registry(max_count: i64, registers: u64) -> Result<(), LimitError> {
    let worst = i128::from(max_count) * i128::from(registers);
    if worst > i128::from(i64::MAX) {
        let most = i64::MAX / registers.max(1) as i64;
        return Err(LimitError {
            flag: "--max-count",
            value: max_count.to_string(),
            rule: format!("with {registers} registers (desks × sessions) the total could overflow; at most {most}"),
        });
    }
    Ok(())
}

/// The largest encoded `ReportRequest` carrying `max_batch` reports with `max_reason`-byte reasons,
/// bytes (every field at its widest).
pub fn largest_batch_message(max_batch: usize, max_reason: usize) -> usize {
    let widest = Report { session: u32::MAX, seq: u64::MAX, count: i64::MIN, reason: "x".repeat(max_reason) };
    let per_report = prost::encoding::message::encoded_len(1, &widest);
    let batch_len = per_report * max_batch;
    1 + prost::encoding::encoded_len_varint(batch_len as u64) + batch_len
}

/// The largest encoded `ReportResponse` holding an ack for a batch of `max_batch` reports, bytes:
/// every report rejected, every field at its widest, messages at [`MAX_REJECTION_MESSAGE`].
pub fn largest_ack(max_batch: usize) -> usize {
    let widest = Rejection {
        session: u32::MAX,
        seq: u64::MAX,
        code: i32::from(u8::MAX),
        message: "x".repeat(MAX_REJECTION_MESSAGE),
        current: Some(RegisterState { session: u32::MAX, seq: u64::MAX, count: i64::MIN }),
    };
    let per = prost::encoding::message::encoded_len(2, &widest);
    let applied =
        prost::encoding::message::encoded_len(1, &RegisterState { session: u32::MAX, seq: u64::MAX, count: i64::MIN });
    // `site_agents` (field 3, a varint): at most 1 tag byte + 5 bytes; `revision` (field 4, a
    // varint, cluster mode): at most 1 tag byte + 10 bytes.
    let ack_len = per.max(applied) * max_batch + 6 + 11;
    1 + prost::encoding::encoded_len_varint(ack_len as u64) + ack_len
}

/// Cuts a rejection message to [`MAX_REJECTION_MESSAGE`] bytes at a character boundary.
pub fn cut_message(mut message: String) -> String {
    if message.len() > MAX_REJECTION_MESSAGE {
        let mut end = MAX_REJECTION_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_batch_and_its_ack_fit_the_default_message_limit() {
        let batch = largest_batch_message(DEFAULT_MAX_BATCH, DEFAULT_MAX_REASON);
        assert_eq!(batch, 296_964, "1,024 × 290 bytes + 4 bytes of framing");
        assert!(batch <= DEFAULT_MAX_MESSAGE);
        assert!(largest_ack(DEFAULT_MAX_BATCH) <= DEFAULT_MAX_MESSAGE);
    }

    #[test]
    fn the_formulas_match_what_prost_encodes() {
        use crate::proto::v1::{Ack, ReportBatch, ReportRequest, ReportResponse, report_request, report_response};
        use prost::Message;
        let report = Report { session: u32::MAX, seq: u64::MAX, count: i64::MIN, reason: "r".repeat(40) };
        let req = ReportRequest { kind: Some(report_request::Kind::Batch(ReportBatch { reports: vec![report; 7] })) };
        assert_eq!(req.encoded_len(), largest_batch_message(7, 40));
        let rejection = Rejection {
            session: u32::MAX,
            seq: u64::MAX,
            code: 255,
            message: "m".repeat(MAX_REJECTION_MESSAGE),
            current: Some(RegisterState { session: u32::MAX, seq: u64::MAX, count: i64::MIN }),
        };
        let ack = Ack { applied: vec![], rejections: vec![rejection; 5], site_agents: u32::MAX, revision: u64::MAX };
        let resp = ReportResponse { kind: Some(report_response::Kind::Ack(ack)) };
        assert_eq!(resp.encoded_len(), largest_ack(5));
    }

    #[test]
    fn registers_bound_the_max_count() {
        assert!(check_registry(MAX_COUNT_CEILING, 10_035 * 64 * 16).is_ok());
        let registers = 10_000_000_000u64;
        let most = i64::MAX / registers as i64;
        assert!(check_registry(most, registers).is_ok());
        let e = check_registry(most + 1, registers).expect_err("one above overflows");
        assert!(e.to_string().contains("overflow"), "{e}");
    }

    #[test]
    fn messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(100);
        let cut = cut_message(long);
        assert!(cut.len() <= MAX_REJECTION_MESSAGE && cut.len() >= MAX_REJECTION_MESSAGE - 1);
        assert_eq!(cut_message("short".into()), "short");
    }
}
