//! Named crash points on the durability and ack path (the `fail` crate), always compiled in and
//! inert unless the `FAILPOINTS` environment variable names them when the server starts, e.g.
//! `FAILPOINTS='journal-after-write=5*off->return'`: the sixth time the flusher passes that
//! point the process aborts, as if the power went out there. `sleep(ms)` stalls there instead.
//! `pause` blocks there until the point is reconfigured (in-process tests, `fail::cfg`). A point
//! costs one read-locked map lookup per group commit, snapshot or correction, never per report.

/// Every crash point, in the order a group commit and a snapshot pass them.
pub const POINTS: &[&str] = &[
    // Journal::commit: before the group is written, after it is written (not synced), after the
    // sync returned (committed, durable flush number not yet published).
    "journal-before-write",
    "journal-after-write",
    "journal-after-sync",
    // The flusher, after a commit and before the streams are told (between commit and ack).
    "flush-before-ack",
    // The flusher, after a commit into a journal that follows a snapshot.
    "commit-after-snapshot",
    // write_snapshot: header written, records not; temporary file synced, not yet named; named,
    // directory not yet synced and older files not yet deleted.
    "snapshot-mid-write",
    "snapshot-before-rename",
    "snapshot-after-rename",
    // The write path, between a correction entering the audit trail and its journal queue.
    "correction-before-journal",
];

/// Configures crash points from `FAILPOINTS` (`name=actions` pairs separated by `;`, actions in
/// the `fail` crate's syntax). Unknown names and bad actions are refused: a typo must not make a
/// crash test pass by never crashing.
pub fn configure_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else { return Ok(()) };
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) =
            entry.split_once('=').ok_or_else(|| format!("FAILPOINTS entry {entry:?} is not name=actions"))?;
        if !POINTS.contains(&name) {
            return Err(format!("FAILPOINTS names {name:?}, which is not one of {}", POINTS.join(", ")));
        }
        fail::cfg(name, actions).map_err(|e| format!("FAILPOINTS {name}: {e}"))?;
        tracing::warn!(point = name, actions, "crash point armed (testing only)");
    }
    Ok(())
}

/// Aborts the process if the crash point `name` is armed with `return` and fires; sleeps or
/// pauses there if armed so (see the module doc).
pub fn crash_point(name: &'static str) {
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("headcount-server: crash point {name} reached; aborting");
        std::process::abort();
    }
}
