//! Recovering a data directory from arbitrary bytes: the input becomes a snapshot and one or two
//! journals in a fresh temporary directory, then `durability::store::recover` reads it.
//!
//! Input: `flags u8 | split u8 | split2 u8 | body`. The body is cut (at `split` and `split2`, as
//! fractions of its length) into a snapshot part and two journal parts. Flag bit 0: give each
//! part a valid header (magic, version, generation, the right fingerprint), so the fuzzer gets
//! past it; bit 1: frame each part's content as records `len u8 | payload` with valid lengths and
//! CRCs, so it reaches record decoding; bit 2: no snapshot file; bit 3: the header's fingerprint
//! is wrong. Checks: nothing panics; when recovery succeeds, a second recovery of the same
//! directory (its torn tails now cut) finds the same registers and drops nothing more.

#![no_main]

use headcount::server::durability::{record::Header, store::recover};
use libfuzzer_sys::fuzz_target;

const FINGERPRINT: [u8; 32] = [7; 32];

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
    let parts = [
        (&body[..a], "snapshot-0000000002.snap", b"HCSNAPS1", 2u64),
        (&body[a..b], "journal-0000000002.log", b"HCJOURN1", 2),
        (&body[b..], "journal-0000000003.log", b"HCJOURN1", 3),
    ];
    let Ok(dir) = tempfile::tempdir() else { return };
    for (i, (content, name, magic, generation)) in parts.into_iter().enumerate() {
        if i == 0 && flags & 4 != 0 {
            continue;
        }
        let mut file = Vec::new();
        if flags & 1 != 0 {
            let fingerprint = if flags & 8 != 0 { [8; 32] } else { FINGERPRINT };
            file.extend(Header { generation, fingerprint }.encode(magic));
        }
        if flags & 2 != 0 {
            file.extend(framed(content));
        } else {
            file.extend_from_slice(content);
        }
        if std::fs::write(dir.path().join(name), &file).is_err() {
            return;
        }
    }
    let Ok(first) = recover(dir.path(), FINGERPRINT) else { return };
    let again = match recover(dir.path(), FINGERPRINT) {
        Ok(r) => r,
        Err(e) => panic!("recovered once, then refused the same directory: {e}"),
    };
    let mut a: Vec<_> = first.registers.iter().map(|(k, r)| (*k, r.seq, r.count)).collect();
    let mut b: Vec<_> = again.registers.iter().map(|(k, r)| (*k, r.seq, r.count)).collect();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "a second recovery found other registers");
    assert_eq!(again.bytes_dropped, 0, "a second recovery dropped bytes again");
    assert_eq!(first.corrections.len(), again.corrections.len());
});
