//! The Ingest gRPC service: authenticates a reporter from its stream metadata, sends the resume
//! handshake, then answers each batch with an ack until the reporter or the aggregator ends.

use std::{collections::VecDeque, pin::Pin, sync::Arc};

use tokio::sync::Semaphore;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap};

use super::{
    aggregator::{Aggregator, ReporterId},
    auth::{Auth, Grant},
    error::Error,
    installs::Claim,
    wire_status::classify,
};
use crate::proto::v1::{Ack, ReportRequest, ReportResponse, ingest_server::Ingest, report_request, report_response};

use crate::proto::metadata::AGENT_HEADER;
pub use crate::proto::metadata::{DESK_HEADER, SITE_HEADER};

/// The Ingest service.
#[derive(Clone)]
pub struct IngestService {
    agg: Aggregator,
    auth: Auth,
    /// Admission control for reconnect storms: bounded handshakes in flight.
    handshakes: Arc<Semaphore>,
}

impl IngestService {
    /// A service over an aggregator.
    pub fn new(agg: Aggregator, auth: Auth, max_concurrent_handshakes: usize) -> Self {
        Self { agg, auth, handshakes: Arc::new(Semaphore::new(max_concurrent_handshakes.max(1))) }
    }

    /// Who is this stream? Checks token, site and desk metadata.
    /// `cert_site`: the site a verified client certificate names (mTLS), used instead of a token.
    fn identify(&self, md: &MetadataMap, cert_site: Option<&str>) -> Result<ReporterId, Error> {
        let grant = match cert_site {
            Some(site) => super::tls::identity::grant(site, md)?,
            None => self.auth.verify_metadata(md)?.grant,
        };
        let site = md
            .get(SITE_HEADER)
            .ok_or_else(|| Error::InvalidArgument(format!("missing `{SITE_HEADER}` metadata")))?
            .to_str()
            .map_err(|_| Error::InvalidArgument(format!("`{SITE_HEADER}` is not ASCII")))?;
        match grant {
            Grant::Site(s) if s == site => {}
            Grant::Site(s) => {
                return Err(Error::PermissionDenied(format!("token of site {s:?} cannot report for site {site:?}")));
            }
            Grant::Read(_) => return Err(Error::PermissionDenied("a read token cannot report".into())),
        }
        let desk = match md.get(DESK_HEADER) {
            None => 1,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u32>().ok())
                .ok_or_else(|| Error::InvalidArgument(format!("`{DESK_HEADER}` must be a desk number")))?,
        };
        self.agg.reporter(site, desk)
    }
}

