//! The simulation's outcome: what ran, what the aggregator did, and every total compared with
//! the ground truth ([`SimulationReport`], printed as JSON with `--json`), and its text form for
//! people ([`print_report`]).

use serde::Serialize;

use super::dashboard::thousands;

/// The outcome.
#[derive(Debug, Clone, Serialize)]
pub struct SimulationReport {
    /// Sites in the registry.
    pub sites: usize,
    /// Reporters (desks) that ran.
    pub reporters: usize,
    /// HTTP/2 connections used.
    pub connections: usize,
    /// Check-ins handed to reporters.
    pub check_ins: u64,
    /// Aggregator: reports that changed a register.
    pub reports_applied: u64,
    /// Aggregator: stale or duplicate reports (no change).
    pub reports_unchanged: u64,
    /// Aggregator: rejected reports.
    pub reports_rejected: u64,
    /// Stream openings beyond the first per reporter.
    pub reconnects: u64,
    /// Corrections performed.
    pub corrections: u32,
    /// Silent sites reported by the aggregator.
    pub silent_sites: u32,
    /// Seconds from the first check-in to the last acknowledgement.
    pub seconds: f64,
    /// Check-ins per second over that time.
    pub check_ins_per_second: f64,
    /// Totals compared (scope × session).
    pub totals_checked: usize,
    /// Mismatches found (at most 20 listed).
    pub mismatches: Vec<String>,
    /// Number of mismatches.
    pub mismatch_count: usize,
    /// Cluster mode (`--cluster`): the nodes, the one killed, and those verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<super::simulate_cluster::ClusterOutcome>,
}

impl SimulationReport {
    /// True when every level matched.
    pub fn exact(&self) -> bool {
        self.mismatch_count == 0
    }
}

/// Prints the report for people.
pub fn print_report(r: &SimulationReport, out: &mut impl std::io::Write) {
    let _ = writeln!(
        out,
        "Simulated {} sites ({} desk reporters over {} connections), {} silent.",
        thousands(r.sites as i64),
        thousands(r.reporters as i64),
        r.connections,
        r.silent_sites
    );
    let _ = writeln!(
        out,
        "Check-ins: {} in {:.1} s ({}/s). Aggregator applied {} reports, ignored {} duplicates/stale, rejected {}.",
        thousands(r.check_ins as i64),
        r.seconds,
        thousands(r.check_ins_per_second as i64),
        thousands(r.reports_applied as i64),
        thousands(r.reports_unchanged as i64),
        r.reports_rejected
    );
    let _ = writeln!(out, "Reconnects: {}. Corrections: {}.", r.reconnects, r.corrections);
    if let Some(c) = &r.cluster {
        super::simulate_cluster::print(c, out);
    }
    if r.exact() {
        let _ = writeln!(
            out,
            "VERDICT: EXACT — all {} totals (national, provinces, communes, sites × every session) match the ground truth.",
            thousands(r.totals_checked as i64)
        );
    } else {
        let _ = writeln!(out, "VERDICT: MISMATCH — {} of {} totals differ:", r.mismatch_count, r.totals_checked);
        for m in &r.mismatches {
            let _ = writeln!(out, "  {m}");
        }
    }
}
