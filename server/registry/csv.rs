//! Registry files: `sites.csv` and `sessions.csv`, read with precise `file:line` errors, and written.
//!
//! `sites.csv` (UTF-8, header required, one row per site; province and commune columns repeat
//! and must agree across rows):
//! `site_id,site_name,province_code,province_name,commune_id,commune_name,registered,desks`
//!
//! `sessions.csv`: `session_id,name,starts_at`

use std::{
    collections::HashMap,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use super::{Registry, RegistryError, RegistryRows, Session, Site};

/// Header of `sites.csv`.
pub const SITES_HEADER: [&str; 8] =
    ["site_id", "site_name", "province_code", "province_name", "commune_id", "commune_name", "registered", "desks"];
/// Header of `sessions.csv`.
pub const SESSIONS_HEADER: [&str; 3] = ["session_id", "name", "starts_at"];

/// Most desks a site may declare.
pub const MAX_DESKS: u16 = 64;

/// A registry file that cannot be used.
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
    /// A row (or the header) is malformed.
    #[error("{path}:{line}: {message}")]
    Row {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong.
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

/// Loads a registry from a sites file and a sessions file.
pub fn load(sites: &Path, sessions: &Path) -> Result<Registry, LoadError> {
    let open = |p: &Path| std::fs::File::open(p).map_err(|source| LoadError::Io { path: p.to_path_buf(), source });
    let sessions = read_sessions(open(sessions)?, sessions)?;
    read_sites(open(sites)?, sites, sessions)
}

fn row_err(path: &Path, line: u64, message: impl Into<String>) -> LoadError {
    LoadError::Row { path: path.to_path_buf(), line, message: message.into() }
}

fn reader<R: Read>(input: R, path: &Path, header: &[&str]) -> Result<csv::Reader<R>, LoadError> {
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(input);
    let found = rdr.headers().map_err(|e| row_err(path, 1, e.to_string()))?;
    if found.iter().ne(header.iter().copied()) {
        return Err(row_err(
            path,
            1,
            format!("header must be `{}`, found `{}`", header.join(","), found.iter().collect::<Vec<_>>().join(",")),
        ));
    }
    Ok(rdr)
}

/// A record and its 1-based line, or the CSV error with its line.
fn numbered(rec: Result<csv::StringRecord, csv::Error>, path: &Path) -> Result<(csv::StringRecord, u64), LoadError> {
    let rec = rec.map_err(|e| row_err(path, e.position().map_or(0, csv::Position::line), e.to_string()))?;
    let line = rec.position().map_or(0, csv::Position::line);
    Ok((rec, line))
}

fn non_empty(path: &Path, line: u64, field: &str, value: &str) -> Result<String, LoadError> {
    if value.is_empty() {
        return Err(row_err(path, line, format!("{field} is empty")));
    }
    Ok(value.to_owned())
}

fn number<T: std::str::FromStr>(path: &Path, line: u64, field: &str, value: &str) -> Result<T, LoadError> {
    value.parse().map_err(|_| row_err(path, line, format!("{field} {value:?} is not a valid number")))
}

/// Reads `sessions.csv` rows.
pub fn read_sessions<R: Read>(input: R, path: &Path) -> Result<Vec<Session>, LoadError> {
    let mut rdr = reader(input, path, &SESSIONS_HEADER)?;
    let mut out = Vec::new();
    for rec in rdr.records() {
        let (rec, line) = numbered(rec, path)?;
        let id: u32 = number(path, line, "session_id", &rec[0])?;
        if id == 0 {
            return Err(row_err(path, line, "session_id must be >= 1"));
        }
        if out.iter().any(|s: &Session| s.id == id) {
            return Err(row_err(path, line, format!("duplicate session_id {id}")));
        }
        out.push(Session { id, name: non_empty(path, line, "name", &rec[1])?, starts_at: rec[2].to_owned() });
    }
    if out.is_empty() {
        return Err(row_err(path, 1, "no sessions"));
    }
    Ok(out)
}

/// Reads `sites.csv` rows and builds the registry with the given sessions.
pub fn read_sites<R: Read>(input: R, path: &Path, sessions: Vec<Session>) -> Result<Registry, LoadError> {
    let mut rdr = reader(input, path, &SITES_HEADER)?;
    let mut rows = RegistryRows { sessions, ..RegistryRows::default() };
    // First line each province / commune / site id was seen on, to check consistency.
    let mut provinces: HashMap<String, (String, u64)> = HashMap::new();
    let mut communes: HashMap<String, (String, String, u64)> = HashMap::new();
    let mut site_lines: HashMap<String, u64> = HashMap::new();
    for rec in rdr.records() {
        let (rec, line) = numbered(rec, path)?;
        let site_id = non_empty(path, line, "site_id", &rec[0])?;
        let site_name = non_empty(path, line, "site_name", &rec[1])?;
        let pcode = non_empty(path, line, "province_code", &rec[2])?;
        let pname = non_empty(path, line, "province_name", &rec[3])?;
        let cid = non_empty(path, line, "commune_id", &rec[4])?;
        let cname = non_empty(path, line, "commune_name", &rec[5])?;
        let registered: u32 = number(path, line, "registered", &rec[6])?;
        let desks: u16 = number(path, line, "desks", &rec[7])?;
        if desks == 0 || desks > MAX_DESKS {
            return Err(row_err(path, line, format!("desks must be 1..={MAX_DESKS}, found {desks}")));
        }
        if let Some(first) = site_lines.insert(site_id.clone(), line) {
            return Err(row_err(path, line, format!("duplicate site_id {site_id:?} (first on line {first})")));
        }
        match provinces.get(&pcode) {
            Some((name, first)) if *name != pname => {
                return Err(row_err(
                    path,
                    line,
                    format!("province {pcode} is named {pname:?} here but {name:?} on line {first}"),
                ));
            }
            Some(_) => {}
            None => {
                provinces.insert(pcode.clone(), (pname.clone(), line));
                rows.provinces.push((pcode.clone(), pname));
            }
        }
        match communes.get(&cid) {
            Some((name, prov, first)) if *name != cname || *prov != pcode => {
                return Err(row_err(
                    path,
                    line,
                    format!(
                        "commune {cid} is ({cname:?}, province {pcode}) here but ({name:?}, province {prov}) on line {first}"
                    ),
                ));
            }
            Some(_) => {}
            None => {
                communes.insert(cid.clone(), (cname.clone(), pcode.clone(), line));
                rows.communes.push((cid.clone(), cname, pcode.clone()));
            }
        }
        let site = Site { id: site_id, name: site_name, province: 0, commune: 0, registered, desks };
        rows.sites.push((site, pcode, cid));
    }
    if rows.sites.len() > u32::MAX as usize / 2 {
        return Err(LoadError::Inconsistent {
            path: path.to_path_buf(),
            source: RegistryError::TooMany { kind: "sites", count: rows.sites.len(), max: u32::MAX as usize / 2 },
        });
    }
    Registry::build(rows).map_err(|source| LoadError::Inconsistent { path: path.to_path_buf(), source })
}

/// Writes the registry as `sites.csv` and `sessions.csv` rows.
pub fn write(registry: &Registry, sites: impl Write, sessions: impl Write) -> Result<(), csv::Error> {
    let mut w = csv::Writer::from_writer(sites);
    w.write_record(SITES_HEADER)?;
    for s in &registry.sites {
        let p = &registry.provinces[s.province as usize];
        let c = &registry.communes[s.commune as usize];
        w.write_record([
            s.id.as_str(),
            s.name.as_str(),
            p.code.as_str(),
            p.name.as_str(),
            c.id.as_str(),
            c.name.as_str(),
            &s.registered.to_string(),
            &s.desks.to_string(),
        ])?;
    }
    w.flush()?;
    let mut w = csv::Writer::from_writer(sessions);
    w.write_record(SESSIONS_HEADER)?;
    for s in &registry.sessions {
        w.write_record([s.id.to_string().as_str(), s.name.as_str(), s.starts_at.as_str()])?;
    }
    w.flush()?;
    Ok(())
}
