//! Credentials: tokens minted with an HMAC-SHA256 of a shared secret, so the aggregator needs no
//! token database. A site token names exactly one site; a read token opens the Totals service.
//!
//! Format: `hc1.site.<site id>.<hex mac>` or `hc1.read.<label>.<hex mac>`, where the mac covers
//! everything before its dot. Verification is constant-time (`Mac::verify_slice`).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::metadata::MetadataMap;

use super::error::Error;

type HmacSha256 = Hmac<Sha256>;

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Report for this site id (and read).
    Site(String),
    /// Read totals.
    Read,
}

/// Mints and checks tokens with one secret.
#[derive(Clone)]
pub struct Auth {
    key: HmacSha256,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth { key: <redacted> }")
    }
}

/// Shortest accepted secret, bytes.
pub const MIN_SECRET_LEN: usize = 16;

impl Auth {
    /// Keyed with `secret` (at least [`MIN_SECRET_LEN`] bytes).
    pub fn new(secret: &[u8]) -> Result<Self, Error> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(Error::InvalidArgument(format!("auth secret must be at least {MIN_SECRET_LEN} bytes")));
        }
        let key = HmacSha256::new_from_slice(secret).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(Self { key })
    }

    fn mac(&self, payload: &str) -> String {
        let mut m = self.key.clone();
        m.update(payload.as_bytes());
        hex::encode(m.finalize().into_bytes())
    }

    /// A token that reports for `site_id`.
    pub fn site_token(&self, site_id: &str) -> String {
        let payload = format!("hc1.site.{site_id}");
        format!("{payload}.{}", self.mac(&payload))
    }

    /// A read-only token; `label` says whose it is (shows in logs).
    pub fn read_token(&self, label: &str) -> String {
        let payload = format!("hc1.read.{label}");
        format!("{payload}.{}", self.mac(&payload))
    }

    /// Checks a token.
    pub fn verify(&self, token: &str) -> Result<Grant, Error> {
        let bad = || Error::Unauthenticated("invalid token".into());
        let (payload, mac) = token.rsplit_once('.').ok_or_else(bad)?;
        let mac = hex::decode(mac).map_err(|_| bad())?;
        let mut m = self.key.clone();
        m.update(payload.as_bytes());
        m.verify_slice(&mac).map_err(|_| bad())?;
        match payload.strip_prefix("hc1.") {
            Some(rest) => match rest.split_once('.') {
                Some(("site", site)) => Ok(Grant::Site(site.to_owned())),
                Some(("read", _)) => Ok(Grant::Read),
                _ => Err(bad()),
            },
            None => Err(bad()),
        }
    }

    /// Checks the `authorization: Bearer <token>` metadata of a call.
    pub fn verify_metadata(&self, md: &MetadataMap) -> Result<Grant, Error> {
        let value = md
            .get("authorization")
            .ok_or_else(|| Error::Unauthenticated("missing `authorization: Bearer <token>` metadata".into()))?;
        let value = value.to_str().map_err(|_| Error::Unauthenticated("authorization is not ASCII".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| Error::Unauthenticated("authorization must be `Bearer <token>`".into()))?;
        self.verify(token.trim())
    }
}
