//! The dashboard CLI's one-shot commands, run as the real `headcount` binary against an
//! in-process aggregator: `totals --order --limit --csv`, `silent`, `curve`, `corrections`.

mod common;

use common::*;
use serde_json::Value;

/// Runs `headcount ARGS --server URL --token TOKEN`; returns stdout (panics on failure).
async fn headcount(ts: &TestServer, args: &[&str]) -> String {
    let out = within(
        "headcount command",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount"))
            .args(args)
            .args(["--server", &ts.url(), "--token", &ts.read_token()])
            .output(),
    )
    .await
    .expect("run headcount");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    assert!(out.status.success(), "headcount {args:?}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_silent_curve_and_corrections_commands_print_what_the_aggregator_holds() {
    let ts = start_small().await;
    let ch = ts.channel().await;
    let reader = ts.reader().await;
    let ids: Vec<String> = [0usize, 9, 30].iter().map(|&i| ts.registry.sites[i].id.clone()).collect();
    for (n, id) in ids.iter().enumerate() {
        let mut st = ts.open(&ch, id, 1).await;
        st.send_batch(vec![report(1, 1, 10 * (n as i64 + 1))]).await;
    }
    let mut st = ts.open(&ch, &ids[0], 1).await;
    st.send_batch(vec![correction(1, 2, 8, "Quét trùng")]).await;
    ts.server.aggregator.sweep_now();

    // totals --csv --order turnout --limit 3: the nation, then the three laggard provinces.
    let csv_out = headcount(&ts, &["totals", "--session", "1", "--order", "turnout", "--limit", "3", "--csv"]).await;
    let mut r = csv::Reader::from_reader(csv_out.as_bytes());
    let rows: Vec<csv::StringRecord> = r.records().map(|r| r.expect("CSV row")).collect();
    assert_eq!(rows.len(), 4, "{csv_out}");
    assert_eq!(&rows[0][4], reader.count(national(), Some(1)).await.to_string().as_str());
    let b = reader.breakdown(national(), Some(1)).await;
    let mut laggards = b.children.clone();
    laggards.sort_by(|a, b| a.turnout_pct.total_cmp(&b.turnout_pct));
    let want: Vec<&str> = laggards.iter().take(3).map(|c| c.scope.as_ref().map_or("", |s| s.id.as_str())).collect();
    assert_eq!(rows[1..].iter().map(|r| &r[1]).collect::<Vec<_>>(), want);

    // totals --order count --json: the busiest province first.
    let json: Value =
        serde_json::from_str(&headcount(&ts, &["totals", "--order", "count", "--limit", "1", "--json"]).await)
            .expect("JSON");
    let busiest = &ts.registry.provinces[ts.registry.sites[30].province as usize];
    assert_eq!(json["children"][0]["id"], Value::from(busiest.code.clone()));
    let table = headcount(&ts, &["totals", "--scope", &format!("province:{}", busiest.code)]).await;
    assert!(table.contains(&busiest.name), "{table}");

    let silent: Value = serde_json::from_str(&headcount(&ts, &["silent", "--json"]).await).expect("JSON");
    let grpc = reader.silent_sites(Some(national()), 0).await;
    assert_eq!(silent["total_silent"], Value::from(grpc.total_silent));
    assert_eq!(silent["sites"].as_array().map(Vec::len), Some(grpc.sites.len()));
    assert!(
        headcount(&ts, &["silent", "--limit", "2"]).await.starts_with(&format!("{} silent sites", grpc.total_silent))
    );

    let curve: Value =
        serde_json::from_str(&headcount(&ts, &["curve", "--session", "1", "--json"]).await).expect("JSON");
    let last = curve["points"].as_array().and_then(|p| p.last()).expect("a live point");
    assert_eq!(last["count"], Value::from(8 + 20 + 30));

    let corrections: Value = serde_json::from_str(&headcount(&ts, &["corrections", "--json"]).await).expect("JSON");
    assert_eq!(corrections["corrections"][0]["reason"], Value::from("Quét trùng"));
    assert_eq!(corrections["corrections"][0]["previous_count"], Value::from(10));
    let text = headcount(&ts, &["corrections"]).await;
    assert!(text.contains(&ids[0]) && text.contains("Quét trùng"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_logs_are_json_lines_or_plain_text_and_a_fatal_error_is_printed_once() {
    for (format, json) in [("json", true), ("text", false)] {
        let out = within(
            "headcount-server with a short secret",
            tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount-server"))
                .args(["--log-format", format, "--in-memory", "--listen", "127.0.0.1:0"])
                .env("HEADCOUNT_AUTH_SECRET", "short")
                .env_remove("RUST_LOG")
                .output(),
        )
        .await
        .expect("run headcount-server");
        assert!(!out.status.success(), "a 5-byte secret refuses the start");
        let stderr = String::from_utf8(out.stderr).expect("UTF-8 logs");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("at least 16 bytes")).collect();
        assert_eq!(lines.len(), 1, "the fatal error once:\n{stderr}");
        assert!(!stderr.contains('\u{1b}'), "no ANSI colours when stderr is not a terminal:\n{stderr}");
        if json {
            for line in stderr.lines() {
                let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
            }
        }
    }
}
