//! `recovery`: start-up time from a snapshot of the reference registry plus a journal of
//! `--records` records, and a check that the recovered totals equal what was written.

use std::path::PathBuf;

use super::{BenchArgs, BenchError, Ctx, process::ServerProcess, report::BenchReport, streams::national};
use crate::{
    client::connect::channel,
    server::{
        durability::{
            self,
            record::{Record, RegisterRecord},
            store::{Journal, write_snapshot},
        },
        registers::RegisterKey,
    },
};

/// Count of every register in the snapshot.
const SNAPSHOT_COUNT: i64 = 10;

/// The count journal record `r` writes.
fn journal_count(r: u64) -> i64 {
    SNAPSHOT_COUNT + (r % 100) as i64
}

/// Writes the data directory, starts the aggregator on it, times start-up and compares the
/// national total per session and overall with the registers written.
pub(super) async fn run(ctx: &Ctx, args: &BenchArgs, report: &mut BenchReport) -> Result<(), BenchError> {
    let dir: PathBuf = ctx.scratch.path().join("data");
    std::fs::create_dir_all(&dir)?;
    let reg = &ctx.registry;
    let sessions = reg.sessions.len() as u16;
    let keys: Vec<RegisterKey> = reg
        .sites
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            (1..=s.desks)
                .flat_map(move |d| (0..sessions).map(move |k| RegisterKey { site: i as u32, desk: d, session: k }))
        })
        .collect();
    // Files are keyed by ids (site id, desk, session id).
    let record = |k: &RegisterKey, seq: u64, count: i64| {
        Record::Register(RegisterRecord {
            site: reg.sites[k.site as usize].id.clone(),
            desk: u32::from(k.desk),
            session: reg.sessions[usize::from(k.session)].id,
            seq,
            count,
        })
    };
    let io: std::sync::Arc<dyn durability::fs::Io> = std::sync::Arc::new(durability::fs::RealIo);
    write_snapshot(&*io, &dir, 1, keys.iter().map(|k| record(k, 1, SNAPSHOT_COUNT)))?;
    let mut journal = Journal::create(io, &dir, 1, 0)?;
    let mut buf = Vec::with_capacity(8 << 20);
    for r in 0..args.records {
        let k = &keys[(r % keys.len() as u64) as usize];
        record(k, 2 + r, journal_count(r)).encode(&mut buf);
        if buf.len() >= 8 << 20 {
            journal.commit(&buf)?;
            buf.clear();
        }
    }
    journal.commit(&buf)?;
    drop(journal);
    // What was written: each register's last journal record, or the snapshot's count.
    let mut expected = vec![0i64; usize::from(sessions)];
    let n = keys.len() as u64;
    for (i, k) in keys.iter().enumerate() {
        let i = i as u64;
        let count = if i < args.records {
            // The last r < records with r ≡ i (mod n).
            journal_count(i + (args.records - 1 - i) / n * n)
        } else {
            SNAPSHOT_COUNT
        };
        expected[usize::from(k.session)] += count;
    }

    let mut a = args.clone();
    a.in_memory = false;
    let server = ServerProcess::start(&ctx.spec(&a, "127.0.0.1:0")?, ctx.scratch.path())?;
    report.startup_seconds = server.startup().as_secs_f64();
    let (rss, hwm) = server.memory();
    report.server_rss_mb = rss as f64 / 1e6;
    report.server_peak_rss_mb = hwm as f64 / 1e6;
    report.reports_sent = args.records;
    let ch = channel(&server.url()).await?;
    let mut wrong = Vec::new();
    let all: i64 = expected.iter().sum();
    let checks = reg.sessions.iter().zip(&expected).map(|(s, &e)| (Some(s.id), e)).chain([(None, all)]);
    for (session, want) in checks {
        let got = national(ch.clone(), session).await?;
        report.totals_checked += 1;
        if got != want {
            wrong.push(format!("session {session:?}: recovered {got}, written {want}"));
        }
    }
    if !wrong.is_empty() {
        return Err(BenchError::Mismatch(format!(
            "recovery: totals differ from what was written: {}",
            wrong.join("; ")
        )));
    }
    Ok(())
}
