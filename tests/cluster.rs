//! Cluster mode end to end (issue 13): real `headcount-server` nodes (`--etcd … --node …`) over a
//! real 3-member etcd cluster started by each test on free 127.0.0.1 ports, real reporters given
//! every node's address, and a history checker over the whole run (every acknowledged register
//! state survives on every node; each node's totals are the sum of its registers; no total read
//! outside [acknowledged, attempted]). Failures: `kill -9` of a node mid-load, one and two etcd
//! members killed, a node cut off from etcd through proxies; two nodes writing one register;
//! read-your-writes across nodes with `min_revision`.

#![allow(clippy::unwrap_used)]

mod cluster_support;
mod common;
mod server_process;

use std::time::{Duration, Instant};

use cluster_support::{
    Cluster, LEASE_TTL_S,
    workload::{FLUSH_DEADLINE, Readers, Workload, assert_counts_are_the_model, finals},
};
use common::{
    DEADLINE, SECRET,
    checker::{History, Reg, Summary, check},
    correction, eventually, national, open_stream, report, site, small_registry,
};
use headcount::{
    proto::v1::{CorrectionsRequest, TotalsRequest},
    server::Auth,
};
use tonic::Code;

/// Sites in the load tests (of the small registry's 60), and their desks (1 or 2 each).
const SITES: usize = 36;

/// Runs the checker, panics listing the violations, and checks it looked at something.
fn judge(history: &History, cluster: &Cluster, finals: &common::checker::Finals) -> Summary {
    let summary = check(history, &cluster.registry, finals).unwrap_or_else(|errors| {
        panic!(
            "{} violations:\n  {}\nnode logs:\n{}",
            errors.len(),
            errors.iter().take(30).cloned().collect::<Vec<_>>().join("\n  "),
            cluster.logs()
        )
    });
    assert!(summary.attempts > 0 && summary.acks > 0 && summary.final_totals > 0, "an empty history: {summary:?}");
    summary
}

