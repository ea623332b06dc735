//! The `Reporter` library against a real aggregator: many desks at once with exact totals at
//! every level, restarts from the state file, fresh installs adopting the aggregator's state, and
//! corrections.

mod common;

use std::{collections::BTreeMap, sync::Arc};

use common::*;
use headcount::client::{
    Reporter, ReporterError, connect,
    reporter::state::{FileStore, StateStore},
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reporters_give_exact_totals_at_every_level() {
    let ts = start_small().await;
    let channels = [ts.channel().await, ts.channel().await];
    let reader = ts.reader().await;
    let mut truth = Truth::default();
    let mut per_desk: BTreeMap<(u32, u32), BTreeMap<u32, i64>> = BTreeMap::new();
    let mut reporters = Vec::new();
    let mut tasks = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for (si, s) in ts.registry.sites.iter().enumerate() {
        for desk in 1..=u32::from(s.desks) {
            let r = Arc::new(memory_reporter(&channels[(si + desk as usize) % 2], &ts.auth, &s.id, desk));
            // A plan per desk: up to 24 check-ins over sessions 1 and 2, split over two concurrent
            // tasks so that check-ins of one desk race each other (group commit).
            let plan: Vec<(u32, u32)> =
                (0..rng.random_range(1..=24)).map(|_| (rng.random_range(1..=2), rng.random_range(1..=3))).collect();
            for &(session, n) in &plan {
                truth.add(si as u32, session, i64::from(n));
                *per_desk.entry((si as u32, desk)).or_default().entry(session).or_default() += i64::from(n);
            }
            let (first, second) = plan.split_at(plan.len() / 2);
            for part in [first.to_vec(), second.to_vec()] {
                let r = r.clone();
                tasks.push(tokio::spawn(async move {
                    for (session, n) in part {
                        r.check_in(session, n).await.expect("check-in recorded");
                    }
                }));
            }
            reporters.push(((si as u32, desk), r));
        }
    }
    assert!(reporters.len() > ts.registry.sites.len(), "some sites have several desks");
    within("all check-ins", async {
        for t in tasks {
            t.await.expect("check-in task");
        }
    })
    .await;
    for ((si, desk), r) in &reporters {
        flush(r, &format!("site {si} desk {desk}")).await;
    }
    assert_totals(&reader, &ts.registry, &truth).await;

    for ((si, desk), r) in &reporters {
        let st = r.status();
        let local: BTreeMap<u32, i64> = st.local.iter().map(|(s, (_, c))| (*s, *c)).collect();
        assert_eq!(local, per_desk[&(*si, *desk)], "site {si} desk {desk}: local counts");
        assert!(st.connects >= 1 && st.rejections == 0, "site {si} desk {desk}: {st:?}");
    }
    let stats = ts.server.aggregator.stats();
    assert_eq!(stats.rejected, 0, "{stats:?}");
    let national = reader.totals(national(), None).await;
    assert_eq!(national.sites_reporting as usize, ts.registry.sites.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_restarted_from_its_state_file_does_not_double_count() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (si, sid) = ts.site_with_desks(2, 0);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("desk-2.json");
    let spawn = || {
        Reporter::spawn(ch.clone(), reporter_config(&ts.auth, &sid, 2), Arc::new(FileStore::new(&path)))
            .expect("spawn reporter")
    };

    let r = spawn();
    for _ in 0..5 {
        r.check_in(1, 2).await.expect("check-in");
    }
    r.check_in(2, 1).await.expect("check-in");
    flush(&r, "first run").await;
    r.shutdown().await;
    let saved = FileStore::new(&path).load().expect("read state").expect("state saved");
    assert!(saved.anchored);
    assert_eq!((saved.site.as_str(), saved.desk), (sid.as_str(), 2));
    let counts: Vec<(u32, i64)> = saved.sessions.iter().map(|(s, r)| (*s, r.count)).collect();
    assert_eq!(counts, vec![(1, 10), (2, 1)]);

    let r = spawn();
    wait_connected(&r, "second run connects").await;
    for _ in 0..2 {
        r.check_in(1, 3).await.expect("check-in");
    }
    flush(&r, "second run").await;
    let mut truth = Truth::default();
    truth.set(si, 1, 16);
    truth.set(si, 2, 1);
    assert_totals(&reader, &ts.registry, &truth).await;
    assert_eq!(r.status().connects, 1);
    r.shutdown().await;

    // The aggregator's registers of the desk match the file.
    let saved = FileStore::new(&path).load().expect("read state").expect("state saved");
    let st = ts.open(&ch, &sid, 2).await;
    let file: Vec<(u32, u64, i64)> = saved.sessions.iter().map(|(s, r)| (*s, r.seq, r.count)).collect();
    let server: Vec<(u32, u64, i64)> = st.resume.registers.iter().map(|r| (r.session, r.seq, r.count)).collect();
    assert_eq!(file, server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_stopped_before_its_acks_resends_on_restart() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (si, sid) = ts.site_with_desks(1, 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.json");
    let mut expected = 0;
    // Stop right after check-ins, whether or not they were sent or acknowledged; three times.
    for round in 1..=3 {
        let r = Reporter::spawn(ch.clone(), reporter_config(&ts.auth, &sid, 1), Arc::new(FileStore::new(&path)))
            .expect("spawn reporter");
        for _ in 0..round {
            r.check_in(3, 4).await.expect("check-in");
            expected += 4;
        }
        r.shutdown().await;
    }
    let r = Reporter::spawn(ch.clone(), reporter_config(&ts.auth, &sid, 1), Arc::new(FileStore::new(&path)))
        .expect("spawn reporter");
    flush(&r, "after restarts").await;
    assert_eq!(expected, 24);
    let mut truth = Truth::default();
    truth.set(si, 3, expected);
    assert_totals(&reader, &ts.registry, &truth).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_reporter_adopts_the_aggregators_state() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (si, sid) = ts.site_with_desks(1, 4);
    let dir = tempfile::tempdir().expect("tempdir");

    // The desk's old install reported 7 + 5.
    let old = memory_reporter(&ch, &ts.auth, &sid, 1);
    old.check_in(1, 7).await.expect("check-in");
    old.check_in(1, 5).await.expect("check-in");
    old.check_in(4, 2).await.expect("check-in");
    flush(&old, "old install").await;
    old.shutdown().await;
    assert_eq!(reader.count(site(&sid), Some(1)).await, 12);

    // A fresh install (empty state file) that connects first, then checks in.
    let new = Reporter::spawn(
        ch.clone(),
        reporter_config(&ts.auth, &sid, 1),
        Arc::new(FileStore::new(dir.path().join("fresh-1.json"))),
    )
    .expect("spawn reporter");
    wait_connected(&new, "fresh install connects").await;
    assert_eq!(new.status().local.get(&1).map(|(_, c)| *c), Some(12), "adopted the aggregator's count");
    new.check_in(1, 3).await.expect("check-in");
    new.check_in(2, 4).await.expect("check-in");
    flush(&new, "fresh install").await;
    new.shutdown().await;
    let mut truth = Truth::default();
    truth.set(si, 1, 15);
    truth.set(si, 2, 4);
    truth.set(si, 4, 2);
    assert_totals(&reader, &ts.registry, &truth).await;

    // A fresh install that checks in before it can reach the aggregator: its local counts are
    // check-ins since the install and go on top of the aggregator's.
    let proxy = Proxy::start(ts.addr()).await;
    proxy.set_blocked(true);
    let offline = Reporter::spawn(
        connect::lazy_channel(&proxy.url()).expect("lazy channel"),
        reporter_config(&ts.auth, &sid, 1),
        Arc::new(FileStore::new(dir.path().join("fresh-2.json"))),
    )
    .expect("spawn reporter");
    offline.check_in(1, 1).await.expect("check-in");
    offline.check_in(4, 6).await.expect("check-in");
    offline.check_in(3, 2).await.expect("check-in");
    let st = offline.status();
    assert!(!st.connected && st.connects == 0, "cannot have connected through a blocked proxy: {st:?}");
    proxy.set_blocked(false);
    flush(&offline, "offline fresh install").await;
    truth.set(si, 1, 16);
    truth.set(si, 4, 8);
    truth.set(si, 3, 2);
    assert_totals(&reader, &ts.registry, &truth).await;
    let local: Vec<(u32, i64)> = offline.status().local.iter().map(|(s, (_, c))| (*s, *c)).collect();
    assert_eq!(local, vec![(1, 16), (2, 4), (3, 2), (4, 8)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_correction_is_applied_and_audited() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(2, 2);
    let r = memory_reporter(&ch, &ts.auth, &sid, 2);
    r.check_in(2, 10).await.expect("check-in");
    flush(&r, "check-ins").await;
    r.correct(2, 6, "badge reader double-counted").await.expect("correction");
    flush(&r, "correction").await;
    assert_eq!(reader.count(site(&sid), Some(2)).await, 6);
    assert_eq!(reader.count(national(), None).await, 6);
    let c = reader.corrections(0).await.corrections;
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(
        (c[0].site_id.as_str(), c[0].desk, c[0].session, c[0].previous_count, c[0].count, c[0].reason.as_str()),
        (sid.as_str(), 2, 2, 10, 6, "badge reader double-counted")
    );
    // Check-ins after a correction count from the corrected value.
    r.check_in(2, 1).await.expect("check-in");
    flush(&r, "after correction").await;
    assert_eq!(reader.count(site(&sid), Some(2)).await, 7);
    assert_eq!(reader.corrections(0).await.corrections.len(), 1, "an increase is not a correction");
    assert!(matches!(r.correct(2, -1, "no").await, Err(ReporterError::Negative(-1))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_refuses_a_state_file_of_another_desk() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let (_, sid) = ts.site_with_desks(2, 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.json");
    let r = Reporter::spawn(ch.clone(), reporter_config(&ts.auth, &sid, 1), Arc::new(FileStore::new(&path)))
        .expect("spawn reporter");
    r.check_in(1, 1).await.expect("check-in");
    r.shutdown().await;
    match Reporter::spawn(ch.clone(), reporter_config(&ts.auth, &sid, 2), Arc::new(FileStore::new(&path))) {
        Err(ReporterError::WrongState { site, desk }) => assert_eq!((site.as_str(), desk), (sid.as_str(), 1)),
        Err(e) => panic!("expected WrongState, got {e}"),
        Ok(_) => panic!("a state file of desk 1 was accepted for desk 2"),
    }
}
