//! The etcd committer: a node's group commit. Every `flush_interval` (or sooner, once about
//! `flush_records` registers changed) it writes the latest state of each register changed since
//! the previous commit, each as a compare-and-set on seq, plus the node's new corrections, then
//! publishes the flush as committed so the streams waiting for it acknowledge.
//!
//! The compare-and-set of one register is an etcd transaction nested in the group's:
//! `if value < seq₂₀ then put, else (if version == 0 then put)` — a stored value compares lower
//! exactly when its seq is lower (see [`keys::seq_prefix`]); the inner branch creates a register
//! etcd does not hold yet (a value comparison on a missing key is false). A write that lost the
//! race to a newer seq changes nothing; the watch then brings the winner to this node too.
//! A group larger than `txn_registers` is split into transactions sent at once; the flush is
//! published only when all of them committed. A failed group is kept whole and retried with
//! backoff: nothing is acknowledged meanwhile (etcd without quorum means no acks).
//!
//! It runs on its own thread with its own small runtime, like the journal's flusher, and is
//! woken the same way (see [`crate::server::durability`]).

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use prost::Message;
use rustc_hash::FxHashMap;

use super::ClusterConfig;
use crate::server::{
    aggregator::Aggregator,
    durability::{Durability, record::Record},
    registers::{Register, RegisterKey},
    replication::{Replication, keys},
};

/// First pause after a failed commit; doubles up to [`RETRY_PAUSE_MAX`].
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Longest pause between attempts.
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);
/// Failed attempts after which a stopping committer gives up (sites resend what was not acked).
const STOP_ATTEMPTS: u32 = 3;

/// Starts the committer thread for `agg` (stopped and joined by [`Aggregator::close`]).
pub fn start(agg: Aggregator, d: Arc<Durability>, rep: Arc<Replication>, config: ClusterConfig) -> std::io::Result<()> {
    let durability = d.clone();
    d.spawn_committer("headcount-etcd-commit", move || run(agg, durability, rep, config))
}

fn run(agg: Aggregator, d: Arc<Durability>, rep: Arc<Replication>, config: ClusterConfig) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the etcd committer's runtime; nothing will be acknowledged");
            return;
        }
    };
    // Its own client on its own runtime (a client's connections live on the runtime that made it).
    let client = loop {
        match rt.block_on(super::connect(&config)) {
            Ok(c) => break c,
            Err(e) if d.is_stopping() => {
                tracing::error!(error = %e, "stopping before etcd answered");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "committer cannot reach etcd yet; retrying");
                thread::park_timeout(RETRY_PAUSE_MAX);
            }
        }
    };
    agg.shared().registers.set_flusher(thread::current(), config.flush_records);
    let mut registers: FxHashMap<RegisterKey, Register> = FxHashMap::default();
    let mut corrections: Vec<Record> = Vec::new();
    let mut incoming: Vec<Record> = Vec::new();
    let mut failures = 0u32;
    let mut audit_n = 0u64;
    let mut window = Instant::now();
    loop {
        let stopping = d.is_stopping();
        if !stopping {
            let pause = match failures {
                0 => config.flush_interval,
                n => RETRY_PAUSE.saturating_mul(1 << (n - 1).min(5)).min(RETRY_PAUSE_MAX),
            };
            thread::park_timeout(pause);
        }
        let n = d.begin_flush();
        registers.extend(agg.shared().registers.take_dirty());
        d.take_pending(&mut incoming);
        // Curve samples and install records are not the committer's (see `Aggregator::sweep_now`
        // and `Replication::claim_install`); corrections go to the shared audit trail.
        corrections.extend(incoming.drain(..).filter(|r| matches!(r, Record::Correction(_))));
        let opened = std::mem::replace(&mut window, Instant::now());
        if !registers.is_empty() || !corrections.is_empty() {
            let started = Instant::now();
            let txns = group(&agg, &rep, &config, &registers, &corrections, &mut audit_n);
            match rt.block_on(commit(&client, txns)) {
                Ok(revision) => {
                    rep.set_committed(revision);
                    failures = 0;
                    registers.clear();
                    corrections.clear();
                    metrics::histogram!("headcount_etcd_commit_seconds").record(started.elapsed());
                    metrics::histogram!("headcount_ack_wait_seconds").record(opened.elapsed());
                }
                Err(e) => {
                    failures += 1;
                    metrics::counter!("headcount_etcd_commit_failures_total").increment(1);
                    tracing::error!(
                        error = %e, attempt = failures, registers = registers.len(), node = %rep.node,
                        "etcd commit failed; nothing is acknowledged until it succeeds"
                    );
                    if stopping && failures >= STOP_ATTEMPTS {
                        tracing::error!("giving up at shutdown; sites resend what was not acknowledged");
                        return;
                    }
                    continue;
                }
            }
        }
        d.publish(n);
        if stopping {
            return;
        }
    }
}

/// The group's transactions: one compare-and-set per register, one put per correction, at
/// most `txn_registers` operations each.
fn group(
    agg: &Aggregator,
    rep: &Replication,
    config: &ClusterConfig,
    registers: &FxHashMap<RegisterKey, Register>,
    corrections: &[Record],
    audit_n: &mut u64,
) -> Vec<Txn> {
    let registry = agg.registry();
    let mut ops: Vec<TxnOp> = Vec::with_capacity(registers.len() + corrections.len());
    for (key, reg) in registers {
        let (Some(site), Some(session)) =
            (registry.sites.get(key.site as usize), registry.sessions.get(key.session as usize))
        else {
            continue;
        };
        let k = keys::register(&rep.prefix, &site.id, key.desk, session.id);
        ops.push(compare_and_set(k, reg.seq, reg.count));
    }
    for record in corrections {
        if let Record::Correction(c) = record {
            *audit_n += 1;
            let k = keys::audit(&rep.prefix, c.unix_ms, &rep.node, *audit_n);
            ops.push(TxnOp::put(k, c.encode_to_vec(), None));
        }
    }
    let mut txns = Vec::with_capacity(ops.len().div_ceil(config.txn_registers));
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        let chunk: Vec<TxnOp> = ops.by_ref().take(config.txn_registers).collect();
        txns.push(Txn::new().and_then(chunk));
    }
    txns
}

/// The compare-and-set of one register as one etcd transaction operation (see the module's
/// doc): writes `"<seq> <count>"` at `key` if etcd holds no value there or one with a lower seq.
pub fn compare_and_set(key: String, seq: u64, count: i64) -> TxnOp {
    let value = keys::register_value(seq, count);
    let create = Txn::new().when([Compare::version(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
        key.clone(),
        value.clone(),
        None,
    )]);
    TxnOp::txn(
        Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Less, keys::seq_prefix(seq))])
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::txn(create)]),
    )
}

/// Sends the group's transactions at once; the highest revision they committed at, or the
/// first error.
async fn commit(client: &Client, txns: Vec<Txn>) -> Result<u64, etcd_client::Error> {
    let mut set = tokio::task::JoinSet::new();
    for txn in txns {
        let mut kv = client.kv_client();
        set.spawn(async move { kv.txn(txn).await });
    }
    let mut revision = 0u64;
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(response)) => revision = revision.max(response.header().map_or(0, |h| h.revision()).max(0) as u64),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(etcd_client::Error::IoError(std::io::Error::other(e.to_string())));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(revision),
    }
}
