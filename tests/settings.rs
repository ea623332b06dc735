//! Every setting of the aggregator is checked at start: each boundary is accepted and the value
//! just beyond it refused with an error naming the flag; and the real binary refuses to start.

mod common;

use clap::Parser;
use common::*;
use headcount::server::{
    config::ServerArgs,
    limits::{self, largest_ack, largest_batch_message},
};

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
}

/// Parses the aggregator's flags (plus a secret and registry paths, which validation does not
/// open) and validates them.
fn validate(args: &[&str]) -> Result<(), String> {
    let base = ["headcount-server", "--auth-secret", "0123456789abcdef0123", "--sites", "s.csv", "--sessions", "t.csv"];
    let cli = Cli::try_parse_from(base.iter().chain(args)).map_err(|e| format!("parse: {e}"))?;
    cli.server.validate().map_err(|e| e.to_string())
}

#[test]
fn every_setting_is_accepted_at_its_bounds_and_refused_beyond_them() {
    let need = largest_batch_message(limits::DEFAULT_MAX_BATCH, limits::DEFAULT_MAX_REASON)
        .max(largest_ack(limits::DEFAULT_MAX_BATCH))
        .to_string();
    let need_less = (need.parse::<usize>().expect("number") - 1).to_string();
    let ceiling = limits::MAX_MESSAGE_CEILING.to_string();
    let over_ceiling = (limits::MAX_MESSAGE_CEILING + 1).to_string();
    let big = ["--max-message-bytes", "8388608"];
    // (flag named in the error, accepted args, refused args)
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<&'a str>);
    let cases: Vec<Case<'_>> = vec![
        ("--silent-after", vec!["--silent-after", "100ms"], vec!["--silent-after", "99ms"]),
        ("--silent-after", vec!["--silent-after", "24h"], vec!["--silent-after", "86401s"]),
        ("--publish-tick", vec!["--publish-tick", "1ms"], vec!["--publish-tick", "0s"]),
        ("--publish-tick", vec!["--publish-tick", "60s"], vec!["--publish-tick", "61s"]),
        ("--curve-bucket", vec!["--curve-bucket", "100ms"], vec!["--curve-bucket", "99ms"]),
        ("--curve-bucket", vec!["--curve-bucket", "24h"], vec!["--curve-bucket", "86401s"]),
        ("--max-count", vec!["--max-count", "1"], vec!["--max-count", "0"]),
        ("--max-count", vec!["--max-count", "1000000000"], vec!["--max-count", "1000000001"]),
        ("--max-count", vec!["--max-count", "1"], vec!["--max-count", "9223372036854775807"]),
        ("--max-agents-per-site", vec!["--max-agents-per-site", "1"], vec!["--max-agents-per-site", "0"]),
        ("--max-agents-per-site", vec!["--max-agents-per-site", "32767"], vec!["--max-agents-per-site", "32768"]),
        ("--max-batch", vec!["--max-batch", "1"], vec!["--max-batch", "0"]),
        (
            "--max-batch",
            vec!["--max-batch", "65536", "--max-reason-bytes", "0", "--max-message-bytes", "16777216"],
            vec!["--max-batch", "65537", "--max-reason-bytes", "0", "--max-message-bytes", "16777216"],
        ),
        (
            "--max-reason-bytes",
            [&["--max-reason-bytes", "4096"][..], &big].concat(),
            [&["--max-reason-bytes", "4097"][..], &big].concat(),
        ),
        ("--max-message-bytes", vec!["--max-message-bytes", &need], vec!["--max-message-bytes", &need_less]),
        ("--max-message-bytes", vec!["--max-message-bytes", &ceiling], vec!["--max-message-bytes", &over_ceiling]),
        // A full batch with longer reasons no longer fits the default message limit.
        ("--max-message-bytes", vec!["--max-reason-bytes", "256"], vec!["--max-reason-bytes", "1024"]),
        (
            "--max-streams-per-connection",
            vec!["--max-streams-per-connection", "1"],
            vec!["--max-streams-per-connection", "0"],
        ),
        (
            "--max-streams-per-connection",
            vec!["--max-streams-per-connection", "100000"],
            vec!["--max-streams-per-connection", "100001"],
        ),
        ("--stream-window", vec!["--stream-window", "1024"], vec!["--stream-window", "1023"]),
        (
            "--stream-window",
            vec!["--stream-window", "2147483647", "--connection-window", "2147483647"],
            vec!["--stream-window", "2147483648", "--connection-window", "2147483647"],
        ),
        ("--connection-window", vec!["--connection-window", "32768"], vec!["--connection-window", "32767"]),
        ("--connection-window", vec!["--connection-window", "2147483647"], vec!["--connection-window", "2147483648"]),
        ("--keepalive-interval", vec!["--keepalive-interval", "100ms"], vec!["--keepalive-interval", "99ms"]),
        ("--keepalive-interval", vec!["--keepalive-interval", "2h"], vec!["--keepalive-interval", "7201s"]),
        ("--keepalive-timeout", vec!["--keepalive-timeout", "100ms"], vec!["--keepalive-timeout", "0s"]),
        ("--keepalive-timeout", vec!["--keepalive-timeout", "600s"], vec!["--keepalive-timeout", "601s"]),
        ("--flush-interval", vec!["--flush-interval", "100us"], vec!["--flush-interval", "99us"]),
        ("--flush-interval", vec!["--flush-interval", "10s"], vec!["--flush-interval", "10001ms"]),
        ("--flush-records", vec!["--flush-records", "1"], vec!["--flush-records", "0"]),
        ("--flush-records", vec!["--flush-records", "10000000"], vec!["--flush-records", "10000001"]),
        ("--snapshot-interval", vec!["--snapshot-interval", "100ms"], vec!["--snapshot-interval", "99ms"]),
        ("--snapshot-interval", vec!["--snapshot-interval", "24h"], vec!["--snapshot-interval", "86401s"]),
        (
            "--max-concurrent-handshakes",
            vec!["--max-concurrent-handshakes", "1"],
            vec!["--max-concurrent-handshakes", "0"],
        ),
        (
            "--max-concurrent-handshakes",
            vec!["--max-concurrent-handshakes", "1000000"],
            vec!["--max-concurrent-handshakes", "1000001"],
        ),
        ("--grace", vec!["--grace", "0s"], vec!["--grace", "3601s"]),
    ];
    assert_eq!(validate(&[]), Ok(()), "the defaults are consistent");
    for (flag, ok, bad) in &cases {
        assert_eq!(validate(ok), Ok(()), "{ok:?} must be accepted");
        match validate(bad) {
            Ok(()) => panic!("{bad:?} must be refused"),
            Err(e) => assert!(e.contains(flag), "{bad:?}: the error must name {flag}: {e}"),
        }
    }
}

