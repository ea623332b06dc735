//! `headcount watch`: follows a scope live and survives aggregator restarts. When the stream
//! ends or fails it says so and reconnects with the reporters' backoff (1 s, ×1.6, ±20 %, at
//! most 120 s); refusals that retrying cannot fix (token, scope) end it with an error. On a
//! terminal each update redraws the previous one in place; piped, updates are appended as lines
//! (or JSON lines) and connection notes go to the notes writer (standard error).
//!
//! Given several aggregator addresses ([`run_with`]), it watches on one and moves to the next
//! when the stream cannot be opened or ends: after a stream that was open, with the backoff as
//! above; after a failed opening, at once while the round has addresses not yet tried, and with
//! the backoff once every address has failed.

use std::{io::Write, time::Duration};

use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::{
    aggregators::{Aggregators, permanent},
    connect::authorized,
    dashboard::{DashboardError, TotalsView, summary_line, table},
    reporter::backoff::{Backoff, BackoffConfig},
};
use crate::proto::v1::{Scope, WatchRequest, WatchUpdate, totals_client::TotalsClient};

/// What to watch and how to show it.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// The scope.
    pub scope: Scope,
    /// A session, or all.
    pub session: Option<u32>,
    /// Include the children's table.
    pub include_children: bool,
    /// JSON lines instead of text.
    pub json: bool,
    /// Stop after this many updates (across reconnects).
    pub max_updates: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Redraw in place (standard output is a terminal) instead of appending.
    pub redraw: bool,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
}

/// Watches until `max_updates` or `duration` (forever if neither), reconnecting as needed.
/// Errors: a permanent refusal (`UNAUTHENTICATED`, `PERMISSION_DENIED`, `NOT_FOUND`,
/// `INVALID_ARGUMENT`) or a failed write.
pub async fn run(
    channel: Channel,
    token: &str,
    opts: &WatchOptions,
    out: &mut impl Write,
    notes: &mut impl Write,
) -> Result<(), DashboardError> {
    run_with(&Aggregators::single(channel), token, opts, out, notes).await
}

/// [`run`] over several aggregator addresses, starting on the first (see the module docs). A
/// permanent refusal ends it on the address that gave it; it does not move on.
pub async fn run_with(
    aggregators: &Aggregators,
    token: &str,
    opts: &WatchOptions,
    out: &mut impl Write,
    notes: &mut impl Write,
) -> Result<(), DashboardError> {
    let clients: Vec<_> = aggregators.iter().map(|a| TotalsClient::new(a.channel.clone())).collect();
    let (mut current, mut failed_in_round) = (0usize, 0usize);
    let deadline = opts.duration.map(|d| Instant::now() + d);
    let mut backoff = Backoff::new(opts.backoff);
    let mut printed = 0u64;
    let mut drawn_lines = 0usize;
    let mut lost: Option<String> = None;
    loop {
        let req = authorized(
            WatchRequest {
                scope: Some(opts.scope.clone()),
                session: opts.session,
                include_children: opts.include_children,
            },
            token,
        )?;
        let mut client = clients[current].clone();
        let opened = match deadline {
            Some(d) => match tokio::time::timeout_at(d, client.watch(req)).await {
                Ok(r) => r,
                Err(_) => return Ok(()),
            },
            None => client.watch(req).await,
        };
        let url = &aggregators.get(current).url;
        let mut why = match opened {
            Ok(resp) => {
                failed_in_round = 0;
                if lost.take().is_some() {
                    let to = if clients.len() > 1 { url.as_str() } else { "the aggregator" };
                    let _ = writeln!(notes, "watch: reconnected to {to}");
                    drawn_lines = 0;
                }
                let mut stream = resp.into_inner();
                loop {
                    let next = match deadline {
                        Some(d) => match tokio::time::timeout_at(d, stream.message()).await {
                            Ok(m) => m,
                            Err(_) => return Ok(()),
                        },
                        None => stream.message().await,
                    };
                    match next {
                        Ok(Some(update)) => {
                            backoff.reset();
                            drawn_lines = show(out, opts, &update, drawn_lines)?;
                            printed += 1;
                            if opts.max_updates.is_some_and(|m| printed >= m) {
                                return Ok(());
                            }
                        }
                        Ok(None) => break "the aggregator ended the stream".to_owned(),
                        Err(s) if permanent(s.code()) => return Err(s.into()),
                        Err(s) => break format!("{:?}: {}", s.code(), s.message()),
                    }
                }
            }
            Err(s) if permanent(s.code()) => return Err(s.into()),
            Err(s) => {
                failed_in_round += 1;
                format!("{:?}: {}", s.code(), s.message())
            }
        };
        let mut next = String::new();
        let delay = if clients.len() > 1 {
            let from = current;
            current = (current + 1) % clients.len();
            let to = &aggregators.get(current).url;
            tracing::warn!(from = %aggregators.get(from).url, to = %to, reason = %why, "watch: next aggregator");
            next = format!(" to {to}");
            why = format!("{}: {why}", aggregators.get(from).url);
            // After a stream that was open, the backoff as with one address (no tight loop over
            // nodes that accept and then end streams).
            if failed_in_round == 0 || failed_in_round >= clients.len() {
                failed_in_round = 0;
                backoff.next_delay()
            } else {
                std::time::Duration::ZERO
            }
        } else {
            backoff.next_delay()
        };
        let _ = writeln!(notes, "watch: connection lost ({why}); reconnecting{next} in {:.1} s", delay.as_secs_f64());
        let _ = notes.flush();
        lost = Some(why);
        let wake = Instant::now() + delay;
        if deadline.is_some_and(|d| d <= wake) {
            return Ok(());
        }
        tokio::time::sleep_until(wake).await;
    }
}

/// Prints one update; returns how many lines it drew (for the next redraw).
fn show(
    out: &mut impl Write,
    opts: &WatchOptions,
    update: &WatchUpdate,
    drawn: usize,
) -> Result<usize, DashboardError> {
    let totals = update.totals.clone().unwrap_or_default();
    if opts.json {
        #[derive(Serialize)]
        struct Line {
            sequence: u64,
            unix_ms: i64,
            totals: TotalsView,
            children: Vec<TotalsView>,
        }
        let line = Line {
            sequence: update.sequence,
            unix_ms: update.unix_ms,
            totals: (&totals).into(),
            children: update.children.iter().map(TotalsView::from).collect(),
        };
        serde_json::to_writer(&mut *out, &line)?;
        let _ = writeln!(out);
        let _ = out.flush();
        return Ok(0);
    }
    let mut text = format!("#{} {}\n", update.sequence, summary_line(&totals));
    if !update.children.is_empty() {
        text.push_str(&table(&update.children));
    }
    if opts.redraw && drawn > 0 {
        // Back to the first line of the previous update, and clear from there down.
        let _ = write!(out, "\x1b[{drawn}F\x1b[J");
    }
    let _ = write!(out, "{text}");
    let _ = out.flush();
    Ok(text.lines().count())
}
