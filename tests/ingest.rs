//! Ingest over raw gRPC streams: the counting rule (duplicates, reorders, stale reports,
//! conflicts), per-report validation, stream-level refusals, the resume handshake, corrections and
//! the health service.

mod common;

use common::*;
use headcount::{
    proto::v1::{Heartbeat, RegisterState, Report, ReportRequest, report_request},
    server::Auth,
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

fn reg(session: u32, seq: u64, count: i64) -> RegisterState {
    RegisterState { session, seq, count }
}

/// Counts of one site: (site, session 1, national).
async fn counts(reader: &Reader, site_id: &str, session: u32) -> (i64, i64, i64) {
    (
        reader.count(site(site_id), None).await,
        reader.count(site(site_id), Some(session)).await,
        reader.count(national(), None).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_report_changes_nothing_and_ack_returns_stored_state() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 0);
    let mut st = ts.open(&ch, &sid, 1).await;
    assert_eq!(st.resume.site_id, sid);
    assert_eq!(st.resume.desk, 1);
    assert!(st.resume.registers.is_empty(), "fresh desk resumes with no registers: {:?}", st.resume);
    assert_eq!(st.resume.sessions, SESSIONS.to_vec());

    let ack = st.send_batch(vec![report(1, 1, 5)]).await;
    assert_eq!(ack.applied, vec![reg(1, 1, 5)]);
    assert!(ack.rejections.is_empty());
    assert_eq!(counts(&reader, &sid, 1).await, (5, 5, 5));

    for _ in 0..3 {
        let ack = st.send_batch(vec![report(1, 1, 5)]).await;
        assert_eq!(ack.applied, vec![reg(1, 1, 5)], "a duplicate is acknowledged with the stored state");
        assert!(ack.rejections.is_empty(), "a duplicate is not an error: {ack:?}");
        assert_eq!(counts(&reader, &sid, 1).await, (5, 5, 5));
    }

    // A duplicate inside one batch: applied once.
    let ack = st.send_batch(vec![report(1, 2, 7), report(1, 2, 7)]).await;
    assert_eq!(ack.applied, vec![reg(1, 2, 7)]);
    assert_eq!(counts(&reader, &sid, 1).await, (7, 7, 7));

    let stats = ts.server.aggregator.stats();
    assert_eq!((stats.applied, stats.unchanged, stats.rejected, stats.batches), (2, 4, 0, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_report_is_ignored() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 1);
    let mut st = ts.open(&ch, &sid, 1).await;

    // seq 3 arrives before seq 2 (separate batches).
    assert_eq!(st.send_batch(vec![report(2, 3, 9)]).await.applied, vec![reg(2, 3, 9)]);
    let ack = st.send_batch(vec![report(2, 2, 6)]).await;
    assert_eq!(ack.applied, vec![reg(2, 3, 9)], "the older seq is ignored; the ack shows the stored state");
    assert!(ack.rejections.is_empty());
    assert_eq!(counts(&reader, &sid, 2).await, (9, 9, 9));

    // Reordered within one batch.
    let ack = st.send_batch(vec![report(2, 5, 12), report(2, 4, 11)]).await;
    assert_eq!(ack.applied, vec![reg(2, 5, 12)]);
    assert_eq!(counts(&reader, &sid, 2).await, (12, 12, 12));
    assert_eq!(reader.count(site(&sid), Some(1)).await, 0, "other sessions untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_report_changes_nothing() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 2);
    let mut st = ts.open(&ch, &sid, 1).await;
    for (seq, count) in [(1, 2), (2, 4), (3, 6)] {
        assert_eq!(st.send_batch(vec![report(1, seq, count)]).await.applied, vec![reg(1, seq, count)]);
    }
    // Stale resends, with their own count and with a different one: both change nothing.
    for stale in [report(1, 1, 2), report(1, 2, 4), report(1, 1, 100), report(1, 2, 0)] {
        let ack = st.send_batch(vec![stale.clone()]).await;
        assert_eq!(ack.applied, vec![reg(1, 3, 6)], "stale {stale:?}");
        assert!(ack.rejections.is_empty(), "stale {stale:?}: {ack:?}");
        assert_eq!(counts(&reader, &sid, 1).await, (6, 6, 6), "stale {stale:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seq_different_count_is_aborted() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 3);
    let mut st = ts.open(&ch, &sid, 1).await;
    st.send_batch(vec![report(3, 3, 6)]).await;

    let ack = st.send_batch(vec![report(3, 3, 7)]).await;
    assert!(ack.applied.is_empty(), "a conflicting report is not applied: {ack:?}");
    assert_eq!(ack.rejections.len(), 1, "{ack:?}");
    let r = &ack.rejections[0];
    assert_eq!((r.session, r.seq, r.code), (3, 3, Code::Aborted as i32), "{r:?}");
    assert_eq!(r.current, Some(reg(3, 3, 6)), "the rejection carries the stored register");
    assert_eq!(counts(&reader, &sid, 3).await, (6, 6, 6));

    // The register still accepts a newer seq afterwards.
    assert_eq!(st.send_batch(vec![report(3, 4, 7)]).await.applied, vec![reg(3, 4, 7)]);
    assert_eq!(counts(&reader, &sid, 3).await, (7, 7, 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reports_are_rejected_with_their_codes_and_change_nothing() {
    let ts = start_small().await;
    let max = test_config().max_count;
    let max_reason = test_config().max_reason;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 4);
    let mut st = ts.open(&ch, &sid, 1).await;
    st.send_batch(vec![report(1, 2, 20)]).await;

    let long = "x".repeat(max_reason + 1);
    let cases: Vec<(&str, Report, Code)> = vec![
        ("unknown session", report(99, 5, 1), Code::NotFound),
        ("seq 0", report(1, 0, 21), Code::InvalidArgument),
        ("negative count", report(1, 5, -1), Code::InvalidArgument),
        ("count above the ceiling", report(1, 5, max + 1), Code::OutOfRange),
        ("reason too long", correction(1, 5, 3, &long), Code::InvalidArgument),
    ];
    for (what, rep, code) in cases {
        let ack = st.send_batch(vec![rep.clone()]).await;
        assert!(ack.applied.is_empty(), "{what}: nothing applied: {ack:?}");
        assert_eq!(ack.rejections.len(), 1, "{what}: {ack:?}");
        let r = &ack.rejections[0];
        assert_eq!((r.session, r.seq, Code::from_i32(r.code)), (rep.session, rep.seq, code), "{what}: {}", r.message);
        assert!(!r.message.is_empty(), "{what}: a rejection explains itself");
        let want_current = (rep.session == 1).then(|| reg(1, 2, 20));
        assert_eq!(r.current, want_current, "{what}");
        assert_eq!(counts(&reader, &sid, 1).await, (20, 20, 20), "{what}: totals unchanged");
    }
    let stats = ts.server.aggregator.stats();
    assert_eq!((stats.applied, stats.rejected), (1, 5));

    // The boundaries themselves are accepted: count == ceiling, reason of exactly max bytes.
    assert_eq!(st.send_batch(vec![report(2, 1, max)]).await.applied, vec![reg(2, 1, max)]);
    let exact = "é".repeat(max_reason / 2);
    assert_eq!(exact.len(), max_reason);
    let ack = st.send_batch(vec![correction(1, 3, 19, &exact)]).await;
    assert_eq!(ack.applied, vec![reg(1, 3, 19)], "{ack:?}");
    assert_eq!(reader.count(site(&sid), None).await, 19 + max);
    assert_eq!(reader.count(national(), Some(2)).await, max);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_of_one_batch_are_applied_or_rejected_one_by_one() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 5);
    let mut st = ts.open(&ch, &sid, 1).await;
    let ack = st.send_batch(vec![report(1, 2, 8), report(77, 1, 1), report(2, 1, 3), report(1, 3, -4)]).await;
    assert_eq!(ack.applied, vec![reg(1, 2, 8), reg(2, 1, 3)]);
    let codes: Vec<(u32, i32)> = ack.rejections.iter().map(|r| (r.session, r.code)).collect();
    assert_eq!(codes, vec![(77, Code::NotFound as i32), (1, Code::InvalidArgument as i32)]);
    assert_eq!(reader.count(site(&sid), None).await, 11);
    assert_eq!(reader.count(national(), Some(1)).await, 8);
    assert_eq!(reader.count(national(), Some(2)).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batch_is_rejected_whole() {
    let ts = start_small().await;
    let max_batch = test_config().max_batch;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 6);
    let mut st = ts.open(&ch, &sid, 1).await;

    let too_many: Vec<Report> = (1..=max_batch as u64 + 1).map(|seq| report(1, seq, seq as i64)).collect();
    let ack = st.send_batch(too_many).await;
    assert!(ack.applied.is_empty(), "nothing of an oversized batch is applied");
    assert_eq!(ack.rejections.len(), 1, "ONE rejection for the whole batch: {:?}", ack.rejections.first());
    let r = &ack.rejections[0];
    assert_eq!((r.session, r.seq, r.code), (0, 0, Code::InvalidArgument as i32), "{r:?}");
    assert!(r.message.contains(&format!("at most {max_batch}")), "{r:?}");
    assert_eq!(reader.count(national(), None).await, 0);
    assert_eq!(reader.count(site(&sid), Some(1)).await, 0);

    // Exactly max_batch is fine.
    let full: Vec<Report> = (1..=max_batch as u64).map(|seq| report(1, seq, seq as i64)).collect();
    let ack = st.send_batch(full).await;
    assert_eq!(ack.applied, vec![reg(1, max_batch as u64, max_batch as i64)]);
    assert!(ack.rejections.is_empty());
    assert_eq!(reader.count(national(), None).await, max_batch as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_level_refusals_have_their_codes() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, a) = ts.site_with_desks(1, 0);
    let (_, b) = ts.site_with_desks(1, 1);
    let desks = ts.registry.sites[site_index(&ts.registry, &a) as usize].desks;
    let token_a = ts.site_token(&a);
    let other_auth = Auth::new(b"a different secret, also long").expect("secret");
    let forged = other_auth.site_token(&a);
    let read = ts.read_token();
    let ghost = ts.site_token("S99999");
    let over = (u32::from(desks) + 1).to_string();
    let tampered = format!("{token_a}0");

    // (what, token, site header, desk header, expected code); `None`: header absent.
    type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<&'a str>, Code);
    let cases: Vec<Case<'_>> = vec![
        ("missing token", None, Some(&a), Some("1"), Code::Unauthenticated),
        ("garbage token", Some("not-a-token"), Some(&a), Some("1"), Code::Unauthenticated),
        ("token of another secret", Some(&forged), Some(&a), Some("1"), Code::Unauthenticated),
        ("tampered token", Some(&tampered), Some(&a), Some("1"), Code::Unauthenticated),
        ("token of site A reporting for site B", Some(&token_a), Some(&b), Some("1"), Code::PermissionDenied),
        ("read token", Some(&read), Some(&a), Some("1"), Code::PermissionDenied),
        ("unknown site", Some(&ghost), Some("S99999"), Some("1"), Code::NotFound),
        ("desk 0", Some(&token_a), Some(&a), Some("0"), Code::NotFound),
        ("desk above the site's desks", Some(&token_a), Some(&a), Some(&over), Code::NotFound),
        ("desk not a number", Some(&token_a), Some(&a), Some("two"), Code::InvalidArgument),
        ("missing site header", Some(&token_a), None, Some("1"), Code::InvalidArgument),
    ];
    for (what, token, site_h, desk_h, code) in cases {
        match open_stream(ch.clone(), token, site_h, desk_h).await {
            Ok(st) => panic!("{what}: stream was accepted: {:?}", st.resume),
            Err(status) => assert_eq!(status.code(), code, "{what}: {status:?}"),
        }
    }
    // Refused streams neither count nor make a site "reporting".
    let n = reader.totals(national(), None).await;
    assert_eq!((n.count, n.sites_reporting), (0, 0), "{n:?}");

    // The desk header defaults to desk 1.
    let st = open_stream(ch.clone(), Some(&token_a), Some(&a), None).await.expect("no desk header: desk 1");
    assert_eq!((st.resume.site_id.as_str(), st.resume.desk), (a.as_str(), 1));
    assert_eq!(reader.totals(site(&a), None).await.sites_reporting, 1, "an accepted stream makes its site reporting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_without_kind_ends_the_stream_with_invalid_argument() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 7);
    let mut st = ts.open(&ch, &sid, 1).await;
    assert_eq!(st.send_batch(vec![report(1, 1, 4)]).await.applied, vec![reg(1, 1, 4)]);
    st.send(ReportRequest { kind: None }).await;
    match st.next().await {
        Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "{status:?}"),
        Ok(other) => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    assert_eq!(reader.count(national(), None).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_is_not_answered() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let (_, sid) = ts.site_with_desks(1, 8);
    let mut st = ts.open(&ch, &sid, 1).await;
    for _ in 0..3 {
        st.send(ReportRequest { kind: Some(report_request::Kind::Heartbeat(Heartbeat {})) }).await;
    }
    // The next message is the ack of this batch, not anything about the heartbeats.
    let ack = st.send_batch(vec![report(4, 1, 1)]).await;
    assert_eq!(ack.applied, vec![reg(4, 1, 1)]);
    assert_eq!(ts.server.aggregator.stats().batches, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_returns_the_stored_registers_of_the_desk() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let (_, sid) = ts.site_with_desks(2, 0);
    {
        let mut d1 = ts.open(&ch, &sid, 1).await;
        let mut d2 = ts.open(&ch, &sid, 2).await;
        d1.send_batch(vec![report(1, 1, 10), report(1, 3, 30), report(3, 1, 4)]).await;
        d1.send_batch(vec![report(1, 2, 20)]).await; // stale: stays at (3, 30)
        d1.send_batch(vec![report(2, 0, 1), report(4, 1, -1)]).await; // rejected: never stored
        d2.send_batch(vec![report(1, 1, 2)]).await;
        // Streams end here.
    }
    let d1 = ts.open(&ch, &sid, 1).await;
    assert_eq!(d1.resume.site_id, sid);
    assert_eq!(d1.resume.desk, 1);
    assert_eq!(d1.resume.registers, vec![reg(1, 3, 30), reg(3, 1, 4)]);
    assert_eq!(d1.resume.sessions, SESSIONS.to_vec());
    let d2 = ts.open(&ch, &sid, 2).await;
    assert_eq!(d2.resume.desk, 2);
    assert_eq!(d2.resume.registers, vec![reg(1, 1, 2)]);
    // A second concurrent stream of the same desk sees the same state.
    let again = ts.open(&ch, &sid, 1).await;
    assert_eq!(again.resume.registers, d1.resume.registers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correction_is_applied_and_audited() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(2, 1);
    let mut st = ts.open(&ch, &sid, 2).await;
    st.send_batch(vec![report(1, 1, 10)]).await;
    assert!(reader.corrections(0).await.corrections.is_empty());

    let ack = st.send_batch(vec![correction(1, 2, 4, "badge scanned twice")]).await;
    assert_eq!(ack.applied, vec![reg(1, 2, 4)]);
    assert_eq!(reader.count(site(&sid), Some(1)).await, 4);
    assert_eq!(reader.count(national(), None).await, 4);

    // An increase carrying a reason is not a correction.
    st.send_batch(vec![correction(1, 3, 9, "not a correction")]).await;
    st.send_batch(vec![correction(1, 4, 1, "second fix")]).await;
    assert_eq!(reader.count(national(), None).await, 1);

    let all = reader.corrections(0).await.corrections;
    let got: Vec<(&str, u32, u32, u64, i64, i64, &str)> = all
        .iter()
        .map(|c| (c.site_id.as_str(), c.desk, c.session, c.seq, c.previous_count, c.count, c.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![(sid.as_str(), 2, 1, 4, 9, 1, "second fix"), (sid.as_str(), 2, 1, 2, 10, 4, "badge scanned twice"),],
        "newest first"
    );
    assert!(all.iter().all(|c| c.unix_ms > 0));
    let newest = reader.corrections(1).await.corrections;
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].reason, "second fix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving() {
    let ts = start_small().await;
    let mut health = HealthClient::new(ts.channel().await);
    for service in ["headcount.v1.Ingest", "headcount.v1.Totals", ""] {
        let resp = within("health check", health.check(HealthCheckRequest { service: service.into() }))
            .await
            .unwrap_or_else(|s| panic!("health of {service:?}: {s:?}"))
            .into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = within("health check", health.check(HealthCheckRequest { service: "no.such.Service".into() })).await;
    assert_eq!(unknown.expect_err("unknown service").code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batch_rolls_up_its_net_change_per_session_and_counts_each_report_once() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 3);
    let mut st = ts.open(&ch, &sid, 1).await;
    let ack = st
        .send_batch(vec![
            report(1, 1, 5),
            report(2, 1, 3),
            report(1, 1, 5),                    // duplicate: unchanged
            report(1, 2, 8),                    // applied
            report(99, 1, 1),                   // unknown session: rejected
            report(2, 1, 4),                    // same seq, other count: conflict, rejected
            correction(1, 3, 6, "double scan"), // applied, a correction
        ])
        .await;
    assert_eq!(ack.applied, vec![reg(1, 3, 6), reg(2, 1, 3)]);
    let rejected: Vec<(u32, u64)> = ack.rejections.iter().map(|r| (r.session, r.seq)).collect();
    assert_eq!(rejected, vec![(99, 1), (2, 1)]);
    assert_eq!(counts(&reader, &sid, 1).await, (9, 6, 9));
    assert_eq!(reader.count(site(&sid), Some(2)).await, 3);
    let stats = ts.server.aggregator.stats();
    assert_eq!((stats.applied, stats.unchanged, stats.rejected, stats.batches), (4, 1, 2, 1));
    assert_eq!(reader.corrections(10).await.corrections.len(), 1, "the correction is audited");
}
