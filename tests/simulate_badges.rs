//! The national simulation in badge mode, small: one agent per site serving its desks, badges
//! with repeat scans (also at other desks), agents killed and restarted from their state; every
//! level must equal the number of distinct delegates.

use std::time::Duration;

use headcount::client::simulate::{SimulateArgs, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badge_simulation_counts_distinct_delegates_at_every_level() {
    let args = SimulateArgs {
        sites: 40,
        duration: Duration::from_secs(2),
        silent_sites: 2,
        reconnects: 10,
        in_memory: true,
        flush_timeout: Duration::from_secs(60),
        ..SimulateArgs::default()
    };
    let report = tokio::time::timeout(Duration::from_secs(120), run(&args))
        .await
        .expect("simulation finishes")
        .expect("simulation runs");
    assert!(report.exact(), "{:?}", report.mismatches);
    assert!(report.check_ins > 0 && report.silent_sites == 2, "{report:?}");
}
