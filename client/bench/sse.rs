//! `headcount bench sse`: the live page's fan-out under load. One aggregator process with its HTTP
//! side; saturate-style ingest runs twice for `--duration`, first without viewers, then with
//! `--viewers` concurrent Server-Sent Events connections (every site's screen showing the national
//! total). Measures server memory per viewer, freshness (probe report sent → seen by a viewer) and
//! the ingest throughput ratio with / without viewers.
//!
//! Freshness probe: the load reports in every session but the last; site 0 raises its count in
//! the last session by one per probe, and the viewers watch that session's national total, so a
//! viewer reads the probe number straight off the count. The fan-out work is the same as for any
//! session: one frame per tick, shared by every viewer.
//! Needs `ulimit -n` above viewers + streams.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    BenchArgs, BenchError, Ctx,
    latency::{Latency, histogram, summarize},
    probes::{join_thread, on_own_thread},
    process::ServerProcess,
    streams::{RawStream, channels, open, open_all},
};
use crate::client::connect::endpoint;
use crate::proto::v1::{Report, ReportBatch, ReportRequest, report_request, report_response};

/// Time between probes.
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// What `bench sse` measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SseReport {
    /// Viewers connected.
    pub viewers: u64,
    /// Server RSS growth per viewer, bytes (viewers connected, before the load).
    pub bytes_per_viewer: f64,
    /// Reports applied per second without viewers.
    pub applied_per_second_alone: f64,
    /// Reports applied per second with the viewers watching.
    pub applied_per_second_watched: f64,
    /// watched / alone.
    pub throughput_ratio: f64,
    /// Probe report sent → seen by a viewer (every viewer, every probe).
    pub freshness: Latency,
    /// Probe report acknowledged → seen by a viewer: the fan-out alone, without the ingest
    /// queueing a saturated aggregator adds before applying the probe.
    pub freshness_after_ack: Latency,
    /// The aggregator's publish tick, ms (the freshness budget is tick + 50 ms).
    pub publish_tick_ms: u64,
}

