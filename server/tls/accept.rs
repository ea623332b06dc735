//! Accepting TLS connections: the accept loop only accepts TCP; each handshake runs in its own
//! task (bounded in number and time), so a slow or hostile client never holds up the others.
//! Finished connections feed tonic (`serve_with_incoming_shutdown`) or axum (`serve`).

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::TcpStream,
    sync::{Semaphore, mpsc},
};
use tokio_rustls::TlsAcceptor;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;

/// A TLS connection over TCP; tonic reads its peer certificates (`Request::peer_certs`).
pub type TlsConn = tokio_rustls::server::TlsStream<TcpStream>;

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once on one listener; further accepted sockets wait.
pub const MAX_HANDSHAKES: usize = 1024;
/// Established connections waiting for the server to take them.
const QUEUE: usize = 256;

/// TLS connections handshaken from `tcp` (already accepted sockets, with their TCP options set),
/// until `stop` is cancelled or the receiving side is dropped.
pub struct Handshakes {
    rx: mpsc::Receiver<(TlsConn, SocketAddr)>,
    local: SocketAddr,
}

impl Handshakes {
    /// Starts the accept task (call inside a tokio runtime). `local` is the listener's address.
    pub fn start<S>(tcp: S, local: SocketAddr, acceptor: TlsAcceptor, stop: CancellationToken) -> Self
    where
        S: Stream<Item = io::Result<TcpStream>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(accept_loop(Box::pin(tcp), local, acceptor, stop, tx));
        Self { rx, local }
    }

    /// As tonic's `serve_with_incoming` wants it.
    pub fn into_stream(self) -> impl Stream<Item = io::Result<TlsConn>> + Send + 'static {
        ReceiverStream::new(self.rx).map(|(conn, _)| Ok(conn))
    }
}

async fn accept_loop(
    mut tcp: std::pin::Pin<Box<dyn Stream<Item = io::Result<TcpStream>> + Send>>,
    local: SocketAddr,
    acceptor: TlsAcceptor,
    stop: CancellationToken,
    tx: mpsc::Sender<(TlsConn, SocketAddr)>,
) {
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => break,
            () = tx.closed() => break,
            next = tcp.next() => next,
        };
        let socket = match next {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                // Out of file descriptors and the like: pause briefly instead of spinning.
                tracing::warn!(%local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let peer = socket.peer_addr().unwrap_or(local);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                Ok(Ok(conn)) => {
                    metrics::counter!("headcount_tls_handshakes_total", "result" => "ok").increment(1);
                    let _ = tx.send((conn, peer)).await;
                }
                Ok(Err(e)) => {
                    metrics::counter!("headcount_tls_handshakes_total", "result" => "failed").increment(1);
                    // Debug: on the public internet scanners fail handshakes all day; the counter shows it.
                    tracing::debug!(%peer, %local, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!("headcount_tls_handshakes_total", "result" => "timeout").increment(1);
                    tracing::debug!(%peer, %local, "TLS handshake timed out");
                }
            }
        });
    }
}

impl axum::serve::Listener for Handshakes {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop stopped (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
