//! Connecting to the aggregator: channel settings every client uses, and bearer-token metadata.

use std::time::Duration;

use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is malformed.
    #[error("invalid aggregator URL {url:?}: {source}")]
    Url {
        /// The URL.
        url: String,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// The aggregator cannot be reached.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// The token cannot be sent as metadata.
    #[error("token is not valid ASCII metadata")]
    Token,
}

/// Connect timeout (gRPC connection-backoff spec: 20 s minimum connect deadline).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// An endpoint with the keepalive policy the aggregator accepts (pings every 30 s, also when
/// idle, so a dead path is noticed; no more often, or servers answer `too_many_pings`).
pub fn endpoint(url: &str) -> Result<Endpoint, ConnectError> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|source| ConnectError::Url { url: url.to_owned(), source })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// A lazily connected channel (connects on first use, reconnects after failures).
pub fn lazy_channel(url: &str) -> Result<Channel, ConnectError> {
    Ok(endpoint(url)?.connect_lazy())
}

/// A channel connected now.
pub async fn channel(url: &str) -> Result<Channel, ConnectError> {
    endpoint(url)?.connect().await.map_err(|source| ConnectError::Connect { url: url.to_owned(), source })
}

/// A request carrying `authorization: Bearer <token>`.
pub fn authorized<T>(msg: T, token: &str) -> Result<tonic::Request<T>, ConnectError> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", bearer(token)?);
    Ok(req)
}

/// `Bearer <token>` as a metadata value.
pub fn bearer(token: &str) -> Result<MetadataValue<Ascii>, ConnectError> {
    format!("Bearer {token}").parse().map_err(|_| ConnectError::Token)
}
