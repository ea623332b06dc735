//! The aggregator's HTTP side over real HTTP on 127.0.0.1: the JSON API mirrors the Totals calls,
//! access (token cookie, bearer, lobby mode), CSV exports, Server-Sent Events, `/metrics`.

mod common;

use std::collections::HashMap;

use common::*;
use headcount::proto::v1::{BreakdownOrder, ScopeTotals};
use reqwest::{StatusCode, header};
use serde_json::Value;

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("HTTP client")
}

/// GET with a bearer token (None: anonymous); returns status and body.
async fn get(url: &str, token: Option<&str>) -> (StatusCode, String) {
    let mut req = client().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = within(url, req.send()).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status();
    (status, within(url, r.text()).await.unwrap_or_else(|e| panic!("body of {url}: {e}")))
}

async fn get_json(url: &str, token: &str) -> Value {
    let (status, body) = get(url, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
}

/// The JSON fields of a scope's totals must equal what GetTotals says.
fn assert_same(what: &str, json: &Value, grpc: &ScopeTotals) {
    let id = grpc.scope.as_ref().map(|s| s.id.clone()).unwrap_or_default();
    assert_eq!(json["id"], Value::from(id), "{what}: id");
    assert_eq!(json["name"], Value::from(grpc.name.clone()), "{what}: name");
    assert_eq!(json["count"], Value::from(grpc.count), "{what}: count");
    assert_eq!(json["registered"], Value::from(grpc.registered), "{what}: registered");
    assert_eq!(json["sites_reporting"], Value::from(grpc.sites_reporting), "{what}: sites_reporting");
    assert_eq!(json["sites_total"], Value::from(grpc.sites_total), "{what}: sites_total");
    assert_eq!(json["session"], grpc.session.map_or(Value::Null, Value::from), "{what}: session");
    assert_eq!(json["last_change_unix_ms"], Value::from(grpc.last_change_unix_ms), "{what}: last change");
}

/// Puts `count` check-ins on desk 1 of the `n`-th site for `session` (fresh register, seq 1).
async fn put(ts: &TestServer, n: usize, session: u32, count: i64) -> String {
    let ch = ts.channel().await;
    let id = ts.registry.sites[n].id.clone();
    let mut st = ts.open(&ch, &id, 1).await;
    let (seq, _) = st.resumed(session);
    let ack = st.send_batch(vec![report(session, seq + 1, count)]).await;
    assert!(ack.rejections.is_empty(), "{ack:?}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_api_mirrors_the_totals_calls() {
    let ts = start_small().await;
    let base = start_http(&ts, false);
    let token = ts.read_token();
    let reader = ts.reader().await;
    put(&ts, 0, 1, 17).await;
    put(&ts, 1, 1, 5).await;
    put(&ts, 2, 2, 9).await;
    let site = &ts.registry.sites[0];
    let p = ts.registry.provinces[site.province as usize].code.clone();
    let c = ts.registry.communes[site.commune as usize].id.clone();

    for (scope_q, scope) in [
        ("national".to_owned(), national()),
        (format!("province:{p}"), province(&p)),
        (format!("commune:{c}"), commune(&c)),
        (format!("site:{}", site.id), common::site(&site.id)),
    ] {
        for (session_q, session) in [("all", None), ("1", Some(1)), ("2", Some(2))] {
            let json = get_json(&format!("{base}/api/totals?scope={scope_q}&session={session_q}"), &token).await;
            assert_same(&format!("{scope_q} {session_q}"), &json, &reader.totals(scope.clone(), session).await);
        }
    }
    // Breakdown: same children in the same order, with order and limit.
    for (order_q, order) in [
        ("id", BreakdownOrder::Id),
        ("count_desc", BreakdownOrder::CountDesc),
        ("turnout_asc", BreakdownOrder::TurnoutAsc),
    ] {
        let json = get_json(&format!("{base}/api/breakdown?scope=national&session=1&order={order_q}"), &token).await;
        let mut c = reader.client.clone();
        let grpc = c
            .breakdown(reader.req(headcount::proto::v1::BreakdownRequest {
                scope: Some(national()),
                session: Some(1),
                order: order as i32,
                limit: 0,
            }))
            .await
            .expect("Breakdown")
            .into_inner();
        let kids = json["children"].as_array().expect("children array");
        assert_eq!(kids.len(), grpc.children.len(), "{order_q}: children");
        for (j, g) in kids.iter().zip(&grpc.children) {
            assert_same(&format!("breakdown {order_q}"), j, g);
        }
        assert_same("breakdown parent", &json["totals"], grpc.parent.as_ref().expect("parent"));
    }
    let limited = get_json(&format!("{base}/api/breakdown?scope=province:{p}&order=count_desc&limit=1"), &token).await;
    assert_eq!(limited["children"].as_array().map(Vec::len), Some(1));
    assert_eq!(limited["children"][0]["id"], Value::from(c.clone()), "the busiest commune first");

    // Errors carry the gRPC code's HTTP equivalent and a message.
    for (q, want) in [
        ("/api/totals?scope=planet:earth", StatusCode::BAD_REQUEST),
        ("/api/totals?scope=province:99", StatusCode::NOT_FOUND),
        ("/api/totals?session=9", StatusCode::NOT_FOUND),
        ("/api/totals?session=first", StatusCode::BAD_REQUEST),
        ("/api/breakdown?order=random", StatusCode::BAD_REQUEST),
        ("/api/curve?scope=commune:x", StatusCode::NOT_FOUND),
        (&format!("/api/curve?scope=commune:{c}"), StatusCode::BAD_REQUEST),
    ] {
        let (status, body) = get(&format!("{base}{q}"), Some(&token)).await;
        assert_eq!(status, want, "{q}: {body}");
        let err: Value = serde_json::from_str(&body).expect("error body is JSON");
        assert!(err["error"].as_str().is_some_and(|m| !m.is_empty()), "{q}: {body}");
    }

    // Silent sites, curve, corrections, stats, meta.
    ts.server.aggregator.sweep_now();
    let silent = get_json(&format!("{base}/api/silent?scope=national"), &token).await;
    let grpc = reader.silent_sites(Some(national()), 0).await;
    assert_eq!(silent["total_silent"], Value::from(grpc.total_silent));
    let ids: Vec<&str> =
        silent["sites"].as_array().expect("sites").iter().filter_map(|s| s["site_id"].as_str()).collect();
    assert_eq!(ids, grpc.sites.iter().map(|s| s.site_id.as_str()).collect::<Vec<_>>());
    assert!(!ids.contains(&site.id.as_str()), "a site that reported is not silent");
    for s in silent["sites"].as_array().expect("sites") {
        let i = ts.registry.site(s["site_id"].as_str().expect("id")).expect("a registry site") as usize;
        let r = &ts.registry.sites[i];
        let want = format!("{}, {}", r.contact_name, r.contact_phone);
        assert_eq!(s["contact"], Value::from(want), "the registry's contact of a silent site");
    }

    let curve = get_json(&format!("{base}/api/curve?scope=national&session=1"), &token).await;
    let last = curve["points"].as_array().and_then(|p| p.last().cloned()).expect("a live point");
    assert_eq!(last["count"], Value::from(22), "the live point of session 1");

    let ch = ts.channel().await;
    let mut st = ts.open(&ch, &site.id, 1).await;
    let ack = st.send_batch(vec![correction(1, 2, 15, "Quét trùng hai thẻ")]).await;
    assert!(ack.rejections.is_empty(), "{ack:?}");
    let corrections = get_json(&format!("{base}/api/corrections?limit=10"), &token).await;
    assert_eq!(corrections["corrections"][0]["reason"], Value::from("Quét trùng hai thẻ"));
    assert_eq!(corrections["corrections"][0]["previous_count"], Value::from(17));
    let stats = get_json(&format!("{base}/api/stats"), &token).await;
    assert_eq!(stats["reports_applied"], Value::from(4));
    let meta = get_json(&format!("{base}/api/meta"), &token).await;
    assert_eq!(meta["sessions"].as_array().map(Vec::len), Some(SESSIONS.len()));
    assert_eq!(meta["current_session"], Value::from(2), "the latest session with check-ins");
    assert_eq!(meta["time_zone"], Value::from("Asia/Ho_Chi_Minh"));
    assert_eq!(meta["access"], Value::from("token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_takes_a_cookie_or_a_bearer_token_and_lobby_mode_opens_only_national_and_provinces() {
    let ts = start_small().await;
    let base = start_http(&ts, false);
    let token = ts.read_token();
    let p = ts.registry.provinces[0].code.clone();

    let (status, _) = get(&format!("{base}/api/totals"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");
    let (status, _) = get(&format!("{base}/api/totals"), Some("hc1.read.x.00")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "forged token");
    let r = within("GET /", client().get(format!("{base}/")).send()).await.expect("GET /");
    assert!(r.status().is_redirection(), "the page sends anonymous visitors to the login form");
    assert_eq!(r.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()), Some("/login"));
    let (status, body) = get(&format!("{base}/login"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("<form") && body.contains("Đăng nhập"), "{body}");

    // The login form: a bad token is refused, a good one sets an HttpOnly, SameSite=Strict cookie.
    let bad = within(
        "POST /login",
        client()
            .post(format!("{base}/login"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("token=nope")
            .send(),
    )
    .await
    .expect("POST");
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    assert!(bad.headers().get(header::SET_COOKIE).is_none());
    let ok = within(
        "POST /login",
        client()
            .post(format!("{base}/login"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(format!("token={token}"))
            .send(),
    )
    .await
    .expect("POST");
    assert!(ok.status().is_redirection(), "{:?}", ok.status());
    let cookie = ok.headers().get(header::SET_COOKIE).and_then(|v| v.to_str().ok()).expect("a cookie").to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let pair = cookie.split(';').next().expect("name=value").to_owned();
    let r = within("GET / with cookie", client().get(format!("{base}/")).header(header::COOKIE, &pair).send())
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    let page = within("page", r.text()).await.expect("page body");
    assert!(page.contains("/assets/app.js") && page.contains("Điểm danh toàn quốc"));
    let r = within("API with cookie", client().get(format!("{base}/api/totals")).header(header::COOKIE, &pair).send())
        .await
        .expect("GET");
    assert_eq!(r.status(), StatusCode::OK);
    let out = within("POST /logout", client().post(format!("{base}/logout")).header(header::COOKIE, &pair).send())
        .await
        .expect("POST /logout");
    assert!(out.status().is_redirection());
    let cleared = out.headers().get(header::SET_COOKIE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(cleared.starts_with("headcount_token=;") && cleared.contains("Max-Age=0"), "{cleared}");
    for asset in ["app.js", "app.css"] {
        let (status, body) = get(&format!("{base}/assets/{asset}"), None).await;
        assert_eq!(status, StatusCode::OK, "{asset}");
        assert!(!body.contains("http://") && !body.contains("https://"), "{asset} loads nothing from elsewhere");
    }

    // Lobby mode: national and provinces without a token, nothing finer.
    let lobby = start_http(&ts, true);
    for q in [
        "/api/totals",
        &format!("/api/totals?scope=province:{p}"),
        "/api/breakdown?session=1",
        "/api/curve",
        "/api/meta",
        "/",
    ] {
        let (status, body) = get(&format!("{lobby}{q}"), None).await;
        assert_eq!(status, StatusCode::OK, "public {q}: {body}");
    }
    let c = ts.registry.communes[0].id.clone();
    let s = ts.registry.sites[0].id.clone();
    for q in [
        format!("/api/totals?scope=commune:{c}"),
        format!("/api/totals?scope=site:{s}"),
        format!("/api/breakdown?scope=province:{p}"),
        "/api/silent".to_owned(),
        "/api/corrections".to_owned(),
        "/api/stats".to_owned(),
        "/export/totals.csv".to_owned(),
        "/export/sites.csv".to_owned(),
        "/metrics".to_owned(),
    ] {
        let (status, body) = get(&format!("{lobby}{q}"), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "public {q}: {body}");
        let (status, body) = get(&format!("{lobby}{q}"), Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "with a token {q}: {body}");
    }
    let meta = get_json(&format!("{lobby}/api/meta"), "not-a-token").await;
    assert_eq!(meta["access"], Value::from("public"));
}

/// Parses a CSV export: checks the BOM, returns rows as header → value maps.
fn parse_csv(body: &[u8]) -> Vec<HashMap<String, String>> {
    let rest = body.strip_prefix(b"\xEF\xBB\xBF").expect("export starts with a UTF-8 BOM");
    let mut r = csv::Reader::from_reader(rest);
    let headers = r.headers().expect("a header row").clone();
    r.records()
        .map(|rec| {
            let rec = rec.expect("a CSV record");
            headers.iter().zip(rec.iter()).map(|(h, v)| (h.to_owned(), v.to_owned())).collect()
        })
        .collect()
}

async fn get_csv(url: &str, token: &str) -> Vec<HashMap<String, String>> {
    let r = within(url, client().get(url).bearer_auth(token).send()).await.expect("GET export");
    assert_eq!(r.status(), StatusCode::OK, "{url}");
    assert!(
        r.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/csv")),
        "{url}: content type"
    );
    assert!(r.headers().get(header::CONTENT_DISPOSITION).is_some(), "{url}: a download");
    parse_csv(&within(url, r.bytes()).await.expect("export body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_exports_carry_a_bom_and_the_same_figures() {
    let ts = start_small().await;
    let base = start_http(&ts, false);
    let token = ts.read_token();
    let reader = ts.reader().await;
    let id = put(&ts, 3, 1, 40).await;
    put(&ts, 4, 2, 11).await;
    let ch = ts.channel().await;
    let mut st = ts.open(&ch, &id, 1).await;
    st.send_batch(vec![correction(1, 2, 38, "Quét trùng")]).await;
    ts.server.aggregator.sweep_now();

    let rows = get_csv(&format!("{base}/export/totals.csv?scope=national&session=1"), &token).await;
    assert_eq!(rows.len(), 1 + ts.registry.provinces.len(), "the nation, then each province");
    assert_eq!(rows[0]["kind"], "national");
    assert_eq!(rows[0]["count"], reader.count(national(), Some(1)).await.to_string());
    for row in &rows[1..] {
        let t = reader.totals(province(&row["id"]), Some(1)).await;
        assert_eq!((row["name"].as_str(), row["count"].clone()), (t.name.as_str(), t.count.to_string()), "{row:?}");
    }
    let p = &ts.registry.provinces[ts.registry.sites[3].province as usize];
    let rows = get_csv(&format!("{base}/export/totals.csv?scope=province:{}", p.code), &token).await;
    assert_eq!(rows[0]["name"], p.name, "Vietnamese names survive the export");
    assert_eq!(rows.len(), 1 + p.communes.len());

    let sites = get_csv(&format!("{base}/export/sites.csv?session=1"), &token).await;
    assert_eq!(sites.len(), ts.registry.sites.len());
    let row = sites.iter().find(|r| r["site_id"] == id).expect("the site");
    assert_eq!((row["count"].as_str(), row["state"].as_str()), ("38", "reporting"));
    let silent_rows = sites.iter().filter(|r| r["state"] == "silent").count();

    let silent = get_csv(&format!("{base}/export/silent.csv"), &token).await;
    assert_eq!(silent.len() as u32, reader.silent_sites(Some(national()), 0).await.total_silent);
    assert_eq!(silent.len(), silent_rows, "sites.csv and silent.csv agree");
    assert!(silent.iter().all(|r| r["site_id"] != id));
    assert!(silent.iter().all(|r| r["contact"].contains(", 09")), "contacts (name, phone) in the export");

    let corrections = get_csv(&format!("{base}/export/corrections.csv"), &token).await;
    assert_eq!(corrections.len(), 1);
    assert_eq!(
        (
            corrections[0]["site_id"].as_str(),
            corrections[0]["previous_count"].as_str(),
            corrections[0]["count"].as_str(),
            corrections[0]["reason"].as_str()
        ),
        (id.as_str(), "40", "38", "Quét trùng")
    );
    assert!(corrections[0]["applied_utc"].ends_with('Z'));
}

/// Reads SSE frames from a streaming response until `done` accepts one; returns it.
async fn next_frame(resp: &mut reqwest::Response, buf: &mut String, mut done: impl FnMut(&Value) -> bool) -> Value {
    within("an SSE frame", async {
        loop {
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                    let v: Value = serde_json::from_str(data).expect("frame data is JSON");
                    if done(&v) {
                        return v;
                    }
                }
            }
            let chunk = resp.chunk().await.expect("SSE body").expect("the SSE stream is still open");
            buf.push_str(std::str::from_utf8(&chunk).expect("UTF-8 frames"));
        }
    })
    .await
}

async fn open_sse(url: &str, token: &str) -> reqwest::Response {
    let r = within("open SSE", client().get(url).bearer_auth(token).send()).await.expect("GET /api/live");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    r
}

fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a valid Prometheus exposition");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a counter or gauge"),
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_feed_sends_a_snapshot_then_updates_serialised_once_for_every_viewer() {
    let ts = start_small().await;
    put(&ts, 0, 1, 3).await;
    let base = start_http(&ts, false);
    let token = ts.read_token();
    // More viewers than twice the feed's topics (2 × (sessions + 1)), so that one serialisation
    // per viewer could never pass the bound below.
    const VIEWERS: usize = 40;
    let mut viewers = Vec::new();
    for _ in 0..VIEWERS {
        let mut r = open_sse(&format!("{base}/api/live?session=1"), &token).await;
        let mut buf = String::new();
        let first = next_frame(&mut r, &mut buf, |_| true).await;
        assert_eq!(first["national"]["count"], Value::from(3), "the first frame is the snapshot");
        assert_eq!(first["provinces"].as_array().map(Vec::len), Some(ts.registry.provinces.len()));
        viewers.push((r, buf));
    }
    let scrape = |b: String| {
        let token = token.clone();
        async move { get(&format!("{b}/metrics"), Some(&token)).await.1 }
    };
    let frames_before = metric(&scrape(base.clone()).await, "headcount_sse_frames_total", &[]);
    assert_eq!(metric(&scrape(base.clone()).await, "headcount_sse_viewers", &[]), VIEWERS as f64);

    let site = &ts.registry.sites[1];
    put(&ts, 1, 1, 20).await;
    let reader = ts.reader().await;
    let want = reader.totals(national(), Some(1)).await.count;
    let want_p = reader.totals(province(&ts.registry.provinces[site.province as usize].code), Some(1)).await.count;
    // Frames the first viewer received meanwhile (every viewer of the topic gets the same ones).
    let mut received = 0usize;
    for (i, (r, buf)) in viewers.iter_mut().enumerate() {
        let f = next_frame(r, buf, |f| {
            received += usize::from(i == 0);
            f["national"]["count"] == want
        })
        .await;
        assert_eq!(f["provinces"][site.province as usize][0], Value::from(want_p), "the province's count");
    }
    let frames = metric(&scrape(base.clone()).await, "headcount_sse_frames_total", &[]) - frames_before;
    // Shared: the publisher serialises each changed topic (2 × (sessions + 1) of them, watched or
    // not) once per tick, however many watch it. So at most `topics` serialisations per frame a
    // viewer received (plus one tick in flight), never one per viewer (>= VIEWERS × received).
    let topics = 2 * (ts.registry.sessions.len() + 1);
    assert!(VIEWERS > 2 * topics);
    assert!(
        frames >= 1.0 && frames <= (topics * (received + 1)) as f64,
        "{frames} frames serialised while each of {VIEWERS} viewers received {received} ({topics} topics)"
    );

    // A live request on a connection that served another request first (the router's path,
    // not the hand-served one) gets the same frames.
    let shared = client();
    let meta = within("meta", shared.get(format!("{base}/api/meta")).bearer_auth(&token).send()).await.expect("meta");
    assert_eq!(meta.status(), StatusCode::OK);
    within("meta body", meta.bytes()).await.expect("drain meta");
    let mut r = within("live", shared.get(format!("{base}/api/live?session=1")).bearer_auth(&token).send())
        .await
        .expect("live");
    assert_eq!(r.status(), StatusCode::OK);
    let f = next_frame(&mut r, &mut String::new(), |_| true).await;
    assert_eq!(f["national"]["count"], Value::from(want));
    drop(r);
    // Errors on the hand-served path are proper HTTP answers.
    for (q, token, want) in [
        ("/api/live?session=9", Some(token.as_str()), StatusCode::NOT_FOUND),
        ("/api/live?session=x", Some(token.as_str()), StatusCode::BAD_REQUEST),
        ("/api/live", None, StatusCode::UNAUTHORIZED),
    ] {
        let (status, body) = get(&format!("{base}{q}"), token).await;
        assert_eq!(status, want, "{q}: {body}");
        assert!(serde_json::from_str::<Value>(&body).is_ok_and(|v| v["error"].is_string()), "{q}: {body}");
    }

    // National-only topic: no province table.
    let mut r = open_sse(&format!("{base}/api/live?provinces=false"), &token).await;
    let f = next_frame(&mut r, &mut String::new(), |_| true).await;
    assert_eq!(f["provinces"].as_array().map(Vec::len), Some(0));
    assert_eq!(f["national"]["count"], Value::from(reader.count(national(), None).await));

    // Closing viewers are counted out; shutdown ends every stream.
    drop(viewers);
    eventually("viewers counted out", DEADLINE, || async {
        let v = metric(&scrape(base.clone()).await, "headcount_sse_viewers", &[]);
        if v == 1.0 { Ok(()) } else { Err(format!("{v} viewers")) }
    })
    .await;
    ts.server.stop().await.expect("clean stop");
    let ended = within("stream ends at shutdown", async {
        loop {
            match r.chunk().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ends cleanly: {ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_reports_sent() {
    let ts = start_small().await;
    let base = start_http(&ts, false);
    let token = ts.read_token();
    let scrape = || async { get(&format!("{base}/metrics"), Some(&token)).await };
    // Recorded before the first scrape: the recorder is installed with the HTTP side.
    let ch = ts.channel().await;
    let id = ts.registry.sites[5].id.clone();
    let refused = open_stream(ch.clone(), Some("hc1.site.x.00"), Some(&id), Some("1")).await;
    assert!(refused.is_err());
    let (status, before) = scrape().await;
    assert_eq!(status, StatusCode::OK);
    assert!(metric(&before, "headcount_handshakes_refused_total", &[("code", "Unauthenticated")]) >= 1.0);
    assert_eq!(metric(&before, "headcount_reports_applied_total", &[]), 0.0);
    assert_eq!(metric(&before, "headcount_sites_total", &[]), ts.registry.sites.len() as f64);

    let mut st = ts.open(&ch, &id, 1).await;
    let rejected_before = metric(&before, "headcount_report_rejections_total", &[("code", "NotFound")]);
    let ack = st.send_batch(vec![report(1, 1, 10), report(2, 1, 4), report(1, 1, 10), report(9, 1, 1)]).await;
    assert_eq!(ack.rejections.len(), 1, "session 9 does not exist");
    let open = metric(&scrape().await.1, "headcount_streams_open", &[]);
    assert_eq!(open, 1.0, "one ingest stream open");

    let (_, after) = scrape().await;
    assert_eq!(metric(&after, "headcount_reports_applied_total", &[]), 2.0);
    assert_eq!(metric(&after, "headcount_reports_unchanged_total", &[]), 1.0);
    assert_eq!(metric(&after, "headcount_reports_rejected_total", &[]), 1.0);
    assert_eq!(metric(&after, "headcount_batches_total", &[]), 1.0);
    // The recorder is process-wide (other tests of this binary may add rejections too).
    assert!(metric(&after, "headcount_report_rejections_total", &[("code", "NotFound")]) >= rejected_before + 1.0);
    assert_eq!(metric(&after, "headcount_checked_in", &[("session", "1")]), 10.0);
    assert_eq!(metric(&after, "headcount_checked_in", &[("session", "2")]), 4.0);
    assert_eq!(metric(&after, "headcount_checked_in", &[("session", "all")]), 14.0);
    assert_eq!(metric(&after, "headcount_sites_with_checkins", &[("session", "1")]), 1.0);
    assert_eq!(metric(&after, "headcount_sites_reporting", &[]), 1.0);
    for family in ["headcount_reports_applied_total", "headcount_sse_viewers", "headcount_checked_in"] {
        assert!(after.contains(&format!("# TYPE {family} ")), "{family} is typed");
    }

    // A refused handshake is counted by its code.
    let refused_before = metric(&after, "headcount_handshakes_refused_total", &[("code", "Unauthenticated")]);
    let refused = open_stream(ch.clone(), Some("hc1.site.x.00"), Some(&id), Some("1")).await;
    assert!(refused.is_err());
    let (_, later) = scrape().await;
    assert!(
        metric(&later, "headcount_handshakes_refused_total", &[("code", "Unauthenticated")]) >= refused_before + 1.0
    );
    // Without a token, no metrics.
    assert_eq!(get(&format!("{base}/metrics"), None).await.0, StatusCode::UNAUTHORIZED);
}
