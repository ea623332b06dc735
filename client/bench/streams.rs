//! Raw reporter streams for the load generator: channels, opening a stream with its resume
//! handshake (retrying admission refusals with jittered backoff, within a deadline), and the
//! benchmark's read token.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, transport::Channel};

use super::{BenchError, Ctx, SECRET};
use crate::{
    client::connect::{ConnectOptions, bearer, endpoint_with},
    proto::{
        metadata::{DESK_HEADER, SITE_HEADER},
        v1::{
            Ack, ReportRequest, ReportResponse, StatsRequest, TotalsRequest, ingest_client::IngestClient,
            report_response, totals_client::TotalsClient,
        },
    },
    server::Auth,
};

/// How long opening every stream of a run may take before the run fails.
pub(super) const OPEN_DEADLINE: Duration = Duration::from_secs(120);

/// How long one stream opening (connect, headers, resume) may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// `n` lazily connected channels to `url` (TLS per `opts` for https://).
pub(super) fn channels(url: &str, n: u32, opts: &ConnectOptions) -> Result<Vec<Channel>, BenchError> {
    let ep = endpoint_with(url, opts)?;
    Ok((0..n.max(1)).map(|_| ep.connect_lazy()).collect())
}

/// One raw reporter stream: the sender for requests and the inbound acks.
pub(super) struct RawStream {
    pub(super) tx: mpsc::Sender<ReportRequest>,
    pub(super) rx: tonic::Streaming<ReportResponse>,
    /// (session, seq, count) per register, as resumed.
    pub(super) resumed: Vec<(u32, u64, i64)>,
}

impl RawStream {
    /// The next message if it is an ack, within `timeout`; an error says what came instead.
    pub(super) async fn ack_within(&mut self, timeout: Duration) -> Result<Ack, String> {
        match tokio::time::timeout(timeout, self.rx.message()).await {
            Err(_) => Err(format!("no ack within {timeout:?}")),
            Ok(Err(st)) => Err(format!("stream ended: {:?} {}", st.code(), st.message())),
            Ok(Ok(None)) => Err("stream ended without an ack".into()),
            Ok(Ok(Some(ReportResponse { kind: Some(report_response::Kind::Ack(a)) }))) => Ok(a),
            Ok(Ok(Some(other))) => Err(format!("expected an ack, got {other:?}")),
        }
    }
}

/// Opens one stream for `site` / `desk` and waits for its resume handshake.
pub(super) async fn open(channel: Channel, auth: &Auth, site: &str, desk: u32) -> Result<RawStream, tonic::Status> {
    let (tx, rx) = mpsc::channel(64);
    let mut req = Request::new(ReceiverStream::new(rx));
    let md = req.metadata_mut();
    md.insert("authorization", bearer(&auth.site_token(site)).map_err(|e| tonic::Status::internal(e.to_string()))?);
    md.insert(SITE_HEADER, site.parse().map_err(|_| tonic::Status::internal("site id is not ASCII"))?);
    md.insert(DESK_HEADER, desk.into());
    let call = async {
        let mut rx = IngestClient::new(channel).report(req).await?.into_inner();
        match rx.message().await? {
            Some(ReportResponse { kind: Some(report_response::Kind::Resume(r)) }) => {
                Ok(RawStream { tx, rx, resumed: r.registers.iter().map(|x| (x.session, x.seq, x.count)).collect() })
            }
            _ => Err(tonic::Status::internal("the aggregator did not start with a resume handshake")),
        }
    };
    tokio::time::timeout(OPEN_TIMEOUT, call)
        .await
        .map_err(|_| tonic::Status::deadline_exceeded(format!("no resume handshake within {OPEN_TIMEOUT:?}")))?
}

