//! The aggregator's two clocks: a monotonic one for every duration (silence, "last change"
//! ordering) and the wall clock, used only to stamp what is displayed. Injectable, so tests can
//! step the wall clock and advance monotonic time at will.
//!
//! Why two: an NTP step or an operator fixing the date moves the wall clock by minutes or hours.
//! Measured with the wall clock, a step back of an hour kept dead sites "reporting" for that hour
//! and froze "last change"; a step forward of two minutes showed every site silent.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering::Relaxed},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

/// How far the wall clock may drift from `monotonic + offset` before displayed times are
/// re-anchored to it, ms. Re-anchoring on every millisecond of jitter would make every reading of
/// "last change" differ from the previous one (and wake every watcher); NTP slews at most
/// 0.5 ms/s, so this re-anchors a slewing clock every few minutes and a stepped clock at once.
const REANCHOR_MS: i64 = 100;

/// A clock handle: cheap to clone, shared by everything in one aggregator.
///
/// * [`Clock::mono_ms`] — milliseconds on a monotonic clock, always `>= 1` (0 means "never" in
///   the aggregator's state), never going back;
/// * [`Clock::wall_ms`] — Unix milliseconds as the system says now (may jump either way);
/// * [`Clock::to_wall`] — the Unix time at which a past monotonic reading happened, for display.
#[derive(Clone)]
pub struct Clock(Arc<Source>);

enum Source {
    System {
        origin: Instant,
        /// `wall − mono` as of the last [`Clock::reanchor`], ms.
        offset: AtomicI64,
    },
    Manual(ManualClock),
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0 {
            Source::System { .. } => f.write_str("Clock::System"),
            Source::Manual(m) => write!(f, "Clock::Manual(wall {} ms, mono {} ms)", m.wall_ms(), m.mono_ms()),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

fn system_wall_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Clock {
    /// The operating system's clocks: `Instant` (monotonic) and `SystemTime` (wall).
    pub fn system() -> Self {
        let origin = Instant::now();
        Self(Arc::new(Source::System { origin, offset: AtomicI64::new(system_wall_ms() - 1) }))
    }

    /// A clock that moves only when told to (tests). Returns the clock and its control handle.
    pub fn manual(wall_ms: i64) -> (Self, ManualClock) {
        let control = ManualClock { wall: Arc::new(AtomicI64::new(wall_ms)), mono: Arc::new(AtomicI64::new(1)) };
        (Self(Arc::new(Source::Manual(control.clone()))), control)
    }

    /// Monotonic milliseconds since the clock was made, plus one (so never 0).
    #[inline]
    pub fn mono_ms(&self) -> i64 {
        match &*self.0 {
            Source::System { origin, .. } => origin.elapsed().as_millis() as i64 + 1,
            Source::Manual(m) => m.mono_ms(),
        }
    }

    /// Wall-clock Unix milliseconds now, for stamps that are displayed (corrections, updates).
    pub fn wall_ms(&self) -> i64 {
        match &*self.0 {
            Source::System { .. } => system_wall_ms(),
            Source::Manual(m) => m.wall_ms(),
        }
    }

    /// The Unix time of a past monotonic reading, as the wall clock now places it; 0 stays 0
    /// ("never"). Stable between re-anchorings, so equal readings convert to equal times.
    pub fn to_wall(&self, mono_ms: i64) -> i64 {
        if mono_ms == 0 {
            return 0;
        }
        match &*self.0 {
            Source::System { offset, .. } => mono_ms + offset.load(Relaxed),
            Source::Manual(m) => mono_ms + m.wall_ms() - m.mono_ms(),
        }
    }

    /// Re-reads the wall clock and, if it moved away from the monotonic one by more than
    /// [`REANCHOR_MS`] (a step, or accumulated slew), displays times on the new footing. Called
    /// by the aggregator's periodic sweep. Returns the jump applied, ms (0: none).
    pub fn reanchor(&self) -> i64 {
        let Source::System { offset, .. } = &*self.0 else { return 0 };
        let now = system_wall_ms() - self.mono_ms();
        let old = offset.load(Relaxed);
        if (now - old).abs() > REANCHOR_MS {
            offset.store(now, Relaxed);
            return now - old;
        }
        0
    }
}

/// Control of a [`Clock::manual`] clock: step the wall clock, advance monotonic time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    wall: Arc<AtomicI64>,
    mono: Arc<AtomicI64>,
}

impl ManualClock {
    /// Wall-clock Unix ms.
    pub fn wall_ms(&self) -> i64 {
        self.wall.load(Relaxed)
    }

    /// Monotonic ms (starts at 1).
    pub fn mono_ms(&self) -> i64 {
        self.mono.load(Relaxed)
    }

    /// Time passes: both clocks move forward by `ms` (negative values are ignored).
    pub fn advance(&self, ms: i64) {
        let ms = ms.max(0);
        self.mono.fetch_add(ms, Relaxed);
        self.wall.fetch_add(ms, Relaxed);
    }

    /// The wall clock is stepped by `ms` (either way); monotonic time does not move.
    pub fn step_wall(&self, ms: i64) {
        self.wall.fetch_add(ms, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_steps_wall_only_and_converts_on_the_new_footing() {
        let (clock, control) = Clock::manual(1_000_000);
        assert_eq!(clock.mono_ms(), 1);
        control.advance(500);
        let seen = clock.mono_ms();
        assert_eq!((seen, clock.wall_ms()), (501, 1_000_500));
        assert_eq!(clock.to_wall(seen), 1_000_500);
        control.step_wall(-3_600_000);
        assert_eq!(clock.mono_ms(), 501, "a wall step does not move monotonic time");
        assert_eq!(clock.to_wall(seen), 1_000_500 - 3_600_000);
        assert_eq!(clock.to_wall(0), 0, "never stays never");
        control.advance(-5);
        assert_eq!(clock.mono_ms(), 501, "monotonic time never goes back");
    }

    #[test]
    fn system_clock_is_monotonic_nonzero_and_displays_near_the_wall_clock() {
        let clock = Clock::system();
        let a = clock.mono_ms();
        let b = clock.mono_ms();
        assert!(a >= 1 && b >= a);
        assert_eq!(clock.reanchor(), 0, "no step right after start");
        let shown = clock.to_wall(clock.mono_ms());
        assert!((shown - clock.wall_ms()).abs() <= REANCHOR_MS + 50, "{shown} vs {}", clock.wall_ms());
    }
}
