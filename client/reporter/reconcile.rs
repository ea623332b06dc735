//! Reconciling the reporter's state with the aggregator's answers: the resume handshake (adopt,
//! re-send, or add a fresh install's check-ins on top) and acks (settle, detect another writer's
//! state, rebase after a conflict, undo a refused change). Each builds the next state, saves it,
//! and only then changes anything in memory.

use std::collections::BTreeMap;

use tonic::Code;

use super::{
    ReporterError,
    actor::{Actor, bump},
    state::ScheduledSession,
};
use crate::proto::v1::{Ack, Resume};

impl Actor {
    /// Reconciles local state with what the aggregator holds (all or nothing: saved first).
    pub(super) async fn on_resume(&mut self, resume: Resume) -> Result<(), ReporterError> {
        // Without the seen-sets: reconciliation never changes them (and they are large).
        let mut next = self.state.head();
        // Only what this aggregator holds now counts as settled: after a restart that lost
        // state, sessions it does not mention are resent in full.
        let mut settled = BTreeMap::new();
        let (site, desk) = (self.config.site.clone(), self.config.desk);
        for reg in &resume.registers {
            let local = next.sessions.entry(reg.session).or_default();
            if !self.state.anchored {
                // Fresh install: local counts are check-ins since then, on top of the aggregator's
                // (unless a correction set the agent's absolute count).
                if !local.absolute {
                    local.count = local.count.saturating_add(reg.count);
                }
                local.seq = if local.seq > 0 { bump(reg.session, reg.seq)? } else { reg.seq };
            } else if reg.seq > local.seq {
                tracing::warn!(
                    site = %site, desk, session = reg.session, local_seq = local.seq, server_seq = reg.seq,
                    "aggregator holds a newer state than this agent; adopting it (state file restored from an old copy, \
                     or another agent with the same install id or desk?)"
                );
                local.seq = reg.seq;
                local.count = reg.count;
                local.reason = None;
            } else if reg.seq == local.seq && reg.count != local.count {
                tracing::error!(
                    site = %site, desk, session = reg.session, seq = reg.seq, local = local.count, server = reg.count,
                    "same seq, different count (another writer on this register); re-sending the local count with a newer seq"
                );
                local.seq = bump(reg.session, local.seq)?;
            }
            settled.insert(reg.session, reg.seq.min(local.seq));
        }
        next.anchored = true;
        for reg in next.sessions.values_mut() {
            reg.absolute = false;
        }
        if !resume.schedule.is_empty() {
            next.schedule = resume
                .schedule
                .iter()
                .map(|s| ScheduledSession {
                    id: s.id,
                    name: s.name.clone(),
                    starts_unix_ms: s.starts_unix_ms,
                    ends_unix_ms: s.ends_unix_ms,
                    time_zone: s.time_zone.clone(),
                })
                .collect();
        }
        self.commit(next).await?;
        self.settled = settled;
        let schedule = self.state.schedule.clone();
        self.status.send_modify(|s| {
            s.acked = resume.registers.iter().map(|r| (r.session, (r.seq, r.count))).collect();
            s.agent_slot = resume.agent_slot;
            s.site_agents = resume.site_agents;
            s.desk_agents = resume.desk_agents;
            s.schedule = schedule;
        });
        if resume.desk_agents > 1 || resume.site_agents > 1 {
            tracing::warn!(
                site = %site, desk, slot = resume.agent_slot, site_agents = resume.site_agents,
                desk_agents = resume.desk_agents,
                "other agent installs also report for this site; each has its own register and all are counted"
            );
        }
        self.publish_local();
        Ok(())
    }

