//! Runs the gRPC server: Ingest, Totals, health and reflection on one listener, with explicit
//! HTTP/2 limits and a graceful drain on shutdown.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use tonic::transport::server::TcpIncoming;

use super::{
    aggregator::Aggregator, auth::Auth, ingest::IngestService, totals_service::TotalsService, wire_status::ClientErrors,
};
use crate::proto::v1::{FILE_DESCRIPTOR_SET, ingest_server::IngestServer, totals_server::TotalsServer};

/// Transport limits. tonic leaves most of these unlimited or off by default; we set them all.
#[derive(Debug, Clone)]
pub struct Transport {
    /// Concurrent streams per HTTP/2 connection.
    pub max_streams_per_connection: u32,
    /// HTTP/2 receive window per stream (bytes sent to us and not yet read).
    pub stream_window: u32,
    /// HTTP/2 receive window per connection.
    pub connection_window: u32,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// Keepalive ping timeout.
    pub keepalive_timeout: Duration,
    /// Largest message.
    pub max_message_bytes: usize,
    /// Drain grace period on shutdown.
    pub grace: Duration,
    /// Stream openings (authentication + resume) handled at once; beyond it `RESOURCE_EXHAUSTED`.
    pub max_concurrent_handshakes: usize,
    /// TLS on the gRPC listeners (and the certificate reload task); None: plain text.
    pub tls: Option<super::tls::ServerTls>,
    /// Deadline of a call until its response starts (unary calls whole; a stream's opening):
    /// beyond it DEADLINE_EXCEEDED. A shorter `grpc-timeout` from the client wins.
    pub call_timeout: Duration,
}

impl Default for Transport {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 1024,
            stream_window: 32 * 1024,
            connection_window: 1024 * 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_message_bytes: super::limits::DEFAULT_MAX_MESSAGE,
            grace: Duration::from_secs(10),
            max_concurrent_handshakes: 512,
            tls: None,
            call_timeout: Duration::from_secs(30),
        }
    }
}

/// Why serving stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection descriptor could not be loaded.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS configuration is unusable.
    #[error("TLS: {0}")]
    Tls(#[from] super::tls::TlsError),
    /// The listener's address cannot be read.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves until `shutdown` resolves, then drains for at most `transport.grace`.
pub async fn serve(
    listener: TcpListener,
    agg: Aggregator,
    auth: Auth,
    transport: Transport,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<IngestServer<IngestService>>().await;
    health.set_serving::<TotalsServer<TotalsService>>().await;
    let reflection = reflection()?;
    let max = transport.max_message_bytes;
    let ingest = ClientErrors(
        IngestServer::new(IngestService::new(agg.clone(), auth.clone(), transport.max_concurrent_handshakes))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    let totals = totals_server(&agg, auth, &transport);

    let background = agg.spawn_background();
    let (draining_tx, draining_rx) = oneshot::channel::<()>();
    let stopper = agg.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: refusing new streams, ending open ones");
        health.set_not_serving::<IngestServer<IngestService>>().await;
        stopper.shutdown();
        let _ = draining_tx.send(());
    };
    let router =
        builder(&transport).add_service(health_service).add_service(reflection).add_service(ingest).add_service(totals);
    let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match &transport.tls {
            None => Box::pin(router.serve_with_incoming_shutdown(incoming(listener), signal)),
            Some(tls) => {
                // One reload task for every listener: they share the certificate store.
                super::tls::reload::spawn(tls.store().clone(), tls.settings().poll, agg.shared().shutdown.clone());
                let tls_incoming = tls_incoming(listener, tls, &agg)?;
                Box::pin(router.serve_with_incoming_shutdown(tls_incoming, signal))
            }
        };
    let grace = transport.grace;
    let deadline = async move {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        r = server => r.map_err(ServeError::from),
        () = deadline => {
            tracing::warn!(grace = ?grace, "grace period over; closing remaining connections");
            Ok(())
        }
    };
    agg.shutdown();
    background.abort();
    // Final flush and snapshot (a no-op in memory).
    let closing = agg.clone();
    if tokio::task::spawn_blocking(move || closing.close()).await.is_err() {
        tracing::error!("final flush panicked");
    }
    result
}

/// The reflection service over our contract and the health contract.
fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    ServeError,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?)
}

