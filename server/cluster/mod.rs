//! Cluster mode: several aggregator nodes, all active, over an etcd cluster (`--etcd`).
//!
//! etcd is the shared store; each node keeps the whole nation in memory as a single node does.
//! - [`commit`]: a node's group commits write each changed register to etcd with a
//!   compare-and-set on seq (a newer seq wins whichever node writes), plus its corrections;
//!   acks wait for etcd's commit — acknowledged means committed on a quorum.
//! - [`feed`]: on start a node lists every key at one revision, then watches from the next;
//!   every change by any node reaches its registers, rollups, installs, audit trail and liveness.
//!   A compacted watch lists again.
//! - [`presence`]: the node's lease (liveness of the node and of the streams it holds); losing
//!   etcd for longer than the lease fences the node off (streams end `UNAVAILABLE`, sites fail
//!   over) until it is back.
//!
//! Key layout: [`crate::server::replication::keys`].

pub mod commit;
pub mod feed;
pub mod presence;

use std::{path::PathBuf, sync::Arc, time::Duration};

use etcd_client::{Client, ConnectOptions};

use super::{
    aggregator::{Aggregator, AggregatorConfig},
    durability::{Durability, DurabilityConfig},
    registry::Registry,
    replication::Replication,
};

/// Settings of cluster mode.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://host:2379`), at least one.
    pub endpoints: Vec<String>,
    /// This node's name: unique in the cluster; letters, digits, `.`, `_`, `-` (1–64 bytes).
    pub node: String,
    /// Prefix of every key (`/headcount`); several events can share one etcd with different ones.
    pub prefix: String,
    /// Lease TTL: a node that cannot reach etcd for this long fences itself off; other nodes
    /// see its streams gone after it. Whole seconds, at least 2 s.
    pub lease_ttl: Duration,
    /// Longest time between group commits.
    pub flush_interval: Duration,
    /// Commit early once about this many registers changed.
    pub flush_records: usize,
    /// Timeout of each etcd request (commits, claims, catch-up reads).
    pub request_timeout: Duration,
    /// Registers per etcd transaction: at most etcd's `--max-txn-ops` − 2 (126 by default; each
    /// compare-and-set nests two transactions, and etcd counts nested operations against it).
    pub txn_registers: usize,
    /// TLS towards etcd (`https://` endpoints): the CA that signed etcd's certificates and,
    /// for etcd's `--client-cert-auth`, this node's client certificate and key (PEM bytes).
    pub tls: Option<EtcdTls>,
}

/// TLS material for etcd's client port (read from files at start; see [`EtcdTls::load`]).
#[derive(Clone)]
pub struct EtcdTls {
    /// PEM CA certificate(s) that sign the etcd members' server certificates.
    pub ca: Vec<u8>,
    /// PEM client certificate chain and key, when etcd requires client certificates.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca_bytes", &self.ca.len())
            .field("client_cert", &self.identity.is_some())
            .finish()
    }
}

impl EtcdTls {
    /// Reads `--etcd-ca` and, when given, `--etcd-cert` / `--etcd-key`. Errors name the flag and
    /// the file.
    pub fn load(
        ca: &std::path::Path,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<Self, ClusterError> {
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClusterError::Setting(format!("cannot read {flag} {}: {e}", p.display())))
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read("--etcd-cert", c)?, read("--etcd-key", k)?)),
            (None, None) => None,
            _ => return Err(ClusterError::Setting("--etcd-cert and --etcd-key go together".into())),
        };
        Ok(Self { ca: read("--etcd-ca", ca)?, identity })
    }
}

impl ClusterConfig {
    /// Defaults for these endpoints and node name.
    pub fn new(endpoints: Vec<String>, node: impl Into<String>) -> Self {
        Self {
            endpoints,
            node: node.into(),
            prefix: "/headcount".into(),
            lease_ttl: Duration::from_secs(5),
            flush_interval: Duration::from_millis(2),
            flush_records: 8192,
            request_timeout: Duration::from_secs(3),
            // etcd charges a nested transaction against what its parent left: n compare-and-sets
            // (each a txn holding a txn) need n + 2 ≤ --max-txn-ops (default 128). At 128 a
            // group of 127+ changed registers was refused ("too many operations in txn
            // request") on every retry: nothing was acknowledged again.
            txn_registers: 126,
            tls: None,
        }
    }

