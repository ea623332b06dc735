//! The agent's state file: a snapshot followed by one line per change. A save costs the size of
//! the change; the file is replayed exactly, stays bounded (snapshots when the lines outgrow the
//! last one), survives a torn last line, and refuses real corruption.

use std::collections::BTreeSet;

use headcount::client::reporter::state::{
    Change, FileStore, LocalRegister, LocalState, RegisterChange, StateStore, StoreError,
};

fn fresh() -> LocalState {
    LocalState { version: 1, site: "S00001".into(), desk: 1, ..LocalState::default() }
}

/// The change a group commit of one badge makes to `state` (applied to it too).
fn one_badge(state: &mut LocalState, session: u32, badge: String) -> Change {
    let reg = state.sessions.entry(session).or_default();
    let mut change = Change::default();
    change.registers.insert(
        session,
        RegisterChange { seq: reg.seq + 1, count: reg.count + 1, added: vec![badge], ..RegisterChange::default() },
    );
    state.apply(&change);
    change
}

#[test]
fn changes_are_replayed_exactly_and_the_file_stays_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.json");
    let store = FileStore::new(&path);
    let mut state = fresh();
    store.save(&state).expect("first save");
    let (mut snapshots, mut largest) = (0, 0u64);
    for i in 0..2500u32 {
        let change = one_badge(&mut state, 1 + i % 2, format!("BADGE-{i:05}"));
        store.append(&change).expect("append");
        if store.wants_snapshot() {
            store.save(&state).expect("snapshot");
            snapshots += 1;
        }
        largest = largest.max(std::fs::metadata(&path).expect("metadata").len());
    }
    let loaded = FileStore::new(&path).load().expect("load").expect("saved");
    assert_eq!(loaded, state);
    assert_eq!(loaded.sessions[&1].count, 1250);
    assert_eq!(loaded.sessions[&2].badges.len(), 1250);
    // The lines never grow past the snapshot (and 64 KiB): the file is at most about twice the
    // state, whatever the number of saves.
    let snapshot = serde_json::to_vec_pretty(&state).expect("encode").len() as u64;
    assert!(snapshots >= 1, "a snapshot was asked for");
    assert!(largest <= 2 * snapshot + 64 * 1024 + 4096, "file grew to {largest} bytes (state {snapshot})");
}

#[test]
fn a_torn_last_line_is_ignored_and_cut_before_the_next_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.json");
    let store = FileStore::new(&path);
    let mut state = fresh();
    store.save(&state).expect("first save");
    let first = one_badge(&mut state, 1, "A".into());
    store.append(&first).expect("append");
    // A crash in the middle of the next append.
    let mut bytes = std::fs::read(&path).expect("read");
    bytes.extend_from_slice(br#"{"registers":{"1":{"seq":2,"cou"#);
    std::fs::write(&path, &bytes).expect("write torn line");

    let store = FileStore::new(&path);
    let loaded = store.load().expect("a torn last line is not corruption").expect("saved");
    assert_eq!(loaded, state, "the torn change was never reported as saved");
    let second = one_badge(&mut state, 1, "B".into());
    store.append(&second).expect("append after the torn line");
    let loaded = FileStore::new(&path).load().expect("load").expect("saved");
    assert_eq!(loaded, state);
    assert_eq!(loaded.sessions[&1].badges, BTreeSet::from(["A".to_string(), "B".to_string()]));
}

#[test]
fn a_damaged_line_in_the_middle_is_refused_as_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.json");
    let store = FileStore::new(&path);
    let mut state = fresh();
    store.save(&state).expect("first save");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes.extend_from_slice(b"{\"registers\": nonsense}\n");
    let change = one_badge(&mut state, 1, "A".into());
    bytes.extend_from_slice(&serde_json::to_vec(&change).expect("encode"));
    bytes.push(b'\n');
    std::fs::write(&path, &bytes).expect("write");
    match FileStore::new(&path).load() {
        Err(StoreError::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_state_file_of_the_older_format_is_read_as_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.json");
    let mut state = fresh();
    state.anchored = true;
    state.sessions.insert(
        1,
        LocalRegister {
            seq: 4,
            count: 2,
            badges: BTreeSet::from(["A".into(), "B".into()]),
            ..LocalRegister::default()
        },
    );
    std::fs::write(&path, serde_json::to_vec_pretty(&state).expect("encode")).expect("write");
    let store = FileStore::new(&path);
    assert_eq!(store.load().expect("load").expect("saved"), state);
    let change = one_badge(&mut state, 1, "C".into());
    store.append(&change).expect("append to an old file");
    assert_eq!(FileStore::new(&path).load().expect("load").expect("saved"), state);
}
