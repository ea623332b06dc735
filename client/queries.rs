//! One-shot read commands of the dashboard CLI: `totals --order --limit --csv`, `silent`,
//! `curve` and `corrections`, each as a table, `--json`, or (totals) CSV for spreadsheets.
//! Given several aggregator addresses, each command asks the next when one cannot be reached
//! ([`on_first_answering`]).

use serde::Serialize;
use tonic::transport::Channel;

use super::{
    aggregators::{self, Aggregators},
    connect::authorized,
    dashboard::{DashboardError, TotalsView, summary_line, table, thousands},
};
use crate::proto::v1::{
    BreakdownOrder, BreakdownRequest, CorrectionsRequest, CurveRequest, Scope, ScopeKind, SilentSitesRequest,
    TotalsRequest, totals_client::TotalsClient,
};

/// How `headcount totals` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// A summary line and a table.
    #[default]
    Table,
    /// Pretty JSON `{totals, children}`.
    Json,
    /// CSV: the scope's row, then one row per child.
    Csv,
}

/// Options of `headcount totals` (default: registry order, all children, a table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TotalsOptions {
    /// Children order.
    pub order: BreakdownOrder,
    /// Most children (0: all).
    pub limit: u32,
    /// Output format.
    pub output: Output,
}

impl Default for TotalsOptions {
    fn default() -> Self {
        Self { order: BreakdownOrder::Id, limit: 0, output: Output::Table }
    }
}

/// Parses `id`, `count` (largest first) or `turnout` (laggards first).
pub fn parse_order(s: &str) -> Result<BreakdownOrder, String> {
    match s {
        "id" => Ok(BreakdownOrder::Id),
        "count" | "count_desc" => Ok(BreakdownOrder::CountDesc),
        "turnout" | "turnout_asc" => Ok(BreakdownOrder::TurnoutAsc),
        _ => Err(format!("order must be `id`, `count` (largest first) or `turnout` (laggards first), not {s:?}")),
    }
}

fn write_err(e: std::io::Error) -> DashboardError {
    DashboardError::Output(serde_json::Error::io(e))
}

/// `headcount totals`: a scope and its children (none for a site).
pub async fn totals(
    channel: Channel,
    token: &str,
    scope: Scope,
    session: Option<u32>,
    options: TotalsOptions,
    out: &mut impl std::io::Write,
) -> Result<(), DashboardError> {
    let mut client = TotalsClient::new(channel);
    let (parent, children) = if scope.kind == ScopeKind::Site as i32 {
        let t = client
            .get_totals(authorized(TotalsRequest { scope: Some(scope), session, min_revision: 0 }, token)?)
            .await?
            .into_inner();
        (t, Vec::new())
    } else {
        let req = BreakdownRequest { scope: Some(scope), session, order: options.order as i32, limit: options.limit };
        let b = client.breakdown(authorized(req, token)?).await?.into_inner();
        (b.parent.unwrap_or_default(), b.children)
    };
    let (raw_parent, raw_children) = (parent, children);
    let parent = TotalsView::from(&raw_parent);
    let children: Vec<TotalsView> = raw_children.iter().map(TotalsView::from).collect();
    match options.output {
        Output::Json => {
            #[derive(Serialize)]
            struct Out<'a> {
                totals: &'a TotalsView,
                children: &'a [TotalsView],
            }
            serde_json::to_writer_pretty(&mut *out, &Out { totals: &parent, children: &children })?;
            writeln!(out).map_err(write_err)?;
        }
        Output::Csv => {
            let mut w = csv::Writer::from_writer(&mut *out);
            let csv_err = |e: csv::Error| write_err(std::io::Error::other(e));
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
                "sites_over_capacity",
                "last_change_unix_ms",
            ])
            .map_err(csv_err)?;
            for t in std::iter::once(&parent).chain(&children) {
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
                    t.sites_over_capacity.to_string(),
                    t.last_change_unix_ms.to_string(),
                ])
                .map_err(csv_err)?;
            }
            w.flush().map_err(write_err)?;
        }
        Output::Table => {
            writeln!(out, "{}", summary_line(&raw_parent)).map_err(write_err)?;
            if !raw_children.is_empty() {
                write!(out, "\n{}", table(&raw_children)).map_err(write_err)?;
            }
        }
    }
    Ok(())
}

