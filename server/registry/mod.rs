//! The registry: the fixed hierarchy of provinces, communes and sites, and the event's sessions.
//!
//! Loaded once at start (from CSV, see [`csv`], or generated, see [`generate`]) and immutable
//! afterwards, so every lookup is lock-free. Entities are addressed by dense `u32` indexes; the
//! string ids only matter at the edges (wire, files).

pub mod csv;
pub mod generate;
pub mod sessions;
pub mod sites;
pub mod table;
pub mod text;

use std::collections::HashMap;

/// One province (or centrally-run city).
#[derive(Debug, Clone)]
pub struct Province {
    /// Province code, e.g. `"01"`.
    pub code: String,
    /// Display name.
    pub name: String,
    /// Communes of the province, by index.
    pub communes: Vec<u32>,
    /// Number of sites in the province.
    pub sites_total: u32,
    /// Registered delegates of all its sites.
    pub registered: u64,
}

/// One commune.
#[derive(Debug, Clone)]
pub struct Commune {
    /// Commune id, e.g. `"01-003"`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Owning province index.
    pub province: u32,
    /// Sites of the commune, by index.
    pub sites: Vec<u32>,
    /// Registered delegates of all its sites.
    pub registered: u64,
}

/// One connection site.
#[derive(Debug, Clone)]
pub struct Site {
    /// Site id, e.g. `"S00042"`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Owning province index.
    pub province: u32,
    /// Owning commune index.
    pub commune: u32,
    /// Registered (expected) delegates per session.
    pub registered: u32,
    /// Number of check-in desks; desks are numbered `1..=desks`.
    pub desks: u16,
    /// Whom to call when the site is silent (the optional `contact_name` column; may be empty).
    pub contact_name: String,
    /// Their phone number as written (the optional `contact_phone` column; may be empty).
    pub contact_phone: String,
}

/// One session of the event (e.g. day 1 morning).
#[derive(Debug, Clone)]
pub struct Session {
    /// Session id as used on the wire.
    pub id: u32,
    /// Display name, e.g. `Ngày 1 — Sáng`.
    pub name: String,
    /// When it takes place; `None` for a session without times (never picked as current).
    pub schedule: Option<Schedule>,
}

/// The time window of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Start, Unix ms (inclusive).
    pub starts_unix_ms: i64,
    /// End, Unix ms (exclusive; after the start).
    pub ends_unix_ms: i64,
    /// IANA time zone the times were written in, e.g. `Asia/Ho_Chi_Minh` (for display).
    pub time_zone: String,
}

/// The immutable registry.
#[derive(Debug, Clone)]
pub struct Registry {
    /// Provinces, by index.
    pub provinces: Vec<Province>,
    /// Communes, by index.
    pub communes: Vec<Commune>,
    /// Sites, by index.
    pub sites: Vec<Site>,
    /// Sessions, by index (not by id).
    pub sessions: Vec<Session>,
    province_by_code: HashMap<String, u32>,
    commune_by_id: HashMap<String, u32>,
    site_by_id: HashMap<String, u32>,
    /// Looked up for every report: Fx hashing (keys are small registry ids, not attacker-chosen
    /// strings).
    session_by_id: rustc_hash::FxHashMap<u32, u16>,
    registered_total: u64,
}

/// Raw rows a registry is built from; the builder derives the hierarchy and checks it.
#[derive(Debug, Clone, Default)]
pub struct RegistryRows {
    /// `(code, name)` of each province, in display order.
    pub provinces: Vec<(String, String)>,
    /// `(id, name, province code)` of each commune.
    pub communes: Vec<(String, String, String)>,
    /// Sites with `province`/`commune` indexes still unresolved: `(site, province code, commune id)`.
    pub sites: Vec<(Site, String, String)>,
    /// Sessions.
    pub sessions: Vec<Session>,
}

