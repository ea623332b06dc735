//! Client side: the site agent library ([`reporter`]) and binary logic ([`site`], [`desk`]), the dashboard
//! tools ([`dashboard`]) and the national simulation ([`simulate`]).

pub mod aggregators;
pub mod bench;
pub mod cluster;
pub mod connect;
pub mod credentials;
pub mod desk;
pub mod limits;
pub mod reporter;

pub use reporter::{Reporter, ReporterConfig, ReporterError, ReporterStatus};
pub mod dashboard;
pub mod provision;
pub mod queries;
pub mod simulate;
pub mod simulate_badges;
pub mod simulate_cluster;
pub mod simulate_plan;
pub mod simulate_report;
pub mod site;
pub mod site_config;
pub mod watch;
