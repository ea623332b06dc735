//! `headcount bench cluster` runs end to end at a small scale: the real `headcount` binary starts
//! one node with its journal, then a local three-member etcd (the installed `etcd`) and three
//! `headcount-server` nodes; its JSON shows load applied on both sides, etcd writes, the watch
//! lag probe, the reference peak exact on every node, and every stream of the killed node
//! resumed with its acknowledged state and acknowledged again on a survivor.

mod common;

use std::time::Duration;

/// A small run takes about 20 s in a debug build; this bounds a hang on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(400);

#[test]
fn bench_cluster_compares_one_node_with_three_and_fails_a_node_over() {
    let r = common::headcount_json(
        &["bench", "cluster", "--duration", "1s", "--streams", "30", "--connections", "3", "--rate", "300", "--json"],
        DEADLINE,
    );
    let c = &r["cluster"];
    let f64_at =
        |v: &serde_json::Value, path: &str| v.pointer(path).and_then(serde_json::Value::as_f64).unwrap_or(-1.0);
    for side in ["/single", "/cluster"] {
        assert!(f64_at(c, &format!("{side}/saturate_applied_per_second")) > 0.0, "{side}: {c}");
        assert!(f64_at(c, &format!("{side}/paced_applied_per_second")) > 0.0, "{side}: {c}");
    }
    assert_eq!(f64_at(c, "/single/nodes"), 1.0);
    assert_eq!((f64_at(c, "/cluster/nodes"), f64_at(c, "/cluster/etcd_members")), (3.0, 3.0));
    // The cluster's writes went through etcd; the single node committed to its journal.
    assert!(f64_at(c, "/cluster/saturate_etcd_keys_put_per_second") > 0.0, "{c}");
    assert!(f64_at(c, "/single/saturate_journal_flushes_per_second") > 0.0, "{c}");
    assert!(f64_at(c, "/cluster/paced_watch_lag/samples") > 0.0, "the lag probe ran: {c}");
    assert_eq!(f64_at(c, "/reference_peak/nodes_exact"), 3.0, "{c}");
    assert!(f64_at(c, "/reference_peak/check_ins") > 0.0, "{c}");
    // Streams 0, 3, …, 27 were on the killed node: 10 of 30.
    assert_eq!(f64_at(c, "/failover/killed_node_streams"), 10.0, "{c}");
    assert_eq!(f64_at(c, "/failover/resumed_durable"), 10.0, "{c}");
    assert_eq!(f64_at(c, "/failover/resent_acknowledged"), 10.0, "{c}");
    assert_eq!(f64_at(c, "/failover/survivors_exact"), 2.0, "{c}");
}
