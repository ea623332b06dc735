//! The site agent end to end (real gRPC, in-process aggregator): people, not lines. Every row of
//! issue 9's table with its right value.

mod common;

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use headcount::client::{
    Reporter, ReporterConfig,
    reporter::state::{FileStore, MemoryStore, StateStore},
    site::{
        Agent, ExitStatus, Mode,
        run::{Out, RunOptions, SiteTotals, run},
    },
};

/// A reporter configuration for an agent install of `site` (sends `x-headcount-agent`).
fn agent_config(ts: &TestServer, site: &str, desk: u32) -> ReporterConfig {
    ReporterConfig { agent_install: true, ..reporter_config(&ts.auth, site, desk) }
}

fn agent(
    ch: &tonic::transport::Channel,
    config: ReporterConfig,
    store: Arc<dyn StateStore>,
    session: u32,
) -> Arc<Agent> {
    let reporter = Reporter::spawn(ch.clone(), config, store).expect("spawn reporter");
    Arc::new(Agent::new(reporter, Some(session)))
}

fn options(mode: Mode) -> RunOptions {
    RunOptions {
        stdin_mode: mode,
        follow: Vec::new(),
        poll: Duration::from_millis(20),
        http: None,
        start_timeout: DEADLINE,
        flush_timeout: DEADLINE,
        site_totals: None,
    }
}

/// Collects the operator's lines.
#[derive(Clone, Default)]
struct Screen(Arc<Mutex<Vec<String>>>);

impl Screen {
    fn out(&self) -> Out {
        let lines = self.0.clone();
        Arc::new(move |l| lines.lock().expect("screen lock").push(l))
    }
    fn text(&self) -> String {
        self.0.lock().expect("screen lock").join("\n")
    }
}

fn never() -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(std::future::pending())
}

/// Runs `agent` over `input` as standard input (badge or count mode) to its end.
async fn run_stdin(agent: Arc<Agent>, input: &[u8], mode: Mode) -> (ExitStatus, String) {
    let screen = Screen::default();
    let stdin = std::io::Cursor::new(input.to_vec());
    let status = within("agent run", run(agent, stdin, options(mode), screen.out(), never())).await;
    (status, screen.text())
}

