//! Failover of sites (issue 13, item 5): the site agent, `watch` and the query commands given
//! several aggregator addresses use one and move to the next when it cannot be reached. Two
//! independent in-process aggregators stand for two cluster nodes: the second starts empty, so
//! it ending with the site's exact total shows that the agent resent its state (not doubled).

mod common;

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::*;
use headcount::{
    client::{
        Reporter, ReporterConfig, ReporterError,
        aggregators::{Aggregators, ServerList},
        connect::ConnectOptions,
        reporter::state::MemoryStore,
        site::{
            Agent, ExitStatus, Mode,
            run::{Out, RunOptions, run},
        },
    },
    server::registry::generate::{GenerateOptions, generate},
};

/// Lazy channels to `urls` (comma-joined, as `--server` takes them).
fn aggregators(urls: &[String]) -> Aggregators {
    let list: ServerList = urls.join(",").parse().expect("valid --server list");
    Aggregators::connect_lazy(&list, &ConnectOptions::default()).expect("loopback URLs")
}

/// An agent install's configuration for `site` (tokens are valid on every test aggregator: they
/// share the test secret).
fn agent_config(ts: &TestServer, site: &str) -> ReporterConfig {
    ReporterConfig { agent_install: true, ..reporter_config(&ts.auth, site, 1) }
}

/// `http://127.0.0.1:PORT` where nobody listens (bound, then closed: connections are refused).
async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    format!("http://{}", l.local_addr().expect("address"))
}

/// A TCP listener that accepts every connection and closes it at once (a node whose process
/// is gone but whose port still answers), counting the attempts.
async fn closing_listener() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", l.local_addr().expect("address"));
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            drop(socket);
        }
    });
    (url, attempts, task)
}

/// A TCP listener that accepts connections and never answers on them (a hung node, or one
/// behind a path that drops everything after the handshake).
async fn silent_listener() -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", l.local_addr().expect("address"));
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = l.accept().await {
            held.push(socket);
        }
    });
    (url, task)
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

