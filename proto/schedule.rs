//! Which session of the event's schedule is "current" at a given instant: one rule shared by the
//! aggregator (`Registry::current_session`), the site agent and the dashboard (both read the
//! schedule from `Resume.schedule`), so they never disagree.
//!
//! The rule, in order:
//! 1. the session whose window `[starts, ends)` contains now (scheduled sessions never overlap:
//!    the registry loader refuses overlaps);
//! 2. else the next session, if it starts within [`EARLY_CHECK_IN_MS`] (desks open before the
//!    hall does);
//! 3. else the latest session that has started (late arrivals after its end still count for it);
//! 4. else none (before the first session's early check-in).
//!
//! Unscheduled sessions (`starts_unix_ms == 0`) are never current; `ends_unix_ms == 0` means
//! open-ended.

use super::v1::SessionInfo;

/// How long before its scheduled start a session becomes current when no other session is
/// running: 60 minutes, in milliseconds.
pub const EARLY_CHECK_IN_MS: i64 = 60 * 60 * 1000;

/// The index of the current session among `windows` (`(starts_unix_ms, ends_unix_ms)` each,
/// `starts == 0` for unscheduled, `ends == 0` for open-ended) at `now_unix_ms`, by the rule of
/// this module. `None` when no session is current.
pub fn current_index(windows: impl IntoIterator<Item = (i64, i64)>, now_unix_ms: i64) -> Option<usize> {
    let mut next: Option<(i64, usize)> = None;
    let mut latest: Option<(i64, usize)> = None;
    for (i, (starts, ends)) in windows.into_iter().enumerate() {
        if starts == 0 {
            continue;
        }
        let ends = if ends == 0 { i64::MAX } else { ends };
        if starts <= now_unix_ms {
            if now_unix_ms < ends {
                return Some(i);
            }
            if latest.is_none_or(|(s, _)| starts > s) {
                latest = Some((starts, i));
            }
        } else if starts.saturating_sub(now_unix_ms) <= EARLY_CHECK_IN_MS && next.is_none_or(|(s, _)| starts < s) {
            next = Some((starts, i));
        }
    }
    next.or(latest).map(|(_, i)| i)
}

/// The current session of a schedule (as sent in `Resume.schedule`) at `now_unix_ms`, by the
/// rule of this module.
pub fn current_session(schedule: &[SessionInfo], now_unix_ms: i64) -> Option<&SessionInfo> {
    current_index(schedule.iter().map(|s| (s.starts_unix_ms, s.ends_unix_ms)), now_unix_ms).map(|i| &schedule[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 60 * 60 * 1000;

    /// Two days, morning 8–11:30 and afternoon 13:30–17 (hours from an arbitrary origin).
    fn windows() -> Vec<(i64, i64)> {
        vec![(8 * H, 11 * H + H / 2), (13 * H + H / 2, 17 * H), (32 * H, 35 * H + H / 2), (37 * H + H / 2, 41 * H)]
    }

    #[test]
    fn running_session_wins() {
        assert_eq!(current_index(windows(), 9 * H), Some(0));
        assert_eq!(current_index(windows(), 8 * H), Some(0), "start is inclusive");
        assert_eq!(current_index(windows(), 14 * H), Some(1));
    }

    #[test]
    fn next_session_within_the_margin_then_latest_started() {
        assert_eq!(current_index(windows(), 7 * H + 1), Some(0), "early check-in");
        assert_eq!(current_index(windows(), 6 * H), None, "before everything");
        assert_eq!(current_index(windows(), 12 * H), Some(0), "lunch: latest started");
        assert_eq!(current_index(windows(), 12 * H + H / 2), Some(1), "an hour before the afternoon");
        assert_eq!(current_index(windows(), 11 * H + H / 2), Some(0), "end is exclusive: still latest started");
        assert_eq!(current_index(windows(), 100 * H), Some(3), "after the event: the last one");
    }

    #[test]
    fn unscheduled_and_open_ended() {
        assert_eq!(current_index([(0, 0), (0, 0)], 5 * H), None);
        assert_eq!(current_index([(0, 0), (H, 0)], 1000 * H), Some(1));
    }
}
