//! Crash points, not luck: the real `headcount-server` binary is crashed (SIGABRT) exactly at a
//! named point of the durability and ack path (`FAILPOINTS`, see `server/durability/failpoints.rs`)
//! while writers stream reports, then restarted; every acknowledged report must be there, every
//! run. Also: a stalled journal must hold acks and resume handshakes (a server that acks before
//! its journal commit, or publishes its durable flush number before the append, fails here
//! deterministically), a full 10,035-site reference registry journaled and crashed, and a second
//! server on the same data directory refused.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;
mod server_process;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{SECRET, batch, channel_to, open_stream, report};
use headcount::{
    proto::v1::{ReportResponse, report_response},
    server::{
        Auth,
        registry::{
            Registry,
            generate::{GenerateOptions, generate},
        },
    },
};
use server_process::{DataDir, MAX_BATCHES, aborted, resumed};

fn small() -> Registry {
    generate(&GenerateOptions { sites: 24, sites_per_commune: 3.0, mean_registered: 100, seed: 3 })
}

/// Writers, one per site (desk 1, session 1), each sending seq 1, 2, … one batch at a time and
/// recording the last acknowledged seq; they stop when the server goes away.
struct Writers {
    sites: Vec<String>,
    acked: Arc<Mutex<Vec<u64>>>,
}

impl Writers {
    async fn start(url: &str, sites: Vec<String>) -> Self {
        let acked = Arc::new(Mutex::new(vec![0u64; sites.len()]));
        let auth = Auth::new(SECRET).unwrap();
        for (i, site) in sites.iter().enumerate() {
            // The crash point may fire while later writers are still connecting (a loaded
            // machine): a writer that cannot open acknowledged nothing, and is checked as such.
            let Ok(channel) = headcount::client::connect::channel(url).await else { continue };
            let Ok(mut s) = open_stream(channel, Some(&auth.site_token(site)), Some(site), Some("1")).await else {
                continue;
            };
            let acked = acked.clone();
            tokio::spawn(async move {
                for seq in 1..MAX_BATCHES {
                    if s.tx.send(batch(vec![report(1, seq, seq as i64 * 2)])).await.is_err() {
                        return;
                    }
                    match s.rx.message().await {
                        Ok(Some(ReportResponse { kind: Some(report_response::Kind::Ack(ack)) })) => {
                            acked.lock().unwrap()[i] = ack.applied[0].seq;
                        }
                        _ => return,
                    }
                }
            });
        }
        Self { sites, acked }
    }

    fn acked(&self) -> Vec<u64> {
        self.acked.lock().unwrap().clone()
    }

    /// Every acknowledged seq is stored (read back through the resume handshake of `url`).
    async fn assert_recovered(&self, url: &str, acked: &[u64], what: &str) {
        for (site, &want) in self.sites.iter().zip(acked) {
            let got = resumed(url, site, 1).await;
            let (seq, count) = got.iter().find(|r| r.0 == 1).map_or((0, 0), |r| (r.1, r.2));
            assert!(seq >= want, "{what}: {site} acknowledged seq {want}, recovered seq {seq}");
            assert_eq!(count, seq as i64 * 2, "{what}: {site}");
        }
    }
}

/// Arms `point`, lets writers run until the server aborts there, restarts, checks.
async fn crash_at(registry: Registry, sites: Vec<String>, point: &str, actions: &str) {
    let dir = DataDir::new(registry);
    let mut server = dir.start(Some(&format!("{point}={actions}"))).await;
    let writers = Writers::start(&server.url(), sites).await;
    let status = server.exited().await;
    assert!(aborted(status), "{point}: the server ended with {status}, not at its crash point");
    let acked = writers.acked();
    assert!(acked.iter().any(|&s| s > 0), "{point}: nothing was acknowledged before the crash");
    let server = dir.start(None).await;
    writers.assert_recovered(&server.url(), &acked, point).await;
    // And once more after a clean restart cycle (the recovered state was journaled again).
    server.terminate().await;
    let server = dir.start(None).await;
    writers.assert_recovered(&server.url(), &acked, point).await;
}

fn sites_of(reg: &Registry, n: usize) -> Vec<String> {
    reg.sites.iter().rev().take(n).map(|s| s.id.clone()).collect()
}

/// One test per crash point: `$name` crashes at `$point` after `$actions`.
macro_rules! crash_point_test {
    ($($name:ident: $point:literal, $actions:literal;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let reg = small();
            crash_at(reg.clone(), sites_of(&reg, 6), $point, $actions).await;
        }
    )*};
}

crash_point_test! {
    crash_before_a_journal_write_loses_nothing_acknowledged: "journal-before-write", "12*off->return";
    crash_after_a_journal_write_before_its_sync_loses_nothing_acknowledged: "journal-after-write", "12*off->return";
    crash_after_a_journal_sync_loses_nothing_acknowledged: "journal-after-sync", "12*off->return";
    crash_between_commit_and_ack_loses_nothing_acknowledged: "flush-before-ack", "12*off->return";
    crash_inside_a_snapshot_write_loses_nothing_acknowledged: "snapshot-mid-write", "4*off->return";
    crash_before_a_snapshot_rename_loses_nothing_acknowledged: "snapshot-before-rename", "4*off->return";
    crash_after_a_snapshot_rename_loses_nothing_acknowledged: "snapshot-after-rename", "4*off->return";
}

