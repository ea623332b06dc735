//! The agent's state and the register it writes, end to end: a failed save changes nothing,
//! two writers on one register, rollups of two streams in order, seq arithmetic at `u64::MAX`,
//! install slots that survive an aggregator restart, and the desk endpoint under concurrent scans.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::*;
use headcount::{
    client::{
        Reporter, ReporterConfig, ReporterError,
        reporter::state::{LocalState, MemoryStore, StateStore, StoreError},
        site::Agent,
    },
    server::{Aggregator, RunningServer, Transport, durability::DurabilityConfig},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A memory store whose `fail_at`-th save (1-based) fails once.
struct FlakyStore {
    inner: MemoryStore,
    saves: AtomicUsize,
    fail_at: AtomicUsize,
}

impl StateStore for FlakyStore {
    fn load(&self) -> Result<Option<LocalState>, StoreError> {
        self.inner.load()
    }
    fn save(&self, state: &LocalState) -> Result<(), StoreError> {
        if self.saves.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at.load(Ordering::SeqCst) {
            return Err(StoreError::Io { path: "flaky".into(), source: std::io::Error::other("disk full (injected)") });
        }
        self.inner.save(state)
    }
    fn blocking(&self) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_save_of_the_adopted_state_changes_nothing_and_the_total_stays_exact() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 12);
    // The aggregator holds 100 for desk 1 (an earlier install).
    let mut raw = ts.open(&ch, &sid, 1).await;
    let ack = raw.send_batch(vec![report(1, 7, 100)]).await;
    assert!(ack.rejections.is_empty(), "{ack:?}");
    drop(raw);
    // A fresh install records 5 check-ins while the aggregator is unreachable.
    let proxy = Proxy::start(ts.addr()).await;
    proxy.set_blocked(true);
    let via_proxy = tonic::transport::Endpoint::from_shared(proxy.url()).expect("url").connect_lazy();
    let store =
        Arc::new(FlakyStore { inner: MemoryStore::new(), saves: AtomicUsize::new(0), fail_at: AtomicUsize::new(3) });
    let r = Reporter::spawn(via_proxy.clone(), reporter_config(&ts.auth, &sid, 1), store.clone()).expect("spawn");
    // Save 1: the fresh state, written at start; save 2: the check-ins.
    r.check_in(1, 5).await.expect("the check-ins' save succeeds");
    // The aggregator comes back; the save of the merged state (the third save) fails once.
    proxy.set_blocked(false);
    flush(&r, "after the failed save").await;
    assert_eq!(r.status().local[&1].1, 105);
    assert_eq!(store.inner.load().expect("load").expect("saved").sessions[&1].count, 105);
    r.shutdown().await;
    // Restarted from the saved state: still 105, not 110.
    let r = Reporter::spawn(via_proxy, reporter_config(&ts.auth, &sid, 1), store.clone()).expect("respawn");
    wait_connected(&r, "restart").await;
    r.check_in(1, 1).await.expect("check-in");
    flush(&r, "after restart").await;
    assert_eq!(reader.count(site(&sid), Some(1)).await, 106);
    assert!(store.saves.load(Ordering::SeqCst) >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_total_outside_what_existed_with_two_streams_on_one_register() {
    let ts = start_small().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 13);
    for round in 0..20u64 {
        let base = round * 3_000;
        let (ca, cb) = (ts.channel().await, ts.channel().await);
        let mut a = ts.open(&ca, &sid, 1).await;
        let mut b = ts.open(&cb, &sid, 1).await;
        // Start at 0 (a correction when the register holds 1,000 from the last round).
        let ack = a.send_batch(vec![correction(1, base + 1, 0, "round start")]).await;
        assert!(ack.rejections.is_empty(), "{ack:?}");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (reader, sid, stop) = (reader.clone(), sid.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..10_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    seen.push(reader.count(site(&sid), Some(1)).await);
                }
                seen
            })
        };
        // One stream raises the count to 1,000 in a large batch, the other corrects it to 0
        // with a newer seq, at the same time.
        let rise: Vec<_> = (1..=1000).map(|i| report(1, base + 1 + i as u64, i)).collect();
        let (ra, rb) =
            tokio::join!(a.send_batch(rise), b.send_batch(vec![correction(1, base + 2_000, 0, "scanned twice")]));
        assert!(ra.rejections.is_empty() && rb.rejections.is_empty(), "{ra:?} {rb:?}");
        stop.store(true, Ordering::SeqCst);
        let seen = within("watcher", watcher).await.expect("watcher task");
        let bad: Vec<i64> = seen.iter().copied().filter(|n| *n < 0 || *n > 1000).collect();
        assert!(bad.is_empty(), "round {round}: readers saw totals that never existed: {bad:?}");
        let fin = reader.count(site(&sid), Some(1)).await;
        assert_eq!(fin, 0, "round {round}: the newest seq (the correction) wins");
        // Leave the register at a seq above this round's.
        let ack = a.send_batch(vec![report(1, base + 2_500, 0)]).await;
        assert!(ack.rejections.is_empty(), "{ack:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_one_register_rebase_and_never_take_the_others_state_as_their_ack() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 14);
    // Writer A (no install id: the desk number's register) counts 3.
    let a = Reporter::spawn(ch.clone(), reporter_config(&ts.auth, &sid, 1), Arc::new(MemoryStore::new())).expect("a");
    for _ in 0..3 {
        a.check_in(1, 1).await.expect("a check-in");
    }
    flush(&a, "a").await;
    let a_state = a.status().local[&1];
    assert_eq!(a_state.1, 3);
    // Writer B runs from a copy of A's state file taken at seq 1 with another count (the same
    // seq shown with another count, once A moves on): B counts on its own.
    let copy = MemoryStore::new();
    copy.save(&LocalState {
        version: 1,
        site: sid.clone(),
        desk: 1,
        anchored: true,
        sessions: [(
            1,
            headcount::client::reporter::state::LocalRegister { seq: a_state.0, count: 1, ..Default::default() },
        )]
        .into(),
        ..LocalState::default()
    })
    .expect("seed copy");
    let b = Reporter::spawn(ch.clone(), reporter_config(&ts.auth, &sid, 1), Arc::new(copy)).expect("b");
    flush(&b, "b resumes: same seq, another count → re-sent above it").await;
    let bs = b.status();
    assert!(bs.local[&1].0 > a_state.0, "b rebased above a's seq: {bs:?}");
    assert_eq!(bs.acked[&1], bs.local[&1], "b's ack is b's own state: {bs:?}");
    assert_eq!(reader.count(site(&sid), Some(1)).await, 1);
    // A checks in again: its seq collides with B's (ABORTED) and it rebases (+1).
    a.check_in(1, 1).await.expect("a check-in");
    flush(&a, "a after the conflict").await;
    let st = a.status();
    assert!(st.rejections >= 1 || st.foreign >= 1, "a was told: {st:?}");
    assert_eq!(st.acked[&1], st.local[&1], "a's ack is a's own state, not b's: {st:?}");
    assert_eq!(reader.count(site(&sid), Some(1)).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_u64_max_from_the_aggregator_cannot_overflow() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let (_, sid) = ts.site_with_desks(1, 15);
    let mut raw = ts.open(&ch, &sid, 1).await;
    let ack = raw.send_batch(vec![report(1, u64::MAX, 7)]).await;
    assert!(ack.rejections.is_empty(), "{ack:?}");
    // An anchored agent adopts the newer state; its next change has no seq left.
    let store = MemoryStore::new();
    store
        .save(&LocalState { version: 1, site: sid.clone(), desk: 1, anchored: true, ..LocalState::default() })
        .expect("seed");
    let r = Reporter::spawn(ch.clone(), reporter_config(&ts.auth, &sid, 1), Arc::new(store)).expect("spawn");
    wait_connected(&r, "adopts u64::MAX").await;
    assert_eq!(r.status().local[&1], (u64::MAX, 7));
    assert!(matches!(r.check_in(1, 1).await, Err(ReporterError::SeqExhausted(1))));
    assert_eq!(r.status().local[&1], (u64::MAX, 7), "nothing changed");
    // A fresh install with check-ins would need u64::MAX + 1: it stops, it does not wrap.
    let fresh = Reporter::spawn(ch.clone(), reporter_config(&ts.auth, &sid, 1), Arc::new(MemoryStore::new()))
        .expect("spawn fresh");
    match fresh.check_in(1, 1).await {
        // Resumed before the check-in: it adopted u64::MAX and has no seq left.
        Err(ReporterError::SeqExhausted(1)) => {}
        // Recorded before the resume: reconciling needs u64::MAX + 1, so it stops.
        Ok(()) => assert!(matches!(within("fresh flush", fresh.flush(DEADLINE)).await, Err(ReporterError::Fatal(_)))),
        other => panic!("unexpected: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_slots_survive_an_aggregator_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = small_registry();
    let auth = headcount::server::Auth::new(SECRET).expect("secret");
    let start = |registry| {
        let (agg, _) = Aggregator::open(registry, test_config(), DurabilityConfig::new(dir.path())).expect("open");
        let transport = Transport { grace: Duration::from_millis(500), ..Transport::default() };
        RunningServer::start("127.0.0.1:0".parse().expect("addr"), agg, auth.clone(), transport)
    };
    let sid = registry.sites[16].id.clone();
    let store = Arc::new(MemoryStore::new());
    let config = ReporterConfig { agent_install: true, ..reporter_config(&auth, &sid, 1) };
    let server = start(registry.clone()).await.expect("start");
    let ch = channel_to(&server.url()).await;
    let r = Reporter::spawn(ch, config.clone(), store.clone()).expect("spawn");
    for b in ["A", "B", "C"] {
        r.badge(1, b).await.expect("badge");
    }
    flush(&r, "before restart").await;
    let slot = r.status().agent_slot;
    assert_eq!(slot, 1);
    r.shutdown().await;
    server.stop().await.expect("stop");

    let server = start(registry.clone()).await.expect("restart");
    let ch = channel_to(&server.url()).await;
    let reader = Reader::new(ch.clone(), Some(auth.read_token("t")));
    let r = Reporter::spawn(ch.clone(), config.clone(), store).expect("respawn");
    r.badge(1, "D").await.expect("badge");
    flush(&r, "after restart").await;
    assert_eq!(r.status().agent_slot, slot, "same install, same slot");
    let other = Reporter::spawn(ch, config, Arc::new(MemoryStore::new())).expect("other install");
    other.badge(1, "E").await.expect("badge");
    flush(&other, "other install").await;
    assert_eq!(other.status().agent_slot, 2);
    assert_eq!(other.status().site_agents, 2);
    assert_eq!(reader.count(site(&sid), Some(1)).await, 5);
    server.stop().await.expect("stop");
}

/// A bare HTTP/1.1 POST on 127.0.0.1; returns the response body.
async fn post(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> String {
    let mut s = within("connect desk", tokio::net::TcpStream::connect(addr)).await.expect("connect desk endpoint");
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: desk\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut resp = Vec::new();
    within("desk answer", s.read_to_end(&mut resp)).await.expect("read");
    let text = String::from_utf8_lossy(&resp).into_owned();
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_of_one_badge_from_two_desks_count_once() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 17);
    let config = ReporterConfig { agent_install: true, ..reporter_config(&ts.auth, &sid, 1) };
    let reporter = Reporter::spawn(ch, config, Arc::new(MemoryStore::new())).expect("spawn");
    wait_connected(&reporter, "agent").await;
    let agent = Arc::new(Agent::new(reporter, Some(1)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(headcount::client::desk::serve(listener, agent.clone(), std::future::pending()));
    for round in 0..10 {
        let badge = format!("BADGE-{round}");
        let answers = futures_join(addr, &badge).await;
        let counted = answers.iter().filter(|a| a.contains("\"outcome\":\"counted\"")).count();
        let already = answers.iter().filter(|a| a.contains("\"outcome\":\"already_checked_in\"")).count();
        assert_eq!((counted, already), (1, 1), "{answers:?}");
    }
    flush(agent.reporter(), "desk badges").await;
    assert_eq!(reader.count(site(&sid), Some(1)).await, 10);
    let status = {
        let mut s = within("connect", tokio::net::TcpStream::connect(addr)).await.expect("connect");
        s.write_all(b"GET /status HTTP/1.1\r\nHost: desk\r\nConnection: close\r\n\r\n").await.expect("write");
        let mut resp = Vec::new();
        within("status", s.read_to_end(&mut resp)).await.expect("read");
        String::from_utf8_lossy(&resp).into_owned()
    };
    assert!(status.contains("\"connected\":true") && status.contains("\"count\":10"), "{status}");
    let page = {
        let mut s = within("connect", tokio::net::TcpStream::connect(addr)).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: desk\r\nConnection: close\r\n\r\n").await.expect("write");
        let mut resp = Vec::new();
        within("page", s.read_to_end(&mut resp)).await.expect("read");
        String::from_utf8_lossy(&resp).into_owned()
    };
    assert!(page.contains("already checked in") && !page.contains("http://") && !page.contains("https://"));
    server.abort();
}

async fn futures_join(addr: std::net::SocketAddr, badge: &str) -> [String; 2] {
    let (a, b) = tokio::join!(post(addr, "/badge", badge.as_bytes()), post(addr, "/badge", badge.as_bytes()));
    [a, b]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_beyond_the_cap_are_refused_with_a_clear_message() {
    let ts =
        start_server(small_registry(), headcount::server::AggregatorConfig { max_agents_per_site: 1, ..test_config() })
            .await;
    let ch = ts.channel().await;
    let (_, sid) = ts.site_with_desks(1, 21);
    let config = ReporterConfig { agent_install: true, ..reporter_config(&ts.auth, &sid, 1) };
    let first = Reporter::spawn(ch.clone(), config.clone(), Arc::new(MemoryStore::new())).expect("first");
    first.badge(1, "A").await.expect("badge");
    flush(&first, "first install").await;
    let second = Reporter::spawn(ch, config, Arc::new(MemoryStore::new())).expect("second");
    let mut rx = second.watch_status();
    let st = within(
        "second install refused",
        rx.wait_for(|s| s.last_error.as_deref().is_some_and(|e| e.contains("--max-agents-per-site"))),
    )
    .await
    .expect("reporter running")
    .clone();
    assert!(!st.connected && st.last_error.as_deref().is_some_and(|e| e.contains("ResourceExhausted")), "{st:?}");
    assert_eq!(first.status().agent_slot, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_badge_whose_save_fails_is_not_recorded_and_counts_when_scanned_again() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 22);
    let store =
        Arc::new(FlakyStore { inner: MemoryStore::new(), saves: AtomicUsize::new(0), fail_at: AtomicUsize::new(0) });
    let config = ReporterConfig { agent_install: true, ..reporter_config(&ts.auth, &sid, 1) };
    let r = Reporter::spawn(ch, config, store.clone()).expect("spawn");
    wait_connected(&r, "agent").await;
    // The next save (badge A) fails.
    store.fail_at.store(store.saves.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
    assert!(matches!(r.badge(1, "A").await, Err(ReporterError::Store(_))));
    assert!(r.status().local.get(&1).is_none_or(|(_, c)| *c == 0), "{:?}", r.status());
    let again = r.badge(1, "A").await.expect("saved this time");
    assert!(again.counted && again.count == 1, "{again:?}");
    assert!(!r.badge(1, "A").await.expect("repeat").counted);
    flush(&r, "badge A").await;
    assert_eq!(reader.count(site(&sid), Some(1)).await, 1);
    assert_eq!(store.inner.load().expect("load").expect("saved").sessions[&1].badges.len(), 1);
}
