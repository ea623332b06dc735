//! A history checker for the counter workload, in the spirit of Jepsen's: the test records every
//! attempted check-in (before handing it to a reporter), every acknowledged register state (from
//! the reporters' acks) and every totals read (node, scope, session, value, when it started and
//! ended); after the run it gathers each node's final registers and totals, and [`check`] says
//! what, if anything, broke:
//!
//! - (a) every acknowledged `(register, seq)` is ≤ the final register's seq on every node (equal
//!   seq: the same count), so nothing acknowledged was lost;
//! - (b) each node's totals at every level equal the sum of that node's final registers, and
//!   every node holds the same registers;
//! - (c) no total ever read is outside [what was acknowledged before the read started, what was
//!   attempted before it ended]. The lower bound applies to *fresh* reads only: reads that asked
//!   for at least the etcd revision current when they started (`min_revision`), so that every
//!   acknowledged write is in them (a node may otherwise lag behind another node's acks).
//!
//! The bounds need a monotone workload (check-ins only, no corrections): counts never decrease
//! with seq. The checker verifies that too, so it cannot pass on a history it cannot judge.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::Instant,
};

use headcount::{
    proto::v1::{Scope, ScopeKind},
    server::registry::Registry,
};

/// A register: site id, desk number (or install slot), session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reg {
    pub site: String,
    pub desk: String,
    pub session: u32,
}

impl Reg {
    pub fn new(site: &str, desk: impl ToString, session: u32) -> Self {
        Self { site: site.to_owned(), desk: desk.to_string(), session }
    }
}

/// One totals read.
#[derive(Debug, Clone)]
pub struct Read {
    pub node: String,
    pub scope: Scope,
    pub session: Option<u32>,
    pub value: i64,
    /// Taken before the request was sent.
    pub start: Instant,
    /// Taken after the answer arrived.
    pub end: Instant,
    /// The read asked for a revision taken from etcd after `start` (see the module docs).
    pub fresh: bool,
}

#[derive(Debug, Clone)]
enum Event {
    Attempt { reg: Reg, count: i64, at: Instant },
    Ack { reg: Reg, seq: u64, count: i64, at: Instant },
}

/// The history of one run; shared by the test's tasks (behind an `Arc`).
#[derive(Debug, Default)]
pub struct History {
    // A std mutex: held for a push, never across an await.
    events: Mutex<Vec<Event>>,
    reads: Mutex<Vec<Read>>,
}

/// Final state of one node: its registers (through the resume handshake) and totals read at
/// every level and session after the run.
pub type Registers = BTreeMap<Reg, (u64, i64)>;

/// What the nodes hold after the run.
#[derive(Debug, Clone, Default)]
pub struct Finals {
    /// Per node: every register of the run (absent: seq 0, count 0).
    pub registers: BTreeMap<String, Registers>,
    /// Per node: (scope, session, count) read after the run.
    pub totals: BTreeMap<String, Vec<(Scope, Option<u32>, i64)>>,
}

/// How much a passing check looked at (a test asserts it is not empty).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub attempts: usize,
    pub acks: usize,
    pub reads: usize,
    pub fresh_reads: usize,
    pub final_totals: usize,
}

impl History {
    /// Records an attempt to take `reg` to `count`: call it BEFORE the check-in is handed over.
    pub fn attempt(&self, reg: Reg, count: i64) {
        self.attempt_at(reg, count, Instant::now());
    }