/// Runs the SSE benchmark; `args.streams` reporters, `viewers` SSE viewers.
pub(super) async fn run(ctx: &Ctx, args: &BenchArgs, viewers: u32) -> Result<SseReport, BenchError> {
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut spec = ctx.spec(args, "127.0.0.1:0")?;
    spec.extra.extend([format!("--http-listen=127.0.0.1:{http_port}"), "--publish-tick=250ms".to_owned()]);
    let server = ServerProcess::start(&spec, ctx.scratch.path())?;
    let url = server.url();
    let http: SocketAddr = ([127, 0, 0, 1], http_port).into();
    let streams = args.streams.min(ctx.registry.sites.len() as u32 - 1);
    let chans = channels(&url, args.connections.max(1), &ctx.connect)?;
    let (mut open_streams, _) = open_all(ctx, &chans, streams, &AtomicU64::new(0)).await?;
    let window = args.window.max(1) as usize;
    let rpb = args.batch_size().max(1) as usize;
    let mut sessions: Vec<u32> = ctx.registry.sessions.iter().map(|s| s.id).collect();
    // The last session is the probe's alone.
    let probe_session = match sessions.pop() {
        Some(p) if !sessions.is_empty() => p,
        _ => return Err(BenchError::Mismatch("bench sse needs a registry with at least two sessions".into())),
    };

    let (back, alone) = drive(open_streams, window, rpb, &sessions, args.duration).await;
    open_streams = back;

    // Viewers connect; memory is read once they all have their first frame.
    let rss_before = server.memory().0;
    let epoch = Instant::now();
    let probes = (args.duration.as_millis() / PROBE_EVERY.as_millis()) as usize + 16;
    // Per probe: [sent, acknowledged], µs since `epoch` (0: not yet).
    let sent: Arc<Vec<[AtomicU64; 2]>> =
        Arc::new((0..probes).map(|_| [AtomicU64::new(0), AtomicU64::new(0)]).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicU64::new(0));
    let token = ctx.auth.read_token("bench-sse");
    // Viewers run on their own thread and runtime: the load generator's busy run queue must not
    // delay what they measure.
    let watching = {
        let (sent, stop, ready) = (sent.clone(), stop.clone(), ready.clone());
        on_own_thread(move || async move {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..viewers {
                let (sent, stop, ready, token) = (sent.clone(), stop.clone(), ready.clone(), token.clone());
                set.spawn(async move { viewer(http, &token, probe_session, sent, epoch, stop, ready).await });
            }
            let (mut from_send, mut from_ack) = (histogram(), histogram());
            while let Some(r) = set.join_next().await {
                let (a, b) = r.unwrap_or_default();
                for v in a {
                    let _ = from_send.record(u64::from(v).max(1));
                }
                for v in b {
                    let _ = from_ack.record(u64::from(v).max(1));
                }
            }
            (from_send, from_ack)
        })?
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.load(Relaxed) < u64::from(viewers) {
        if Instant::now() > deadline {
            return Err(BenchError::Mismatch(format!("only {} of {viewers} viewers connected", ready.load(Relaxed))));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bytes_per_viewer = server.memory().0.saturating_sub(rss_before) as f64 / f64::from(viewers.max(1));

    // Load with viewers, plus the freshness probe on site 0.
    // The probe has its own connection and thread, so it does not queue behind the load.
    let probing = {
        let (sent, auth, site, duration, url) =
            (sent.clone(), ctx.auth.clone(), ctx.registry.sites[0].id.clone(), args.duration, url.clone());
        on_own_thread(move || async move {
            let ch = endpoint(&url).map_err(|e| e.to_string())?.connect().await.map_err(|e| e.to_string())?;
            let probe = open(ch, &auth, &site, 1).await.map_err(|e| e.to_string())?;
            run_probe(probe, probe_session, sent, epoch, duration).await;
            Ok::<(), String>(())
        })?
    };
    let (_, watched) = drive(open_streams, window, rpb, &sessions, args.duration).await;
    tokio::task::spawn_blocking(move || join_thread(probing))
        .await
        .map_err(|e| BenchError::Mismatch(format!("probe thread: {e}")))??
        .map_err(|e| BenchError::Mismatch(format!("freshness probe: {e}")))?;
    stop.store(true, Relaxed);
    let (h, h_ack) = tokio::task::spawn_blocking(move || join_thread(watching))
        .await
        .map_err(|e| BenchError::Mismatch(format!("viewer thread: {e}")))??;
    let secs = args.duration.as_secs_f64().max(1e-9);
    let (alone, watched) = (alone as f64 / secs, watched as f64 / secs);
    Ok(SseReport {
        viewers: u64::from(viewers),
        bytes_per_viewer,
        applied_per_second_alone: alone,
        applied_per_second_watched: watched,
        throughput_ratio: if alone > 0.0 { watched / alone } else { 0.0 },
        freshness: summarize(&h, 0),
        freshness_after_ack: summarize(&h_ack, 0),
        publish_tick_ms: 250,
    })
}

/// Saturate-style load for `duration`: every stream keeps `window` batches in flight. Returns
/// the streams (for the next phase) and the reports acknowledged as applied.
async fn drive(
    streams: Vec<RawStream>,
    window: usize,
    rpb: usize,
    sessions: &[u32],
    duration: Duration,
) -> (Vec<RawStream>, u64) {
    let until = tokio::time::Instant::now() + duration;
    let mut set = tokio::task::JoinSet::new();
    for mut s in streams {
        let sessions = sessions.to_vec();
        set.spawn(async move {
            let mut seq = s.resumed.iter().map(|r| r.1).max().unwrap_or(0);
            let (mut in_flight, mut applied) = (0usize, 0u64);
            loop {
                let sending = tokio::time::Instant::now() < until;
                if sending && in_flight < window {
                    let reports = (0..rpb)
                        .map(|j| {
                            seq += 1;
                            Report {
                                session: sessions[j % sessions.len()],
                                seq,
                                count: seq as i64,
                                reason: String::new(),
                            }
                        })
                        .collect();
                    let msg = ReportRequest { kind: Some(report_request::Kind::Batch(ReportBatch { reports })) };
                    if s.tx.send(msg).await.is_err() {
                        break;
                    }
                    in_flight += 1;
                    continue;
                }
                if in_flight == 0 {
                    break;
                }
                match s.rx.message().await {
                    Ok(Some(crate::proto::v1::ReportResponse { kind: Some(report_response::Kind::Ack(a)) })) => {
                        in_flight -= 1;
                        applied += (rpb as u64).saturating_sub(a.rejections.len() as u64);
                    }
                    _ => break,
                }
            }
            s.resumed = s.resumed.iter().map(|&(k, _, c)| (k, seq, c)).collect();
            if s.resumed.is_empty() {
                s.resumed.push((sessions[0], seq, 0));
            }
            (s, applied)
        });
    }
    let (mut back, mut total) = (Vec::new(), 0);
    while let Some(Ok((s, n))) = set.join_next().await {
        back.push(s);
        total += n;
    }
    (back, total)
}

/// Every `PROBE_EVERY`: notes the time, then raises site 0's count in `session` by one.
async fn run_probe(mut s: RawStream, session: u32, sent: Arc<Vec<[AtomicU64; 2]>>, epoch: Instant, duration: Duration) {
    let base = s.resumed.iter().map(|r| r.1).max().unwrap_or(0);
    let started = Instant::now();
    for k in 1..sent.len() {
        if started.elapsed() >= duration {
            break;
        }
        sent[k][0].store(epoch.elapsed().as_micros() as u64, Relaxed);
        let report = Report { session, seq: base + k as u64, count: k as i64, reason: String::new() };
        let msg = ReportRequest { kind: Some(report_request::Kind::Batch(ReportBatch { reports: vec![report] })) };
        if s.tx.send(msg).await.is_err() || s.rx.message().await.is_err() {
            break;
        }
        sent[k][1].store(epoch.elapsed().as_micros() as u64, Relaxed);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// One SSE viewer over raw HTTP/1.1 (a few KB each, like a wall screen): returns the freshness
/// of every probe it saw, µs.
async fn viewer(
    http: SocketAddr,
    token: &str,
    session: u32,
    sent: Arc<Vec<[AtomicU64; 2]>>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicU64>,
) -> (Vec<u32>, Vec<u32>) {
    let (mut seen, mut after_ack) = (Vec::new(), Vec::new());
    let mut sock = None;
    for _ in 0..100 {
        match tokio::net::TcpStream::connect(http).await {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let Some(mut sock) = sock else { return (seen, after_ack) };
    let req = format!(
        "GET /api/live?session={session}&provinces=false HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    );
    if sock.write_all(req.as_bytes()).await.is_err() {
        return (seen, after_ack);
    }
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    let (mut last_k, mut first) = (0usize, true);
    while !stop.load(Relaxed) {
        let n = match tokio::time::timeout(Duration::from_millis(500), sock.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => continue,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            if let Some(count) = national_count(&buf[..end]) {
                if first {
                    first = false;
                    ready.fetch_add(1, Relaxed);
                }
                let k = count.max(0) as usize;
                let now = epoch.elapsed().as_micros() as u64;
                for j in (last_k + 1)..=k.min(sent.len() - 1) {
                    let micros = |t: u64| now.saturating_sub(t).min(u64::from(u32::MAX)) as u32;
                    let (t_sent, t_ack) = (sent[j][0].load(Relaxed), sent[j][1].load(Relaxed));
                    if t_sent > 0 {
                        seen.push(micros(t_sent));
                    }
                    // The frame can beat the ack to the probe; then the fan-out took no time.
                    if t_ack > 0 {
                        after_ack.push(micros(t_ack));
                    } else if t_sent > 0 {
                        after_ack.push(0);
                    }
                }
                last_k = last_k.max(k);
            }
            buf.drain(..end + 2);
        }
    }
    (seen, after_ack)
}

/// The national count in an SSE frame (`"national":{…"count":N`).
fn national_count(frame: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(frame).ok()?;
    let national = &s[s.find("\"national\":")?..];
    let after = &national[national.find("\"count\":")? + 8..];
    let digits: String = after.chars().take_while(|c| c.is_ascii_digit() || *c == '-').collect();
    digits.parse().ok()
}

/// Prints the SSE figures.
pub fn print(r: &SseReport, out: &mut impl std::io::Write) {
    let _ = writeln!(
        out,
        "SSE viewers: {}, {:.0} B server memory per viewer; freshness (sent → seen) p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({} samples; acked → seen p99 {:.1} ms; tick {} ms); ingest {:.0}/s alone, {:.0}/s watched (ratio {:.2})",
        r.viewers,
        r.bytes_per_viewer,
        r.freshness.p50_ms,
        r.freshness.p99_ms,
        r.freshness.max_ms,
        r.freshness.samples,
        r.freshness_after_ack.p99_ms,
        r.publish_tick_ms,
        r.applied_per_second_alone,
        r.applied_per_second_watched,
        r.throughput_ratio
    );
}
