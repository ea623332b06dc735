//! Time through the real gRPC path with a controlled clock: silence is measured on the monotonic
//! clock (a wall-clock step changes no site's state), "last change" moves with changes and only
//! with them, commune-level reporting counts are kept, and only a lower count is a correction.

mod common;

use common::*;
use headcount::{
    proto::v1::{ReportRequest, report_request},
    server::{AggregatorConfig, Clock, ManualClock},
};

const START_MS: i64 = 1_800_000_000_000;
const HOUR_MS: i64 = 3_600_000;

async fn start_manual() -> (TestServer, ManualClock) {
    let (clock, time) = Clock::manual(START_MS);
    let config = AggregatorConfig { clock, ..test_config() };
    (start_server(small_registry(), config).await, time)
}

fn heartbeat() -> ReportRequest {
    ReportRequest { kind: Some(report_request::Kind::Heartbeat(Default::default())) }
}

/// Sweeps now (the background sweep also runs; this makes sure one ran after the clock moved)
/// and lists the silent sites.
async fn silent_now(ts: &TestServer, reader: &Reader) -> Vec<String> {
    ts.server.aggregator.sweep_now();
    reader.silent_sites(None, 0).await.sites.into_iter().map(|s| s.site_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_steps_change_no_site_state_and_last_change_follows_changes() {
    let (ts, time) = start_manual().await;
    let silent_after = test_config().silent_after.as_millis() as i64;
    let reader = ts.reader().await;
    let ch = ts.channel().await;
    let (_, alive) = ts.site_with_desks(1, 0);
    let (_, dead) = ts.site_with_desks(1, 1);
    let mut alive_st = ts.open(&ch, &alive, 1).await;
    let mut dead_st = ts.open(&ch, &dead, 1).await;
    alive_st.send_batch(vec![report(1, 1, 5)]).await;
    dead_st.send_batch(vec![report(1, 1, 3)]).await;
    let t = reader.totals(site(&alive), None).await;
    assert_eq!((t.sites_reporting, t.last_change_unix_ms), (1, START_MS), "{t:?}");

    // Stepped forward two minutes: both connected sites stay reporting.
    time.step_wall(2 * 60_000);
    let silent = silent_now(&ts, &reader).await;
    assert!(!silent.contains(&alive) && !silent.contains(&dead), "connected sites went silent: {silent:?}");
    assert_eq!(reader.totals(national(), None).await.sites_reporting, 2);

    // Stepped back an hour while a minute passes: the dead site goes silent all the same.
    drop(dead_st);
    time.step_wall(-HOUR_MS);
    time.advance(silent_after + 1_000);
    alive_st.send(heartbeat()).await;
    eventually("the dead site is silent, the live one reporting", DEADLINE, || async {
        let silent = silent_now(&ts, &reader).await;
        match (silent.contains(&dead), silent.contains(&alive)) {
            (true, false) => Ok(()),
            other => Err(format!("(dead silent, alive silent) = {other:?}")),
        }
    })
    .await;
    let n = reader.totals(national(), None).await;
    assert_eq!(n.sites_reporting, 1, "{n:?}");
    let listed = reader.silent_sites(Some(site(&dead)), 0).await.sites;
    assert_eq!(listed.len(), 1);
    let want_seen = START_MS + 2 * 60_000 - HOUR_MS;
    assert_eq!(listed[0].last_seen_unix_ms, want_seen, "last seen shown on the wall clock as it is now");

    // "Last change" still moves after the step back, to the wall clock's new reading.
    let now = time.wall_ms();
    assert!(now < START_MS, "the wall clock is behind the first change");
    alive_st.send_batch(vec![report(1, 2, 6)]).await;
    assert_eq!(reader.totals(site(&alive), None).await.last_change_unix_ms, now);
    assert_eq!(reader.totals(national(), Some(1)).await.last_change_unix_ms, now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_change_moves_on_a_change_and_only_then() {
    let (ts, time) = start_manual().await;
    let reader = ts.reader().await;
    let ch = ts.channel().await;
    let (_, sid) = ts.site_with_desks(1, 2);
    let mut st = ts.open(&ch, &sid, 1).await;
    assert_eq!(reader.totals(site(&sid), None).await.last_change_unix_ms, 0, "never changed");
    st.send_batch(vec![report(1, 1, 4)]).await;
    assert_eq!(reader.totals(site(&sid), None).await.last_change_unix_ms, START_MS);

    time.advance(5_000);
    // A duplicate, a stale report, a heartbeat, a new seq with the same count: no change.
    st.send_batch(vec![report(1, 1, 4)]).await;
    st.send_batch(vec![report(1, 0, 9)]).await; // rejected
    st.send(heartbeat()).await;
    let ack = st.send_batch(vec![report(1, 2, 4)]).await;
    assert_eq!(ack.applied.first().map(|r| (r.seq, r.count)), Some((2, 4)));
    for scope in [site(&sid), national()] {
        let t = reader.totals(scope.clone(), Some(1)).await;
        assert_eq!((t.count, t.last_change_unix_ms), (4, START_MS), "{scope:?}: {t:?}");
    }

    time.advance(7_000);
    st.send_batch(vec![report(1, 3, 5)]).await;
    for scope in [site(&sid), national(), province(&province_of(&ts, &sid))] {
        assert_eq!(reader.totals(scope.clone(), None).await.last_change_unix_ms, START_MS + 12_000, "{scope:?}");
    }
    // Another session of the same site does not move session 1's time.
    time.advance(1_000);
    st.send_batch(vec![report(2, 1, 1)]).await;
    assert_eq!(reader.totals(site(&sid), Some(1)).await.last_change_unix_ms, START_MS + 12_000);
    assert_eq!(reader.totals(site(&sid), None).await.last_change_unix_ms, START_MS + 13_000);
}

fn province_of(ts: &TestServer, site_id: &str) -> String {
    let s = &ts.registry.sites[ts.registry.site(site_id).expect("known site") as usize];
    ts.registry.provinces[s.province as usize].code.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commune_reporting_counts_follow_their_sites() {
    let (ts, time) = start_manual().await;
    let silent_after = test_config().silent_after.as_millis() as i64;
    let reader = ts.reader().await;
    let ch = ts.channel().await;
    let commune = ts.registry.communes.iter().find(|c| c.sites.len() >= 2).expect("a commune with two sites");
    let ids: Vec<String> = commune.sites.iter().map(|&i| ts.registry.sites[i as usize].id.clone()).collect();
    let cid = commune.id.clone();
    let code = ts.registry.provinces[commune.province as usize].code.clone();
    let reporting = |scope| {
        let reader = reader.clone();
        async move { reader.totals(scope, None).await.sites_reporting }
    };
    assert_eq!(reporting(commune_scope(&cid)).await, 0);
    let first = ts.open(&ch, &ids[0], 1).await;
    let second = ts.open(&ch, &ids[1], 1).await;
    assert_eq!(reporting(commune_scope(&cid)).await, 2);
    let province_before = reporting(province(&code)).await;
    assert!(province_before >= 2);

    drop(first);
    time.advance(silent_after + 1_000);
    second.send(heartbeat()).await;
    eventually("one site of the commune silent", DEADLINE, || async {
        ts.server.aggregator.sweep_now();
        match reporting(commune_scope(&cid)).await {
            1 => Ok(()),
            n => Err(format!("commune reporting {n}")),
        }
    })
    .await;
    assert_eq!(reporting(province(&code)).await, province_before - 1);
    assert_eq!(reporting(site(&ids[1])).await, 1);
    assert_eq!(reporting(site(&ids[0])).await, 0);
    // The silent site comes back: counted at once, at every level.
    let _back = ts.open(&ch, &ids[0], 1).await;
    assert_eq!(reporting(commune_scope(&cid)).await, 2);
    assert_eq!(reporting(province(&code)).await, province_before);
}

fn commune_scope(id: &str) -> headcount::proto::v1::Scope {
    commune(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_lower_count_is_recorded_as_a_correction() {
    let (ts, time) = start_manual().await;
    let reader = ts.reader().await;
    let ch = ts.channel().await;
    let (_, sid) = ts.site_with_desks(1, 3);
    let mut st = ts.open(&ch, &sid, 1).await;
    st.send_batch(vec![report(1, 1, 10)]).await;
    st.send_batch(vec![correction(1, 2, 10, "same count, new seq")]).await;
    st.send_batch(vec![report(1, 3, 12)]).await;
    assert!(reader.corrections(0).await.corrections.is_empty(), "no count went down");
    time.advance(3_000);
    st.send_batch(vec![correction(1, 4, 9, "double scan")]).await;
    let c = reader.corrections(0).await.corrections;
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(
        (c[0].site_id.as_str(), c[0].seq, c[0].previous_count, c[0].count, c[0].reason.as_str(), c[0].unix_ms),
        (sid.as_str(), 4, 12, 9, "double scan", START_MS + 3_000)
    );
    assert_eq!(reader.count(site(&sid), Some(1)).await, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_curve_stays_live_when_the_wall_clock_steps_back() {
    use headcount::proto::v1::{CurveRequest, totals_client::TotalsClient};
    let (ts, time) = start_manual().await;
    let reader = ts.reader().await;
    let ch = ts.channel().await;
    let (_, sid) = ts.site_with_desks(1, 4);
    let mut st = ts.open(&ch, &sid, 1).await;
    st.send_batch(vec![report(1, 1, 3)]).await;
    ts.server.aggregator.sweep_now();
    time.advance(test_config().curve_bucket.as_millis() as i64);
    ts.server.aggregator.sweep_now();
    time.step_wall(-HOUR_MS);
    st.send_batch(vec![report(1, 2, 8)]).await;
    ts.server.aggregator.sweep_now();
    let mut client = TotalsClient::new(ch.clone());
    let curve = within("Curve", client.curve(reader.req(CurveRequest { scope: Some(national()), session: Some(1) })))
        .await
        .expect("curve")
        .into_inner();
    let labels: Vec<i64> = curve.points.iter().map(|p| p.unix_ms).collect();
    assert!(labels.windows(2).all(|w| w[0] < w[1]), "labels in order: {labels:?}");
    assert_eq!(curve.points.last().map(|p| p.count), Some(8), "the last point is live: {:?}", curve.points);
}