impl IngestService {
    /// [`IngestService::identify`], then, for a stream carrying `x-headcount-agent`, the register
    /// slot of that agent install (claimed durably the first time; see `server/installs.rs`) with
    /// the desk number it declared. `cert_site`: the site a verified client certificate names.
    async fn identify_agent(
        &self,
        md: &MetadataMap,
        cert_site: Option<&str>,
    ) -> Result<(ReporterId, Option<(Claim, u32)>), Error> {
        let reporter = self.identify(md, cert_site)?;
        let Some(v) = md.get(AGENT_HEADER) else { return Ok((reporter, None)) };
        let install = v.to_str().map_err(|_| Error::InvalidArgument(format!("`{AGENT_HEADER}` is not ASCII")))?;
        let site = site_id(&self.agg, reporter).to_owned();
        let desk = u32::from(reporter.desk);
        let (r, claim) = self.agg.install_reporter(&site, install, desk).await?;
        Ok((r, Some((claim, desk))))
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type ReportStream = Pin<Box<dyn Stream<Item = Result<ReportResponse, Status>> + Send>>;

    async fn report(&self, request: Request<Streaming<ReportRequest>>) -> Result<Response<Self::ReportStream>, Status> {
        let Ok(_permit) = self.handshakes.try_acquire() else {
            metrics::counter!("headcount_handshakes_refused_total", "code" => "ResourceExhausted").increment(1);
            let mut status = Status::resource_exhausted("too many streams opening at once; retry after backoff");
            status
                .metadata_mut()
                .insert(crate::proto::metadata::RETRY_AFTER_MS_HEADER, tonic::metadata::MetadataValue::from(1000));
            return Err(status);
        };
        if let Some(rep) = &self.agg.shared().replication {
            rep.admit()?;
        }
        let cert_site = super::tls::peer_site(&request);
        let identified = match &cert_site {
            Ok(site) => self.identify_agent(request.metadata(), site.as_deref()).await,
            Err(e) => Err(e.clone()),
        };
        let (reporter, claim) = identified.inspect_err(|e| {
            metrics::counter!("headcount_handshakes_refused_total", "code" => format!("{:?}", e.code())).increment(1);
            tracing::info!(error = %e, peer = ?request.remote_addr(), "ingest stream refused");
        })?;
        let guard = self.auth.stream_guard(request.metadata(), site_id(&self.agg, reporter));
        let mut resume = self.agg.resume_durable(reporter).await?;
        if let Some((c, desk)) = claim {
            (resume.agent_slot, resume.site_agents, resume.desk_agents) =
                (u32::from(c.slot), c.site_agents, c.desk_agents);
            resume.desk = desk;
        }
        // No span on the stream: even a disabled span is entered on every poll (3.7 % of the
        // server's profile under load). Log lines carry site and desk instead.
        tracing::debug!(site = %site_id(&self.agg, reporter), desk = reporter.desk, registers = resume.registers.len(), "stream opened");
        let resume = ReportResponse { kind: Some(report_response::Kind::Resume(resume)) };
        Ok(Response::new(Box::pin(serve_stream(self.agg.clone(), reporter, resume, request.into_inner(), guard))))
    }
}

/// Counts a stream as open for its lifetime (in cluster mode, also publishes that its site has
/// a stream on this node).
struct OpenStream(Aggregator, u32);

impl OpenStream {
    fn new(agg: &Aggregator, site: u32) -> Self {
        agg.shared().streams_open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(rep) = &agg.shared().replication {
            rep.stream_presence(site, 1);
        }
        Self(agg.clone(), site)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.shared().streams_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(rep) = &self.0.shared().replication {
            rep.stream_presence(self.1, -1);
        }
    }
}

/// Acks applied but waiting for the journal, per stream; at this many (or
/// [`MAX_PENDING_ACK_BYTES`]) the stream stops reading until the journal catches up.
pub const MAX_PENDING_ACKS: usize = 32;
/// Bytes of acks waiting for the journal at which a stream stops reading.
pub const MAX_PENDING_ACK_BYTES: usize = 256 * 1024;
/// Most acks handed to the transport in one write. hyper holds at most two writes of a stream
/// whose reporter does not read (one being sent, one waiting for window), so this bounds the acks
/// applied but not sent to `MAX_PENDING_ACKS + 2 × ACKS_PER_WRITE` (64).
pub const ACKS_PER_WRITE: usize = 16;
/// Most bytes of acks in one write (see [`ACKS_PER_WRITE`]).
pub const ACK_BYTES_PER_WRITE: usize = 32 * 1024;

/// What woke a stream up.
enum Wake {
    Message(Result<Option<ReportRequest>, Status>),
    Flushed,
    JournalClosed,
    Shutdown,
    Fenced,
    Revoked(String),
}

/// One reporter's response stream: the resume handshake, then an ack per batch, until the
/// reporter half-closes, fails, sends nonsense, or the aggregator shuts down.
///
/// The stream *is* the stream's work: hyper's task for this HTTP/2 stream polls it, and polling
/// it reads, applies and acks. No task or channel of our own per stream (they cost 1.3 KB per
/// idle stream and a cross-task wake-up per ack). Backpressure is HTTP/2's: a reporter that does
/// not read its acks exhausts its window, hyper stops polling, and we stop reading that stream.
/// Acks go out at most [`ACKS_PER_WRITE`] per write (the stream then yields to hyper), so what
/// hyper holds for a reporter that does not read is bounded too.
/// With a journal, each ack waits for the flush that makes its batch durable, while the stream
/// keeps reading and applying the next batches (acks stay in order).
///
/// How it ends: the reporter half-closes → every ack is sent once durable, then OK. Anything
/// else ends it with the status that says why (see [`super::wire_status`]), logged with site
/// and desk, after the acks of every batch already applied (durable first): INVALID_ARGUMENT for
/// a message that does not decode or an empty request, RESOURCE_EXHAUSTED for a message over the
/// limit; UNAVAILABLE on shutdown or when the journal stops (acks not sent: resend).
fn serve_stream(
    agg: Aggregator,
    reporter: ReporterId,
    resume: ReportResponse,
    mut inbound: Streaming<ReportRequest>,
    mut guard: super::auth::StreamGuard,
) -> impl Stream<Item = Result<ReportResponse, Status>> + Send {
    async_stream::stream! {
        yield Ok(resume);
        let _open = OpenStream::new(&agg, reporter.site);
        // A child token per stream, its future pinned once: polling it touches only this
        // stream's own lock. (Polling the shared token's future from 10,000 streams serialised
        // them all on one mutex: measured 14,600 reports/s instead of hundreds of thousands.)
        let shutdown = agg.shared().shutdown.child_token();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        // Cluster mode: this node fenced off (no etcd quorum for longer than its lease).
        let replication = agg.shared().replication.clone();
        let fence = replication.as_ref().map(|r| r.fence().child_token());
        let fenced = async {
            match &fence {
                Some(f) => f.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(fenced);
        let mut durable = agg.shared().durability.as_ref().map(|d| d.subscribe(reporter.site as usize));
        // (flush target, ack, its encoded size)
        let mut pending: VecDeque<(u64, Ack, usize)> = VecDeque::new();
        let mut pending_bytes = 0usize;
        // Acks and bytes handed to hyper since this stream last returned `Pending` on purpose.
        let (mut write_acks, mut write_bytes) = (1usize, 0usize);
        let mut reading = true;
        // Set when the stream must end with an error once the applied batches are acked.
        let mut ending: Option<Status> = None;
        loop {
            // Release every ack whose flush is on disk, a bounded number per write.
            let on_disk = durable.as_mut().map_or(u64::MAX, |d| *d.borrow_and_update());
            while pending.front().is_some_and(|(target, _, _)| *target <= on_disk) {
                let Some((_, mut ack, bytes)) = pending.pop_front() else { break };
                if let Some(rep) = &replication {
                    ack.revision = rep.committed();
                }
                pending_bytes -= bytes;
                write_acks += 1;
                write_bytes += bytes;
                yield Ok(ReportResponse { kind: Some(report_response::Kind::Ack(ack)) });
                if write_acks >= ACKS_PER_WRITE || write_bytes >= ACK_BYTES_PER_WRITE {
                    (write_acks, write_bytes) = (0, 0);
                    // Returns `Pending` once: tonic hands what it encoded to hyper as one write,
                    // and hyper polls again only when it can take another.
                    tokio::task::yield_now().await;
                }
            }
            if !reading && pending.is_empty() {
                match ending.take() {
                    Some(status) => {
                        tracing::info!(
                            site = %site_id(&agg, reporter), desk = reporter.desk, code = ?status.code(),
                            message = status.message(), "ingest stream ended by a client error"
                        );
                        yield Err(status);
                    }
                    None => tracing::debug!(site = %site_id(&agg, reporter), desk = reporter.desk, "reporter closed the stream"),
                }
                break;
            }
            let room = pending.len() < MAX_PENDING_ACKS && pending_bytes < MAX_PENDING_ACK_BYTES;
            let wake = tokio::select! {
                m = inbound.message(), if reading && room => Wake::Message(m),
                changed = async { durable.as_mut().expect("guarded by if").changed().await }, if !pending.is_empty() => {
                    if changed.is_ok() { Wake::Flushed } else { Wake::JournalClosed }
                }
                () = &mut cancelled => Wake::Shutdown,
                () = &mut fenced => Wake::Fenced,
                why = &mut guard.revoked => Wake::Revoked(why),
            };
            match wake {
                Wake::Flushed => {}
                Wake::JournalClosed => {
                    tracing::info!(
                        site = %site_id(&agg, reporter), desk = reporter.desk, unacked = pending.len(),
                        "journal stopped; ending the stream"
                    );
                    yield Err(Status::unavailable(
                        "the aggregator's journal stopped: batches not acknowledged on this stream are not \
                         stored; reconnect and resend them",
                    ));
                    break;
                }
                Wake::Shutdown => {
                    tracing::debug!(site = %site_id(&agg, reporter), desk = reporter.desk, unacked = pending.len(), "shutdown");
                    yield Err(Status::unavailable("aggregator shutting down; reconnect later"));
                    break;
                }
                Wake::Fenced => {
                    tracing::warn!(site = %site_id(&agg, reporter), desk = reporter.desk, unacked = pending.len(), "node fenced off; ending the stream");
                    yield Err(Status::unavailable(
                        "this aggregator node lost its etcd cluster: batches not acknowledged are not stored; \
                         reconnect to another node and resend them",
                    ));
                    break;
                }
                Wake::Revoked(why) => {
                    tracing::warn!(site = %site_id(&agg, reporter), desk = reporter.desk, reason = %why, "credential revoked; closing the stream");
                    yield Err(Status::unauthenticated(why));
                    break;
                }
                Wake::Message(Ok(Some(ReportRequest { kind: Some(report_request::Kind::Batch(batch)) }))) => {
                    // Over the site's --ingest-rate: not applied; the stream ends once the
                    // applied batches are acked, RESOURCE_EXHAUSTED with a retry hint.
                    if let Err(status) = guard.batch() {
                        ending = Some(status);
                        reading = false;
                        continue;
                    }
                    let ack = agg.apply_batch(reporter, &batch);
                    tracing::trace!(
                        site = %site_id(&agg, reporter), desk = reporter.desk, reports = batch.reports.len(),
                        rejected = ack.rejections.len(), "batch applied"
                    );
                    let bytes = prost::Message::encoded_len(&ack);
                    pending_bytes += bytes;
                    pending.push_back((agg.durable_target().unwrap_or(0), ack, bytes));
                }
                Wake::Message(Ok(Some(ReportRequest { kind: Some(report_request::Kind::Heartbeat(_)) }))) => {
                    agg.heartbeat(reporter);
                }
                Wake::Message(Ok(Some(ReportRequest { kind: None }))) => {
                    ending = Some(Status::invalid_argument("empty ReportRequest: set `batch` or `heartbeat`"));
                    reading = false;
                }
                // Half-closed: send the remaining acks once durable, then end.
                Wake::Message(Ok(None)) => reading = false,
                // Undecodable, too large, badly framed, reset: say why once the acks are out.
                Wake::Message(Err(status)) => {
                    ending = Some(classify(status));
                    reading = false;
                }
            }
        }
    }
}

fn site_id(agg: &Aggregator, reporter: ReporterId) -> &str {
    &agg.registry().sites[reporter.site as usize].id
}
