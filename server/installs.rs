//! Agent installs: a register slot per (site, install id), so that two agents reporting for one
//! site — a reinstalled laptop while the old one still runs, two laptops left on `--desk 1` — each
//! own a register and are summed, never overwrite each other.
//!
//! An agent sends its install id (random, generated once and kept in its state file) in the
//! `x-headcount-agent` metadata. The first time the aggregator sees an install it claims the next
//! free slot of the site, journals the claim (a `Record::Install`) and waits until it is durable
//! before the stream's resume, so the mapping survives a restart. Slots live in the register key's
//! `desk` field from [`INSTALL_DESK_BASE`] up, out of reach of the desk numbers (`1..=desks`) that
//! streams without the header use.

use std::{collections::HashMap, sync::Mutex};

use super::error::Error;

/// `RegisterKey::desk` of install slot 1 (slot `k` is `INSTALL_DESK_BASE + k - 1`).
pub const INSTALL_DESK_BASE: u16 = 0x8000;

/// Longest install id accepted, bytes.
pub const MAX_INSTALL_ID: usize = 64;

/// True if a register key's `desk` field is an install slot (not a desk number).
pub fn is_install_desk(desk: u16) -> bool {
    desk >= INSTALL_DESK_BASE
}

/// One known install of a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    /// The install id the agent sent.
    pub id: String,
    /// The desk number the agent said it serves (display only).
    pub desk: u32,
    /// Its slot, 1-based.
    pub slot: u16,
}

/// What claiming an install found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The install's slot, 1-based.
    pub slot: u16,
    /// True if the slot was claimed by this call (it must be journaled before use).
    pub new: bool,
    /// Installs known for the site, this one included.
    pub site_agents: u32,
    /// Installs that declared the same desk number, this one included.
    pub desk_agents: u32,
}

impl Claim {
    /// The register key's `desk` field for this install.
    pub fn register_desk(&self) -> u16 {
        INSTALL_DESK_BASE + (self.slot - 1)
    }
}

/// Install slots per site. Not on the hot path: touched once per stream opening.
#[derive(Debug)]
pub struct Installs {
    // A std Mutex: held only to look up or push, never across `.await`.
    sites: Mutex<HashMap<u32, Vec<Install>>>,
    /// Most installs per site (beyond: `RESOURCE_EXHAUSTED`).
    max_per_site: u16,
}

/// Checks an install id's shape: 1..=64 ASCII letters, digits, `-` or `_`.
pub fn validate_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_INSTALL_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "agent install id must be 1..={MAX_INSTALL_ID} ASCII letters, digits, '-' or '_' (delete the `install_id` \
             line of the state file to get a new one)"
        )))
    }
}

impl Installs {
    /// No installs yet; at most `max_per_site` per site (capped to the slots a register key has).
    pub fn new(max_per_site: u16) -> Self {
        Self { sites: Mutex::new(HashMap::new()), max_per_site: max_per_site.clamp(1, u16::MAX - INSTALL_DESK_BASE) }
    }

    /// The slot of `id` at `site`, claiming the next one for a new install. `site_name` is for
    /// the error message only.
    pub fn claim(&self, site: u32, site_name: &str, id: &str, desk: u32) -> Result<Claim, Error> {
        validate_id(id)?;
        let mut sites = self.sites.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = sites.entry(site).or_default();
        let (slot, new) = match list.iter_mut().find(|i| i.id == id) {
            Some(known) => {
                known.desk = desk;
                (known.slot, false)
            }
            None => {
                if list.len() >= usize::from(self.max_per_site) {
                    return Err(Error::ResourceExhausted(format!(
                        "site {site_name} already has {} agent installs, the most the aggregator allows \
                         (--max-agents-per-site); run one agent per site, or copy the old laptop's state file \
                         to the new one instead of starting a fresh install",
                        list.len()
                    )));
                }
                let slot = list.iter().map(|i| i.slot).max().unwrap_or(0) + 1;
                list.push(Install { id: id.to_owned(), desk, slot });
                (slot, true)
            }
        };
        let desk_agents = list.iter().filter(|i| i.desk == desk).count() as u32;
        Ok(Claim { slot, new, site_agents: list.len() as u32, desk_agents })
    }

    /// Installs known for `site`.
    pub fn count(&self, site: u32) -> u32 {
        let sites = self.sites.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sites.get(&site).map_or(0, |l| l.len() as u32)
    }

    /// Restores a journaled claim (recovery).
    pub fn restore(&self, site: u32, install: Install) {
        let mut sites = self.sites.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = sites.entry(site).or_default();
        if !list.iter().any(|i| i.id == install.id || i.slot == install.slot) {
            list.push(install);
        }
    }

    /// Drops a tentative claim of `id` (cluster mode: another node won its slot).
    pub fn forget(&self, site: u32, id: &str) {
        let mut sites = self.sites.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(list) = sites.get_mut(&site) {
            list.retain(|i| i.id != id);
        }
    }

    /// Every install with its site (for snapshots).
    pub fn all(&self) -> Vec<(u32, Install)> {
        let sites = self.sites.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sites.iter().flat_map(|(s, l)| l.iter().map(|i| (*s, i.clone()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_per_install_and_capped() {
        let i = Installs::new(2);
        let a = i.claim(7, "S7", "aaaa", 1).expect("first");
        assert_eq!((a.slot, a.new, a.site_agents, a.desk_agents), (1, true, 1, 1));
        assert!(!i.claim(7, "S7", "aaaa", 1).expect("again").new);
        let b = i.claim(7, "S7", "bbbb", 1).expect("second");
        assert_eq!((b.slot, b.new, b.site_agents, b.desk_agents), (2, true, 2, 2));
        assert!(matches!(i.claim(7, "S7", "cccc", 2), Err(Error::ResourceExhausted(_))));
        assert_eq!(i.claim(8, "S8", "cccc", 1).expect("other site").slot, 1);
        assert!(matches!(i.claim(8, "S8", "bad id!", 1), Err(Error::InvalidArgument(_))));
        assert_eq!(b.register_desk(), INSTALL_DESK_BASE + 1);
    }
}