/// Writes after a snapshot, then a crash: recovery must replay the journal that starts at the
/// snapshot's generation (a `>` for `>=` there loses every acknowledged report since).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_a_snapshot_with_journal_records_behind_it_loses_nothing() {
    let reg = small();
    crash_at(reg.clone(), sites_of(&reg, 6), "commit-after-snapshot", "8*off->return").await;
}

/// The full reference registry (10,035 sites), journaled: every write on sites with indexes far
/// above 256 (where indexing per-shard state by `site / 16` would panic) is acknowledged, then
/// `kill -9`, and all of it is recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_reference_registry_journaled_kill9_loses_nothing() {
    let reg = generate(&GenerateOptions::default());
    assert_eq!(reg.sites.len(), 10_035);
    let sites: Vec<String> = [0, 255, 256, 5_000, 10_034].iter().map(|&i| reg.sites[i].id.clone()).collect();
    let dir = DataDir::new(reg);
    let server = dir.start(None).await;
    let auth = Auth::new(SECRET).unwrap();
    for site in &sites {
        let channel = channel_to(&server.url()).await;
        let mut s = open_stream(channel, Some(&auth.site_token(site)), Some(site), Some("1")).await.unwrap();
        for seq in 1..=20u64 {
            let ack = s.send_batch(vec![report(1, seq, seq as i64 * 2)]).await;
            assert_eq!(ack.applied[0].seq, seq, "{site}: {ack:?}");
        }
    }
    server.kill9();
    let server = dir.start(None).await;
    for site in &sites {
        let got = resumed(&server.url(), site, 1).await;
        assert_eq!(got.iter().find(|r| r.0 == 1).map(|r| (r.1, r.2)), Some((20, 40)), "{site}");
    }
}

/// The flusher stalls before writing a group (as on a hung disk): acknowledgements and resume
/// handshakes stop, and after `kill -9` every acknowledged report is there. A server that acks
/// before the journal commit, or publishes its durable flush number before the append, keeps
/// acknowledging here and loses those reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_journal_holds_acks_and_resumes() {
    let reg = small();
    let dir = DataDir::new(reg.clone());
    let server = dir.start(Some("journal-before-write=3*off->sleep(60000)")).await;
    let auth = Auth::new(SECRET).unwrap();
    let site = reg.sites[0].id.clone();
    let mut s = open_stream(channel_to(&server.url()).await, Some(&auth.site_token(&site)), Some(&site), Some("1"))
        .await
        .unwrap();
    let mut acked = 0;
    let mut stalled = false;
    for seq in 1..=40u64 {
        s.tx.send(batch(vec![report(1, seq, seq as i64 * 2)])).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), s.rx.message()).await {
            Ok(Ok(Some(ReportResponse { kind: Some(report_response::Kind::Ack(ack)) }))) => acked = ack.applied[0].seq,
            Ok(other) => panic!("unexpected end of the stream: {other:?}"),
            Err(_) => {
                stalled = true;
                break;
            }
        }
    }
    // A reporter reconnecting now must not be shown the state that is not on disk.
    let resume = tokio::time::timeout(
        Duration::from_secs(1),
        open_stream(channel_to(&server.url()).await, Some(&auth.site_token(&site)), Some(&site), Some("1")),
    )
    .await;
    if let Ok(r) = resume {
        panic!("a resume handshake went out while its state was not durable: {:?}", r.map(|s| s.resume));
    }
    server.kill9();
    let server = dir.start(None).await;
    let got = resumed(&server.url(), &site, 1).await;
    let seq = got.iter().find(|r| r.0 == 1).map_or(0, |r| r.1);
    assert!(seq >= acked, "acknowledged seq {acked}, recovered {seq}");
    assert!(stalled, "40 batches acknowledged although the journal was stalled (acked {acked}, recovered {seq})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_directory_is_refused() {
    let reg = small();
    let dir = DataDir::new(reg.clone());
    let server = dir.start(None).await;
    let writers = Writers::start(&server.url(), sites_of(&reg, 2)).await;
    let stderr = dir.start_failing();
    assert!(
        stderr.contains("in use by another headcount-server") && stderr.contains(&*dir.data.to_string_lossy()),
        "unclear refusal: {stderr}"
    );
    common::eventually("acks after the refused second start", common::DEADLINE, || {
        let a = writers.acked();
        async move { if a.iter().all(|&s| s >= 20) { Ok(()) } else { Err(format!("{a:?}")) } }
    })
    .await;
    server.kill9();
    let acked = writers.acked();
    let server = dir.start(None).await;
    writers.assert_recovered(&server.url(), &acked, "second instance").await;
}
