//! List-then-watch: how every change committed by any node reaches this node. On start (and
//! after a compaction or a broken watch) the node lists every key under the prefix at one
//! revision, in pages; then it watches from the next revision. Registers merge under the
//! counting rule (a higher seq wins; rollups move under the register's lock, as for a local
//! report); install slots, the audit trail (in revision order: the same trail on every node)
//! and the streams other nodes hold (liveness) follow. After each response the node's applied
//! revision moves on ([`Replication::set_applied`]), which `min_revision` reads and resume
//! handshakes wait for.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering::Relaxed},
    },
    time::Duration,
};

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};
use prost::Message;
use rustc_hash::FxHashMap;

use crate::{
    proto::v1::Correction,
    server::{
        aggregator::Aggregator,
        registers::{Register, RegisterKey},
        replication::{keys, parse_install},
    },
};

/// Keys per page of a listing.
const PAGE: i64 = 5_000;
/// First pause before a broken watch is re-established; doubles per failure in a row up to
/// [`REWATCH_PAUSE_MAX`].
const REWATCH_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between attempts.
const REWATCH_PAUSE_MAX: Duration = Duration::from_secs(2);

/// Streams that sites hold on OTHER nodes (from their `stream/` keys): a site with one is
/// reporting on every node.
pub struct RemoteStreams {
    per_site: Box<[AtomicU32]>,
    keys: Mutex<FxHashMap<Vec<u8>, u32>>,
}

impl RemoteStreams {
    /// None yet, for `sites` sites.
    pub fn new(sites: usize) -> Self {
        Self { per_site: (0..sites).map(|_| AtomicU32::new(0)).collect(), keys: Mutex::new(FxHashMap::default()) }
    }

    fn put(&self, key: &[u8], site: u32) {
        let mut keys = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if keys.insert(key.to_vec(), site).is_none() {
            self.per_site[site as usize].fetch_add(1, Relaxed);
        }
    }

    fn delete(&self, key: &[u8]) {
        let mut keys = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(site) = keys.remove(key) {
            self.per_site[site as usize].fetch_sub(1, Relaxed);
        }
    }

    fn clear(&self) {
        let mut keys = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.clear();
        self.per_site.iter().for_each(|c| c.store(0, Relaxed));
    }

    /// Sites with a stream on another node (O(sites): for the once-a-second liveness touch).
    pub fn sites(&self) -> impl Iterator<Item = u32> + '_ {
        self.per_site.iter().enumerate().filter(|(_, c)| c.load(Relaxed) > 0).map(|(i, _)| i as u32)
    }
}

/// What the feed applies changes to.
pub struct FeedState {
    agg: Aggregator,
    remote: std::sync::Arc<RemoteStreams>,
    /// Highest revision of an audit entry already in the trail (a relisting skips older ones).
    audit_revision: i64,
}

impl FeedState {
    /// Applies to `agg`; other nodes' streams go to `remote`.
    pub fn new(agg: Aggregator, remote: std::sync::Arc<RemoteStreams>) -> Self {
        Self { agg, remote, audit_revision: 0 }
    }

