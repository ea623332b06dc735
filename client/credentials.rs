//! The operator's side of the credentials: where `headcount token` and `headcount provision`
//! find the signing keys (the same files the aggregator reads) and what they put in a token.

use std::{path::PathBuf, time::Duration};

use crate::server::{
    Auth,
    auth::{AuthSources, Grant, TokenSpec},
};

/// Flags naming the signing keys and the validity of new tokens.
#[derive(Debug, Clone, clap::Args)]
pub struct CredentialArgs {
    /// The aggregator's secret (prefer --auth-secret-file: a command line is visible to every
    /// local user).
    #[arg(long, env = "HEADCOUNT_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// File holding the aggregator's secret (as --auth-secret-file of the aggregator).
    #[arg(long, env = "HEADCOUNT_AUTH_SECRET_FILE")]
    pub auth_secret_file: Option<PathBuf>,
    /// The aggregator's key set file (`KEY_ID SECRET` per line; the last line seals).
    #[arg(long, env = "HEADCOUNT_AUTH_KEYS")]
    pub auth_keys: Option<PathBuf>,
    /// Seal with this key of the key set instead of the newest.
    #[arg(long)]
    pub key_id: Option<String>,
    /// How long the new tokens are valid, e.g. `30d`, `12h`.
    #[arg(long, default_value = "60d", value_parser = humantime::parse_duration)]
    pub expires: Duration,
}

impl CredentialArgs {
    /// The key set these flags name; the error says which flag or file to fix.
    pub fn auth(&self) -> Result<Auth, String> {
        let secret = match (&self.auth_secret, &self.auth_secret_file) {
            (Some(s), _) => Some(s.as_bytes().to_vec()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read --auth-secret-file {}: {e}", path.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .as_bytes()
                    .to_vec(),
            ),
            (None, None) => None,
        };
        let sources = AuthSources { secret, keys_file: self.auth_keys.clone(), revoked_file: None };
        Auth::from_sources(&sources).map_err(|e| e.to_string())
    }

    /// Mints one token for `grant` with these flags' key and validity.
    pub fn mint(&self, auth: &Auth, grant: Grant, subject: &str) -> Result<String, String> {
        let spec = TokenSpec { grant, subject: subject.to_owned(), expires_in: self.expires };
        auth.mint(&spec, self.key_id.as_deref()).map_err(|e| e.to_string())
    }
}
