//! What an input line means. In badge mode (the default) every line is a badge: its bytes are
//! decoded (a UTF-8 byte-order mark dropped, CR/LF and surrounding white space trimmed, invalid
//! UTF-8 bytes kept as `\xNN` so that distinct badges stay distinct), then put in Unicode NFC so
//! that the same name typed on two keyboards is one badge. No badge content is a command: `+12`,
//! `=3` or a phone number are badges like any other. Head counts and corrections exist only in
//! count mode (`--mode count`), where a line is `+N`/`N` (N people counted at the door) or
//! `=N reason` (set this agent's count for the session to N).

use std::fmt::Write as _;

use unicode_normalization::UnicodeNormalization;

/// Longest badge accepted, bytes (after normalisation). Longer lines are refused.
pub const MAX_BADGE: usize = 256;

/// Why a line was refused (nothing was recorded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// A badge longer than [`MAX_BADGE`].
    #[error("badge is {0} bytes, at most {MAX_BADGE}: not a badge (two scans run together?)")]
    TooLong(usize),
    /// A count-mode line that is not `+N`, `N` or `=N reason`.
    #[error("count mode takes `+N` (N people), or `=N reason` (set the count to N): found {0:?}")]
    NotACount(String),
}

/// A line's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A badge, normalised.
    Badge(String),
    /// N people counted without badges (count mode).
    HeadCount(u32),
    /// Set the count to N, with a reason (count mode).
    Correct(i64, String),
    /// Nothing (an empty line).
    Blank,
}

/// The text of a line: BOM dropped, invalid UTF-8 bytes as `\xNN`, trimmed, NFC.
pub fn text(raw: &[u8]) -> String {
    let raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
    let mut s = String::with_capacity(raw.len());
    for chunk in raw.utf8_chunks() {
        s.push_str(chunk.valid());
        for b in chunk.invalid() {
            let _ = write!(s, "\\x{b:02X}");
        }
    }
    s.trim().nfc().collect()
}

/// A badge-mode line: a badge, or blank.
///
/// ```
/// use headcount::client::site::line::{Line, badge};
/// assert_eq!(badge(b"\xEF\xBB\xBF+120\r\n"), Ok(Line::Badge("+120".into())));
/// assert_eq!(badge("Nguye\u{0302}\u{0303}n".as_bytes()), Ok(Line::Badge("Nguyễn".into())));
/// assert_eq!(badge(b"  \r"), Ok(Line::Blank));
/// ```
pub fn badge(raw: &[u8]) -> Result<Line, LineError> {
    let t = text(raw);
    if t.is_empty() {
        Ok(Line::Blank)
    } else if t.len() > MAX_BADGE {
        Err(LineError::TooLong(t.len()))
    } else {
        Ok(Line::Badge(t))
    }
}

/// A count-mode line.
///
/// ```
/// use headcount::client::site::line::{Line, count};
/// assert_eq!(count(b"+12"), Ok(Line::HeadCount(12)));
/// assert_eq!(count(b"=40 scanned twice"), Ok(Line::Correct(40, "scanned twice".into())));
/// assert!(count(b"BADGE-1").is_err());
/// assert!(count(b"=-1 oops").is_err());
/// ```
pub fn count(raw: &[u8]) -> Result<Line, LineError> {
    let t = text(raw);
    let bad = || LineError::NotACount(t.chars().take(80).collect());
    if t.is_empty() {
        return Ok(Line::Blank);
    }
    if let Some(rest) = t.strip_prefix('=') {
        let rest = rest.trim_start();
        let (n, reason) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let n: i64 = n.parse().map_err(|_| bad())?;
        if n < 0 {
            return Err(bad());
        }
        return Ok(Line::Correct(n, reason.trim().to_owned()));
    }
    let n: u32 = t.strip_prefix('+').unwrap_or(&t).trim().parse().map_err(|_| bad())?;
    Ok(if n == 0 { Line::Blank } else { Line::HeadCount(n) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn badges_are_never_commands_and_stay_distinct() {
        for raw in [&b"+849123456"[..], b"+84912345678", b"=3 x", b"+1000000", b"0", b"-5"] {
            assert!(matches!(badge(raw), Ok(Line::Badge(_))), "{raw:?}");
        }
        assert_ne!(badge(b"A\xFF"), badge(b"A\xFE"));
        assert_eq!(badge(b"A\xFF"), Ok(Line::Badge("A\\xFF".into())));
        assert_eq!(badge(&[b'x'; 300]), Err(LineError::TooLong(300)));
        assert_eq!(badge(b"\tBADGE-1  \r\n"), badge(b"BADGE-1"));
    }
}
