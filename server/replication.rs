//! What the write and read paths need to know about cluster mode, without knowing etcd's
//! protocol loop: the node's name, the etcd revisions it has committed and applied, whether it
//! may acknowledge (its fence), the install-slot claims that must be unique across nodes, and
//! the stream presence it publishes. The loops that drive this state live in
//! [`super::cluster`]; this module imports nothing of the aggregator, so both sides can use it.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    },
    time::Duration,
};

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{
    error::Error,
    installs::{Claim, Install, Installs},
};

/// etcd key layout under the cluster's prefix (see README, "Cluster mode"). Every key is
/// `<prefix>/<kind>/…`; ids are the registry's (site id, session id), never indexes.
pub mod keys {
    /// A register: `<p>/r/<site id>/<desk>/<session id>` → `"<seq, 20 digits> <count>"`.
    pub fn register(prefix: &str, site: &str, desk: u16, session: u32) -> String {
        format!("{prefix}/r/{site}/{desk}/{session}")
    }
    /// An agent install: `<p>/install/<site id>/<install id>` → `"<slot> <desk>"`.
    pub fn install(prefix: &str, site: &str, id: &str) -> String {
        format!("{prefix}/install/{site}/{id}")
    }
    /// An install slot's owner: `<p>/slot/<site id>/<slot>` → install id.
    pub fn slot(prefix: &str, site: &str, slot: u16) -> String {
        format!("{prefix}/slot/{site}/{slot}")
    }
    /// A correction of the audit trail: `<p>/audit/<unix ms, 13 digits>-<node>-<n>` → protobuf
    /// `Correction`. Nodes list and watch them in revision order, so every node holds the same trail.
    pub fn audit(prefix: &str, unix_ms: i64, node: &str, n: u64) -> String {
        format!("{prefix}/audit/{unix_ms:013}-{node}-{n}")
    }
    /// A site's open stream on a node: `<p>/stream/<site id>/<node>`, attached to the node's
    /// lease (gone within the lease TTL when the node dies).
    pub fn stream(prefix: &str, site: &str, node: &str) -> String {
        format!("{prefix}/stream/{site}/{node}")
    }
    /// A node's read barrier: `<p>/barrier/<node>` → Unix ms. Writing it yields a revision that
    /// the node's own watch will deliver (see [`super::Replication::barrier`]).
    pub fn barrier(prefix: &str, node: &str) -> String {
        format!("{prefix}/barrier/{node}")
    }
    /// A live node: `<p>/node/<node>` → its start time, attached to its lease.
    pub fn node(prefix: &str, node: &str) -> String {
        format!("{prefix}/node/{node}")
    }

    /// The value of a register: the seq zero-padded to 20 digits (every `u64`), so that etcd's
    /// byte-wise comparison of values orders registers by seq (see [`seq_prefix`]).
    pub fn register_value(seq: u64, count: i64) -> String {
        format!("{seq:020} {count}")
    }
    /// What a stored register value is compared with: a stored value is byte-wise `<` this
    /// exactly when its seq is lower than `seq` (equal seqs compare greater: the longer string).
    pub fn seq_prefix(seq: u64) -> String {
        format!("{seq:020}")
    }
    /// Parses a register value; None when it is not one.
    pub fn parse_register(value: &[u8]) -> Option<(u64, i64)> {
        let text = std::str::from_utf8(value).ok()?;
        let (seq, count) = text.split_once(' ')?;
        Some((seq.parse().ok()?, count.parse().ok()?))
    }
}

/// How long a read waits for watch events before writing a barrier.
const BARRIER_AFTER: Duration = Duration::from_millis(50);

/// Wall-clock Unix milliseconds (the barrier's value: display only).
fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A change of the set of this node's streams per site, for the presence loop.
#[derive(Debug, Clone, Copy)]
pub struct PresenceChange {
    /// Site index.
    pub site: u32,
    /// +1 opened, −1 closed.
    pub delta: i32,
}

