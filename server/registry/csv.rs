//! Registry files: loading `sites.csv` and `sessions.csv` from disk, and writing them.
//!
//! What each file holds and what is accepted is in [`super::sites`] and [`super::sessions`] (and
//! the README, "Registry"); how bytes become rows in [`super::table`] and [`super::text`].

use std::{io::Write, path::Path};

use super::{
    Registry,
    sessions::{self, DEFAULT_TIME_ZONE, local_time},
    sites,
};

pub use super::table::LoadError;

/// Most desks a site may declare.
pub use super::sites::MAX_DESKS;

/// How to read the files.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// IANA time zone of session rows whose `time_zone` column is empty or absent.
    pub time_zone: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { time_zone: DEFAULT_TIME_ZONE.to_owned() }
    }
}

/// Loads a registry from a sites file and a sessions file, with default options.
pub fn load(sites: &Path, sessions: &Path) -> Result<Registry, LoadError> {
    load_with(sites, sessions, &LoadOptions::default())
}

/// Loads a registry from a sites file and a sessions file.
pub fn load_with(sites: &Path, sessions: &Path, options: &LoadOptions) -> Result<Registry, LoadError> {
    let read = |p: &Path| std::fs::read(p).map_err(|source| LoadError::Io { path: p.to_path_buf(), source });
    let sessions = sessions::read_sessions(&read(sessions)?, sessions, &options.time_zone)?;
    sites::read_sites(&read(sites)?, sites, sessions)
}

/// Writes the registry as `sites.csv` and `sessions.csv` (UTF-8, comma-separated, every column),
/// which [`load`] reads back to the same registry.
pub fn write(registry: &Registry, sites: impl Write, sessions: impl Write) -> Result<(), ::csv::Error> {
    let mut w = ::csv::Writer::from_writer(sites);
    w.write_record(sites::COLUMNS.required.iter().chain(sites::COLUMNS.optional))?;
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
            s.contact_name.as_str(),
            s.contact_phone.as_str(),
        ])?;
    }
    w.flush()?;
    let mut w = ::csv::Writer::from_writer(sessions);
    w.write_record(sessions::COLUMNS.required.iter().chain(sessions::COLUMNS.optional))?;
    for s in &registry.sessions {
        let (starts, ends, zone) = match &s.schedule {
            Some(w) => (
                local_time(w.starts_unix_ms, &w.time_zone),
                local_time(w.ends_unix_ms, &w.time_zone),
                w.time_zone.clone(),
            ),
            None => Default::default(),
        };
        w.write_record([s.id.to_string().as_str(), s.name.as_str(), &starts, &ends, &zone])?;
    }
    w.flush()?;
    Ok(())
}
