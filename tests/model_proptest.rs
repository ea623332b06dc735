//! Model-based property test of the counting rule over the real gRPC path.
//!
//! A few registers (site, desk, session) receive a random sequence of operations through raw
//! ingest streams: cumulative check-ins, reports lost in transit, duplicates of earlier reports
//! (also through an older stream of the same desk that is still open), reordered pairs, stream
//! reconnects, conflicts (the stored seq with another count), corrections (a lower count with a
//! reason) and aggregator restarts (in memory: registers and audit trail reset, every desk
//! resends its latest state, as a reporter does). The model is the counting rule itself: a
//! register holds the report with the highest seq it was sent; a conflict is refused with
//! `ABORTED` and the stored state; an applied report that lowers a count is one audit entry.
//! Every ack, every resume, the audit trail and the final totals at every level must match it.

mod common;

use common::*;
use headcount::proto::v1::{RegisterState, Report};
use proptest::prelude::*;
use tonic::Code;

/// (site index in the registry's order of sites with 2+ desks, desk, session).
const REGISTERS: [(usize, u32, u32); 6] = [(0, 1, 1), (0, 1, 2), (0, 2, 1), (1, 1, 1), (1, 1, 3), (2, 2, 4)];

/// The desks (streams) the registers live on.
const DESKS: [(usize, u32); 4] = [(0, 1), (0, 2), (1, 1), (2, 2)];

fn desk_of(reg: usize) -> usize {
    let (s, d, _) = REGISTERS[reg];
    DESKS.iter().position(|&x| x == (s, d)).expect("every register's desk is listed")
}

#[derive(Debug, Clone)]
enum Op {
    /// `n` more check-ins: a new seq with the new cumulative count, delivered.
    CheckIn { reg: usize, n: u8 },
    /// `n` more check-ins whose report is lost (the seq is used, nothing arrives).
    Lost { reg: usize, n: u8 },
    /// Resends the `back`-th latest report sent for the register, through the current stream or
    /// through the desk's previous stream if that one is still open.
    Duplicate { reg: usize, back: usize, via_old: bool },
    /// Two check-ins whose reports arrive newest first, in one batch or in two.
    Reorder { reg: usize, a: u8, b: u8, same_batch: bool },
    /// Several registers of one desk in one batch (as a reporter's group commit sends them).
    Multi { desk: usize, n: u8 },
    /// Opens a new stream for the desk (checking its resume); the old one is closed or kept open.
    Reconnect { desk: usize, keep_old: bool },
    /// The stored seq again with another count: refused (`ABORTED`), nothing changes.
    Conflict { reg: usize, plus: u8 },
    /// A new seq with a count lowered by `down` (not below 0) and a reason: applied, audited.
    Correct { reg: usize, down: u8 },
    /// The aggregator restarts in memory: everything it held is gone; every desk reconnects and
    /// resends its latest state.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let reg = 0..REGISTERS.len();
    let desk = 0..DESKS.len();
    prop_oneof![
        4 => (reg.clone(), 0u8..5).prop_map(|(reg, n)| Op::CheckIn { reg, n }),
        1 => (reg.clone(), 1u8..5).prop_map(|(reg, n)| Op::Lost { reg, n }),
        2 => (reg.clone(), 0usize..6, any::<bool>()).prop_map(|(reg, back, via_old)| Op::Duplicate { reg, back, via_old }),
        2 => (reg.clone(), 0u8..4, 1u8..4, any::<bool>()).prop_map(|(reg, a, b, same_batch)| Op::Reorder { reg, a, b, same_batch }),
        1 => (desk.clone(), 1u8..4).prop_map(|(desk, n)| Op::Multi { desk, n }),
        1 => (desk, any::<bool>()).prop_map(|(desk, keep_old)| Op::Reconnect { desk, keep_old }),
        1 => (reg.clone(), 1u8..4).prop_map(|(reg, plus)| Op::Conflict { reg, plus }),
        2 => (reg, 0u8..6).prop_map(|(reg, down)| Op::Correct { reg, down }),
        1 => Just(Op::Restart),
    ]
}

