//! Certificate hot reload: the certificate and key files are checked every few seconds (their
//! modification time and size) and re-read on SIGHUP. A pair that fails to load (half-written,
//! key of another certificate, expired PEM) is logged and the old certificate stays served.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;

use super::CertStore;

/// What identifies a version of a file without reading it: modification time, size and (on
/// Unix) inode, so a file renamed into place is noticed even within one timestamp tick.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, meta.len(), inode))
}

/// Why a reload was attempted (shows in the log).
#[derive(Debug, Clone, Copy)]
enum Trigger {
    FilesChanged,
    Sighup,
}

/// Re-reads the pair; logs the outcome. Returns whether the new certificate is served.
fn reload(store: &CertStore, trigger: Trigger) -> bool {
    let (cert, key) = store.paths();
    match store.reload() {
        Ok(()) => {
            tracing::info!(?trigger, cert = %cert.display(), generation = store.generation(), "TLS certificate reloaded");
            true
        }
        Err(e) => {
            tracing::error!(
                ?trigger, cert = %cert.display(), key = %key.display(), error = %e,
                "TLS certificate NOT reloaded: still serving the previous one; fix the files (they are re-read when they change, or on SIGHUP)"
            );
            false
        }
    }
}

/// Watches the store's files every `poll` and on SIGHUP until `stop` is cancelled. Call from
/// inside a tokio runtime.
pub fn spawn(store: Arc<CertStore>, poll: Duration, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let stamps = move |store: &CertStore| {
        let (c, k) = store.paths();
        (stamp(c), stamp(k))
    };
    // Taken now, not when the task first runs: a change right after start is not missed.
    let mut seen = stamps(&store);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        #[cfg(unix)]
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; certificates reload on file changes only");
                None
            }
        };
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<Option<()>>();
            tokio::select! {
                () = stop.cancelled() => break,
                _ = hangup => {
                    seen = stamps(&store);
                    reload(&store, Trigger::Sighup);
                }
                _ = tick.tick() => {
                    let now = stamps(&store);
                    // A file being replaced may be missing for a moment: wait until both exist.
                    if now != seen && now.0.is_some() && now.1.is_some() {
                        // Remembered even when the load fails: a half-renewed pair (new
                        // certificate, old key) is retried when the other file changes too.
                        seen = now;
                        reload(&store, Trigger::FilesChanged);
                    }
                }
            }
        }
    })
}
