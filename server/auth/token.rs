//! The token format: PASETO v4.local (XChaCha20 + BLAKE2b, via `pasetors`), its claims and the
//! key id in the (authenticated, unencrypted) footer `{"kid":"…"}`.
//!
//! Claims: `role` (`site` or `read`), `scope` (a site id; for read: `national` or
//! `province:<code>`), `sub` (site id or the read token's label), `jti` (token id, 32 hex
//! digits), `iat`/`nbf`/`exp` (RFC 3339).

use std::time::Duration;

use pasetors::{Local, claims::Claims, keys::SymmetricKey, token::UntrustedToken, version4::V4};
use sha2::Sha256;

use crate::server::error::Error;

/// The PASETO header every token starts with.
pub const HEADER: &str = "v4.local.";

/// What a read token may see.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReadScope {
    /// Every figure.
    National,
    /// One province (its code) and what lies within it.
    Province(String),
}

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Report for this site id.
    Site(String),
    /// Read totals within this scope.
    Read(ReadScope),
}

/// A verified token: what it grants, its id and the key that sealed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// What it grants.
    pub grant: Grant,
    /// The token id (`jti`): list it in the revocation file to cut this one token off.
    pub token_id: String,
    /// The id of the key that sealed it.
    pub key_id: String,
    /// Who it is for: the site id, or the read token's label.
    pub subject: String,
}

/// One key of the key set: 32 bytes derived from an operator secret.
pub struct Key {
    /// Its id (`kid` in the footer).
    pub id: String,
    key: SymmetricKey<V4>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key {{ id: {:?}, key: <redacted> }}", self.id)
    }
}

/// Shortest accepted secret, bytes.
pub const MIN_SECRET_LEN: usize = 16;

impl Key {
    /// A key named `id` derived from `secret` (at least [`MIN_SECRET_LEN`] bytes) by
    /// HMAC-SHA256, so any operator string of enough entropy makes a 256-bit key.
    pub fn derive(id: &str, secret: &[u8]) -> Result<Self, Error> {
        use hmac::Mac;
        if secret.len() < MIN_SECRET_LEN {
            return Err(Error::InvalidArgument(format!(
                "the secret of key {id:?} is {} bytes; it must be at least {MIN_SECRET_LEN} bytes",
                secret.len()
            )));
        }
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return Err(Error::InvalidArgument(format!(
                "key id {id:?} must be non-empty letters, digits, `-`, `_` or `.`"
            )));
        }
        let mut mac =
            hmac::Hmac::<Sha256>::new_from_slice(secret).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        mac.update(b"headcount paseto v4.local key");
        let bytes = mac.finalize().into_bytes();
        let key = SymmetricKey::<V4>::from(&bytes).map_err(|e| Error::InvalidArgument(format!("key {id:?}: {e:?}")))?;
        Ok(Self { id: id.to_owned(), key })
    }
}

/// What to put in a new token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// What it grants.
    pub grant: Grant,
    /// Who it is for (site id, or a label such as `dashboard-hanoi`); shows in logs.
    pub subject: String,
    /// How long it is valid from now.
    pub expires_in: Duration,
}

fn scope_claim(grant: &Grant) -> (&'static str, String) {
    match grant {
        Grant::Site(site) => ("site", site.clone()),
        Grant::Read(ReadScope::National) => ("read", "national".into()),
        Grant::Read(ReadScope::Province(code)) => ("read", format!("province:{code}")),
    }
}

/// Seals a token with `key`.
pub fn seal(key: &Key, spec: &TokenSpec) -> Result<String, Error> {
    let fail = |e: pasetors::errors::Error| Error::InvalidArgument(format!("cannot mint the token: {e:?}"));
    let mut claims = Claims::new_expires_in(&spec.expires_in).map_err(fail)?;
    let (role, scope) = scope_claim(&spec.grant);
    claims.add_additional("role", role).map_err(fail)?;
    claims.add_additional("scope", scope).map_err(fail)?;
    claims.subject(&spec.subject).map_err(fail)?;
    claims.token_identifier(&hex::encode(rand::random::<[u8; 16]>())).map_err(fail)?;
    let footer = serde_json::json!({ "kid": key.id }).to_string();
    let message = claims.to_string().map_err(fail)?;
    pasetors::version4::LocalToken::encrypt(&key.key, message.as_bytes(), Some(footer.as_bytes()), None).map_err(fail)
}

/// The key id a token names in its footer (not yet verified: the footer is authenticated by
/// [`open`]).
pub fn key_id(token: &str) -> Result<(UntrustedToken<Local, V4>, String), Error> {
    let bad =
        |why: &str| Error::Unauthenticated(format!("invalid token: {why}; mint a new one with `headcount token`"));
    if !token.starts_with(HEADER) {
        return Err(bad("not a v4.local token (tokens of before key rotation must be minted again)"));
    }
    let untrusted = UntrustedToken::<Local, V4>::try_from(token).map_err(|_| bad("malformed"))?;
    let footer: serde_json::Value =
        serde_json::from_slice(untrusted.untrusted_footer()).map_err(|_| bad("no key id in its footer"))?;
    let kid = footer.get("kid").and_then(|v| v.as_str()).ok_or_else(|| bad("no key id in its footer"))?.to_owned();
    Ok((untrusted, kid))
}

