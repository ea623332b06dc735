//! One registry table as a spreadsheet saves it: the delimiter is detected from the header, columns
//! are found by name, empty rows (`,,,,,,,`) are skipped, values are trimmed, their white space
//! collapsed and their Unicode normalised to NFC, and every row keeps its physical line.

use std::path::{Path, PathBuf};

use unicode_normalization::UnicodeNormalization;

use super::{RegistryError, text};

/// A registry file that cannot be used. Every message says what is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The whole file is unusable (encoding, no rows).
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// A row (or the header) is wrong.
    #[error("{path}:{line}: {message}")]
    Row {
        /// The file.
        path: PathBuf,
        /// 1-based physical line, as an editor shows it.
        line: u64,
        /// What is wrong and what to do.
        message: String,
    },
    /// The rows are individually fine but do not form a consistent registry.
    #[error("{path}: {source}")]
    Inconsistent {
        /// The sites file.
        path: PathBuf,
        /// Cause.
        source: RegistryError,
    },
}

impl LoadError {
    /// The physical line the error is about, if it is about one.
    pub fn line(&self) -> Option<u64> {
        match self {
            Self::Row { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// The columns a table has: required ones, then optional ones. A row's values are indexed by
/// position in `required ++ optional`.
#[derive(Debug, Clone, Copy)]
pub struct Columns {
    /// Columns every file must have.
    pub required: &'static [&'static str],
    /// Columns a file may have.
    pub optional: &'static [&'static str],
}

impl Columns {
    fn all(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.required.iter().chain(self.optional).copied()
    }

    fn list(&self) -> String {
        self.all().collect::<Vec<_>>().join(",")
    }
}

/// One non-empty row.
#[derive(Debug)]
pub struct Row {
    /// 1-based physical line where the row starts.
    pub line: u64,
    values: Vec<String>,
}

impl Row {
    /// The value of column `col` (index into `required ++ optional`); `""` when absent or empty.
    pub fn get(&self, col: usize) -> &str {
        self.values.get(col).map_or("", String::as_str)
    }
}

/// A table read from a file.
#[derive(Debug)]
pub struct Table {
    /// The file, for messages.
    pub path: PathBuf,
    /// Encoding the file was read in.
    pub encoding: &'static str,
    /// Detected delimiter.
    pub delimiter: u8,
    /// Physical line of the header.
    pub header_line: u64,
    /// Non-empty rows, in file order.
    pub rows: Vec<Row>,
    present: Vec<bool>,
}

const DELIMITERS: [u8; 3] = [b',', b';', b'\t'];

impl Table {
    /// Reads a table with the given columns from the raw bytes of `path`.
    pub fn read(bytes: &[u8], path: &Path, columns: &Columns) -> Result<Self, LoadError> {
        let decoded = text::decode(bytes).map_err(|e| match e.line {
            0 => LoadError::File { path: path.to_path_buf(), message: e.message },
            line => LoadError::Row { path: path.to_path_buf(), line, message: e.message },
        })?;
        let err = |line: u64, message: String| LoadError::Row { path: path.to_path_buf(), line, message };
        let Header { delimiter, line: header_line, index } = header(&decoded, columns).map_err(|(l, m)| err(l, m))?;
        let mut present = vec![false; columns.all().count()];
        for &i in index.iter().flatten() {
            present[i] = true;
        }
        let mut rows = Vec::new();
        for rec in records(&decoded.text, delimiter) {
            let (rec, line) = numbered(rec, &decoded);
            let rec = rec.map_err(|m| err(line, m))?;
            if line <= header_line {
                continue;
            }
            let mut values = vec![String::new(); present.len()];
            let mut any = false;
            for (k, raw) in rec.iter().enumerate() {
                let v = clean(raw);
                if v.is_empty() {
                    continue;
                }
                any = true;
                let Some(&Some(col)) = index.get(k) else {
                    return Err(err(
                        line,
                        format!(
                            "value {v:?} is in column {} which has no name in the header (the header has {} \
                             columns): if it is a number with a thousands separator such as 1,200, put it in quotes \
                             or write 1200; otherwise delete it",
                            k + 1,
                            index.len()
                        ),
                    ));
                };
                if raw.contains(['\n', '\r']) {
                    return Err(err(
                        line,
                        format!(
                            "a value in column {:?} spans several lines: is a closing quote (\") missing?",
                            name(columns, col)
                        ),
                    ));
                }
                if let Some(c) = v.chars().find(|c| c.is_control()) {
                    return Err(err(
                        line,
                        format!("column {:?} holds the control character {c:?}: delete it", name(columns, col)),
                    ));
                }
                values[col] = v;
            }
            if any {
                rows.push(Row { line, values });
            }
        }
        tracing::info!(
            file = %path.display(), encoding = decoded.encoding, delimiter = ?(delimiter as char), rows = rows.len(),
            "registry file read"
        );
        Ok(Self { path: path.to_path_buf(), encoding: decoded.encoding, delimiter, header_line, rows, present })
    }

    /// Whether the header names column `col`.
    pub fn has(&self, col: usize) -> bool {
        self.present.get(col).copied().unwrap_or(false)
    }

    /// An error about `line` of this table.
    pub fn err(&self, line: u64, message: impl Into<String>) -> LoadError {
        LoadError::Row { path: self.path.clone(), line, message: message.into() }
    }
}

fn name(columns: &Columns, col: usize) -> &'static str {
    columns.all().nth(col).unwrap_or("?")
}

fn records(text: &str, delimiter: u8) -> csv::StringRecordsIntoIter<&[u8]> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .from_reader(text.as_bytes())
        .into_records()
}

