//! Cluster-mode tooling on the client side: a local etcd cluster ([`etcd::LocalEtcd`]) for the
//! benchmark, the simulation and the tests, and aggregator node processes ([`nodes::NodeSet`]).

pub mod etcd;
pub mod nodes;
