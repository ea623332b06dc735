//! Registry files as spreadsheets save them: the encoding is detected, and every position is
//! mapped back to the PHYSICAL line of the file an organiser sees in an editor.
//!
//! Encoding rule (documented in the README):
//! 1. a byte-order mark decides: UTF-8, UTF-16 LE or UTF-16 BE ("Unicode Text" from Excel);
//! 2. without one, a file with NUL bytes is UTF-16 without a mark: refused (it cannot be told
//!    apart from binary reliably);
//! 3. a file that is valid UTF-8 is UTF-8 (Windows-1258 text with Vietnamese letters is almost
//!    never valid UTF-8: its letters are single bytes >= 0x80 that UTF-8 only allows inside
//!    multi-byte sequences);
//! 4. otherwise it is Windows-1258 (Excel's "CSV" in a Vietnamese locale), unless it also holds
//!    well-formed multi-byte UTF-8 sequences (a UTF-8 file with a line pasted from elsewhere:
//!    decoding it either way would garble some names, so it is refused at the first bad line), or
//!    decodes to C1 control characters (bytes Windows-1258 does not define: not Vietnamese text).

use encoding_rs::{Encoding, UTF_8, WINDOWS_1258};

/// A registry file decoded to text, with its physical line starts.
#[derive(Debug)]
pub struct Decoded {
    /// The text, BOM removed (not yet NFC-normalised: that is done per field).
    pub text: String,
    /// Name of the encoding it was read in (`UTF-8`, `UTF-16LE`, `UTF-16BE`, `windows-1258`).
    pub encoding: &'static str,
    /// Byte offset in `text` where each physical line starts (line 1 at offset 0).
    line_starts: Vec<usize>,
}

/// Why a file could not be decoded: the 1-based physical line (0: the whole file) and a message
/// that says how to fix it.
#[derive(Debug)]
pub struct DecodeError {
    /// 1-based physical line, or 0 for the whole file.
    pub line: u64,
    /// What is wrong and what to do.
    pub message: String,
}

const RESAVE: &str = "save it again from the spreadsheet as \"CSV UTF-8 (Comma delimited)\"";

/// Decodes a registry file by the rule of this module.
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let whole = |message: String| DecodeError { line: 0, message };
    if let Some((encoding, bom)) = Encoding::for_bom(bytes) {
        let body = &bytes[bom..];
        let text = match encoding.decode_without_bom_handling_and_without_replacement(body) {
            Some(t) => t.into_owned(),
            None if encoding == UTF_8 => return Err(bad_utf8(body, "starts with a UTF-8 byte-order mark but")),
            None => {
                return Err(whole(format!(
                    "starts with a {} byte-order mark but is not valid {}: {RESAVE}",
                    encoding.name(),
                    encoding.name()
                )));
            }
        };
        return Ok(Decoded::new(text, encoding.name()));
    }
    if bytes.contains(&0) {
        return Err(whole(format!(
            "contains NUL bytes: it looks like UTF-16 without a byte-order mark, or is not a text file; {RESAVE}"
        )));
    }
    match std::str::from_utf8(bytes) {
        Ok(t) => Ok(Decoded::new(t.to_owned(), UTF_8.name())),
        Err(_) if has_utf8_sequence(bytes) => Err(bad_utf8(bytes, "is mostly UTF-8 but")),
        Err(_) => {
            let (text, _) = WINDOWS_1258.decode_without_bom_handling(bytes);
            let decoded = Decoded::new(text.into_owned(), WINDOWS_1258.name());
            if let Some(at) = decoded.text.find(|c: char| ('\u{80}'..='\u{9f}').contains(&c)) {
                return Err(DecodeError {
                    line: decoded.line_of(at),
                    message: format!(
                        "is neither UTF-8 nor Windows-1258 (it holds a byte that Windows-1258 does not define); {RESAVE}"
                    ),
                });
            }
            Ok(decoded)
        }
    }
}

/// The error for invalid UTF-8, at the line of the first bad byte.
fn bad_utf8(bytes: &[u8], what: &str) -> DecodeError {
    let at = std::str::from_utf8(bytes).err().map_or(0, |e| e.valid_up_to());
    let prefix = String::from_utf8_lossy(&bytes[..at]);
    let line = Decoded::new(prefix.into_owned(), "").line_starts.len() as u64;
    DecodeError { line, message: format!("{what} this line is not valid UTF-8 (mixed encodings?); {RESAVE}") }
}

/// Whether `bytes` holds at least one well-formed multi-byte UTF-8 sequence.
fn has_utf8_sequence(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => return !s.is_ascii(),
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                // `good` is valid UTF-8 by construction.
                if std::str::from_utf8(good).is_ok_and(|s| !s.is_ascii()) {
                    return true;
                }
                rest = &bad[e.error_len().unwrap_or(bad.len()).min(bad.len())..];
            }
        }
    }
    false
}

impl Decoded {
    fn new(text: String, encoding: &'static str) -> Self {
        let mut line_starts = vec![0];
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\r' if b.get(i + 1) == Some(&b'\n') => {
                    line_starts.push(i + 2);
                    i += 2;
                    continue;
                }
                b'\r' | b'\n' => line_starts.push(i + 1),
                _ => {}
            }
            i += 1;
        }
        Self { text, encoding, line_starts }
    }

    /// The 1-based physical line holding byte `offset` of `text` (`\r\n`, `\n` and a lone `\r`
    /// each end a line, as editors count them).
    pub fn line_of(&self, offset: usize) -> u64 {
        self.line_starts.partition_point(|&s| s <= offset) as u64
    }

    /// The 1-based physical line where a record starting at `offset` (as the CSV reader reports
    /// it, possibly before the blank lines it skipped) really starts.
    pub fn record_line(&self, offset: usize) -> u64 {
        let skipped =
            self.text.get(offset..).map_or(0, |rest| rest.len() - rest.trim_start_matches(['\r', '\n']).len());
        self.line_of(offset + skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_numbers_are_physical() {
        let d = decode(b"a\r\n\r\nb\rc\nd").unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(d.line_of(0), 1);
        assert_eq!(d.record_line(1), 3, "CR LF then a blank line");
        assert_eq!(d.line_of(d.text.find('c').unwrap_or(0)), 4, "a lone CR ends a line");
        assert_eq!(d.line_of(d.text.find('d').unwrap_or(0)), 5);
    }

    #[test]
    fn encodings() {
        let vi = "Hà Nội";
        assert_eq!(decode(vi.as_bytes()).map(|d| d.encoding).ok(), Some("UTF-8"));
        // As Excel writes it: `à` precomposed, `ộ` as `ô` + a combining dot below.
        let cp = b"H\xe0 N\xf4\xf2i".to_vec();
        let d = decode(&cp).unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(d.encoding, "windows-1258");
        assert_eq!(d.text, "Hà Nô\u{323}i");
        let mut le = vec![0xff, 0xfe];
        le.extend(vi.encode_utf16().flat_map(u16::to_le_bytes));
        assert_eq!(decode(&le).map(|d| d.text).ok().as_deref(), Some(vi));
        let mut be = vec![0xfe, 0xff];
        be.extend(vi.encode_utf16().flat_map(u16::to_be_bytes));
        assert_eq!(decode(&be).map(|d| d.text).ok().as_deref(), Some(vi));
        let mixed = [vi.as_bytes(), b"\n", &cp[..]].concat();
        assert_eq!(decode(&mixed).err().map(|e| e.line), Some(2));
        assert!(decode(b"a\0b").is_err());
    }
}