fn options() -> RunOptions {
    RunOptions {
        stdin_mode: Mode::Badge,
        follow: Vec::new(),
        poll: Duration::from_millis(20),
        http: None,
        start_timeout: DEADLINE,
        flush_timeout: DEADLINE,
        site_totals: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_fails_over_when_its_aggregator_stops_and_the_next_ends_exact() {
    let (a, b) = (start_small().await, start_small().await);
    let (_, sid) = a.site_with_desks(1, 2);
    let (a_reader, b_reader) = (a.reader().await, b.reader().await);
    let r =
        Reporter::spawn_with(aggregators(&[a.url(), b.url()]), agent_config(&a, &sid), Arc::new(MemoryStore::new()))
            .expect("spawn reporter");
    for _ in 0..10 {
        r.check_in(1, 3).await.expect("check in");
    }
    flush(&r, "counts on A").await;
    assert_eq!(r.status().aggregator, a.url(), "starts on the first address");
    assert_eq!(a_reader.count(site(&sid), Some(1)).await, 30);

    // A stops in the middle of the run; check-ins go on.
    let check_ins = {
        let r = &r;
        async move {
            for i in 0..40u32 {
                r.check_in(1 + i % 2, 1).await.expect("check in while failing over");
            }
        }
    };
    let (_, stopped) = tokio::join!(check_ins, a.server.stop());
    stopped.expect("A stops");
    flush(&r, "everything acknowledged by B").await;
    let st = r.status();
    assert_eq!(st.aggregator, b.url(), "moved to the next address: {st:?}");
    assert!(st.connected && st.fatal.is_none(), "{st:?}");
    // B started empty: it holds exactly what the agent counted, once.
    assert_eq!(b_reader.count(site(&sid), Some(1)).await, 50);
    assert_eq!(b_reader.count(site(&sid), Some(2)).await, 20);
    assert_eq!(b_reader.count(national(), None).await, 70, "nothing doubled");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_address_is_skipped_and_the_operator_sees_where_the_agent_is_connected() {
    let b = start_small().await;
    let (_, sid) = b.site_with_desks(1, 5);
    let reader = b.reader().await;
    let (closing, attempts, listener) = closing_listener().await;
    let list = aggregators(&[dead_url().await, closing, b.url()]);
    let reporter = Reporter::spawn_with(list, agent_config(&b, &sid), Arc::new(MemoryStore::new())).expect("spawn");
    let agent = Arc::new(Agent::new(reporter, Some(1)));
    let screen = Screen::default();
    let stdin = std::io::Cursor::new(b"NGUYEN-1\nTRAN-2\nLE-3\nTRAN-2\n".to_vec());
    let status = within("agent run", run(agent.clone(), stdin, options(), screen.out(), never())).await;
    assert_eq!(status, ExitStatus::Acknowledged, "{}", screen.text());
    assert_eq!(reader.count(site(&sid), Some(1)).await, 3);
    assert!(screen.text().contains(&format!("connected to {}", b.url())), "{}", screen.text());
    assert!(attempts.load(Ordering::Relaxed) >= 1, "the second address was tried");
    listener.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_answers_is_left_after_the_connect_timeout() {
    let b = start_small().await;
    let (_, sid) = b.site_with_desks(1, 9);
    let (hung, task) = silent_listener().await;
    let config = ReporterConfig { connect_timeout: Duration::from_millis(300), ..agent_config(&b, &sid) };
    let r = Reporter::spawn_with(aggregators(&[hung, b.url()]), config, Arc::new(MemoryStore::new())).expect("spawn");
    r.check_in(1, 12).await.expect("check in");
    flush(&r, "acknowledged by B after A's handshake timed out").await;
    let st = r.status();
    assert_eq!(st.aggregator, b.url());
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("DeadlineExceeded")), "{st:?}");
    assert_eq!(b.reader().await.count(site(&sid), Some(1)).await, 12);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_address_is_dead_the_agent_backs_off_and_the_flush_timeout_ends_it() {
    let ((x, x_attempts, x_task), (y, y_attempts, y_task)) = (closing_listener().await, closing_listener().await);
    let auth = headcount::server::Auth::new(SECRET).expect("secret");
    let dir = tempfile::tempdir().expect("temp dir");
    let badges = dir.path().join("badges.txt");
    std::fs::write(&badges, "NGUYEN-1\n").expect("badges");
    let out = within(
        "agent ends",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount"))
            .args(["site", "--server", &format!("{x},{y}"), "--site", "S00001", "--session", "1"])
            .args(["--token", &auth.site_token("S00001"), "--start-timeout", "1s", "--flush-timeout", "3s"])
            .arg("--state-file")
            .arg(dir.path().join("state.json"))
            .stdin(std::fs::File::open(&badges).expect("badges"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run the agent");
    let says = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(ExitStatus::NotAcknowledged as i32), "{says}");
    assert!(says.contains("NOT ACKNOWLEDGED"), "{says}");
    let (xa, ya) = (x_attempts.load(Ordering::Relaxed), y_attempts.load(Ordering::Relaxed));
    // About 4 s with 1 s initial backoff ×1.6: a handful of rounds of one attempt per address. A
    // tight loop would make thousands; the bound is generous for a loaded machine.
    assert!(xa >= 1 && ya >= 1, "both addresses tried: {xa} and {ya}\n{says}");
    assert!(xa + ya <= 40, "{xa} + {ya} attempts in about 4 s: no backoff between rounds\n{says}");
    x_task.abort();
    y_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_refusal_stops_the_agent_instead_of_failing_over() {
    // A does not know the site (NOT_FOUND), B does: the agent stops on A and tells the operator,
    // it does not move on to B (every node shares one registry; a refusal is a setting to fix).
    let a = start_server(generate(&GenerateOptions { sites: 5, ..GenerateOptions::default() }), test_config()).await;
    let b = start_small().await;
    let sid = b.registry.sites[40].id.clone();
    assert!(a.registry.sites.iter().all(|s| s.id != sid));
    let list = aggregators(&[a.url(), b.url()]);
    let reporter = Reporter::spawn_with(list, agent_config(&b, &sid), Arc::new(MemoryStore::new())).expect("spawn");
    let agent = Arc::new(Agent::new(reporter, Some(1)));
    let screen = Screen::default();
    let stdin = std::io::Cursor::new(b"NGUYEN-1\n".to_vec());
    let status = within("agent run", run(agent.clone(), stdin, options(), screen.out(), never())).await;
    assert_eq!(status, ExitStatus::Permanent, "{}", screen.text());
    assert!(screen.text().contains("STOPPED") && screen.text().contains("does not know site"), "{}", screen.text());
    let flushed = agent.reporter().flush(Duration::from_millis(10)).await;
    assert!(matches!(flushed, Err(ReporterError::Fatal(_))), "{flushed:?}");
    assert_eq!(agent.reporter().status().connects, 0);
    assert_eq!(b.reader().await.count(site(&sid), None).await, 0, "nothing went to B");
}

/// Runs the `headcount` binary with `args`; returns (success, stdout, stderr).
async fn headcount(args: &[&str]) -> (bool, String, String) {
    let out = within(
        "headcount command",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount")).args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("run headcount");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_totals_given_a_dead_address_first_answer_from_the_live_one() {
    let live = start_small().await;
    let (_, sid) = live.site_with_desks(1, 7);
    let mut raw = live.open(&live.channel().await, &sid, 1).await;
    assert!(raw.send_batch(vec![report(1, 1, 1234)]).await.rejections.is_empty());
    let servers = format!("{},{}", dead_url().await, live.url());
    let token = live.read_token();
    let scope = format!("site:{sid}");
    let common = ["--server", &servers, "--token", &token, "--scope", &scope, "--session", "1"];

    let (ok, out, err) = headcount(&[&["watch", "--count", "1", "--json"], &common[..]].concat()).await;
    assert!(ok, "watch: {out}\n{err}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).expect("a JSON line");
    assert_eq!(line["totals"]["count"], serde_json::Value::from(1234), "{out}");
    assert!(err.contains(&live.url()), "the note names the address it moved to: {err}");

    let (ok, out, err) = headcount(&[&["totals", "--json"], &common[..]].concat()).await;
    assert!(ok, "totals: {out}\n{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["totals"]["count"], serde_json::Value::from(1234), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_server_list_is_refused_naming_the_flag() {
    let (ok, out, err) =
        headcount(&["totals", "--server", "http://127.0.0.1:1,,http://127.0.0.1:2", "--token", "t"]).await;
    assert!(!ok, "{out}");
    assert!(err.contains("--server") && err.contains("entry 2 of 3"), "{err}");
    let (ok, _, err) =
        headcount(&["site", "--server", "http://127.0.0.1:1,http://10.1.2.3:50051", "--site", "S1", "--token", "t"])
            .await;
    assert!(!ok);
    assert!(err.contains("--server") && err.contains("refusing plain text to http://10.1.2.3:50051"), "{err}");
}
