//! What a benchmark run needs, checked before anything starts: sensible flags, the aggregator's
//! streams-per-connection limit, open files and ephemeral ports. A run that cannot succeed is
//! refused at once with what to change.

use super::{BenchArgs, BenchError, Mode};
use crate::{
    client::limits::{
        FD_RESERVE, check_ports, check_streams_per_connection, ensure_open_files, streams_per_connection,
    },
    server::registry::Registry,
};

/// The aggregator's default `--max-streams-per-connection`.
const SERVER_STREAMS_PER_CONNECTION: u32 = 1024;

/// Largest batch the aggregator accepts (reports).
const MAX_BATCH: u32 = 1024;

/// Refuses flags and limits a run cannot succeed with.
pub(super) fn check(args: &BenchArgs, registry: &Registry) -> Result<(), BenchError> {
    let bad = |m: String| Err(BenchError::Args(m));
    if args.mode == Mode::Recovery {
        return Ok(());
    }
    let usable = registry.sites.len().saturating_sub(1) as u32;
    if args.streams == 0 || args.streams > usable {
        return bad(format!(
            "--streams {}: use 1 to {usable} (one stream per site of the {}-site reference registry; one \
             more site is kept for the freshness probe)",
            args.streams,
            registry.sites.len()
        ));
    }
    if args.connections == 0 {
        return bad("--connections must be at least 1".into());
    }
    if args.duration.is_zero() {
        return bad("--duration must be more than 0".into());
    }
    let sessions = registry.sessions.len() as u32;
    let rpb = args.batch_size();
    match args.mode {
        Mode::Saturate | Mode::Paced if rpb == 0 || rpb > sessions => {
            return bad(format!(
                "--reports-per-batch {rpb}: a site agent sends at most one report per register per batch, so \
                 {} takes 1 to {sessions} (one per session). Bigger batches, with several reports per \
                 register, are the transport stress test: `headcount bench stress --reports-per-batch {rpb}`",
                args.mode.name()
            ));
        }
        Mode::Stress if rpb == 0 || rpb > MAX_BATCH => {
            return bad(format!("--reports-per-batch {rpb}: the aggregator takes 1 to {MAX_BATCH} reports per batch"));
        }
        _ => {}
    }
    if matches!(args.mode, Mode::Paced | Mode::Agents) && args.rate() == 0 {
        return bad("--rate must be more than 0".into());
    }
    if args.window == 0 {
        return bad("--window must be at least 1".into());
    }
    let limit = match args.server_flag("--max-streams-per-connection") {
        Some(v) => v
            .parse::<u32>()
            .map_err(|_| BenchError::Args(format!("--server-arg=--max-streams-per-connection={v}: not a number")))?,
        None => SERVER_STREAMS_PER_CONNECTION,
    };
    let connections = args.effective_connections();
    let busiest = streams_per_connection(u64::from(args.streams), u64::from(connections));
    check_streams_per_connection(
        busiest,
        limit,
        &format!("--streams {} over --connections {connections}", args.streams),
        &format!(
            "Use --connections {} or more, or raise the aggregator's limit with \
             --server-arg=--max-streams-per-connection={busiest}.",
            u64::from(args.streams).div_ceil(u64::from(limit.max(1)))
        ),
    )?;
    // This process holds one end of each connection, the aggregator (a child that inherits this
    // limit) the other; the probes add a few connections of their own.
    let what = format!("--connections {connections}");
    let connections = u64::from(connections) + 8;
    ensure_open_files(connections + FD_RESERVE, &what, "use fewer --connections (streams share connections).")?;
    check_ports(connections, &what, "use fewer --connections.")?;
    Ok(())
}

impl Mode {
    /// The mode's name on the command line.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self).map_or_else(|| format!("{self:?}"), |v| v.get_name().to_owned())
    }
}
