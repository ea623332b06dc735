//! The sessions file and its schedule (issue 9, item 5), and servers started from registry
//! files (issue 8): the schedule in `Resume`, totals and silent-site contacts over real gRPC, and
//! the aggregator binary refusing to start without a registry.

mod common;
mod registry_support;

use std::path::Path;

use common::*;
use headcount::{
    proto::schedule::EARLY_CHECK_IN_MS,
    server::registry::{
        csv::{LoadOptions, load, load_with},
        generate::{GenerateOptions, generate},
    },
};
use registry_support::*;

// ───────────────────────────── sessions and the schedule ─────────────────────────────

#[test]
fn schedule_in_the_event_time_zone() {
    let r = ok(Files::new().load_sessions(SESSIONS_CSV));
    let w = r.sessions[0].schedule.as_ref().expect("session 1 has times");
    assert_eq!((w.starts_unix_ms, w.ends_unix_ms), (DAY1_0800, DAY1_0800 + 210 * MINUTE));
    assert_eq!(w.time_zone, "Asia/Ho_Chi_Minh");
    // A row's own time zone wins over the default; `T` is accepted too.
    let utc = ok(Files::new()
        .load_sessions("session_id,name,starts_at,ends_at,time_zone\n1,S,2026-12-01T01:00,2026-12-01T04:30,UTC\n"));
    assert_eq!(utc.sessions[0].schedule.as_ref().map(|w| w.starts_unix_ms), Some(DAY1_0800));
    // `--time-zone` for rows without one.
    let f = Files::new();
    let sites = f.put("sites.csv", format!("{HEADER}\nHN001,A,01,Hà Nội,01-001,X,1,1\n").as_bytes());
    let sessions = f.put("sessions.csv", b"session_id,name,starts_at,ends_at\n1,S,2026-12-01 02:00,2026-12-01 03:00\n");
    let r = ok(load_with(&sites, &sessions, &LoadOptions { time_zone: "Europe/Paris".into() }));
    assert_eq!(r.sessions[0].schedule.as_ref().map(|w| w.starts_unix_ms), Some(DAY1_0800));
    // Sessions without times are allowed (never current).
    let none = ok(Files::new().load_sessions("session_id,name\n1,Khai mạc\n"));
    assert!(none.sessions[0].schedule.is_none());
    assert!(none.current_session(DAY1_0800).is_none());
}

#[test]
fn current_session_follows_the_schedule() {
    let r = ok(Files::new().load_sessions(SESSIONS_CSV));
    let current = |t: i64| r.current_session(t).map(|s| s.id);
    assert_eq!(current(DAY1_0800 - EARLY_CHECK_IN_MS - 1), None, "before the early check-in of the first");
    assert_eq!(current(DAY1_0800 - EARLY_CHECK_IN_MS), Some(1), "early check-in");
    assert_eq!(current(DAY1_0800 + 60 * MINUTE), Some(1), "running");
    assert_eq!(current(DAY1_0800 + 240 * MINUTE), Some(1), "lunch, more than the margin before the afternoon");
    assert_eq!(current(DAY1_0800 + 280 * MINUTE), Some(2), "within the margin before the afternoon");
    assert_eq!(current(DAY1_0800 + 24 * 60 * MINUTE), Some(2), "after the last: the latest started");
}

#[test]
fn bad_schedules_are_refused_with_their_line() {
    let f = Files::new();
    let head = "session_id,name,starts_at,ends_at,time_zone\n";
    refused(
        f.load_sessions(&format!(
            "{head}1,A,2026-12-01 08:00,2026-12-01 11:30,\n\n2,B,2026-12-01 11:00,2026-12-01 12:00,\n"
        )),
        "sessions.csv",
        4,
        &["overlaps session 1", "line 2"],
    );
    refused(
        f.load_sessions(&format!("{head}1,A,2026-12-01 11:30,2026-12-01 08:00,\n")),
        "sessions.csv",
        2,
        &["not after starts_at"],
    );
    refused(
        f.load_sessions(&format!("{head}1,A,2026-12-01 08:00,2026-12-01 11:30,Asia/Saigonn\n")),
        "sessions.csv",
        2,
        &["unknown time zone \"Asia/Saigonn\"", "Asia/Ho_Chi_Minh"],
    );
    refused(
        f.load_sessions(&format!("{head}1,A,01/12/2026 08:00,01/12/2026 11:30,\n")),
        "sessions.csv",
        2,
        &["starts_at", "ambiguous", "yyyy-mm-dd"],
    );
    refused(f.load_sessions(&format!("{head}1,A,2026-12-01 08:00,,\n")), "sessions.csv", 2, &["ends_at is empty"]);
    refused(f.load_sessions("session_id,name\n1,A\n1,B\n"), "sessions.csv", 3, &["session_id 1", "line 2"]);
    refused(f.load_sessions("session_id,name\n1,Sáng\n2,sáng\n"), "sessions.csv", 3, &["name \"sáng\"", "line 2"]);
    // A clock change: 02:30 does not exist in New York on 2026-03-08.
    refused(
        f.load_sessions(&format!("{head}1,A,2026-03-08 02:30,2026-03-08 05:00,America/New_York\n")),
        "sessions.csv",
        2,
        &["clock change"],
    );
}