fn totals_server(agg: &Aggregator, auth: Auth, transport: &Transport) -> ClientErrors<TotalsServer<TotalsService>> {
    ClientErrors(
        TotalsServer::new(TotalsService::new(agg.clone(), auth))
            // A national breakdown of all communes can be large; answers are bounded by the registry.
            .max_encoding_message_size(64 * 1024 * 1024)
            .max_decoding_message_size(super::limits::MAX_TOTALS_REQUEST.min(transport.max_message_bytes)),
    )
}

/// The HTTP/2 limits every listener gets (tonic leaves most of them unlimited or off).
fn builder(transport: &Transport) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .timeout(transport.call_timeout)
        .tcp_nodelay(true)
        .max_concurrent_streams(transport.max_streams_per_connection)
        .http2_keepalive_interval(Some(transport.keepalive_interval))
        .http2_keepalive_timeout(Some(transport.keepalive_timeout))
        .http2_max_pending_accept_reset_streams(Some(100))
        .http2_max_local_error_reset_streams(Some(1024))
        .initial_stream_window_size(Some(transport.stream_window))
        .initial_connection_window_size(Some(transport.connection_window))
}

/// Accepted sockets with `TCP_NODELAY` and TCP keepalive. With our own listener tonic's
/// `tcp_nodelay` does not apply, and small acks would wait ~40 ms for Nagle.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(Duration::from_secs(60)))
}

/// TLS connections (ALPN `h2`) over [`incoming`]'s sockets, handshaken off the accept loop.
fn tls_incoming(
    listener: TcpListener,
    tls: &super::tls::ServerTls,
    agg: &Aggregator,
) -> Result<impl tokio_stream::Stream<Item = std::io::Result<super::tls::accept::TlsConn>> + Send + 'static, ServeError>
{
    let local = listener.local_addr()?;
    let acceptor = tls.acceptor(super::tls::ALPN_GRPC)?;
    Ok(super::tls::accept::Handshakes::start(incoming(listener), local, acceptor, agg.shared().shutdown.clone())
        .into_stream())
}

/// Serves the read side (Totals, health, reflection) on a second listener from a dedicated thread
/// with its own runtime, so dashboard queries never wait in the run queue behind thousands of
/// busy ingest streams. Ends when the aggregator shuts down.
pub fn spawn_read_server(
    listener: std::net::TcpListener,
    agg: Aggregator,
    auth: Auth,
    transport: Transport,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("headcount-reads".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the read runtime");
                return;
            }
        };
        runtime.block_on(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot use the read listener");
                    return;
                }
            };
            let (health, health_service) = tonic_health::server::health_reporter();
            health.set_serving::<TotalsServer<TotalsService>>().await;
            let reflection = match reflection() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "reflection");
                    return;
                }
            };
            let shutdown = agg.shared().shutdown.clone();
            let router = builder(&transport)
                .add_service(health_service)
                .add_service(reflection)
                .add_service(totals_server(&agg, auth, &transport));
            let stopped = async move { shutdown.cancelled().await };
            let result = match &transport.tls {
                None => router.serve_with_incoming_shutdown(incoming(listener), stopped).await,
                Some(tls) => match tls_incoming(listener, tls, &agg) {
                    Ok(tls_incoming) => router.serve_with_incoming_shutdown(tls_incoming, stopped).await,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start TLS on the read listener");
                        return;
                    }
                },
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "read listener failed");
            }
        });
    })
}

/// A server running in this process (tests, the simulation, benchmarks).
pub struct RunningServer {
    /// Bound address.
    pub addr: SocketAddr,
    /// The aggregator behind it.
    pub aggregator: Aggregator,
    tls: bool,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// Binds `addr` (use port 0 for an ephemeral port) and serves in a background task.
    pub async fn start(addr: SocketAddr, agg: Aggregator, auth: Auth, transport: Transport) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let tls = transport.tls.is_some();
        let (stop, stopped) = oneshot::channel::<()>();
        let aggregator = agg.clone();
        let join = tokio::spawn(serve(listener, agg, auth, transport, async move {
            let _ = stopped.await;
        }));
        Ok(Self { addr, aggregator, tls, stop: Some(stop), join })
    }

    /// `http://addr` for clients (`https://` with TLS; connect by address with the test CA).
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// Shuts down gracefully and waits; re-raises a panic of the server task.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.join).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
