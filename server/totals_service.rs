//! The Totals gRPC service: read-only queries and coalesced watches for dashboards.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    aggregator::Aggregator,
    auth::{Auth, Credential, scope},
    tally::Node,
};
use crate::proto::v1::{
    BreakdownOrder, BreakdownRequest, BreakdownResponse, CorrectionsRequest, CorrectionsResponse, CurveRequest,
    CurveResponse, ScopeTotals, SilentSitesRequest, SilentSitesResponse, StatsRequest, StatsResponse, TotalsRequest,
    WatchRequest, WatchUpdate, totals_server::Totals,
};

/// Updates buffered per watcher. Small on purpose: a watcher that falls behind is skipped ahead
/// to the latest state instead of queueing stale ones.
const WATCH_BUFFER: usize = 2;

/// The Totals service.
#[derive(Clone)]
pub struct TotalsService {
    agg: Aggregator,
    auth: Auth,
}

impl TotalsService {
    /// A service over an aggregator.
    pub fn new(agg: Aggregator, auth: Auth) -> Self {
        Self { agg, auth }
    }

    /// Checks the token (UNAUTHENTICATED) and its read rate (RESOURCE_EXHAUSTED with
    /// `retry-after-ms`): once per call or watch.
    fn authorize<T>(&self, req: &Request<T>) -> Result<Credential, Status> {
        let credential = self.auth.verify_metadata(req.metadata())?;
        self.auth.quotas().read(&credential.token_id).map_err(|e| e.status())?;
        Ok(credential)
    }

    /// PERMISSION_DENIED unless the credential may read `node` (a province token: its province).
    fn allows(&self, credential: &Credential, node: Node) -> Result<(), Status> {
        Ok(scope::allows(self.agg.registry(), &credential.grant, node)?)
    }
}

#[tonic::async_trait]
impl Totals for TotalsService {
    async fn get_totals(&self, req: Request<TotalsRequest>) -> Result<Response<ScopeTotals>, Status> {
        let credential = self.authorize(&req)?;
        let wait = call_deadline(req.metadata());
        let r = req.into_inner();
        let node = self.agg.node(r.scope.as_ref())?;
        self.allows(&credential, node)?;
        let session = self.agg.session_index(r.session)?;
        // Read-your-writes in cluster mode: answer once this node has applied `min_revision`.
        if let Some(rep) = &self.agg.shared().replication
            && r.min_revision > 0
        {
            rep.wait_applied(r.min_revision, wait).await?;
        }
        Ok(Response::new(self.agg.totals_of(node, session)))
    }

    async fn breakdown(&self, req: Request<BreakdownRequest>) -> Result<Response<BreakdownResponse>, Status> {
        let credential = self.authorize(&req)?;
        let r = req.into_inner();
        let node = self.agg.node(r.scope.as_ref())?;
        self.allows(&credential, node)?;
        let session = self.agg.session_index(r.session)?;
        let order = BreakdownOrder::try_from(r.order)
            .map_err(|_| Status::invalid_argument(format!("unknown breakdown order {}", r.order)))?;
        Ok(Response::new(self.agg.breakdown(node, session, order, r.limit as usize)?))
    }

    async fn silent_sites(&self, req: Request<SilentSitesRequest>) -> Result<Response<SilentSitesResponse>, Status> {
        let credential = self.authorize(&req)?;
        let r = req.into_inner();
        let node = self.agg.node(r.scope.as_ref())?;
        self.allows(&credential, node)?;
        Ok(Response::new(self.agg.silent_sites(node, r.limit as usize)))
    }

    async fn curve(&self, req: Request<CurveRequest>) -> Result<Response<CurveResponse>, Status> {
        let credential = self.authorize(&req)?;
        let r = req.into_inner();
        let node = self.agg.node(r.scope.as_ref())?;
        self.allows(&credential, node)?;
        let session = self.agg.session_index(r.session)?;
        Ok(Response::new(self.agg.curve(node, session)?))
    }

    async fn corrections(&self, req: Request<CorrectionsRequest>) -> Result<Response<CorrectionsResponse>, Status> {
        scope::national_only(&self.authorize(&req)?.grant)?;
        let limit = req.into_inner().limit as usize;
        Ok(Response::new(CorrectionsResponse { corrections: self.agg.shared().audit.newest(limit) }))
    }