/// One register as the model sees it.
#[derive(Debug, Default, Clone)]
struct Model {
    /// The desk's cumulative count and last used seq (what a reporter would hold).
    count: i64,
    seq: u64,
    /// Every report sent, in sending order.
    sent: Vec<(u64, i64)>,
    /// The counting rule: the sent report with the highest seq.
    stored: (u64, i64),
}

impl Model {
    /// `n` more check-ins: the report a reporter would send for them.
    fn next(&mut self, session: u32, n: u8) -> Report {
        self.count += i64::from(n);
        self.seq += 1;
        report(session, self.seq, self.count)
    }

    /// A report reaches the aggregator; returns the count it lowered from when it is a
    /// correction (applied with a lower count than stored).
    fn deliver(&mut self, seq: u64, count: i64) -> Option<i64> {
        self.sent.push((seq, count));
        if seq > self.stored.0 {
            let previous = self.stored.1;
            self.stored = (seq, count);
            return (count < previous).then_some(previous);
        }
        None
    }
}

/// An expected audit entry: (register, seq, previous count, count, reason).
type Audited = (usize, u64, i64, i64, String);

/// Checks the refusal of a conflicting report: no applied entry, one `ABORTED` rejection carrying
/// the stored state.
fn check_conflict(ack: &headcount::proto::v1::Ack, reg: usize, seq: u64, models: &[Model]) -> Result<(), String> {
    let session = REGISTERS[reg].2;
    let (stored_seq, stored_count) = models[reg].stored;
    let current = Some(RegisterState { session, seq: stored_seq, count: stored_count });
    match ack.rejections.as_slice() {
        [r] if ack.applied.is_empty()
            && r.code == Code::Aborted as i32
            && r.session == session
            && r.seq == seq
            && r.current == current =>
        {
            Ok(())
        }
        _ => Err(format!("conflict answered {ack:?}, model stored {current:?}")),
    }
}

struct Desk {
    current: RawStream,
    old: Option<RawStream>,
}

/// Checks an ack against the model: one applied entry per session of the batch, in order of first
/// appearance, each the register's stored state; no rejections.
fn check_ack(ack: &headcount::proto::v1::Ack, regs: &[usize], models: &[Model]) -> Result<(), String> {
    let mut want: Vec<RegisterState> = Vec::new();
    for &r in regs {
        let session = REGISTERS[r].2;
        if !want.iter().any(|w| w.session == session) {
            let (seq, count) = models[r].stored;
            want.push(RegisterState { session, seq, count });
        }
    }
    if !ack.rejections.is_empty() {
        return Err(format!("unexpected rejections {:?}", ack.rejections));
    }
    if ack.applied != want {
        return Err(format!("ack {:?} != model {want:?}", ack.applied));
    }
    Ok(())
}

/// Delivers `rep` for register `reg` to the model, noting the audit entry it must produce.
fn deliver(models: &mut [Model], audit: &mut Vec<Audited>, reg: usize, rep: &Report) {
    if let Some(previous) = models[reg].deliver(rep.seq, rep.count) {
        audit.push((reg, rep.seq, previous, rep.count, rep.reason.clone()));
    }
}

