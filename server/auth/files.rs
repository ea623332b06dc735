//! The operator's credential files: the key set (`kid secret` per line, the last line signs) and
//! the revocation list (site ids or token ids, one per line). Both allow `#` comments and blank
//! lines; both are re-read while the aggregator runs (see [`super::watch`]).

use std::{collections::HashSet, path::Path};

use super::token::Key;
use crate::server::error::Error;

/// Strips a `#` comment and surrounding blanks.
fn content(line: &str) -> &str {
    line.split_once('#').map_or(line, |(before, _)| before).trim()
}

/// Parses a key set file: each line `KEY_ID SECRET` (secret at least 16 bytes, no blanks in it);
/// the last key signs new tokens, all of them are accepted. Errors name the file and line.
pub fn parse_keys(path: &Path, text: &str) -> Result<Vec<Key>, Error> {
    let mut keys: Vec<Key> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = content(line);
        if line.is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let (id, secret) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| Error::InvalidArgument(format!("{}: expected `KEY_ID SECRET`", at())))?;
        let key =
            Key::derive(id, secret.trim().as_bytes()).map_err(|e| Error::InvalidArgument(format!("{}: {e}", at())))?;
        if keys.iter().any(|k| k.id == key.id) {
            return Err(Error::InvalidArgument(format!("{}: key id {id:?} appears twice", at())));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(Error::InvalidArgument(format!("{}: no key in the key file", path.display())));
    }
    Ok(keys)
}

/// Parses a revocation file: one site id or token id per line.
pub fn parse_revoked(text: &str) -> HashSet<String> {
    text.lines().map(content).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// Reads a file for the credentials, the error naming it and what to do.
pub fn read(path: &Path, what: &str) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::InvalidArgument(format!("cannot read the {what} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_lines_comments_and_errors() {
        let p = Path::new("keys");
        let keys =
            parse_keys(p, "# rotated in March\nk1 0123456789abcdef0123\n\nk2 another secret of 16+ bytes # new\n")
                .expect("two keys");
        assert_eq!(keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["k1", "k2"], "in order: the last signs");
        let err = |text: &str| parse_keys(p, text).expect_err(text).to_string();
        assert!(err("k1\n").contains("keys:1"), "names file and line");
        assert!(err("k1 short\n").contains("at least 16 bytes"));
        assert!(err("k1 0123456789abcdef0123\nk1 0123456789abcdef0124\n").contains("twice"));
        assert!(err("# nothing\n").contains("no key"));
        assert!(err("k/1 0123456789abcdef0123\n").contains("key id"));
    }

    #[test]
    fn revocation_file_ignores_comments_and_blanks() {
        let set = parse_revoked("# lost laptops\nS00042\n  S00043  # stolen\n\n0123abcd\n");
        let mut ids: Vec<&str> = set.iter().map(String::as_str).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["0123abcd", "S00042", "S00043"]);
    }
}
