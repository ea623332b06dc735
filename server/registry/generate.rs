//! The reference national registry: the 34 provinces of 2025 with synthetic communes and sites,
//! deterministic by seed (ChaCha8, so the same seed gives the same registry on every platform).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{
    Registry, RegistryRows, Session, Site,
    sessions::{DEFAULT_TIME_ZONE, schedule},
};

/// The 34 provincial-level units (`code,name,kind`), carried in the binary.
pub const PROVINCES_CSV: &str = include_str!("provinces-2025.csv");

/// Default seed of the reference registry.
pub const DEFAULT_SEED: u64 = 2026;

/// Shape of a generated registry.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Number of sites (reference: 10,035).
    pub sites: u32,
    /// Average sites per commune (reference: about 3, giving about 3,300 communes).
    pub sites_per_commune: f64,
    /// Mean registered delegates per site (reference: about 150, giving about 1.5 million).
    pub mean_registered: u32,
    /// Seed.
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { sites: 10_035, sites_per_commune: 3.04, mean_registered: 150, seed: DEFAULT_SEED }
    }
}

/// The four sessions of the two-day reference event (1–2 December 2026, Asia/Ho_Chi_Minh):
/// mornings 08:00–11:30, afternoons 13:30–17:00.
pub fn reference_sessions() -> Vec<Session> {
    [
        (1, "Ngày 1 — Sáng", "2026-12-01 08:00", "2026-12-01 11:30"),
        (2, "Ngày 1 — Chiều", "2026-12-01 13:30", "2026-12-01 17:00"),
        (3, "Ngày 2 — Sáng", "2026-12-02 08:00", "2026-12-02 11:30"),
        (4, "Ngày 2 — Chiều", "2026-12-02 13:30", "2026-12-02 17:00"),
    ]
    .into_iter()
    .map(|(id, name, starts, ends)| Session {
        id,
        name: name.to_owned(),
        // Constant, valid input: a failure here is a bug in this table, not a runtime condition.
        schedule: schedule(starts, ends, DEFAULT_TIME_ZONE).ok(),
    })
    .collect()
}

/// A synthetic contact for the site with 1-based number `n`: a Vietnamese name and a mobile
/// number, derived from `n` alone (no draw from the generator, so the registry for a seed is
/// the same as before contacts existed).
fn contact(n: u32) -> (String, String) {
    const FAMILY: [&str; 8] = ["Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Vũ", "Đặng", "Bùi"];
    const MIDDLE: [&str; 4] = ["Văn", "Thị", "Minh", "Thu"];
    const GIVEN: [&str; 10] = ["An", "Bình", "Châu", "Dũng", "Hà", "Hùng", "Lan", "Mai", "Nam", "Tâm"];
    let i = n as usize;
    let name = format!("{} {} {}", FAMILY[i % 8], MIDDLE[(i / 8) % 4], GIVEN[(i / 32) % 10]);
    (name, format!("09{:02} {:03} {:03}", (n / 1_000_000) % 100, (n / 1000) % 1000, n % 1000))
}

/// `(code, name, is_city)` of the embedded provinces.
pub fn provinces() -> Vec<(String, String, bool)> {
    PROVINCES_CSV
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            Some((f.next()?.to_owned(), f.next()?.to_owned(), f.next()? == "city"))
        })
        .collect()
}

/// Splits `total` into parts proportional to `weights` (largest remainder), each at least `min`.
fn apportion(total: u32, weights: &[f64], min: u32) -> Vec<u32> {
    let n = weights.len() as u32;
    let spare = total.saturating_sub(min * n);
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| f64::from(spare) * w / sum).collect();
    let mut parts: Vec<u32> = exact.iter().map(|e| e.floor() as u32).collect();
    let mut rest = spare - parts.iter().sum::<u32>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    for i in order {
        if rest == 0 {
            break;
        }
        parts[i] += 1;
        rest -= 1;
    }
    parts.iter().map(|p| p + min).collect()
}

/// Generates a registry.
pub fn generate(opts: &GenerateOptions) -> Registry {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let provs = provinces();
    let weights: Vec<f64> =
        provs.iter().map(|(_, _, city)| rng.random_range(0.6..1.4) * if *city { 1.5 } else { 1.0 }).collect();
    let min_sites = (opts.sites / provs.len() as u32).min(1);
    let sites_per_province = apportion(opts.sites, &weights, min_sites);
    let mut rows = RegistryRows { sessions: reference_sessions(), ..RegistryRows::default() };
    let mut next_site = 1u32;
    for ((code, name, city), &n_sites) in provs.iter().zip(&sites_per_province) {
        rows.provinces.push((code.clone(), name.clone()));
        if n_sites == 0 {
            continue;
        }
        let n_communes = ((f64::from(n_sites) / opts.sites_per_commune).round() as u32).clamp(1, n_sites);
        let commune_weights: Vec<f64> = (0..n_communes).map(|_| rng.random_range(0.5..1.5)).collect();
        let sites_per_commune = apportion(n_sites, &commune_weights, 1);
        let word = if *city { "Phường" } else { "Xã" };
        for (k, &cs) in sites_per_commune.iter().enumerate() {
            let cid = format!("{code}-{:03}", k + 1);
            let cname = format!("{word} {:03}, {name}", k + 1);
            for j in 0..cs {
                let id = format!("S{next_site:05}");
                next_site += 1;
                // Mean about `mean_registered`, spread 40 %..160 %.
                let mean = f64::from(opts.mean_registered);
                let registered = (mean * rng.random_range(0.4..1.6)).round() as u32;
                let desks = match registered {
                    0..100 => 1,
                    100..200 => 2,
                    _ => 3,
                };
                let (contact_name, contact_phone) = contact(next_site - 1);
                let site = Site {
                    id: id.clone(),
                    name: format!("Điểm cầu {} số {}", cname, j + 1),
                    province: 0,
                    commune: 0,
                    registered,
                    desks,
                    contact_name,
                    contact_phone,
                };
                rows.sites.push((site, code.clone(), cid.clone()));
            }
            rows.communes.push((cid, cname, code.clone()));
        }
    }
    // The generator only produces consistent rows.
    match Registry::build(rows) {
        Ok(r) => r,
        Err(e) => unreachable!("generated registry is inconsistent: {e}"),
    }
}
