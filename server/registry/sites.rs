//! The sites file: one row per site, its province and commune repeated on every row. What is
//! unambiguous is accepted; everything else is refused with the physical line, what is wrong and
//! how to fix it (see the README, "Registry").

use std::{collections::HashMap, path::Path};

use unicode_normalization::{UnicodeNormalization, char::is_combining_mark};

use super::{
    Registry, RegistryError, RegistryRows, Session, Site,
    table::{Columns, LoadError, Row, Table, whole_number},
};

/// Columns of the sites file.
pub const COLUMNS: Columns = Columns {
    required: &[
        "site_id",
        "site_name",
        "province_code",
        "province_name",
        "commune_id",
        "commune_name",
        "registered",
        "desks",
    ],
    optional: &["contact_name", "contact_phone"],
};
const SITE_ID: usize = 0;
const SITE_NAME: usize = 1;
const PCODE: usize = 2;
const PNAME: usize = 3;
const CID: usize = 4;
const CNAME: usize = 5;
const REGISTERED: usize = 6;
const DESKS: usize = 7;
const CONTACT_NAME: usize = 8;
const CONTACT_PHONE: usize = 9;

/// Most desks a site may declare.
pub const MAX_DESKS: u16 = 64;
/// Longest site id, bytes.
pub const MAX_SITE_ID: usize = 64;

/// The key two codes collide on: upper case, leading zeros dropped from every run of digits
/// (`01` ~ `1`, `S0042` ~ `s00042`).
fn code_key(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut in_digits = false;
    let mut zeros = 0usize;
    for c in code.chars() {
        if c == '0' && !in_digits {
            zeros += 1;
            continue;
        }
        if c.is_ascii_digit() {
            in_digits = true;
        } else {
            if zeros > 0 && !in_digits {
                out.push('0');
            }
            in_digits = false;
        }
        zeros = 0;
        out.extend(c.to_uppercase());
    }
    if zeros > 0 && !in_digits {
        out.push('0');
    }
    out
}

/// The key two names collide on (values are already NFC with white space collapsed).
fn name_key(name: &str) -> String {
    name.to_lowercase()
}

/// An ASCII spelling of a site id suggested to replace one with other letters (`ĐN004` → `DN004`).
fn ascii_suggestion(id: &str) -> String {
    id.nfd()
        .filter(|&c| !is_combining_mark(c))
        .map(|c| match c {
            'Đ' => 'D',
            'đ' => 'd',
            c => c,
        })
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect()
}

struct Seen {
    /// By `code_key`: raw code, name, first line.
    provinces: HashMap<String, (String, String, u64)>,
    /// By `name_key`: raw province code, first line.
    province_names: HashMap<String, (String, u64)>,
    /// By `code_key`: raw id, name, raw province code, first line.
    communes: HashMap<String, (String, String, String, u64)>,
    /// By (province `code_key`, `name_key`): raw commune id, first line.
    commune_names: HashMap<(String, String), (String, u64)>,
    /// By `code_key`: raw site id, first line.
    sites: HashMap<String, (String, u64)>,
}

