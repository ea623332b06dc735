//! The Totals calls as JSON for `curl` and spreadsheets: `/api/totals`, `/api/breakdown`,
//! `/api/silent`, `/api/curve`, `/api/corrections`, `/api/stats`, and `/api/meta` (sessions,
//! the current one, the time zone) for the page.
//!
//! Query parameters: `scope` = `national` (default), `province:CODE`, `commune:ID`, `site:ID`;
//! `session` = a session id, or `all` / absent for all sessions; `order` = `id`, `count_desc`,
//! `turnout_asc`; `limit` = most rows (0 or absent: all).

use axum::{
    Json,
    extract::{Query, State},
    http::HeaderMap,
};
use serde::{Deserialize, Serialize};

use super::{
    HttpState,
    access::{self, Access},
    error::HttpError,
};
use crate::{
    proto::v1::{BreakdownOrder, Correction, Scope, ScopeKind, ScopeTotals, SilentSite},
    server::{Aggregator, tally::Node},
};

/// Query parameters shared by the JSON API and the CSV exports.
#[derive(Debug, Default, Deserialize)]
pub struct Params {
    /// `national`, `province:CODE`, `commune:ID` or `site:ID`.
    pub scope: Option<String>,
    /// A session id, or `all`.
    pub session: Option<String>,
    /// `id`, `count_desc` or `turnout_asc`.
    pub order: Option<String>,
    /// Most rows; 0: all.
    pub limit: Option<usize>,
    /// Cluster mode, `/api/totals`: answer once this node has applied this etcd revision (waits
    /// up to 5 s, then 503).
    pub min_revision: Option<u64>,
}

impl Params {
    /// The wire scope (400 if malformed).
    pub fn scope(&self) -> Result<Scope, HttpError> {
        let s = self.scope.as_deref().unwrap_or("national");
        let (kind, id) = match s.split_once(':') {
            None if s == "national" || s.is_empty() => (ScopeKind::National, ""),
            Some(("province", id)) => (ScopeKind::Province, id),
            Some(("commune", id)) => (ScopeKind::Commune, id),
            Some(("site", id)) => (ScopeKind::Site, id),
            _ => {
                return Err(HttpError::bad_request(format!(
                    "scope must be `national`, `province:CODE`, `commune:ID` or `site:ID`, not {s:?}"
                )));
            }
        };
        Ok(Scope { kind: kind as i32, id: id.to_owned() })
    }

    /// The session id, None for all sessions (400 if not a number or `all`).
    pub fn session(&self) -> Result<Option<u32>, HttpError> {
        match self.session.as_deref() {
            None | Some("") | Some("all") => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| HttpError::bad_request(format!("session must be a session id or `all`, not {s:?}"))),
        }
    }

    /// The node and session index asked for, checked against what `access` may see.
    pub fn resolve(&self, agg: &Aggregator, access: Access) -> Result<(Node, Option<usize>), HttpError> {
        let scope = self.scope()?;
        if access == Access::Public
            && scope.kind != ScopeKind::National as i32
            && scope.kind != ScopeKind::Province as i32
        {
            return Err(HttpError::unauthorized("only national and province figures are public; log in at /login"));
        }
        let node = agg.node(Some(&scope))?;
        if let Access::Province(p) = access {
            super::access::within_province(agg, p, node)?;
        }
        Ok((node, agg.session_index(self.session()?)?))
    }

    fn order(&self) -> Result<BreakdownOrder, HttpError> {
        match self.order.as_deref().unwrap_or("id") {
            "id" => Ok(BreakdownOrder::Id),
            "count_desc" => Ok(BreakdownOrder::CountDesc),
            "turnout_asc" => Ok(BreakdownOrder::TurnoutAsc),
            o => Err(HttpError::bad_request(format!("order must be `id`, `count_desc` or `turnout_asc`, not {o:?}"))),
        }
    }
}

/// A scope's totals as JSON.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TotalsJson {
    /// `national`, `province`, `commune` or `site`.
    pub kind: &'static str,
    /// Scope id (empty for national).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Session id; null for all sessions.
    pub session: Option<u32>,
    /// Checked in.
    pub count: i64,
    /// Registered delegates (× sessions for all sessions).
    pub registered: i64,
    /// Turnout, percent.
    pub turnout_pct: f64,
    /// Sites reporting (not silent).
    pub sites_reporting: u32,
    /// Sites in scope.
    pub sites_total: u32,
    /// Sites not reporting: `sites_total - sites_reporting`.
    pub sites_silent: u32,
    /// Sites whose count exceeds their registered delegates.
    pub sites_over_capacity: u32,
    /// Last change, Unix ms (0: never).
    pub last_change_unix_ms: i64,
    /// Cluster mode: the etcd revision these totals reflect (0 on a single node).
    pub revision: u64,
}

