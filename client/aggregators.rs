//! Several aggregator addresses: the `--server` list (`https://a:50051,https://b:50051`), its
//! lazily connected channels, and the rule for moving on to the next address.
//!
//! In cluster mode every aggregator node holds the whole nation and accepts any site, so a client
//! given several addresses uses one at a time, in the order given, and moves to the next when the
//! one it uses cannot be reached. A refusal that retrying cannot fix (`UNAUTHENTICATED`,
//! `PERMISSION_DENIED`, `NOT_FOUND`, `INVALID_ARGUMENT`) is not a reason to move: every node shares
//! the same keys and registry, so another node would refuse too, and trying it would only hide the
//! setting the operator must fix.
//!
//! A DNS name with several records is one address here: hyper-util's connector resolves it on
//! every connection attempt and tries the resolved addresses in order (IPv6 and IPv4 raced after
//! 300 ms), giving each an equal share of the connect timeout (20 s); it stops at the first that
//! accepts TCP. A node that accepts TCP but does not answer is only left by the handshake timeout,
//! after which the same name resolves the same way: list the nodes' URLs one by one when you can.

use std::{fmt, str::FromStr, sync::Arc};

use tonic::{Code, transport::Channel};

use super::connect::{ConnectError, ConnectOptions, endpoint_with};

/// The `--server` value: one or more aggregator URLs, comma-separated, in the order they are
/// tried. Each must be `http://` or `https://` with a host; empty entries are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerList(Vec<String>);

impl ServerList {
    /// The URLs, in order.
    pub fn urls(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for ServerList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl FromStr for ServerList {
    type Err = String;

    /// Splits on commas (spaces around entries allowed) and checks each entry's shape; the
    /// transport-security rule is checked later, with the TLS flags ([`Aggregators::connect_lazy`]).
    fn from_str(s: &str) -> Result<Self, String> {
        let entries: Vec<&str> = s.split(',').map(str::trim).collect();
        let count = entries.len();
        let mut urls = Vec::with_capacity(count);
        for (i, url) in entries.into_iter().enumerate() {
            let at = if count > 1 { format!(" (entry {} of {count})", i + 1) } else { String::new() };
            if url.is_empty() {
                return Err(format!(
                    "empty aggregator URL{at}: give URLs separated by commas, e.g. https://a:50051,https://b:50051"
                ));
            }
            let uri: tonic::codegen::http::Uri =
                url.parse().map_err(|e| format!("invalid aggregator URL {url:?}{at}: {e}"))?;
            match uri.scheme_str() {
                Some("http" | "https") if uri.host().is_some_and(|h| !h.is_empty()) => urls.push(url.to_owned()),
                _ => {
                    return Err(format!(
                        "invalid aggregator URL {url:?}{at}: it must be https://HOST:PORT (or http:// for loopback)"
                    ));
                }
            }
        }
        Ok(Self(urls))
    }
}

/// One aggregator address and its channel.
#[derive(Debug, Clone)]
pub struct Aggregator {
    /// The URL as given (`the aggregator` for a channel that came without one).
    pub url: String,
    /// A lazily connected channel to it (connects on first use, reconnects after failures).
    pub channel: Channel,
}

/// The aggregators a client may use, in order (at least one).
#[derive(Debug, Clone)]
pub struct Aggregators(Arc<[Aggregator]>);

impl Aggregators {
    /// Lazy channels to every URL of `list` under the transport-security rule of `opts`. Errors:
    /// the first URL that breaks the rule ([`ConnectError`] names it); nothing is sent before.
    pub fn connect_lazy(list: &ServerList, opts: &ConnectOptions) -> Result<Self, ConnectError> {
        let all = list
            .urls()
            .iter()
            .map(|url| Ok(Aggregator { url: url.clone(), channel: endpoint_with(url, opts)?.connect_lazy() }))
            .collect::<Result<Vec<_>, ConnectError>>()?;
        Ok(Self(all.into()))
    }

    /// One channel whose URL is not known (simulations, benchmarks, tests).
    pub fn single(channel: Channel) -> Self {
        Self(Arc::new([Aggregator { url: "the aggregator".into(), channel }]))
    }

    /// How many there are (at least 1).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: there is at least one.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `i`-th (modulo the count).
    pub fn get(&self, i: usize) -> &Aggregator {
        &self.0[i % self.0.len()]
    }

    /// All of them, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Aggregator> {
        self.0.iter()
    }

    /// The first channel (where a one-address client starts).
    pub fn first(&self) -> Channel {
        self.0[0].channel.clone()
    }
}

/// Statuses that retrying cannot fix (token, site, desk, scope): stop and tell the operator; do
/// not move to another aggregator.
pub fn permanent(code: Code) -> bool {
    matches!(code, Code::Unauthenticated | Code::PermissionDenied | Code::NotFound | Code::InvalidArgument)
}

/// Whether a one-shot call that failed with `status` should be tried on the next aggregator:
/// every status but the permanent ones (unreachable, timed out, reset, overloaded, …).
pub fn try_next(status: &tonic::Status) -> bool {
    !permanent(status.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_list_is_split_and_each_entry_checked() {
        let l: ServerList = "https://a:50051, https://b:50051".parse().expect("two URLs");
        assert_eq!(l.urls(), ["https://a:50051", "https://b:50051"]);
        assert_eq!(l.to_string(), "https://a:50051,https://b:50051");
        let one: ServerList = "http://127.0.0.1:50051".parse().expect("one URL");
        assert_eq!(one.urls().len(), 1);
        let e = "https://a:1,,https://b:2".parse::<ServerList>().expect_err("empty entry");
        assert!(e.contains("entry 2 of 3"), "{e}");
        let e = "https://a:1,ftp://b".parse::<ServerList>().expect_err("bad scheme");
        assert!(e.contains("\"ftp://b\"") && e.contains("entry 2 of 2"), "{e}");
        assert!("a:50051".parse::<ServerList>().is_err());
    }
}
