//! A real browser on the dashboard: headless Debian Chromium driven over WebDriver
//! (`chromedriver`, through fantoccini) opens the page of an in-test aggregator, and the page
//! must show exactly what `GetTotals` says, live; survive an aggregator restart ("reconnecting",
//! then the right numbers again); drill down province → commune → sites and back. A screenshot is
//! saved to `target/artifacts/dashboard.png`.
//!
//! Needs `chromium` and `chromium-driver` (Debian): `scripts/test.sh` installs them. Missing, the
//! test fails saying so; it never skips.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use headcount::server::{
    Aggregator, RunningServer, Transport,
    durability::DurabilityConfig,
    http::{self, HttpConfig},
};
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Browser waits: the page updates within a publish tick; generous for a loaded 2-core machine.
const PAGE_DEADLINE: Duration = Duration::from_secs(30);

/// chromedriver on an ephemeral port; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install it with `apt-get update && apt-get install -y {package}` (scripts/test.sh does)"
    );
}

async fn start_driver() -> Driver {
    require(CHROMIUM, "chromium");
    require(CHROMEDRIVER, "chromium-driver");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let child = Command::new(CHROMEDRIVER)
        .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".to_owned()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver { child, url: format!("http://127.0.0.1:{port}") };
    eventually("chromedriver listens", DEADLINE, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map(drop).map_err(|e| e.to_string())
    })
    .await;
    driver
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage",
                format!("--user-data-dir={}", profile.display()), "--window-size=1400,1100", "--lang=vi-VN",
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    within("open a Chromium session", ClientBuilder::new(connector).capabilities(caps).connect(&driver.url))
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// An aggregator journaling to `dir`, gRPC and HTTP on the given ports (0: ephemeral).
async fn start_aggregator(dir: &Path, grpc: SocketAddr, web: SocketAddr) -> (RunningServer, SocketAddr) {
    let auth = headcount::server::Auth::new(SECRET).expect("test secret");
    let (agg, _) =
        Aggregator::open(small_registry(), test_config(), DurabilityConfig::new(dir)).expect("open the data dir");
    let transport = Transport { grace: Duration::from_millis(500), ..Transport::default() };
    // The old process's sockets may take a moment to be released.
    let server = eventually("bind gRPC", DEADLINE, || {
        let (agg, auth, transport) = (agg.clone(), auth.clone(), transport.clone());
        async move { RunningServer::start(grpc, agg, auth, transport).await.map_err(|e| e.to_string()) }
    })
    .await;
    let listener =
        eventually(
            "bind HTTP",
            DEADLINE,
            || async move { std::net::TcpListener::bind(web).map_err(|e| e.to_string()) },
        )
        .await;
    let (addr, _) = http::spawn(listener, agg, auth, HttpConfig::default()).expect("HTTP thread");
    (server, addr)
}

fn digits(s: &str) -> i64 {
    s.chars().filter(char::is_ascii_digit).collect::<String>().parse().unwrap_or(-1)
}

/// What the page shows: status, national count, and (id, kind, count) per table row.
async fn page(c: &Client) -> Result<(String, i64, Vec<(String, String, i64)>), String> {
    let v = c
        .execute(
            "return { status: document.querySelector('#status').dataset.state,
                      national: document.querySelector('#national-count').textContent,
                      rows: [...document.querySelectorAll('#table tbody tr')].map(tr =>
                          [tr.dataset.id, tr.dataset.kind, tr.querySelector('td[data-col=count]').textContent]) };",
            vec![],
        )
        .await
        .map_err(|e| e.to_string())?;
    let rows = v["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    (
                        r[0].as_str().unwrap_or("").to_owned(),
                        r[1].as_str().unwrap_or("").to_owned(),
                        digits(r[2].as_str().unwrap_or("")),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((v["status"].as_str().unwrap_or("").to_owned(), digits(v["national"].as_str().unwrap_or("")), rows))
}

/// Waits until the page is live and shows exactly GetTotals' national and province counts.
async fn page_matches_get_totals(
    c: &Client,
    ts_reader: &Reader,
    registry: &headcount::server::registry::Registry,
    session: u32,
) {
    eventually("the page shows GetTotals' national and province counts", PAGE_DEADLINE, || async {
        let (status, shown, rows) = page(c).await?;
        let want = ts_reader.count(national(), Some(session)).await;
        if status != "live" || shown != want {
            return Err(format!("status {status}, national {shown}, GetTotals {want}"));
        }
        if rows.len() != registry.provinces.len() {
            return Err(format!("{} rows", rows.len()));
        }
        for (id, kind, count) in rows {
            let want = ts_reader.count(province(&id), Some(session)).await;
            if kind != "province" || count != want {
                return Err(format!("province {id} ({kind}) shows {count}, GetTotals {want}"));
            }
        }
        Ok(())
    })
    .await;
}

async fn put(url: &str, site: &str, session: u32, count: i64) {
    let auth = headcount::server::Auth::new(SECRET).expect("test secret");
    let ch = channel_to(url).await;
    let mut st = open_stream(ch, Some(&auth.site_token(site)), Some(site), Some("1")).await.expect("ingest stream");
    let (seq, _) = st.resumed(session);
    let ack = st.send_batch(vec![report(session, seq + 1, count)]).await;
    assert!(ack.rejections.is_empty(), "{ack:?}");
}

