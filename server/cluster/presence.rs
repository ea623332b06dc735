//! A node's lease: its liveness, the streams it holds, and its fence.
//!
//! The node grants a lease of `--etcd-lease-ttl` and keeps it alive (every third of the TTL).
//! Its `node/<name>` key and one `stream/<site>/<node>` key per site with a stream here hang on
//! it, so when the node dies its sites stop counting as connected through it within the TTL.
//! When the keepalive has not succeeded for a whole TTL the node fences itself off
//! ([`Replication::fence_off`]): streams end `UNAVAILABLE` so sites fail over, and new ones are
//! refused; once etcd answers again it takes a new lease if the old one expired, puts its keys
//! back and accepts streams ([`Replication::recover`]). Other nodes' stream keys keep their
//! sites "reporting" here (touched once per sweep).

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::{Notify, mpsc};

use super::{ClusterConfig, feed::RemoteStreams};
use crate::server::{
    aggregator::{Aggregator, now_ms},
    replication::{PresenceChange, Replication, keys},
};

/// How often stream keys are written (coalesced: a reconnect storm is a few transactions).
const PRESENCE_TICK: Duration = Duration::from_millis(100);
/// Stream keys per transaction (under etcd's default `--max-txn-ops` of 128).
const PRESENCE_OPS: usize = 128;

/// Grants the lease and puts the node's key (errors when etcd does not answer), then spawns the
/// lease keeper (keepalive and fence: its own task, so that nothing else can delay a fence), the
/// stream-presence writer and the loop that touches sites streaming on other nodes. Returns the
/// lease id.
pub async fn start(
    agg: &Aggregator,
    config: &ClusterConfig,
    client: Client,
    queue: mpsc::UnboundedReceiver<PresenceChange>,
    remote: Arc<RemoteStreams>,
) -> Result<i64, StartError> {
    let Some(rep) = agg.shared().replication.clone() else { return Ok(0) };
    let ttl = config.lease_ttl.as_secs().max(2) as i64;
    let id = grant_at_start(&client, &rep, ttl).await?;
    let lease = Arc::new(Lease { id: AtomicI64::new(id), renewed: Notify::new() });
    let keeper = Keeper { rep: rep.clone(), client: client.clone(), ttl, lease: lease.clone() };
    tokio::spawn(keeper.run(agg.shared().shutdown.clone()));
    let presence =
        Presence { agg: agg.clone(), rep, client, lease, counts: FxHashMap::default(), dirty: FxHashSet::default() };
    tokio::spawn(presence.run(queue));
    tokio::spawn(touch_remote(agg.clone(), remote));
    Ok(id)
}

/// Grants a lease and creates the node key on it; `Ok(None)` when the key is held by another
/// live lease (a node of the same name is running, or a crashed one's lease has not expired).
async fn grant(client: &Client, rep: &Replication, ttl: i64) -> Result<Option<i64>, etcd_client::Error> {
    let lease = client.lease_client().grant(ttl, None).await?.id();
    let key = keys::node(&rep.prefix, &rep.node);
    let create = Txn::new().when([Compare::version(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
        key,
        now_ms().to_string(),
        Some(PutOptions::new().with_lease(lease)),
    )]);
    if client.kv_client().txn(create).await?.succeeded() {
        Ok(Some(lease))
    } else {
        let _ = client.lease_client().revoke(lease).await;
        Ok(None)
    }
}

/// Why a node cannot take its name.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// etcd did not answer.
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    /// Another live node holds the name.
    #[error(
        "another aggregator node named {0:?} is running (its etcd lease stayed alive for a whole TTL): give each \
         node its own --node name"
    )]
    NameTaken(String),
}

