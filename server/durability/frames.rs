//! Reading framed records back (journals and snapshots): frame by frame, checking each length
//! and checksum, stopping at the first frame that is short, implausible or damaged (see
//! [`super::record`] for the format).

use std::io::{self, Read};

use super::record::{MAX_PAYLOAD, Record, Stop};

/// Reads framed records until the end of input or the first bad frame.
pub struct Reader<R> {
    inner: R,
    /// Bytes of good records consumed so far (after the header).
    pub good_bytes: u64,
    buf: Vec<u8>,
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
        let rec = Record::decode(&self.buf)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        proto::v1::Correction,
        server::durability::record::{CurveRecord, CurveRow, RegisterRecord},
    };

    #[test]
    fn records_round_trip_and_corruption_stops_reading() {
        let recs = vec![
            Record::Register(RegisterRecord { site: "S1".into(), desk: 2, session: 3, seq: 7, count: 19 }),
            Record::Curve(CurveRecord {
                unix_ms: 1000,
                sessions: vec![1, 2],
                rows: vec![CurveRow { province: String::new(), counts: vec![1, 2] }],
            }),
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
        let first = {
            let mut b = Vec::new();
            recs[0].encode(&mut b);
            b.len()
        };
        let mut bad = buf.clone();
        bad[first + 8 + 3] ^= 0xff;
        let mut rd = Reader::new(&bad[..]);
        assert!(rd.next_record().is_ok());
        assert!(matches!(rd.next_record(), Err(Stop::Bad(_))));
        assert_eq!(rd.good_bytes, first as u64);
        // The allocation-free register encoding is byte for byte the derived one.
        for r in [
            RegisterRecord { site: "S00042".into(), desk: 3, session: 2, seq: 1 << 40, count: -5 },
            RegisterRecord { site: String::new(), desk: 0, session: 0, seq: 0, count: 0 },
        ] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            Record::encode_register(&r.site, r.desk, r.session, r.seq, r.count, &mut a);
            Record::Register(r).encode(&mut b);
            assert_eq!(a, b);
        }
        // A well-formed frame with a tag this build does not know is refused, not skipped.
        let payload = [99u8, 1, 2, 3];
        let mut unknown = (payload.len() as u32).to_le_bytes().to_vec();
        unknown.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        unknown.extend_from_slice(&payload);
        assert_eq!(Reader::new(&unknown[..]).next_record(), Err(Stop::UnknownTag(99)));
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
