//! Request metadata names of the wire contract (gRPC headers), shared by the aggregator and every
//! client so that neither side spells them on its own. See `proto/headcount/v1/headcount.proto`.

/// Metadata key naming the site a stream reports for (ASCII site id, e.g. `S00042`).
pub const SITE_HEADER: &str = "x-headcount-site";
/// Metadata key naming the desk a stream reports for (decimal, default 1).
pub const DESK_HEADER: &str = "x-headcount-desk";
/// Metadata key carrying the reporting agent's install id (a random id the agent persists with
/// its state), so the aggregator can tell two agent installs on one site apart.
pub const AGENT_HEADER: &str = "x-headcount-agent";
/// Trailing metadata on `RESOURCE_EXHAUSTED`: how long to wait before retrying, milliseconds.
pub const RETRY_AFTER_MS_HEADER: &str = "retry-after-ms";