/// Opens every stream (sites 1..=streams, desk 1, round-robin over `chans`), retrying refusals
/// and resets with jittered backoff; fails if they are not all open within [`OPEN_DEADLINE`].
/// Returns the streams and the seconds it took to admit them all.
pub(super) async fn open_all(
    ctx: &Ctx,
    chans: &[Channel],
    streams: u32,
    refusals: &AtomicU64,
) -> Result<(Vec<RawStream>, f64), BenchError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + OPEN_DEADLINE;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..streams as usize {
        let ch = chans[i % chans.len()].clone();
        let site = ctx.registry.sites[i + 1].id.clone();
        let auth = ctx.auth.clone();
        set.spawn(async move {
            let mut delay = Duration::from_millis(50);
            let mut refused = 0u64;
            loop {
                match open(ch.clone(), &auth, &site, 1).await {
                    Ok(s) => return Ok((i, s, refused)),
                    // Refused (admission) or a connection reset while thousands connect at once.
                    Err(st)
                        if matches!(
                            st.code(),
                            Code::ResourceExhausted | Code::Unavailable | Code::Unknown | Code::Cancelled
                        ) && tokio::time::Instant::now() + delay < deadline =>
                    {
                        refused += u64::from(st.code() == Code::ResourceExhausted);
                        tokio::time::sleep(delay.mul_f64(rand::random_range(0.8..1.2))).await;
                        delay = delay.mul_f64(1.6).min(Duration::from_secs(2));
                    }
                    Err(st) => return Err((site, st)),
                }
            }
        });
    }
    let mut out: Vec<Option<RawStream>> = (0..streams).map(|_| None).collect();
    let mut opened = 0;
    loop {
        let next = match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(r)) => r.map_err(|e| BenchError::Mismatch(format!("stream opener failed: {e}")))?,
            Ok(None) => break,
            Err(_) => {
                return Err(BenchError::Mismatch(format!(
                    "only {opened} of {streams} streams opened within {OPEN_DEADLINE:?}; is the aggregator \
                     overloaded or refusing (see its log with BENCH_SERVER_LOG=info)?"
                )));
            }
        };
        match next {
            Ok((i, s, refused)) => {
                refusals.fetch_add(refused, Relaxed);
                out[i] = Some(s);
                opened += 1;
            }
            Err((site, st)) => {
                return Err(BenchError::Mismatch(format!(
                    "cannot open the stream of site {site}: {:?} {}",
                    st.code(),
                    st.message()
                )));
            }
        }
    }
    Ok((out.into_iter().flatten().collect(), started.elapsed().as_secs_f64()))
}

/// A request with the benchmark's read token (minted once).
pub(super) fn authorized<T>(msg: T) -> Result<Request<T>, BenchError> {
    static READ_TOKEN: std::sync::LazyLock<Option<String>> =
        std::sync::LazyLock::new(|| Auth::new(SECRET.as_bytes()).ok().map(|a| a.read_token("bench")));
    let token = READ_TOKEN.as_deref().ok_or_else(|| BenchError::Args("benchmark secret rejected".into()))?;
    Ok(crate::client::connect::authorized(msg, token)?)
}

/// How long one unary call (stats, totals) may take before the run fails.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `fut` within [`CALL_TIMEOUT`]; `what` names the call in the error.
pub(super) async fn bounded<T, E: Into<BenchError>>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, BenchError> {
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .map_err(|_| BenchError::Mismatch(format!("{what}: no answer within {CALL_TIMEOUT:?}")))?
        .map_err(Into::into)
}

/// (reports applied, durable flushes) as counted by the aggregator.
pub(super) async fn server_stats(ch: Channel) -> Result<(u64, u64), BenchError> {
    let req = authorized(StatsRequest {})?;
    let s = bounded("Stats", TotalsClient::new(ch).stats(req)).await?.into_inner();
    Ok((s.reports_applied, s.durable_flush))
}

/// The national total of `session` (None: all sessions), within [`CALL_TIMEOUT`].
pub(super) async fn national(ch: Channel, session: Option<u32>) -> Result<i64, BenchError> {
    let req = authorized(TotalsRequest { scope: None, session, min_revision: 0 })?;
    Ok(bounded("GetTotals", TotalsClient::new(ch).get_totals(req)).await?.into_inner().count)
}
