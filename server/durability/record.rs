//! The on-disk record format shared by the journal and snapshots: a file header, then framed
//! records `len u32 | crc32 u32 | payload`, all little-endian. A record whose frame is short or
//! whose checksum fails marks the end of the usable file.

use std::io::{self, Read, Write};

use prost::Message;

use crate::proto::v1::Correction;

/// Current format version.
pub const VERSION: u32 = 1;
/// Largest payload accepted when reading (guards against a corrupt length).
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// A file header: magic, version, generation and the registry fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Generation: journals and snapshots are ordered by it.
    pub generation: u64,
    /// SHA-256 of the registry's shape; state is only valid for the same registry.
    pub fingerprint: [u8; 32],
}

/// Size of an encoded header.
pub const HEADER_LEN: usize = 8 + 4 + 8 + 32 + 4;

impl Header {
    /// Encodes with `magic` (8 bytes).
    pub fn encode(&self, magic: &[u8; 8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN);
        b.extend_from_slice(magic);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.fingerprint);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads and checks a header.
    pub fn read(r: &mut impl Read, magic: &[u8; 8]) -> Result<Self, String> {
        let mut b = [0u8; HEADER_LEN];
        r.read_exact(&mut b).map_err(|e| format!("cannot read header: {e}"))?;
        if &b[..8] != magic {
            return Err("not a headcount file of this kind (bad magic)".into());
        }
        let crc = u32::from_le_bytes(b[HEADER_LEN - 4..].try_into().map_err(|_| "header")?);
        if crc32fast::hash(&b[..HEADER_LEN - 4]) != crc {
            return Err("header checksum mismatch".into());
        }
        let version = u32::from_le_bytes(b[8..12].try_into().map_err(|_| "header")?);
        if version != VERSION {
            return Err(format!("format version {version}, this build reads {VERSION}"));
        }
        let generation = u64::from_le_bytes(b[12..20].try_into().map_err(|_| "header")?);
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&b[20..52]);
        Ok(Self { generation, fingerprint })
    }
}

/// One record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// The latest state of a register: packed key, seq, count.
    Register {
        /// `RegisterKey::packed`.
        key: u64,
        /// Seq.
        seq: u64,
        /// Count.
        count: i64,
    },
    /// An audit-trail entry.
    Correction(Correction),
    /// A curve sample: bucket start and counts (national then provinces, per session).
    Curve {
        /// Bucket start, Unix ms.
        unix_ms: i64,
        /// Counts.
        counts: Vec<i64>,
    },
    /// An agent install claimed a register slot of a site (see `server/installs.rs`).
    Install {
        /// Site index.
        site: u32,
        /// Slot, 1-based.
        slot: u16,
        /// Desk number the agent declared (display only).
        desk: u32,
        /// The install id.
        id: String,
    },
    /// Snapshot trailer: how many records precede it. A snapshot without it is incomplete.
    End {
        /// Records before this one.
        records: u64,
    },
}

const TAG_REGISTER: u8 = 1;
const TAG_CORRECTION: u8 = 2;
const TAG_CURVE: u8 = 3;
const TAG_END: u8 = 4;
const TAG_INSTALL: u8 = 5;

