//! The on-disk record format shared by the journal and snapshots: a file header, then framed
//! records `len u32 | crc32 u32 | tag u8 | payload`, all little-endian. Payloads are protobuf
//! messages keyed by ids (site id, desk, session id, province code), never by the registry's
//! indexes, so that adding sites, desks, sessions or provinces keeps all state. A frame that is
//! short or fails its checksum marks the end of the usable file; a well-formed frame with an
//! unknown tag is refused (a newer build wrote it).

use std::io::Read;

use prost::Message;

use crate::{
    proto::v1::Correction,
    server::{curve::Sample, registry::Registry},
};

/// Current format version.
pub const VERSION: u32 = 2;
/// Largest payload accepted when reading (guards against a corrupt length).
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// A file header: magic, version, generation, and (journals) the committed length of the
/// previous generation's journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Generation: journals and snapshots are ordered by it.
    pub generation: u64,
    /// Bytes of journal `generation - 1` that were committed (synced) when this file was
    /// created: recovery reads that journal up to here and no further. Bytes after it were never
    /// acknowledged (a write or sync failed, and the journal moved on to this file).
    pub prev_committed: u64,
}

/// Size of an encoded header, bytes.
pub const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 4;

impl Header {
    /// Encodes with `magic` (8 bytes).
    pub fn encode(&self, magic: &[u8; 8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN);
        b.extend_from_slice(magic);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.prev_committed.to_le_bytes());
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
        let word =
            |i: usize| u64::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]]);
        let crc = u32::from_le_bytes([b[HEADER_LEN - 4], b[HEADER_LEN - 3], b[HEADER_LEN - 2], b[HEADER_LEN - 1]]);
        if crc32fast::hash(&b[..HEADER_LEN - 4]) != crc {
            return Err("header checksum mismatch".into());
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != VERSION {
            return Err(format!("format version {version}, this build reads {VERSION}"));
        }
        Ok(Self { generation: word(12), prev_committed: word(20) })
    }
}

/// The latest state of one register, keyed by ids.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct RegisterRecord {
    /// Site id.
    #[prost(string, tag = "1")]
    pub site: String,
    /// Desk number (1-based).
    #[prost(uint32, tag = "2")]
    pub desk: u32,
    /// Session id (the wire id, not an index).
    #[prost(uint32, tag = "3")]
    pub session: u32,
    /// Seq.
    #[prost(uint64, tag = "4")]
    pub seq: u64,
    /// Cumulative count.
    #[prost(int64, tag = "5")]
    pub count: i64,
}

/// One row of a curve sample: a province's counts per session.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct CurveRow {
    /// Province code; empty for the national row.
    #[prost(string, tag = "1")]
    pub province: String,
    /// Cumulative count per session, in the order of [`CurveRecord::sessions`].
    #[prost(int64, repeated, tag = "2")]
    pub counts: Vec<i64>,
}

/// A curve sample keyed by province code and session id.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct CurveRecord {
    /// Bucket start, Unix ms.
    #[prost(int64, tag = "1")]
    pub unix_ms: i64,
    /// Session ids, the column order of every row.
    #[prost(uint32, repeated, tag = "2")]
    pub sessions: Vec<u32>,
    /// National row (province empty) then one per province.
    #[prost(message, repeated, tag = "3")]
    pub rows: Vec<CurveRow>,
}

impl CurveRecord {
    /// A curve sample keyed by province code and session id.
    pub fn from_sample(reg: &Registry, sample: &Sample) -> Self {
        let sessions = reg.sessions.len();
        let codes = std::iter::once(String::new()).chain(reg.provinces.iter().map(|p| p.code.clone()));
        Self {
            unix_ms: sample.unix_ms,
            sessions: reg.sessions.iter().map(|x| x.id).collect(),
            rows: codes
                .enumerate()
                .map(|(i, province)| CurveRow {
                    province,
                    counts: sample
                        .counts
                        .get(i * sessions..(i + 1) * sessions)
                        .map(<[i64]>::to_vec)
                        .unwrap_or_default(),
                })
                .collect(),
        }
    }

    /// The sample in the registry's current layout: rows by province code, columns by session
    /// id; a province or session the stored sample does not have reads 0.
    pub fn to_sample(&self, reg: &Registry) -> Sample {
        let sessions = reg.sessions.len();
        let columns: Vec<Option<usize>> =
            reg.sessions.iter().map(|x| self.sessions.iter().position(|id| *id == x.id)).collect();
        let codes = std::iter::once("").chain(reg.provinces.iter().map(|p| p.code.as_str()));
        let mut counts = Vec::with_capacity((reg.provinces.len() + 1) * sessions);
        for code in codes {
            let row = self.rows.iter().find(|r| r.province == code);
            counts.extend(columns.iter().map(|col| match (row, col) {
                (Some(row), Some(i)) => row.counts.get(*i).copied().unwrap_or(0),
                _ => 0,
            }));
        }
        Sample { unix_ms: self.unix_ms, counts: counts.into() }
    }
}

