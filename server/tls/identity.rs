//! The site a client certificate names (mTLS), as an alternative to a site token.
//!
//! Rule: a site's client certificate is issued by the CA given with `--client-ca` and carries the
//! site id as its subject Common Name (`CN=<site id>`, exactly as in the registry). rustls has
//! already verified the chain when a request arrives; this module only reads the name.

use tonic::{Request, metadata::MetadataMap};

use crate::server::{auth::Grant, error::Error, ingest::SITE_HEADER};

/// The site id a DER certificate names (its subject CN).
pub fn certificate_site(der: &[u8]) -> Result<String, Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Unauthenticated(format!("client certificate does not parse: {e}")))?;
    let cn = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::trim);
    match cn {
        Some(site) if !site.is_empty() => Ok(site.to_owned()),
        _ => Err(Error::PermissionDenied(
            "the client certificate names no site: issue it with the site id as its subject CN".into(),
        )),
    }
}

/// The site named by the verified client certificate of the connection `request` came on, or
/// None when the connection is not TLS or the client presented no certificate (use a token).
pub fn peer_site<T>(request: &Request<T>) -> Result<Option<String>, Error> {
    let Some(certs) = request.peer_certs() else { return Ok(None) };
    match certs.first() {
        Some(leaf) => certificate_site(leaf).map(Some),
        None => Ok(None),
    }
}

/// What a certificate for `cert_site` grants a stream whose metadata claims a site: reporting for
/// that same site; another site is `PERMISSION_DENIED` (gRPC status 7).
pub fn grant(cert_site: &str, md: &MetadataMap) -> Result<Grant, Error> {
    if let Some(claimed) = md.get(SITE_HEADER).and_then(|v| v.to_str().ok())
        && claimed != cert_site
    {
        return Err(Error::PermissionDenied(format!(
            "the client certificate is for site {cert_site:?}; it cannot report for site {claimed:?}"
        )));
    }
    Ok(Grant::Site(cert_site.to_owned()))
}