impl Record {
    /// Appends the framed record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]);
        match self {
            Record::Register { key, seq, count } => {
                out.push(TAG_REGISTER);
                out.extend_from_slice(&key.to_le_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            Record::Correction(c) => {
                out.push(TAG_CORRECTION);
                c.encode(out).unwrap_or_else(|_| unreachable!("Vec grows as needed"));
            }
            Record::Curve { unix_ms, counts } => {
                out.push(TAG_CURVE);
                out.extend_from_slice(&unix_ms.to_le_bytes());
                for c in counts {
                    out.extend_from_slice(&c.to_le_bytes());
                }
            }
            Record::Install { site, slot, desk, id } => {
                out.push(TAG_INSTALL);
                out.extend_from_slice(&site.to_le_bytes());
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&desk.to_le_bytes());
                out.extend_from_slice(id.as_bytes());
            }
            Record::End { records } => {
                out.push(TAG_END);
                out.extend_from_slice(&records.to_le_bytes());
            }
        }
        let payload = &out[start + 8..];
        let len = payload.len() as u32;
        let crc = crc32fast::hash(payload);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(payload: &[u8]) -> Option<Self> {
        let (&tag, body) = payload.split_first()?;
        let i64_at = |b: &[u8], i: usize| b.get(i..i + 8).and_then(|s| s.try_into().ok()).map(i64::from_le_bytes);
        let u64_at = |b: &[u8], i: usize| b.get(i..i + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
        match tag {
            TAG_REGISTER if body.len() == 24 => {
                Some(Record::Register { key: u64_at(body, 0)?, seq: u64_at(body, 8)?, count: i64_at(body, 16)? })
            }
            TAG_CORRECTION => Correction::decode(body).ok().map(Record::Correction),
            TAG_CURVE if body.len() >= 8 && body.len() % 8 == 0 => Some(Record::Curve {
                unix_ms: i64_at(body, 0)?,
                counts: (8..body.len()).step_by(8).map(|i| i64_at(body, i)).collect::<Option<_>>()?,
            }),
            TAG_INSTALL if body.len() >= 10 => Some(Record::Install {
                site: u32::from_le_bytes(body[0..4].try_into().ok()?),
                slot: u16::from_le_bytes(body[4..6].try_into().ok()?),
                desk: u32::from_le_bytes(body[6..10].try_into().ok()?),
                id: String::from_utf8(body[10..].to_vec()).ok()?,
            }),
            TAG_END if body.len() == 8 => Some(Record::End { records: u64_at(body, 0)? }),
            _ => None,
        }
    }
}

/// Reads framed records until the end of input or the first bad frame.
pub struct Reader<R> {
    inner: R,
    /// Bytes of good records consumed so far (after the header).
    pub good_bytes: u64,
    buf: Vec<u8>,
}

/// Why reading stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Clean end of input.
    End,
    /// A short, oversized, unparsable or checksum-failing frame.
    Bad(String),
}

impl<R: Read> Reader<R> {
    /// A reader positioned after the header.
    pub fn new(inner: R) -> Self {
        Self { inner, good_bytes: 0, buf: Vec::new() }
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next record, or why there is none.
    pub fn next_record(&mut self) -> Result<Record, Stop> {
        let mut frame = [0u8; 8];
        match read_full(&mut self.inner, &mut frame) {
            Ok(0) => return Err(Stop::End),
            Ok(8) => {}
            Ok(n) => return Err(Stop::Bad(format!("torn frame header ({n} of 8 bytes)"))),
            Err(e) => return Err(Stop::Bad(format!("read error: {e}"))),
        }
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        if len == 0 || len > MAX_PAYLOAD {
            return Err(Stop::Bad(format!("implausible record length {len}")));
        }
        self.buf.resize(len as usize, 0);
        match read_full(&mut self.inner, &mut self.buf) {
            Ok(n) if n == len as usize => {}
            Ok(n) => return Err(Stop::Bad(format!("torn record ({n} of {len} bytes)"))),
            Err(e) => return Err(Stop::Bad(format!("read error: {e}"))),
        }
        if crc32fast::hash(&self.buf) != crc {
            return Err(Stop::Bad("record checksum mismatch".into()));
        }
        let rec = Record::decode(&self.buf).ok_or_else(|| Stop::Bad("unparsable record".into()))?;
        self.good_bytes += 8 + u64::from(len);
        Ok(rec)
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes all of `buf` and syncs the data to disk.
pub fn write_durable(f: &mut std::fs::File, buf: &[u8]) -> io::Result<()> {
    f.write_all(buf)?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_corruption_stops_reading() {
        let recs = vec![
            Record::Register { key: 42, seq: 7, count: 19 },
            Record::Curve { unix_ms: 1000, counts: vec![1, 2, 3] },
            Record::Correction(Correction { site_id: "S1".into(), seq: 3, reason: "x".into(), ..Default::default() }),
            Record::End { records: 3 },
        ];
        let mut buf = Vec::new();
        for r in &recs {
            r.encode(&mut buf);
        }
        let mut rd = Reader::new(&buf[..]);
        for r in &recs {
            assert_eq!(&rd.next_record().expect("good record"), r);
        }
        assert_eq!(rd.next_record(), Err(Stop::End));
        assert_eq!(rd.good_bytes, buf.len() as u64);
        // Flip one byte in the second record: reading stops after the first.
        let mut bad = buf.clone();
        bad[8 + 25 + 8 + 3] ^= 0xff;
        let mut rd = Reader::new(&bad[..]);
        assert!(rd.next_record().is_ok());
        assert!(matches!(rd.next_record(), Err(Stop::Bad(_))));
        assert_eq!(rd.good_bytes, 8 + 25);
        // Truncation anywhere inside a record stops cleanly too.
        for cut in 1..buf.len() {
            let mut rd = Reader::new(&buf[..cut]);
            let mut n = 0;
            while rd.next_record().is_ok() {
                n += 1;
            }
            assert!(n < recs.len());
            assert!(rd.good_bytes <= cut as u64);
        }
    }
}