    /// [`History::attempt`] at a given time (hand-made histories).
    pub fn attempt_at(&self, reg: Reg, count: i64, at: Instant) {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Event::Attempt { reg, count, at });
    }

    /// Records an acknowledged state: call it AFTER the ack was seen.
    pub fn ack(&self, reg: Reg, seq: u64, count: i64) {
        self.ack_at(reg, seq, count, Instant::now());
    }

    /// [`History::ack`] at a given time (hand-made histories).
    pub fn ack_at(&self, reg: Reg, seq: u64, count: i64, at: Instant) {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Event::Ack { reg, seq, count, at });
    }

    /// Records a totals read.
    pub fn read(&self, read: Read) {
        self.reads.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(read);
    }

    /// Registers of the run (those attempted or acknowledged).
    pub fn registers(&self) -> Vec<Reg> {
        let events = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut regs: Vec<Reg> = events
            .iter()
            .map(|e| match e {
                Event::Attempt { reg, .. } | Event::Ack { reg, .. } => reg.clone(),
            })
            .collect();
        regs.sort();
        regs.dedup();
        regs
    }

    /// Every acknowledgement recorded: (register, seq, count, when it was seen).
    pub fn acks(&self) -> Vec<(Reg, u64, i64, Instant)> {
        let events = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        events
            .iter()
            .filter_map(|e| match e {
                Event::Ack { reg, seq, count, at } => Some((reg.clone(), *seq, *count, *at)),
                Event::Attempt { .. } => None,
            })
            .collect()
    }

    /// Highest acknowledged (seq, count) per register.
    pub fn acknowledged(&self) -> Registers {
        let mut out = Registers::new();
        for e in self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            if let Event::Ack { reg, seq, count, .. } = e {
                let cur = out.entry(reg.clone()).or_default();
                if *seq > cur.0 {
                    *cur = (*seq, *count);
                }
            }
        }
        out
    }
}

/// True when `site_id` lies in `scope` (unknown sites lie nowhere but in the nation).
pub fn in_scope(registry: &Registry, site_id: &str, scope: &Scope) -> bool {
    let Some(i) = registry.site(site_id) else { return scope.kind == ScopeKind::National as i32 };
    let s = &registry.sites[i as usize];
    match ScopeKind::try_from(scope.kind) {
        Ok(ScopeKind::National) => true,
        Ok(ScopeKind::Province) => registry.provinces.get(s.province as usize).is_some_and(|p| p.code == scope.id),
        Ok(ScopeKind::Commune) => registry.communes.get(s.commune as usize).is_some_and(|c| c.id == scope.id),
        Ok(ScopeKind::Site) => s.id == scope.id,
        _ => false,
    }
}

fn sum_in(registry: &Registry, values: &HashMap<Reg, i64>, scope: &Scope, session: Option<u32>) -> i64 {
    values
        .iter()
        .filter(|(r, _)| session.is_none_or(|s| s == r.session) && in_scope(registry, &r.site, scope))
        .map(|(_, v)| *v)
        .sum()
}

fn describe(scope: &Scope, session: Option<u32>) -> String {
    let kind = ScopeKind::try_from(scope.kind).map_or_else(|_| format!("kind {}", scope.kind), |k| format!("{k:?}"));
    format!("{kind} {:?} session {session:?}", scope.id)
}

