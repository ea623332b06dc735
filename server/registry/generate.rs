//! The reference national registry: the 34 provinces of 2025 with synthetic communes and sites,
//! deterministic by seed (ChaCha8, so the same seed gives the same registry on every platform).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Registry, RegistryRows, Session, Site};

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

/// The four sessions of the two-day reference event.
pub fn reference_sessions() -> Vec<Session> {
    [
        (1, "Day 1 morning", "2026-12-01T08:00"),
        (2, "Day 1 afternoon", "2026-12-01T13:30"),
        (3, "Day 2 morning", "2026-12-02T08:00"),
        (4, "Day 2 afternoon", "2026-12-02T13:30"),
    ]
    .into_iter()
    .map(|(id, name, at)| Session { id, name: name.to_owned(), starts_at: at.to_owned() })
    .collect()
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
                let site = Site {
                    id: id.clone(),
                    name: format!("Điểm cầu {} số {}", cname, j + 1),
                    province: 0,
                    commune: 0,
                    registered,
                    desks,
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
