//! Badge scanning for the national simulation (`--badges`): each desk of a site scans its
//! delegates' badges at the site's one agent, and some delegates are scanned again — at the same
//! desk or at another desk of the site — which the agent answers "already checked in". The
//! ground truth stays the number of distinct delegates per site and session.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinSet;

use super::reporter::{Reporter, ReporterError};

/// Probability that an arrival comes with a repeat scan of some delegate of the site.
pub const REPEAT_PROBABILITY: f64 = 0.05;

/// One desk of a site in badge mode.
#[derive(Debug, Clone)]
pub struct Desk {
    /// Desk number (1-based).
    pub desk: u32,
    /// Every desk of the site (index = desk − 1): distinct delegates per session index.
    pub site_desks: Vec<Vec<u32>>,
    /// Seed of the repeat scans.
    pub seed: u64,
}

/// The badge id of delegate `i` of `desk` (per session: a session's seen-set is its own).
pub fn badge_id(desk: u32, i: u32) -> String {
    format!("D{desk}-{i:06}")
}

/// Scans one desk's arrivals.
pub struct Scanner {
    desk: Desk,
    rng: ChaCha8Rng,
}

impl Scanner {
    /// A scanner for `desk`.
    pub fn new(desk: Desk) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(desk.seed);
        Self { desk, rng }
    }

    /// Scans arrivals `from..from + n` of session index `s` (wire id `session`), concurrently so
    /// that the agent's group commit coalesces them, plus repeat scans.
    pub async fn scan(
        &mut self,
        reporter: &Arc<Reporter>,
        s: usize,
        session: u32,
        from: u32,
        n: u32,
    ) -> Result<(), ReporterError> {
        let mut scans = JoinSet::new();
        let mut badge = |b: String| {
            let r = reporter.clone();
            scans.spawn(async move { r.badge(session, b).await.map(drop) });
        };
        for i in from..from + n {
            badge(badge_id(self.desk.desk, i));
            if self.rng.random_bool(REPEAT_PROBABILITY) {
                let k = self.rng.random_range(0..self.desk.site_desks.len());
                let desk = k as u32 + 1;
                let known =
                    if desk == self.desk.desk { i + 1 } else { self.desk.site_desks[k].get(s).copied().unwrap_or(0) };
                if known > 0 {
                    badge(badge_id(desk, self.rng.random_range(0..known)));
                }
            }
        }
        while let Some(done) = scans.join_next().await {
            done.map_err(|_| ReporterError::Stopped)??;
        }
        Ok(())
    }
}