/// A registry that is not self-consistent.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Two entities share an id.
    #[error("duplicate {kind} id {id:?}")]
    Duplicate {
        /// Entity kind.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// A reference to an entity that does not exist.
    #[error("{kind} {id:?} refers to unknown {target} {target_id:?}")]
    Dangling {
        /// Entity kind.
        kind: &'static str,
        /// Its id.
        id: String,
        /// Referenced kind.
        target: &'static str,
        /// Referenced id.
        target_id: String,
    },
    /// The registry has no sites or no sessions.
    #[error("registry has no {0}")]
    Empty(&'static str),
    /// More entities than the aggregator's key layout supports.
    #[error("too many {kind}: {count} (at most {max})")]
    TooMany {
        /// Entity kind.
        kind: &'static str,
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Most sessions a registry may define (register keys keep the session index in 16 bits, and
/// every rollup keeps one counter per session).
pub const MAX_SESSIONS: usize = 64;

impl Registry {
    /// Builds and checks a registry from rows.
    pub fn build(rows: RegistryRows) -> Result<Self, RegistryError> {
        if rows.sites.is_empty() {
            return Err(RegistryError::Empty("sites"));
        }
        if rows.sessions.is_empty() {
            return Err(RegistryError::Empty("sessions"));
        }
        if rows.sessions.len() > MAX_SESSIONS {
            return Err(RegistryError::TooMany { kind: "sessions", count: rows.sessions.len(), max: MAX_SESSIONS });
        }
        let mut province_by_code = HashMap::new();
        let mut provinces = Vec::with_capacity(rows.provinces.len());
        for (code, name) in rows.provinces {
            let idx = provinces.len() as u32;
            if province_by_code.insert(code.clone(), idx).is_some() {
                return Err(RegistryError::Duplicate { kind: "province", id: code });
            }
            provinces.push(Province { code, name, communes: Vec::new(), sites_total: 0, registered: 0 });
        }
        let mut commune_by_id = HashMap::new();
        let mut communes = Vec::with_capacity(rows.communes.len());
        for (id, name, province_code) in rows.communes {
            let Some(&province) = province_by_code.get(&province_code) else {
                return Err(RegistryError::Dangling {
                    kind: "commune",
                    id,
                    target: "province",
                    target_id: province_code,
                });
            };
            let idx = communes.len() as u32;
            if commune_by_id.insert(id.clone(), idx).is_some() {
                return Err(RegistryError::Duplicate { kind: "commune", id });
            }
            provinces[province as usize].communes.push(idx);
            communes.push(Commune { id, name, province, sites: Vec::new(), registered: 0 });
        }
        let mut site_by_id = HashMap::new();
        let mut sites = Vec::with_capacity(rows.sites.len());
        for (mut site, province_code, commune_id) in rows.sites {
            let Some(&commune) = commune_by_id.get(&commune_id) else {
                return Err(RegistryError::Dangling {
                    kind: "site",
                    id: site.id,
                    target: "commune",
                    target_id: commune_id,
                });
            };
            let province = communes[commune as usize].province;
            if provinces[province as usize].code != province_code {
                return Err(RegistryError::Dangling {
                    kind: "site",
                    id: site.id,
                    target: "province of its commune",
                    target_id: province_code,
                });
            }
            let idx = sites.len() as u32;
            if site_by_id.insert(site.id.clone(), idx).is_some() {
                return Err(RegistryError::Duplicate { kind: "site", id: site.id });
            }
            site.province = province;
            site.commune = commune;
            communes[commune as usize].sites.push(idx);
            communes[commune as usize].registered += u64::from(site.registered);
            provinces[province as usize].sites_total += 1;
            provinces[province as usize].registered += u64::from(site.registered);
            sites.push(site);
        }
        let mut session_by_id = rustc_hash::FxHashMap::default();
        for (i, s) in rows.sessions.iter().enumerate() {
            if session_by_id.insert(s.id, i as u16).is_some() {
                return Err(RegistryError::Duplicate { kind: "session", id: s.id.to_string() });
            }
        }
        let registered_total = provinces.iter().map(|p| p.registered).sum();
        Ok(Self {
            provinces,
            communes,
            sites,
            sessions: rows.sessions,
            province_by_code,
            commune_by_id,
            site_by_id,
            session_by_id,
            registered_total,
        })
    }

    /// Index of a province by code.
    pub fn province(&self, code: &str) -> Option<u32> {
        self.province_by_code.get(code).copied()
    }

    /// Index of a commune by id.
    pub fn commune(&self, id: &str) -> Option<u32> {
        self.commune_by_id.get(id).copied()
    }

    /// Index of a site by id.
    pub fn site(&self, id: &str) -> Option<u32> {
        self.site_by_id.get(id).copied()
    }

    /// Index of a session by its wire id.
    pub fn session(&self, id: u32) -> Option<u16> {
        self.session_by_id.get(&id).copied()
    }

    /// Registered delegates of the whole country (per session).
    pub fn registered_total(&self) -> u64 {
        self.registered_total
    }

    /// The session that is current at `now_unix_ms` by the schedule: the one running, else the
    /// next one if it starts within [`EARLY_CHECK_IN_MS`](crate::proto::schedule::EARLY_CHECK_IN_MS),
    /// else the latest one started; `None` before that or when no session has times. The rule is
    /// [`crate::proto::schedule`]'s, shared with the agents that read `Resume.schedule`.
    pub fn current_session(&self, now_unix_ms: i64) -> Option<&Session> {
        let windows =
            self.sessions.iter().map(|s| s.schedule.as_ref().map_or((0, 0), |w| (w.starts_unix_ms, w.ends_unix_ms)));
        crate::proto::schedule::current_index(windows, now_unix_ms).map(|i| &self.sessions[i])
    }

    /// The schedule as the wire carries it (`Resume.schedule`), in registry order.
    pub fn schedule(&self) -> Vec<crate::proto::v1::SessionInfo> {
        self.sessions
            .iter()
            .map(|s| crate::proto::v1::SessionInfo {
                id: s.id,
                name: s.name.clone(),
                starts_unix_ms: s.schedule.as_ref().map_or(0, |w| w.starts_unix_ms),
                ends_unix_ms: s.schedule.as_ref().map_or(0, |w| w.ends_unix_ms),
                time_zone: s.schedule.as_ref().map_or_else(String::new, |w| w.time_zone.clone()),
            })
            .collect()
    }
}