/// Reads a sites file from its raw bytes and builds the registry with `sessions`.
pub fn read_sites(bytes: &[u8], path: &Path, sessions: Vec<Session>) -> Result<Registry, LoadError> {
    let table = Table::read(bytes, path, &COLUMNS)?;
    let mut rows = RegistryRows { sessions, ..RegistryRows::default() };
    let mut seen = Seen {
        provinces: HashMap::new(),
        province_names: HashMap::new(),
        communes: HashMap::new(),
        commune_names: HashMap::new(),
        sites: HashMap::new(),
    };
    for row in &table.rows {
        let e = |m: String| table.err(row.line, m);
        for (col, what) in [(SITE_ID, "site_id"), (SITE_NAME, "site_name"), (PCODE, "province_code")]
            .into_iter()
            .chain([(PNAME, "province_name"), (CID, "commune_id"), (CNAME, "commune_name")])
            .chain([(REGISTERED, "registered"), (DESKS, "desks")])
        {
            if row.get(col).is_empty() {
                return Err(e(format!("{what} is empty: fill it in, or delete the row")));
            }
        }
        let site_id = site_id(row, &seen).map_err(&e)?;
        let pcode = province(row, &mut seen, &mut rows).map_err(&e)?;
        let cid = commune(row, &pcode, &mut seen, &mut rows).map_err(&e)?;
        let registered = whole_number(row.get(REGISTERED)).map_err(|m| e(format!("registered: {m}")))?;
        let registered = u32::try_from(registered)
            .map_err(|_| e(format!("registered {registered} is more than {} delegates", u32::MAX)))?;
        let desks = whole_number(row.get(DESKS)).map_err(|m| e(format!("desks: {m}")))?;
        let desks = u16::try_from(desks)
            .ok()
            .filter(|d| (1..=MAX_DESKS).contains(d))
            .ok_or_else(|| e(format!("desks must be 1..={MAX_DESKS}, found {desks}")))?;
        let (contact_name, contact_phone) = contact(row).map_err(&e)?;
        seen.sites.insert(code_key(&site_id), (site_id.clone(), row.line));
        let site = Site {
            id: site_id,
            name: row.get(SITE_NAME).to_owned(),
            province: 0,
            commune: 0,
            registered,
            desks,
            contact_name,
            contact_phone,
        };
        rows.sites.push((site, pcode, cid));
    }
    if rows.sites.is_empty() {
        return Err(table.err(table.header_line, "no sites: add one row per site under the header"));
    }
    check_commune_prefixes(&table, &seen)?;
    if rows.sites.len() > u32::MAX as usize / 2 {
        return Err(LoadError::Inconsistent {
            path: path.to_path_buf(),
            source: RegistryError::TooMany { kind: "sites", count: rows.sites.len(), max: u32::MAX as usize / 2 },
        });
    }
    Registry::build(rows).map_err(|source| LoadError::Inconsistent { path: path.to_path_buf(), source })
}

fn site_id(row: &Row, seen: &Seen) -> Result<String, String> {
    let id = row.get(SITE_ID);
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c))) {
        let what = if c.is_ascii() { "the character" } else { "the non-ASCII letter" };
        let suggestion = ascii_suggestion(id);
        return Err(format!(
            "site id {id:?} has {what} {c:?}: site ids travel in gRPC metadata and tokens, which only carry ASCII \
             letters, digits, '-', '_' and '.'; rename it{}",
            if suggestion.is_empty() { String::new() } else { format!(", e.g. {suggestion:?}") }
        ));
    }
    if id.len() > MAX_SITE_ID {
        return Err(format!("site id {id:?} is longer than {MAX_SITE_ID} characters: shorten it"));
    }
    match seen.sites.get(&code_key(id)) {
        Some((first, line)) if first == id => Err(format!("site id {id:?} is also on line {line}: each site once")),
        Some((first, line)) => Err(format!(
            "site id {id:?} and {first:?} on line {line} differ only in leading zeros or letter case, so operators \
             would confuse them: use one spelling, or different ids"
        )),
        None => Ok(id.to_owned()),
    }
}

/// Checks the row's province against earlier rows; returns its code.
fn province(row: &Row, seen: &mut Seen, rows: &mut RegistryRows) -> Result<String, String> {
    let (code, name) = (row.get(PCODE), row.get(PNAME));
    if let Some((first, first_name, line)) = seen.provinces.get(&code_key(code)) {
        if first != code {
            return Err(format!(
                "province code {code:?} and {first:?} on line {line} are the same code once leading zeros are dropped \
                 (a spreadsheet drops them from numbers): format the column as Text and write {:?} on every row",
                if first.len() >= code.len() { first } else { code }
            ));
        }
        if name_key(first_name) != name_key(name) {
            return Err(format!(
                "province {code} is named {name:?} here but {first_name:?} on line {line}: use one name"
            ));
        }
        return Ok(code.to_owned());
    }
    if let Some((other, line)) = seen.province_names.get(&name_key(name)) {
        return Err(format!(
            "province {name:?} has code {code:?} here but {other:?} on line {line}: one province, one code"
        ));
    }
    seen.provinces.insert(code_key(code), (code.to_owned(), name.to_owned(), row.line));
    seen.province_names.insert(name_key(name), (code.to_owned(), row.line));
    rows.provinces.push((code.to_owned(), name.to_owned()));
    Ok(code.to_owned())
}

