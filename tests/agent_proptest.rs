//! Property: whatever lines the desks of one site scan — badges, repeats, arbitrary bytes with
//! `+`, `=`, digits and invalid UTF-8 — and however often the agent is killed and restarted from
//! its state file in between, the aggregator's site total is exactly the number of distinct
//! badges (after the badge rules: BOM dropped, trimmed, NFC).

mod common;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use common::*;
use headcount::client::{
    Reporter, ReporterConfig,
    reporter::state::{FileStore, LocalState, StateStore, StoreError},
    site::{
        Agent, Mode, Outcome,
        line::{Line, badge},
    },
};
use proptest::prelude::*;

/// A file store that can be "killed": after `kill` no save runs or starts, as when the agent's
/// process dies (an in-process abort would let a save already on the blocking pool finish).
struct Killable {
    inner: FileStore,
    dead: Mutex<bool>,
}

impl Killable {
    fn new(path: &PathBuf) -> Arc<Self> {
        Arc::new(Self { inner: FileStore::new(path), dead: Mutex::new(false) })
    }
    fn kill(&self) {
        *self.dead.lock().expect("store lock") = true;
    }
}

impl StateStore for Killable {
    fn load(&self) -> Result<Option<LocalState>, StoreError> {
        self.inner.load()
    }
    fn save(&self, state: &LocalState) -> Result<(), StoreError> {
        let dead = self.dead.lock().expect("store lock");
        if *dead {
            return Err(StoreError::Io { path: "killed".into(), source: std::io::Error::other("process is dead") });
        }
        self.inner.save(state)
    }
    fn blocking(&self) -> bool {
        true
    }
}

/// A scanned line: mostly badges from a small pool (so there are repeats), some raw bytes.
fn scanned() -> impl Strategy<Value = Vec<u8>> {
    let pool = (0u8..40).prop_map(|i| format!("BADGE-{i}").into_bytes());
    let bytes = prop::collection::vec(
        prop::sample::select(vec![b'+', b'=', b'0', b'1', b'9', b' ', b'\r', b'A', 0xFF, 0xC3, 0xA9, 0xEF, 0xBB, 0xBF]),
        0..12,
    );
    prop_oneof![3 => pool, 1 => bytes]
}

async fn run_case(scans: Vec<(usize, Vec<u8>)>, kills: Vec<usize>) -> Result<(), String> {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 19);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("agent.json");
    let config = ReporterConfig { agent_install: true, ..reporter_config(&ts.auth, &sid, 1) };
    let mut cuts: Vec<usize> = kills.into_iter().map(|k| k % (scans.len() + 1)).collect();
    cuts.push(scans.len());
    cuts.sort_unstable();
    let mut from = 0;
    let mut counted = 0usize;
    for to in cuts {
        let store = Killable::new(&path);
        let reporter = Reporter::spawn(ch.clone(), config.clone(), store.clone()).map_err(|e| e.to_string())?;
        let agent = Arc::new(Agent::new(reporter, Some(1)));
        // The segment's scans, desk by desk, the desks concurrently.
        let mut desks = Vec::new();
        for desk in 0..3 {
            let lines: Vec<Vec<u8>> =
                scans[from..to].iter().filter(|(d, _)| *d == desk).map(|(_, l)| l.clone()).collect();
            let agent = agent.clone();
            desks.push(tokio::spawn(async move {
                let mut n = 0;
                for l in lines {
                    let a = agent.line(&l, Mode::Badge, "desk").await;
                    assert_ne!(a.outcome, Outcome::Refused, "{a:?}");
                    n += usize::from(a.outcome == Outcome::Counted);
                }
                n
            }));
        }
        for d in desks {
            counted += d.await.map_err(|e| e.to_string())?;
        }
        // Killed: nothing more is saved or sent by this instance.
        store.kill();
        let Ok(agent) = Arc::try_unwrap(agent) else { return Err("agent still shared".into()) };
        agent.into_reporter().kill();
        from = to;
    }
    // A last start sends whatever the killed instances had saved but not sent.
    let reporter = Reporter::spawn(ch.clone(), config, Killable::new(&path)).map_err(|e| e.to_string())?;
    flush(&reporter, "final flush").await;
    let distinct: BTreeSet<String> = scans
        .iter()
        .filter_map(|(_, l)| match badge(l) {
            Ok(Line::Badge(b)) => Some(b),
            _ => None,
        })
        .collect();
    let total = reader.count(site(&sid), Some(1)).await;
    if total != distinct.len() as i64 || counted != distinct.len() {
        return Err(format!("site total {total}, counted answers {counted}, distinct badges {}", distinct.len()));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 32, ..ProptestConfig::default() })]

    #[test]
    fn site_total_is_the_number_of_distinct_badges(
        scans in prop::collection::vec((0usize..3, scanned()), 0..80),
        kills in prop::collection::vec(0usize..100, 0..4),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let outcome = rt.block_on(async { within("one proptest case", run_case(scans, kills)).await });
        prop_assert!(outcome.is_ok(), "{}", outcome.err().unwrap_or_default());
    }
}
