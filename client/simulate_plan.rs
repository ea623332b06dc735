//! The register model's ground truth: which sites stay silent, how many delegates each desk of
//! every other site checks in per session (a few sites over their registered number), which desks
//! correct a double scan, and the arrival curve of a session.

use rand::{Rng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::server::registry::Registry;

/// One desk's plan.
pub(super) struct DeskPlan {
    pub(super) site: u32,
    pub(super) desk: u32,
    /// Check-ins per session index.
    pub(super) totals: Vec<u32>,
    /// Extra badges scanned twice then corrected away, per session index (0: none).
    pub(super) correction: Option<(usize, u32)>,
}

/// Ground truth and plans.
pub(super) struct Plan {
    pub(super) desks: Vec<DeskPlan>,
    /// expected[site][session] check-ins.
    pub(super) expected: Vec<Vec<i64>>,
    pub(super) silent: Vec<u32>,
}

/// The plan for `registry`: `silent_sites` sites that never connect, `corrections` desks that
/// scan a few badges twice and correct them away (`--silent-sites`, `--corrections`).
pub(super) fn plan(registry: &Registry, silent_sites: u32, corrections: u32, rng: &mut ChaCha8Rng) -> Plan {
    let sessions = registry.sessions.len();
    let session_factor = [0.97, 0.91, 0.94, 0.86];
    let mut order: Vec<u32> = (0..registry.sites.len() as u32).collect();
    order.shuffle(rng);
    let silent: Vec<u32> = order.iter().copied().take(silent_sites as usize).collect();
    let mut expected = vec![vec![0i64; sessions]; registry.sites.len()];
    let mut desks = Vec::new();
    for (i, site) in registry.sites.iter().enumerate() {
        if silent.contains(&(i as u32)) {
            continue;
        }
        // A few sites get more delegates than registered: accepted and flagged.
        let over = rng.random_bool(0.003);
        let base: f64 = if over { rng.random_range(1.05..1.2) } else { rng.random_range(0.8..1.0) };
        let d = u32::from(site.desks);
        let mut site_desks: Vec<DeskPlan> = (1..=d)
            .map(|desk| DeskPlan { site: i as u32, desk, totals: vec![0; sessions], correction: None })
            .collect();
        for (s, exp) in expected[i].iter_mut().enumerate() {
            let f = session_factor[s % session_factor.len()];
            let n = (f64::from(site.registered) * base * f).round() as u32;
            *exp = i64::from(n);
            for (k, dp) in site_desks.iter_mut().enumerate() {
                // Split as evenly as possible.
                dp.totals[s] = n / d + u32::from((k as u32) < n % d);
            }
        }
        desks.append(&mut site_desks);
    }
    for _ in 0..corrections.min(desks.len() as u32) {
        let k = rng.random_range(0..desks.len());
        let s = rng.random_range(0..sessions);
        desks[k].correction = Some((s, rng.random_range(1..=5)));
    }
    Plan { desks, expected, silent }
}

/// Fraction of a session's arrivals that have arrived at `x` ∈ [0, 1] of its window: a
/// logistic burst peaking at 60 % of the window (the rush before the start), normalised to 0..1.
pub(super) fn arrived(x: f64) -> f64 {
    let f = |x: f64| 1.0 / (1.0 + (-(x - 0.6) * 12.0).exp());
    ((f(x.clamp(0.0, 1.0)) - f(0.0)) / (f(1.0) - f(0.0))).clamp(0.0, 1.0)
}
