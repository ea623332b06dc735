//! Self-tests of the cluster-mode test support, and a record of how etcd 3.4 behaves here: a
//! 3-member cluster keeps serving writes with one member down, refuses them with two down (no
//! quorum) and serves them again once they are back with their data; the cuttable proxy
//! partitions a client from etcd and heals; the history checker passes a good history and
//! catches each kind of violation in a hand-made one.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    checker::{Finals, History, Read, Reg, Registers, check},
    etcd::{self, EtcdCluster, REQUEST_TIMEOUT},
    eventually, national, province,
    proxy::CutProxy,
    site, small_registry,
};
use etcd_client::Client;

/// Long enough for a leader election on a loaded machine.
const QUORUM_DEADLINE: Duration = Duration::from_secs(30);

async fn put(client: &Client, key: &str, value: &str) -> Result<i64, String> {
    let mut c = client.clone();
    let r = c.put(key, value, None).await.map_err(|e| format!("put {key}: {e}"))?;
    Ok(r.header().map_or(0, |h| h.revision()))
}

async fn get(client: &Client, key: &str) -> Result<Option<String>, String> {
    let mut c = client.clone();
    let r = c.get(key, None).await.map_err(|e| format!("get {key}: {e}"))?;
    Ok(r.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

/// Puts until one succeeds (a leader election may be under way), within `QUORUM_DEADLINE`.
async fn put_eventually(client: &Client, key: &str, value: &str) -> i64 {
    eventually(&format!("put {key}"), QUORUM_DEADLINE, || put(client, key, value)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_survive_one_loss_refuse_writes_without_quorum_and_recover() {
    let mut cluster = EtcdCluster::start(3).await;
    assert_eq!(cluster.endpoints().len(), 3);
    assert!(cluster.endpoints().iter().all(|e| e.starts_with("http://127.0.0.1:")), "{:?}", cluster.endpoints());
    let client = cluster.client().await;
    let r1 = put(&client, "k", "1").await.unwrap();
    assert_eq!(get(&client, "k").await.unwrap().as_deref(), Some("1"));
    // Every member serves the write (linearizable reads through each one).
    for i in 0..3 {
        assert_eq!(get(&cluster.member_client(i).await, "k").await.unwrap().as_deref(), Some("1"), "member {i}");
    }

    // The leader dies: the other two elect a new one and writes go on.
    let leader = eventually("the members agree on a leader", QUORUM_DEADLINE, || async {
        cluster.leader().await.ok_or_else(|| "no leader yet".to_owned())
    })
    .await;
    cluster.kill(leader);
    assert_eq!(cluster.running().len(), 2);
    let r2 = put_eventually(&client, "k", "2").await;
    assert!(r2 > r1, "revision {r2} after {r1}");

    // A second member dies: no quorum, a write fails (bounded by the request timeout) and a
    // linearizable read too. The value acknowledged before is not lost (checked after restart).
    let second = cluster.running()[0];
    cluster.kill(second);
    let started = Instant::now();
    let refused = put(&client, "k", "3").await;
    assert!(refused.is_err(), "a put without quorum succeeded: {refused:?}");
    assert!(started.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(3), "refusal took {:?}", started.elapsed());
    let survivor = cluster.running()[0];
    assert!(get(&cluster.member_client(survivor).await, "k").await.is_err(), "a linearizable read without quorum");

    // Both back on their data and ports: writes are served again, nothing acknowledged lost.
    cluster.restart_nowait(leader);
    cluster.restart(second).await;
    assert_eq!(cluster.running().len(), 3);
    let r4 = put_eventually(&client, "k2", "4").await;
    assert!(r4 > r2);
    // The client's balanced channel may still answer once with a restarted member's old connect
    // error ("tcp connect error ... refused") before it reconnects: callers retry.
    let v = eventually("get k after the restart", QUORUM_DEADLINE, || get(&client, "k")).await;
    assert!(matches!(v.as_deref(), Some("2" | "3")), "k is {v:?}: the acknowledged 2 (or the unacknowledged 3)");
    for i in 0..3 {
        assert_eq!(get(&cluster.member_client(i).await, "k2").await.unwrap().as_deref(), Some("4"), "member {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_run_side_by_side_and_are_removed_on_drop() {
    let (a, b) = tokio::join!(EtcdCluster::start(1), EtcdCluster::start(3));
    let dirs = (a.dir().to_path_buf(), b.dir().to_path_buf());
    let (ca, cb) = (a.client().await, b.client().await);
    put(&ca, "who", "a").await.unwrap();
    put(&cb, "who", "b").await.unwrap();
    assert_eq!(get(&ca, "who").await.unwrap().as_deref(), Some("a"));
    assert_eq!(get(&cb, "who").await.unwrap().as_deref(), Some("b"));
    let ports: Vec<String> = a.endpoints().into_iter().chain(b.endpoints()).collect();
    let mut unique = ports.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ports.len(), "two clusters share a port: {ports:?}");
    drop((a, b));
    assert!(!dirs.0.exists() && !dirs.1.exists(), "temporary directories left behind: {dirs:?}");
    // The members are gone: nothing answers on their ports.
    let gone = etcd::connect(&ports[..1]).await;
    assert!(get(&gone, "who").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_partitions_a_client_from_etcd_and_heals() {
    let cluster = EtcdCluster::start(1).await;
    let proxy = CutProxy::start(cluster.client_addr(0)).await;
    let client = etcd::connect(&[proxy.url()]).await;
    put(&client, "p", "1").await.unwrap();
    assert!(proxy.forwarded() >= 1);

    proxy.cut();
    assert!(proxy.is_cut());
    let started = Instant::now();
    let r = put(&client, "p", "2").await;
    assert!(r.is_err(), "a put went through a cut proxy: {r:?}");
    assert!(started.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(3), "took {:?}", started.elapsed());
    // Nothing got through: etcd still holds 1 (read directly).
    let direct = cluster.client().await;
    assert_eq!(get(&direct, "p").await.unwrap().as_deref(), Some("1"));
    // New connections are held, not refused (a blackhole, like lost packets).
    let fresh = etcd::connect(&[proxy.url()]).await;
    assert!(get(&fresh, "p").await.is_err());
    assert!(proxy.blackholed() >= 1, "no connection was blackholed");

    proxy.restore();
    eventually("writes through the healed proxy", QUORUM_DEADLINE, || put(&client, "p", "3")).await;
    assert_eq!(get(&direct, "p").await.unwrap().as_deref(), Some("3"));

    // A silent partition: the open connection stays open but carries nothing; the request times
    // out (no reset tells the client), and heals like a cut.
    let forwarded = proxy.forwarded();
    proxy.freeze();
    let started = Instant::now();
    let r = put(&client, "p", "4").await;
    assert!(r.is_err(), "a put went through a frozen proxy: {r:?}");
    let waited = started.elapsed();
    assert!(waited < REQUEST_TIMEOUT + Duration::from_secs(3), "took {waited:?}");
    assert_eq!(get(&direct, "p").await.unwrap().as_deref(), Some("3"));
    assert_eq!(proxy.forwarded(), forwarded, "the frozen proxy forwarded a new connection");
    proxy.restore();
    eventually("writes after the silent partition heals", QUORUM_DEADLINE, || put(&client, "p", "5")).await;
    assert_eq!(get(&direct, "p").await.unwrap().as_deref(), Some("5"));
}

// ───────────────────────────── the checker on hand-made histories ─────────────────────────────

/// Three registers in different places of the small registry, and a clock.
struct Fixture {
    registry: headcount::server::registry::Registry,
    regs: [Reg; 3],
    t0: Instant,
}

impl Fixture {
    fn new() -> Self {
        let registry = small_registry();
        let a = registry.sites[0].id.clone();
        let other = registry.sites.iter().find(|s| s.province != registry.sites[0].province).unwrap().id.clone();
        let regs = [Reg::new(&a, 1, 1), Reg::new(&a, 1, 2), Reg::new(&other, 1, 1)];
        Self { registry, regs, t0: Instant::now() }
    }

    fn t(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn read(
        &self,
        node: &str,
        scope: headcount::proto::v1::Scope,
        session: Option<u32>,
        value: i64,
        span: (u64, u64),
        fresh: bool,
    ) -> Read {
        Read { node: node.to_owned(), scope, session, value, start: self.t(span.0), end: self.t(span.1), fresh }
    }

    /// A good run: regs[0] to 5 (acked at seq 2), regs[1] to 3 (acked), regs[2] to 7 (3 acked,
    /// 7 attempted and applied but its ack never seen); reads in between, two nodes.
    fn good(&self) -> (History, Finals) {
        let h = History::default();
        let [r0, r1, r2] = self.regs.clone();
        h.attempt_at(r0.clone(), 2, self.t(0));
        h.ack_at(r0.clone(), 1, 2, self.t(10));
        h.attempt_at(r0.clone(), 5, self.t(20));
        h.attempt_at(r1.clone(), 3, self.t(20));
        h.attempt_at(r2.clone(), 3, self.t(20));
        h.ack_at(r2.clone(), 1, 3, self.t(25));
        h.ack_at(r0.clone(), 2, 5, self.t(30));
        h.ack_at(r1.clone(), 1, 3, self.t(30));
        h.attempt_at(r2.clone(), 7, self.t(40));
        // Fresh at 15: at least r0's 2; at most 2 + 0 (nothing else attempted by 16).
        h.read(self.read("n1", national(), None, 2, (15, 16), true));
        // Overlapping the acks at 25–30: anything in [2, 2+... attempted by 35].
        h.read(self.read("n2", national(), Some(1), 5, (22, 35), true));
        // A stale read (another node lagging) may be below the acks, never above the attempts.
        h.read(self.read("n2", national(), None, 2, (31, 32), false));
        h.read(self.read("n1", site(&r0.site), None, 8, (50, 51), true));
        let regs: Registers = [(r0.clone(), (2, 5)), (r1.clone(), (1, 3)), (r2.clone(), (2, 7))].into();
        let province_of = |r: &Reg| {
            let i = self.registry.site(&r.site).unwrap();
            self.registry.provinces[self.registry.sites[i as usize].province as usize].code.clone()
        };
        let totals = vec![
            (national(), None, 15),
            (national(), Some(1), 12),
            (national(), Some(2), 3),
            (province(&province_of(&r0)), None, 8),
            (province(&province_of(&r2)), Some(1), 7),
            (site(&r2.site), Some(2), 0),
        ];
        let finals = Finals {
            registers: [("n1".to_owned(), regs.clone()), ("n2".to_owned(), regs)].into(),
            totals: [("n1".to_owned(), totals.clone()), ("n2".to_owned(), totals)].into(),
        };
        (h, finals)
    }
}

/// Asserts that `check` fails and that one of its errors contains `want`.
fn expect_violation(h: &History, f: &Fixture, finals: &Finals, want: &str) {
    match check(h, &f.registry, finals) {
        Ok(s) => panic!("the checker passed a history with a {want:?} violation: {s:?}"),
        Err(errors) => assert!(errors.iter().any(|e| e.contains(want)), "expected {want:?} among {errors:#?}"),
    }
}

#[test]
fn the_checker_passes_a_good_history() {
    let f = Fixture::new();
    let (h, finals) = f.good();
    let s = check(&h, &f.registry, &finals).unwrap_or_else(|e| panic!("a good history failed: {e:#?}"));
    assert_eq!((s.attempts, s.acks, s.reads, s.fresh_reads, s.final_totals), (5, 4, 4, 3, 12), "{s:?}");
}

#[test]
fn the_checker_catches_an_acknowledged_write_lost_on_one_node() {
    let f = Fixture::new();
    let (h, mut finals) = f.good();
    // n2 holds regs[0] at seq 1: the acknowledged seq 2 is lost there.
    finals.registers.get_mut("n2").unwrap().insert(f.regs[0].clone(), (1, 2));
    expect_violation(&h, &f, &finals, "(a) n2:");
    // The same seq with another count is a loss too.
    let (h, mut finals) = f.good();
    finals.registers.get_mut("n1").unwrap().insert(f.regs[1].clone(), (1, 4));
    expect_violation(&h, &f, &finals, "seq 1 acknowledged count 3 but holds 4");
}

#[test]
fn the_checker_catches_totals_that_are_not_the_sum_of_the_registers() {
    let f = Fixture::new();
    let (h, mut finals) = f.good();
    let totals = finals.totals.get_mut("n2").unwrap();
    totals[3].2 += 1; // a province off by one on one node
    expect_violation(&h, &f, &finals, "(b) n2:");
    // Nodes that disagree on a register not acknowledged (only attempted) are caught too.
    let (h, mut finals) = f.good();
    finals.registers.get_mut("n2").unwrap().insert(f.regs[2].clone(), (1, 3));
    expect_violation(&h, &f, &finals, "hold different registers");
}

#[test]
fn the_checker_catches_a_read_below_what_was_acknowledged() {
    let f = Fixture::new();
    let (h, finals) = f.good();
    // Fresh, after every ack (2 + 5 ... national session 1 acked by 31: r0 5 + r2 3 = 8), reads 5.
    h.read(f.read("n1", national(), Some(1), 5, (31, 33), true));
    expect_violation(&h, &f, &finals, "(c) National \"\" session Some(1): read 5 on n1 (fresh: true), outside [8,");
}

#[test]
fn the_checker_catches_a_read_above_what_was_attempted() {
    let f = Fixture::new();
    let (h, finals) = f.good();
    // Before 20 only regs[0] = 2 was attempted: 3 cannot have been read, fresh or not.
    h.read(f.read("n2", national(), None, 3, (12, 18), false));
    expect_violation(&h, &f, &finals, "outside [0, 2]");
}

#[test]
fn the_checker_refuses_histories_it_cannot_judge() {
    let f = Fixture::new();
    // A count going down with a higher seq (a correction): the bounds would not hold.
    let (h, finals) = f.good();
    h.ack_at(f.regs[0].clone(), 3, 1, f.t(60));
    expect_violation(&h, &f, &finals, "not a monotone workload");
    // An ack of a count never attempted.
    let (h, finals) = f.good();
    h.ack_at(f.regs[1].clone(), 2, 9, f.t(60));
    expect_violation(&h, &f, &finals, "never attempted");
    // Nothing gathered at the end.
    let (h, _) = f.good();
    expect_violation(&h, &f, &Finals::default(), "no node's final registers");
}
