//! Aggregator nodes in cluster mode for the end-to-end cluster tests: real `headcount-server`
//! processes (`--etcd … --node …`, started as `tests/server_process` starts the binary) over a
//! real etcd cluster of their own, optionally each behind cuttable proxies to etcd; `kill -9`,
//! Stats, readers, and waiting until every node has applied what etcd committed.
//!
//! [`workload`] drives reporters over the nodes and records the history the checker judges.

#![allow(dead_code, clippy::unwrap_used)]

pub mod workload;

use std::{
    fs::File,
    path::PathBuf,
    process::{Command, Stdio},
};

use headcount::{
    proto::v1::{StatsRequest, StatsResponse, totals_client::TotalsClient},
    server::{Auth, registry::Registry},
};
use tonic::Status;

use crate::{
    common::{DEADLINE, POLL, Reader, SECRET, channel_to, etcd::EtcdCluster, eventually, proxy::CutProxy, within},
    server_process::{DataDir, Server},
};

/// `--etcd-lease-ttl` of the test nodes (the shortest allowed): a node cut off from etcd ends
/// its streams after about this long.
pub const LEASE_TTL_S: u64 = 2;

/// One aggregator node: its process (None once killed), registry files, log and proxies.
pub struct Node {
    pub name: String,
    pub data: DataDir,
    pub server: Option<Server>,
    pub url: String,
    pub log: PathBuf,
    /// In front of each etcd member, when the node was started behind proxies.
    pub proxies: Vec<CutProxy>,
}

/// Nodes over one etcd cluster (dropping it kills everything).
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub registry: Registry,
    pub auth: Auth,
    /// A client of the whole etcd cluster (the tests' linearizable reads of its revision).
    pub etcd_client: etcd_client::Client,
    /// Kept last: killed after the nodes.
    pub etcd: EtcdCluster,
}

impl Cluster {
    /// Starts a 3-member etcd cluster and `n` nodes named `n0`, `n1`, …; the nodes listed in
    /// `proxied` reach etcd through a [`CutProxy`] per member.
    pub async fn start(registry: Registry, n: usize, proxied: &[usize]) -> Self {
        let etcd = EtcdCluster::start(3).await;
        let etcd_client = etcd.client().await;
        let auth = Auth::new(SECRET).unwrap();
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let proxies = if proxied.contains(&i) {
                let addrs: Vec<_> = (0..etcd.len()).map(|m| etcd.client_addr(m)).collect();
                crate::common::proxy::proxies(&addrs).await
            } else {
                Vec::new()
            };
            let endpoints = if proxies.is_empty() {
                etcd.endpoints_arg()
            } else {
                proxies.iter().map(CutProxy::url).collect::<Vec<_>>().join(",")
            };
            let data = DataDir::new(registry.clone());
            let name = format!("n{i}");
            let log = data.root.path().join(format!("{name}.log"));
            let server = start_node(&data, &name, &endpoints, &log).await;
            let url = server.url();
            nodes.push(Node { name, data, server: Some(server), url, log, proxies });
        }
        Self { nodes, registry, auth, etcd_client, etcd }
    }

    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url.clone()
    }

    /// Every node's URL, node `first` first (a site's `--server` list with `first` as home).
    pub fn urls_from(&self, first: usize) -> Vec<String> {
        let n = self.nodes.len();
        (0..n).map(|k| self.url((first + k) % n)).collect()
    }

    /// Nodes whose process runs.
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].server.is_some()).collect()
    }

    /// `kill -9` of node `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(s) = self.nodes[i].server.take() {
            s.kill9();
        }
    }

    /// Cuts node `i` off from etcd (it must have been started behind proxies).
    pub fn cut(&self, i: usize) {
        assert!(!self.nodes[i].proxies.is_empty(), "node {i} was not started behind proxies");
        self.nodes[i].proxies.iter().for_each(CutProxy::cut);
    }

    /// Partitions node `i` from etcd silently: its connections stay open but carry nothing (it
    /// must have been started behind proxies).
    pub fn freeze(&self, i: usize) {
        assert!(!self.nodes[i].proxies.is_empty(), "node {i} was not started behind proxies");
        self.nodes[i].proxies.iter().for_each(CutProxy::freeze);
    }

    /// Reconnects node `i` to etcd.
    pub fn restore(&self, i: usize) {
        self.nodes[i].proxies.iter().for_each(CutProxy::restore);
    }

    /// A reader with a read token on node `i`.
    pub async fn reader(&self, i: usize) -> Reader {
        Reader::new(channel_to(&self.url(i)).await, Some(self.auth.read_token("cluster-tests")))
    }

    /// Node `i`'s Stats.
    pub async fn stats(&self, i: usize) -> Result<StatsResponse, Status> {
        let reader = self.reader(i).await;
        let mut c: TotalsClient<_> = reader.client.clone();
        within("Stats", c.stats(reader.req(StatsRequest {}))).await.map(tonic::Response::into_inner)
    }

    /// etcd's current revision (a linearizable read: every write committed before the call is at
    /// or below it). `Err` without quorum.
    pub async fn etcd_revision(&self) -> Result<u64, String> {
        let mut c = self.etcd_client.clone();
        let r = c.get("headcount-test/revision-probe", None).await.map_err(|e| format!("etcd get: {e}"))?;
        Ok(r.header().map_or(0, |h| h.revision()) as u64)
    }

    /// Waits until each of `nodes` has applied etcd's current revision (everything committed
    /// before this call); returns that revision.
    pub async fn wait_caught_up(&self, nodes: &[usize]) -> u64 {
        let rev = eventually("etcd's current revision", DEADLINE, || self.etcd_revision()).await;
        for &i in nodes {
            eventually(&format!("node {i} applies etcd revision {rev}"), DEADLINE, || async move {
                let s = self.stats(i).await.map_err(|e| format!("Stats: {e:?}"))?;
                if s.revision >= rev { Ok(()) } else { Err(format!("node {} at revision {}", s.node, s.revision)) }
            })
            .await;
        }
        rev
    }

    /// [`eventually`], with the nodes' logs in the panic message when it times out.
    pub async fn eventually<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let start = std::time::Instant::now();
        loop {
            let last = match tokio::time::timeout(DEADLINE, check()).await {
                Ok(Ok(v)) => return v,
                Ok(Err(e)) => e,
                Err(_) => format!("an attempt took more than {DEADLINE:?}"),
            };
            if start.elapsed() >= DEADLINE {
                panic!("{what}: still not true after {DEADLINE:?}; last: {last}\nnode logs:\n{}", self.logs());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last lines of every node's log (for failure messages).
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!("{}:\n    {}", n.name, lines[lines.len().saturating_sub(40)..].join("\n    "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Starts one node over `endpoints` (comma-separated), logging to `log`.
async fn start_node(data: &DataDir, name: &str, endpoints: &str, log: &PathBuf) -> Server {
    let addr_file = data.addr_file();
    let mut cmd: Command = data.command(&addr_file, None);
    let file = File::create(log).unwrap();
    cmd.arg("--etcd")
        .arg(endpoints)
        .arg("--node")
        .arg(name)
        .arg("--etcd-lease-ttl")
        .arg(format!("{LEASE_TTL_S}s"))
        // A pipe nobody reads would block a node that logs much (warnings while etcd is down).
        .stderr(Stdio::from(file));
    data.spawn(cmd, &addr_file).await
}
