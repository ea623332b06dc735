//! Re-reads the key set and the revocation file while the aggregator runs: their modification
//! time and length are polled every period (default 1 s), so a lost laptop's site is cut off
//! within seconds without a restart. A file that cannot be parsed keeps the previous state (a
//! warning says why).

use std::{
    path::{Path, PathBuf},
    sync::Weak,
    time::{Duration, SystemTime},
};

use super::{Auth, Inner};

/// How often the files are looked at by default.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(1);

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())))
}

fn stamps(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files.iter().map(|p| stamp(p)).collect()
}

impl Auth {
    /// Starts the watcher task on the current tokio runtime; it ends when the last clone of this
    /// `Auth` is dropped. Without a key file or revocation file it does nothing.
    pub fn spawn_watcher(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let files: Vec<PathBuf> =
            [&self.inner.keys_file, &self.inner.revoked_file].into_iter().flatten().cloned().collect();
        let weak: Weak<Inner> = std::sync::Arc::downgrade(&self.inner);
        // Taken now, not when the task first runs: a change made in between is not missed.
        let mut seen = stamps(&files);
        tokio::spawn(async move {
            if files.is_empty() {
                return;
            }
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let now = stamps(&files);
                if now == seen {
                    continue;
                }
                seen = now;
                match (Auth { inner, quotas: Default::default() }).reload() {
                    Ok(()) => tracing::info!("credential files re-read"),
                    Err(e) => {
                        tracing::warn!(error = %e, "credential files not re-read; the previous keys and revocations stay in force")
                    }
                }
            }
        })
    }
}
