//! Provisioning: `headcount provision` writes a bundle per site and a mail-merge CSV; an agent
//! runs from one bundle's config file alone (in process and as the real `headcount site
//! --config` binary) against an in-test aggregator, and its check-ins count.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioned_bundle_runs_the_agent_from_its_config_alone() {
    use headcount::client::{credentials::CredentialArgs, provision};
    let ts = start_small().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (sites, sessions) = (dir.path().join("sites.csv"), dir.path().join("sessions.csv"));
    headcount::server::registry::csv::write(
        &ts.registry,
        std::fs::File::create(&sites).expect("sites"),
        std::fs::File::create(&sessions).expect("sessions"),
    )
    .expect("write registry");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, [SECRET, b"\n"].concat()).expect("secret");
    let out = dir.path().join("bundles");
    let args = provision::ProvisionArgs {
        sites,
        sessions,
        time_zone: "Asia/Ho_Chi_Minh".into(),
        server: ts.url(),
        ca: None,
        out: out.clone(),
        credentials: CredentialArgs {
            auth_secret: None,
            auth_secret_file: Some(secret_file),
            auth_keys: None,
            key_id: None,
            expires: Duration::from_secs(3600),
        },
    };
    let report = provision::run(&args).expect("provision");
    assert_eq!(report.bundles, ts.registry.sites.len());
    let merge = std::fs::read(&report.mail_merge).expect("mail merge");
    assert!(merge.starts_with(b"\xEF\xBB\xBF"), "UTF-8 BOM for spreadsheets");
    let text = String::from_utf8(merge[3..].to_vec()).expect("UTF-8");
    assert_eq!(text.lines().count(), ts.registry.sites.len() + 1, "a header and a row per site");
    let site = &ts.registry.sites[2];
    let bundle = out.join(&site.id);
    let sheet = std::fs::read_to_string(bundle.join(provision::SHEET_FILE)).expect("sheet");
    assert!(sheet.contains("HƯỚNG DẪN") && sheet.contains(&site.id), "Vietnamese sheet naming the site");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bundle.join(provision::TOKEN_FILE)).expect("token").permissions().mode();
        assert_eq!(mode & 0o077, 0, "token readable by its owner only");
    }
    // The agent runs from the bundle's config alone: the file's settings, as the site command
    // gets them (`--session` from the command line: the test registry has no current session).
    let config = bundle.join(provision::CONFIG_FILE);
    let args = headcount::client::site_config::expand(
        ["headcount", "site", "--config", config.to_str().expect("UTF-8 path"), "--session", "1"]
            .map(Into::into)
            .to_vec(),
        |_| true,
    )
    .expect("config file");
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let flag = |name: &str| {
        let at = args.iter().position(|a| *a == format!("--{name}")).unwrap_or_else(|| panic!("--{name} in {args:?}"));
        args[at + 1].clone()
    };
    assert_eq!(flag("server"), ts.url());
    assert_eq!(flag("session"), "1", "the command line's flag is kept");
    let state_file = std::path::PathBuf::from(flag("state-file"));
    let store = headcount::client::reporter::state::FileStore::new(&state_file);
    store.prepare().expect("state directory");
    let reporter_config = headcount::client::ReporterConfig {
        agent_install: true,
        ..headcount::client::ReporterConfig::new(flag("site"), flag("desk").parse().expect("desk"), flag("token"))
    };
    let channel = headcount::client::connect::lazy_channel(&flag("server")).expect("channel");
    let reporter =
        headcount::client::Reporter::spawn(channel, reporter_config, std::sync::Arc::new(store)).expect("reporter");
    let agent = std::sync::Arc::new(headcount::client::site::Agent::new(reporter, Some(1)));
    let options = headcount::client::site::run::RunOptions {
        stdin_mode: headcount::client::site::Mode::Badge,
        follow: Vec::new(),
        poll: Duration::from_millis(20),
        http: None,
        start_timeout: DEADLINE,
        flush_timeout: DEADLINE,
        site_totals: None,
    };
    let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let lines = screen.clone();
    let out: headcount::client::site::run::Out =
        std::sync::Arc::new(move |l| lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(l));
    let stdin = std::io::Cursor::new(b"BADGE-1\nBADGE-2\nBADGE-3\nBADGE-2\n".to_vec());
    let status = within(
        "agent run",
        headcount::client::site::run::run(agent, stdin, options, out, Box::pin(std::future::pending())),
    )
    .await;
    let says = screen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).join("\n");
    assert_eq!(status, headcount::client::site::ExitStatus::Acknowledged, "{says}");
    let reader = ts.reader().await;
    let id = site.id.clone();
    eventually("the bundle's check-ins count", DEADLINE, || async {
        match reader.count(common::site(&id), Some(1)).await {
            3 => Ok(()),
            n => Err(format!("count {n}")),
        }
    })
    .await;
    assert!(state_file.starts_with(&bundle) && state_file.exists(), "state file where the config says: {state_file:?}");

    // The real binary, from another site's bundle: `headcount site --config site.toml`.
    let other = &ts.registry.sites[3];
    let input = dir.path().join("badges.txt");
    std::fs::write(&input, "NGUYEN-1\nTRAN-2\n").expect("badges");
    let log = dir.path().join("agent.log");
    let log_file = std::fs::File::create(&log).expect("log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount"))
        .args(["site", "--config"])
        .arg(report.mail_merge.with_file_name(&other.id).join(provision::CONFIG_FILE))
        .args(["--session", "1"])
        .stdin(std::fs::File::open(&input).expect("badges"))
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("start the agent");
    let status = tokio::time::timeout(DEADLINE, child.wait()).await;
    let says = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status.unwrap_or_else(|_| panic!("agent did not end within {DEADLINE:?}: {says}")).expect("wait");
    assert!(status.success(), "agent exit {status:?}: {says}");
    assert_eq!(reader.count(common::site(&other.id), Some(1)).await, 2, "{says}");
}

#[test]
fn config_file_fills_flags_and_the_command_line_wins() {
    use headcount::client::site_config::expand;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("token"), "TOKEN-FROM-FILE\n").expect("token");
    let config = dir.path().join("site.toml");
    std::fs::write(
        &config,
        "server = \"http://127.0.0.1:1\"\nsite = \"S1\"\ndesk = 2\ntoken_file = \"token\"\nca = \"ca.pem\"\n",
    )
    .expect("config");
    let args: Vec<std::ffi::OsString> =
        ["headcount", "site", "--desk", "3", "--config", config.to_str().expect("utf-8")].map(Into::into).to_vec();
    let out = expand(args, |flag| flag != "ca").expect("expand");
    let out: Vec<String> = out.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let value = |flag: &str| out.iter().position(|a| a == flag).map(|i| out[i + 1].clone());
    assert_eq!(value("--server").as_deref(), Some("http://127.0.0.1:1"));
    assert_eq!(value("--token").as_deref(), Some("TOKEN-FROM-FILE"), "token read from its file");
    assert_eq!(out.iter().filter(|a| *a == "--desk").count(), 1, "the command line's --desk wins: {out:?}");
    assert_eq!(value("--desk").as_deref(), Some("3"));
    assert!(!out.iter().any(|a| a == "--ca"), "flags the build lacks are left out");
    // Unknown keys are refused with the file's name.
    std::fs::write(&config, "sever = \"typo\"\n").expect("config");
    let err =
        expand(["headcount", "site", "--config", config.to_str().expect("utf-8")].map(Into::into).to_vec(), |_| true)
            .expect_err("typo refused");
    assert!(err.to_string().contains("site.toml"), "{err}");
}
