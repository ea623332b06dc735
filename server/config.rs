//! Aggregator settings: command-line flags (each with an environment variable) and their defaults.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::{
    aggregator::AggregatorConfig,
    durability::DurabilityConfig,
    limits,
    registry::{
        self, Registry,
        generate::{DEFAULT_SEED, GenerateOptions},
    },
    serve::Transport,
};

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Flags of the aggregator (`headcount-server`).
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "HEADCOUNT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Also serve the read side (Totals, health, reflection) here, from its own thread, so
    /// dashboards stay fast while ingest saturates the main listener.
    #[arg(long, env = "HEADCOUNT_READ_LISTEN")]
    pub read_listen: Option<SocketAddr>,
    /// Write the bound address to this file once listening (useful with `--listen 127.0.0.1:0`).
    #[arg(long, env = "HEADCOUNT_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Registry sites file (CSV as a spreadsheet saves it, see README "Registry"). Required,
    /// unless --reference-registry.
    #[arg(long, env = "HEADCOUNT_SITES", requires = "sessions")]
    pub sites: Option<PathBuf>,
    /// Registry sessions file (CSV, see README "Registry").
    #[arg(long, env = "HEADCOUNT_SESSIONS", requires = "sites")]
    pub sessions: Option<PathBuf>,
    /// IANA time zone of the sessions file's times where a row has no `time_zone`.
    #[arg(long, env = "HEADCOUNT_TIME_ZONE", default_value = registry::sessions::DEFAULT_TIME_ZONE)]
    pub time_zone: String,
    /// Serve the built-in reference registry (10,035 synthetic sites, for simulations and tests)
    /// instead of --sites/--sessions.
    #[arg(long, env = "HEADCOUNT_REFERENCE_REGISTRY", conflicts_with_all = ["sites", "sessions"])]
    pub reference_registry: bool,
    /// Seed of the built-in reference registry (with --reference-registry).
    #[arg(long, env = "HEADCOUNT_SEED", default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Secret that seals site and read tokens (at least 16 bytes; key id `default`). Prefer
    /// --auth-secret-file or --auth-keys: a command line is visible to every local user.
    #[arg(long, env = "HEADCOUNT_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// File holding the token secret (trailing newline ignored). Default: the systemd credential
    /// `auth-secret` in $CREDENTIALS_DIRECTORY (`LoadCredential=`), if there.
    #[arg(long, env = "HEADCOUNT_AUTH_SECRET_FILE")]
    pub auth_secret_file: Option<PathBuf>,
    /// Key set file: `KEY_ID SECRET` per line, `#` comments; every key is accepted, the last one
    /// seals new tokens. Re-read every second while running (rotate a key without a restart).
    /// Default: the systemd credential `auth-keys`, if there.
    #[arg(long, env = "HEADCOUNT_AUTH_KEYS")]
    pub auth_keys: Option<PathBuf>,
    /// Revocation file: site ids or token ids, one per line, `#` comments. Re-read every second:
    /// what it lists is refused, and its running streams are closed (UNAUTHENTICATED, "revoked").
    #[arg(long, env = "HEADCOUNT_REVOKED")]
    pub revoked: Option<PathBuf>,
    /// Ingest batches per second one site may send (all its streams together); beyond it the
    /// stream ends with RESOURCE_EXHAUSTED and `retry-after-ms`. 0: no limit.
    #[arg(long, env = "HEADCOUNT_INGEST_RATE", default_value_t = 0)]
    pub ingest_rate: u32,
    /// Ingest batches a site may send at once above --ingest-rate.
    #[arg(long, env = "HEADCOUNT_INGEST_BURST", default_value_t = 100)]
    pub ingest_burst: u32,
    /// Read calls per second one read token may make (gRPC calls, watch openings, HTTP
    /// requests); beyond it RESOURCE_EXHAUSTED (HTTP 429). 0: no limit.
    #[arg(long, env = "HEADCOUNT_READ_RATE", default_value_t = 0)]
    pub read_rate: u32,
    /// Read calls a token may make at once above --read-rate.
    #[arg(long, env = "HEADCOUNT_READ_BURST", default_value_t = 50)]
    pub read_burst: u32,
    /// Most gRPC watchers plus live (SSE) pages one token may hold open (beyond:
    /// RESOURCE_EXHAUSTED, HTTP 429). 0: no limit.
    #[arg(long, env = "HEADCOUNT_MAX_WATCHERS_PER_TOKEN", default_value_t = 256)]
    pub max_watchers_per_token: usize,
    /// Deadline of a call until its response starts (unary calls whole, a stream's opening);
    /// beyond it DEADLINE_EXCEEDED.
    #[arg(long, env = "HEADCOUNT_CALL_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub call_timeout: Duration,
    /// A site that sent nothing (report or heartbeat) for this long is flagged silent.
    #[arg(long, env = "HEADCOUNT_SILENT_AFTER", default_value = "60s", value_parser = duration)]
    pub silent_after: Duration,
    /// How often watchers receive coalesced updates.
    #[arg(long, env = "HEADCOUNT_PUBLISH_TICK", default_value = "250ms", value_parser = duration)]
    pub publish_tick: Duration,
    /// Width of a check-in curve bucket.
    #[arg(long, env = "HEADCOUNT_CURVE_BUCKET", default_value = "60s", value_parser = duration)]
    pub curve_bucket: Duration,
    /// Hard ceiling on one desk's count for one session (above: OUT_OF_RANGE).
    #[arg(long, env = "HEADCOUNT_MAX_COUNT", default_value_t = 100_000)]
    pub max_count: i64,
    /// Most site-agent installs (register slots) per site; a further install's stream is
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "HEADCOUNT_MAX_AGENTS_PER_SITE", default_value_t = 16)]
    pub max_agents_per_site: u16,
    /// Most concurrent streams on one HTTP/2 connection (tonic's default is unlimited).
    #[arg(long, env = "HEADCOUNT_MAX_STREAMS_PER_CONNECTION", default_value_t = 1024)]
    pub max_streams_per_connection: u32,
    /// HTTP/2 receive window per stream, bytes: what one reporter may have sent and the
    /// aggregator not yet read (hyper's default is 1 MiB). Bounds what a reporter that stops
    /// reading its acks can make the aggregator buffer.
    #[arg(long, env = "HEADCOUNT_STREAM_WINDOW", default_value_t = 32 * 1024)]
    pub stream_window: u32,
    /// HTTP/2 receive window per connection, bytes: what all streams of one connection together
    /// may have in flight unread.
    #[arg(long, env = "HEADCOUNT_CONNECTION_WINDOW", default_value_t = 1024 * 1024)]
    pub connection_window: u32,
    /// HTTP/2 keepalive ping interval: half-open connections are reaped.
    #[arg(long, env = "HEADCOUNT_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = duration)]
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "HEADCOUNT_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub keepalive_timeout: Duration,
    /// Largest accepted message, bytes (above: RESOURCE_EXHAUSTED, the stream ends). Must hold a
    /// full batch (--max-batch reports with --max-reason-bytes reasons) and its ack.
    #[arg(long, env = "HEADCOUNT_MAX_MESSAGE_BYTES", default_value_t = limits::DEFAULT_MAX_MESSAGE)]
    pub max_message_bytes: usize,
    /// Most reports in one batch (above: the batch is refused with one INVALID_ARGUMENT rejection).
    #[arg(long, env = "HEADCOUNT_MAX_BATCH", default_value_t = limits::DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// Longest correction reason, bytes (above: that report is refused, INVALID_ARGUMENT).
    #[arg(long, env = "HEADCOUNT_MAX_REASON_BYTES", default_value_t = limits::DEFAULT_MAX_REASON)]
    pub max_reason_bytes: usize,
    /// Data directory for the journal and snapshots.
    #[arg(long, env = "HEADCOUNT_DATA_DIR", default_value = "headcount-data")]
    pub data_dir: PathBuf,
    /// Keep state in memory only: EVERYTHING IS LOST ON EXIT (sites resend what they hold).
    #[arg(long, env = "HEADCOUNT_IN_MEMORY", conflicts_with = "data_dir")]
    pub in_memory: bool,
    /// Longest time between journal group commits (acks wait for the commit).
    #[arg(long, env = "HEADCOUNT_FLUSH_INTERVAL", default_value = "2ms", value_parser = duration)]
    pub flush_interval: Duration,
    /// Commit early once about this many registers changed.
    #[arg(long, env = "HEADCOUNT_FLUSH_RECORDS", default_value_t = 8192)]
    pub flush_records: usize,
    /// How often a snapshot is written (the journal is compacted behind it).
    #[arg(long, env = "HEADCOUNT_SNAPSHOT_INTERVAL", default_value = "60s", value_parser = duration)]
    pub snapshot_interval: Duration,
    /// Stream openings handled at once (reconnect storms); beyond it RESOURCE_EXHAUSTED.
    #[arg(long, env = "HEADCOUNT_MAX_CONCURRENT_HANDSHAKES", default_value_t = 512)]
    pub max_concurrent_handshakes: usize,
    /// On SIGINT/SIGTERM, how long streams get to finish before the process exits anyway.
    #[arg(long, env = "HEADCOUNT_GRACE", default_value = "10s", value_parser = duration)]
    pub grace: Duration,
    /// Serve the live dashboard page, the JSON API, CSV exports and `/metrics` over HTTP on this
    /// address (from its own thread and runtime, like --read-listen).
    #[arg(long, env = "HEADCOUNT_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Lobby screen: national and province figures readable over HTTP without a token
    /// (communes, sites, silent sites, corrections, exports and metrics still need one).
    #[arg(long, env = "HEADCOUNT_HTTP_PUBLIC")]
    pub http_public: bool,
    /// PEM certificate chain (leaf first) served on every listener (--listen, --read-listen,
    /// --http-listen): TLS instead of plain text. Re-read when the file changes or on SIGHUP.
    #[arg(long, env = "HEADCOUNT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "HEADCOUNT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates that issue site client certificates (mTLS): a stream whose verified
    /// certificate has CN=<site id> may report for that site without a token. Needs --tls-cert.
    #[arg(long, env = "HEADCOUNT_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// How often the certificate and key files are checked for a renewal.
    #[arg(long, env = "HEADCOUNT_TLS_POLL_INTERVAL", default_value = "2s", value_parser = duration)]
    pub tls_poll_interval: Duration,
    /// Cluster mode: etcd client URLs, comma-separated (`http://10.0.0.1:2379,http://10.0.0.2:2379`).
    /// Several aggregator nodes share the nation through etcd; acks wait for etcd's commit.
    /// Without it, a single node with its journal in --data-dir.
    #[arg(long, env = "HEADCOUNT_ETCD", value_delimiter = ',', conflicts_with = "in_memory")]
    pub etcd: Vec<String>,
    /// Cluster mode: this node's name, unique among the nodes (letters, digits, '.', '_', '-').
    #[arg(long = "node", env = "HEADCOUNT_NODE", requires = "etcd")]
    pub node: Option<String>,
    /// Cluster mode: prefix of every etcd key (several events can share one etcd).
    #[arg(long, env = "HEADCOUNT_ETCD_PREFIX", default_value = "/headcount")]
    pub etcd_prefix: String,
    /// Cluster mode: the node's lease; a node that cannot reach etcd for this long ends its
    /// streams (sites fail over to another node) until etcd is back. Whole seconds, 2s..600s.
    #[arg(long, env = "HEADCOUNT_ETCD_LEASE_TTL", default_value = "5s", value_parser = duration)]
    pub etcd_lease_ttl: Duration,
    /// Cluster mode over TLS: PEM CA that signed the etcd members' certificates (`https://`
    /// --etcd URLs need it).
    #[arg(long, env = "HEADCOUNT_ETCD_CA", requires = "etcd")]
    pub etcd_ca: Option<PathBuf>,
    /// Cluster mode over TLS: this node's PEM client certificate, for etcd's
    /// `--client-cert-auth`.
    #[arg(long, env = "HEADCOUNT_ETCD_CERT", requires_all = ["etcd_ca", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    /// Cluster mode over TLS: the PEM private key of --etcd-cert.
    #[arg(long, env = "HEADCOUNT_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Log format: `text` (colours only on a terminal) or `json` (one object per line).
    #[arg(long, env = "HEADCOUNT_LOG_FORMAT", value_enum, default_value_t = crate::logging::LogFormat::Text)]
    pub log_format: crate::logging::LogFormat,
}

