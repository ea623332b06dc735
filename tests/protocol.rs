//! The protocol's promises, each through the real path: orders by id, Watch ending UNAVAILABLE on
//! shutdown (in process and on SIGTERM of the real binary), the bound on what a reporter that
//! never reads its acks can make the aggregator hold (raw HTTP/2 with a 64-byte window), and the
//! message-size limit on both sides of its boundary.

mod common;

use std::{path::Path, process::Stdio};

use bytes::{Buf, BytesMut};
use common::{raw::*, *};
use headcount::{
    proto::v1::{BreakdownOrder, Report, ReportBatch, ReportRequest, ReportResponse, report_request, report_response},
    server::{
        Transport,
        ingest::{ACKS_PER_WRITE, MAX_PENDING_ACKS},
        registry,
    },
};
use prost::Message;
use tonic::Code;

/// A registry whose file order is not its id order: provinces 01, 79, 48; sites HN004, HN002,
/// HCM001, DN001.
fn shuffled_registry(dir: &Path) -> registry::Registry {
    let sites = dir.join("sites.csv");
    let sessions = dir.join("sessions.csv");
    std::fs::write(
        &sites,
        "site_id,site_name,province_code,province_name,commune_id,commune_name,registered,desks\n\
         HN004,Điểm HN004,01,Hà Nội,01-002,Phường B,100,1\n\
         HN002,Điểm HN002,01,Hà Nội,01-001,Phường A,100,1\n\
         HCM001,Điểm HCM001,79,Hồ Chí Minh,79-001,Phường C,100,1\n\
         DN001,Điểm DN001,48,Đà Nẵng,48-001,Phường D,100,1\n",
    )
    .expect("write sites.csv");
    std::fs::write(&sessions, "session_id,name\n1,Day 1 morning\n").expect("write sessions.csv");
    registry::csv::load(&sites, &sessions).expect("load the shuffled registry")
}

