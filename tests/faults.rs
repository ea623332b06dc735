//! Faults between reporters and the aggregator: connections cut mid-stream (through a TCP proxy),
//! reports in flight when a connection drops, duplicated batches, an unreachable aggregator, an
//! aggregator that lost its registers, and shutdown.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use headcount::{
    client::{Reporter, ReporterConfig, connect, reporter::state::MemoryStore},
    proto::v1::{RegisterState, ReportResponse, report_response},
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio_util::sync::CancellationToken;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_stream_keep_totals_exact() {
    let ts = start_small().await;
    let proxy = Proxy::start(ts.addr()).await;
    let channels =
        [connect::lazy_channel(&proxy.url()).expect("channel"), connect::lazy_channel(&proxy.url()).expect("channel")];
    let reader = ts.reader().await; // direct, never cut
    let sites: Vec<(u32, String)> = (0..12).map(|i| (i, ts.registry.sites[i as usize].id.clone())).collect();
    let reporters: Vec<Arc<Reporter>> =
        sites.iter().map(|(i, id)| Arc::new(memory_reporter(&channels[*i as usize % 2], &ts.auth, id, 1))).collect();
    for (r, (_, id)) in reporters.iter().zip(&sites) {
        wait_connected(r, &format!("{id} connects through the proxy")).await;
    }

    // Random cuts while every reporter keeps checking in (paced, bounded in count).
    let cutter = proxy.spawn_random_cuts(8, Duration::from_millis(20), Duration::from_millis(120), 99);
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for (k, r) in reporters.iter().enumerate() {
        let (r, stop) = (r.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(k as u64);
            let mut pace = tokio::time::interval(Duration::from_millis(3));
            let mut done = [0i64; 2];
            for _ in 0..5_000 {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = pace.tick() => {}
                }
                let (session, n) = (rng.random_range(1..=2u32), rng.random_range(1..=3u32));
                r.check_in(session, n).await.expect("check-in recorded");
                done[session as usize - 1] += i64::from(n);
            }
            done
        }));
    }
    let dropped = within("random cuts", cutter).await.expect("cutter task");
    stop.cancel();
    let mut truth = Truth::default();
    for ((i, _), t) in sites.iter().zip(tasks) {
        let done = within("check-in task", t).await.expect("check-in task");
        truth.add(*i, 1, done[0]);
        truth.add(*i, 2, done[1]);
    }
    assert_eq!(proxy.cuts(), 8);
    assert!(dropped > 0, "the random cuts dropped no connection at all");

    // Everybody acknowledged on a live connection (a reporter's `connected` flag may still be
    // true for a stream the last random cut killed), then one deterministic cut: every reporter
    // must open a new stream to get its next check-in acknowledged.
    for (r, (i, _)) in reporters.iter().zip(&sites) {
        r.check_in(2, 1).await.expect("check-in");
        truth.add(*i, 2, 1);
    }
    for (r, (_, id)) in reporters.iter().zip(&sites) {
        flush(r, id).await;
    }
    let before: Vec<u64> = reporters.iter().map(|r| r.status().connects).collect();
    assert!(proxy.cut_all().await > 0, "the reporters' connections were open");
    for (r, (i, _)) in reporters.iter().zip(&sites) {
        r.check_in(1, 1).await.expect("check-in");
        truth.add(*i, 1, 1);
    }
    for (r, (_, id)) in reporters.iter().zip(&sites) {
        flush(r, id).await;
    }
    assert_totals(&reader, &ts.registry, &truth).await;
    let after: Vec<u64> = reporters.iter().map(|r| r.status().connects).collect();
    assert!(before.iter().zip(&after).all(|(b, a)| a > b), "every reporter reconnected: {before:?} -> {after:?}");
    assert!(after.iter().all(|c| *c >= 2), "{after:?}");
    eprintln!(
        "random cuts dropped {dropped} connections; connects per reporter {after:?}; truth {}",
        truth.total(None)
    );
    for r in &reporters {
        assert_eq!(r.status().rejections, 0, "{:?}", r.status());
    }
    assert_eq!(ts.server.aggregator.stats().rejected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_in_flight_when_the_connection_drops_counts_once() {
    let ts = start_small().await;
    let proxy = Proxy::start(ts.addr()).await;
    let via_proxy = channel_to(&proxy.url()).await;
    let reader = ts.reader().await;
    let (si, sid) = ts.site_with_desks(1, 9);
    let mut expected = 0;
    for round in 1..=5u64 {
        let st = ts.open(&via_proxy, &sid, 1).await;
        let (stored_seq, stored) = st.resumed(1);
        assert_eq!((stored_seq, stored), (round - 1, expected), "resume after round {}", round - 1);
        // Send and cut without waiting for the ack: applied or not, never twice.
        let count = expected + 3;
        st.send(batch(vec![report(1, round, count)])).await;
        assert!(proxy.cut_all().await >= 1);
        drop(st);
        // The aggregator may or may not have applied it. The channel may first fail a call on the
        // connection it has not yet noticed is gone; a reporter retries, and so does this test.
        let token = ts.site_token(&sid);
        let mut again = eventually("reopen after the cut", DEADLINE, || async {
            open_stream(via_proxy.clone(), Some(&token), Some(&sid), Some("1")).await.map_err(|s| format!("{s:?}"))
        })
        .await;
        let (seq, now) = again.resumed(1);
        assert!(
            (seq, now) == (round - 1, expected) || (seq, now) == (round, count),
            "round {round}: resume {:?}",
            (seq, now)
        );
        // The reporter resends its latest state; a duplicate if it had landed.
        let ack = again.send_batch(vec![report(1, round, count)]).await;
        assert_eq!(ack.applied, vec![headcount::proto::v1::RegisterState { session: 1, seq: round, count }]);
        expected = count;
        assert_eq!(reader.count(site(&sid), Some(1)).await, expected);
    }
    let mut truth = Truth::default();
    truth.set(si, 1, 15);
    assert_totals(&reader, &ts.registry, &truth).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_batches_do_not_double_count() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let mut truth = Truth::default();
    let mut reporters = Vec::new();
    for i in 0..6u32 {
        let id = ts.registry.sites[i as usize].id.clone();
        let config = ReporterConfig { duplicate_probability: 1.0, ..reporter_config(&ts.auth, &id, 1) };
        let r = Reporter::spawn(ch.clone(), config, Arc::new(MemoryStore::new())).expect("spawn");
        for k in 0..20u32 {
            r.check_in(1 + k % 3, 1 + i).await.expect("check-in");
            truth.add(i, 1 + k % 3, i64::from(1 + i));
        }
        reporters.push(r);
    }
    for r in &reporters {
        flush(r, "duplicating reporter").await;
    }
    assert_totals(&reader, &ts.registry, &truth).await;
    let stats = ts.server.aggregator.stats();
    assert!(stats.unchanged > 0, "duplicates reached the aggregator: {stats:?}");
    assert_eq!(stats.rejected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_keeps_check_ins_while_the_aggregator_is_unreachable() {
    let ts = start_small().await;
    let proxy = Proxy::start(ts.addr()).await;
    let reader = ts.reader().await;
    let (si, sid) = ts.site_with_desks(2, 4);
    let r = memory_reporter(&connect::lazy_channel(&proxy.url()).expect("channel"), &ts.auth, &sid, 2);
    wait_connected(&r, "first connection").await;
    r.check_in(1, 2).await.expect("check-in");
    flush(&r, "online").await;

    proxy.set_blocked(true);
    proxy.cut_all().await;
    for _ in 0..10 {
        r.check_in(2, 1).await.expect("check-in while offline is recorded locally");
    }
    // It cannot get anything acknowledged now; it keeps trying (and says why it fails).
    let mut rx = r.watch_status();
    within("reporter notices it is offline", rx.wait_for(|s| !s.connected && s.last_error.is_some()))
        .await
        .expect("reporter running");
    assert_eq!(r.status().connects, 1);
    assert_eq!(reader.count(site(&sid), Some(2)).await, 0);

    proxy.set_blocked(false);
    flush(&r, "back online").await;
    let mut truth = Truth::default();
    truth.set(si, 1, 2);
    truth.set(si, 2, 10);
    assert_totals(&reader, &ts.registry, &truth).await;
    assert_eq!(r.status().connects, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_reconnect_on_request_does_not_double_count() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (si, sid) = ts.site_with_desks(1, 10);
    let r = memory_reporter(&ch, &ts.auth, &sid, 1);
    let mut status = r.watch_status();
    for k in 1..=5u32 {
        r.check_in(4, k).await.expect("check-in");
        // A reconnect request only drops an open stream: ask once the k-th one is open.
        within("connected", status.wait_for(|s| s.connected && s.connects >= u64::from(k))).await.expect("running");
        r.reconnect().await.expect("reconnect");
    }
    within("sixth connection", status.wait_for(|s| s.connects >= 6)).await.expect("running");
    flush(&r, "after reconnects").await;
    let mut truth = Truth::default();
    truth.set(si, 4, 15);
    assert_totals(&reader, &ts.registry, &truth).await;
    assert_eq!(r.status().rejections, 0);
}

/// The resume handshake says which registers the aggregator holds; absent ones are seq 0. A
/// reporter whose local seq is newer must resend, also after the aggregator lost its registers
/// (restart without, or from an older, snapshot). Regression test: before db5de17 `on_resume`
/// kept `settled` from the previous aggregator and never resent those sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_resends_to_an_aggregator_that_lost_its_registers() {
    let first = start_small().await;
    let proxy = Proxy::start(first.addr()).await;
    let (si, sid) = first.site_with_desks(1, 11);
    let r = memory_reporter(&connect::lazy_channel(&proxy.url()).expect("channel"), &first.auth, &sid, 1);
    r.check_in(1, 5).await.expect("check-in");
    r.check_in(2, 3).await.expect("check-in");
    flush(&r, "first aggregator").await;

    // A second aggregator (same registry, same secret, empty registers) takes over the address.
    let second = start_small().await;
    proxy.set_upstream(second.addr());
    proxy.cut_all().await;
    let mut rx = r.watch_status();
    within("reporter reconnects to the second aggregator", rx.wait_for(|s| s.connects >= 2 && s.connected))
        .await
        .expect("reporter running");
    flush(&r, "second aggregator").await;
    let reader = second.reader().await;
    let mut truth = Truth::default();
    truth.set(si, 1, 5);
    truth.set(si, 2, 3);
    assert_totals_eventually(&reader, &second.registry, &truth).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_with_unavailable() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let (_, sid) = ts.site_with_desks(1, 12);
    let mut st = ts.open(&ch, &sid, 1).await;
    st.send_batch(vec![report(1, 1, 1)]).await;
    let reader = ts.reader().await;
    let mut watch = reader.watch(national(), None, false).await.expect("watch");
    let _snapshot = within("snapshot", watch.message()).await.expect("watch").expect("snapshot");

    let TestServer { server, .. } = ts;
    let stopping = tokio::spawn(server.stop());
    match st.next().await {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(other) => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    // Watches end too (cleanly or with a status), they do not hang.
    let mut ended = false;
    for _ in 0..1_000 {
        match within("watch ends", watch.message()).await {
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => {
                ended = true;
                break;
            }
        }
    }
    assert!(ended, "watch did not end");
    within("server stops", stopping).await.expect("stop task").expect("clean stop");
    let refused = open_stream(ch.clone(), Some("t"), Some(&sid), None).await;
    assert_eq!(refused.err().map(|s| s.code()), Some(Code::Unavailable));
}

/// A reporter that sends without reading its acks is held back by HTTP/2 flow control: the
/// aggregator buffers a bounded amount for it and stops reading it, while every other reporter
/// carries on; once it reads again, nothing it sent is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reporter_that_does_not_read_its_acks_holds_back_only_itself() {
    // Far more batches than the windows hold: the aggregator's 32 KiB receive window (~1,500
    // batches) plus ~4,000 unread acks in the 64 KiB windows this client sets below (hyper's
    // client would otherwise accept 2 MiB of acks per stream). If the aggregator buffered without
    // bound, the sender would finish.
    const SENT: u64 = 20_000;
    let ts = start_small().await;
    let reader = ts.reader().await;
    let (_, slow_id) = ts.site_with_desks(1, 0);
    let (_, fast_id) = ts.site_with_desks(1, 1);
    let small_windows = tonic::transport::Endpoint::from_shared(ts.url())
        .expect("url")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connect");
    let slow = ts.open(&small_windows, &slow_id, 1).await;
    let mut fast = ts.open(&ts.channel().await, &fast_id, 1).await;
    let RawStream { tx, rx: mut slow_acks, .. } = slow;
    let sender = tokio::spawn(async move {
        for seq in 1..=SENT {
            if tx.send(batch(vec![report(1, seq, seq as i64)])).await.is_err() {
                return seq;
            }
        }
        SENT
    });
    eventually("the slow reporter's first thousand batches are applied", DEADLINE, || async {
        let n = reader.count(site(&slow_id), None).await;
        if n >= 1_000 { Ok(()) } else { Err(format!("{n} applied")) }
    })
    .await;
    for seq in 1..=100u64 {
        let ack = fast.send_batch(vec![report(2, seq, seq as i64)]).await;
        assert_eq!(ack.applied, vec![RegisterState { session: 2, seq, count: seq as i64 }]);
    }
    assert_eq!(reader.count(site(&fast_id), None).await, 100);
    assert!(!sender.is_finished(), "the aggregator kept reading a reporter that reads no acks");
    // Reading again releases it; every batch is applied and acknowledged in order.
    let mut last = 0;
    while last < SENT {
        match within("ack of the slow reporter", slow_acks.message()).await {
            Ok(Some(ReportResponse { kind: Some(report_response::Kind::Ack(ack)) })) => {
                let seq = ack.applied.first().map_or(0, |r| r.seq);
                assert_eq!(seq, last + 1, "acks in order, one per batch");
                last = seq;
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    assert_eq!(within("slow sender", sender).await.expect("sender task"), SENT);
    assert_eq!(reader.count(site(&slow_id), None).await, SENT as i64);
}