#[test]
fn the_reference_registry_has_a_two_day_schedule() {
    let r = generate(&GenerateOptions { sites: 40, ..GenerateOptions::default() });
    let names: Vec<&str> = r.sessions.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["Ngày 1 — Sáng", "Ngày 1 — Chiều", "Ngày 2 — Sáng", "Ngày 2 — Chiều"]);
    assert_eq!(r.sessions[0].schedule.as_ref().map(|w| w.starts_unix_ms), Some(DAY1_0800));
    assert_eq!(r.sessions[3].schedule.as_ref().map(|w| w.ends_unix_ms), Some(DAY1_0800 + (24 * 60 + 540) * MINUTE));
    assert!(r.sites.iter().all(|s| !s.contact_name.is_empty() && s.contact_phone.starts_with("09")));
}

// ───────────────────────────── end to end ─────────────────────────────

/// A server started from an Excel-style file (semicolons, Windows-1258 with two spellings of one
/// name, CRLF, a quoted thousands separator, empty rows) serves the right totals, a silent site listing carries its
/// contact, and the resume handshake carries the schedule.
#[tokio::test]
async fn server_from_organiser_files_counts_lists_contacts_and_sends_the_schedule() {
    let text = String::from(
        "site_id;site_name;province_code;province_name;commune_id;commune_name;registered;desks;contact_name;contact_phone\r\n\
         HN001;Hội trường;01;Hà Nội;01-001;Phường Ba Đình;\"1,200\";2;Nguyễn Văn An;0912 345 678\r\n\
         HN002;Nhà văn hoá;01;Hà Nội;01-002;Xã Sóc Sơn;160;1;Trần Thị Bình;0987 654 321\r\n\
         HCM01;Hội trường;79;Hồ Chí Minh;79-001;Phường Bến Thành;90;1;Lê Văn Cường;0909 000 111\r\n;;;;;;;;;\r\n",
    );
    let f = Files::new();
    // Windows-1258 as Excel writes it, with one spelling of "Hà" precomposed (0xE0) and the
    // others as `a` + a combining grave (0xCC): the same name once normalised.
    let mut bytes = cp1258(&text);
    let at = bytes.windows(3).position(|w| w == b"Ha\xcc").expect("a decomposed Hà");
    bytes.splice(at..at + 3, *b"H\xe0");
    let registry = ok(load(&f.put("sites.csv", &bytes), &f.put("sessions.csv", SESSIONS_CSV.as_bytes())));
    assert_eq!(registry.provinces.len(), 2, "the NFD row is the same province");
    let server = start_server(registry, test_config()).await;
    let ch = server.channel().await;
    let mut hn1 = server.open(&ch, "HN001", 2).await;
    let schedule = &hn1.resume.schedule;
    assert_eq!(schedule.len(), 2);
    assert_eq!(
        (schedule[0].id, schedule[0].name.as_str(), schedule[0].starts_unix_ms, schedule[0].time_zone.as_str()),
        (1, "Ngày 1 — Sáng", DAY1_0800, "Asia/Ho_Chi_Minh")
    );
    assert_eq!(schedule[1].ends_unix_ms, DAY1_0800 + 540 * MINUTE);
    hn1.send_batch(vec![report(1, 1, 200)]).await;
    let mut hn2 = server.open(&ch, "HN002", 1).await;
    hn2.send_batch(vec![report(1, 1, 160)]).await;
    let reader = server.reader().await;
    let hanoi = eventually("Hà Nội counts both sites", DEADLINE, || async {
        let t = reader.totals(province("01"), Some(1)).await;
        if t.count == 360 { Ok(t) } else { Err(format!("{t:?}")) }
    })
    .await;
    assert_eq!((hanoi.name.as_str(), hanoi.registered), ("Hà Nội", 1360));
    let silent = eventually("HCM01 silent, the Hà Nội sites not", DEADLINE, || async {
        let s = reader.silent_sites(None, 0).await;
        let ids: Vec<&str> = s.sites.iter().map(|x| x.site_id.as_str()).collect();
        if ids == ["HCM01"] { Ok(s) } else { Err(format!("{ids:?}")) }
    })
    .await;
    assert_eq!(
        (silent.sites[0].name.as_str(), silent.sites[0].contact_name.as_str(), silent.sites[0].contact_phone.as_str()),
        ("Hội trường", "Lê Văn Cường", "0909 000 111")
    );
}

