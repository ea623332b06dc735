//! Decoding and applying ingest messages: the input is a sequence of frames
//! `site u8 | desk u8 | len u16 LE | bytes`; each `bytes` is decoded as a `ReportRequest` (what a
//! reporter sends on `Ingest.Report`) and, when it decodes, applied to a fresh aggregator over a
//! small registry as that site and desk would. Checks, after every message: nothing panics, at
//! most one rejection per report, no total is negative, and each session's national total equals
//! the sum of its site totals.

#![no_main]

use std::sync::OnceLock;

use headcount::{
    proto::v1::{ReportRequest, report_request::Kind},
    server::{
        Aggregator, AggregatorConfig,
        registry::{
            Registry,
            generate::{GenerateOptions, generate},
        },
        tally::{Level, Node},
    },
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY
        .get_or_init(|| generate(&GenerateOptions { sites: 8, sites_per_commune: 2.0, mean_registered: 100, seed: 1 }))
}

fuzz_target!(|data: &[u8]| {
    let registry = registry();
    let agg = Aggregator::new(registry.clone(), AggregatorConfig::default());
    let mut rest = data;
    while rest.len() >= 4 {
        let (site, desk, len) = (rest[0], rest[1], u16::from_le_bytes([rest[2], rest[3]]) as usize);
        let body = &rest[4..(4 + len).min(rest.len())];
        rest = &rest[4 + body.len()..];
        let Ok(msg) = ReportRequest::decode(body) else { continue };
        let site = &registry.sites[site as usize % registry.sites.len()];
        // Desk 0 and desks past the site's count are refused by `reporter`, as on the wire.
        let Ok(reporter) = agg.reporter(&site.id, u32::from(desk % (site.desks as u8 + 2))) else { continue };
        match msg.kind {
            Some(Kind::Batch(batch)) => {
                let ack = agg.apply_batch(reporter, &batch);
                // One rejection per refused report, or one for a whole refused batch.
                assert!(
                    ack.rejections.len() <= batch.reports.len().max(1),
                    "{} reports, ack {ack:?}",
                    batch.reports.len()
                );
            }
            Some(Kind::Heartbeat(_)) => agg.heartbeat(reporter),
            None => {}
        }
        for k in 0..registry.sessions.len() {
            let read = |level, index| agg.shared().tallies.read(Node { level, index }, Some(k)).count;
            let national = read(Level::National, 0);
            let sites: i64 = (0..registry.sites.len() as u32).map(|i| read(Level::Site, i)).sum();
            assert!(national >= 0, "negative national total {national}");
            assert_eq!(national, sites, "session index {k}: national != sum of sites");
        }
    }
});
