//! What a load run (bench, simulation) needs from the machine and the aggregator — open files,
//! ephemeral ports, streams per HTTP/2 connection — checked at start, so a run that cannot
//! succeed is refused at once with what to change instead of hanging or spamming errors.

/// Open files kept aside for everything that is not a connection (the runtime, the data
/// directory, logs, standard streams, the probes' own connections).
pub const FD_RESERVE: u64 = 256;

/// A run that does not fit the limits, with what to change (the message is for people).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LimitError(pub String);

/// Most streams any one connection carries when `streams` streams are spread round-robin over
/// `connections` connections.
pub fn streams_per_connection(streams: u64, connections: u64) -> u64 {
    streams.div_ceil(connections.max(1))
}

/// Refuses `busiest` streams on one connection when the aggregator admits `limit`.
/// `what` names the run's streams and `fix` says which flag to change.
pub fn check_streams_per_connection(busiest: u64, limit: u32, what: &str, fix: &str) -> Result<(), LimitError> {
    if busiest > u64::from(limit) {
        return Err(LimitError(format!(
            "{what} puts up to {busiest} streams on one HTTP/2 connection, but the aggregator admits at most \
             {limit} per connection: the streams above the limit would wait \
             forever for a free slot. {fix}"
        )));
    }
    Ok(())
}

/// Makes sure this process may open `needed` files: raises the soft `RLIMIT_NOFILE` towards the
/// hard limit if that is enough, and otherwise refuses with the numbers and what to change.
/// Returns the soft limit in force.
pub fn ensure_open_files(needed: u64, what: &str, fix: &str) -> Result<u64, LimitError> {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map_err(|e| LimitError(format!("cannot read the open-file limit (RLIMIT_NOFILE): {e}")))?;
    if soft >= needed {
        return Ok(soft);
    }
    let raised = rlimit::increase_nofile_limit(needed).unwrap_or(soft);
    if raised >= needed {
        tracing::info!(from = soft, to = raised, needed, "raised the open-file limit");
        return Ok(raised);
    }
    Err(LimitError(format!(
        "{what} needs about {needed} open files, but this process may open only {raised} \
         (ulimit -n: soft {soft}, hard {hard}). Raise the limit (e.g. `ulimit -n {}` as root, or \
         LimitNOFILE= in a systemd unit) or {fix}",
        needed.next_multiple_of(1000)
    )))
}

/// The number of local ephemeral ports (`/proc/sys/net/ipv4/ip_local_port_range`), if readable.
pub fn ephemeral_ports() -> Option<u64> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = range.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    Some(hi.saturating_sub(lo) + 1)
}

/// Refuses `connections` outgoing connections to one address when there are fewer ephemeral
/// ports than that.
pub fn check_ports(connections: u64, what: &str, fix: &str) -> Result<(), LimitError> {
    match ephemeral_ports() {
        Some(ports) if connections > ports => Err(LimitError(format!(
            "{what} opens {connections} connections to one address, but this machine has only {ports} \
             ephemeral ports (net.ipv4.ip_local_port_range). Widen the range or {fix}"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_puts_the_remainder_on_the_first_connections() {
        assert_eq!(streams_per_connection(1100, 1), 1100);
        assert_eq!(streams_per_connection(1100, 2), 550);
        assert_eq!(streams_per_connection(1025, 2), 513);
        assert_eq!(streams_per_connection(5, 0), 5);
    }

    #[test]
    fn the_stream_limit_is_inclusive() {
        assert!(check_streams_per_connection(1024, 1024, "x", "y").is_ok());
        let e = check_streams_per_connection(1025, 1024, "a run", "Use --connections 2.").expect_err("refused");
        assert!(e.0.contains("1025 streams") && e.0.contains("at most 1024") && e.0.ends_with("Use --connections 2."));
    }

    #[test]
    fn a_need_within_the_soft_limit_is_granted() {
        let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
        assert_eq!(ensure_open_files(soft.min(16), "x", "y"), Ok(soft));
        let e = ensure_open_files(u64::MAX / 2, "a run", "use fewer connections").expect_err("refused");
        assert!(e.0.contains("ulimit -n") && e.0.ends_with("use fewer connections"), "{}", e.0);
    }
}
