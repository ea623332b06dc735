//! The main job shows its dashboard: `headcount simulate` prints the page's address at start,
//! serves it, and with `--serve-after` keeps serving the final figures after the verdict until
//! SIGINT.

mod common;

use std::process::Stdio;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulation_prints_its_dashboard_and_serves_it_after_the_verdict() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount"))
        .args(["simulate", "--sites", "120", "--duration", "2s", "--reconnects", "5", "--in-memory", "--serve-after"])
        .args(["--quiet", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start headcount simulate");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let url = within("the dashboard address", async {
        loop {
            let line = stderr.next_line().await.expect("read stderr").expect("the simulation prints its dashboard");
            if let Some(url) = line.strip_prefix("Dashboard: ") {
                return url.to_owned();
            }
        }
    })
    .await;
    let (base, token) = url.split_once("/login?token=").expect("a login link with a token");
    within("the verdict", async {
        loop {
            let line = stderr.next_line().await.expect("read stderr").expect("the simulation says it serves on");
            if line.contains("stay up") {
                return;
            }
        }
    })
    .await;
    let mut stdout = String::new();
    let mut out = child.stdout.take().expect("stdout");
    // The verdict (JSON) is complete on stdout before the simulation serves on.
    let report: serde_json::Value = within("the JSON verdict", async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(v) = serde_json::from_str(&stdout) {
                return v;
            }
            let n = out.read(&mut buf).await.expect("read stdout");
            assert!(n > 0, "stdout ended before the verdict: {stdout}");
            stdout.push_str(std::str::from_utf8(&buf[..n]).expect("UTF-8"));
        }
    })
    .await;
    assert_eq!(report["mismatch_count"], 0, "{report}");

    // After the verdict the page still serves the final national figure.
    let client = reqwest::Client::new();
    let totals: serde_json::Value = within("GET /api/totals", async {
        let r = client.get(format!("{base}/api/totals")).bearer_auth(token).send().await.expect("GET /api/totals");
        serde_json::from_str(&r.text().await.expect("body")).expect("JSON totals")
    })
    .await;
    assert_eq!(totals["count"], report["check_ins"], "the dashboard shows every check-in");
    let page =
        within("GET /", client.get(format!("{base}/")).header("cookie", format!("headcount_token={token}")).send())
            .await
            .expect("GET /");
    assert_eq!(page.status(), reqwest::StatusCode::OK);

    // SIGINT ends it, with the verdict's exit status.
    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill").args(["-INT", &pid]).status().expect("run kill");
    assert!(killed.success());
    let status = within("exit after SIGINT", child.wait()).await.expect("wait");
    assert!(status.success(), "{status:?}");
}
