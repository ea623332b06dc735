//! Recovering a data directory from arbitrary bytes: the input becomes a snapshot and one or two
//! journals in a fresh temporary directory, then `durability::store::recover` reads it.
//!
//! Input: `flags u8 | split u8 | split2 u8 | body`. The body is cut (at `split` and `split2`, as
//! fractions of its length) into a snapshot part and two journal parts. Flag bit 0: give each
//! part a valid header (magic, version, generation, and for the second journal the first one's
//! length as its committed length), so the fuzzer gets past it; bit 1: frame each part's content
//! as records `len u8 | payload` with valid lengths and CRCs, so it reaches record decoding; bit
//! 2: no snapshot file (the journals are then generations 1 and 2); bit 3: the second journal's
//! header claims a wrong committed length for the first. Checks: nothing panics; when recovery
//! succeeds, a second recovery of the same directory (its torn tail now cut) finds the same
//! registers and drops nothing more.

#![no_main]

use headcount::server::durability::{record::Header, store::recover};
use libfuzzer_sys::fuzz_target;

/// Frames `content` as records: each `len u8 | payload` becomes `len u32 | crc u32 | payload`.
fn framed(mut content: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some((&len, rest)) = content.split_first() {
        let payload = &rest[..(len as usize).min(rest.len())];
        content = &rest[payload.len()..];
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(payload);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [flags, split, split2, body @ ..] = data else { return };
    let cut = |f: u8| body.len() * f as usize / 255;
    let (a, b) = (cut(*split).min(cut(*split2)), cut(*split).max(cut(*split2)));
    let no_snapshot = flags & 4 != 0;
    let base = if no_snapshot { 1 } else { 2 };
    let parts = [
        (&body[..a], format!("snapshot-{base:010}.snap"), b"HCSNAPS2", base),
        (&body[a..b], format!("journal-{base:010}.log"), b"HCJOURN2", base),
        (&body[b..], format!("journal-{:010}.log", base + 1), b"HCJOURN2", base + 1),
    ];
    let Ok(dir) = tempfile::tempdir() else { return };
    let mut previous_len = 0u64;
    for (i, (content, name, magic, generation)) in parts.into_iter().enumerate() {
        if i == 0 && no_snapshot {
            continue;
        }
        let mut file = Vec::new();
        if flags & 1 != 0 {
            let prev_committed = if i == 2 && flags & 8 != 0 { previous_len / 2 } else { previous_len };
            file.extend(Header { generation, prev_committed }.encode(magic));
        }
        if flags & 2 != 0 {
            file.extend(framed(content));
        } else {
            file.extend_from_slice(content);
        }
        if i == 1 {
            previous_len = file.len() as u64;
        }
        if std::fs::write(dir.path().join(name), &file).is_err() {
            return;
        }
    }
    let Ok(first) = recover(dir.path()) else { return };
    let again = match recover(dir.path()) {
        Ok(r) => r,
        Err(e) => panic!("recovered once, then refused the same directory: {e}"),
    };
    let mut a: Vec<_> = first.registers.iter().map(|(k, r)| (k.clone(), r.seq, r.count)).collect();
    let mut b: Vec<_> = again.registers.iter().map(|(k, r)| (k.clone(), r.seq, r.count)).collect();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "a second recovery found other registers");
    assert_eq!(again.bytes_dropped, 0, "a second recovery dropped bytes again");
    assert_eq!(first.corrections.len(), again.corrections.len());
});
