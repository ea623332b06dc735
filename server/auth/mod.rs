//! Credentials: PASETO v4.local tokens (see [`token`]) sealed with a key set of one or more keys
//! (see [`files`]), so a key rotates without revoking everyone; a revocation list of site ids or
//! token ids re-read while running (see [`watch`]), whose changes also close the running streams
//! of what it lists. A site token names exactly one site; a read token opens the Totals service
//! and the dashboard, nationally or for one province.
//!
//! Errors: a missing, malformed, forged, expired, or revoked token is UNAUTHENTICATED (the
//! message says which); a valid token used beyond its grant is PERMISSION_DENIED.

pub mod files;
pub mod scope;
pub mod token;
pub mod watch;

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use tonic::metadata::MetadataMap;

use super::{
    error::Error,
    quotas::{QuotaConfig, Quotas},
};
pub use token::{Credential, Grant, Key, MIN_SECRET_LEN, ReadScope, TokenSpec};

/// Validity of the tokens [`Auth::site_token`] and [`Auth::read_token`] mint: 365 days.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Key id of the key derived from a single secret (`--auth-secret-file`).
pub const DEFAULT_KEY_ID: &str = "default";

/// Where the credentials come from.
#[derive(Debug, Clone, Default)]
pub struct AuthSources {
    /// One secret (key id [`DEFAULT_KEY_ID`]), e.g. from `--auth-secret-file`.
    pub secret: Option<Vec<u8>>,
    /// A key set file (`KEY_ID SECRET` per line; the last signs), re-read while running.
    pub keys_file: Option<PathBuf>,
    /// A revocation file (site ids or token ids per line), re-read while running.
    pub revoked_file: Option<PathBuf>,
}

pub(crate) struct Inner {
    base: Option<Arc<Key>>,
    keys: RwLock<Arc<Vec<Arc<Key>>>>,
    revoked: RwLock<Arc<HashSet<String>>>,
    keys_file: Option<PathBuf>,
    revoked_file: Option<PathBuf>,
    /// Bumped on every reload: running streams re-check their revocation.
    changed: tokio::sync::watch::Sender<u64>,
}

/// Mints and checks tokens. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Auth {
    pub(crate) inner: Arc<Inner>,
    quotas: Arc<Quotas>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth { keys: <redacted> }")
    }
}

impl Auth {
    /// One key (id [`DEFAULT_KEY_ID`]) derived from `secret` (at least [`MIN_SECRET_LEN`] bytes;
    /// else INVALID_ARGUMENT), no revocation list.
    pub fn new(secret: &[u8]) -> Result<Self, Error> {
        Self::from_sources(&AuthSources { secret: Some(secret.to_vec()), ..AuthSources::default() })
    }

    /// Loads the credentials from their sources; the errors name the file and line.
    pub fn from_sources(sources: &AuthSources) -> Result<Self, Error> {
        let base = sources.secret.as_deref().map(|s| Key::derive(DEFAULT_KEY_ID, s)).transpose()?.map(Arc::new);
        if base.is_none() && sources.keys_file.is_none() {
            return Err(Error::InvalidArgument(
                "no signing key: give --auth-secret-file FILE or --auth-keys FILE (or the systemd credential \
                 `auth-secret` / `auth-keys`)"
                    .into(),
            ));
        }
        let auth = Self {
            inner: Arc::new(Inner {
                base,
                keys: RwLock::new(Arc::new(Vec::new())),
                revoked: RwLock::new(Arc::new(HashSet::new())),
                keys_file: sources.keys_file.clone(),
                revoked_file: sources.revoked_file.clone(),
                changed: tokio::sync::watch::Sender::new(0),
            }),
            quotas: Arc::default(),
        };
        auth.reload()?;
        Ok(auth)
    }

    /// The same credentials with these per-credential limits (default: [`QuotaConfig::default`]).
    pub fn with_quotas(mut self, config: QuotaConfig) -> Self {
        self.quotas = Arc::new(Quotas::new(config));
        self
    }

    /// The per-credential limits.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Re-reads the key set and revocation files; on error nothing changes. Running streams of a
    /// newly revoked site or token are closed (see [`Auth::revoked_signal`]).
    pub fn reload(&self) -> Result<(), Error> {
        let mut keys: Vec<Arc<Key>> = self.inner.base.iter().cloned().collect();
        if let Some(path) = &self.inner.keys_file {
            let text = files::read(path, "key set file (--auth-keys)")?;
            keys.extend(files::parse_keys(path, &text)?.into_iter().map(Arc::new));
        }
        let revoked = match &self.inner.revoked_file {
            // A revocation file not there yet revokes nothing (it may be created later).
            Some(path) if path.exists() => files::parse_revoked(&files::read(path, "revocation file (--revoked)")?),
            _ => HashSet::new(),
        };
        *self.inner.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        *self.inner.revoked.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(revoked);
        self.inner.changed.send_modify(|g| *g += 1);
        Ok(())
    }

    fn keys(&self) -> Arc<Vec<Arc<Key>>> {
        self.inner.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The ids of the keys accepted now, the signing key last.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys().iter().map(|k| k.id.clone()).collect()
    }