    /// Lists every key under `prefix` at one revision and applies it; returns that revision.
    pub async fn list(&mut self, client: &Client, prefix: &str) -> Result<u64, etcd_client::Error> {
        let (start, end) = (format!("{prefix}/"), format!("{prefix}0"));
        let mut kv = client.kv_client();
        let mut from = start.into_bytes();
        let mut revision = 0i64;
        let mut audits: Vec<KeyValue> = Vec::new();
        self.remote.clear();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let response = kv.get(from.clone(), Some(options)).await?;
            if revision == 0 {
                revision = response.header().map_or(0, |h| h.revision());
            }
            for kv in response.kvs() {
                if kv.key()[prefix.len()..].starts_with(b"/audit/") {
                    audits.push(kv.clone());
                } else {
                    self.put(prefix, kv, false);
                }
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        audits.sort_by_key(|kv| kv.create_revision());
        for kv in &audits {
            self.put(prefix, kv, false);
        }
        tracing::info!(revision, registers = self.agg.shared().registers.len(), "listed etcd");
        Ok(revision.max(0) as u64)
    }

    /// Applies one key's value. `live`: from the watch (the site is reporting now).
    fn put(&mut self, prefix: &str, kv: &KeyValue, live: bool) {
        let Ok(key) = std::str::from_utf8(kv.key()) else { return };
        let Some(rest) = key.strip_prefix(prefix).and_then(|k| k.strip_prefix('/')) else { return };
        let s = self.agg.shared();
        let registry = &s.registry;
        let Some((kind, rest)) = rest.split_once('/') else { return };
        match kind {
            "r" => {
                let mut parts = rest.rsplitn(3, '/');
                let (Some(session), Some(desk), Some(site)) = (parts.next(), parts.next(), parts.next()) else {
                    return;
                };
                let place = (
                    registry.site(site),
                    desk.parse::<u16>().ok(),
                    session.parse::<u32>().ok().and_then(|id| registry.session(id)),
                );
                let ((Some(site), Some(desk), Some(session)), Some((seq, count))) =
                    (place, keys::parse_register(kv.value()))
                else {
                    tracing::warn!(key, "etcd holds a register this registry has no place for; ignored");
                    return;
                };
                let now = s.config.clock.mono_ms();
                let key = RegisterKey { site, desk, session };
                s.registers.merge(key, Register { seq, count }, |delta| {
                    s.tallies.add(site, session as usize, delta, now);
                });
                if live {
                    s.liveness.touch(site, now, &s.tallies);
                }
            }
            "install" => {
                let Some((site, id)) = rest.rsplit_once('/') else { return };
                let (Some(site), Some(install)) =
                    (registry.site(site), parse_install(id, &String::from_utf8_lossy(kv.value())))
                else {
                    return;
                };
                s.installs.restore(site, install);
            }
            "audit" => {
                if kv.create_revision() <= self.audit_revision {
                    return;
                }
                self.audit_revision = kv.create_revision();
                match Correction::decode(kv.value()) {
                    Ok(c) if live => s.audit.record(c),
                    Ok(c) => s.audit.restore(c),
                    Err(e) => tracing::warn!(key, error = %e, "undecodable correction in etcd; ignored"),
                }
            }
            "stream" => {
                let Some((site, node)) = rest.rsplit_once('/') else { return };
                if let (Some(site), true) = (registry.site(site), node != self.node()) {
                    self.remote.put(kv.key(), site);
                    if live {
                        s.liveness.touch(site, s.config.clock.mono_ms(), &s.tallies);
                    }
                }
            }
            _ => {}
        }
    }

    fn node(&self) -> &str {
        self.agg.shared().replication.as_ref().map_or("", |r| r.node.as_str())
    }
}

/// Watches from `revision + 1` until shutdown, applying every change; lists again after a
/// compaction.
pub async fn run(mut state: FeedState, client: Client, prefix: String, mut revision: u64) {
    let agg = state.agg.clone();
    let Some(rep) = agg.shared().replication.clone() else { return };
    let shutdown = agg.shared().shutdown.clone();
    let end = format!("{prefix}0");
    let mut failures = 0u32;
    loop {
        let options = WatchOptions::new().with_range(end.clone()).with_start_revision(revision as i64 + 1);
        let mut watch_client = client.watch_client();
        let watched = tokio::select! {
            w = watch_client.watch(format!("{prefix}/"), Some(options)) => w,
            () = shutdown.cancelled() => return,
        };
        let mut stream = match watched {
            Ok(s) => s,
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %e, node = %rep.node, "cannot watch etcd; retrying with backoff");
                }
                if pause(&shutdown, failures).await {
                    return;
                }
                continue;
            }
        };
        let relist = loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(response)) => {
                        failures = 0;
                        if response.compact_revision() > 0 || response.canceled() {
                            tracing::warn!(
                                compacted = response.compact_revision(), reason = response.cancel_reason(),
                                "etcd watch cancelled; listing again"
                            );
                            break true;
                        }
                        let mut last = 0i64;
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            last = last.max(kv.mod_revision());
                            match event.event_type() {
                                EventType::Put => state.put(&prefix, kv, true),
                                EventType::Delete => state.remote.delete(kv.key()),
                            }
                        }
                        // Only events move the applied revision (see `Replication::wait_applied`).
                        let seen = last;
                        if seen > 0 {
                            revision = revision.max(seen as u64);
                            rep.set_applied(revision);
                        }
                    }
                    Ok(None) => break false,
                    Err(e) => {
                        tracing::warn!(error = %e, node = %rep.node, "etcd watch broke; watching again");
                        break false;
                    }
                },
                () = shutdown.cancelled() => return,
            }
        };
        if pause(&shutdown, failures).await {
            return;
        }
        if relist {
            match state.list(&client, &prefix).await {
                Ok(r) => {
                    revision = r;
                    rep.set_applied(r);
                }
                Err(e) => tracing::warn!(error = %e, "cannot list etcd; retrying"),
            }
        }
    }
}

/// Waits before retrying (longer after each failure in a row); true when shutting down.
async fn pause(shutdown: &tokio_util::sync::CancellationToken, failures: u32) -> bool {
    let wait = REWATCH_PAUSE.saturating_mul(1 << failures.min(5)).min(REWATCH_PAUSE_MAX);
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = shutdown.cancelled() => true,
    }
}
