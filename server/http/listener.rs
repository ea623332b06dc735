//! The HTTP side's accept loop. A connection whose first request is `GET /api/live` (a wall
//! screen's live feed) is served by hand: the response head, then each shared frame as it is
//! published, holding only the socket, a channel receiver and a small task (no HTTP parser or
//! 8 KiB read buffer per viewer, which is what dominates an idle SSE connection in hyper).
//! Every other connection goes to the axum router through hyper, with the bytes already read
//! replayed first.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    extract::Query,
    http::{HeaderMap, HeaderName, HeaderValue, Uri},
    response::IntoResponse,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

use super::{
    HttpState, access,
    error::HttpError,
    live::{Live, LiveParams},
};

/// Largest request head read before deciding who serves the connection.
const MAX_HEAD: usize = 8 * 1024;
/// How long a new connection may take to send its first request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(2);

/// Where connections come from: plain TCP, or TLS connections already handshaken (see
/// `server/tls/accept.rs`).
pub enum Incoming {
    /// Plain-text HTTP.
    Plain(TcpListener),
    /// HTTPS.
    Tls(crate::server::tls::accept::Handshakes),
}

/// Accepts until `shutdown`, then gives open connections [`DRAIN`] to finish.
pub async fn serve(mut incoming: Incoming, app: Router, state: HttpState, shutdown: CancellationToken) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (app, state, stop, open) = (app.clone(), state.clone(), shutdown.clone(), open.clone());
        match &mut incoming {
            Incoming::Plain(listener) => {
                let sock = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((sock, _)) => sock,
                        Err(e) => {
                            // Out of descriptors or a reset before accept: keep serving the others.
                            tracing::warn!(error = %e, "HTTP accept failed");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                    () = shutdown.cancelled() => break,
                };
                let _ = sock.set_nodelay(true);
                open.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    connection(sock, app, state, stop).await;
                    open.fetch_sub(1, Relaxed);
                });
            }
            Incoming::Tls(handshakes) => {
                let (sock, _) = tokio::select! {
                    c = axum::serve::Listener::accept(handshakes) => c,
                    () = shutdown.cancelled() => break,
                };
                open.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    connection(sock, app, state, stop).await;
                    open.fetch_sub(1, Relaxed);
                });
            }
        }
    }
    drop(incoming);
    let deadline = tokio::time::Instant::now() + DRAIN;
    while open.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn connection<S>(mut sock: S, app: Router, state: HttpState, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(HEAD_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok(true)
    })
    .await;
    if !matches!(read, Ok(Ok(true))) {
        return;
    }
    if head.starts_with(b"GET /api/live") {
        live(sock, head, state, shutdown).await;
        return;
    }
    let io = TokioIo::new(Replay { prefix: head, pos: 0, inner: sock });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn).await;
        }
    }
}

/// What the head of a live request asks for: the topic and the viewer's slot under its token's
/// watcher cap, or the error answer (the same checks as the router's `/api/live`).
fn parse_live(
    head: &[u8],
    state: &HttpState,
) -> Result<(usize, Option<crate::server::quotas::WatcherSlot>), HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    let bad = || HttpError::bad_request("malformed request");
    req.parse(head).map_err(|_| bad())?;
    let uri: Uri = req.path.ok_or_else(bad)?.parse().map_err(|_| bad())?;
    if uri.path() != "/api/live" {
        return Err(HttpError { status: axum::http::StatusCode::NOT_FOUND, message: "no such page".into() });
    }
    let mut map = HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value)) {
            map.append(name, value);
        }
    }
    // The frames carry national and every province's figures: not for a province token.
    access::national_only(access::check(state, &map, true)?)?;
    let slot = access::viewer_slot(state, &map)?;
    let Query(p) = Query::<LiveParams>::try_from_uri(&uri).map_err(|e| HttpError::bad_request(e.body_text()))?;
    Ok((Live::topic(&state.agg, p.session, p.provinces.unwrap_or(true))?, slot))
}

/// Serves one live viewer by hand until it goes away or the aggregator shuts down.
async fn live<S>(mut sock: S, head: Vec<u8>, state: HttpState, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let topic = parse_live(&head, &state);
    drop(head);
    let (topic, _slot) = match topic {
        Ok(t) => t,
        Err(e) => {
            let status = e.status;
            let body = axum::body::to_bytes(e.into_response().into_body(), 64 * 1024).await.unwrap_or_default();
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(answer.as_bytes()).await;
            let _ = sock.write_all(&body).await;
            return;
        }
    };
    let (mut rx, _viewer) = state.live.subscribe(topic);
    drop(state);
    let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
                  x-accel-buffering: no\r\nconnection: close\r\n\r\n";
    if sock.write_all(answer.as_bytes()).await.is_err() || sock.flush().await.is_err() {
        return;
    }
    let (mut reader, mut writer) = tokio::io::split(sock);
    let mut probe = [0u8; 16];
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let frame = rx.borrow_and_update().clone();
                let Some(frame) = frame else { return };
                // Flushed: TLS buffers what it writes until flushed.
                if writer.write_all(&frame).await.is_err() || writer.flush().await.is_err() {
                    return;
                }
            }
            // The viewer sends nothing after its request: anything read (or the end) means it
            // closed or is misbehaving; either way this connection is done.
            _ = reader.read(&mut probe) => return,
            () = shutdown.cancelled() => return,
        }
    }
}

/// A socket whose first bytes (already read to route the connection) are replayed to hyper.
struct Replay<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