    /// Mints a token with the signing key (the newest), or with `key_id` if given (it must be in
    /// the key set: INVALID_ARGUMENT otherwise).
    pub fn mint(&self, spec: &TokenSpec, key_id: Option<&str>) -> Result<String, Error> {
        let keys = self.keys();
        let key = match key_id {
            Some(id) => keys.iter().find(|k| k.id == id).ok_or_else(|| {
                Error::InvalidArgument(format!("no key {id:?} in the key set (have: {:?})", self.key_ids()))
            })?,
            None => keys.last().ok_or_else(|| Error::InvalidArgument("the key set is empty".into()))?,
        };
        token::seal(key, spec)
    }

    fn mint_default(&self, grant: Grant, subject: &str) -> String {
        let spec = TokenSpec { grant, subject: subject.to_owned(), expires_in: DEFAULT_TOKEN_TTL };
        // Sealing fails only if the OS random generator does: nothing sensible to do then.
        #[allow(clippy::expect_used)]
        self.mint(&spec, None).expect("sealing a token (the OS random generator failed)")
    }

    /// A token that reports for `site_id`, valid [`DEFAULT_TOKEN_TTL`].
    pub fn site_token(&self, site_id: &str) -> String {
        self.mint_default(Grant::Site(site_id.to_owned()), site_id)
    }

    /// A national read token, valid [`DEFAULT_TOKEN_TTL`]; `label` says whose it is (logs).
    pub fn read_token(&self, label: &str) -> String {
        self.mint_default(Grant::Read(ReadScope::National), label)
    }

    /// Checks a token: sealed by a key of the set, not expired, not revoked.
    pub fn check(&self, token: &str) -> Result<Credential, Error> {
        let (untrusted, kid) = token::key_id(token.trim())?;
        let keys = self.keys();
        let key = keys.iter().find(|k| k.id == kid).ok_or_else(|| {
            Error::Unauthenticated(format!(
                "token sealed by key {kid:?}, which is no longer accepted (rotated out): ask for a new token"
            ))
        })?;
        let credential = token::open(key, &untrusted)?;
        if let Some(why) = self.revoked(&credential) {
            return Err(Error::Unauthenticated(why));
        }
        Ok(credential)
    }

    /// [`Auth::check`], keeping only the grant.
    pub fn verify(&self, token: &str) -> Result<Grant, Error> {
        self.check(token).map(|c| c.grant)
    }

    /// Checks the `authorization: Bearer <token>` metadata of a call.
    pub fn verify_metadata(&self, md: &MetadataMap) -> Result<Credential, Error> {
        let value = md
            .get("authorization")
            .ok_or_else(|| Error::Unauthenticated("missing `authorization: Bearer <token>` metadata".into()))?;
        let value = value.to_str().map_err(|_| Error::Unauthenticated("authorization is not ASCII".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| Error::Unauthenticated("authorization must be `Bearer <token>`".into()))?;
        self.check(token)
    }

    /// Why this credential is revoked, if it is (its site or its token id is listed).
    pub fn revoked(&self, c: &Credential) -> Option<String> {
        let list = self.inner.revoked.read().unwrap_or_else(|p| p.into_inner()).clone();
        let site = match &c.grant {
            Grant::Site(s) => Some(s.as_str()),
            Grant::Read(_) => None,
        };
        if let Some(site) = site.filter(|s| list.contains(*s)) {
            Some(format!("credentials of site {site:?} were revoked: ask the operations team for a new token"))
        } else if list.contains(&c.token_id) {
            Some(format!("token {} was revoked: ask the operations team for a new token", c.token_id))
        } else {
            None
        }
    }

    /// Resolves (with the reason) once `credential` is revoked by a reload; pending forever
    /// otherwise. A running stream selects on it, so it costs nothing until the files change.
    pub fn revoked_signal(&self, credential: Credential) -> impl Future<Output = String> + Send + 'static {
        let auth = self.clone();
        let mut changes = self.inner.changed.subscribe();
        async move {
            loop {
                if let Some(why) = auth.revoked(&credential) {
                    return why;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// What a running ingest stream checks besides its messages: its credential's revocation and
/// its site's batch rate. Made once per stream (see [`Auth::stream_guard`]).
pub struct StreamGuard {
    /// Resolves with the reason once the stream's credential is revoked.
    pub revoked: std::pin::Pin<Box<dyn Future<Output = String> + Send>>,
    quotas: Arc<Quotas>,
    site: String,
}

impl StreamGuard {
    /// One more batch of this stream's site: RESOURCE_EXHAUSTED (with `retry-after-ms`) beyond
    /// `--ingest-rate`.
    pub fn batch(&self) -> Result<(), tonic::Status> {
        self.quotas.ingest(&self.site).map_err(|e| e.status())
    }
}

impl Auth {
    /// The guard of a stream of `site` opened with the call metadata `md` (its bearer token; a
    /// stream without one, e.g. identified by a client certificate, is guarded by its site only).
    pub fn stream_guard(&self, md: &MetadataMap, site: &str) -> StreamGuard {
        let credential = self.verify_metadata(md).unwrap_or_else(|_| Credential {
            grant: Grant::Site(site.to_owned()),
            token_id: String::new(),
            key_id: String::new(),
            subject: site.to_owned(),
        });
        StreamGuard {
            revoked: Box::pin(self.revoked_signal(credential)),
            quotas: self.quotas.clone(),
            site: site.to_owned(),
        }
    }
}