/// The aggregator binary refuses to start without registry files, says how to fix it, and
/// serves the reference registry only when asked.
#[tokio::test]
async fn server_binary_requires_the_registry_or_an_explicit_reference() {
    let f = Files::new();
    let run = |args: Vec<std::ffi::OsString>| async move {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount-server"))
            .args(["--listen", "127.0.0.1:0", "--in-memory"])
            .args(args)
            .env("HEADCOUNT_AUTH_SECRET", std::str::from_utf8(SECRET).unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env_remove("HEADCOUNT_SITES")
            .env_remove("HEADCOUNT_SESSIONS")
            .env_remove("HEADCOUNT_REFERENCE_REGISTRY")
            .kill_on_drop(true)
            .output();
        let out = within("headcount-server exits", out).await.expect("run headcount-server");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (success, stderr) = run(vec![]).await;
    assert!(!success, "started without a registry");
    assert!(stderr.contains("--sites") && stderr.contains("--reference-registry"), "{stderr}");
    let bad = f.put("bad.csv", format!("{HEADER}\r\n\r\nĐN004,A,04,Đà Nẵng,04-001,X,100,1\r\n").as_bytes());
    let sessions = f.put("sessions.csv", SESSIONS_CSV.as_bytes());
    let (success, stderr) = run(vec!["--sites".into(), bad.into(), "--sessions".into(), sessions.into()]).await;
    assert!(!success);
    assert!(stderr.contains("bad.csv:3:") && stderr.contains("\"DN004\""), "{stderr}");
    let good = f.put("good.csv", format!("{HEADER}\nHN001,A,01,Hà Nội,01-001,X,100,1\n").as_bytes());
    let (success, stderr) = run(vec![
        "--sites".into(),
        good.into(),
        "--sessions".into(),
        f.dir.path().join("sessions.csv").into(),
        "--time-zone".into(),
        "Mars/Olympus".into(),
    ])
    .await;
    assert!(!success);
    assert!(stderr.contains("--time-zone \"Mars/Olympus\""), "{stderr}");
    reference_registry_serves(f.dir.path()).await;
}

/// `--reference-registry` starts and serves the generated registry.
async fn reference_registry_serves(dir: &Path) {
    let addr_file = dir.join("addr");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount-server"))
        .args(["--listen", "127.0.0.1:0", "--in-memory", "--reference-registry", "--addr-file"])
        .arg(&addr_file)
        .env("HEADCOUNT_AUTH_SECRET", std::str::from_utf8(SECRET).unwrap_or_default())
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn headcount-server");
    let addr = eventually("the server writes its address", DEADLINE, || async {
        std::fs::read_to_string(&addr_file).map_err(|e| e.to_string())
    })
    .await;
    let reader = Reader::new(channel_to(&format!("http://{addr}")).await, Some(headcount_read_token()));
    let national = reader.totals(national(), None).await;
    let reference = generate(&GenerateOptions::default());
    assert_eq!(national.registered, reference.registered_total() as i64 * reference.sessions.len() as i64);
    child.start_kill().expect("stop the server");
    let _ = within("server exits", child.wait()).await;
}

fn headcount_read_token() -> String {
    headcount::server::Auth::new(SECRET).expect("secret").read_token("registry-tests")
}
