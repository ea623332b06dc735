//! Limits per credential: a rate of ingest batches per site, a rate of read calls per read
//! token (`governor` keyed GCRA limiters), and a cap on concurrent watchers and SSE viewers per
//! token. What exceeds them gets RESOURCE_EXHAUSTED (HTTP 429) with a retry hint
//! (`retry-after-ms` metadata, [`RETRY_AFTER_MS_HEADER`]) and is counted in `/metrics` as
//! `headcount_quota_refused_total{kind}`. A rate of 0 turns that limit off.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use dashmap::DashMap;
use governor::{
    DefaultKeyedRateLimiter, Quota,
    clock::{Clock, DefaultClock},
};
use tonic::{Status, metadata::MetadataValue};

use crate::proto::metadata::RETRY_AFTER_MS_HEADER;

/// The limits (flags `--ingest-rate`, `--read-rate`, `--max-watchers-per-token`; see
/// `server/config.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaConfig {
    /// Batches per second one site may send (all its desks and streams together); 0: no limit.
    pub ingest_per_second: u32,
    /// Batches a site may send at once above its rate.
    pub ingest_burst: u32,
    /// Calls per second one read token may make (unary calls, watch openings, HTTP requests);
    /// 0: no limit.
    pub read_per_second: u32,
    /// Calls a read token may make at once above its rate.
    pub read_burst: u32,
    /// Concurrent gRPC watchers plus SSE viewers one token may hold open; 0: no limit.
    pub max_watchers_per_token: usize,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            ingest_per_second: 0,
            ingest_burst: 100,
            read_per_second: 0,
            read_burst: 50,
            max_watchers_per_token: 256,
        }
    }
}

fn limiter(rate: u32, burst: u32) -> Option<DefaultKeyedRateLimiter<String>> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)))
}

/// The limiters, shared by every listener.
pub struct Quotas {
    config: QuotaConfig,
    ingest: Option<DefaultKeyedRateLimiter<String>>,
    reads: Option<DefaultKeyedRateLimiter<String>>,
    watchers: Arc<DashMap<String, usize>>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas").field("config", &self.config).finish_non_exhaustive()
    }
}

/// A refusal: RESOURCE_EXHAUSTED, retry after `retry_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// What was exceeded, in words.
    pub what: String,
    /// When a retry may succeed.
    pub retry_after: Duration,
}

impl Exceeded {
    /// The gRPC status: RESOURCE_EXHAUSTED with `retry-after-ms` metadata.
    pub fn status(&self) -> Status {
        let ms = self.retry_after.as_millis().clamp(1, u128::from(u32::MAX)) as u64;
        let mut status = Status::resource_exhausted(format!("{}; retry in {ms} ms", self.what));
        status.metadata_mut().insert(RETRY_AFTER_MS_HEADER, MetadataValue::from(ms));
        status
    }
}

fn refused(kind: &'static str) {
    metrics::counter!("headcount_quota_refused_total", "kind" => kind).increment(1);
}

/// Held while a watcher or SSE viewer is open; frees its place in the token's cap when dropped.
#[derive(Debug)]
pub struct WatcherSlot {
    map: Arc<DashMap<String, usize>>,
    key: String,
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        self.map.remove_if_mut(&self.key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

impl Default for Quotas {
    fn default() -> Self {
        Self::new(QuotaConfig::default())
    }
}

impl Quotas {
    /// Limiters with these limits.
    pub fn new(config: QuotaConfig) -> Self {
        Self {
            ingest: limiter(config.ingest_per_second, config.ingest_burst),
            reads: limiter(config.read_per_second, config.read_burst),
            watchers: Arc::new(DashMap::new()),
            config,
        }
    }

    /// The limits.
    pub fn config(&self) -> &QuotaConfig {
        &self.config
    }

    fn check(limiter: Option<&DefaultKeyedRateLimiter<String>>, key: &str, kind: &'static str) -> Result<(), Exceeded> {
        let Some(l) = limiter else { return Ok(()) };
        l.check_key(&key.to_owned()).map_err(|not_until| {
            refused(kind);
            Exceeded {
                what: format!("{kind} rate limit of this credential exceeded"),
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }
        })
    }

    /// One ingest batch of `site`.
    pub fn ingest(&self, site: &str) -> Result<(), Exceeded> {
        Self::check(self.ingest.as_ref(), site, "ingest")
    }

    /// One read call with the token `token_id`.
    pub fn read(&self, token_id: &str) -> Result<(), Exceeded> {
        Self::check(self.reads.as_ref(), token_id, "read")
    }

    /// A place for one more watcher or SSE viewer of `token_id`, or RESOURCE_EXHAUSTED.
    pub fn watcher(&self, token_id: &str) -> Result<WatcherSlot, Exceeded> {
        let cap = self.config.max_watchers_per_token;
        let mut n = self.watchers.entry(token_id.to_owned()).or_insert(0);
        if cap > 0 && *n >= cap {
            drop(n);
            refused("watchers");
            return Err(Exceeded {
                what: format!("this token already holds {cap} watchers or live pages open (--max-watchers-per-token)"),
                retry_after: Duration::from_secs(5),
            });
        }
        *n += 1;
        Ok(WatcherSlot { map: self.watchers.clone(), key: token_id.to_owned() })
    }
}
