//! The start of an ingest stream, on the aggregator's side: which register a reporter writes (a
//! desk number, or an agent install's slot claimed durably on first sight) and the resume
//! handshake that tells it what is stored — only state that is on disk.

use super::{
    aggregator::{Aggregator, ReporterId},
    durability::record::{InstallRecord, Record},
    error::Error,
    installs::Claim,
    registers::RegisterKey,
};
use crate::proto::v1::{RegisterState, Resume};

impl Aggregator {
    /// Resolves a site id and desk number to a reporter.
    pub fn reporter(&self, site_id: &str, desk: u32) -> Result<ReporterId, Error> {
        let registry = &self.shared().registry;
        let site = registry.site(site_id).ok_or_else(|| Error::UnknownSite(site_id.to_owned()))?;
        let desks = registry.sites[site as usize].desks;
        if desk == 0 || desk > u32::from(desks) {
            return Err(Error::UnknownDesk { site: site_id.to_owned(), desk, desks });
        }
        Ok(ReporterId { site, desk: desk as u16 })
    }

    /// Resolves a site id and an agent install id to the install's register slot, claiming a
    /// new slot for an install seen for the first time; with a journal, returns only once the
    /// claim is durable. Errors: `NOT_FOUND` (site), `INVALID_ARGUMENT` (install id),
    /// `RESOURCE_EXHAUSTED` (the site's installs are at `max_agents_per_site`), `UNAVAILABLE`
    /// (shutting down before the claim was durable).
    pub async fn install_reporter(
        &self,
        site_id: &str,
        install: &str,
        desk: u32,
    ) -> Result<(ReporterId, Claim), Error> {
        let s = self.shared();
        let site = s.registry.site(site_id).ok_or_else(|| Error::UnknownSite(site_id.to_owned()))?;
        if let Some(rep) = &s.replication {
            // Cluster mode: the slot is claimed in etcd, unique across nodes (committed there
            // before this returns).
            let claim = rep.claim_install(&s.installs, site, site_id, install, desk).await?;
            if claim.new {
                tracing::info!(site = %site_id, desk, slot = claim.slot, node = %rep.node, "new agent install");
            }
            return Ok((ReporterId { site, desk: claim.register_desk() }, claim));
        }
        let claim = s.installs.claim(site, site_id, install, desk)?;
        if claim.new {
            tracing::info!(site = %site_id, desk, slot = claim.slot, agents = claim.site_agents, "new agent install");
            if let Some(d) = &s.durability {
                let mut durable = d.subscribe(site as usize);
                d.push(Record::Install(InstallRecord {
                    site: site_id.to_owned(),
                    slot: u32::from(claim.slot),
                    desk,
                    id: install.to_owned(),
                }));
                let target = d.target();
                d.wake();
                if durable.wait_for(|n| *n >= target).await.is_err() {
                    return Err(Error::Unavailable("aggregator stopping; retry".into()));
                }
            }
        }
        Ok((ReporterId { site, desk: claim.register_desk() }, claim))
    }

    /// The resume handshake: what the aggregator holds for this reporter.
    pub fn resume(&self, r: ReporterId) -> Resume {
        let s = self.shared();
        let registers = s
            .registry
            .sessions
            .iter()
            .enumerate()
            .filter_map(|(i, session)| {
                let reg = s.registers.get(RegisterKey { site: r.site, desk: r.desk, session: i as u16 });
                (reg.seq > 0).then_some(RegisterState { session: session.id, seq: reg.seq, count: reg.count })
            })
            .collect();
        s.liveness.touch(r.site, s.config.clock.mono_ms(), &s.tallies);
        Resume {
            site_id: s.registry.sites[r.site as usize].id.clone(),
            desk: u32::from(r.desk),
            registers,
            sessions: s.registry.sessions.iter().map(|x| x.id).collect(),
            schedule: s.registry.schedule(),
            ..Resume::default()
        }
    }

    /// The resume handshake showing only durable state: reads the registers, then waits until
    /// the flush that covers them is on disk. Errors with `Unavailable` when the aggregator
    /// stops first.
    ///
    /// In cluster mode it first catches up with etcd (every change committed by any node before
    /// the handshake is in the answer), so a site failing over learns everything acknowledged
    /// to it on the node it left; `UNAVAILABLE` when etcd cannot be read.
    pub async fn resume_durable(&self, r: ReporterId) -> Result<Resume, Error> {
        if let Some(rep) = &self.shared().replication {
            rep.admit()?;
            rep.catch_up().await?;
        }
        let resume = self.resume(r);
        if let Some(d) = &self.shared().durability {
            let stopped = || Error::Unavailable("aggregator shutting down; reconnect later".into());
            tokio::select! {
                done = d.wait_durable(r.site as usize) => done.map_err(|_| stopped())?,
                () = self.shared().shutdown.cancelled() => return Err(stopped()),
            }
        }
        Ok(resume)
    }

    /// A heartbeat: the site is alive.
    pub fn heartbeat(&self, r: ReporterId) {
        let s = self.shared();
        s.liveness.touch(r.site, s.config.clock.mono_ms(), &s.tallies);
    }
}