/// The kind name of a wire scope.
pub fn kind_name(scope: Option<&Scope>) -> &'static str {
    match scope.map(|s| ScopeKind::try_from(s.kind)) {
        Some(Ok(ScopeKind::Province)) => "province",
        Some(Ok(ScopeKind::Commune)) => "commune",
        Some(Ok(ScopeKind::Site)) => "site",
        _ => "national",
    }
}

impl From<&ScopeTotals> for TotalsJson {
    fn from(t: &ScopeTotals) -> Self {
        Self {
            kind: kind_name(t.scope.as_ref()),
            id: t.scope.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
            name: t.name.clone(),
            session: t.session,
            count: t.count,
            registered: t.registered,
            turnout_pct: t.turnout_pct,
            sites_reporting: t.sites_reporting,
            sites_total: t.sites_total,
            sites_silent: t.sites_total.saturating_sub(t.sites_reporting),
            sites_over_capacity: t.sites_over_capacity,
            last_change_unix_ms: t.last_change_unix_ms,
            revision: t.revision,
        }
    }
}

/// A scope and its children.
#[derive(Debug, Serialize)]
pub struct BreakdownJson {
    /// The scope.
    pub totals: TotalsJson,
    /// Its children, in the asked order.
    pub children: Vec<TotalsJson>,
}

/// A silent site as JSON.
#[derive(Debug, Serialize)]
pub struct SilentJson {
    /// Site id.
    pub site_id: String,
    /// Site name.
    pub name: String,
    /// Province code.
    pub province: String,
    /// Commune id.
    pub commune: String,
    /// Last report or heartbeat, Unix ms (0: never seen).
    pub last_seen_unix_ms: i64,
    /// Who to call (empty where the registry has no contact).
    pub contact: String,
}

impl From<&SilentSite> for SilentJson {
    fn from(s: &SilentSite) -> Self {
        Self {
            site_id: s.site_id.clone(),
            name: s.name.clone(),
            province: s.province.clone(),
            commune: s.commune.clone(),
            last_seen_unix_ms: s.last_seen_unix_ms,
            contact: contact(s),
        }
    }
}

/// The contact of a silent site from the registry's optional columns: `name, phone`, either
/// alone, or empty when the registry gives none.
pub fn contact(site: &SilentSite) -> String {
    match (site.contact_name.trim(), site.contact_phone.trim()) {
        ("", phone) => phone.to_owned(),
        (name, "") => name.to_owned(),
        (name, phone) => format!("{name}, {phone}"),
    }
}

/// A correction as JSON.
#[derive(Debug, Serialize)]
pub struct CorrectionJson {
    /// Site id.
    pub site_id: String,
    /// Desk.
    pub desk: u32,
    /// Session id.
    pub session: u32,
    /// The seq that carried it.
    pub seq: u64,
    /// Count before.
    pub previous_count: i64,
    /// Count after.
    pub count: i64,
    /// The reporter's reason.
    pub reason: String,
    /// When applied, Unix ms.
    pub unix_ms: i64,
}

impl From<&Correction> for CorrectionJson {
    fn from(c: &Correction) -> Self {
        Self {
            site_id: c.site_id.clone(),
            desk: c.desk,
            session: c.session,
            seq: c.seq,
            previous_count: c.previous_count,
            count: c.count,
            reason: c.reason.clone(),
            unix_ms: c.unix_ms,
        }
    }
}