async fn site_total(reader: &Reader, site_id: &str, session: u32) -> i64 {
    reader.count(site(site_id), Some(session)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_number_badge_is_a_badge_not_a_count() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    for (n, odd) in ["+849123456", "+84912345678"].into_iter().enumerate() {
        let (_, sid) = ts.site_with_desks(1, n);
        let a = agent(&ch, agent_config(&ts, &sid, 1), Arc::new(MemoryStore::new()), 1);
        let input = format!("BADGE-1\nBADGE-2\n{odd}\nBADGE-3\n");
        let (status, screen) = run_stdin(a, input.as_bytes(), Mode::Badge).await;
        assert_eq!(status, ExitStatus::Acknowledged, "{screen}");
        assert!(screen.contains(&format!("counted             {odd}")), "{screen}");
        assert!(screen.contains("all acknowledged"), "{screen}");
        assert_eq!(site_total(&reader, &sid, 1).await, 4, "{odd}: {screen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_badge_scanned_twice_counts_once_across_desks_and_restarts() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(2, 0);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.json");
    let a = agent(&ch, agent_config(&ts, &sid, 1), Arc::new(FileStore::new(&path)), 1);
    // Two desks of the same agent (two inputs) scan the same person; and a re-scan.
    let (first, second) =
        tokio::join!(a.line(b"NGUYEN-7", Mode::Badge, "desk 1"), a.line(b"NGUYEN-7", Mode::Badge, "desk 2"));
    let counted = [&first, &second].iter().filter(|x| x.outcome == headcount::client::site::Outcome::Counted).count();
    assert_eq!(counted, 1, "{first:?} {second:?}");
    let again = a.line(b" NGUYEN-7\r", Mode::Badge, "desk 1").await;
    assert_eq!(again.outcome, headcount::client::site::Outcome::AlreadyCheckedIn);
    // Another session: the same person counts again there.
    flush(a.reporter(), "first run").await;
    assert_eq!(site_total(&reader, &sid, 1).await, 1);
    drop(a);
    // Restarted from its state file: still "already checked in".
    let a = agent(&ch, agent_config(&ts, &sid, 1), Arc::new(FileStore::new(&path)), 1);
    let (status, screen) = run_stdin(a, b"NGUYEN-7\nTRAN-8\n", Mode::Badge).await;
    assert_eq!(status, ExitStatus::Acknowledged, "{screen}");
    assert!(screen.contains("already checked in  NGUYEN-7"), "{screen}");
    assert_eq!(site_total(&reader, &sid, 1).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_one_site_and_desk_are_both_counted_and_told() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 3);
    let old = agent(&ch, agent_config(&ts, &sid, 1), Arc::new(MemoryStore::new()), 1);
    let new = agent(&ch, agent_config(&ts, &sid, 1), Arc::new(MemoryStore::new()), 1);
    let a: String = (0..30).map(|i| format!("OLD-{i}\n")).collect();
    let b: String = (0..20).map(|i| format!("NEW-{i}\n")).collect();
    let ((s1, t1), (s2, t2)) = tokio::join!(
        run_stdin(old.clone(), a.as_bytes(), Mode::Badge),
        run_stdin(new.clone(), b.as_bytes(), Mode::Badge)
    );
    assert_eq!((s1, s2), (ExitStatus::Acknowledged, ExitStatus::Acknowledged), "{t1}\n{t2}");
    assert_eq!(site_total(&reader, &sid, 1).await, 50);
    // Both operators are told: each agent has its own slot, and each sees (from its next ack,
    // or on reconnecting) that two installs report for the site.
    let (so, sn) = (old.reporter().status(), new.reporter().status());
    assert_ne!(so.agent_slot, sn.agent_slot);
    for a in [&old, &new] {
        a.line(b"ONE-MORE", Mode::Badge, "desk").await;
        flush(a.reporter(), "one more badge").await;
        assert_eq!(a.reporter().status().site_agents, 2);
    }
    for r in [old.reporter(), new.reporter()] {
        r.reconnect().await.expect("reconnect");
        let mut rx = r.watch_status();
        within("resume shows two agents", rx.wait_for(|s| s.connected && s.site_agents == 2 && s.desk_agents == 2))
            .await
            .expect("reporter running");
    }
    assert!(t1.contains("agent installs report for this site") || t2.contains("agent installs report for this site"));
    // At the end of a run the operator reads the site's total over both agents.
    let screen = Screen::default();
    let totals = SiteTotals { channel: ch.clone(), token: ts.site_token(&sid), site: sid.clone() };
    let opts = RunOptions { site_totals: Some(totals), ..options(Mode::Badge) };
    let stdin = std::io::Cursor::new(Vec::new());
    let status = within("summary run", run(old.clone(), stdin, opts, screen.out(), never())).await;
    assert_eq!(status, ExitStatus::Acknowledged, "{}", screen.text());
    assert!(screen.text().contains("52 checked in at the aggregator (all agents of the site)"), "{}", screen.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_correction_reason_is_refused_at_the_line_and_later_lines_count() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 4);
    let a = agent(&ch, agent_config(&ts, &sid, 1), Arc::new(MemoryStore::new()), 1);
    let reason = format!("=3 {}", "đếm lại sau khi quét trùng ".repeat(11));
    assert!(reason.len() > 300);
    let input = format!("+2\n{reason}\n+1000000\n+1\n");
    let (status, screen) = run_stdin(a.clone(), input.as_bytes(), Mode::Count).await;
    assert_eq!(status, ExitStatus::Refused, "{screen}");
    assert!(screen.contains("correction reason is") && screen.contains("above the ceiling"), "{screen}");
    assert!(screen.contains("REFUSED: 2 lines"), "{screen}");
    assert_eq!(a.reporter().status().local[&1].1, 3);
    assert_eq!(site_total(&reader, &sid, 1).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_the_aggregator_refuses_is_undone_and_never_blocks_later_ones() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 5);
    // An agent that believes reasons may be longer than the aggregator accepts (an older
    // aggregator, a changed limit): the aggregator refuses the report.
    let config = ReporterConfig { max_reason: 4096, ..agent_config(&ts, &sid, 1) };
    let r = Reporter::spawn(ch.clone(), config, Arc::new(MemoryStore::new())).expect("spawn");
    for b in ["A", "B", "C", "D", "E", "F", "G"] {
        r.badge(1, b).await.expect("badge");
    }
    flush(&r, "seven badges").await;
    r.correct(1, 3, "x".repeat(339)).await.expect("recorded locally");
    flush(&r, "refused correction settles").await;
    let st = r.status();
    assert_eq!(st.refused, 1, "{st:?}");
    assert_eq!(st.local[&1].1, 7, "the refused change is undone: {st:?}");
    for b in ["H", "I"] {
        r.badge(1, b).await.expect("badge");
    }
    flush(&r, "later badges").await;
    assert_eq!(r.status().local[&1].1, 9);
    assert_eq!(site_total(&reader, &sid, 1).await, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notepad_file_with_bom_and_crlf_means_what_its_lines_say() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 6);
    let (_, other) = ts.site_with_desks(1, 7);
    // Count mode: "+120" is 120 people.
    let a = agent(&ch, agent_config(&ts, &sid, 1), Arc::new(MemoryStore::new()), 1);
    let (status, screen) = run_stdin(a, b"\xEF\xBB\xBF+120\r\n+3\r\n", Mode::Count).await;
    assert_eq!(status, ExitStatus::Acknowledged, "{screen}");
    assert_eq!(site_total(&reader, &sid, 1).await, 123);
    // A followed badge file: "+120" is one badge, the BOM is not part of it.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("scans.txt");
    std::fs::write(&file, b"\xEF\xBB\xBF+120\r\nBADGE-9\r\n+120\r\n").expect("write scans");
    let a = agent(&ch, agent_config(&ts, &other, 1), Arc::new(MemoryStore::new()), 1);
    let screen = Screen::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = RunOptions { follow: vec![file.clone()], ..options(Mode::Badge) };
    let stop = Box::pin(async move {
        let _ = stop_rx.await;
    });
    let run = tokio::spawn(run(a.clone(), tokio::io::empty(), opts, screen.out(), stop));
    eventually("both badges of the file", DEADLINE, || async {
        let n = a.reporter().status().local.get(&1).map_or(0, |(_, c)| *c);
        if n == 2 { Ok(()) } else { Err(format!("count {n}; {}", screen.text())) }
    })
    .await;
    // Rotation: the scanner software starts a new file at the same path.
    let rotated = dir.path().join("scans.old");
    std::fs::rename(&file, &rotated).expect("rotate");
    std::fs::write(&file, b"BADGE-10\nBADGE-9\n").expect("write new file");
    eventually("the new file is followed", DEADLINE, || async {
        let n = a.reporter().status().local.get(&1).map_or(0, |(_, c)| *c);
        if n == 3 && screen.text().contains("already checked in  BADGE-9") { Ok(()) } else { Err(format!("count {n}")) }
    })
    .await;
    stop_tx.send(()).expect("agent running");
    let status = within("agent stops", run).await.expect("run task");
    assert_eq!(status, ExitStatus::Acknowledged, "{}", screen.text());
    assert_eq!(site_total(&reader, &other, 1).await, 3);
    assert!(screen.text().contains("counted             +120"), "{}", screen.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_session_stops_with_a_clear_message() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let (_, sid) = ts.site_with_desks(1, 8);
    let last = *SESSIONS.last().expect("sessions");
    let a = agent(&ch, agent_config(&ts, &sid, 1), Arc::new(MemoryStore::new()), last + 1);
    let (status, screen) = run_stdin(a.clone(), b"BADGE-1\n", Mode::Badge).await;
    assert_eq!(status, ExitStatus::Permanent, "{screen}");
    assert!(screen.contains("not in the event's schedule") && screen.contains("--session"), "{screen}");
    assert!(a.reporter().status().local.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_desk_or_token_stops_at_once_and_names_the_flag() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let (_, sid) = ts.site_with_desks(1, 9);
    let (_, other) = ts.site_with_desks(1, 10);
    let cases = [
        (ReporterConfig { desk: 99, ..agent_config(&ts, &sid, 99) }, "--desk"),
        (ReporterConfig { token: ts.site_token(&other), ..agent_config(&ts, &sid, 1) }, "--token"),
        (ReporterConfig { token: "not-a-token".into(), ..agent_config(&ts, &sid, 1) }, "--token"),
    ];
    for (config, flag) in cases {
        let a = agent(&ch, config, Arc::new(MemoryStore::new()), 1);
        // A scanner that never closes its output: the agent must still stop.
        let (_keep_open, stdin) = tokio::io::duplex(64);
        let screen = Screen::default();
        let status = within("agent stops by itself", run(a, stdin, options(Mode::Badge), screen.out(), never())).await;
        assert_eq!(status, ExitStatus::Permanent, "{}", screen.text());
        assert!(screen.text().contains(flag), "{flag}: {}", screen.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_in_a_missing_directory_is_created_before_the_first_badge() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 11);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("st").join("agent.json");
    let store = FileStore::new(&path);
    store.prepare().expect("directory created");
    let a = agent(&ch, agent_config(&ts, &sid, 1), Arc::new(store), 1);
    let (status, screen) = run_stdin(a, b"BADGE-1\n", Mode::Badge).await;
    assert_eq!(status, ExitStatus::Acknowledged, "{screen}");
    let saved = FileStore::new(&path).load().expect("read").expect("saved");
    assert_eq!(saved.sessions[&1].count, 1);
    assert!(!saved.install_id.is_empty());
    assert_eq!(site_total(&reader, &sid, 1).await, 1);
    // A path that cannot be a directory is refused at start.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").expect("write");
    assert!(FileStore::new(blocker.join("agent.json")).prepare().is_err());
}

/// Runs the real `headcount site` binary with `input` on its standard input.
async fn headcount_site(ts: &TestServer, site_id: &str, args: &[&str], input: &[u8]) -> (Option<i32>, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount"))
        .arg("site")
        .args(["--server", &ts.url(), "--site", site_id, "--token", &ts.site_token(site_id)])
        .args(["--flush-timeout", "20s", "--start-timeout", "20s"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start headcount site");
    let mut stdin = child.stdin.take().expect("stdin piped");
    stdin.write_all(input).await.expect("write stdin");
    drop(stdin);
    let out = within("headcount site exits", child.wait_with_output()).await.expect("wait");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_headcount_site_binary_answers_each_badge_and_exits_with_its_documented_codes() {
    let ts = start_small().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 20);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("missing-dir").join("agent.json");
    let state = state.to_str().expect("utf-8 path");
    let (code, text) =
        headcount_site(&ts, &sid, &["--session", "1", "--state-file", state], b"BADGE-1\n+849123456\nBADGE-1\n").await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("counted             +849123456") && text.contains("already checked in  BADGE-1"), "{text}");
    assert!(text.contains("all acknowledged"), "{text}");
    assert_eq!(site_total(&reader, &sid, 1).await, 2);
    let (code, text) = headcount_site(&ts, &sid, &["--session", "99", "--state-file", state], b"BADGE-2\n").await;
    assert_eq!(code, Some(4), "{text}");
    assert!(text.contains("--session"), "{text}");
    let (code, text) =
        headcount_site(&ts, &sid, &["--mode", "count", "--session", "1", "--state-file", state], b"+1000000\n+1\n")
            .await;
    assert_eq!(code, Some(5), "{text}");
    assert_eq!(site_total(&reader, &sid, 1).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_of_one_burst_are_answered_in_input_order() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let (_, sid) = ts.site_with_desks(1, 14);
    let a = agent(&ch, agent_config(&ts, &sid, 1), Arc::new(MemoryStore::new()), 1);
    // One burst (a cursor: all lines are in the buffer at once): A, A, B, then 300 more pairs,
    // so that lines racing each other would show at least once.
    let mut input = String::from("A\nA\nB\n");
    for i in 0..300 {
        input.push_str(&format!("P-{i}\nP-{i}\n"));
    }
    let (status, screen) = run_stdin(a, input.as_bytes(), Mode::Badge).await;
    assert_eq!(status, ExitStatus::Acknowledged, "{screen}");
    let answers: Vec<&str> = screen
        .lines()
        .filter(|l| l.starts_with("counted") || l.starts_with("already checked in"))
        .map(|l| if l.starts_with("counted") { "counted" } else { "already" })
        .collect();
    let badges: Vec<&str> = screen
        .lines()
        .filter(|l| l.starts_with("counted") || l.starts_with("already checked in"))
        .filter_map(|l| {
            l.trim_start_matches("counted").trim_start_matches("already checked in").split_whitespace().next()
        })
        .collect();
    assert_eq!(&answers[..3], ["counted", "already", "counted"], "{screen}");
    assert_eq!(&badges[..3], ["A", "A", "B"], "{screen}");
    for (k, pair) in answers[3..].chunks(2).enumerate() {
        assert_eq!(pair, ["counted", "already"], "pair {k}: {screen}");
    }
    assert_eq!(answers.len(), 603, "{screen}");
    assert_eq!(site_total(&reader, &sid, 1).await, 302);
}