/// A record with its physical line, or the CSV reader's error as a message.
fn numbered(rec: csv::Result<csv::StringRecord>, decoded: &text::Decoded) -> (Result<csv::StringRecord, String>, u64) {
    match rec {
        Ok(r) => {
            let line = r.position().map_or(0, |p| decoded.record_line(p.byte() as usize));
            (Ok(r), line)
        }
        Err(e) => {
            let line = e.position().map_or(0, |p| decoded.record_line(p.byte() as usize));
            (Err(format!("unreadable CSV row: {e}")), line)
        }
    }
}

/// Trimmed, white space runs collapsed to one space, NFC.
fn clean(raw: &str) -> String {
    raw.split_whitespace().collect::<Vec<_>>().join(" ").nfc().collect()
}

/// A located header: its delimiter, its line, and per position the column it names (None: unnamed).
struct Header {
    delimiter: u8,
    line: u64,
    index: Vec<Option<usize>>,
}

/// Finds the header: the delimiter under which the first row names every required column (an
/// optional first line `sep=;`, as Excel writes it, names the delimiter).
fn header(decoded: &text::Decoded, columns: &Columns) -> Result<Header, (u64, String)> {
    let first = decoded.text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let sep = first
        .strip_prefix("sep=")
        .or_else(|| first.strip_prefix("SEP="))
        .and_then(|d| d.bytes().next())
        .filter(|d| DELIMITERS.contains(d));
    let candidates: Vec<u8> = sep.map_or(DELIMITERS.to_vec(), |d| vec![d]);
    let mut shown = String::new();
    let mut shown_line = 1;
    for delimiter in candidates {
        let mut recs = records(&decoded.text, delimiter);
        let (rec, line) = match recs.next() {
            Some(rec) => numbered(rec, decoded),
            None => return Err((1, format!("the file is empty: it needs the header `{}`", columns.list()))),
        };
        let (mut rec, mut line) = (rec.map_err(|m| (line, m))?, line);
        if sep.is_some() {
            match recs.next() {
                Some(next) => {
                    let (r, l) = numbered(next, decoded);
                    (rec, line) = (r.map_err(|m| (l, m))?, l);
                }
                None => return Err((line, format!("no header after `sep=`: it needs `{}`", columns.list()))),
            }
        }
        let names: Vec<String> = rec.iter().map(|n| clean(n).to_lowercase()).collect();
        if !columns.required.iter().all(|c| names.iter().any(|n| n == c)) {
            if shown.is_empty() {
                (shown, shown_line) = (rec.iter().collect::<Vec<_>>().join(&*(delimiter as char).to_string()), line);
            }
            continue;
        }
        let mut index = Vec::with_capacity(names.len());
        for (k, n) in names.iter().enumerate() {
            if n.is_empty() {
                index.push(None);
                continue;
            }
            let Some(col) = columns.all().position(|c| c == n) else {
                return Err((
                    line,
                    format!("unknown column {n:?}: the columns are `{}` (rename or delete it)", columns.list()),
                ));
            };
            if names[..k].contains(n) {
                return Err((line, format!("column {n:?} appears twice in the header: delete one")));
            }
            index.push(Some(col));
        }
        return Ok(Header { delimiter, line, index });
    }
    let found: String = shown.chars().take(200).collect();
    Err((
        shown_line,
        format!(
            "the header must name the columns `{}` (in any order; separated by commas, semicolons or tabs; \
             `{}` may be added), found `{found}`",
            columns.required.join(","),
            columns.optional.join(","),
        ),
    ))
}

/// Parses a whole number as spreadsheets write it: digits, optionally grouped in threes by one
/// separator used throughout (`1200`, `1,200`, `1.200`, `1 200`). A separator is only accepted
/// between groups of exactly three digits, so `1,5` or `1.20` (a decimal in some locale, never a
/// count) are refused rather than guessed.
pub fn whole_number(value: &str) -> Result<u64, String> {
    let hint = "write a whole number with digits only, e.g. 1200 (a thousands separator is accepted between \
                groups of three digits: 1,200 or 1.200)";
    let too_large = || format!("{value:?} is too large");
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse().map_err(|_| too_large());
    }
    let sep = value.chars().find(|c| !c.is_ascii_digit());
    let grouped = sep.filter(|s| [',', '.', ' ', '\''].contains(s)).is_some_and(|s| {
        let groups: Vec<&str> = value.split(s).collect();
        groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_digit()))
            && (1..=3).contains(&groups[0].len())
            && groups[1..].iter().all(|g| g.len() == 3)
    });
    if !grouped {
        return Err(format!("{value:?} is not a whole number: {hint}"));
    }
    value.chars().filter(char::is_ascii_digit).collect::<String>().parse().map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands() {
        for (v, n) in [("1200", 1200), ("1,200", 1200), ("1.200", 1200), ("1 200", 1200), ("12,345,678", 12_345_678)] {
            assert_eq!(whole_number(v), Ok(n), "{v}");
        }
        for v in ["", "1,5", "1.20", "1,200.00", "1.200,5", "-3", "12e3", ",200", "1,2000", "1,,200", "1,200 300"] {
            assert!(whole_number(v).is_err(), "{v}");
        }
    }
}
