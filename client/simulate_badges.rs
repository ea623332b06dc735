//! The national simulation's people model (`--badges`): one site agent per site (its own install
//! slot) serves all the site's desks; each desk scans its delegates' badges, some delegates are
//! scanned again — at the same desk or another desk of the site — which the agent answers
//! "already checked in", and some agents are killed and restarted from their state in the middle
//! of the run. The ground truth stays the number of distinct delegates per site and session.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use super::{
    aggregators::Aggregators,
    reporter::{Reporter, ReporterConfig, ReporterError, state::MemoryStore},
};
use futures_util::{StreamExt, stream::FuturesUnordered};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

/// Probability that an arrival comes with a repeat scan of some delegate of the site.
pub const REPEAT_PROBABILITY: f64 = 0.05;

/// The badge id of delegate `i` of `desk` (per session: a session's seen-set is its own).
pub fn badge_id(desk: u32, i: u32) -> String {
    format!("D{desk}-{i:06}")
}

/// One site in badge mode.
pub struct Site {
    /// The aggregators the agent may use, in order (one, or every cluster node).
    pub aggregators: Aggregators,
    /// The agent's settings (`agent_install` set).
    pub config: ReporterConfig,
    /// Distinct delegates per desk (index = desk − 1) and session index.
    pub desks: Vec<Vec<u32>>,
    /// Session wire ids, in order.
    pub sessions: Vec<u32>,
    /// Seed of repeat scans and restart moments.
    pub seed: u64,
    /// How many times the agent is killed and restarted from its state during the run.
    pub restarts: u32,
}

/// Timing of the run, shared by every site.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Wall-clock length of all sessions.
    pub duration: std::time::Duration,
    /// Hand arrivals to the agent every `tick`.
    pub tick: std::time::Duration,
    /// This site's offset within a tick.
    pub phase: std::time::Duration,
    /// How long to wait for the last acknowledgement.
    pub flush_timeout: std::time::Duration,
}

/// Drives one site's desks session after session, then flushes its agent. `arrived` maps the
/// elapsed fraction of a session's window to the fraction of its delegates that have arrived.
/// Returns the number of agent restarts performed and the agent, still running (it keeps the
/// site "reporting" with heartbeats until the caller drops it).
pub async fn drive_site(
    site: Site,
    timing: Timing,
    arrived: fn(f64) -> f64,
    progress: Arc<AtomicU64>,
) -> Result<(u32, Arc<Reporter>), ReporterError> {
    let mut rng = ChaCha8Rng::seed_from_u64(site.seed);
    let store = Arc::new(MemoryStore::new());
    let spawn = || Reporter::spawn_with(site.aggregators.clone(), site.config.clone(), store.clone()).map(Arc::new);
    // Agents start at their own moment (as site laptops do), not all in one instant.
    tokio::time::sleep(timing.phase).await;
    let mut reporter = spawn()?;
    let n_sessions = site.sessions.len().max(1);
    // Restart moments: (session index, fraction of its window).
    let mut restart_at: Vec<(usize, f64)> =
        (0..site.restarts).map(|_| (rng.random_range(0..n_sessions), rng.random_range(0.1..0.9))).collect();
    restart_at.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let mut restarts = 0;
    let window = timing.duration / n_sessions as u32;
    let start = Instant::now();
    for (s, &session) in site.sessions.iter().enumerate() {
        let begin = start + window * s as u32;
        let targets: Vec<u32> = site.desks.iter().map(|d| d.get(s).copied().unwrap_or(0)).collect();
        let mut sent = vec![0u32; targets.len()];
        let mut at = begin;
        while sent.iter().zip(&targets).any(|(a, b)| a < b) {
            at += timing.tick;
            tokio::time::sleep_until(at).await;
            let x = (at - begin).as_secs_f64() / window.as_secs_f64();
            // The desks' scans of this tick, in flight together (the agent commits them as one
            // group): futures polled here, no task per badge.
            let scans = FuturesUnordered::new();
            let mut arrivals = 0u64;
            for (k, (&target, done)) in targets.iter().zip(sent.iter_mut()).enumerate() {
                let due = if x >= 1.0 { target } else { ((f64::from(target) * arrived(x)).round() as u32).min(target) };
                for i in *done..due {
                    scans.push(reporter.badge(session, badge_id(k as u32 + 1, i)));
                    if rng.random_bool(REPEAT_PROBABILITY) {
                        // Someone scanned again, here or at another desk of the site.
                        let other = rng.random_range(0..targets.len());
                        let known = if other == k { i + 1 } else { targets[other] };
                        if known > 0 {
                            scans.push(reporter.badge(session, badge_id(other as u32 + 1, rng.random_range(0..known))));
                        }
                    }
                }
                arrivals += u64::from(due.saturating_sub(*done));
                *done = due.max(*done);
            }
            let mut scans = scans;
            while let Some(r) = scans.next().await {
                r?;
            }
            drop(scans);
            progress.fetch_add(arrivals, Relaxed);
            if restart_at.first().is_some_and(|&(rs, rx)| rs < s || (rs == s && rx <= x)) {
                restart_at.remove(0);
                // Killed like a crashed process (every answered scan is in its store), then
                // started again from that state.
                match Arc::try_unwrap(reporter) {
                    Ok(r) => r.crash().await,
                    Err(_) => return Err(ReporterError::Stopped),
                }
                reporter = spawn()?;
                restarts += 1;
            }
        }
    }
    reporter.flush(timing.flush_timeout).await?;
    Ok((restarts, reporter))
}
