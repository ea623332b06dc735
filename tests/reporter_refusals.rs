//! A report the aggregator refuses for good (here a correction whose reason is longer than the
//! aggregator accepts) while the agent's later check-ins are already in flight: the real
//! reporter against a journaled in-process aggregator whose acks are held at the
//! `flush-before-ack` crash point (`pause`), so the order is forced, not raced. The refused change
//! is undone, every check-in after it still counts, exactly once, and nothing is audited.
//!
//! Its own test binary: the crash point is process-wide, and it holds the acks of every journaled
//! aggregator in the process.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use headcount::{
    client::{Reporter, ReporterConfig, reporter::state::MemoryStore},
    server::{Aggregator, RunningServer, Transport, durability::DurabilityConfig},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_correction_is_undone_and_the_check_ins_after_it_still_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let registry = small_registry();
    let auth = headcount::server::Auth::new(SECRET).unwrap();
    let (agg, _) = Aggregator::open(registry.clone(), test_config(), DurabilityConfig::new(dir.path())).unwrap();
    let transport = Transport { grace: Duration::from_millis(500), ..Transport::default() };
    let server =
        RunningServer::start("127.0.0.1:0".parse().unwrap(), agg.clone(), auth.clone(), transport).await.unwrap();
    let ch = channel_to(&server.url()).await;
    let reader = Reader::new(ch.clone(), Some(auth.read_token("t")));
    let (sid, other_sid) = (registry.sites[3].id.clone(), registry.sites[4].id.clone());
    // This agent accepts longer reasons than the aggregator: its correction is refused there.
    let too_long = test_config().max_reason + 1;
    let config = ReporterConfig { max_reason: too_long, ..reporter_config(&auth, &sid, 1) };
    let r = Reporter::spawn(ch.clone(), config, Arc::new(MemoryStore::new())).unwrap();
    // Session 1 counts 5, session 2 counts 10 (its seqs run above session 1's).
    for _ in 0..5 {
        r.check_in(1, 1).await.unwrap();
    }
    for _ in 0..10 {
        r.check_in(2, 1).await.unwrap();
    }
    flush(&r, "the check-ins").await;
    assert_eq!(reader.count(site(&sid), Some(1)).await, 5);
    assert_eq!(reader.count(site(&sid), Some(2)).await, 10);

    // Hold every ack from here: the flusher stops after its next commit, before telling the
    // streams. Another site's check-in gives it that commit.
    fail::cfg("flush-before-ack", "pause").unwrap();
    let other = memory_reporter(&ch, &auth, &other_sid, 1);
    other.check_in(1, 1).await.unwrap();
    eventually("the other site's check-in is applied", DEADLINE, || async {
        let n = reader.count(site(&other_sid), Some(1)).await;
        if n == 1 { Ok(()) } else { Err(format!("count {n}")) }
    })
    .await;
    let rejected = agg.stats().rejected;
    // On each session a correction, then a check-in sent before the correction's refusal is
    // known (it carries the same reason, so it is refused too); all four in flight at once.
    r.correct(1, 3, "x".repeat(too_long)).await.unwrap();
    refused_reports(&agg, "session 1's correction is refused", rejected + 1).await;
    r.correct(2, 3, "y".repeat(too_long)).await.unwrap();
    refused_reports(&agg, "session 2's correction is refused", rejected + 2).await;
    r.check_in(1, 1).await.unwrap();
    refused_reports(&agg, "session 1's check-in after it is refused too", rejected + 3).await;
    r.check_in(2, 1).await.unwrap();
    refused_reports(&agg, "session 2's check-in after it is refused too", rejected + 4).await;
    assert_eq!(reader.count(site(&sid), Some(1)).await, 5, "nothing refused was applied");
    assert_eq!(reader.count(site(&sid), Some(2)).await, 10, "nothing refused was applied");
    fail::remove("flush-before-ack");

    flush(&r, "after the refusals").await;
    flush(&other, "the other site").await;
    let st = r.status();
    assert_eq!(st.local[&1].1, 6, "the correction is undone, the check-in after it kept: {st:?}");
    assert_eq!(st.local[&2].1, 11, "the same on session 2, independently: {st:?}");
    for session in [1, 2] {
        assert_eq!(st.acked[&session], st.local[&session], "the aggregator holds the agent's count: {st:?}");
    }
    assert!(st.refused >= 2, "the agent was told: {st:?}");
    assert_eq!(reader.count(site(&sid), Some(1)).await, 6, "5 check-ins, a refused correction, 1 check-in");
    assert_eq!(reader.count(site(&sid), Some(2)).await, 11, "10 check-ins, a refused correction, 1 check-in");
    assert!(reader.corrections(10).await.corrections.is_empty(), "a refused correction is not audited");
    r.shutdown().await;
    other.shutdown().await;
    server.stop().await.unwrap();
}

/// Waits until the aggregator has refused `n` reports in all.
async fn refused_reports(agg: &Aggregator, what: &str, n: u64) {
    eventually(what, DEADLINE, || async {
        let got = agg.stats().rejected;
        if got >= n { Ok(()) } else { Err(format!("{got} refused, waiting for {n}")) }
    })
    .await;
}