/// Checks (a), (b) and (c) of the module docs; `Err` lists every violation found.
pub fn check(history: &History, registry: &Registry, finals: &Finals) -> Result<Summary, Vec<String>> {
    let events = history.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let reads = history.reads.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut errors = Vec::new();
    let mut summary =
        Summary { reads: reads.len(), fresh_reads: reads.iter().filter(|r| r.fresh).count(), ..Summary::default() };

    // The workload must be monotone for the bounds to mean anything.
    let mut last_ack: HashMap<Reg, (u64, i64)> = HashMap::new();
    for e in &events {
        match e {
            Event::Attempt { count, .. } if *count < 0 => errors.push(format!("negative attempt {e:?}")),
            Event::Attempt { .. } => summary.attempts += 1,
            Event::Ack { reg, seq, count, .. } => {
                summary.acks += 1;
                let prev = last_ack.entry(reg.clone()).or_default();
                if (*seq > prev.0 && *count < prev.1) || (*seq < prev.0 && *count > prev.1) {
                    errors.push(format!("not a monotone workload: {reg:?} acked {prev:?} and ({seq}, {count})"));
                }
                if *seq > prev.0 {
                    *prev = (*seq, *count);
                }
            }
        }
    }

    // (a) nothing acknowledged is lost, on any node.
    if finals.registers.is_empty() {
        errors.push("no node's final registers were given".to_owned());
    }
    for (node, regs) in &finals.registers {
        for e in &events {
            if let Event::Ack { reg, seq, count, .. } = e {
                let (fseq, fcount) = regs.get(reg).copied().unwrap_or((0, 0));
                if fseq < *seq {
                    errors.push(format!(
                        "(a) {node}: {reg:?} acknowledged seq {seq} (count {count}) but holds seq {fseq}"
                    ));
                } else if fseq == *seq && fcount != *count {
                    errors.push(format!("(a) {node}: {reg:?} seq {seq} acknowledged count {count} but holds {fcount}"));
                }
            }
        }
    }

    // (b) every node's totals are the sum of its registers, and every node holds the same.
    if let Some((first, first_regs)) = finals.registers.iter().next() {
        for (node, regs) in &finals.registers {
            if regs != first_regs {
                let differ: Vec<String> = first_regs
                    .keys()
                    .chain(regs.keys())
                    .filter(|r| first_regs.get(*r) != regs.get(*r))
                    .take(5)
                    .map(|r| format!("{r:?}: {first} {:?}, {node} {:?}", first_regs.get(r), regs.get(r)))
                    .collect();
                errors.push(format!("(b) {node} and {first} hold different registers: {}", differ.join("; ")));
            }
        }
    }
    for (node, totals) in &finals.totals {
        let Some(regs) = finals.registers.get(node) else {
            errors.push(format!("(b) totals of {node} given without its registers"));
            continue;
        };
        let counts: HashMap<Reg, i64> = regs.iter().map(|(r, (_, c))| (r.clone(), *c)).collect();
        for (scope, session, value) in totals {
            summary.final_totals += 1;
            let want = sum_in(registry, &counts, scope, *session);
            if *value != want {
                errors
                    .push(format!("(b) {node}: {} is {value}, its registers sum to {want}", describe(scope, *session)));
            }
        }
    }
    if finals.totals.is_empty() {
        errors.push("no node's final totals were given".to_owned());
    }

    // (c) every read within [acknowledged before it started, attempted before it ended]: a sweep
    // over the events in time order, keeping each register's highest acked and attempted count.
    let mut points: Vec<(Instant, bool, usize)> = Vec::with_capacity(2 * reads.len()); // (time, is_end, read)
    for (i, r) in reads.iter().enumerate() {
        if r.end < r.start {
            errors.push(format!("(c) read {i} ends before it starts"));
        }
        points.push((r.start, false, i));
        points.push((r.end, true, i));
    }
    points.sort_by_key(|p| (p.0, p.1));
    let mut timeline: Vec<(Instant, &Event)> = events
        .iter()
        .map(|e| match e {
            Event::Attempt { at, .. } | Event::Ack { at, .. } => (*at, e),
        })
        .collect();
    timeline.sort_by_key(|(at, _)| *at);
    let mut sweep = Sweep::default();
    let mut lower = vec![0i64; reads.len()];
    let mut next = 0;
    for (at, is_end, i) in points {
        // Lower bound: acks strictly before the start. Upper bound: attempts up to the end.
        while next < timeline.len() && (timeline[next].0 < at || (is_end && timeline[next].0 == at)) {
            sweep.apply(timeline[next].1, &mut errors);
            next += 1;
        }
        let r = &reads[i];
        if !is_end {
            lower[i] = if r.fresh { sum_in(registry, &sweep.acked, &r.scope, r.session) } else { 0 };
            continue;
        }
        let upper = sum_in(registry, &sweep.attempted, &r.scope, r.session);
        if r.value < lower[i] || r.value > upper {
            errors.push(format!(
                "(c) {}: read {} on {} (fresh: {}), outside [{}, {upper}]",
                describe(&r.scope, r.session),
                r.value,
                r.node,
                r.fresh,
                lower[i]
            ));
        }
    }
    for (_, e) in &timeline[next..] {
        sweep.apply(e, &mut errors);
    }
    if errors.is_empty() { Ok(summary) } else { Err(errors) }
}

/// Each register's highest acknowledged and attempted count so far, in a sweep in time order.
#[derive(Default)]
struct Sweep {
    acked: HashMap<Reg, i64>,
    attempted: HashMap<Reg, i64>,
}

impl Sweep {
    fn apply(&mut self, e: &Event, errors: &mut Vec<String>) {
        match e {
            Event::Ack { reg, seq, count, .. } => {
                let tried = self.attempted.get(reg).copied().unwrap_or(0);
                if *count > tried {
                    errors.push(format!(
                        "(c) {reg:?} acknowledged seq {seq} count {count}, never attempted (at most {tried})"
                    ));
                }
                let v = self.acked.entry(reg.clone()).or_default();
                *v = (*v).max(*count);
            }
            Event::Attempt { reg, count, .. } => {
                let v = self.attempted.entry(reg.clone()).or_default();
                *v = (*v).max(*count);
            }
        }
    }
}
