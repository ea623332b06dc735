//! Connecting to the aggregator: channel settings every client uses, the transport-security rule
//! and bearer-token metadata.
//!
//! Clients never downgrade silently: `https://` is TLS, verified with the system roots or the CA
//! given with `--ca`; `http://` is allowed to a loopback address only (127.0.0.0/8, ::1,
//! `localhost`), or anywhere when the operator says `--insecure`. The check runs before anything
//! is sent, and the error names the address.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
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
    /// The aggregator cannot be reached (or its certificate is not trusted).
    #[error("cannot connect to {url}: {}", chain(source))]
    Connect {
        /// The URL.
        url: String,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// The token cannot be sent as metadata.
    #[error("token is not valid ASCII metadata")]
    Token,
    /// `http://` to an address that is not loopback, without `--insecure`.
    #[error(
        "refusing plain text to {url}: tokens and counts would cross the network unencrypted. Use \
         https:// (with --ca FILE if the aggregator's certificate comes from a private CA), or give \
         --insecure to accept plain text on a network you trust"
    )]
    Plaintext {
        /// The URL.
        url: String,
    },
    /// TLS material given for an `http://` URL, or a scheme other than http/https.
    #[error("{url}: {reason}")]
    Scheme {
        /// The URL.
        url: String,
        /// What to change.
        reason: String,
    },
    /// A CA or client certificate file cannot be used.
    #[error("cannot use {path} for {url}: {reason}")]
    TlsFile {
        /// The URL.
        url: String,
        /// The file.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
}

/// The error and its causes, `: `-separated (tonic's own message is just "transport error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // Some errors repeat their source in their own message.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    if out.contains("certificate") {
        out.push_str(
            " (the aggregator's certificate is not vouched for: give the CA that issued it with --ca FILE, \
             and check the URL's host name is in the certificate)",
        );
    }
    out
}

/// How a client secures its connection (flags of every command that connects).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnectOptions {
    /// PEM CA certificate(s) to trust for an https:// aggregator instead of the system roots
    /// (a private CA).
    #[arg(long, env = "HEADCOUNT_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Allow http:// (plain text: tokens and counts readable on the network) to an address that is
    /// not loopback. Only for a network you trust.
    #[arg(long)]
    pub insecure: bool,
    /// PEM client certificate (mTLS; its CN is the site id) presented to an https:// aggregator.
    #[arg(long, env = "HEADCOUNT_TLS_CLIENT_CERT", value_name = "FILE", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, env = "HEADCOUNT_TLS_CLIENT_KEY", value_name = "FILE", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

/// Connect timeout (gRPC connection-backoff spec: 20 s minimum connect deadline).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether `host` (as in a URL, IPv6 in brackets) is a loopback address or `localhost`.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An endpoint with the keepalive policy the aggregator accepts (pings every 30 s, also when
/// idle, so a dead path is noticed; no more often, or servers answer `too_many_pings`), under the
/// transport-security rule with default options (system roots; `http://` to loopback only).
pub fn endpoint(url: &str) -> Result<Endpoint, ConnectError> {
    endpoint_with(url, &ConnectOptions::default())
}

/// [`endpoint`] with the given security options. Errors: [`ConnectError::Plaintext`] for
/// `http://` to a non-loopback host without `insecure`; [`ConnectError::Scheme`] for TLS files
/// with `http://` or another scheme; [`ConnectError::TlsFile`] for an unreadable CA or client
/// certificate. Nothing is sent before these checks.
pub fn endpoint_with(url: &str, opts: &ConnectOptions) -> Result<Endpoint, ConnectError> {
    let ep = Endpoint::from_shared(url.to_owned())
        .map_err(|source| ConnectError::Url { url: url.to_owned(), source })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let scheme = ep.uri().scheme_str().unwrap_or("").to_ascii_lowercase();
    let host = ep.uri().host().unwrap_or("").to_owned();
    match scheme.as_str() {
        "https" => {
            let read = |path: &Path| {
                std::fs::read(path).map_err(|e| ConnectError::TlsFile {
                    url: url.to_owned(),
                    path: path.to_owned(),
                    reason: e.to_string(),
                })
            };
            let mut tls = match &opts.ca {
                Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?)),
                None => ClientTlsConfig::new().with_enabled_roots(),
            };
            if let (Some(cert), Some(key)) = (&opts.tls_client_cert, &opts.tls_client_key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            // The files were read; what fails here is their content (a CA or client pair).
            ep.tls_config(tls).map_err(|e| ConnectError::TlsFile {
                url: url.to_owned(),
                path: opts.tls_client_cert.clone().or_else(|| opts.ca.clone()).unwrap_or_default(),
                reason: chain(&e),
            })
        }
        "http" => {
            if opts.ca.is_some() || opts.tls_client_cert.is_some() {
                return Err(ConnectError::Scheme {
                    url: url.to_owned(),
                    reason: "--ca/--tls-client-cert given but the URL is http:// (plain text): use https://".into(),
                });
            }
            if !is_loopback_host(&host) {
                if !opts.insecure {
                    return Err(ConnectError::Plaintext { url: url.to_owned() });
                }
                tracing::warn!(%url, "--insecure: plain text to a non-loopback aggregator");
            }
            Ok(ep)
        }
        _ => Err(ConnectError::Scheme {
            url: url.to_owned(),
            reason: "the aggregator URL must start with https:// (or http:// for loopback)".into(),
        }),
    }
}

/// A lazily connected channel (connects on first use, reconnects after failures).
pub fn lazy_channel(url: &str) -> Result<Channel, ConnectError> {
    Ok(endpoint(url)?.connect_lazy())
}

/// [`lazy_channel`] with the given security options.
pub fn lazy_channel_with(url: &str, opts: &ConnectOptions) -> Result<Channel, ConnectError> {
    Ok(endpoint_with(url, opts)?.connect_lazy())
}

/// A channel connected now.
pub async fn channel(url: &str) -> Result<Channel, ConnectError> {
    channel_with(url, &ConnectOptions::default()).await
}

/// A channel connected now, with the given security options. A certificate the CA does not
/// vouch for is [`ConnectError::Connect`] naming the address and rustls' reason.
pub async fn channel_with(url: &str, opts: &ConnectOptions) -> Result<Channel, ConnectError> {
    endpoint_with(url, opts)?.connect().await.map_err(|source| ConnectError::Connect { url: url.to_owned(), source })
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