/// Why the aggregator cannot start with these settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The registry files are unusable.
    #[error("registry: {0}")]
    Registry(#[from] registry::csv::LoadError),
    /// A setting is out of its range or does not fit with another.
    #[error("setting: {0}")]
    Limit(#[from] limits::LimitError),
    /// Neither registry files nor `--reference-registry` were given.
    #[error(
        "no registry: give the event's files with --sites FILE --sessions FILE (see README, \"Registry\"), or \
         --reference-registry to serve the built-in synthetic 10,035-site registry (simulations and tests only)"
    )]
    NoRegistry,
    /// `--time-zone` is not a time zone of the tz database.
    #[error("--time-zone {0:?} is not a known time zone: give an IANA name such as Asia/Ho_Chi_Minh")]
    TimeZone(String),
}

impl ServerArgs {
    /// Loads the registry the flags point at: the files, or the reference registry when asked
    /// for explicitly; neither is [`ConfigError::NoRegistry`].
    pub fn registry(&self) -> Result<Registry, ConfigError> {
        match (&self.sites, &self.sessions) {
            (Some(sites), Some(sessions)) => {
                if jiff::tz::TimeZone::get(&self.time_zone).is_err() {
                    return Err(ConfigError::TimeZone(self.time_zone.clone()));
                }
                let options = registry::csv::LoadOptions { time_zone: self.time_zone.clone() };
                Ok(registry::csv::load_with(sites, sessions, &options)?)
            }
            _ if self.reference_registry => {
                Ok(registry::generate::generate(&GenerateOptions { seed: self.seed, ..GenerateOptions::default() }))
            }
            _ => Err(ConfigError::NoRegistry),
        }
    }