/// `headcount silent`: sites of a scope that sent nothing lately (at most `limit`, 0: all).
pub async fn silent(
    channel: Channel,
    token: &str,
    scope: Scope,
    limit: u32,
    json: bool,
    out: &mut impl std::io::Write,
) -> Result<(), DashboardError> {
    let r = TotalsClient::new(channel)
        .silent_sites(authorized(SilentSitesRequest { scope: Some(scope), limit }, token)?)
        .await?
        .into_inner();
    if json {
        let sites: Vec<serde_json::Value> = r
            .sites
            .iter()
            .map(|s| {
                serde_json::json!({ "site_id": s.site_id, "name": s.name, "province": s.province,
                    "commune": s.commune, "last_seen_unix_ms": s.last_seen_unix_ms })
            })
            .collect();
        serde_json::to_writer_pretty(
            &mut *out,
            &serde_json::json!({ "total_silent": r.total_silent, "sites": sites }),
        )?;
        writeln!(out).map_err(write_err)?;
        return Ok(());
    }
    writeln!(out, "{} silent sites", thousands(i64::from(r.total_silent))).map_err(write_err)?;
    for s in &r.sites {
        let seen = if s.last_seen_unix_ms > 0 {
            format!("last seen {}", utc(s.last_seen_unix_ms))
        } else {
            "never seen".into()
        };
        writeln!(out, "{:<10} {:<40} {:<4} {:<10} {seen}", s.site_id, s.name, s.province, s.commune)
            .map_err(write_err)?;
    }
    Ok(())
}

fn utc(unix_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `headcount curve`: check-ins per bucket of a national or province scope.
pub async fn curve(
    channel: Channel,
    token: &str,
    scope: Scope,
    session: Option<u32>,
    json: bool,
    out: &mut impl std::io::Write,
) -> Result<(), DashboardError> {
    let r = TotalsClient::new(channel)
        .curve(authorized(CurveRequest { scope: Some(scope), session }, token)?)
        .await?
        .into_inner();
    if json {
        let points: Vec<serde_json::Value> = r
            .points
            .iter()
            .map(|p| serde_json::json!({ "unix_ms": p.unix_ms, "count": p.count, "delta": p.delta }))
            .collect();
        serde_json::to_writer_pretty(&mut *out, &serde_json::json!({ "bucket_ms": r.bucket_ms, "points": points }))?;
        writeln!(out).map_err(write_err)?;
        return Ok(());
    }
    let peak = r.points.iter().map(|p| p.delta).max().unwrap_or(0).max(1);
    writeln!(out, "{:<20} {:>12} {:>10}", "bucket (UTC)", "checked in", "new").map_err(write_err)?;
    for p in &r.points {
        let bar = "#".repeat(((p.delta.max(0) * 40) / peak) as usize);
        writeln!(out, "{:<20} {:>12} {:>10} {bar}", utc(p.unix_ms), thousands(p.count), thousands(p.delta))
            .map_err(write_err)?;
    }
    Ok(())
}

/// `headcount corrections`: the audit trail, newest first (at most `limit`, 0: all).
pub async fn corrections(
    channel: Channel,
    token: &str,
    limit: u32,
    json: bool,
    out: &mut impl std::io::Write,
) -> Result<(), DashboardError> {
    let r =
        TotalsClient::new(channel).corrections(authorized(CorrectionsRequest { limit }, token)?).await?.into_inner();
    if json {
        let list: Vec<serde_json::Value> = r
            .corrections
            .iter()
            .map(|c| {
                serde_json::json!({ "site_id": c.site_id, "desk": c.desk, "session": c.session, "seq": c.seq,
                    "previous_count": c.previous_count, "count": c.count, "reason": c.reason, "unix_ms": c.unix_ms })
            })
            .collect();
        serde_json::to_writer_pretty(&mut *out, &serde_json::json!({ "corrections": list }))?;
        writeln!(out).map_err(write_err)?;
        return Ok(());
    }
    writeln!(out, "{} corrections", r.corrections.len()).map_err(write_err)?;
    for c in &r.corrections {
        writeln!(
            out,
            "{} {} desk {} session {}: {} -> {} ({})",
            utc(c.unix_ms),
            c.site_id,
            c.desk,
            c.session,
            thousands(c.previous_count),
            thousands(c.count),
            c.reason
        )
        .map_err(write_err)?;
    }
    Ok(())
}

/// Runs a one-shot query on the first aggregator, and on the next ones while it fails with a
/// status another node may not give (unreachable, timed out, reset: see
/// [`aggregators::try_next`]); a permanent refusal (token, scope) or a local error (output)
/// ends it at once. Errors: that refusal, or the last address's error when none answered.
pub async fn on_first_answering<T>(
    aggregators: &Aggregators,
    mut query: impl AsyncFnMut(Channel) -> Result<T, DashboardError>,
) -> Result<T, DashboardError> {
    let mut last = None;
    for (i, a) in aggregators.iter().enumerate() {
        match query(a.channel.clone()).await {
            Err(DashboardError::Status(s)) if aggregators::try_next(&s) && i + 1 < aggregators.len() => {
                let to = &aggregators.get(i + 1).url;
                tracing::warn!(from = %a.url, to = %to, code = ?s.code(), message = s.message(), "next aggregator");
                last = Some(DashboardError::Status(s));
            }
            r => return r,
        }
    }
    Err(last.unwrap_or(DashboardError::Status(tonic::Status::unavailable("no aggregator address"))))
}
