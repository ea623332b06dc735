//! Cluster-mode tooling on the client side: a local etcd cluster ([`etcd::LocalEtcd`]) for the
//! benchmark, the simulation and the tests.

pub mod etcd;
