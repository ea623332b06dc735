//! Client side: the site agent library ([`reporter`]) and binary logic ([`site`], [`desk`]), the dashboard
//! tools ([`dashboard`]) and the national simulation ([`simulate`]).

pub mod bench;
pub mod connect;
pub mod desk;
pub mod limits;
pub mod reporter;

pub use reporter::{Reporter, ReporterConfig, ReporterError, ReporterStatus};
pub mod dashboard;
pub mod queries;
pub mod simulate;
pub mod site;
pub mod watch;
