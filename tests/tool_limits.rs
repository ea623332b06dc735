//! The load tools refuse, at once and with what to change, a run that cannot succeed: more
//! streams on one connection than the aggregator admits, more open files than the process may
//! have, batches that are not the site agent's shape. Each test runs the real `headcount` binary
//! and asserts a non-zero exit well before the deadline (a hang fails the test) and the message.

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// A refused run exits at once; this only bounds a hang on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `headcount ARGS` (under `ulimit -n` when given) and returns (exit code, stderr); fails
/// the test if it has not exited within [`DEADLINE`].
fn run(nofile: Option<u32>, args: &[&str]) -> (Option<i32>, String) {
    let bin = env!("CARGO_BIN_EXE_headcount");
    let mut cmd = match nofile {
        // `ulimit -n` in sh sets the soft and the hard limit: the tool cannot raise it.
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" \"$@\"")).arg(bin).args(args);
            c
        }
        None => {
            let mut c = Command::new(bin);
            c.args(args);
            c
        }
    };
    let mut child = cmd
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn headcount");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for headcount") {
            break s;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("headcount {args:?} still running after {DEADLINE:?}: it should have refused at once");
        }
        // Polling a child process's exit; not synchronisation between test and code under test.
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().expect("stderr piped").read_to_string(&mut err).expect("read stderr");
    (status.code(), err)
}

#[test]
fn bench_refuses_more_streams_on_a_connection_than_the_aggregator_admits() {
    let (code, err) = run(None, &["bench", "idle", "--streams", "1100", "--connections", "1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("1100 streams on one HTTP/2 connection"), "{err}");
    assert!(err.contains("at most 1024"), "{err}");
    assert!(err.contains("--connections 2 or more"), "{err}");
}

#[test]
fn bench_counts_a_raised_server_limit_but_still_checks_it() {
    let (code, err) = run(
        None,
        &["bench", "idle", "--streams", "3000", "--connections", "1", "--server-arg=--max-streams-per-connection=2000"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("at most 2000"), "{err}");
    assert!(err.contains("--connections 2 or more"), "{err}");
}

#[test]
fn bench_refuses_batches_that_are_not_the_agents_shape_outside_stress() {
    let (code, err) = run(None, &["bench", "saturate", "--reports-per-batch", "64", "--streams", "10"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("at most one report per register per batch"), "{err}");
    assert!(err.contains("headcount bench stress --reports-per-batch 64"), "{err}");
}

#[test]
fn bench_refuses_more_connections_than_open_files_allow() {
    let (code, err) = run(Some(512), &["bench", "idle", "--streams", "2000", "--connections", "2000"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--connections 2000 needs about"), "{err}");
    assert!(err.contains("ulimit -n"), "{err}");
}

#[test]
fn simulate_refuses_more_desk_streams_on_a_connection_than_the_aggregator_admits() {
    let (code, err) = run(None, &["simulate", "--sites", "2200", "--sites-per-connection", "2200", "--quiet"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--sites-per-connection 2200 (one stream per desk) puts up to"), "{err}");
    assert!(err.contains("or fewer"), "{err}");
    assert!(!err.contains("VERDICT"), "refused before running: {err}");
}

#[test]
fn simulate_refuses_a_connection_per_site_beyond_the_open_file_limit() {
    let (code, err) = run(Some(512), &["simulate", "--sites", "2000", "--connection-per-site", "--quiet"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--connection-per-site (2000 connections, both ends in this process) needs about"), "{err}");
    assert!(err.contains("ulimit -n: soft 512, hard 512"), "{err}");
    assert!(err.contains("drop --connection-per-site"), "{err}");
}