/// [`grant`] at start: a node restarted right after a crash waits for its old lease to expire
/// (at most one TTL and a bit); a name still held after that belongs to a running node.
async fn grant_at_start(client: &Client, rep: &Replication, ttl: i64) -> Result<i64, StartError> {
    let deadline = Instant::now() + Duration::from_secs(ttl as u64 + 2);
    loop {
        if let Some(lease) = grant(client, rep, ttl).await? {
            return Ok(lease);
        }
        if Instant::now() >= deadline {
            return Err(StartError::NameTaken(rep.node.clone()));
        }
        tracing::info!(node = %rep.node, "the node name is held by a lease (a crashed run of this node?); waiting for it to expire");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The node's current lease, shared by the keeper and the presence writer.
struct Lease {
    id: AtomicI64,
    /// Signalled when the keeper took a new lease: every stream key must be put on it again.
    renewed: Notify,
}

/// Keeps the lease alive every third of its TTL and fences the node off when a whole TTL passed
/// without a successful keepalive. Each attempt is bounded by a third of the TTL, so the fence
/// comes within about 1⅓ TTL of the last success whatever etcd does.
struct Keeper {
    rep: Arc<Replication>,
    client: Client,
    ttl: i64,
    lease: Arc<Lease>,
}

impl Keeper {
    async fn run(mut self, shutdown: tokio_util::sync::CancellationToken) {
        let period = Duration::from_millis(self.ttl as u64 * 1000 / 3);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ok = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => {
                    // Let other nodes see at once that this node's streams are gone.
                    let _ = self.client.lease_client().revoke(self.lease.id.load(SeqCst)).await;
                    return;
                }
            }
            if self.keep_alive(period).await {
                last_ok = Instant::now();
                self.rep.recover();
            } else if last_ok.elapsed() >= Duration::from_secs(self.ttl as u64) {
                self.rep.fence_off();
            }
        }
    }

    /// One keepalive round, at most `limit`; takes a new lease when the old one expired.
    async fn keep_alive(&mut self, limit: Duration) -> bool {
        let id = self.lease.id.load(SeqCst);
        let renewed = tokio::time::timeout(limit, async {
            let (mut keeper, mut stream) = self.client.lease_client().keep_alive(id).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.map_or(0, |r| r.ttl()))
        })
        .await;
        // etcd answers a keepalive of an expired lease with TTL 0; etcd-client turns that into
        // this error.
        let expired = |e: &etcd_client::Error| matches!(e, etcd_client::Error::LeaseKeepAliveError(m) if m.contains("lease not found"));
        match renewed {
            Ok(Ok(ttl)) if ttl > 0 => true,
            Ok(Ok(_)) => self.renew(limit).await,
            Ok(Err(e)) if expired(&e) => self.renew(limit).await,
            Ok(Err(e)) => {
                tracing::warn!(node = %self.rep.node, error = %e, "lease keepalive failed");
                false
            }
            Err(_) => {
                tracing::warn!(node = %self.rep.node, "lease keepalive timed out");
                false
            }
        }
    }

    /// Takes a new lease (the old one expired) and has every stream key put back on it.
    async fn renew(&mut self, limit: Duration) -> bool {
        tracing::warn!(node = %self.rep.node, "lease expired; taking a new one");
        match tokio::time::timeout(limit, grant(&self.client, &self.rep, self.ttl)).await {
            Ok(Ok(None)) => {
                tracing::error!(node = %self.rep.node, "another live node holds this node's name; staying fenced");
                false
            }
            Ok(Ok(Some(id))) => {
                self.lease.id.store(id, SeqCst);
                self.lease.renewed.notify_one();
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(node = %self.rep.node, error = %e, "cannot take a new lease");
                false
            }
            Err(_) => false,
        }
    }
}

/// Writes this node's stream keys (one per site with a stream here), coalesced per tick.
struct Presence {
    agg: Aggregator,
    rep: Arc<Replication>,
    client: Client,
    lease: Arc<Lease>,
    /// Streams open here per site.
    counts: FxHashMap<u32, i32>,
    /// Sites whose key must be written (put or deleted).
    dirty: FxHashSet<u32>,
}

impl Presence {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<PresenceChange>) {
        let shutdown = self.agg.shared().shutdown.clone();
        let mut flush = tokio::time::interval(PRESENCE_TICK);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                change = queue.recv() => {
                    let Some(change) = change else { return };
                    *self.counts.entry(change.site).or_default() += change.delta;
                    self.dirty.insert(change.site);
                }
                () = self.lease.renewed.notified() => {
                    self.dirty.extend(self.counts.iter().filter(|(_, n)| **n > 0).map(|(s, _)| *s));
                }
                _ = flush.tick() => {
                    if !self.dirty.is_empty() && self.rep.is_healthy() {
                        self.write_streams().await;
                    }
                }
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Puts the key of each changed site with a stream here, deletes the others.
    async fn write_streams(&mut self) {
        let registry = self.agg.registry();
        let lease = self.lease.id.load(SeqCst);
        let sites: Vec<u32> = self.dirty.drain().collect();
        for chunk in sites.chunks(PRESENCE_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .filter_map(|site| {
                    let id = &registry.sites.get(*site as usize)?.id;
                    let key = keys::stream(&self.rep.prefix, id, &self.rep.node);
                    Some(if self.counts.get(site).is_some_and(|n| *n > 0) {
                        TxnOp::put(key, "", Some(PutOptions::new().with_lease(lease)))
                    } else {
                        TxnOp::delete(key, None)
                    })
                })
                .collect();
            if let Err(e) = self.client.kv_client().txn(Txn::new().and_then(ops)).await {
                tracing::warn!(error = %e, "cannot publish stream presence; retrying");
                self.dirty.extend(chunk.iter().copied());
            }
        }
        self.counts.retain(|_, n| *n > 0);
    }
}

/// Once per sweep interval, marks the sites streaming on other nodes as seen.
async fn touch_remote(agg: Aggregator, remote: Arc<RemoteStreams>) {
    let s = agg.shared();
    let mut tick = tokio::time::interval(s.config.sweep_interval.max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = s.shutdown.cancelled() => return,
        }
        let now = s.config.clock.mono_ms();
        for site in remote.sites() {
            s.liveness.touch(site, now, &s.tallies);
        }
    }
}
