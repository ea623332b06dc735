//! `headcount simulate --cluster 3` at a small scale (60 sites), in both models (the people
//! model, the default, and `--registers`): the real `headcount` binary starts a local
//! three-member etcd (the installed `etcd`) and three `headcount-server` nodes, spreads the sites
//! over them, kills one node with SIGKILL halfway through the event (its sites fail over to the
//! next address they were given), restarts it, and every level of every session must be EXACT on
//! every node, the restarted one included.

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_headcount"))
        .args(["simulate", "--cluster", "3", "--sites", "60", "--duration", "6s", "--reconnects", "50"])
        .args(model)
        .args(["--no-http", "--json"])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn headcount simulate --cluster 3");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("simulate --cluster did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read stdout");
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("read stderr");
    assert!(status.success(), "simulate --cluster failed: {status}\n{err}\n{out}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
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
