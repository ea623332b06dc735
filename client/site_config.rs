//! `headcount site --config site.toml`: the agent's settings from one file (as `headcount
//! provision` writes it). The file fills the site command's flags; flags given on the command
//! line win over the file, and the file over environment variables. Relative paths in the file
//! are relative to the file's folder.
//!
//! ```toml
//! server = "https://aggregator.example.vn:50051"
//! # several aggregator nodes (cluster mode): a list, or one string with commas
//! # server = ["https://a.example.vn:50051", "https://b.example.vn:50051"]
//! site = "S00042"
//! desks = 2                 # how many desks the site has (informational)
//! desk = 1                  # this install's desk
//! token_file = "token"      # or: token = "v4.local…"
//! ca = "ca.pem"             # the aggregator's CA (needs the client's --ca flag)
//! state_file = "state/desk-1.json"
//! ```

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The agent's config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Aggregator URL (`--server`), or several comma-separated. In the file also a list of
    /// strings (joined with commas here).
    #[serde(default, deserialize_with = "one_or_list")]
    pub server: Option<String>,
    /// Site id (`--site`).
    pub site: Option<String>,
    /// The site's number of desks (informational: each desk runs its own agent).
    pub desks: Option<u16>,
    /// This install's desk (`--desk`).
    pub desk: Option<u32>,
    /// The token itself (`--token`); prefer `token_file`.
    pub token: Option<String>,
    /// File holding the token (read, trimmed, passed as `--token`).
    pub token_file: Option<PathBuf>,
    /// The aggregator's CA certificate (`--ca`, where the client has it).
    pub ca: Option<PathBuf>,
    /// Local state file (`--state-file`).
    pub state_file: Option<PathBuf>,
    /// Session (`--session`).
    pub session: Option<u32>,
}

/// `server = "URL"`, `server = "URL,URL"` or `server = ["URL", "URL"]` → the `--server` value.
fn one_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Server {
        One(String),
        List(Vec<String>),
    }
    Ok(match Option::<Server>::deserialize(d)? {
        None => None,
        Some(Server::One(s)) => Some(s),
        Some(Server::List(l)) if l.is_empty() => {
            return Err(serde::de::Error::custom("server: the list is empty; give at least one aggregator URL"));
        }
        Some(Server::List(l)) => Some(l.join(",")),
    })
}

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SiteConfigError {
    /// It cannot be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid TOML of this shape.
    #[error("config file {path}: {message} (see README, \"Provisioning\")")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        message: String,
    },
}

impl SiteConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, SiteConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| SiteConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| SiteConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    /// The flags this file stands for (`--flag value` pairs), paths made relative to `base`.
    pub fn flags(&self, base: &Path) -> Result<Vec<(&'static str, OsString)>, SiteConfigError> {
        let path = |p: &PathBuf| base.join(p).into_os_string();
        let mut out: Vec<(&'static str, OsString)> = Vec::new();
        let mut push = |flag: &'static str, v: Option<OsString>| {
            if let Some(v) = v {
                out.push((flag, v));
            }
        };
        push("server", self.server.clone().map(Into::into));
        push("site", self.site.clone().map(Into::into));
        push("desk", self.desk.map(|d| d.to_string().into()));
        push("session", self.session.map(|d| d.to_string().into()));
        push("ca", self.ca.as_ref().map(path));
        push("state-file", self.state_file.as_ref().map(path));
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => {
                let f = base.join(f);
                let t = std::fs::read_to_string(&f).map_err(|source| SiteConfigError::Read { path: f, source })?;
                Some(t.trim().to_owned())
            }
            (None, None) => None,
        };
        push("token", token.map(Into::into));
        Ok(out)
    }
}

/// Rewrites a command line `… site [flags] --config FILE [flags]`: the file's settings are
/// inserted as flags right after `site`, except those the command line gives itself, and
/// those `has_flag` says the site command does not know (e.g. `ca` on a build without it).
/// Any other command line is returned as it is.
pub fn expand(args: Vec<OsString>, has_flag: impl Fn(&str) -> bool) -> Result<Vec<OsString>, SiteConfigError> {
    // The subcommand: the first argument that is not a flag.
    let first = args.iter().enumerate().skip(1).find(|(_, a)| !a.to_string_lossy().starts_with('-'));
    let Some((at, _)) = first.filter(|(_, a)| *a == "site") else { return Ok(args) };
    let rest = &args[at + 1..];
    let config = rest.iter().enumerate().find_map(|(i, a)| {
        let a = a.to_str()?;
        if a == "--config" {
            rest.get(i + 1).map(PathBuf::from)
        } else {
            a.strip_prefix("--config=").map(PathBuf::from)
        }
    });
    let Some(config) = config else { return Ok(args) };
    let file = SiteConfig::load(&config)?;
    let base = config.parent().map(Path::to_path_buf).unwrap_or_default();
    let given = |flag: &str| {
        rest.iter().filter_map(|a| a.to_str()).any(|a| a == format!("--{flag}") || a.starts_with(&format!("--{flag}=")))
    };
    let mut out: Vec<OsString> = args[..=at].to_vec();
    for (flag, value) in file.flags(&base)? {
        if has_flag(flag) && !given(flag) {
            out.push(format!("--{flag}").into());
            out.push(value);
        }
    }
    out.extend(rest.iter().cloned());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_is_one_url_a_comma_string_or_a_list() {
        let one: SiteConfig = toml::from_str(r#"server = "https://a:50051""#).expect("one URL");
        assert_eq!(one.server.as_deref(), Some("https://a:50051"));
        let list: SiteConfig =
            toml::from_str(r#"server = ["https://a:50051", "https://b:50051"]"#).expect("a list of URLs");
        assert_eq!(list.server.as_deref(), Some("https://a:50051,https://b:50051"));
        let flags = list.flags(Path::new(".")).expect("flags");
        assert_eq!(flags[0], ("server", OsString::from("https://a:50051,https://b:50051")));
        let none: SiteConfig = toml::from_str(r#"site = "S1""#).expect("no server");
        assert_eq!(none.server, None);
        let empty = toml::from_str::<SiteConfig>("server = []").expect_err("an empty list");
        assert!(empty.to_string().contains("at least one"), "{empty}");
    }
}
