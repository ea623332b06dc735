//! The Ingest gRPC service: authenticates a reporter from its stream metadata, sends the resume
//! handshake, then answers each batch with an ack until the reporter or the aggregator ends.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap};
use tracing::Instrument;

use super::{
    aggregator::{Aggregator, ReporterId},
    auth::{Auth, Grant},
    error::Error,
};
use crate::proto::v1::{ReportRequest, ReportResponse, ingest_server::Ingest, report_request, report_response};

/// Metadata key naming the site a stream reports for.
pub const SITE_HEADER: &str = "x-headcount-site";
/// Metadata key naming the desk a stream reports for (default 1).
pub const DESK_HEADER: &str = "x-headcount-desk";

/// Acks buffered per stream before the aggregator stops reading that stream (backpressure on a
/// reporter that does not read its acks; never on anyone else).
const ACK_BUFFER: usize = 8;

/// The Ingest service.
#[derive(Clone)]
pub struct IngestService {
    agg: Aggregator,
    auth: Auth,
}

impl IngestService {
    /// A service over an aggregator.
    pub fn new(agg: Aggregator, auth: Auth) -> Self {
        Self { agg, auth }
    }

    /// Who is this stream? Checks token, site and desk metadata.
    fn identify(&self, md: &MetadataMap) -> Result<ReporterId, Error> {
        let grant = self.auth.verify_metadata(md)?;
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
            Grant::Read => return Err(Error::PermissionDenied("a read token cannot report".into())),
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

#[tonic::async_trait]
impl Ingest for IngestService {
    type ReportStream = ReceiverStream<Result<ReportResponse, Status>>;

    async fn report(&self, request: Request<Streaming<ReportRequest>>) -> Result<Response<Self::ReportStream>, Status> {
        let reporter = self.identify(request.metadata()).inspect_err(|e| {
            tracing::info!(error = %e, peer = ?request.remote_addr(), "ingest stream refused");
        })?;
        let site_id = self.agg.registry().sites[reporter.site as usize].id.clone();
        let span = tracing::info_span!("ingest", site = %site_id, desk = reporter.desk);
        let (tx, rx) = mpsc::channel(ACK_BUFFER);
        let resume = self.agg.resume(reporter);
        tracing::debug!(parent: &span, registers = resume.registers.len(), "stream opened, resume sent");
        tx.try_send(Ok(ReportResponse { kind: Some(report_response::Kind::Resume(resume)) }))
            .map_err(|_| Status::internal("fresh ack channel is full"))?;
        let inbound = request.into_inner();
        tokio::spawn(serve_stream(self.agg.clone(), reporter, inbound, tx).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Reads one reporter's stream until it ends, the reporter stops reading acks, or shutdown.
async fn serve_stream(
    agg: Aggregator,
    reporter: ReporterId,
    mut inbound: Streaming<ReportRequest>,
    tx: mpsc::Sender<Result<ReportResponse, Status>>,
) {
    let shutdown = agg.shared().shutdown.clone();
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            () = shutdown.cancelled() => {
                let _ = tx.try_send(Err(Status::unavailable("aggregator shutting down; reconnect later")));
                break;
            }
        };
        match msg {
            Ok(Some(ReportRequest { kind: Some(report_request::Kind::Batch(batch)) })) => {
                let ack = agg.apply_batch(reporter, &batch);
                tracing::trace!(reports = batch.reports.len(), rejected = ack.rejections.len(), "batch applied");
                if tx.send(Ok(ReportResponse { kind: Some(report_response::Kind::Ack(ack)) })).await.is_err() {
                    break;
                }
            }
            Ok(Some(ReportRequest { kind: Some(report_request::Kind::Heartbeat(_)) })) => agg.heartbeat(reporter),
            Ok(Some(ReportRequest { kind: None })) => {
                let _ = tx.send(Err(Status::invalid_argument("empty ReportRequest: set `batch` or `heartbeat`"))).await;
                break;
            }
            Ok(None) => {
                tracing::debug!("reporter closed the stream");
                break;
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), message = status.message(), "stream ended");
                break;
            }
        }
    }
}
