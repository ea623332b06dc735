//! `headcount simulate --cluster 3` at a small scale (60 sites), in both models (the people
//! model, the default, and `--registers`): the real `headcount` binary starts a local
//! three-member etcd (the installed `etcd`) and three `headcount-server` nodes, spreads the sites
//! over them, kills one node with SIGKILL halfway through the event (its sites fail over to the
//! next address they were given), restarts it, and every level of every session must be EXACT on
//! every node, the restarted one included.

mod common;

use std::time::Duration;

/// The run takes about 15 s in a debug build; this bounds a hang on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(400);

#[test]
fn people_model_on_three_nodes_with_one_killed_is_exact_on_every_node() {
    simulate_on_three_nodes(&[]);
}

#[test]
fn register_model_on_three_nodes_with_one_killed_is_exact_on_every_node() {
    simulate_on_three_nodes(&["--registers"]);
}

fn simulate_on_three_nodes(model: &[&str]) {
    let mut args = vec!["simulate", "--cluster", "3", "--sites", "60", "--duration", "6s", "--reconnects", "50"];
    args.extend_from_slice(model);
    args.extend(["--no-http", "--json"]);
    let r = common::headcount_json(&args, DEADLINE);
    assert_eq!(r["mismatch_count"], 0, "{r:#}");
    assert!(r["check_ins"].as_u64().unwrap_or(0) > 0, "{r:#}");
    let c = &r["cluster"];
    assert_eq!(c["nodes"], 3, "{r:#}");
    assert_eq!(c["killed"], "sim-node-0", "{r:#}");
    // Killed during the event, not after it.
    let (killed_at, seconds) = (c["killed_at_seconds"].as_f64().unwrap_or(-1.0), r["seconds"].as_f64().unwrap_or(0.0));
    assert!(killed_at > 0.0 && killed_at < seconds, "killed at {killed_at} s of {seconds} s");
    let verified: Vec<&str> =
        c["nodes_verified"].as_array().expect("nodes_verified").iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(verified, ["sim-node-0", "sim-node-1", "sim-node-2"], "every node checked, the restarted one too");
    // Every level of every session (national, provinces, communes, sites) on each of the 3 nodes.
    let per_node = r["totals_checked"].as_u64().unwrap_or(0) / 3;
    assert!(per_node > 60, "{r:#}");
}
