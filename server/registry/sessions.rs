//! The sessions file: `session_id,name[,starts_at,ends_at,time_zone]`, local times in an IANA
//! time zone (the row's `time_zone`, else the `--time-zone` flag, default `Asia/Ho_Chi_Minh`),
//! converted to Unix ms with `jiff` (the tz database is compiled into the binary).

use std::path::Path;

use jiff::{Timestamp, civil::DateTime, tz::TimeZone};

use super::{
    Schedule, Session,
    table::{Columns, LoadError, Table, whole_number},
};

/// Columns of the sessions file.
pub const COLUMNS: Columns =
    Columns { required: &["session_id", "name"], optional: &["starts_at", "ends_at", "time_zone"] };
const ID: usize = 0;
const NAME: usize = 1;
const STARTS: usize = 2;
const ENDS: usize = 3;
const ZONE: usize = 4;

/// Time zone of sessions whose row names none, when no `--time-zone` is given.
pub const DEFAULT_TIME_ZONE: &str = "Asia/Ho_Chi_Minh";

/// Reads a sessions file from its raw bytes. `default_zone` applies to rows with an empty (or
/// no) `time_zone` column.
pub fn read_sessions(bytes: &[u8], path: &Path, default_zone: &str) -> Result<Vec<Session>, LoadError> {
    let table = Table::read(bytes, path, &COLUMNS)?;
    let mut out: Vec<(Session, u64)> = Vec::new();
    for row in &table.rows {
        let line = row.line;
        let id = whole_number(row.get(ID)).map_err(|m| table.err(line, format!("session_id: {m}")))?;
        let id = u32::try_from(id)
            .ok()
            .filter(|&id| id >= 1)
            .ok_or_else(|| table.err(line, format!("session_id must be 1..={}, found {id}", u32::MAX)))?;
        if let Some((_, first)) = out.iter().find(|(s, _)| s.id == id) {
            return Err(
                table.err(line, format!("session_id {id} is also on line {first}: give each session its own id"))
            );
        }
        let name = row.get(NAME);
        if name.is_empty() {
            return Err(table.err(line, "name is empty: give the session a name operators will recognise"));
        }
        if let Some((s, first)) = out.iter().find(|(s, _)| s.name.to_lowercase() == name.to_lowercase()) {
            return Err(table.err(
                line,
                format!(
                    "session name {name:?} is also used by session {} on line {first}: give each its own name",
                    s.id
                ),
            ));
        }
        let schedule = match (row.get(STARTS), row.get(ENDS)) {
            ("", "") => None,
            ("", _) => return Err(table.err(line, "starts_at is empty but ends_at is not: give both, or neither")),
            (_, "") => return Err(table.err(line, "ends_at is empty but starts_at is not: give both, or neither")),
            (starts, ends) => {
                let zone = Some(row.get(ZONE)).filter(|z| !z.is_empty()).unwrap_or(default_zone);
                Some(schedule(starts, ends, zone).map_err(|m| table.err(line, m))?)
            }
        };
        out.push((Session { id, name: name.to_owned(), schedule }, line));
    }
    if out.is_empty() {
        return Err(table.err(table.header_line, "no sessions: add one row per session under the header"));
    }
    check_overlaps(&table, &out)?;
    Ok(out.into_iter().map(|(s, _)| s).collect())
}

/// Refuses two scheduled sessions whose windows overlap (touching is fine).
fn check_overlaps(table: &Table, sessions: &[(Session, u64)]) -> Result<(), LoadError> {
    let mut windows: Vec<(&Schedule, &Session, u64)> =
        sessions.iter().filter_map(|(s, line)| s.schedule.as_ref().map(|w| (w, s, *line))).collect();
    windows.sort_by_key(|(w, _, _)| w.starts_unix_ms);
    for pair in windows.windows(2) {
        let ((a, sa, la), (b, sb, lb)) = (pair[0], pair[1]);
        if b.starts_unix_ms < a.ends_unix_ms {
            let (line, other, other_line) = if lb > la { (lb, sa, la) } else { (la, sb, lb) };
            let this = if lb > la { sb } else { sa };
            return Err(table.err(
                line,
                format!(
                    "session {} ({:?}) overlaps session {} ({:?}) on line {other_line}: a desk can count for one session \
                     at a time; move one's start after the other's end",
                    this.id, this.name, other.id, other.name
                ),
            ));
        }
    }
    Ok(())
}

/// The window of a session given as local times in the IANA zone `zone`; the error says how to
/// fix it.
pub fn schedule(starts: &str, ends: &str, zone: &str) -> Result<Schedule, String> {
    let tz = TimeZone::get(zone).map_err(|_| {
        format!("unknown time zone {zone:?}: write an IANA name such as Asia/Ho_Chi_Minh (see `--time-zone`)")
    })?;
    let starts_unix_ms = instant("starts_at", starts, &tz, zone)?;
    let ends_unix_ms = instant("ends_at", ends, &tz, zone)?;
    if ends_unix_ms <= starts_unix_ms {
        return Err(format!("ends_at {ends} is not after starts_at {starts}: swap them or fix the date"));
    }
    Ok(Schedule { starts_unix_ms, ends_unix_ms, time_zone: tz.iana_name().unwrap_or(zone).to_owned() })
}

/// A local time `YYYY-MM-DD HH:MM[:SS]` (or with `T`) in `tz`, as Unix ms.
fn instant(column: &str, value: &str, tz: &TimeZone, zone: &str) -> Result<i64, String> {
    let shape = |v: &str| {
        let b = v.as_bytes();
        let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
        (b.len() == 16 || (b.len() == 19 && b[16] == b':' && digits(17..19)))
            && digits(0..4)
            && b[4] == b'-'
            && digits(5..7)
            && b[7] == b'-'
            && digits(8..10)
            && (b[10] == b'T' || b[10] == b' ')
            && digits(11..13)
            && b[13] == b':'
            && digits(14..16)
    };
    let hint = "write the local time as year-month-day hour:minute, e.g. 2026-12-01 08:00 (a date like 01/12/2026 is \
                ambiguous: format the column as yyyy-mm-dd hh:mm)";
    if !shape(value) {
        return Err(format!("{column} {value:?} is not a date and time: {hint}"));
    }
    let dt: DateTime =
        value.parse().map_err(|e| format!("{column} {value:?} is not a valid date and time ({e}): {hint}"))?;
    let ts: Timestamp = tz.to_ambiguous_timestamp(dt).unambiguous().map_err(|_| {
        format!("{column} {value} does not exist or happens twice in {zone} (a clock change): pick another time")
    })?;
    Ok(ts.as_millisecond())
}

/// The local time of `unix_ms` in the IANA zone `zone`, as `YYYY-MM-DD HH:MM` (seconds when not
/// zero); the inverse of what the loader accepts.
pub fn local_time(unix_ms: i64, zone: &str) -> String {
    let tz = TimeZone::get(zone).unwrap_or(TimeZone::UTC);
    let Ok(ts) = Timestamp::from_millisecond(unix_ms) else { return String::new() };
    let dt = tz.to_datetime(ts);
    if dt.second() == 0 {
        format!("{:04}-{:02}-{:02} {:02}:{:02}", dt.year(), dt.month(), dt.day(), dt.hour(), dt.minute())
    } else {
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            dt.year(),
            dt.month(),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        )
    }
}