/// `GET /api/totals?scope=&session=`: one scope's totals.
pub async fn totals(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Result<Json<TotalsJson>, HttpError> {
    let access = access::check(&st, &headers, true)?;
    let (node, session) = p.resolve(&st.agg, access)?;
    if let (Some(rep), Some(revision)) = (&st.agg.shared().replication, p.min_revision) {
        rep.wait_applied(revision, std::time::Duration::from_secs(5)).await?;
    }
    Ok(Json((&st.agg.totals_of(node, session)).into()))
}

/// `GET /api/breakdown?scope=&session=&order=&limit=`: a scope and its children. Public access
/// may break down the nation (the province table) only.
pub async fn breakdown(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Result<Json<BreakdownJson>, HttpError> {
    let access = access::check(&st, &headers, true)?;
    let (node, session) = p.resolve(&st.agg, access)?;
    if access == Access::Public && node != Node::NATIONAL {
        return Err(HttpError::unauthorized("communes and sites need a token; log in at /login"));
    }
    let b = st.agg.breakdown(node, session, p.order()?, p.limit.unwrap_or(0))?;
    Ok(Json(BreakdownJson {
        totals: b.parent.as_ref().map(TotalsJson::from).unwrap_or_else(|| (&st.agg.totals_of(node, session)).into()),
        children: b.children.iter().map(TotalsJson::from).collect(),
    }))
}

/// `GET /api/silent?scope=&limit=`: silent sites of a scope (token only).
pub async fn silent(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Result<Json<serde_json::Value>, HttpError> {
    let access = access::check(&st, &headers, false)?;
    let (node, _) = p.resolve(&st.agg, access)?;
    let r = st.agg.silent_sites(node, p.limit.unwrap_or(0));
    let sites: Vec<SilentJson> = r.sites.iter().map(SilentJson::from).collect();
    Ok(Json(serde_json::json!({ "total_silent": r.total_silent, "sites": sites })))
}

/// `GET /api/curve?scope=&session=`: check-ins per bucket, national or a province.
pub async fn curve(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Result<Json<serde_json::Value>, HttpError> {
    let access = access::check(&st, &headers, true)?;
    let (node, session) = p.resolve(&st.agg, access)?;
    let c = st.agg.curve(node, session)?;
    let points: Vec<serde_json::Value> = c
        .points
        .iter()
        .map(|p| serde_json::json!({ "unix_ms": p.unix_ms, "count": p.count, "delta": p.delta }))
        .collect();
    Ok(Json(serde_json::json!({ "bucket_ms": c.bucket_ms, "points": points })))
}

/// `GET /api/corrections?limit=`: the audit trail, newest first (token only).
pub async fn corrections(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Result<Json<serde_json::Value>, HttpError> {
    access::national_only(access::check(&st, &headers, false)?)?;
    let list: Vec<CorrectionJson> =
        st.agg.shared().audit.newest(p.limit.unwrap_or(0)).iter().map(CorrectionJson::from).collect();
    Ok(Json(serde_json::json!({ "corrections": list })))
}

/// `GET /api/stats`: what the aggregator did since start (token only).
pub async fn stats(State(st): State<HttpState>, headers: HeaderMap) -> Result<Json<serde_json::Value>, HttpError> {
    access::check(&st, &headers, false)?;
    let s = st.agg.stats();
    Ok(Json(serde_json::json!({
        "reports_applied": s.applied, "reports_unchanged": s.unchanged, "reports_rejected": s.rejected,
        "batches": s.batches, "streams_open": s.streams_open, "registers": st.agg.shared().registers.len(),
        "node": st.agg.shared().replication.as_ref().map(|r| r.node.clone()),
        "revision": st.agg.shared().replication.as_ref().map_or(0, |r| r.applied()),
    })))
}

/// The session the page opens on: the current one by the registry's schedule
/// ([`crate::server::registry::Registry::current_session`]); for a registry without times, the
/// latest session with any check-in, else the first.
pub fn current_session(agg: &Aggregator) -> Option<u32> {
    let r = agg.registry();
    if let Some(s) = r.current_session(agg.shared().config.clock.wall_ms()) {
        return Some(s.id);
    }
    (0..r.sessions.len())
        .rev()
        .find(|&k| agg.shared().tallies.read(Node::NATIONAL, Some(k)).count > 0)
        .or((!r.sessions.is_empty()).then_some(0))
        .map(|k| r.sessions[k].id)
}

/// `GET /api/meta`: sessions, the current one, the time zone, and whether this caller has a
/// token (`access`: `token` or `public`).
pub async fn meta(State(st): State<HttpState>, headers: HeaderMap) -> Result<Json<serde_json::Value>, HttpError> {
    let access = access::check(&st, &headers, true)?;
    let r = st.agg.registry();
    let sessions: Vec<serde_json::Value> = r
        .sessions
        .iter()
        .map(|s| {
            let (starts, ends) = s.schedule.as_ref().map_or((0, 0), |w| (w.starts_unix_ms, w.ends_unix_ms));
            serde_json::json!({ "id": s.id, "name": s.name, "starts_unix_ms": starts, "ends_unix_ms": ends })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "sessions": sessions,
        "current_session": current_session(&st.agg),
        "time_zone": st.config.time_zone,
        "access": if access == Access::Token { "token" } else { "public" },
        "sites_total": r.sites.len(),
        "publish_tick_ms": st.agg.shared().config.publish_tick.as_millis() as u64,
    })))
}
