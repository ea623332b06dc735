//! The agent's local desk endpoint (axum), for desk apps, phones on the site's LAN and the
//! built-in desk page. Bound to loopback unless `--http` names another address.
//!
//! - `GET /` — the desk page (HTML + JS embedded in the binary, no CDN): a field that takes a
//!   keyboard-wedge scanner's input (it types the badge and Enter) and shows a large green
//!   "counted" or amber "already checked in" with the count, red when refused.
//! - `POST /badge` — the request body is one badge (raw bytes, as a scanner sends them; same rules
//!   as a line of input). Answer: JSON [`Answer`](crate::client::site::Answer): `outcome`
//!   (`counted`, `already_checked_in`, `refused`, `blank`), `badge`, `session`, `session_name`,
//!   `count` (this agent's count for the session) and `message`. HTTP 200 for every outcome;
//!   413 above 4 KiB.
//! - `GET /status` — JSON: connected, the agent's register slot, agents on the site, and per
//!   session its name, count here and count the aggregator acknowledged.

use std::{future::Future, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    response::Html,
    routing::{get, post},
};
use serde::Serialize;

use super::site::{Agent, Answer, Mode, describe};

/// The desk page.
const PAGE: &str = include_str!("page.html");

/// Largest request body, bytes (a badge is at most 256 bytes).
const MAX_BODY: usize = 4096;

/// One session in `GET /status`.
#[derive(Debug, Serialize)]
pub struct SessionStatus {
    /// Session id.
    pub id: u32,
    /// Name (`N "name"`).
    pub name: String,
    /// This agent's count.
    pub count: i64,
    /// The count the aggregator acknowledged for this agent.
    pub acknowledged: i64,
}

/// `GET /status`.
#[derive(Debug, Serialize)]
pub struct DeskStatus {
    /// A stream to the aggregator is open.
    pub connected: bool,
    /// The URL of the aggregator of the current (or last) stream; empty before the first.
    pub aggregator: String,
    /// This agent's register slot at the aggregator (0: not known yet).
    pub agent_slot: u32,
    /// Agent installs reporting for this site, this one included.
    pub site_agents: u32,
    /// The session check-ins go to now, if one.
    pub current_session: Option<u32>,
    /// Sessions with counts.
    pub sessions: Vec<SessionStatus>,
    /// The aggregator refused this agent for good (what to fix), if so.
    pub fatal: Option<String>,
}

/// The router over `agent`.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/badge", post(badge))
        .route("/status", get(status))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

async fn badge(State(agent): State<Arc<Agent>>, body: Bytes) -> Json<Answer> {
    let answer = agent.line(&body, Mode::Badge, "desk page").await;
    let text = describe(&answer, "desk page");
    if !text.is_empty() {
        println!("{text}");
    }
    Json(answer)
}

async fn status(State(agent): State<Arc<Agent>>) -> Json<DeskStatus> {
    let st = agent.reporter().status();
    let mut ids: Vec<u32> = st.schedule.iter().map(|s| s.id).collect();
    ids.extend(st.local.keys().filter(|s| !st.schedule.iter().any(|x| x.id == **s)));
    let sessions = ids
        .into_iter()
        .map(|id| SessionStatus {
            id,
            name: st.session_name(id),
            count: st.local.get(&id).map_or(0, |(_, c)| *c),
            acknowledged: st.acked.get(&id).map_or(0, |(_, c)| *c),
        })
        .collect();
    Json(DeskStatus {
        connected: st.connected,
        aggregator: st.aggregator.clone(),
        agent_slot: st.agent_slot,
        site_agents: st.site_agents,
        current_session: agent.session_now().ok(),
        sessions,
        fatal: st.fatal.clone(),
    })
}

/// Serves the desk endpoint on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(agent)).with_graceful_shutdown(shutdown).await
}
