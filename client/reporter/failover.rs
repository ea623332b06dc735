//! Which aggregator the reporter uses, and when it moves to the next one.
//!
//! Rule (one address behaves exactly as before): the reporter starts on the first address. When
//! the stream there ends or fails (the node stopped, was killed, reset the stream), it moves to
//! the next address and reopens after the usual backoff delay (1 s ±20 % after a stream that
//! was resumed). When opening fails (unreachable, connect or handshake timeout, `UNAVAILABLE`),
//! it moves to the next address at once while the round has addresses not yet tried since the
//! last success, and backs off (the usual ×1.6 growth and ±20 % jitter) once every address has
//! failed: a list of dead addresses costs one attempt per address per backoff period, never a
//! tight loop. Permanent refusals stop the reporter where they happen (see
//! [`crate::client::aggregators`]).

use std::time::Duration;

use tonic::transport::Channel;

use super::backoff::Backoff;
use crate::{client::aggregators::Aggregators, proto::v1::ingest_client::IngestClient};

/// The addresses, the one in use and the failures of the current round.
pub(super) struct Targets {
    all: Aggregators,
    clients: Vec<IngestClient<Channel>>,
    current: usize,
    /// Failed openings since the last resumed stream or the last backoff.
    failed_in_round: usize,
}

impl Targets {
    pub(super) fn new(all: Aggregators) -> Self {
        let clients = all.iter().map(|a| IngestClient::new(a.channel.clone())).collect();
        Self { all, clients, current: 0, failed_in_round: 0 }
    }

    /// The client of the address in use.
    pub(super) fn client(&self) -> IngestClient<Channel> {
        self.clients[self.current].clone()
    }

    /// The URL of the address in use.
    pub(super) fn url(&self) -> &str {
        &self.all.get(self.current).url
    }

    /// A stream was opened and resumed on the address in use.
    pub(super) fn resumed(&mut self) {
        self.failed_in_round = 0;
    }

    /// The resumed stream on the address in use ended or failed: move to the next address (the
    /// caller waits the backoff's delay as after any lost stream).
    pub(super) fn lost(&mut self, site: &str, desk: u32, why: &str) {
        self.advance(site, desk, why);
    }

    /// Opening failed on the address in use: move to the next address. Returns how long to
    /// wait: nothing while this round has untried addresses, the backoff's next delay once
    /// every address has failed (always, with one address).
    pub(super) fn open_failed(&mut self, backoff: &mut Backoff, site: &str, desk: u32, why: &str) -> Duration {
        self.failed_in_round += 1;
        self.advance(site, desk, why);
        if self.failed_in_round >= self.clients.len() {
            self.failed_in_round = 0;
            backoff.next_delay()
        } else {
            Duration::ZERO
        }
    }

    fn advance(&mut self, site: &str, desk: u32, why: &str) {
        if self.clients.len() < 2 {
            return;
        }
        let from = self.current;
        self.current = (self.current + 1) % self.clients.len();
        tracing::warn!(
            site, desk, from = %self.all.get(from).url, to = %self.url(), reason = why,
            "failing over to the next aggregator"
        );
    }
}