/// The sites of the workload.
fn site_ids(w: &Workload) -> Vec<String> {
    let mut v: Vec<String> = w.desks.iter().map(|d| d.site.clone()).collect();
    v.dedup();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_many_sites_are_exact_on_every_node_at_every_level() {
    let c = Cluster::start(small_registry(), 3, &[]).await;
    let mut w = Workload::spawn(&c, SITES, &[0, 1, 2], 1);
    let readers = Readers::start(&c, &[0, 1, 2], w.history.clone(), &site_ids(&w), 10).await;
    for round in 1..=20 {
        w.round(None).await;
        if round % 5 == 0 {
            w.flush_all(FLUSH_DEADLINE).await;
        }
    }
    // Every site reported on its home node: a third of the streams on each.
    for d in &w.desks {
        assert_eq!(d.reporter.status().aggregator, c.url(d.home), "{}/{}", d.site, d.desk);
    }
    let reads = readers.stop().await;
    assert!(reads.iter().all(|&n| n > 0), "a node was never read: {reads:?}");
    let (model, desks) = (w.model(), w.desk_ids());
    let history = w.shutdown().await;
    c.wait_caught_up(&[0, 1, 2]).await;
    let finals = finals(&c, &[0, 1, 2], &desks).await;
    assert_counts_are_the_model(&finals, &model);
    let s = judge(&history, &c, &finals);
    assert!(s.fresh_reads > 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_mid_load_fails_its_sites_over_and_loses_nothing_acknowledged() {
    let mut c = Cluster::start(small_registry(), 3, &[]).await;
    let mut w = Workload::spawn(&c, SITES, &[0, 1, 2], 2);
    let readers = Readers::start(&c, &[1, 2], w.history.clone(), &site_ids(&w), 20).await;
    for _ in 0..6 {
        w.round(None).await;
    }
    w.flush_all(FLUSH_DEADLINE).await;
    let on_victim: Vec<usize> = (0..w.desks.len()).filter(|&i| w.desks[i].home == 0).collect();
    assert!(!on_victim.is_empty() && on_victim.len() < w.desks.len());
    let streams = c.stats(0).await.unwrap().streams_open as usize;
    assert!(streams >= on_victim.len(), "node 0 holds {streams} streams, expected its {} desks", on_victim.len());

    // Check-ins in flight (handed over, not yet acknowledged) when the node dies.
    w.round(None).await;
    w.round(Some(&on_victim)).await;
    let killed = Instant::now();
    c.kill9(0);
    for _ in 0..6 {
        w.round(None).await;
    }
    w.flush_all(FLUSH_DEADLINE).await;
    eprintln!("every site acknowledged on the survivors {:?} after the kill", killed.elapsed());
    for &i in &on_victim {
        let st = w.desks[i].reporter.status();
        assert_ne!(st.aggregator, c.url(0), "{}/{} still on the dead node", w.desks[i].site, w.desks[i].desk);
        assert!(st.connects >= 2, "{}/{} never reconnected: {st:?}", w.desks[i].site, w.desks[i].desk);
    }
    readers.stop().await;
    let (model, desks) = (w.model(), w.desk_ids());
    let history = w.shutdown().await;
    c.wait_caught_up(&[1, 2]).await;
    let finals = finals(&c, &[1, 2], &desks).await;
    assert_counts_are_the_model(&finals, &model);
    judge(&history, &c, &finals);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_losing_one_member_keeps_ingest_two_stop_acks_and_their_return_ends_exact() {
    let mut c = Cluster::start(small_registry(), 3, &[]).await;
    let mut w = Workload::spawn(&c, 24, &[0, 1, 2], 3);
    let readers = Readers::start(&c, &[0, 1, 2], w.history.clone(), &site_ids(&w), 30).await;
    for _ in 0..4 {
        w.round(None).await;
    }
    w.flush_all(FLUSH_DEADLINE).await;

    // One member (the leader) down: a quorum is left, ingest goes on.
    let leader = eventually("an etcd leader", DEADLINE, || async {
        c.etcd.leader().await.ok_or_else(|| "no leader".to_owned())
    })
    .await;
    c.etcd.kill(leader);
    for _ in 0..4 {
        w.round(None).await;
    }
    w.flush_all(FLUSH_DEADLINE).await;

    // Two down: no quorum. Nothing attempted from now on may be acknowledged until they return.
    let second = c.etcd.running()[0];
    c.etcd.kill(second);
    eventually("etcd refuses reads without quorum", DEADLINE, || async {
        match c.etcd_revision().await {
            Err(_) => Ok(()),
            Ok(r) => Err(format!("etcd still answers at revision {r}")),
        }
    })
    .await;
    let lost = Instant::now();
    let before = w.model();
    for _ in 0..3 {
        w.round(None).await;
    }
    // Within the lease TTL the nodes end their streams and refuse new ones: every reporter is
    // disconnected, and stays unacknowledged.
    eventually("every reporter is disconnected", DEADLINE, || async {
        let connected = w.desks.iter().filter(|d| d.reporter.status().connected).count();
        if connected == 0 { Ok(()) } else { Err(format!("{connected} reporters still connected")) }
    })
    .await;
    for i in 0..3 {
        let auth = Auth::new(SECRET).unwrap();
        let s = &c.registry.sites[50].id;
        let ch = common::channel_to(&c.url(i)).await;
        let r = open_stream(ch, Some(&auth.site_token(s)), Some(s), Some("1")).await;
        assert_eq!(
            r.err().map(|e| e.code()),
            Some(Code::Unavailable),
            "node {i} accepted a stream without etcd quorum"
        );
    }
    let back = Instant::now();
    assert!(w.desks.iter().all(|d| !d.reporter.status().all_settled()), "a reporter had nothing pending");

    c.etcd.restart_nowait(leader);
    c.etcd.restart(second).await;
    for _ in 0..3 {
        w.round(None).await;
    }
    w.flush_all(FLUSH_DEADLINE).await;
    readers.stop().await;
    let (model, desks) = (w.model(), w.desk_ids());
    let history = w.shutdown().await;
    let late: Vec<String> = history
        .acks()
        .into_iter()
        .filter(|(reg, _, count, at)| *at > lost && *at < back && *count > before.get(reg).copied().unwrap_or(0))
        .map(|a| format!("{a:?}"))
        .collect();
    assert!(late.is_empty(), "acknowledged without an etcd quorum: {late:?}");
    c.wait_caught_up(&[0, 1, 2]).await;
    let finals = finals(&c, &[0, 1, 2], &desks).await;
    assert_counts_are_the_model(&finals, &model);
    judge(&history, &c, &finals);
}

/// How soon a node that lost etcd must end its streams: its lease TTL, plus up to two etcd
/// request timeouts (3 s) for the keepalive that notices, plus slack for a loaded machine.
const FENCE_BOUND: Duration = Duration::from_secs(LEASE_TTL_S + 8);

/// A node cut off from etcd, its sites failed over: what the two cut-off tests share.
struct CutOff {
    c: Cluster,
    w: Workload,
    readers: Readers,
    /// A site outside the workload whose desk 1 reported on node 0 before the cut.
    probe: String,
}

/// Starts 3 nodes (node 0 behind proxies to etcd) under load, cuts node 0 off (`silent`: its
/// connections to etcd hang instead of closing) and checks that it stops acknowledging (its
/// stream ends `UNAVAILABLE`, new ones are refused) and that its sites fail over and get
/// everything acknowledged on the other nodes.
async fn cut_off_node_0(seed: u64, silent: bool) -> CutOff {
    let c = Cluster::start(small_registry(), 3, &[0]).await;
    let mut w = Workload::spawn(&c, 24, &[0, 1, 2], seed);
    let readers = Readers::start(&c, &[0, 1, 2], w.history.clone(), &site_ids(&w), seed * 10).await;
    for _ in 0..4 {
        w.round(None).await;
    }
    w.flush_all(FLUSH_DEADLINE).await;
    let on_cut: Vec<usize> = (0..w.desks.len()).filter(|&i| w.desks[i].home == 0).collect();

    // A probe stream on node 0, acknowledged before the cut.
    let probe = c.registry.sites[50].id.clone();
    let reg = Reg::new(&probe, 1, 1);
    let ch = common::channel_to(&c.url(0)).await;
    let mut raw = open_stream(ch, Some(&c.auth.site_token(&probe)), Some(&probe), Some("1")).await.unwrap();
    w.history.attempt(reg.clone(), 5);
    let ack = raw.send_batch(vec![report(1, 1, 5)]).await;
    assert_eq!(ack.applied.first().map(|r| (r.seq, r.count)), Some((1, 5)));
    w.history.ack(reg.clone(), 1, 5);

    if silent {
        c.freeze(0);
    } else {
        c.cut(0);
    }
    let cut = Instant::now();
    w.history.attempt(reg.clone(), 6);
    raw.send(common::batch(vec![report(1, 2, 6)])).await;
    match tokio::time::timeout(DEADLINE, raw.rx.message()).await {
        Ok(Err(s)) if s.code() == Code::Unavailable => {}
        other => panic!(
            "node 0 cut off from etcd answered {other:?} after {:?}, expected its stream to end UNAVAILABLE\n{}",
            cut.elapsed(),
            c.logs()
        ),
    }
    let fenced = cut.elapsed();
    eprintln!(
        "the cut-off node (silent: {silent}) ended its stream {fenced:?} after the cut (lease TTL {LEASE_TTL_S}s)"
    );
    assert!(fenced <= FENCE_BOUND, "node 0 kept its stream {fenced:?} after it lost etcd (bound {FENCE_BOUND:?})");
    c.eventually("node 0 refuses new streams while cut off", || async {
        let ch = common::channel_to(&c.url(0)).await;
        match open_stream(ch, Some(&c.auth.site_token(&probe)), Some(&probe), Some("1")).await {
            Err(s) if s.code() == Code::Unavailable => Ok(()),
            other => Err(format!("{:?}", other.map(|s| s.resume))),
        }
    })
    .await;
    // Its sites fail over and everything is acknowledged on the other nodes.
    for _ in 0..4 {
        w.round(None).await;
    }
    w.flush_all(FLUSH_DEADLINE).await;
    for &i in &on_cut {
        assert_ne!(w.desks[i].reporter.status().aggregator, c.url(0), "{}/{}", w.desks[i].site, w.desks[i].desk);
    }
    CutOff { c, w, readers, probe }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_silently_partitioned_from_etcd_stops_acking_and_its_sites_fail_over() {
    let CutOff { c, w, readers, probe } = cut_off_node_0(4, true).await;
    readers.stop().await;
    let (model, mut desks) = (w.model(), w.desk_ids());
    let history = w.shutdown().await;
    c.wait_caught_up(&[1, 2]).await;
    desks.push((probe, 1));
    let finals = finals(&c, &[1, 2], &desks).await;
    assert_counts_are_the_model(&finals, &model);
    judge(&history, &c, &finals);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_etcd_catches_up_when_it_returns() {
    let CutOff { c, w, readers, probe } = cut_off_node_0(5, false).await;
    c.restore(0);
    c.eventually("node 0 accepts streams again", || async {
        let ch = common::channel_to(&c.url(0)).await;
        open_stream(ch, Some(&c.auth.site_token(&probe)), Some(&probe), Some("1"))
            .await
            .map(drop)
            .map_err(|s| format!("{s:?}"))
    })
    .await;
    readers.stop().await;
    let (model, mut desks) = (w.model(), w.desk_ids());
    let history = w.shutdown().await;
    // Its Stats.revision reaches etcd's (so the others'), and its totals are exact.
    c.wait_caught_up(&[0, 1, 2]).await;
    desks.push((probe, 1));
    let finals = finals(&c, &[0, 1, 2], &desks).await;
    assert_counts_are_the_model(&finals, &model);
    judge(&history, &c, &finals);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_writing_one_register_the_higher_seq_wins_on_every_node() {
    use rand::{Rng, SeedableRng};
    let c = Cluster::start(small_registry(), 3, &[]).await;
    let s = c.registry.sites[7].id.clone();
    let token = c.auth.site_token(&s);
    let open = |i: usize| {
        let (url, token, s) = (c.url(i), token.clone(), s.clone());
        async move { open_stream(common::channel_to(&url).await, Some(&token), Some(&s), Some("1")).await.unwrap() }
    };
    let (mut a, mut b) = (open(0).await, open(1).await);
    let readers = [c.reader(0).await, c.reader(1).await, c.reader(2).await];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut top = 0u64;
    let mut final_count = 0;
    for round in 0..12u64 {
        // Two different seqs above everything so far; which node gets the higher one is random.
        let low = top + 1 + rng.random_range(0..3);
        let (seq_a, seq_b) = if rng.random_bool(0.5) { (low, low + 1) } else { (low + 1, low) };
        let (count_a, count_b) = (100 + round as i64 * 10 + 1, 100 + round as i64 * 10 + 2);
        let (ack_a, ack_b) =
            tokio::join!(a.send_batch(vec![report(1, seq_a, count_a)]), b.send_batch(vec![report(1, seq_b, count_b)]));
        top = seq_a.max(seq_b);
        final_count = if seq_a > seq_b { count_a } else { count_b };
        for ack in [&ack_a, &ack_b] {
            for r in &ack.applied {
                assert!(r.seq <= top, "an ack claims seq {} above everything sent ({top})", r.seq);
            }
        }
        // Every node converges on the higher seq (whichever node applied it and in which order).
        for (i, reader) in readers.iter().enumerate() {
            c.eventually(&format!("round {round} node {i}: seq {top} ({final_count}) wins"), || async {
                let t = reader.try_totals(site(&s), Some(1)).await.map_err(|e| format!("{e:?}"))?;
                if t.count == final_count {
                    Ok(())
                } else {
                    Err(format!("count {} at revision {}; acks {ack_a:?} {ack_b:?}", t.count, t.revision))
                }
            })
            .await;
        }
    }
    drop((a, b));
    for (i, reader) in readers.iter().enumerate() {
        let got = server_process::resumed(&c.url(i), &s, 1).await;
        assert_eq!(got, vec![(1, top, final_count)], "node {i}");
        assert_eq!(reader.count(national(), None).await, final_count, "node {i} national");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_acked_on_one_node_is_read_on_another_with_min_revision() {
    let c = Cluster::start(small_registry(), 2, &[]).await;
    let s = c.registry.sites[3].id.clone();
    let ch = common::channel_to(&c.url(0)).await;
    let mut raw = open_stream(ch, Some(&c.auth.site_token(&s)), Some(&s), Some("1")).await.unwrap();
    let first = raw.send_batch(vec![report(2, 1, 10)]).await;
    let fixed = raw.send_batch(vec![correction(2, 2, 7, "scanned a box twice")]).await;
    assert!(
        first.revision > 0 && fixed.revision > first.revision,
        "revisions {} then {}",
        first.revision,
        fixed.revision
    );
    assert_eq!(fixed.applied.first().map(|r| (r.seq, r.count)), Some((2, 7)));

    let b = c.reader(1).await;
    for scope in [site(&s), national()] {
        let mut cl = b.client.clone();
        let req = TotalsRequest { scope: Some(scope.clone()), session: Some(2), min_revision: fixed.revision };
        let t = common::within("GetTotals", cl.get_totals(b.req(req))).await.unwrap().into_inner();
        assert_eq!(t.count, 7, "{scope:?} on the other node: {t:?} after acks {first:?} {fixed:?}");
        assert!(t.revision >= fixed.revision, "answer at revision {} < {}", t.revision, fixed.revision);
    }
    // The audit trail is there too (the node has applied that revision).
    let mut cl = b.client.clone();
    let audit = common::within("Corrections", cl.corrections(b.req(CorrectionsRequest { limit: 0 }))).await.unwrap();
    let found = audit.into_inner().corrections.into_iter().find(|x| x.site_id == s && x.seq == 2);
    let found = found.unwrap_or_else(|| panic!("the correction is not in node 1's audit trail"));
    assert_eq!((found.previous_count, found.count, found.reason.as_str()), (10, 7, "scanned a box twice"));

    // A revision the node cannot reach: UNAVAILABLE after the call's deadline, not a stale answer.
    let mut cl = b.client.clone();
    let mut req =
        b.req(TotalsRequest { scope: Some(national()), session: None, min_revision: fixed.revision + 1_000_000 });
    req.set_timeout(Duration::from_secs(1));
    let r = common::within("GetTotals beyond etcd's revision", cl.get_totals(req)).await;
    assert_eq!(r.err().map(|e| e.code()), Some(Code::Unavailable));
}