fn ids(children: &[headcount::proto::v1::ScopeTotals]) -> Vec<String> {
    children.iter().map(|c| c.scope.as_ref().map(|s| s.id.clone()).unwrap_or_default()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakdown_and_silent_sites_are_sorted_by_id_not_by_registry_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = shuffled_registry(dir.path());
    let provinces: Vec<&str> = reg.provinces.iter().map(|p| p.code.as_str()).collect();
    assert_eq!(provinces, ["01", "79", "48"], "the file order differs from the id order");
    let ts = start_server(reg, test_config()).await;
    let reader = ts.reader().await;
    let b = reader.breakdown(national(), None).await;
    assert_eq!(ids(&b.children), ["01", "48", "79"]);
    let b = reader.breakdown(province("01"), None).await;
    assert_eq!(ids(&b.children), ["01-001", "01-002"]);
    // Ties of the count order are broken by id.
    let b = reader.try_breakdown(national(), None, BreakdownOrder::CountDesc, 0).await.expect("breakdown");
    assert_eq!(ids(&b.children), ["01", "48", "79"]);
    ts.server.aggregator.sweep_now();
    let silent: Vec<String> = reader.silent_sites(None, 0).await.sites.into_iter().map(|s| s.site_id).collect();
    assert_eq!(silent, ["DN001", "HCM001", "HN002", "HN004"]);
    let ch = ts.channel().await;
    let mut st = ts.open(&ch, "HCM001", 1).await;
    st.send_batch(vec![report(1, 1, 5)]).await;
    let b = reader.try_breakdown(national(), None, BreakdownOrder::CountDesc, 0).await.expect("breakdown");
    assert_eq!(ids(&b.children), ["79", "01", "48"]);
    ts.server.aggregator.sweep_now();
    let silent = reader.silent_sites(None, 2).await;
    let listed: Vec<String> = silent.sites.into_iter().map(|s| s.site_id).collect();
    assert_eq!((listed, silent.total_silent), (vec!["DN001".to_owned(), "HN002".to_owned()], 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_with_unavailable_on_shutdown() {
    let ts = start_small().await;
    let reader = ts.reader().await;
    let mut watch = reader.watch(national(), None, true).await.expect("watch");
    let first = within("snapshot", watch.message()).await.expect("snapshot").expect("a first update");
    assert_eq!(first.sequence, 0);
    let stopping = tokio::spawn(ts.server.stop());
    let end = loop {
        match within("watch end", watch.message()).await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(other) => panic!("watch ended without UNAVAILABLE: {other:?}"),
    }
    within("server stops", stopping).await.expect("stop task").expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_watches_with_unavailable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = small_registry();
    let (sites, sessions) = (dir.path().join("sites.csv"), dir.path().join("sessions.csv"));
    let files =
        (std::fs::File::create(&sites).expect("sites.csv"), std::fs::File::create(&sessions).expect("sessions.csv"));
    registry::csv::write(&reg, files.0, files.1).expect("write registry");
    let addr_file = dir.path().join("addr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_headcount-server"))
        .args(["--listen", "127.0.0.1:0", "--in-memory", "--grace", "5s", "--publish-tick", "20ms"])
        .arg("--sites")
        .arg(&sites)
        .arg("--sessions")
        .arg(&sessions)
        .arg("--addr-file")
        .arg(&addr_file)
        .env("HEADCOUNT_AUTH_SECRET", std::str::from_utf8(SECRET).expect("ASCII secret"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn headcount-server");
    let addr: std::net::SocketAddr = eventually("the server writes its address", DEADLINE, || async {
        std::fs::read_to_string(&addr_file).ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| "not yet".to_owned())
    })
    .await;
    let auth = headcount::server::Auth::new(SECRET).expect("secret");
    let reader = Reader::new(channel_to(&format!("http://{addr}")).await, Some(auth.read_token("sigterm")));
    let mut watch = reader.watch(national(), None, false).await.expect("watch");
    within("snapshot", watch.message()).await.expect("snapshot").expect("a first update");
    let term = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
    assert!(term.success());
    let end = loop {
        match within("watch end", watch.message()).await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait for the server");
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(other) => panic!("watch ended without UNAVAILABLE on SIGTERM: {other:?}"),
    }
    assert!(exit.success(), "the server exits cleanly on SIGTERM: {exit:?}");
}

fn batch_bytes(seq: u64) -> Vec<u8> {
    let reports = vec![Report { session: 1, seq, count: seq as i64, reason: String::new() }];
    ReportRequest { kind: Some(report_request::Kind::Batch(ReportBatch { reports })) }.encode_to_vec()
}

/// A reporter that sends thousands of batches and never reads, over a 64-byte receive window:
/// the aggregator applies at most `MAX_PENDING_ACKS + 2 × ACKS_PER_WRITE` (64) batches whose acks
/// it has not sent (plus the few that fit the window), at every moment; once the reporter reads,
/// every batch is applied and acknowledged, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reporter_that_never_reads_gets_at_most_64_batches_applied() {
    never_reading_reporter(&start_small().await).await;
}

/// The same with a journal: acks also wait for their commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reporter_that_never_reads_gets_at_most_64_batches_applied_with_a_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ts = start_journaled(dir.path()).await;
    never_reading_reporter(&ts).await;
}

/// An aggregator journaling to `dir`, on an ephemeral port.
async fn start_journaled(dir: &Path) -> TestServer {
    let registry = small_registry();
    let durability = headcount::server::durability::DurabilityConfig::new(dir);
    let (agg, _) = headcount::server::Aggregator::open(registry.clone(), test_config(), durability)
        .expect("open the data directory");
    let auth = headcount::server::Auth::new(SECRET).expect("secret");
    let transport = Transport { grace: std::time::Duration::from_millis(500), ..Transport::default() };
    let server =
        headcount::server::RunningServer::start("127.0.0.1:0".parse().expect("address"), agg, auth.clone(), transport)
            .await
            .expect("bind 127.0.0.1");
    TestServer { server, auth, registry }
}

/// A stream that ends on garbage first acknowledges what it applied (durably), then says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ending_on_garbage_acks_its_applied_batches_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ts = start_journaled(dir.path()).await;
    let (_, sid) = ts.site_with_desks(1, 3);
    let token = format!("Bearer {}", ts.site_token(&sid));
    let conn = RawConn::connect(ts.addr(), 1 << 20, 1 << 22).await;
    let headers: [(&str, &[u8]); 2] = [("authorization", token.as_bytes()), ("x-headcount-site", sid.as_bytes())];
    let mut call = conn.call("/headcount.v1.Ingest/Report", &headers).await;
    let body: Vec<u8> = (1..=5).flat_map(|seq| frame(&batch_bytes(seq))).chain(frame(&[0x0a, 0x05, 0x01])).collect();
    call.send(body.into(), false);
    let out = call.finish().await;
    assert_eq!(out.code, Code::InvalidArgument, "{}", out.message);
    let acked: Vec<u64> = out.messages[1..]
        .iter()
        .map(|m| match ReportResponse::decode(m.clone()).expect("response").kind {
            Some(report_response::Kind::Ack(a)) => a.applied.first().map_or(0, |r| r.seq),
            other => panic!("expected an ack, got {other:?}"),
        })
        .collect();
    assert_eq!(acked, [1, 2, 3, 4, 5], "every applied batch acknowledged before the status");
    assert_eq!(ts.reader().await.count(site(&sid), Some(1)).await, 5);
}

async fn never_reading_reporter(ts: &TestServer) {
    const SENT: u64 = 3_000; // ~50 KB: more than the aggregator's 32 KiB window
    let bound = (MAX_PENDING_ACKS + 2 * ACKS_PER_WRITE) as u64;
    assert_eq!(bound, 64, "the README's figure");
    let agg = ts.server.aggregator.clone();
    let (_, sid) = ts.site_with_desks(1, 0);
    let token = format!("Bearer {}", ts.site_token(&sid));
    let conn = RawConn::connect(ts.addr(), 64, 1 << 20).await;
    let headers: [(&str, &[u8]); 3] =
        [("authorization", token.as_bytes()), ("x-headcount-site", sid.as_bytes()), ("x-headcount-desk", b"1")];
    let mut call = conn.call("/headcount.v1.Ingest/Report", &headers).await;
    let body: Vec<u8> = (1..=SENT).flat_map(|seq| frame(&batch_bytes(seq))).collect();
    assert!(call.send(body.into(), false));
    // At most 64-byte / 7-byte frames of acks fit the reporter's window (the resume alone is larger).
    let limit = bound + 64 / 7;
    let mut last = (0, 0);
    eventually("the aggregator stops reading the reporter", DEADLINE, || {
        let applied = agg.stats().batches;
        assert!(applied <= limit, "{applied} batches applied for a reporter that reads nothing (bound {limit})");
        last = if applied == last.0 { (applied, last.1 + 1) } else { (applied, 0) };
        let stable = last;
        async move { if stable.0 > 0 && stable.1 >= 30 { Ok(()) } else { Err(format!("{stable:?}")) } }
    })
    .await;
    assert!(agg.stats().batches <= limit);

    // Reading releases everything: every batch applied and acknowledged once, in order.
    let response = within("response headers", call.response).await.expect("response");
    let mut rx = response.into_body();
    let mut buf = BytesMut::new();
    let (mut acked, mut resumed) = (0u64, false);
    while acked < SENT {
        let chunk = within("acks", rx.data()).await.expect("the stream stays open").expect("data");
        let _ = rx.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let msg = ReportResponse::decode(buf.split_to(len).freeze()).expect("a ReportResponse");
            match msg.kind {
                Some(report_response::Kind::Resume(_)) if !resumed => resumed = true,
                Some(report_response::Kind::Ack(a)) => {
                    let seq = a.applied.first().map_or(0, |r| r.seq);
                    assert_eq!(seq, acked + 1, "acks in order, one per batch");
                    acked = seq;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(ts.reader().await.count(site(&sid), Some(1)).await, SENT as i64);
}

/// A `ReportRequest` of exactly `size` bytes: one report whose reason fills it.
fn request_of_size(size: usize) -> Vec<u8> {
    let mut reason = size.saturating_sub(20);
    loop {
        let msg = batch_with_reason(reason);
        match msg.len().cmp(&size) {
            std::cmp::Ordering::Equal => return msg,
            std::cmp::Ordering::Greater => reason -= 1,
            std::cmp::Ordering::Less => reason += 1,
        }
    }
}

fn batch_with_reason(reason: usize) -> Vec<u8> {
    let reports = vec![Report { session: 1, seq: 1, count: 1, reason: "r".repeat(reason) }];
    ReportRequest { kind: Some(report_request::Kind::Batch(ReportBatch { reports })) }.encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_limit_holds_on_both_sides_of_its_boundary_and_fits_a_full_batch() {
    let ts = start_small().await;
    let max = Transport::default().max_message_bytes;
    let (_, sid) = ts.site_with_desks(1, 5);
    let token = format!("Bearer {}", ts.site_token(&sid));
    let headers: [(&str, &[u8]); 2] = [("authorization", token.as_bytes()), ("x-headcount-site", sid.as_bytes())];
    let conn = RawConn::connect(ts.addr(), 1 << 20, 1 << 22).await;
    for (size, want) in [(max, Code::Ok), (max + 1, Code::ResourceExhausted)] {
        let mut call = conn.call("/headcount.v1.Ingest/Report", &headers).await;
        let msg = request_of_size(size);
        assert_eq!(msg.len(), size);
        call.send(frame(&msg), true);
        let out = call.finish().await;
        assert_eq!(out.code, want, "a {size}-byte message: {}", out.message);
        if want == Code::Ok {
            // Decoded and answered: its over-long reason is refused report by report.
            let ack = ReportResponse::decode(out.messages[1].clone()).expect("ack");
            let Some(report_response::Kind::Ack(ack)) = ack.kind else { panic!("expected an ack") };
            assert_eq!(ack.rejections.iter().map(|r| r.code).collect::<Vec<_>>(), [Code::InvalidArgument as i32]);
        } else {
            assert!(out.message.contains("--max-message-bytes"), "{}", out.message);
        }
    }
    // The documented batch: 1,024 reports with 256-byte reasons, through the real client.
    let config = test_config();
    let reports: Vec<Report> = (1..=config.max_batch as u64)
        .map(|seq| correction(1, seq, seq as i64, &"é".repeat(config.max_reason / 2)))
        .collect();
    let size = ReportRequest { kind: Some(report_request::Kind::Batch(ReportBatch { reports: reports.clone() })) }
        .encoded_len();
    assert!(size > 256 * 1024 && size <= max, "{size} bytes");
    let mut st = ts.open(&ts.channel().await, &sid, 1).await;
    let ack = st.send_batch(reports).await;
    assert!(ack.rejections.is_empty(), "{:?}", ack.rejections.first());
    assert_eq!(ack.applied.first().map(|r| r.seq), Some(config.max_batch as u64));
}