async fn run(ops: Vec<Op>) -> Result<(), String> {
    let mut ts = start_small().await;
    let mut ch = ts.channel().await;
    let mut reader = ts.reader().await;
    let sites: Vec<(u32, String)> = (0..3).map(|n| ts.site_with_desks(2, n)).collect();
    let mut models: Vec<Model> = vec![Model::default(); REGISTERS.len()];
    // Expected audit trail since the last restart, oldest first; conflicts sent since then.
    let mut audit: Vec<Audited> = Vec::new();
    let mut conflicts = 0u64;
    let mut desks = Vec::new();
    for &(s, d) in &DESKS {
        desks.push(Desk { current: ts.open(&ch, &sites[s].1, d).await, old: None });
    }

    for (i, op) in ops.iter().enumerate() {
        let ctx = |e: String| format!("op {i} {op:?}: {e}");
        match *op {
            Op::CheckIn { reg, n } => {
                let rep = models[reg].next(REGISTERS[reg].2, n);
                deliver(&mut models, &mut audit, reg, &rep);
                let ack = desks[desk_of(reg)].current.send_batch(vec![rep]).await;
                check_ack(&ack, &[reg], &models).map_err(ctx)?;
            }
            Op::Lost { reg, n } => {
                models[reg].next(REGISTERS[reg].2, n);
            }
            Op::Duplicate { reg, back, via_old } => {
                let m = &models[reg];
                if m.sent.is_empty() {
                    continue;
                }
                let (seq, count) = m.sent[m.sent.len() - 1 - back % m.sent.len()];
                let rep = report(REGISTERS[reg].2, seq, count);
                let desk = &mut desks[desk_of(reg)];
                let stream = match (&mut desk.old, via_old) {
                    (Some(old), true) => old,
                    _ => &mut desk.current,
                };
                deliver(&mut models, &mut audit, reg, &rep);
                let ack = stream.send_batch(vec![rep]).await;
                check_ack(&ack, &[reg], &models).map_err(ctx)?;
            }
            Op::Reorder { reg, a, b, same_batch } => {
                let session = REGISTERS[reg].2;
                let first = models[reg].next(session, a);
                let second = models[reg].next(session, b);
                let stream = &mut desks[desk_of(reg)].current;
                if same_batch {
                    deliver(&mut models, &mut audit, reg, &second);
                    deliver(&mut models, &mut audit, reg, &first);
                    let ack = stream.send_batch(vec![second, first]).await;
                    check_ack(&ack, &[reg], &models).map_err(ctx)?;
                } else {
                    deliver(&mut models, &mut audit, reg, &second);
                    let ack = stream.send_batch(vec![second]).await;
                    check_ack(&ack, &[reg], &models).map_err(ctx)?;
                    deliver(&mut models, &mut audit, reg, &first);
                    let ack = stream.send_batch(vec![first]).await;
                    check_ack(&ack, &[reg], &models).map_err(ctx)?;
                }
            }
            Op::Multi { desk, n } => {
                let regs: Vec<usize> = (0..REGISTERS.len()).filter(|&r| desk_of(r) == desk).collect();
                let mut reports = Vec::new();
                for &r in &regs {
                    let rep = models[r].next(REGISTERS[r].2, n);
                    deliver(&mut models, &mut audit, r, &rep);
                    reports.push(rep);
                }
                let ack = desks[desk].current.send_batch(reports).await;
                check_ack(&ack, &regs, &models).map_err(ctx)?;
            }
            Op::Reconnect { desk, keep_old } => {
                let (s, d) = DESKS[desk];
                let fresh = ts.open(&ch, &sites[s].1, d).await;
                let mut want: Vec<RegisterState> = (0..REGISTERS.len())
                    .filter(|&r| desk_of(r) == desk && models[r].stored.0 > 0)
                    .map(|r| RegisterState {
                        session: REGISTERS[r].2,
                        seq: models[r].stored.0,
                        count: models[r].stored.1,
                    })
                    .collect();
                want.sort_by_key(|r| r.session);
                if fresh.resume.registers != want {
                    return Err(ctx(format!("resume {:?} != model {want:?}", fresh.resume.registers)));
                }
                let previous = std::mem::replace(&mut desks[desk].current, fresh);
                desks[desk].old = keep_old.then_some(previous);
            }
            Op::Conflict { reg, plus } => {
                let (seq, count) = models[reg].stored;
                if seq == 0 {
                    continue;
                }
                let rep = report(REGISTERS[reg].2, seq, count + i64::from(plus));
                let ack = desks[desk_of(reg)].current.send_batch(vec![rep]).await;
                conflicts += 1;
                check_conflict(&ack, reg, seq, &models).map_err(ctx)?;
            }
            Op::Correct { reg, down } => {
                let m = &mut models[reg];
                m.count = (m.count - i64::from(down)).max(0);
                m.seq += 1;
                let rep = correction(REGISTERS[reg].2, m.seq, m.count, &format!("op {i}: badges scanned twice"));
                deliver(&mut models, &mut audit, reg, &rep);
                let ack = desks[desk_of(reg)].current.send_batch(vec![rep]).await;
                check_ack(&ack, &[reg], &models).map_err(ctx)?;
            }
            Op::Restart => {
                // Streams end first, so the graceful stop has nothing to wait for.
                desks.clear();
                let old = std::mem::replace(&mut ts, start_small().await);
                old.server.stop().await.map_err(|e| ctx(format!("stopping the aggregator: {e:?}")))?;
                ch = ts.channel().await;
                reader = ts.reader().await;
                audit.clear();
                conflicts = 0;
                for m in &mut models {
                    m.stored = (0, 0);
                    m.sent.clear();
                }
                // Every desk reconnects, finds nothing, and resends its latest state in one batch.
                for (k, &(s, d)) in DESKS.iter().enumerate() {
                    let fresh = ts.open(&ch, &sites[s].1, d).await;
                    if !fresh.resume.registers.is_empty() {
                        return Err(ctx(format!("resume after an in-memory restart: {:?}", fresh.resume.registers)));
                    }
                    desks.push(Desk { current: fresh, old: None });
                    let regs: Vec<usize> =
                        (0..REGISTERS.len()).filter(|&r| desk_of(r) == k && models[r].seq > 0).collect();
                    if regs.is_empty() {
                        continue;
                    }
                    let mut reports = Vec::new();
                    for &r in &regs {
                        let rep = report(REGISTERS[r].2, models[r].seq, models[r].count);
                        deliver(&mut models, &mut audit, r, &rep);
                        reports.push(rep);
                    }
                    let ack = desks[k].current.send_batch(reports).await;
                    check_ack(&ack, &regs, &models).map_err(ctx)?;
                }
            }
        }
    }

    // Final totals at every level: the sum of the stored registers.
    let mut truth = Truth::default();
    for (r, m) in models.iter().enumerate() {
        let (s, _, session) = REGISTERS[r];
        truth.add(sites[s].0, session, m.stored.1);
    }
    assert_totals(&reader, &ts.registry, &truth).await;
    let stats = ts.server.aggregator.stats();
    if stats.rejected != conflicts {
        return Err(format!("{conflicts} conflicts sent since the last restart, aggregator stats {stats:?}"));
    }
    // The audit trail: one entry per applied report that lowered a count, newest first.
    let want: Vec<(String, u32, u32, u64, i64, i64, String)> = audit
        .iter()
        .rev()
        .map(|(r, seq, previous, count, reason)| {
            let (s, d, session) = REGISTERS[*r];
            (sites[s].1.clone(), d, session, *seq, *previous, *count, reason.clone())
        })
        .collect();
    let got: Vec<(String, u32, u32, u64, i64, i64, String)> = reader
        .corrections(0)
        .await
        .corrections
        .into_iter()
        .map(|c| (c.site_id, c.desk, c.session, c.seq, c.previous_count, c.count, c.reason))
        .collect();
    if got != want {
        return Err(format!("audit trail {got:?} != model {want:?}"));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn registers_follow_the_max_seq_rule(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let outcome = rt.block_on(async { within("one proptest case", run(ops)).await });
        prop_assert!(outcome.is_ok(), "{}", outcome.err().unwrap_or_default());
    }
}
