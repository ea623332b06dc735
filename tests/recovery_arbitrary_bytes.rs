//! Recovery from arbitrary bytes: whatever a snapshot or journal holds (random bytes, or valid
//! files with random damage), opening the data directory returns the state or a refusal, and
//! never panics.

#![allow(missing_docs, clippy::unwrap_used)]

use headcount::server::{
    Aggregator, AggregatorConfig,
    durability::{
        DurabilityConfig,
        record::{Header, Record, RegisterRecord},
    },
    registry::generate::{GenerateOptions, generate},
};
use proptest::prelude::*;

fn valid_journal(records: &[(u8, u64, i64)]) -> Vec<u8> {
    let mut b = Header { generation: 1, prev_committed: 0 }.encode(b"HCJOURN2");
    for &(site, seq, count) in records {
        let site = format!("S{:05}", u32::from(site) % 12 + 1);
        Record::Register(RegisterRecord { site, desk: 1, session: 1, seq, count }).encode(&mut b);
    }
    b
}

fn open(files: &[(&str, Vec<u8>)]) {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let reg = generate(&GenerateOptions { sites: 12, sites_per_commune: 3.0, mean_registered: 100, seed: 1 });
    if let Ok((agg, _)) = Aggregator::open(reg, AggregatorConfig::default(), DurabilityConfig::new(dir.path())) {
        agg.close();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_files_never_panic(journal in proptest::collection::vec(any::<u8>(), 0..300),
                                snapshot in proptest::collection::vec(any::<u8>(), 0..300),
                                headed in any::<bool>()) {
        let (mut j, mut s) = (journal, snapshot);
        if headed {
            j.splice(0..0, Header { generation: 1, prev_committed: 0 }.encode(b"HCJOURN2"));
            s.splice(0..0, Header { generation: 1, prev_committed: 0 }.encode(b"HCSNAPS2"));
        }
        open(&[("journal-0000000001.log", j.clone())]);
        open(&[("journal-0000000001.log", j), ("snapshot-0000000001.snap", s)]);
    }

    #[test]
    fn damaged_valid_journals_never_panic(records in proptest::collection::vec((any::<u8>(), 1..1000u64, -5..100_000i64), 1..20),
                                          at in any::<prop::sample::Index>(),
                                          flip in any::<u8>(),
                                          cut in any::<bool>()) {
        let mut j = valid_journal(&records);
        let i = at.index(j.len());
        if cut { j.truncate(i) } else { j[i] ^= flip | 1 }
        let second = valid_journal(&records[..1]);
        open(&[("journal-0000000001.log", j.clone())]);
        // The same damage in a middle journal.
        let mut next = second;
        next.splice(0..Header { generation: 1, prev_committed: 0 }.encode(b"HCJOURN2").len(),
                    Header { generation: 2, prev_committed: j.len() as u64 }.encode(b"HCJOURN2"));
        open(&[("journal-0000000001.log", j), ("journal-0000000002.log", next)]);
    }
}