/// An agent install's claim of a register slot at a site (see `server/installs.rs`), keyed by
/// site id like every other record.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct InstallRecord {
    /// Site id.
    #[prost(string, tag = "1")]
    pub site: String,
    /// Slot, 1-based.
    #[prost(uint32, tag = "2")]
    pub slot: u32,
    /// Desk number the agent declared (display only).
    #[prost(uint32, tag = "3")]
    pub desk: u32,
    /// The install id.
    #[prost(string, tag = "4")]
    pub id: String,
}

/// One record: a tagged enum; a new kind gets a new tag, and an older build refuses a file that
/// holds a tag it does not know ([`Stop::UnknownTag`]) rather than skipping state.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// The latest state of a register.
    Register(RegisterRecord),
    /// An audit-trail entry.
    Correction(Correction),
    /// A curve sample.
    Curve(CurveRecord),
    /// An agent install claimed a register slot.
    Install(InstallRecord),
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
        let grows = |_| unreachable!("Vec grows as needed");
        match self {
            Record::Register(r) => {
                out.push(TAG_REGISTER);
                r.encode(out).unwrap_or_else(grows);
            }
            Record::Correction(c) => {
                out.push(TAG_CORRECTION);
                c.encode(out).unwrap_or_else(grows);
            }
            Record::Curve(c) => {
                out.push(TAG_CURVE);
                c.encode(out).unwrap_or_else(grows);
            }
            Record::Install(i) => {
                out.push(TAG_INSTALL);
                i.encode(out).unwrap_or_else(grows);
            }
            Record::End { records } => {
                out.push(TAG_END);
                out.extend_from_slice(&records.to_le_bytes());
            }
        }
        Self::seal(out, start);
    }

    /// Appends a framed [`Record::Register`] without building a [`RegisterRecord`] (no
    /// allocation: the flusher encodes thousands per group commit). Same bytes as
    /// `Record::Register(RegisterRecord { .. }).encode(out)`.
    pub fn encode_register(site: &str, desk: u32, session: u32, seq: u64, count: i64, out: &mut Vec<u8>) {
        use prost::encoding::{WireType, encode_key, encode_varint, int64, uint32, uint64};
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]);
        out.push(TAG_REGISTER);
        if !site.is_empty() {
            encode_key(1, WireType::LengthDelimited, out);
            encode_varint(site.len() as u64, out);
            out.extend_from_slice(site.as_bytes());
        }
        if desk != 0 {
            uint32::encode(2, &desk, out);
        }
        if session != 0 {
            uint32::encode(3, &session, out);
        }
        if seq != 0 {
            uint64::encode(4, &seq, out);
        }
        if count != 0 {
            int64::encode(5, &count, out);
        }
        Self::seal(out, start);
    }

    /// Fills in the frame header of the record that starts at `start`.
    fn seal(out: &mut [u8], start: usize) {
        let payload = &out[start + 8..];
        let len = payload.len() as u32;
        let crc = crc32fast::hash(payload);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    pub(crate) fn decode(payload: &[u8]) -> Result<Self, Stop> {
        let Some((&tag, body)) = payload.split_first() else { return Err(Stop::Bad("empty record".into())) };
        let bad = |e: prost::DecodeError| Stop::Bad(format!("unparsable record: {e}"));
        match tag {
            TAG_REGISTER => RegisterRecord::decode(body).map(Record::Register).map_err(bad),
            TAG_CORRECTION => Correction::decode(body).map(Record::Correction).map_err(bad),
            TAG_CURVE => CurveRecord::decode(body).map(Record::Curve).map_err(bad),
            TAG_INSTALL => InstallRecord::decode(body).map(Record::Install).map_err(bad),
            TAG_END => body
                .try_into()
                .map(|b| Record::End { records: u64::from_le_bytes(b) })
                .map_err(|_| Stop::Bad("malformed trailer".into())),
            other => Err(Stop::UnknownTag(other)),
        }
    }
}

/// Why reading stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Clean end of input.
    End,
    /// A short, oversized, unparsable or checksum-failing frame.
    Bad(String),
    /// A well-formed frame of a kind this build does not know.
    UnknownTag(u8),
}