    /// Checks the settings; the error names the flag.
    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |m: String| Err(ClusterError::Setting(m));
        if self.endpoints.is_empty() || self.endpoints.iter().any(|e| e.trim().is_empty()) {
            return bad("--etcd needs at least one URL, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379".into());
        }
        let valid_node = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.node.is_empty() || self.node.len() > 64 || !self.node.chars().all(valid_node) {
            return bad(format!(
                "--node {:?}: give each aggregator a unique name of 1-64 letters, digits, '.', '_' or '-'",
                self.node
            ));
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return bad(format!(
                "--etcd-prefix {:?} must start with '/' and not end with it, e.g. /headcount",
                self.prefix
            ));
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl > Duration::from_secs(600) {
            return bad(format!("--etcd-lease-ttl {:?} must be between 2s and 600s", self.lease_ttl));
        }
        let https = self.endpoints.iter().filter(|e| e.starts_with("https://")).count();
        match (&self.tls, https) {
            (None, n) if n > 0 => {
                return bad(
                    "--etcd has https:// URLs: give etcd's CA with --etcd-ca (and --etcd-cert/--etcd-key if etcd \
                     checks client certificates)"
                        .into(),
                );
            }
            (Some(_), n) if n != self.endpoints.len() => {
                return bad("--etcd-ca is set: every --etcd URL must be https://".into());
            }
            _ => {}
        }
        if !(1..=1024).contains(&self.txn_registers) {
            return bad("registers per transaction must be 1..=1024 (etcd's --max-txn-ops)".into());
        }
        Ok(())
    }

    /// The etcd client's options: connect and request timeouts, HTTP/2 keepalive, and requests
    /// refused by a member that has no leader (so a partitioned minority fails fast).
    pub fn connect_options(&self) -> ConnectOptions {
        let options = match &self.tls {
            Some(tls) => {
                let mut t = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&tls.ca));
                if let Some((cert, key)) = &tls.identity {
                    t = t.identity(etcd_client::Identity::from_pem(cert, key));
                }
                ConnectOptions::new().with_tls(t)
            }
            None => ConnectOptions::new(),
        };
        options
            .with_connect_timeout(self.request_timeout)
            .with_timeout(self.request_timeout)
            .with_keep_alive(Duration::from_secs(2), self.request_timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from its leader answers at once instead of hanging.
            .with_require_leader(true)
    }
}

/// Why a cluster node cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A setting is invalid (the message names the flag).
    #[error("cluster setting: {0}")]
    Setting(String),
    /// etcd did not answer.
    #[error(
        "cannot reach etcd at {endpoints}: {source}. Check --etcd (client URLs, usually port 2379) and that a \
         majority of the etcd members is up"
    )]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// What etcd-client said.
        source: etcd_client::Error,
    },
    /// A thread cannot start.
    #[error("cannot start the etcd committer thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Connects to etcd with `config`'s options.
pub async fn connect(config: &ClusterConfig) -> Result<Client, ClusterError> {
    Client::connect(&config.endpoints, Some(config.connect_options()))
        .await
        .map_err(|source| ClusterError::Etcd { endpoints: config.endpoints.join(","), source })
}

impl Aggregator {
    /// A node of a cluster: connects to etcd, lists the whole nation at one revision (so it
    /// serves exact totals from the start), then starts its watch, lease and committer. Must be
    /// called inside a tokio runtime; [`Aggregator::close`] stops the committer after a final
    /// commit. Errors: a bad setting, or etcd unreachable (no quorum) within the request timeout.
    pub async fn open_cluster(
        registry: Registry,
        config: AggregatorConfig,
        cluster: ClusterConfig,
    ) -> Result<Self, ClusterError> {
        cluster.validate()?;
        let started = std::time::Instant::now();
        let client = connect(&cluster).await?;
        let (rep, queues) =
            Replication::new(cluster.node.clone(), cluster.prefix.clone(), client.clone(), cluster.request_timeout);
        let d = Arc::new(Durability::new(DurabilityConfig {
            dir: PathBuf::new(),
            flush_interval: cluster.flush_interval,
            flush_records: cluster.flush_records,
            snapshot_interval: Duration::MAX,
        }));
        let agg = Self::build(registry, config, Some(d.clone()), Some(rep.clone()));
        let remote = Arc::new(feed::RemoteStreams::new(agg.registry().sites.len()));
        let mut state = feed::FeedState::new(agg.clone(), remote.clone());
        let revision = state
            .list(&client, &cluster.prefix)
            .await
            .map_err(|source| ClusterError::Etcd { endpoints: cluster.endpoints.join(","), source })?;
        rep.set_applied(revision);
        let lease = presence::start(&agg, &cluster, client.clone(), queues.presence, remote.clone()).await.map_err(
            |e| match e {
                presence::StartError::Etcd(source) => {
                    ClusterError::Etcd { endpoints: cluster.endpoints.join(","), source }
                }
                taken @ presence::StartError::NameTaken(_) => ClusterError::Setting(taken.to_string()),
            },
        )?;
        tokio::spawn(feed::run(state, client, cluster.prefix.clone(), revision));
        tokio::spawn(rep.clone().run_barriers(queues.barriers));
        commit::start(agg.clone(), d, rep.clone(), cluster.clone())?;
        tracing::info!(
            node = %cluster.node, revision, lease, registers = agg.shared().registers.len(),
            elapsed = ?started.elapsed(), "cluster node ready"
        );
        Ok(agg)
    }
}
