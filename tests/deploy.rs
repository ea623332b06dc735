//! The deployment recipes in deploy/: the systemd units carry the settings the README promises
//! (readiness, state, credentials, hardening, descriptors), and the Containerfile is a two-stage
//! build. `scripts/verify-deploy.sh` additionally runs `systemd-analyze verify` where it can.

use std::collections::HashMap;

/// `section → key → values` of a unit file (a key may repeat; continuation lines joined).
fn parse_unit(text: &str) -> HashMap<String, HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, HashMap<String, Vec<String>>> = HashMap::new();
    let mut section = String::new();
    let mut logical = String::new();
    for raw in text.lines() {
        let line = raw.trim_end();
        if let Some(cont) = line.strip_suffix('\\') {
            logical.push_str(cont);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let l = std::mem::take(&mut logical);
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        if let Some(name) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not `Key=Value`: {l:?}"));
        out.entry(section.clone()).or_default().entry(k.trim().to_owned()).or_default().push(v.trim().to_owned());
    }
    out
}

fn unit(name: &str) -> HashMap<String, HashMap<String, Vec<String>>> {
    let path = format!("{}/deploy/{name}", env!("CARGO_MANIFEST_DIR"));
    parse_unit(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
}

fn values<'a>(u: &'a HashMap<String, HashMap<String, Vec<String>>>, key: &str) -> &'a [String] {
    u.get("Service").and_then(|s| s.get(key)).map_or(&[], Vec::as_slice)
}

fn one(u: &HashMap<String, HashMap<String, Vec<String>>>, key: &str) -> String {
    values(u, key).last().cloned().unwrap_or_else(|| panic!("[Service] {key}= missing"))
}

/// Hardening every unit must have.
fn assert_hardened(name: &str, u: &HashMap<String, HashMap<String, Vec<String>>>) {
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(u, key), want, "{name}: {key}");
    }
    assert!(!values(u, "SystemCallFilter").is_empty(), "{name}: a system call filter");
}

#[test]
fn aggregator_unit_notifies_keeps_state_and_loads_credentials() {
    let u = unit("headcount-server.service");
    assert_eq!(one(&u, "Type"), "notify", "readiness through sd-notify");
    assert!(one(&u, "ExecStart").ends_with("headcount-server"), "runs the aggregator");
    assert_eq!(one(&u, "StateDirectory"), "headcount");
    let env = values(&u, "Environment").join("\n");
    assert!(env.contains("HEADCOUNT_DATA_DIR=/var/lib/headcount"), "data in the state directory");
    assert!(
        values(&u, "LoadCredential").iter().any(|c| c.starts_with("auth-keys:")),
        "the key set through systemd credentials"
    );
    assert!(env.contains("HEADCOUNT_REVOKED="), "a revocation file");
    let exec = values(&u, "ExecStart").join(" ");
    assert!(!exec.contains("--auth-secret ") && !env.contains("AUTH_SECRET="), "no secret in the unit");
    let nofile: u64 = one(&u, "LimitNOFILE").parse().expect("a number");
    assert!(nofile >= 2 * 10_035, "descriptors for 10,035 streams and dashboards: {nofile}");
    assert_hardened("headcount-server.service", &u);
    assert_eq!(u["Install"]["WantedBy"], ["multi-user.target"]);
}

#[test]
fn site_agent_unit_runs_from_the_provisioned_config() {
    let u = unit("headcount-site@.service");
    let exec = one(&u, "ExecStart");
    assert!(exec.contains("site --config ") && exec.contains("--desk %i"), "one instance per desk: {exec}");
    assert!(one(&u, "StateDirectory").starts_with("headcount-site"), "state survives restarts");
    assert_eq!(one(&u, "Restart"), "always");
    assert_hardened("headcount-site@.service", &u);
}

#[test]
fn containerfile_builds_in_one_stage_and_runs_in_a_slim_one() {
    let path = format!("{}/deploy/Containerfile", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("Containerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "builder then runtime: {froms:?}");
    assert!(froms[0].contains(" AS builder") && froms[1].contains("debian:") && froms[1].contains("-slim"));
    assert!(text.contains("COPY --from=builder"), "the runtime gets only the binaries");
    assert!(text.lines().any(|l| l.starts_with("USER ") && !l.contains("root")), "not root");
    assert!(text.contains("VOLUME [\"/var/lib/headcount\"]"), "the data directory is a volume");
}

/// `Type=notify`: the aggregator says READY=1 once serving and STOPPING=1 on SIGTERM, through
/// the socket systemd names in `$NOTIFY_SOCKET` (here one the test listens on).
#[cfg(unix)]
#[tokio::test]
async fn aggregator_notifies_systemd_ready_then_stopping() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("temp dir");
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("notify socket");
    std::fs::write(dir.path().join("secret"), "a deployment test secret, long enough\n").expect("secret");
    let registry =
        headcount::server::registry::generate::generate(&headcount::server::registry::generate::GenerateOptions {
            sites: 20,
            ..Default::default()
        });
    let (sites, sessions) = (dir.path().join("sites.csv"), dir.path().join("sessions.csv"));
    headcount::server::registry::csv::write(
        &registry,
        std::fs::File::create(&sites).expect("sites"),
        std::fs::File::create(&sessions).expect("sessions"),
    )
    .expect("registry files");
    let log = dir.path().join("server.log");
    let log_file = std::fs::File::create(&log).expect("log");
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount-server"))
        .args(["--listen", "127.0.0.1:0", "--in-memory", "--grace", "1s"])
        .arg("--sites")
        .arg(&sites)
        .arg("--sessions")
        .arg(&sessions)
        .arg("--auth-secret-file")
        .arg(dir.path().join("secret"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("HEADCOUNT_AUTH_SECRET")
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("start headcount-server");
    let deadline = Duration::from_secs(30);
    let mut buf = vec![0u8; 4096];
    let mut next = async || {
        let Ok(got) = tokio::time::timeout(deadline, socket.recv(&mut buf)).await else {
            panic!(
                "no notification within {deadline:?}; server log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        };
        let n = got.expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next().await;
    assert!(ready.lines().any(|l| l == "READY=1"), "first notification: {ready:?}");
    let pid = server.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(killed.success());
    let stopping = next().await;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "on SIGTERM: {stopping:?}");
    let status = tokio::time::timeout(deadline, server.wait()).await.expect("exits in time").expect("wait");
    assert!(status.success(), "clean exit after the drain: {status:?}");
}
