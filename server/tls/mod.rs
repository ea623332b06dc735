//! TLS for every listener (gRPC ingest, the read listener, HTTP): rustls with our own acceptor, so
//! a renewed certificate is picked up without a restart and without cutting open streams, and
//! optional client certificates (mTLS) that name a site.
//!
//! [`certs`] loads PEM files and holds the current certificate (swapped on reload); [`reload`]
//! watches the files and SIGHUP; [`accept`] runs TLS handshakes off the accept loop; [`identity`]
//! reads the site a verified client certificate names.

pub mod accept;
pub mod certs;
pub mod identity;
pub mod reload;

use std::{path::PathBuf, sync::Arc, time::Duration};

use rustls::{RootCertStore, ServerConfig, crypto::CryptoProvider, server::WebPkiClientVerifier};
use tokio_rustls::TlsAcceptor;

pub use certs::{CertStore, TlsError};
pub use identity::peer_site;

/// ALPN of the gRPC listeners: HTTP/2 only.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN of the HTTP listener: HTTP/2 and HTTP/1.1 (browsers, curl, Prometheus).
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Default interval at which the certificate files' modification times are checked.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// Where the server's TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain (leaf first), e.g. `fullchain.pem`.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that sign site client certificates (mTLS); None: no client certificates
    /// asked for. With it, a client certificate is optional (tokens still work) but one that is
    /// presented must chain to this CA, or the handshake fails.
    pub client_ca: Option<PathBuf>,
    /// How often the certificate and key files are checked for changes.
    pub poll: Duration,
}

/// The server side of TLS, shared by every listener: the current certificate (reloadable) and
/// the client-certificate verifier. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ServerTls {
    store: Arc<CertStore>,
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    settings: Arc<TlsSettings>,
}

/// The crypto provider used everywhere (ring), named explicitly so that no process-wide default
/// has to be installed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTls {
    /// Loads the certificate, key and client CA. Errors name the file and what is wrong with it.
    pub fn load(settings: TlsSettings) -> Result<Self, TlsError> {
        let store = Arc::new(CertStore::load(&settings.cert, &settings.key)?);
        let verifier = match &settings.client_ca {
            None => None,
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in certs::read_certs(path)? {
                    roots.add(cert).map_err(|e| TlsError::Invalid { path: path.clone(), reason: e.to_string() })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Invalid { path: path.clone(), reason: e.to_string() })?;
                Some(verifier)
            }
        };
        Ok(Self { store, verifier, settings: Arc::new(settings) })
    }

    /// The certificate store (to reload it, or to read what is served).
    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// The settings it was loaded from.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// An acceptor offering `alpn` ([`ALPN_GRPC`] or [`ALPN_HTTP`]) that serves whatever
    /// certificate the store holds at each handshake.
    pub fn acceptor(&self, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.verifier {
            Some(v) => builder.with_client_cert_verifier(v.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(self.store.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}