#[test]
fn max_count_must_leave_room_for_every_register() {
    let reg = small_registry();
    let cli = Cli::try_parse_from(["x", "--auth-secret", "0123456789abcdef0123", "--max-count", "1000000000"])
        .expect("parse");
    assert!(cli.server.validate_for(&reg).is_ok());
    let registers: u64 = reg.sites.iter().map(|s| u64::from(s.desks)).sum::<u64>() * reg.sessions.len() as u64;
    assert!(limits::check_registry(i64::MAX / registers as i64, registers).is_ok());
    let e = limits::check_registry(i64::MAX / registers as i64 + 1, registers).expect_err("one above overflows");
    assert!(e.to_string().contains("--max-count"), "{e}");
}

#[test]
fn the_server_refuses_to_start_with_a_bad_setting_and_says_which() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sites, sessions) = (dir.path().join("sites.csv"), dir.path().join("sessions.csv"));
    let files =
        (std::fs::File::create(&sites).expect("sites.csv"), std::fs::File::create(&sessions).expect("sessions.csv"));
    headcount::server::registry::csv::write(&small_registry(), files.0, files.1).expect("write registry");
    for (flag, value) in
        [("--max-count", "9223372036854775807"), ("--silent-after", "0s"), ("--max-message-bytes", "262144")]
    {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_headcount-server"))
            .args(["--listen", "127.0.0.1:0", "--in-memory", flag, value])
            .arg("--sites")
            .arg(&sites)
            .arg("--sessions")
            .arg(&sessions)
            .env("HEADCOUNT_AUTH_SECRET", "0123456789abcdef0123")
            .env("RUST_LOG", "off")
            .output()
            .expect("run headcount-server");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value}: the server started");
        assert!(stderr.contains(flag) && stderr.contains("must be"), "{flag} {value}: {stderr}");
    }
}
