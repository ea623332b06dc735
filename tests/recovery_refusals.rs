//! Recovery refuses damage instead of deleting it, on the real binary: a damaged middle journal,
//! a damaged journal header, a missing journal and a record of an unknown kind each stop the
//! start with a message naming the file and saying what to do; following that advice (restoring
//! the file, or moving it aside) starts again.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;
mod server_process;

use common::{SECRET, channel_to, open_stream, report};
use headcount::server::{
    Auth,
    registry::generate::{GenerateOptions, generate},
};
use server_process::{DataDir, resumed};

const SITE: &str = "S00002";

/// Two runs, each killed with SIGKILL (no snapshot): journals 1 and 2 hold seqs 1..=10 and
/// 11..=20; the third start would add journal 3.
async fn two_journals() -> DataDir {
    let mut dir =
        DataDir::new(generate(&GenerateOptions { sites: 12, sites_per_commune: 3.0, mean_registered: 100, seed: 4 }));
    dir.snapshot_interval = "1h";
    let auth = Auth::new(SECRET).unwrap();
    for run in 0..2u64 {
        let server = dir.start(None).await;
        let mut s = open_stream(channel_to(&server.url()).await, Some(&auth.site_token(SITE)), Some(SITE), Some("1"))
            .await
            .unwrap();
        for seq in run * 10 + 1..=run * 10 + 10 {
            s.send_batch(vec![report(1, seq, seq as i64)]).await;
        }
        server.kill9();
    }
    let journals = dir.files(".log");
    assert_eq!(journals.len(), 2, "{journals:?}");
    dir
}

async fn assert_all_there(dir: &DataDir) {
    let server = dir.start(None).await;
    assert_eq!(resumed(&server.url(), SITE, 1).await, vec![(1, 20, 20)]);
    server.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_middle_journal_is_refused_and_restoring_it_starts_again() {
    let dir = two_journals().await;
    let first = dir.files(".log")[0].clone();
    let good = std::fs::read(&first).unwrap();
    let mut bad = good.clone();
    let at = good.len() - 5;
    bad[at] ^= 0x5a;
    std::fs::write(&first, &bad).unwrap();
    let err = dir.start_failing();
    assert!(
        err.contains(&*first.to_string_lossy()) && err.contains("damaged") && err.contains("every later journal"),
        "{err}"
    );
    // Nothing was deleted or cut.
    assert_eq!(std::fs::read(&first).unwrap(), bad);
    std::fs::write(&first, &good).unwrap();
    assert_all_there(&dir).await;
}

/// A middle journal cut cleanly at a record boundary, short of the length the next journal's
/// header says was committed, holds acknowledged records no more: refused, not skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_middle_journal_shorter_than_committed_is_refused() {
    let dir = two_journals().await;
    let first = dir.files(".log")[0].clone();
    let good = std::fs::read(&first).unwrap();
    // Record boundaries after the header: each frame is length (u32 LE), CRC-32, payload.
    let header = headcount::server::durability::record::HEADER_LEN;
    let mut bounds = vec![header];
    let mut at = header;
    while at + 8 <= good.len() {
        let len = u32::from_le_bytes(good[at..at + 4].try_into().unwrap()) as usize;
        if at + 8 + len > good.len() {
            break;
        }
        at += 8 + len;
        bounds.push(at);
    }
    assert!(bounds.len() >= 3, "the first journal holds records: {bounds:?}");
    // Drop the last whole record: a clean end, short of what was committed.
    let cut = bounds[bounds.len() - 2];
    std::fs::write(&first, &good[..cut]).unwrap();
    let err = dir.start_failing();
    assert!(err.contains(&*first.to_string_lossy()) && err.contains("committed"), "{err}");
    std::fs::write(&first, &good).unwrap();
    assert_all_there(&dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_header_a_missing_journal_and_an_unknown_record_are_refused() {
    let dir = two_journals().await;
    let journals = dir.files(".log");
    let last = journals[1].clone();
    let good = std::fs::read(&last).unwrap();
    // Header.
    let mut bad = good.clone();
    bad[14] ^= 0xff;
    std::fs::write(&last, &bad).unwrap();
    let err = dir.start_failing();
    assert!(err.contains(&*last.to_string_lossy()) && err.contains("header"), "{err}");
    // A record of a kind this build does not know, appended whole to the last journal.
    let payload = [77u8, 1, 2, 3];
    let mut unknown = good.clone();
    unknown.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    unknown.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    unknown.extend_from_slice(&payload);
    std::fs::write(&last, &unknown).unwrap();
    let err = dir.start_failing();
    assert!(err.contains(&*last.to_string_lossy()) && err.contains("kind 77"), "{err}");
    std::fs::write(&last, &good).unwrap();
    // A journal missing from the sequence.
    let aside = dir.root.path().join("aside.log");
    std::fs::rename(&journals[0], &aside).unwrap();
    let err = dir.start_failing();
    assert!(err.contains("journal-0000000001.log"), "{err}");
    std::fs::rename(&aside, &journals[0]).unwrap();
    // A journal of the earlier data format.
    let mut old = good.clone();
    old[..8].copy_from_slice(b"HCJOURN1");
    std::fs::write(&last, &old).unwrap();
    let err = dir.start_failing();
    assert!(err.contains(&*last.to_string_lossy()) && err.contains("earlier headcount-server"), "{err}");
    std::fs::write(&last, &good).unwrap();
    assert_all_there(&dir).await;
}
