//! The aggregator's HTTP side: the live dashboard page, a JSON mirror of the Totals calls, CSV
//! exports, Server-Sent Events and Prometheus `/metrics`, served from its own thread and runtime
//! (like `--read-listen`) so pages and scrapes never queue behind ingest.
//!
//! [`access`] decides who may read what (token cookie or bearer, public lobby figures); [`api`]
//! answers JSON; [`export`] writes CSV; [`live`] publishes one serialised frame per tick to every
//! viewer; [`metrics`] renders the exposition; [`assets`] serves the embedded page.

pub mod access;
pub mod api;
pub mod assets;
pub mod error;
pub mod export;
pub mod listener;
pub mod live;
pub mod metrics;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    routing::{get, post},
};

use super::{aggregator::Aggregator, auth::Auth};

/// Settings of the HTTP side.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// National and province figures (totals, province table, curves, the live feed) readable
    /// without a token, for a lobby screen. Communes, sites, silent sites, corrections, exports
    /// and metrics still need one.
    pub public: bool,
    /// IANA time zone the page shows times in (the event's, e.g. `Asia/Ho_Chi_Minh`).
    pub time_zone: String,
    /// TLS (ALPN `h2` and `http/1.1`); None: plain HTTP.
    pub tls: Option<super::tls::ServerTls>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { public: false, time_zone: "Asia/Ho_Chi_Minh".to_owned(), tls: None }
    }
}

/// What every handler shares: a cheap `Clone`.
#[derive(Clone)]
pub struct HttpState {
    /// The aggregator read from.
    pub agg: Aggregator,
    /// Token checks.
    pub auth: Auth,
    /// Settings.
    pub config: Arc<HttpConfig>,
    /// The live feed every SSE viewer shares.
    pub live: live::Live,
}

/// The whole HTTP application. Call from inside a tokio runtime: it starts the live publisher
/// (one task, ends with the aggregator).
pub fn router(agg: Aggregator, auth: Auth, config: HttpConfig) -> Router {
    app(state(agg, auth, config))
}

/// The shared state; starts the live publisher and installs the metrics recorder.
fn state(agg: Aggregator, auth: Auth, config: HttpConfig) -> HttpState {
    // Before anything is recorded: the `metrics` macros are no-ops until a recorder exists.
    metrics::install();
    let live = live::Live::start(&agg);
    HttpState { agg, auth, config: Arc::new(config), live }
}

fn app(state: HttpState) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{file}", get(assets::file))
        .route("/login", get(access::login_page).post(access::login))
        .route("/logout", post(access::logout))
        .route("/api/meta", get(api::meta))
        .route("/api/totals", get(api::totals))
        .route("/api/breakdown", get(api::breakdown))
        .route("/api/silent", get(api::silent))
        .route("/api/curve", get(api::curve))
        .route("/api/corrections", get(api::corrections))
        .route("/api/stats", get(api::stats))
        .route("/api/live", get(live::events))
        .route("/export/totals.csv", get(export::totals))
        .route("/export/sites.csv", get(export::sites))
        .route("/export/silent.csv", get(export::silent))
        .route("/export/corrections.csv", get(export::corrections))
        .route("/metrics", get(metrics::render))
        .with_state(state)
}

/// Sets `TCP_NODELAY` on an accepted socket (small SSE frames are not held back by Nagle).
fn nodelay(s: tokio::net::TcpStream) -> std::io::Result<tokio::net::TcpStream> {
    s.set_nodelay(true)?;
    Ok(s)
}

/// Serves the HTTP side on `listener` from a dedicated thread with its own runtime until the
/// aggregator shuts down. Returns the bound address and the thread.
pub fn spawn(
    listener: std::net::TcpListener,
    agg: Aggregator,
    auth: Auth,
    config: HttpConfig,
) -> std::io::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let thread = std::thread::Builder::new().name("headcount-http".into()).spawn(move || {
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot use the HTTP listener");
                    return;
                }
            };
            let shutdown = agg.shared().shutdown.clone();
            let incoming = match config.tls.clone() {
                None => listener::Incoming::Plain(listener),
                Some(tls) => match tls.acceptor(super::tls::ALPN_HTTP) {
                    Ok(acceptor) => {
                        let tcp = tokio_stream::wrappers::TcpListenerStream::new(listener);
                        listener::Incoming::Tls(super::tls::accept::Handshakes::start(
                            tokio_stream::StreamExt::map(tcp, |s| s.and_then(nodelay)),
                            addr,
                            acceptor,
                            shutdown.clone(),
                        ))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot set up TLS on the HTTP listener");
                        return;
                    }
                },
            };
            let state = state(agg, auth, config);
            listener::serve(incoming, app(state.clone()), state, shutdown).await;
        });
    })?;
    Ok((addr, thread))
}
