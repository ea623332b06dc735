//! The aggregator: keeps exact live tallies of every site's check-ins and serves them over gRPC.
//!
//! Write path: [`ingest`] → [`aggregator`] → [`registers`] (the counting rule) → [`tally`]
//! (rollups). Read path: [`totals_service`] → [`query`]. Background: [`liveness`] sweep and
//! [`curve`] sampling. [`serve`] puts it on the network.

pub mod aggregator;
pub mod audit;
pub mod auth;
pub mod background;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod curve;
pub mod durability;
pub mod error;
pub mod handshake;
pub mod http;
pub mod ingest;
pub mod installs;
pub mod limits;
pub mod liveness;
pub mod persist;
pub mod query;
pub mod quotas;
pub mod registers;
pub mod registry;
pub mod replication;
pub mod serve;
pub mod stats;
pub mod tally;
pub mod tls;
pub mod totals_service;
pub mod wire_status;

pub use aggregator::{Aggregator, AggregatorConfig};
pub use auth::Auth;
pub use clock::{Clock, ManualClock};
pub use error::Error;
pub use serve::{RunningServer, Transport, serve};