async fn click_row(c: &Client, id: &str) {
    let row = c.find(Locator::Css(&format!("#table tbody tr[data-id='{id}']"))).await.expect("the row");
    row.click().await.expect("click the row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_chromium_shows_get_totals_live_across_a_restart_and_drills_down() {
    let driver = start_driver().await;
    let profile = tempfile::tempdir().expect("a fresh Chromium profile");
    let data = tempfile::tempdir().expect("a data dir");
    let registry = small_registry();
    let auth = headcount::server::Auth::new(SECRET).expect("test secret");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    let (server, web) = start_aggregator(data.path(), any, any).await;
    let grpc = server.addr;
    let url = server.url();
    // Check-ins before the page opens: session 1 is the current one.
    for (i, n) in [(0, 12), (7, 30), (20, 5)] {
        put(&url, &registry.sites[i].id, 1, n).await;
    }
    let c = browser(&driver, profile.path()).await;
    let base = format!("http://{web}");
    within("open the page", c.goto(&format!("{base}/login?token={}", auth.read_token("browser")))).await.expect("page");
    let reader = Reader::new(channel_to(&url).await, Some(auth.read_token("test")));
    page_matches_get_totals(&c, &reader, &registry, 1).await;

    // Live: more reports arrive while the page is open.
    for (i, n) in [(3, 44), (33, 9), (59, 17)] {
        put(&url, &registry.sites[i].id, 1, n).await;
    }
    page_matches_get_totals(&c, &reader, &registry, 1).await;

    // The aggregator restarts: the page says so, then catches up on its own.
    server.stop().await.expect("stop the aggregator");
    eventually("the page shows reconnecting", PAGE_DEADLINE, || async {
        let (status, _, _) = page(&c).await?;
        if status == "reconnecting" { Ok(()) } else { Err(status) }
    })
    .await;
    let (server, _) = start_aggregator(data.path(), grpc, web).await;
    put(&url, &registry.sites[40].id, 1, 21).await;
    let reader = Reader::new(channel_to(&url).await, Some(auth.read_token("test")));
    assert!(reader.count(national(), Some(1)).await > 21, "the journal kept what was acknowledged");
    page_matches_get_totals(&c, &reader, &registry, 1).await;

    // Drill down: province → communes → sites, and back.
    let site = &registry.sites[7];
    let p = &registry.provinces[site.province as usize];
    let commune = &registry.communes[site.commune as usize];
    click_row(&c, &p.code).await;
    eventually("the province's communes", PAGE_DEADLINE, || async {
        let (_, _, rows) = page(&c).await?;
        let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let want: Vec<&str> = p.communes.iter().map(|&i| registry.communes[i as usize].id.as_str()).collect();
        if ids != want || rows.iter().any(|r| r.1 != "commune") {
            return Err(format!("rows {ids:?}, want {want:?}"));
        }
        for (id, _, count) in &rows {
            let want = reader.count(common::commune(id), Some(1)).await;
            if *count != want {
                return Err(format!("commune {id}: {count}, GetTotals {want}"));
            }
        }
        Ok(())
    })
    .await;
    click_row(&c, &commune.id).await;
    eventually("the commune's sites", PAGE_DEADLINE, || async {
        let (_, _, rows) = page(&c).await?;
        let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let want: Vec<&str> = commune.sites.iter().map(|&i| registry.sites[i as usize].id.as_str()).collect();
        if ids != want {
            return Err(format!("rows {ids:?}, want {want:?}"));
        }
        let shown = rows.iter().find(|r| r.0 == site.id).map(|r| r.2);
        if shown != Some(30) {
            return Err(format!("site {} shows {shown:?}, 30 reported", site.id));
        }
        Ok(())
    })
    .await;
    c.find(Locator::Css("#back")).await.expect("back button").click().await.expect("click back");
    eventually("back to the communes", PAGE_DEADLINE, || async {
        let (_, _, rows) = page(&c).await?;
        if rows.iter().all(|r| r.1 == "commune") && !rows.is_empty() { Ok(()) } else { Err(format!("{rows:?}")) }
    })
    .await;
    c.find(Locator::Css("#back")).await.expect("back button").click().await.expect("click back");
    page_matches_get_totals(&c, &reader, &registry, 1).await;

    // Vietnamese by default, names with diacritics as in the registry.
    let text = c.find(Locator::Css("body")).await.expect("body").text().await.expect("page text");
    assert!(text.contains("Đã điểm danh"), "Vietnamese labels");
    assert!(text.contains(&p.name), "province name {:?} shown", p.name);

    let png = c.screenshot().await.expect("a screenshot");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&dir).expect("create target/artifacts");
    std::fs::write(dir.join("dashboard.png"), png).expect("write the screenshot");

    // The English switch, and the big-number mode for a projector.
    c.find(Locator::Css("#lang")).await.expect("language switch").click().await.expect("click");
    let text = c.find(Locator::Css("body")).await.expect("body").text().await.expect("page text");
    assert!(text.contains("Checked in") && text.contains("Sites reporting"), "English labels");
    c.find(Locator::Css("#bigmode")).await.expect("big-number switch").click().await.expect("click");
    let table_shown = c.execute("return document.querySelector('#table').offsetParent !== null;", vec![]).await;
    assert_eq!(table_shown.ok(), Some(json!(false)), "big-number mode shows only the figures");
    std::fs::write(dir.join("dashboard-big.png"), c.screenshot().await.expect("a screenshot")).expect("write");
    c.close().await.expect("close the browser");
    server.stop().await.expect("clean stop");
}
