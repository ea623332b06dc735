//! The Totals service: errors, breakdown order, over-capacity flags, watches (snapshot, updates,
//! readers that never read), silent sites, and a pass over the 10,035-site reference registry.

mod common;

use std::time::Duration;

use common::*;
use headcount::{
    proto::v1::{
        BreakdownOrder, CurveRequest, Heartbeat, ReportRequest, Scope, TotalsRequest, WatchUpdate, report_request,
    },
    server::{
        AggregatorConfig,
        registry::generate::{GenerateOptions, generate},
    },
};
use tonic::{Code, Status, Streaming};

fn code<T: std::fmt::Debug>(what: &str, r: Result<T, Status>) -> Code {
    match r {
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_errors_have_their_codes() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let s1 = ts.registry.sites[0].id.clone();
    let p1 = ts.registry.provinces[0].code.clone();

    let cases: Vec<(&str, Scope, Option<u32>, Code)> = vec![
        ("unknown province", province("99"), None, Code::NotFound),
        ("unknown commune", commune("01-999"), None, Code::NotFound),
        ("unknown site", site("S99999"), None, Code::NotFound),
        ("unknown session", national(), Some(9), Code::NotFound),
        ("unknown session of a site", site(&s1), Some(0), Code::NotFound),
        ("unknown scope kind", Scope { kind: 42, id: String::new() }, None, Code::InvalidArgument),
    ];
    for (what, scope, session, want) in cases {
        assert_eq!(code(what, reader.try_totals(scope.clone(), session).await), want, "GetTotals {what}");
        if want == Code::NotFound || scope.kind == 42 {
            let got = reader.try_breakdown(scope, session, BreakdownOrder::Id, 0).await;
            assert_eq!(code(what, got), want, "Breakdown {what}");
        }
    }
    let got = reader.try_breakdown(site(&s1), None, BreakdownOrder::Id, 0).await;
    assert_eq!(code("breakdown of a site", got), Code::InvalidArgument);
    let mut c = reader.client.clone();
    let req = reader.req(headcount::proto::v1::BreakdownRequest {
        scope: Some(national()),
        session: None,
        order: 9,
        limit: 0,
    });
    assert_eq!(code("unknown order", within("Breakdown", c.breakdown(req)).await), Code::InvalidArgument);
    for (what, scope, want) in [
        ("curve of a commune", commune(&ts.registry.communes[0].id), Code::InvalidArgument),
        ("curve of a site", site(&s1), Code::InvalidArgument),
        ("curve of an unknown province", province("99"), Code::NotFound),
    ] {
        let req = reader.req(CurveRequest { scope: Some(scope), session: None });
        assert_eq!(code(what, within("Curve", c.curve(req)).await), want, "{what}");
    }
    assert_eq!(code("watch unknown session", reader.watch(national(), Some(9), false).await), Code::NotFound);
    assert_eq!(code("watch children of a site", reader.watch(site(&s1), None, true).await), Code::InvalidArgument);

    // Without a (valid) token every Totals call is refused.
    let anonymous = Reader::new(ch.clone(), None);
    let garbage = Reader::new(ch.clone(), Some("hc1.read.me.00".into()));
    for (what, r) in [("no token", &anonymous), ("bad token", &garbage)] {
        assert_eq!(code(what, r.try_totals(national(), None).await), Code::Unauthenticated, "GetTotals {what}");
        assert_eq!(
            code(what, r.try_breakdown(province(&p1), None, BreakdownOrder::Id, 0).await),
            Code::Unauthenticated,
            "Breakdown {what}"
        );
        assert_eq!(code(what, r.watch(national(), None, false).await), Code::Unauthenticated, "Watch {what}");
        let mut c = r.client.clone();
        let got = within("SilentSites", c.silent_sites(r.req(Default::default()))).await;
        assert_eq!(code(what, got), Code::Unauthenticated, "SilentSites {what}");
        let got = within("Corrections", c.corrections(r.req(Default::default()))).await;
        assert_eq!(code(what, got), Code::Unauthenticated, "Corrections {what}");
        let got = within("GetTotals", c.get_totals(r.req(TotalsRequest::default()))).await;
        assert_eq!(code(what, got), Code::Unauthenticated, "GetTotals default {what}");
    }

    // A well-formed query of a known scope works, and describes the scope.
    let t = reader.totals(province(&p1), Some(2)).await;
    let p = &ts.registry.provinces[0];
    assert_eq!(t.scope, Some(province(&p1)));
    assert_eq!((t.name.as_str(), t.session, t.count), (p.name.as_str(), Some(2), 0));
    assert_eq!((t.registered, t.sites_total), (p.registered as i64, p.sites_total));
    let all = reader.totals(national(), None).await;
    assert_eq!(all.registered, ts.registry.registered_total() as i64 * SESSIONS.len() as i64);
    assert_eq!(all.sites_total as usize, ts.registry.sites.len());
}

/// Sends `(session, count)` for desk 1 of `site` as seq 1 (fresh register).
async fn put(ts: &TestServer, ch: &tonic::transport::Channel, site_id: &str, session: u32, count: i64) {
    let mut st = ts.open(ch, site_id, 1).await;
    let (seq, _) = st.resumed(session);
    let ack = st.send_batch(vec![report(session, seq + 1, count)]).await;
    assert!(ack.rejections.is_empty(), "{ack:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakdown_orders_and_limits() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let by_p = sites_by_province(&ts.registry);
    let pick = |p: u32| ts.registry.sites[by_p[&p][0] as usize].id.clone();
    put(&ts, &ch, &pick(3), 1, 30).await;
    put(&ts, &ch, &pick(5), 1, 10).await;
    put(&ts, &ch, &pick(7), 1, 20).await;
    put(&ts, &ch, &pick(7), 2, 15).await;

    let codes = |v: &[headcount::proto::v1::ScopeTotals]| -> Vec<(String, i64)> {
        v.iter().map(|t| (t.scope.as_ref().map(|s| s.id.clone()).unwrap_or_default(), t.count)).collect()
    };
    let p = |i: usize| ts.registry.provinces[i].code.clone();
    let top = reader.try_breakdown(national(), Some(1), BreakdownOrder::CountDesc, 3).await.expect("breakdown");
    assert_eq!(codes(&top.children), vec![(p(3), 30), (p(7), 20), (p(5), 10)]);
    assert_eq!(top.parent.as_ref().map(|t| t.count), Some(60));
    let top = reader.try_breakdown(national(), None, BreakdownOrder::CountDesc, 2).await.expect("breakdown");
    assert_eq!(codes(&top.children), vec![(p(7), 35), (p(3), 30)]);
    assert_eq!(top.parent.as_ref().map(|t| t.count), Some(75));

    let by_turnout = reader.try_breakdown(national(), None, BreakdownOrder::TurnoutAsc, 0).await.expect("breakdown");
    assert_eq!(by_turnout.children.len(), ts.registry.provinces.len());
    let turnouts: Vec<f64> = by_turnout.children.iter().map(|t| t.turnout_pct).collect();
    assert!(turnouts.windows(2).all(|w| w[0] <= w[1]), "turnout ascending: {turnouts:?}");
    let last = by_turnout.children.last().expect("children");
    assert!(last.count > 0 && last.turnout_pct > 0.0, "laggards first, so a reporting province is last: {last:?}");
    for t in &by_turnout.children {
        let want = if t.registered > 0 { 100.0 * t.count as f64 / t.registered as f64 } else { 0.0 };
        assert!((t.turnout_pct - want).abs() < 1e-9, "{t:?}");
    }

    // The curve's live point is the current count.
    let mut c = reader.client.clone();
    let curve = within("Curve", c.curve(reader.req(CurveRequest { scope: Some(national()), session: Some(1) })))
        .await
        .expect("curve")
        .into_inner();
    assert_eq!(curve.points.last().map(|p| p.count), Some(60));
    assert_eq!(curve.points.iter().map(|p| p.delta).sum::<i64>(), 60, "deltas add up to the count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_capacity_sites_are_flagged_at_every_level() {
    let config = AggregatorConfig { sweep_interval: Duration::from_millis(20), ..test_config() };
    let ts = start_server(small_registry(), config).await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (si, sid) = ts.site_with_desks(2, 0);
    let s = &ts.registry.sites[si as usize];
    let registered = i64::from(s.registered);
    let (p, c) =
        (ts.registry.provinces[s.province as usize].code.clone(), ts.registry.communes[s.commune as usize].id.clone());
    let scopes = [site(&sid), commune(&c), province(&p), national()];

    let mut d1 = ts.open(&ch, &sid, 1).await;
    let mut d2 = ts.open(&ch, &sid, 2).await;
    // Exactly the registered delegates over two desks: not over capacity.
    d1.send_batch(vec![report(1, 1, registered / 2)]).await;
    d2.send_batch(vec![report(1, 1, registered - registered / 2)]).await;
    // One more: over capacity (accepted and flagged).
    let ack = d2.send_batch(vec![report(1, 2, registered - registered / 2 + 1)]).await;
    assert!(ack.rejections.is_empty(), "over capacity is accepted: {ack:?}");
    assert_eq!(reader.count(site(&sid), Some(1)).await, registered + 1);

    let flags = |reader: Reader, scopes: [Scope; 4]| async move {
        let mut v = Vec::new();
        for scope in scopes {
            for session in [Some(1), Some(2), None] {
                v.push(reader.totals(scope.clone(), session).await.sites_over_capacity);
            }
        }
        v
    };
    eventually("site flagged over capacity for session 1 and overall", DEADLINE, || {
        let (reader, scopes) = (reader.clone(), scopes.clone());
        async move {
            let got = flags(reader, scopes).await;
            let want = [1, 0, 1].repeat(4);
            if got == want { Ok(()) } else { Err(format!("flags {got:?}, expected {want:?}")) }
        }
    })
    .await;

    d1.send_batch(vec![correction(1, 2, registered / 2 - 1, "miscount")]).await;
    eventually("flag cleared after the correction", DEADLINE, || {
        let (reader, scopes) = (reader.clone(), scopes.clone());
        async move {
            let got = flags(reader, scopes).await;
            if got.iter().all(|f| *f == 0) { Ok(()) } else { Err(format!("flags {got:?}")) }
        }
    })
    .await;
    assert_eq!(reader.count(national(), None).await, registered);
}

/// Reads watch updates until one satisfies `done`; checks that sequences go 0, 1, 2, … without gaps.
async fn watch_until(
    w: &mut Streaming<WatchUpdate>,
    expect_seq: &mut u64,
    what: &str,
    done: impl Fn(&WatchUpdate) -> bool,
) -> WatchUpdate {
    within(what, async {
        // Bounded: at most this many updates (each publish tick sends at most one).
        for _ in 0..100_000 {
            let u = w.message().await.unwrap_or_else(|s| panic!("{what}: watch failed: {s:?}"));
            let u = u.unwrap_or_else(|| panic!("{what}: watch ended"));
            assert_eq!(u.sequence, *expect_seq, "{what}: watch sequences are consecutive");
            *expect_seq += 1;
            if done(&u) {
                return u;
            }
        }
        panic!("{what}: too many updates");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_a_snapshot_then_updates() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (si, sid) = ts.site_with_desks(1, 2);
    let pi = ts.registry.sites[si as usize].province as usize;

    let mut w_site = reader.watch(site(&sid), Some(1), false).await.expect("watch site");
    let mut w_nat = reader.watch(national(), None, true).await.expect("watch national");
    let (mut seq_site, mut seq_nat) = (0, 0);
    let snap = watch_until(&mut w_site, &mut seq_site, "site snapshot", |_| true).await;
    assert_eq!(snap.sequence, 0);
    let t = snap.totals.as_ref().expect("totals");
    assert_eq!((t.scope.clone(), t.session, t.count), (Some(site(&sid)), Some(1), 0));
    assert!(snap.children.is_empty());
    assert!(snap.unix_ms > 0);
    let snap = watch_until(&mut w_nat, &mut seq_nat, "national snapshot", |_| true).await;
    assert_eq!(snap.totals.as_ref().map(|t| t.count), Some(0));
    assert_eq!(snap.children.len(), ts.registry.provinces.len());
    assert!(snap.children.iter().all(|c| c.count == 0));

    let mut st = ts.open(&ch, &sid, 1).await;
    st.send_batch(vec![report(1, 1, 7)]).await;
    let u = watch_until(&mut w_site, &mut seq_site, "site update", |u| u.totals.as_ref().is_some_and(|t| t.count == 7))
        .await;
    assert!(u.sequence >= 1);
    let u =
        watch_until(&mut w_nat, &mut seq_nat, "national update", |u| u.totals.as_ref().is_some_and(|t| t.count == 7))
            .await;
    let kids: Vec<i64> = u.children.iter().map(|c| c.count).collect();
    let mut want = vec![0; ts.registry.provinces.len()];
    want[pi] = 7;
    assert_eq!(kids, want, "children of the update carry the new count");

    // A report of another session moves the all-sessions watch, not the session-1 site watch.
    st.send_batch(vec![report(2, 1, 3), report(1, 2, 9)]).await;
    watch_until(&mut w_nat, &mut seq_nat, "national all sessions", |u| {
        u.totals.as_ref().is_some_and(|t| t.count == 12)
    })
    .await;
    let u =
        watch_until(&mut w_site, &mut seq_site, "site session 1", |u| u.totals.as_ref().is_some_and(|t| t.count != 7))
            .await;
    assert_eq!(u.totals.as_ref().map(|t| t.count), Some(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_that_never_read_do_not_slow_ingest() {
    let ts = start_small().await;
    // Many watchers of a large answer (national with all provinces), never read. They get their
    // own connection: unread streams hold HTTP/2 connection-level flow-control window of the
    // client, which stalls every other call sharing that connection (client-side behaviour).
    let watchers = Reader::new(ts.channel().await, Some(ts.read_token()));
    let mut idle = Vec::new();
    for i in 0..200 {
        let scope = if i % 2 == 0 { national() } else { province(&ts.registry.provinces[i % 34].code) };
        idle.push(watchers.watch(scope, None, true).await.expect("watch"));
    }
    // One more idle watcher, alone on its connection, read only at the end.
    let late_reader = Reader::new(ts.channel().await, Some(ts.read_token()));
    let mut late = late_reader.watch(national(), None, true).await.expect("watch");
    let reader = ts.reader().await;
    // Ingest on its own connections: 40 desks, 60 batches each, acks awaited one by one.
    let ingest = [ts.channel().await, ts.channel().await];
    let mut truth = Truth::default();
    let mut tasks = Vec::new();
    for (k, s) in ts.registry.sites.iter().enumerate().take(40) {
        let mut st = ts.open(&ingest[k % 2], &s.id, 1).await;
        let session = SESSIONS[k % 4];
        truth.add(k as u32, session, 60 * 2);
        tasks.push(tokio::spawn(async move {
            for seq in 1..=60u64 {
                let ack = st.send_batch(vec![report(session, seq, 2 * seq as i64)]).await;
                assert!(ack.rejections.is_empty(), "{ack:?}");
            }
        }));
    }
    within("ingest next to idle watchers", async {
        for t in tasks {
            t.await.expect("ingest task");
        }
    })
    .await;
    assert_totals(&reader, &ts.registry, &truth).await;

    // A watcher that finally reads catches up with the latest state (after whatever stale updates
    // its connection's flow-control window let through).
    let want = truth.total(None);
    within("a late reader reaches the latest state", async {
        for _ in 0..100_000 {
            let u = late.message().await.expect("watch").expect("watch open");
            if u.totals.as_ref().is_some_and(|t| t.count == want) {
                return;
            }
        }
        panic!("too many updates");
    })
    .await;
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sites_and_reporting_counts() {
    let config = AggregatorConfig {
        silent_after: Duration::from_millis(200),
        sweep_interval: Duration::from_millis(20),
        ..test_config()
    };
    let ts = start_server(small_registry(), config).await;
    let n_sites = ts.registry.sites.len() as u32;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let by_p = sites_by_province(&ts.registry);
    let (pa, pb) = (0u32, 1u32);
    let (a, b) = (by_p[&pa][0], by_p[&pb][0]);
    let (a_id, b_id) = (ts.registry.sites[a as usize].id.clone(), ts.registry.sites[b as usize].id.clone());
    let (pa_code, pb_code) =
        (ts.registry.provinces[pa as usize].code.clone(), ts.registry.provinces[pb as usize].code.clone());

    // Nobody has reported: every site is silent and was never seen.
    let all = reader.silent_sites(None, 0).await;
    assert_eq!(all.total_silent, n_sites);
    assert_eq!(all.sites.len() as u32, n_sites);
    assert!(all.sites.iter().all(|s| s.last_seen_unix_ms == 0));
    let ids: Vec<&str> = all.sites.iter().map(|s| s.site_id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "silent sites are listed by id");
    let limited = reader.silent_sites(None, 5).await;
    assert_eq!((limited.sites.len(), limited.total_silent), (5, n_sites));
    let first = &all.sites[0];
    let s0 = &ts.registry.sites[0];
    assert_eq!(
        (first.site_id.as_str(), first.name.as_str(), first.province.as_str(), first.commune.as_str()),
        (
            s0.id.as_str(),
            s0.name.as_str(),
            ts.registry.provinces[s0.province as usize].code.as_str(),
            ts.registry.communes[s0.commune as usize].id.as_str()
        )
    );

    let sa = tokio::sync::Mutex::new(ts.open(&ch, &a_id, 1).await);
    let sb = ts.open(&ch, &b_id, 1).await;
    sa.lock().await.send_batch(vec![report(1, 1, 1)]).await;
    let heartbeat = || ReportRequest { kind: Some(report_request::Kind::Heartbeat(Heartbeat {})) };
    let reporting = |scope: Scope| {
        let reader = reader.clone();
        async move { reader.totals(scope, None).await.sites_reporting }
    };

    // Both report (A with reports, B with heartbeats): both count as reporting, neither is silent.
    eventually("A and B reporting, not silent", DEADLINE, || async {
        sa.lock().await.send_batch(vec![report(1, 1, 1)]).await;
        sb.tx.send(heartbeat()).await.map_err(|e| e.to_string())?;
        let silent = reader.silent_sites(None, 0).await;
        let listed = |id: &str| silent.sites.iter().any(|s| s.site_id == id);
        let got = (
            silent.total_silent,
            listed(&a_id),
            listed(&b_id),
            reporting(national()).await,
            reporting(site(&a_id)).await,
            reporting(province(&pa_code)).await,
            reporting(site(&b_id)).await,
        );
        let want = (n_sites - 2, false, false, 2, 1, 1, 1);
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "(silent, A listed, B listed, reporting: national, A, A's province, B) = {got:?}, want {want:?}"
            ))
        }
    })
    .await;

    // A stops (its stream ends); B keeps heartbeating. A becomes silent, B stays reporting.
    drop(sa);
    eventually("A silent, B reporting", DEADLINE, || async {
        sb.tx.send(heartbeat()).await.map_err(|e| e.to_string())?;
        let silent = reader.silent_sites(None, 0).await;
        let a_seen = silent.sites.iter().find(|s| s.site_id == a_id).map(|s| s.last_seen_unix_ms);
        let b_listed = silent.sites.iter().any(|s| s.site_id == b_id);
        let got = (
            silent.total_silent,
            a_seen.is_some_and(|ms| ms > 0),
            b_listed,
            reporting(national()).await,
            reporting(site(&a_id)).await,
            reporting(province(&pa_code)).await,
            reporting(province(&pb_code)).await,
        );
        let want = (n_sites - 1, true, false, 1, 0, 0, 1);
        if got == want { Ok(()) } else { Err(format!("(silent, A listed and seen, B listed, reporting: national, A, A's province, B's province) = {got:?}, want {want:?}")) }
    })
    .await;

    // Scoped to A's province: every site of it is silent (A included).
    let in_pa = reader.silent_sites(Some(province(&pa_code)), 0).await;
    let want: Vec<String> = by_p[&pa].iter().map(|&i| ts.registry.sites[i as usize].id.clone()).collect();
    let got: Vec<String> = in_pa.sites.iter().map(|s| s.site_id.clone()).collect();
    assert_eq!(got, want);
    assert_eq!(in_pa.total_silent as usize, want.len());
    let only_a = reader.silent_sites(Some(site(&a_id)), 0).await;
    assert_eq!(only_a.total_silent, 1);

    // A comes back.
    let mut sa = ts.open(&ch, &a_id, 1).await;
    assert_eq!(sa.resumed(1), (1, 1));
    eventually("A reporting again", DEADLINE, || async {
        sb.tx.send(heartbeat()).await.map_err(|e| e.to_string())?;
        let n = reporting(national()).await;
        let silent = reader.silent_sites(None, 0).await.total_silent;
        if n == 2 && silent == n_sites - 2 { Ok(()) } else { Err(format!("national reporting {n}, silent {silent}")) }
    })
    .await;
    sa.send_batch(vec![report(1, 2, 2)]).await;
    assert_eq!(reader.count(national(), None).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_registry_totals_at_scale() {
    let registry = generate(&GenerateOptions::default());
    assert_eq!(registry.sites.len(), 10_035);
    let ts = start_server(registry, test_config()).await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let n = ts.registry.sites.len();
    let mut truth = Truth::default();
    // 50 sites spread over the registry, first and last included, two sessions each.
    for k in 0..50usize {
        let i = if k == 49 { n - 1 } else { k * (n / 49) };
        let s = &ts.registry.sites[i];
        let mut st = ts.open(&ch, &s.id, u32::from(s.desks)).await;
        let (a, b) = ((k * 7 % 90) as i64 + 1, (k * 13 % 50) as i64);
        st.send_batch(vec![report(1, 1, a), report(3, 1, b)]).await;
        truth.add(i as u32, 1, a);
        truth.add(i as u32, 3, b);
    }
    let last = &ts.registry.sites[n - 1];
    assert_eq!(last.id, "S10035");
    // Every province and commune (2 × 35 Breakdown calls over ~3,300 communes), and the sites of
    // the communes that have reports.
    let touched: std::collections::BTreeSet<u32> =
        truth.0.keys().map(|(s, _)| ts.registry.sites[*s as usize].commune).collect();
    assert!(truth.total(None) > 0);
    walk_totals(&reader, &ts.registry, &truth, &[None, Some(1), Some(3)], &|c| touched.contains(&c)).await;
    let nat = reader.totals(national(), Some(3)).await;
    assert_eq!((nat.count, nat.sites_total as usize, nat.sites_reporting), (truth.total(Some(3)), n, 50));
    eventually("the 50 reporting sites leave the silent list at the next sweep", DEADLINE, || async {
        let silent = reader.silent_sites(None, 10).await;
        let got = (silent.total_silent as usize, silent.sites.len());
        if got == (n - 50, 10) { Ok(()) } else { Err(format!("(total silent, listed) = {got:?}")) }
    })
    .await;
}

#[tokio::test]
async fn separate_read_listener_serves_live_totals_and_refuses_ingest() {
    let ts = start_small().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind read listener");
    let read_url = format!("http://{}", listener.local_addr().expect("read addr"));
    headcount::server::serve::spawn_read_server(
        listener,
        ts.server.aggregator.clone(),
        ts.auth.clone(),
        headcount::server::Transport::default(),
    )
    .expect("read thread");
    let site = ts.registry.sites[0].id.clone();
    let mut s = open_stream(channel_to(&ts.url()).await, Some(&ts.auth.site_token(&site)), Some(&site), Some("1"))
        .await
        .expect("ingest on the main listener");
    s.send_batch(vec![report(1, 1, 9)]).await;
    let reader = Reader::new(channel_to(&read_url).await, Some(ts.auth.read_token("wall")));
    assert_eq!(reader.totals(national(), None).await.count, 9, "the read listener sees ingest from the main one");
    // The read listener serves no ingest.
    let refused = open_stream(channel_to(&read_url).await, Some(&ts.auth.site_token(&site)), Some(&site), Some("1"))
        .await
        .err()
        .expect("ingest refused on the read listener");
    assert_eq!(refused.code(), Code::Unimplemented);
}