    /// The model settings.
    pub fn aggregator(&self) -> AggregatorConfig {
        AggregatorConfig {
            silent_after: self.silent_after,
            publish_tick: self.publish_tick,
            curve_bucket: self.curve_bucket,
            max_count: self.max_count,
            max_batch: self.max_batch,
            max_reason: self.max_reason_bytes,
            max_agents_per_site: self.max_agents_per_site,
            ..AggregatorConfig::default()
        }
    }

    /// The transport settings.
    pub fn transport(&self) -> Transport {
        Transport {
            max_streams_per_connection: self.max_streams_per_connection,
            stream_window: self.stream_window,
            connection_window: self.connection_window,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            max_message_bytes: self.max_message_bytes,
            grace: self.grace,
            max_concurrent_handshakes: self.max_concurrent_handshakes,
            tls: None,
            call_timeout: self.call_timeout,
        }
    }

    /// The TLS settings (`--tls-cert`, `--tls-key`, `--client-ca`), None for plain text.
    pub fn tls_settings(&self) -> Option<super::tls::TlsSettings> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(super::tls::TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
                poll: self.tls_poll_interval,
            }),
            _ => None,
        }
    }

    /// Loads the TLS material the flags name (None without `--tls-cert`); the error names the file.
    pub fn tls(&self) -> Result<Option<super::tls::ServerTls>, super::tls::TlsError> {
        self.tls_settings().map(super::tls::ServerTls::load).transpose()
    }

    /// The per-credential limits.
    pub fn quotas(&self) -> super::quotas::QuotaConfig {
        super::quotas::QuotaConfig {
            ingest_per_second: self.ingest_rate,
            ingest_burst: self.ingest_burst,
            read_per_second: self.read_rate,
            read_burst: self.read_burst,
            max_watchers_per_token: self.max_watchers_per_token,
        }
    }

    /// Where the credentials come from: the flags, else the systemd credentials `auth-secret` and
    /// `auth-keys` in `$CREDENTIALS_DIRECTORY`. The error says which file could not be read.
    pub fn auth_sources(&self) -> Result<super::auth::AuthSources, String> {
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let from_creds = |name: &str| creds.as_ref().map(|d| d.join(name)).filter(|p| p.exists());
        let secret_file = self.auth_secret_file.clone().or_else(|| from_creds("auth-secret"));
        let secret = match (&self.auth_secret, secret_file) {
            (Some(s), _) => Some(s.as_bytes().to_vec()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    format!("cannot read the token secret {} (--auth-secret-file): {e}", path.display())
                })?;
                Some(text.trim_end_matches(['\n', '\r']).as_bytes().to_vec())
            }
            (None, None) => None,
        };
        Ok(super::auth::AuthSources {
            secret,
            keys_file: self.auth_keys.clone().or_else(|| from_creds("auth-keys")),
            revoked_file: self.revoked.clone(),
        })
    }

    /// The HTTP side's settings.
    pub fn http(&self) -> super::http::HttpConfig {
        super::http::HttpConfig { public: self.http_public, time_zone: self.time_zone.clone(), tls: None }
    }

    /// The journal settings, or None with `--in-memory`.
    pub fn durability(&self) -> Option<DurabilityConfig> {
        (!self.in_memory).then(|| DurabilityConfig {
            dir: self.data_dir.clone(),
            flush_interval: self.flush_interval,
            flush_records: self.flush_records,
            snapshot_interval: self.snapshot_interval,
        })
    }

    /// Cluster mode's settings, or None without `--etcd`. Error: `--etcd` without `--node`.
    pub fn cluster(&self) -> Result<Option<super::cluster::ClusterConfig>, String> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        let node = self.node.clone().ok_or_else(|| {
            "--etcd needs --node NAME: a name for this aggregator, unique among the nodes (e.g. agg-1)".to_owned()
        })?;
        let mut c = super::cluster::ClusterConfig::new(self.etcd.iter().map(|e| e.trim().to_owned()).collect(), node);
        c.prefix = self.etcd_prefix.clone();
        c.lease_ttl = self.etcd_lease_ttl;
        c.flush_interval = self.flush_interval;
        c.flush_records = self.flush_records;
        if let Some(ca) = &self.etcd_ca {
            c.tls = Some(
                super::cluster::EtcdTls::load(ca, self.etcd_cert.as_deref(), self.etcd_key.as_deref())
                    .map_err(|e| e.to_string())?,
            );
        }
        c.validate().map_err(|e| e.to_string())?;
        Ok(Some(c))
    }

    /// Checks every setting's range and how the settings fit together (see [`limits`]); call
    /// before anything is opened or bound. The error names the flag and what to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(limits::check(&limits::Settings {
            silent_after: self.silent_after,
            publish_tick: self.publish_tick,
            curve_bucket: self.curve_bucket,
            max_count: self.max_count,
            max_agents_per_site: self.max_agents_per_site,
            max_batch: self.max_batch,
            max_reason: self.max_reason_bytes,
            max_message_bytes: self.max_message_bytes,
            max_streams_per_connection: self.max_streams_per_connection,
            stream_window: self.stream_window,
            connection_window: self.connection_window,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            flush_interval: self.flush_interval,
            flush_records: self.flush_records,
            snapshot_interval: self.snapshot_interval,
            max_concurrent_handshakes: self.max_concurrent_handshakes,
            grace: self.grace,
        })?)
    }

    /// Checks the settings that depend on the registry: `--max-count` times the number of
    /// registers (Σ (desks + agent install slots) × sessions) must fit in an `i64`.
    pub fn validate_for(&self, registry: &Registry) -> Result<(), ConfigError> {
        let agents = u64::from(self.max_agents_per_site);
        let desks: u64 = registry.sites.iter().map(|s| u64::from(s.desks) + agents).sum();
        Ok(limits::check_registry(self.max_count, desks * registry.sessions.len() as u64)?)
    }
}
