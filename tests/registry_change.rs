//! Changing the registry during an event, on the real binary over a data directory: adding a
//! site in the middle of the sites file, a desk, a session, a province, renaming, reordering
//! provinces and moving a site keep every count and every stored curve sample (curves are keyed
//! by province code, registers by site id); removing a site, desk or session that holds a count
//! is refused at start with a message naming it, and putting it back starts again.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;
mod server_process;

use std::collections::BTreeMap;

use common::{SECRET, channel_to, open_stream, report};
use headcount::{
    proto::v1::{CurveRequest, Scope, ScopeKind},
    server::{
        Auth,
        registry::{
            Registry,
            generate::{GenerateOptions, generate},
        },
    },
};
use server_process::{DataDir, SiteRow, resumed};

fn registry() -> Registry {
    generate(&GenerateOptions { sites: 24, sites_per_commune: 3.0, mean_registered: 100, seed: 9 })
}

/// Writes `count` (seq 1) to `(site, desk, session)` and waits for the ack.
async fn write(url: &str, site: &str, desk: u32, session: u32, count: i64) {
    let auth = Auth::new(SECRET).unwrap();
    let mut s = open_stream(channel_to(url).await, Some(&auth.site_token(site)), Some(site), Some(&desk.to_string()))
        .await
        .unwrap();
    let ack = s.send_batch(vec![report(session, 1, count)]).await;
    assert_eq!(ack.applied.len(), 1, "{ack:?}");
}

async fn reader(url: String) -> common::Reader {
    let auth = Auth::new(SECRET).unwrap();
    common::Reader::new(channel_to(&url).await, Some(auth.read_token("test")))
}

/// The curve of every province, by code: `(bucket start, count)` points.
async fn curves(r: &common::Reader, codes: &[String]) -> BTreeMap<String, Vec<(i64, i64)>> {
    let mut out = BTreeMap::new();
    for code in codes {
        let scope = Scope { kind: ScopeKind::Province as i32, id: code.clone() };
        let mut c = r.client.clone();
        let resp = c
            .curve(r.req(CurveRequest { scope: Some(scope), session: None }))
            .await
            .unwrap_or_else(|s| panic!("Curve of province {code}: {s:?}"))
            .into_inner();
        out.insert(code.clone(), resp.points.iter().map(|p| (p.unix_ms, p.count)).collect());
    }
    out
}