    async fn stats(&self, req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        self.authorize(&req)?;
        let st = self.agg.stats();
        let s = self.agg.shared();
        Ok(Response::new(StatsResponse {
            reports_applied: st.applied,
            reports_unchanged: st.unchanged,
            reports_rejected: st.rejected,
            batches: st.batches,
            streams_open: st.streams_open,
            registers: s.registers.len() as u64,
            durable_flush: s.durability.as_ref().map_or(0, |d| *d.subscribe(0).borrow()),
            revision: s.replication.as_ref().map_or(0, |r| r.applied()),
            node: s.replication.as_ref().map_or_else(String::new, |r| r.node.clone()),
        }))
    }

    type WatchStream = ReceiverStream<Result<WatchUpdate, Status>>;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let credential = self.authorize(&req)?;
        let r = req.into_inner();
        let node = self.agg.node(r.scope.as_ref())?;
        self.allows(&credential, node)?;
        let session = self.agg.session_index(r.session)?;
        let children = if r.include_children { self.agg.children(node)? } else { Vec::new() };
        let slot = self.auth.quotas().watcher(&credential.token_id).map_err(|e| e.status())?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let tick = self.agg.shared().config.publish_tick;
        let agg = self.agg.clone();
        let revoked = self.auth.revoked_signal(credential);
        tokio::spawn(async move {
            let _slot = slot;
            let closed = tx.clone();
            // A token revoked while watching: the watch ends, saying so.
            tokio::select! {
                () = publish(agg, node, session, children, tick, tx) => {}
                why = revoked => drop(closed.send(Err(Status::unauthenticated(why))).await),
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Feeds one watcher: a snapshot at once, then on each tick the latest state if it changed.
/// Only this task waits on a slow watcher; ingest never does. Ends with `UNAVAILABLE` when the
/// aggregator shuts down, silently when the watcher goes away.
/// Counts a watcher in `headcount_watchers` for as long as it lives, however its feed ends.
struct WatcherGauge;

impl WatcherGauge {
    fn new() -> Self {
        metrics::gauge!("headcount_watchers").increment(1.0);
        Self
    }
}

impl Drop for WatcherGauge {
    fn drop(&mut self) {
        metrics::gauge!("headcount_watchers").decrement(1.0);
    }
}

async fn publish(
    agg: Aggregator,
    node: Node,
    session: Option<usize>,
    children: Vec<Node>,
    tick: Duration,
    tx: mpsc::Sender<Result<WatchUpdate, Status>>,
) {
    let shutdown = agg.shared().shutdown.child_token();
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last: Option<(ScopeTotals, Vec<ScopeTotals>)> = None;
    let _watching = WatcherGauge::new();
    let mut sequence = 0;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = &mut cancelled => break,
            () = tx.closed() => return,
        }
        let totals = agg.totals_of(node, session);
        let kids: Vec<ScopeTotals> = children.iter().map(|c| agg.totals_of(*c, session)).collect();
        if last.as_ref().is_some_and(|(t, k)| *t == totals && *k == kids) {
            continue;
        }
        let update = WatchUpdate {
            totals: Some(totals.clone()),
            children: kids.clone(),
            sequence,
            unix_ms: agg.shared().config.clock.wall_ms(),
        };
        tokio::select! {
            sent = tx.send(Ok(update)) => if sent.is_err() { return },
            () = &mut cancelled => break,
        }
        last = Some((totals, kids));
        sequence += 1;
    }
    // Shut down: the watch ends with UNAVAILABLE (not OK, which would read as "nothing more
    // will ever change"). Waits for room in the channel; a watcher gone by then is fine.
    let _ = tx.send(Err(Status::unavailable("aggregator shutting down; watch again later"))).await;
}

/// How long a `min_revision` read may wait: the call's `grpc-timeout` (minus a margin to answer
/// in time), else 5 s.
fn call_deadline(md: &tonic::metadata::MetadataMap) -> std::time::Duration {
    const DEFAULT: std::time::Duration = std::time::Duration::from_secs(5);
    let Some(value) = md.get("grpc-timeout").and_then(|v| v.to_str().ok()) else { return DEFAULT };
    let (digits, unit) = value.split_at(value.len().saturating_sub(1));
    let Ok(n) = digits.parse::<u64>() else { return DEFAULT };
    let total = match unit {
        "H" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return DEFAULT,
    };
    total.mul_f64(0.9)
}
