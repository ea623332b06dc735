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