/// Decrypts and checks a token with `key` (the one its footer names): authenticity, expiry, role
/// and scope. Expired → UNAUTHENTICATED saying so.
pub fn open(key: &Key, token: &UntrustedToken<Local, V4>) -> Result<Credential, Error> {
    let bad = |why: String| Error::Unauthenticated(format!("invalid token: {why}"));
    let trusted = pasetors::version4::LocalToken::decrypt(&key.key, token, None, None)
        .map_err(|_| bad(format!("not sealed by key {:?} (forged, or sealed by another key set)", key.id)))?;
    let claims = Claims::from_bytes(trusted.payload().as_bytes()).map_err(|_| bad("unreadable claims".into()))?;
    if let Err(e) = pasetors::claims::ClaimsValidationRules::new().validate_claims(&claims) {
        use pasetors::errors::{ClaimValidationError, Error as E};
        return Err(match e {
            E::ClaimValidation(ClaimValidationError::Exp) => Error::Unauthenticated(format!(
                "token expired at {}: ask the operations team for a new one (`headcount token --expires …`)",
                claims.get_claim("exp").and_then(|v| v.as_str()).unwrap_or("?")
            )),
            E::ClaimValidation(ClaimValidationError::Nbf | ClaimValidationError::Iat) => {
                bad("not valid yet (is this machine's clock right?)".into())
            }
            other => bad(format!("claims: {other:?}")),
        });
    }
    let text = |name: &str| claims.get_claim(name).and_then(|v| v.as_str()).map(str::to_owned);
    let role = text("role").ok_or_else(|| bad("no role".into()))?;
    let scope = text("scope").ok_or_else(|| bad("no scope".into()))?;
    let grant = match (role.as_str(), scope.as_str()) {
        ("site", site) => Grant::Site(site.to_owned()),
        ("read", "national") => Grant::Read(ReadScope::National),
        ("read", s) => match s.strip_prefix("province:") {
            Some(code) => Grant::Read(ReadScope::Province(code.to_owned())),
            None => return Err(bad(format!("unknown read scope {s:?}"))),
        },
        (r, _) => return Err(bad(format!("unknown role {r:?}"))),
    };
    Ok(Credential {
        grant,
        token_id: text("jti").ok_or_else(|| bad("no token id".into()))?,
        key_id: key.id.clone(),
        subject: text("sub").unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, secret: &str) -> Key {
        Key::derive(id, secret.as_bytes()).expect("key")
    }

    #[test]
    fn sealed_claims_round_trip() {
        let k = key("k1", "a secret long enough for a key");
        for grant in [
            Grant::Site("S00042".into()),
            Grant::Read(ReadScope::National),
            Grant::Read(ReadScope::Province("01".into())),
        ] {
            let spec = TokenSpec { grant: grant.clone(), subject: "who".into(), expires_in: Duration::from_secs(60) };
            let token = seal(&k, &spec).expect("seal");
            assert!(token.starts_with(HEADER));
            let (untrusted, kid) = key_id(&token).expect("key id");
            assert_eq!(kid, "k1");
            let c = open(&k, &untrusted).expect("open");
            assert_eq!((c.grant, c.subject.as_str(), c.key_id.as_str()), (grant, "who", "k1"));
            assert_eq!(c.token_id.len(), 32, "128-bit token id in hex");
        }
    }

    #[test]
    fn forged_tampered_expired_and_foreign_tokens_are_unauthenticated() {
        let k = key("k1", "a secret long enough for a key");
        let spec =
            TokenSpec { grant: Grant::Site("S1".into()), subject: "S1".into(), expires_in: Duration::from_secs(60) };
        let token = seal(&k, &spec).expect("seal");
        // Same key id, another secret: forged.
        let other = key("k1", "another secret, just as long");
        let (untrusted, _) = key_id(&token).expect("key id");
        assert!(matches!(open(&other, &untrusted), Err(Error::Unauthenticated(m)) if m.contains("not sealed by")));
        // A flipped character in the body.
        let mut bytes = token.into_bytes();
        let at = HEADER.len() + 10;
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).expect("ASCII");
        let refused = key_id(&tampered).and_then(|(u, _)| open(&k, &u));
        assert!(matches!(refused, Err(Error::Unauthenticated(_))), "{refused:?}");
        // Expired.
        let expired = seal(&k, &TokenSpec { expires_in: Duration::ZERO, ..spec }).expect("seal");
        let (u, _) = key_id(&expired).expect("key id");
        assert!(matches!(open(&k, &u), Err(Error::Unauthenticated(m)) if m.contains("expired")));
        // The old `hc1.` format.
        assert!(matches!(key_id("hc1.site.S1.abcd"), Err(Error::Unauthenticated(m)) if m.contains("v4.local")));
    }
}