/// Cluster-mode state shared by the aggregator's paths and the cluster loops.
pub struct Replication {
    /// This node's name (`--node`).
    pub node: String,
    /// Key prefix (`--etcd-prefix`), no trailing `/`.
    pub prefix: String,
    /// A client for one-off calls (install claims, catch-up reads); cheap to clone.
    pub client: etcd_client::Client,
    /// Highest etcd revision this node has applied from its list and watch.
    applied: watch::Sender<u64>,
    /// Highest revision of this node's own committed group writes.
    committed: AtomicU64,
    /// False while this node cannot reach a quorum for longer than its lease: it then refuses
    /// new streams and has ended its streams (UNAVAILABLE), and acknowledges nothing.
    healthy: AtomicBool,
    /// Cancelled when this node is fenced off; replaced by a fresh token when it recovers.
    fence: Mutex<CancellationToken>,
    /// Stream presence changes for the presence loop.
    presence: mpsc::UnboundedSender<PresenceChange>,
    /// Callers waiting for a barrier; one write answers every caller queued before it started.
    barriers: mpsc::UnboundedSender<oneshot::Sender<Result<u64, Error>>>,
    /// How long a read or a resume waits to catch up with etcd, at most.
    pub catch_up_timeout: Duration,
}

/// The receiving ends of [`Replication`]'s queues, for the cluster loops.
pub struct ReplicationQueues {
    /// Presence changes.
    pub presence: mpsc::UnboundedReceiver<PresenceChange>,
    /// Barrier waiters (drained by [`Replication::run_barriers`]).
    pub barriers: mpsc::UnboundedReceiver<oneshot::Sender<Result<u64, Error>>>,
}

impl Replication {
    /// State for node `node` (healthy, nothing applied yet) and the queues its loops drain.
    pub fn new(
        node: String,
        prefix: String,
        client: etcd_client::Client,
        catch_up_timeout: Duration,
    ) -> (Arc<Self>, ReplicationQueues) {
        let (presence_tx, presence) = mpsc::unbounded_channel();
        let (barriers_tx, barriers) = mpsc::unbounded_channel();
        let rep = Self {
            node,
            prefix,
            client,
            applied: watch::Sender::new(0),
            committed: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            fence: Mutex::new(CancellationToken::new()),
            presence: presence_tx,
            barriers: barriers_tx,
            catch_up_timeout,
        };
        (Arc::new(rep), ReplicationQueues { presence, barriers })
    }

    /// The revision this node has applied (its totals reflect every change up to it).
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Records that everything up to `revision` is applied (never moves backwards).
    pub fn set_applied(&self, revision: u64) {
        self.applied.send_if_modified(|r| {
            let newer = revision > *r;
            if newer {
                *r = revision;
            }
            newer
        });
    }

    /// The revision of this node's latest committed group write (0 before the first).
    pub fn committed(&self) -> u64 {
        self.committed.load(SeqCst)
    }

    /// Records a committed group write at `revision`.
    pub fn set_committed(&self, revision: u64) {
        self.committed.fetch_max(revision, SeqCst);
    }