    /// Reconciles an ack: settles what it covers, detects another writer's state, rebases after
    /// conflicts and undoes refused changes — saved before anything changes in memory.
    pub(super) async fn on_ack(&mut self, ack: Ack) {
        // Without the seen-sets: an ack never changes them (and they are large).
        let mut next = self.state.head();
        let mut settled = self.settled.clone();
        let mut refused = 0u64;
        let mut foreign = 0u64;
        let mut failure: Option<ReporterError> = None;
        let (site, desk) = (self.config.site.clone(), self.config.desk);
        let mut answered: Vec<(u32, u64)> = Vec::new();
        for a in &ack.applied {
            let Some(reg) = next.sessions.get_mut(&a.session) else { continue };
            let s = settled.entry(a.session).or_default();
            if a.seq > reg.seq || (a.seq == reg.seq && a.count != reg.count) {
                // Not our state: another writer moved this register. Our count is this agent's
                // truth; re-send it above their seq instead of taking their state as our ack.
                tracing::error!(
                    site = %site, desk, session = a.session, seq = a.seq, count = a.count, local_seq = reg.seq,
                    local = reg.count, "another writer's state on this agent's register; re-sending the local count"
                );
                foreign += 1;
                match bump(a.session, a.seq.max(reg.seq)) {
                    Ok(seq) => reg.seq = seq,
                    Err(e) => failure = Some(e),
                }
                *s = (*s).max(a.seq.min(reg.seq.saturating_sub(1)));
            } else {
                *s = (*s).max(a.seq);
                if reg.seq <= a.seq {
                    reg.reason = None;
                }
            }
            answered.push((a.session, a.seq));
        }
        for r in &ack.rejections {
            let code = Code::from_i32(r.code);
            let Some(reg) = next.sessions.get_mut(&r.session) else { continue };
            if code == Code::Aborted {
                // Conflict: another count at our seq. Our count is this agent's truth; move past.
                if let Some(cur) = &r.current {
                    tracing::error!(site = %site, desk, session = r.session, seq = r.seq, "conflict; re-sending with a newer seq");
                    match bump(r.session, reg.seq.max(cur.seq)) {
                        Ok(seq) => reg.seq = seq,
                        Err(e) => failure = Some(e),
                    }
                }
            } else {
                // Refused for good: undo that report's change, keep what came after it, and
                // never send its content again (e.g. a reason the aggregator does not accept).
                refused += 1;
                let (cur_seq, cur_count) = r.current.as_ref().map_or((0, 0), |c| (c.seq, c.count));
                let sent = self.conn.as_ref().and_then(|c| c.in_flight.get(&(r.session, r.seq)).copied());
                let since = sent.map_or(0, |sent| reg.count - sent);
                let count = (cur_count + since).max(0);
                tracing::error!(
                    site = %site, desk, session = r.session, seq = r.seq, code = ?code, message = %r.message,
                    lost = sent.map_or(0, |s| s - cur_count), "report refused by the aggregator; its change is undone"
                );
                reg.count = count;
                reg.reason = None;
                // This session's reports sent after the refused one carry its change too and
                // are refused the same way: their refusals must keep this count (their change
                // from the aggregator's count is the one just undone), not undo it once more.
                if let Some(conn) = &mut self.conn {
                    for ((session, seq), sent) in &mut conn.in_flight {
                        if *session == r.session && *seq > r.seq {
                            *sent = cur_count;
                        }
                    }
                }
                let s = settled.entry(r.session).or_default();
                match bump(r.session, reg.seq.max(cur_seq)) {
                    Ok(seq) => {
                        reg.seq = seq;
                        // Nothing left to send when the aggregator already holds this count.
                        *s = if count == cur_count { seq } else { (*s).max(r.seq) };
                    }
                    Err(e) => failure = Some(e),
                }
            }
            answered.push((r.session, r.seq));
        }
        if let Some(e) = failure {
            self.set_fatal(format!("{e}; ask the aggregator's operator"));
            return;
        }
        let last_error = ack.rejections.last().map(|r| format!("session {} seq {}: {}", r.session, r.seq, r.message));
        if let Err(e) = self.commit(next).await {
            tracing::error!(site = %site, desk, error = %e, "cannot save the reconciled state; reconnecting to retry");
            self.set_error(e.to_string());
            self.conn = None;
            return;
        }
        self.settled = settled;
        if let Some(conn) = &mut self.conn {
            for (session, seq) in answered {
                conn.in_flight.retain(|(s, q), _| *s != session || *q > seq);
            }
        }
        self.status.send_modify(|s| {
            for a in &ack.applied {
                let e = s.acked.entry(a.session).or_insert((0, 0));
                if a.seq >= e.0 {
                    *e = (a.seq, a.count);
                }
            }
            s.rejections += ack.rejections.len() as u64;
            s.refused += refused;
            s.foreign += foreign;
            if ack.site_agents > 0 {
                s.site_agents = ack.site_agents;
            }
            if last_error.is_some() {
                s.last_error = last_error;
            }
        });
        self.publish_local();
    }
}