/// Checks the row's commune against earlier rows; returns its id.
fn commune(row: &Row, pcode: &str, seen: &mut Seen, rows: &mut RegistryRows) -> Result<String, String> {
    let (id, name) = (row.get(CID), row.get(CNAME));
    if let Some((first, first_name, first_province, line)) = seen.communes.get(&code_key(id)) {
        if first != id {
            return Err(format!(
                "commune id {id:?} and {first:?} on line {line} are the same id once leading zeros are dropped: \
                 format the column as Text and write one spelling on every row"
            ));
        }
        if first_province != pcode {
            return Err(format!(
                "commune {id} is under province {pcode} here but under province {first_province} on line {line}: \
                 a commune belongs to one province; fix the province_code on the wrong row"
            ));
        }
        if name_key(first_name) != name_key(name) {
            return Err(format!("commune {id} is named {name:?} here but {first_name:?} on line {line}: use one name"));
        }
        return Ok(id.to_owned());
    }
    let name_in_province = (code_key(pcode), name_key(name));
    if let Some((other, line)) = seen.commune_names.get(&name_in_province) {
        return Err(format!(
            "commune {name:?} of province {pcode} has id {id:?} here but {other:?} on line {line}: one commune, one id"
        ));
    }
    seen.communes.insert(code_key(id), (id.to_owned(), name.to_owned(), pcode.to_owned(), row.line));
    seen.commune_names.insert(name_in_province, (id.to_owned(), row.line));
    rows.communes.push((id.to_owned(), name.to_owned(), pcode.to_owned()));
    Ok(id.to_owned())
}

/// When the file names communes `<province code>-<n>` (two in three or more of the ids that
/// start with some province's code start with their own), a commune whose id starts with another
/// province's code sits under the wrong province.
fn check_commune_prefixes(table: &Table, seen: &Seen) -> Result<(), LoadError> {
    let prefixed: Vec<(&String, &String, u64, String)> = seen
        .communes
        .values()
        .filter_map(|(id, _, pcode, line)| {
            let (prefix, _) = id.split_once('-')?;
            let key = code_key(prefix);
            seen.provinces.contains_key(&key).then_some((id, pcode, *line, key))
        })
        .collect();
    let wrong: Vec<_> = prefixed.iter().filter(|(_, pcode, _, key)| code_key(pcode) != *key).collect();
    let right = prefixed.len() - wrong.len();
    if right < 2 || right < wrong.len() * 2 {
        return Ok(());
    }
    match wrong.iter().min_by_key(|(_, _, line, _)| *line) {
        Some((id, pcode, line, key)) => {
            let other = seen.provinces.get(key).map_or("?", |(code, _, _)| code.as_str());
            Err(table.err(
                *line,
                format!(
                    "commune {id} is under province {pcode}, but its id starts with province {other}'s code (as \
                     commune ids in this file do): fix the province_code or the commune_id"
                ),
            ))
        }
        None => Ok(()),
    }
}

/// The optional contact columns: a name, and a phone number an organiser can dial.
fn contact(row: &Row) -> Result<(String, String), String> {
    let (name, phone) = (row.get(CONTACT_NAME), row.get(CONTACT_PHONE));
    if name.chars().count() > 100 {
        return Err("contact_name is longer than 100 characters: shorten it".into());
    }
    if let Some(c) = phone.chars().find(|c| !(c.is_ascii_digit() || " +-.()".contains(*c))) {
        return Err(format!(
            "contact_phone {phone:?} has {c:?}: write only the number (digits, spaces, + - . ( )); put the name in \
             contact_name"
        ));
    }
    if phone.len() > 32 {
        return Err(format!("contact_phone {phone:?} is longer than 32 characters: one number per site"));
    }
    if phone.len() == 9 && phone.bytes().all(|b| b.is_ascii_digit()) && !phone.starts_with('0') {
        return Err(format!(
            "contact_phone {phone} looks like a number that lost its leading 0 (a spreadsheet drops it from \
             numbers): format the column as Text and write 0{phone}"
        ));
    }
    Ok((name.to_owned(), phone.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(code_key("01"), code_key("1"));
        assert_eq!(code_key("S00042"), code_key("s0042"));
        assert_eq!(code_key("01-003"), code_key("1-3"));
        assert_ne!(code_key("10"), code_key("1"));
        assert_eq!(code_key("0"), code_key("00"));
        assert_ne!(code_key("0"), code_key(""));
        assert_eq!(ascii_suggestion("ĐN004"), "DN004");
    }
}
