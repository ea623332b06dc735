//! The live feed: one publisher task per HTTP side reads the rollups on the same coalesced
//! publish tick as gRPC `Watch`, serialises each changed topic ONCE into a complete SSE frame,
//! and hands that frame (a shared `Bytes`) to every viewer through a `tokio::sync::watch`
//! channel. A viewer costs a channel receiver and its connection; no per-viewer task, timer or
//! serialisation. A slow viewer only skips frames (it always gets the latest).
//!
//! Topics: a session (or all sessions) × with or without the province table. A frame:
//! `{"seq", "unix_ms", "session", "national": {totals}, "provinces": [[count, registered,
//! sites_reporting, sites_total, sites_over_capacity], …]}` with provinces in registry order
//! (the order of `/api/breakdown?order=id`).

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_stream::{StreamExt, wrappers::WatchStream};

use super::{HttpState, access, api::TotalsJson, error::HttpError};
use crate::server::{
    Aggregator,
    aggregator::now_ms,
    tally::{Level, Node},
};

/// An unchanged topic is re-sent this often, so proxies and browsers see a live connection.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// A complete SSE frame; `None` once the aggregator shuts down (every viewer's stream then ends).
pub type Frame = Option<Bytes>;

/// The shared live feed. Cheap `Clone`.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

struct Inner {
    /// `topics[slot * 2 + provinces]`, slot 0 = all sessions, k + 1 = session index k.
    topics: Vec<watch::Sender<Frame>>,
    /// Open SSE connections.
    viewers: AtomicU64,
    /// Frames serialised since start (one per changed topic per tick, whatever the viewers).
    frames: AtomicU64,
}

impl Live {
    /// Computes the first frames and starts the publisher task (ends with the aggregator).
    pub fn start(agg: &Aggregator) -> Self {
        let slots = agg.registry().sessions.len() + 1;
        let mut publisher = Publisher { agg: agg.clone(), last: vec![Vec::new(); slots * 2], seq: 0 };
        let topics = (0..slots * 2).map(|t| watch::Sender::new(Some(publisher.frame(t)))).collect();
        let live = Self { inner: Arc::new(Inner { topics, viewers: AtomicU64::new(0), frames: AtomicU64::new(0) }) };
        tokio::spawn(publisher.run(live.clone()));
        live
    }

    /// Open SSE connections now.
    pub fn viewers(&self) -> u64 {
        self.inner.viewers.load(Relaxed)
    }

    /// Frames serialised since start.
    pub fn frames(&self) -> u64 {
        self.inner.frames.load(Relaxed)
    }

    /// The topic of `session` (`all`, absent, or an id) with or without the province table:
    /// 400 if malformed, 404 if no such session.
    pub fn topic(agg: &Aggregator, session: Option<String>, provinces: bool) -> Result<usize, HttpError> {
        let session = super::api::Params { session, ..Default::default() }.session()?;
        let slot = match agg.session_index(session)? {
            Some(k) => k + 1,
            None => 0,
        };
        Ok(slot * 2 + usize::from(provinces))
    }

    /// A new viewer of `topic`: its receiver (the current frame is unseen, so it comes first) and
    /// the guard that counts it while it lives.
    pub fn subscribe(&self, topic: usize) -> (watch::Receiver<Frame>, Viewer) {
        self.inner.viewers.fetch_add(1, Relaxed);
        let mut rx = self.inner.topics[topic].subscribe();
        rx.mark_changed();
        (rx, Viewer(self.inner.clone()))
    }
}

struct Publisher {
    agg: Aggregator,
    /// Per topic, the numbers of the last frame sent (to skip unchanged ticks).
    last: Vec<Vec<i64>>,
    seq: u64,
}

impl Publisher {
    fn session(t: usize) -> Option<usize> {
        (t / 2).checked_sub(1)
    }