    /// Whether this node may accept streams and acknowledge.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(SeqCst)
    }

    /// The token a stream ends on when this node is fenced off.
    pub fn fence(&self) -> CancellationToken {
        self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Fences the node off (no quorum for longer than its lease): ends every stream with
    /// UNAVAILABLE so that sites fail over, and refuses new ones until [`Self::recover`].
    pub fn fence_off(&self) {
        if self.healthy.swap(false, SeqCst) {
            tracing::error!(node = %self.node, "etcd unreachable for longer than the lease: ending streams, refusing new ones");
            self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).cancel();
        }
    }

    /// Lets the node accept streams again.
    pub fn recover(&self) {
        let mut fence = self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !self.healthy.load(SeqCst) {
            *fence = CancellationToken::new();
            self.healthy.store(true, SeqCst);
            tracing::info!(node = %self.node, "etcd reachable again: accepting streams");
        }
    }

    /// Refuses a new stream while fenced. Error: `UNAVAILABLE`.
    pub fn admit(&self) -> Result<(), Error> {
        if self.is_healthy() {
            Ok(())
        } else {
            Err(Error::Unavailable(format!(
                "aggregator node {} cannot reach its etcd cluster; connect to another node",
                self.node
            )))
        }
    }

    /// Tells the presence loop that a stream of `site` opened (+1) or closed (−1).
    pub fn stream_presence(&self, site: u32, delta: i32) {
        let _ = self.presence.send(PresenceChange { site, delta });
    }

    /// Waits until this node has applied `revision`, at most `timeout`. Error: `UNAVAILABLE`.
    ///
    /// The applied revision moves only with watch *events* under the prefix, never with etcd's
    /// progress notifications: etcd before 3.4.24 / 3.5.8 can send one ahead of events it has not
    /// delivered yet (etcd issue #15220; this test machine has 3.4.23). When no event comes soon,
    /// a [`Self::barrier`] write makes one, at a revision past every write committed before it.
    pub async fn wait_applied(&self, revision: u64, timeout: Duration) -> Result<(), Error> {
        if self.applied() >= revision {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        let mut rx = self.applied.subscribe();
        let soon = tokio::time::timeout(BARRIER_AFTER.min(timeout), rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok());
        if soon {
            return Ok(());
        }
        self.barrier().await?;
        let rest = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(rest, rx.wait_for(|r| *r >= revision)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(format!(
                "node {} has applied etcd revision {} and did not reach {revision} within {timeout:?}; retry, or \
                 ask another node",
                self.node,
                self.applied()
            ))),
        }
    }

    /// Writes this node's barrier key and returns the revision etcd committed it at: every write
    /// committed before the call is at a lower revision, and this node's watch will deliver the
    /// barrier's event. Error: `UNAVAILABLE` when etcd does not take it.
    ///
    /// Barriers are coalesced: callers that queue while one write is in flight share the next
    /// one (a reconnect storm of thousands of resumes costs a few writes, not thousands).
    pub async fn barrier(&self) -> Result<u64, Error> {
        let (tx, rx) = oneshot::channel();
        self.barriers.send(tx).map_err(|_| self.unreachable("node stopping"))?;
        rx.await.map_err(|_| self.unreachable("node stopping"))?
    }

    /// Answers queued barrier callers until the queue closes: takes every caller queued so far,
    /// writes the barrier key once, answers them all with its revision.
    pub async fn run_barriers(
        self: Arc<Self>,
        mut queue: mpsc::UnboundedReceiver<oneshot::Sender<Result<u64, Error>>>,
    ) {
        let mut waiting = Vec::new();
        while queue.recv_many(&mut waiting, usize::MAX).await > 0 {
            let result = self.write_barrier().await;
            for w in waiting.drain(..) {
                let _ = w.send(result.clone());
            }
        }
    }

    async fn write_barrier(&self) -> Result<u64, Error> {
        let key = keys::barrier(&self.prefix, &self.node);
        let mut kv = self.client.kv_client();
        let put = tokio::time::timeout(self.catch_up_timeout, kv.put(key, now_unix_ms().to_string(), None)).await;
        match put {
            Ok(Ok(response)) => Ok(response.header().map_or(0, |h| h.revision()).max(0) as u64),
            Ok(Err(e)) => Err(self.unreachable(&e.to_string())),
            Err(_) => Err(self.unreachable("timed out")),
        }
    }

    /// Waits until this node reflects everything etcd had committed when the call started (a
    /// barrier write, then [`Self::wait_applied`] for its revision). Error: `UNAVAILABLE`.
    pub async fn catch_up(&self) -> Result<(), Error> {
        let revision = self.barrier().await?;
        self.wait_applied(revision, self.catch_up_timeout).await
    }

    fn unreachable(&self, why: &str) -> Error {
        Error::Unavailable(format!("node {} cannot reach etcd ({why}); connect to another node", self.node))
    }

    /// Claims a register slot for agent install `id` at `site`, unique across every node: the
    /// slot is taken in etcd with a create-only transaction (the install's key and the slot's
    /// key must both be new); when another node took that slot, or this install already has
    /// one, the local table is corrected and the claim retried. Errors: as
    /// [`Installs::claim`], and `UNAVAILABLE` when etcd does not answer.
    pub async fn claim_install(
        &self,
        installs: &Installs,
        site: u32,
        site_id: &str,
        id: &str,
        desk: u32,
    ) -> Result<Claim, Error> {
        let unavailable = |e: String| Error::Unavailable(format!("cannot claim an install slot in etcd ({e}); retry"));
        for _ in 0..64 {
            let claim = installs.claim(site, site_id, id, desk)?;
            if !claim.new {
                return Ok(claim);
            }
            let (ikey, skey) =
                (keys::install(&self.prefix, site_id, id), keys::slot(&self.prefix, site_id, claim.slot));
            let txn = Txn::new()
                .when([
                    Compare::version(ikey.clone(), CompareOp::Equal, 0),
                    Compare::version(skey.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(ikey.clone(), format!("{} {desk}", claim.slot), None),
                    TxnOp::put(skey.clone(), id, None),
                ])
                .or_else([TxnOp::get(ikey, None), TxnOp::get(skey, None)]);
            let mut kv = self.client.kv_client();
            let response = tokio::time::timeout(self.catch_up_timeout, kv.txn(txn))
                .await
                .map_err(|_| unavailable("timed out".into()))?
                .map_err(|e| unavailable(e.to_string()))?;
            if response.succeeded() {
                if let Some(h) = response.header() {
                    self.set_committed(h.revision().max(0) as u64);
                }
                return Ok(claim);
            }
            // Lost: undo the tentative claim, learn what etcd holds (the install's key, then the
            // slot's), try again.
            installs.forget(site, id);
            let gets: Vec<_> = response
                .op_responses()
                .into_iter()
                .filter_map(|op| match op {
                    TxnOpResponse::Get(get) => Some(get.kvs().first().map(|kv| kv.value().to_vec())),
                    _ => None,
                })
                .collect();
            if let Some(Some(value)) = gets.first()
                && let Some(install) = parse_install(id, &String::from_utf8_lossy(value))
            {
                installs.restore(site, install);
            }
            if let Some(Some(owner)) = gets.get(1) {
                let owner = String::from_utf8_lossy(owner).into_owned();
                if owner != id {
                    installs.restore(site, Install { id: owner, desk: 0, slot: claim.slot });
                }
            }
        }
        Err(unavailable("too many concurrent claims for this site".into()))
    }
}

/// Parses an install key's value `"<slot> <desk>"`.
pub fn parse_install(id: &str, value: &str) -> Option<Install> {
    let (slot, desk) = value.split_once(' ')?;
    Some(Install { id: id.to_owned(), slot: slot.parse().ok()?, desk: desk.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::keys;

    #[test]
    fn register_values_compare_bytewise_in_seq_order() {
        let stored = keys::register_value(41, 1_000);
        assert!(stored.as_str() < keys::seq_prefix(42).as_str(), "a lower seq is replaced");
        assert!(keys::register_value(42, 0).as_str() >= keys::seq_prefix(42).as_str(), "an equal seq is not");
        assert!(keys::register_value(43, 0).as_str() > keys::seq_prefix(42).as_str(), "a higher seq is not");
        assert!(keys::register_value(u64::MAX, 5).as_str() > keys::seq_prefix(u64::MAX - 1).as_str());
        assert_eq!(keys::parse_register(keys::register_value(u64::MAX, 7).as_bytes()), Some((u64::MAX, 7)));
        assert_eq!(keys::parse_register(b"garbage"), None);
    }
}
