//! Dashboard tools: `watch` (live updates), human-readable or `--json` for scripts, and the
//! formatting shared with the one-shot commands in [`super::queries`].

use std::time::Duration;

use serde::Serialize;
use tonic::transport::Channel;

use super::connect::{ConnectError, authorized};
use crate::proto::v1::{Scope, ScopeKind, ScopeTotals, WatchRequest, totals_client::TotalsClient};

/// Why a dashboard command failed.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// Connection settings.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The aggregator answered with an error.
    #[error("aggregator: {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// Output failed.
    #[error("output: {0}")]
    Output(#[from] serde_json::Error),
    /// A malformed `--scope`.
    #[error("scope must be `national`, `province:CODE`, `commune:ID` or `site:ID`, not {0:?}")]
    Scope(String),
}

/// Parses `national`, `province:01`, `commune:01-003` or `site:S00001`.
///
/// ```
/// use headcount::{client::dashboard::parse_scope, proto::v1::ScopeKind};
/// let s = parse_scope("province:01").expect("valid scope");
/// assert_eq!((s.kind, s.id.as_str()), (ScopeKind::Province as i32, "01"));
/// assert!(parse_scope("planet:earth").is_err());
/// ```
pub fn parse_scope(s: &str) -> Result<Scope, DashboardError> {
    let (kind, id) = match s.split_once(':') {
        None if s == "national" => (ScopeKind::National, ""),
        Some(("province", id)) => (ScopeKind::Province, id),
        Some(("commune", id)) => (ScopeKind::Commune, id),
        Some(("site", id)) => (ScopeKind::Site, id),
        _ => return Err(DashboardError::Scope(s.to_owned())),
    };
    Ok(Scope { kind: kind as i32, id: id.to_owned() })
}

/// A `ScopeTotals` in JSON-friendly form.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TotalsView {
    /// `national`, `province`, `commune` or `site`.
    pub kind: &'static str,
    /// Scope id (empty for national).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Session id, or null for all sessions.
    pub session: Option<u32>,
    /// Checked in.
    pub count: i64,
    /// Registered.
    pub registered: i64,
    /// Turnout, percent.
    pub turnout_pct: f64,
    /// Sites reporting.
    pub sites_reporting: u32,
    /// Sites in scope.
    pub sites_total: u32,
    /// Sites over capacity.
    pub sites_over_capacity: u32,
    /// Last change, Unix ms.
    pub last_change_unix_ms: i64,
}

impl From<&ScopeTotals> for TotalsView {
    fn from(t: &ScopeTotals) -> Self {
        let (kind, id) = match &t.scope {
            Some(s) => (
                match ScopeKind::try_from(s.kind) {
                    Ok(ScopeKind::Province) => "province",
                    Ok(ScopeKind::Commune) => "commune",
                    Ok(ScopeKind::Site) => "site",
                    _ => "national",
                },
                s.id.clone(),
            ),
            None => ("national", String::new()),
        };
        Self {
            kind,
            id,
            name: t.name.clone(),
            session: t.session,
            count: t.count,
            registered: t.registered,
            turnout_pct: t.turnout_pct,
            sites_reporting: t.sites_reporting,
            sites_total: t.sites_total,
            sites_over_capacity: t.sites_over_capacity,
            last_change_unix_ms: t.last_change_unix_ms,
        }
    }
}

/// Formats an integer with thousands separators.
///
/// ```
/// use headcount::client::dashboard::thousands;
/// assert_eq!(thousands(1_503_270), "1,503,270");
/// assert_eq!(thousands(-999), "-999");
/// ```
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One summary line for a scope.
pub fn summary_line(t: &ScopeTotals) -> String {
    let session = t.session.map_or_else(|| "all sessions".to_owned(), |s| format!("session {s}"));
    format!(
        "{} ({session}): {} checked in of {} registered ({:.1} %), {} of {} sites reporting{}",
        t.name,
        thousands(t.count),
        thousands(t.registered),
        t.turnout_pct,
        thousands(i64::from(t.sites_reporting)),
        thousands(i64::from(t.sites_total)),
        if t.sites_over_capacity > 0 { format!(", {} over capacity", t.sites_over_capacity) } else { String::new() },
    )
}

/// The children's table (a header line, then one line per child).
pub fn table(children: &[ScopeTotals]) -> String {
    let mut out = format!(
        "{:<10} {:<32} {:>12} {:>12} {:>8} {:>15}\n",
        "id", "name", "checked in", "registered", "turnout", "sites reporting"
    );
    for c in children {
        let id = c.scope.as_ref().map_or("", |s| s.id.as_str());
        let name: String = c.name.chars().take(32).collect();
        out.push_str(&format!(
            "{:<10} {:<32} {:>12} {:>12} {:>7.1}% {:>15}\n",
            id,
            name,
            thousands(c.count),
            thousands(c.registered),
            c.turnout_pct,
            format!("{}/{}", c.sites_reporting, c.sites_total),
        ));
    }
    out
}

/// `headcount watch`: prints the snapshot and every update until the stream ends, `max_updates`
/// messages were printed, or `duration` elapsed.
#[allow(clippy::too_many_arguments)]
pub async fn watch(
    channel: Channel,
    token: &str,
    scope: Scope,
    session: Option<u32>,
    include_children: bool,
    json: bool,
    max_updates: Option<u64>,
    duration: Option<Duration>,
    out: &mut impl std::io::Write,
) -> Result<(), DashboardError> {
    let mut client = TotalsClient::new(channel);
    let mut stream = client
        .watch(authorized(WatchRequest { scope: Some(scope), session, include_children }, token)?)
        .await?
        .into_inner();
    let deadline = duration.map(|d| tokio::time::Instant::now() + d);
    let mut printed = 0u64;
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, stream.message()).await {
                Ok(m) => m?,
                Err(_) => break,
            },
            None => stream.message().await?,
        };
        let Some(update) = next else { break };
        let totals = update.totals.unwrap_or_default();
        if json {
            #[derive(Serialize)]
            struct Out {
                sequence: u64,
                unix_ms: i64,
                totals: TotalsView,
                children: Vec<TotalsView>,
            }
            let o = Out {
                sequence: update.sequence,
                unix_ms: update.unix_ms,
                totals: (&totals).into(),
                children: update.children.iter().map(TotalsView::from).collect(),
            };
            serde_json::to_writer(&mut *out, &o)?;
            let _ = writeln!(out);
        } else {
            let _ = writeln!(out, "#{} {}", update.sequence, summary_line(&totals));
            if !update.children.is_empty() {
                let _ = write!(out, "{}", table(&update.children));
            }
        }
        let _ = out.flush();
        printed += 1;
        if max_updates.is_some_and(|m| printed >= m) {
            break;
        }
    }
    Ok(())
}
