//! Headcount: exact, live national check-in counting.
//!
//! * [`proto`] — the wire contract (generated from `proto/headcount/v1/headcount.proto`);
//! * [`server`] — the aggregator: registers, rollups, ingest and totals services;
//! * [`client`] — the site agent (`Reporter`), the dashboard tools and the national simulation.

#![forbid(unsafe_code)]

pub mod client;
pub mod logging;
pub mod proto;
pub mod server;
