//! CSV exports with a UTF-8 byte-order mark (so Excel shows Vietnamese names correctly):
//! totals of any scope and session, every site with its state, silent sites, corrections.
//! Times are RFC 3339 UTC. Token only.

use axum::{
    extract::{Query, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};

use super::{
    HttpState, access,
    api::{Params, SilentJson, TotalsJson},
    error::HttpError,
};
use crate::server::tally::{Level, Node};

/// The UTF-8 byte-order mark every export starts with.
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

fn utc(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return String::new();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Writes rows after the BOM and answers as a download named `filename`.
fn csv_response(
    filename: &str,
    write: impl FnOnce(&mut csv::Writer<&mut Vec<u8>>) -> csv::Result<()>,
) -> Result<Response, HttpError> {
    let mut buf = BOM.to_vec();
    let mut w = csv::Writer::from_writer(&mut buf);
    write(&mut w).and_then(|()| w.flush().map_err(csv::Error::from)).map_err(|e| HttpError {
        status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("csv: {e}"),
    })?;
    drop(w);
    let mut r = buf.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

fn session_tag(p: &Params) -> Result<String, HttpError> {
    Ok(p.session()?.map_or_else(|| "all".to_owned(), |s| format!("s{s}")))
}

fn totals_row(w: &mut csv::Writer<&mut Vec<u8>>, t: &TotalsJson) -> csv::Result<()> {
    w.write_record([
        t.kind.to_owned(),
        t.id.clone(),
        t.name.clone(),
        t.session.map_or_else(|| "all".to_owned(), |s| s.to_string()),
        t.count.to_string(),
        t.registered.to_string(),
        format!("{:.2}", t.turnout_pct),
        t.sites_reporting.to_string(),
        t.sites_total.to_string(),
        t.sites_silent.to_string(),
        t.sites_over_capacity.to_string(),
        utc(t.last_change_unix_ms),
    ])
}

/// `GET /export/totals.csv?scope=&session=`: the scope, then each child.
pub async fn totals(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Result<Response, HttpError> {
    let access = access::check(&st, &headers, false)?;
    let (node, session) = p.resolve(&st.agg, access)?;
    let parent = TotalsJson::from(&st.agg.totals_of(node, session));
    let children: Vec<TotalsJson> = match node.level {
        Level::Site => Vec::new(),
        _ => st.agg.children(node)?.into_iter().map(|c| TotalsJson::from(&st.agg.totals_of(c, session))).collect(),
    };
    let name = format!(
        "headcount-totals-{}{}-{}.csv",
        parent.kind,
        if parent.id.is_empty() { String::new() } else { format!("-{}", parent.id) },
        session_tag(&p)?
    );
    csv_response(&name, |w| {
        w.write_record([
            "kind",
            "id",
            "name",
            "session",
            "count",
            "registered",
            "turnout_pct",
            "sites_reporting",
            "sites_total",
            "sites_silent",
            "sites_over_capacity",
            "last_change_utc",
        ])?;
        totals_row(w, &parent)?;
        children.iter().try_for_each(|c| totals_row(w, c))
    })
}

/// `GET /export/sites.csv?scope=&session=`: every site of the scope with its count and state
/// (`reporting` or `silent`).
pub async fn sites(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Result<Response, HttpError> {
    let access = access::check(&st, &headers, false)?;
    let (node, session) = p.resolve(&st.agg, access)?;
    let agg = &st.agg;
    let r = agg.registry();
    let within = |i: usize| {
        let s = &r.sites[i];
        match node.level {
            Level::National => true,
            Level::Province => s.province == node.index,
            Level::Commune => s.commune == node.index,
            Level::Site => i == node.index as usize,
        }
    };
    let name = format!("headcount-sites-{}.csv", session_tag(&p)?);
    csv_response(&name, |w| {
        w.write_record([
            "site_id",
            "name",
            "province_code",
            "province_name",
            "commune_id",
            "commune_name",
            "desks",
            "session",
            "count",
            "registered",
            "turnout_pct",
            "state",
            "last_seen_utc",
        ])?;
        for i in (0..r.sites.len()).filter(|&i| within(i)) {
            let s = &r.sites[i];
            let t = agg.totals_of(Node { level: Level::Site, index: i as u32 }, session);
            let p = &r.provinces[s.province as usize];
            let c = &r.communes[s.commune as usize];
            w.write_record([
                s.id.clone(),
                s.name.clone(),
                p.code.clone(),
                p.name.clone(),
                c.id.clone(),
                c.name.clone(),
                s.desks.to_string(),
                t.session.map_or_else(|| "all".to_owned(), |s| s.to_string()),
                t.count.to_string(),
                t.registered.to_string(),
                format!("{:.2}", t.turnout_pct),
                if t.sites_reporting > 0 { "reporting" } else { "silent" }.to_owned(),
                utc(agg.shared().liveness.last_seen(i as u32)),
            ])?;
        }
        Ok(())
    })
}

/// `GET /export/silent.csv?scope=`: silent sites with their contact.
pub async fn silent(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Result<Response, HttpError> {
    let access = access::check(&st, &headers, false)?;
    let (node, _) = p.resolve(&st.agg, access)?;
    let list = st.agg.silent_sites(node, 0);
    csv_response("headcount-silent.csv", |w| {
        w.write_record(["site_id", "name", "province_code", "commune_id", "last_seen_utc", "contact"])?;
        list.sites.iter().map(SilentJson::from).try_for_each(|s| {
            w.write_record([s.site_id, s.name, s.province, s.commune, utc(s.last_seen_unix_ms), s.contact])
        })
    })
}

/// `GET /export/corrections.csv`: the whole audit trail, newest first.
pub async fn corrections(State(st): State<HttpState>, headers: HeaderMap) -> Result<Response, HttpError> {
    access::national_only(access::check(&st, &headers, false)?)?;
    let list = st.agg.shared().audit.newest(0);
    csv_response("headcount-corrections.csv", |w| {
        w.write_record(["site_id", "desk", "session", "seq", "previous_count", "count", "reason", "applied_utc"])?;
        list.iter().try_for_each(|c| {
            w.write_record([
                c.site_id.clone(),
                c.desk.to_string(),
                c.session.to_string(),
                c.seq.to_string(),
                c.previous_count.to_string(),
                c.count.to_string(),
                c.reason.clone(),
                utc(c.unix_ms),
            ])
        })
    })
}