fn row_of<'a>(rows: &'a mut [SiteRow], id: &str) -> &'a mut SiteRow {
    rows.iter_mut().find(|r| r[0] == id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_renaming_reordering_and_moving_keep_all_state() {
    let reg = registry();
    let mut dir = DataDir::new(reg.clone());
    dir.curve_bucket = "1s";
    let (x, y, z) = (reg.sites[3].id.clone(), reg.sites[10].id.clone(), reg.sites[20].id.clone());
    let server = dir.start(None).await;
    write(&server.url(), &x, 1, 1, 11).await;
    write(&server.url(), &y, 1, 2, 22).await;
    write(&server.url(), &z, 1, 1, 33).await;
    let mut codes: Vec<String> = DataDir::rows(&reg).0.iter().skip(1).map(|s| s[2].clone()).collect();
    codes.sort();
    codes.dedup();
    let r = reader(server.url()).await;
    // Wait until two closed curve buckets hold the whole total, then crash (journal replay).
    let before = common::eventually("curve samples of the total", common::DEADLINE, || {
        let (r, codes) = (r.clone(), codes.clone());
        async move {
            let c = curves(&r, &codes).await;
            let full = c.values().map(|p| p.iter().rev().nth(2).map_or(0, |x| x.1)).sum::<i64>();
            if full == 66 { Ok(c) } else { Err(format!("closed buckets hold {full}")) }
        }
    })
    .await;
    server.kill9();

    let (mut sites, mut sessions) = DataDir::rows(&reg);
    // A site added in the middle of the file, in a new province placed first.
    let header = sites.remove(0);
    let mut new_site: SiteRow =
        ["N00001", "Điểm mới", "00", "Tỉnh mới", "00-001", "Xã mới", "50", "1"].map(str::to_owned).to_vec();
    new_site.resize(header.len(), String::new());
    sites.insert(1, new_site);
    // Rename x, add a desk to y, move z to the province and commune of site 0.
    row_of(&mut sites, &x)[1] = "Renamed site".into();
    let desks: u16 = row_of(&mut sites, &y)[7].parse().unwrap();
    row_of(&mut sites, &y)[7] = (desks + 1).to_string();
    let home = sites[0].clone();
    let zr = row_of(&mut sites, &z);
    zr[2..6].clone_from_slice(&home[2..6]);
    // Reverse the rows: the provinces come in the opposite order.
    sites.reverse();
    let mut extra = vec!["9".to_owned(), "Extra session".to_owned()];
    extra.resize(sessions[0].len(), String::new());
    sessions.push(extra);
    let mut file = vec![header];
    file.extend(sites.iter().cloned());
    dir.write_rows(&file, &sessions);

    let server = dir.start(None).await;
    assert_eq!(resumed(&server.url(), &x, 1).await, vec![(1, 1, 11)]);
    assert_eq!(resumed(&server.url(), &y, 1).await, vec![(2, 1, 22)]);
    assert_eq!(resumed(&server.url(), &z, 1).await, vec![(1, 1, 33)]);
    let r = reader(server.url()).await;
    assert_eq!(r.count(common::national(), None).await, 66);
    // z's count moved with it.
    let z_home = common::province(&home[2]);
    let home_sites: Vec<&SiteRow> = sites.iter().filter(|s| s[2] == home[2]).collect();
    let expected: i64 = home_sites
        .iter()
        .map(|s| [(&x, 11), (&y, 22), (&z, 33)].iter().find(|(id, _)| **id == s[0]).map_or(0, |p| p.1))
        .sum();
    assert_eq!(r.count(z_home, None).await, expected);
    // Every stored curve sample is still its province's: same code, same bucket, same count.
    // (A province left without sites is gone from the registry, and its curve with it.)
    let mut all_codes: Vec<String> = sites.iter().map(|s| s[2].clone()).collect();
    all_codes.sort();
    all_codes.dedup();
    let after = curves(&r, &all_codes).await;
    let mut compared = 0;
    for (code, points) in before.iter().filter(|(c, _)| after.contains_key(*c)) {
        for (t, count) in points.iter().rev().skip(2) {
            let now = after[code].iter().find(|p| p.0 == *t).map(|p| p.1);
            assert_eq!(now, Some(*count), "province {code}, bucket {t}");
            compared += 1;
        }
    }
    assert!(compared > 0, "no stored curve sample was compared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_what_holds_counts_is_refused_by_name() {
    let reg = registry();
    let dir = DataDir::new(reg.clone());
    let (x, idle) = (reg.sites[2].id.clone(), reg.sites[7].id.clone());
    let multi = reg.sites.iter().find(|s| s.desks >= 2).expect("a site with two desks").id.clone();
    let server = dir.start(None).await;
    write(&server.url(), &x, 1, 3, 5).await;
    write(&server.url(), &multi, 2, 1, 7).await;
    server.terminate().await;
    let (sites, sessions) = DataDir::rows(&reg);

    // Remove a site that holds a count.
    let without_x: Vec<SiteRow> = sites.iter().filter(|r| r[0] != x).cloned().collect();
    dir.write_rows(&without_x, &sessions);
    let err = dir.start_failing();
    assert!(
        err.contains(&format!("site {x} desk 1 session 3 holds 5")) && err.contains("not in the registry"),
        "{err}"
    );
    // Remove the desk that holds a count.
    let mut fewer_desks = sites.clone();
    row_of(&mut fewer_desks, &multi)[7] = "1".into();
    dir.write_rows(&fewer_desks, &sessions);
    let err = dir.start_failing();
    assert!(err.contains(&format!("site {multi} desk 2 session 1 holds 7")), "{err}");
    // Remove a session that holds a count.
    let no_session_3: Vec<SiteRow> = sessions.iter().filter(|s| s[0] != "3").cloned().collect();
    dir.write_rows(&sites, &no_session_3);
    let err = dir.start_failing();
    assert!(err.contains(&format!("site {x} desk 1 session 3 holds 5")) && err.contains("session not in"), "{err}");
    // Removing a site that never reported is fine; and everything is still there.
    let without_idle: Vec<SiteRow> = sites.iter().filter(|r| r[0] != idle).cloned().collect();
    dir.write_rows(&without_idle, &sessions);
    let server = dir.start(None).await;
    assert_eq!(resumed(&server.url(), &x, 1).await, vec![(3, 1, 5)]);
    assert_eq!(resumed(&server.url(), &multi, 2).await, vec![(1, 1, 7)]);
}