    /// The numbers a topic's frame shows; equal numbers mean nothing to send.
    fn numbers(&self, t: usize) -> Vec<i64> {
        let tallies = &self.agg.shared().tallies;
        let provinces = if t % 2 == 1 { self.agg.registry().provinces.len() as u32 } else { 0 };
        let nodes =
            std::iter::once(Node::NATIONAL).chain((0..provinces).map(|index| Node { level: Level::Province, index }));
        nodes
            .flat_map(|n| {
                let r = tallies.read(n, Self::session(t));
                [r.count, i64::from(r.reporting), i64::from(r.over_capacity), r.changed_ms]
            })
            .collect()
    }

    fn frame(&mut self, t: usize) -> Bytes {
        self.seq += 1;
        self.last[t] = self.numbers(t);
        let session = Self::session(t);
        let national = TotalsJson::from(&self.agg.totals_of(Node::NATIONAL, session));
        let provinces: Vec<[i64; 5]> = if t % 2 == 1 {
            (0..self.agg.registry().provinces.len() as u32)
                .map(|index| {
                    let p = self.agg.totals_of(Node { level: Level::Province, index }, session);
                    [
                        p.count,
                        p.registered,
                        i64::from(p.sites_reporting),
                        i64::from(p.sites_total),
                        i64::from(p.sites_over_capacity),
                    ]
                })
                .collect()
        } else {
            Vec::new()
        };
        let json = serde_json::json!({
            "seq": self.seq, "unix_ms": now_ms(), "session": national.session,
            "national": national, "provinces": provinces,
        });
        Bytes::from(format!("retry: 1000\nid: {}\nevent: totals\ndata: {json}\n\n", self.seq))
    }

    async fn run(mut self, live: Live) {
        let shutdown = self.agg.shared().shutdown.clone();
        let mut interval = tokio::time::interval(self.agg.shared().config.publish_tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_sent = vec![tokio::time::Instant::now(); live.inner.topics.len()];
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = shutdown.cancelled() => break,
            }
            for (t, tx) in live.inner.topics.iter().enumerate() {
                // Kept fresh even without viewers (a few dozen reads per tick, a serialisation
                // only on change): a new viewer's first frame is the current snapshot.
                if self.numbers(t) == self.last[t] && last_sent[t].elapsed() < KEEPALIVE {
                    continue;
                }
                let frame = self.frame(t);
                live.inner.frames.fetch_add(1, Relaxed);
                tx.send_replace(Some(frame));
                last_sent[t] = tokio::time::Instant::now();
            }
        }
        for tx in &live.inner.topics {
            tx.send_replace(None);
        }
    }
}

/// Query of `/api/live`.
#[derive(Debug, Deserialize)]
pub struct LiveParams {
    /// Session id, or `all` / absent for all sessions.
    pub session: Option<String>,
    /// Include the province table (default true; `false` for a national-only screen).
    pub provinces: Option<bool>,
}

/// Counts a viewer for as long as it lives.
pub struct Viewer(Arc<Inner>);

impl Drop for Viewer {
    fn drop(&mut self) {
        self.0.viewers.fetch_sub(1, Relaxed);
    }
}

/// `GET /api/live?session=&provinces=`: Server-Sent Events, event `totals`, one frame at once
/// (the snapshot) and then one per publish tick in which the figures changed. Public in lobby
/// mode (it carries national and province figures only).
pub async fn events(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(p): Query<LiveParams>,
) -> Result<Response, HttpError> {
    // The frames carry national and every province's figures: not for a province token.
    access::national_only(access::check(&st, &headers, true)?)?;
    let viewer_slot = access::viewer_slot(&st, &headers)?;
    let topic = Live::topic(&st.agg, p.session, p.provinces.unwrap_or(true))?;
    let (rx, viewer) = st.live.subscribe(topic);
    let frames = WatchStream::from_changes(rx).take_while(Option::is_some).map(move |f| {
        let _counted = (&viewer, &viewer_slot);
        Ok::<Bytes, Infallible>(f.unwrap_or_default())
    });
    let mut r = Body::from_stream(frames).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}
