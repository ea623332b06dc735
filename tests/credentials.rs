//! Credentials with a lifecycle, end to end on 127.0.0.1: expiry, key rotation through the key
//! set file, revocation (new calls refused, running streams and watches closed), province read
//! scopes over gRPC and HTTP, per-credential limits (see also `tests/provisioning.rs`).

mod common;

use std::{path::Path, time::Duration};

use common::*;
use headcount::{
    proto::metadata::RETRY_AFTER_MS_HEADER,
    server::{
        Aggregator, Auth, RunningServer, Transport,
        auth::{AuthSources, Grant, ReadScope, TokenSpec},
        quotas::QuotaConfig,
    },
};
use tonic::Code;

/// How often the test servers look at their credential files.
const WATCH_PERIOD: Duration = Duration::from_millis(50);

struct CredServer {
    server: RunningServer,
    auth: Auth,
    registry: headcount::server::registry::Registry,
    dir: tempfile::TempDir,
}

impl CredServer {
    /// A server whose key set file holds `keys`, with a revocation file (absent at first) and
    /// these limits.
    async fn start(keys: &str, quotas: QuotaConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = Self::paths(dir.path());
        std::fs::write(&s.0, keys).expect("write keys");
        let sources = AuthSources { secret: None, keys_file: Some(s.0), revoked_file: Some(s.1) };
        let auth = Auth::from_sources(&sources).expect("key set").with_quotas(quotas);
        auth.spawn_watcher(WATCH_PERIOD);
        let registry = small_registry();
        let agg = Aggregator::new(registry.clone(), test_config());
        let transport = Transport { grace: Duration::from_millis(500), ..Transport::default() };
        let server = RunningServer::start("127.0.0.1:0".parse().expect("address"), agg, auth.clone(), transport)
            .await
            .expect("bind 127.0.0.1");
        Self { server, auth, registry, dir }
    }

    fn paths(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        (dir.join("keys"), dir.join("revoked"))
    }

    fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// Replaces a credential file as an operator should: write aside, then rename.
    fn replace(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join(format!("{name}.new"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.dir.path().join(name)).expect("rename");
    }

    fn mint(&self, grant: Grant, expires_in: Duration) -> String {
        self.auth.mint(&TokenSpec { grant, subject: "test".into(), expires_in }, None).expect("mint")
    }

    async fn reader(&self, token: &str) -> Reader {
        Reader::new(channel_to(&self.url()).await, Some(token.to_owned()))
    }
}

fn keys(lines: &[(&str, &str)]) -> String {
    lines.iter().map(|(k, s)| format!("{k} {s}\n")).collect()
}

const K1: (&str, &str) = ("k1", "first secret of the key set, long enough");
const K2: (&str, &str) = ("k2", "second secret of the key set, rotated in");

fn site_ids(cs: &CredServer) -> (String, String) {
    (cs.registry.sites[0].id.clone(), cs.registry.sites[1].id.clone())
}

#[tokio::test]
async fn expired_token_is_unauthenticated_saying_it_expired() {
    let cs = CredServer::start(&keys(&[K1]), QuotaConfig::default()).await;
    let (a, _) = site_ids(&cs);
    let expired = cs.mint(Grant::Site(a.clone()), Duration::ZERO);
    let err = open_stream(cs.server_channel().await, Some(&expired), Some(&a), Some("1")).await.err().expect("refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "says it expired: {}", err.message());
    let read = cs.mint(Grant::Read(ReadScope::National), Duration::ZERO);
    let err = cs.reader(&read).await.try_totals(national(), None).await.expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "says it expired: {}", err.message());
    // A valid token of the same key works.
    let fine = cs.mint(Grant::Site(a.clone()), Duration::from_secs(60));
    open_stream(cs.server_channel().await, Some(&fine), Some(&a), Some("1")).await.expect("valid token accepted");
}

impl CredServer {
    async fn server_channel(&self) -> tonic::transport::Channel {
        channel_to(&self.url()).await
    }
}

#[tokio::test]
async fn rotated_key_old_tokens_accepted_until_removed() {
    let cs = CredServer::start(&keys(&[K1]), QuotaConfig::default()).await;
    let old = cs.mint(Grant::Read(ReadScope::National), Duration::from_secs(600));
    // Rotate: k2 joins (and now seals), k1 is still accepted.
    cs.replace("keys", &keys(&[K1, K2]));
    eventually("k2 joins the key set", DEADLINE, || async {
        let ids = cs.auth.key_ids();
        if ids.last().map(String::as_str) == Some("k2") { Ok(()) } else { Err(format!("keys {ids:?}")) }
    })
    .await;
    let new = cs.mint(Grant::Read(ReadScope::National), Duration::from_secs(600));
    assert_eq!(cs.auth.check(&new).expect("new token").key_id, "k2", "the newest key seals");
    cs.reader(&old).await.try_totals(national(), None).await.expect("old-key token still accepted");
    cs.reader(&new).await.try_totals(national(), None).await.expect("new-key token accepted");
    // Retire k1: its tokens are refused, k2's still work.
    cs.replace("keys", &keys(&[K2]));
    let old_reader = cs.reader(&old).await;
    let err = eventually("k1 tokens refused", DEADLINE, || async {
        match old_reader.try_totals(national(), None).await {
            Err(e) => Ok(e),
            Ok(_) => Err("still accepted".into()),
        }
    })
    .await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("k1"), "names the retired key: {}", err.message());
    cs.reader(&new).await.try_totals(national(), None).await.expect("k2 token still accepted");
}

#[tokio::test]
async fn revoked_site_is_cut_off_and_its_running_stream_closed() {
    let cs = CredServer::start(&keys(&[K1]), QuotaConfig::default()).await;
    let (a, b) = site_ids(&cs);
    let (token_a, token_b) = (cs.auth.site_token(&a), cs.auth.site_token(&b));
    let mut stream_a = open_stream(cs.server_channel().await, Some(&token_a), Some(&a), Some("1")).await.expect("a");
    let mut stream_b = open_stream(cs.server_channel().await, Some(&token_b), Some(&b), Some("1")).await.expect("b");
    assert!(stream_a.send_batch(vec![report(1, 1, 5)]).await.rejections.is_empty());
    // A read token revoked by its id, in the same file.
    let read = cs.auth.read_token("lost laptop");
    let read_id = cs.auth.check(&read).expect("read token").token_id;
    let mut watch = cs.reader(&read).await.watch(national(), None, false).await.expect("watch before revocation");
    cs.replace("revoked", &format!("# lost on 30 Nov\n{a}\n{read_id}  # dashboard of the lobby\n"));
    // The running stream is closed, saying why.
    let closed = within("revoked stream closes", async {
        loop {
            match stream_a.next().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await;
    let err = closed.expect_err("the stream ends with an error");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("revoked"), "says revoked: {}", err.message());
    // The revoked read token's running watch ends too.
    let ended = within("revoked watch ends", async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await;
    let err = ended.expect_err("the watch ends with an error");
    assert!(err.code() == Code::Unauthenticated && err.message().contains("revoked"), "{err:?}");
    // New streams of the site and calls with the revoked read token are refused.
    let err = open_stream(cs.server_channel().await, Some(&token_a), Some(&a), Some("1")).await.err().expect("refused");
    assert!(err.code() == Code::Unauthenticated && err.message().contains("revoked"), "{err:?}");
    let err = cs.reader(&read).await.try_totals(national(), None).await.expect_err("refused");
    assert!(err.code() == Code::Unauthenticated && err.message().contains("revoked"), "{err:?}");
    // Another site is unaffected, on its running stream too.
    assert!(stream_b.send_batch(vec![report(1, 1, 3)]).await.rejections.is_empty());
    cs.reader(&cs.auth.read_token("ops")).await.try_totals(national(), None).await.expect("other read token");
    // Taken off the list: admitted again.
    cs.replace("revoked", "# empty\n");
    eventually("site readmitted", DEADLINE, || async {
        open_stream(cs.server_channel().await, Some(&token_a), Some(&a), Some("1"))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
}

#[tokio::test]
async fn province_read_token_cannot_read_another_province() {
    let cs = CredServer::start(&keys(&[K1]), QuotaConfig::default()).await;
    let (mine, other) = (&cs.registry.provinces[0], &cs.registry.provinces[1]);
    let my_site = cs.registry.sites.iter().find(|s| s.province == 0).expect("a site in province 0");
    let their_site = cs.registry.sites.iter().find(|s| s.province == 1).expect("a site in province 1");
    let token = cs.mint(Grant::Read(ReadScope::Province(mine.code.clone())), Duration::from_secs(600));
    let r = cs.reader(&token).await;
    r.try_totals(province(&mine.code), None).await.expect("own province");
    r.try_totals(site(&my_site.id), None).await.expect("a site of its province");
    for (what, scope) in
        [("other province", province(&other.code)), ("nation", national()), ("other site", site(&their_site.id))]
    {
        let err = r.try_totals(scope, None).await.expect_err(what);
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
        assert!(err.message().contains(&mine.code), "{what}: names its province: {}", err.message());
    }
    assert_eq!(r.watch(province(&other.code), None, false).await.expect_err("watch").code(), Code::PermissionDenied);
    let mut c = r.client.clone();
    let err =
        c.corrections(r.req(headcount::proto::v1::CorrectionsRequest { limit: 10 })).await.expect_err("corrections");
    assert_eq!(err.code(), Code::PermissionDenied);

    // HTTP: the same rules.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (addr, _) = headcount::server::http::spawn(
        listener,
        cs.server.aggregator.clone(),
        cs.auth.clone(),
        headcount::server::http::HttpConfig::default(),
    )
    .expect("http");
    let http = reqwest::Client::new();
    let get = |scope: String| {
        let req = http.get(format!("http://{addr}/api/totals?scope={scope}")).bearer_auth(&token);
        async move { within("GET", req.send()).await.expect("GET").status().as_u16() }
    };
    assert_eq!(get(format!("province:{}", mine.code)).await, 200);
    assert_eq!(get(format!("site:{}", my_site.id)).await, 200);
    assert_eq!(get(format!("province:{}", other.code)).await, 403);
    assert_eq!(get("national".into()).await, 403);
    assert_eq!(get(format!("site:{}", their_site.id)).await, 403);
    let national_token = cs.auth.read_token("national");
    let status = within(
        "GET",
        http.get(format!("http://{addr}/api/totals?scope=province:{}", other.code)).bearer_auth(&national_token).send(),
    )
    .await
    .expect("GET")
    .status();
    assert_eq!(status.as_u16(), 200, "a national token reads every province");
    // An expired token over HTTP: 401 saying so.
    let expired = cs.mint(Grant::Read(ReadScope::National), Duration::ZERO);
    let r =
        within("GET", http.get(format!("http://{addr}/api/totals")).bearer_auth(&expired).send()).await.expect("GET");
    assert_eq!(r.status().as_u16(), 401);
    let body = within("body", r.text()).await.expect("body");
    assert!(body.contains("expired"), "says it expired: {body}");
}

#[tokio::test]
async fn rate_limited_token_gets_resource_exhausted_others_unaffected() {
    let quotas = QuotaConfig {
        ingest_per_second: 1,
        ingest_burst: 3,
        read_per_second: 1,
        read_burst: 3,
        max_watchers_per_token: 1,
    };
    let metrics = headcount::server::http::metrics::install().expect("metrics recorder");
    let cs = CredServer::start(&keys(&[K1]), quotas).await;
    // Reads: a burst of 3, then RESOURCE_EXHAUSTED with a retry hint.
    let (noisy, quiet) = (cs.auth.read_token("noisy"), cs.auth.read_token("quiet"));
    let r = cs.reader(&noisy).await;
    let mut refused = None;
    for _ in 0..50 {
        if let Err(e) = r.try_totals(national(), None).await {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("the noisy token is limited within 50 calls");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let hint = err.metadata().get(RETRY_AFTER_MS_HEADER).expect("retry hint").to_str().expect("ASCII");
    assert!(hint.parse::<u64>().expect("milliseconds") > 0, "hint {hint}");
    cs.reader(&quiet).await.try_totals(national(), None).await.expect("another token is unaffected");

    // Watchers: one per token.
    let w = cs.reader(&quiet).await;
    let _first = w.watch(national(), None, false).await.expect("first watcher");
    let err = w.watch(national(), None, false).await.expect_err("second watcher of the same token");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // Ingest: a site over its batch rate has its stream ended; another site goes on.
    let (a, b) = site_ids(&cs);
    let mut sa =
        open_stream(cs.server_channel().await, Some(&cs.auth.site_token(&a)), Some(&a), Some("1")).await.expect("a");
    let mut sb =
        open_stream(cs.server_channel().await, Some(&cs.auth.site_token(&b)), Some(&b), Some("1")).await.expect("b");
    let mut ended = None;
    for seq in 1..=50u64 {
        sa.send(batch(vec![report(1, seq, seq as i64)])).await;
        match sa.next().await {
            Ok(Some(_)) => {}
            other => {
                ended = Some(other);
                break;
            }
        }
    }
    let err = ended.expect("site a limited within 50 batches").expect_err("ends with an error");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.metadata().get(RETRY_AFTER_MS_HEADER).is_some(), "retry hint on ingest");
    assert!(sb.send_batch(vec![report(1, 1, 2)]).await.rejections.is_empty(), "site b unaffected");
    // Every refusal is counted in /metrics, by kind.
    let text = metrics.render();
    for kind in ["read", "watchers", "ingest"] {
        let line = format!("headcount_quota_refused_total{{kind=\"{kind}\"}}");
        assert!(text.lines().any(|l| l.starts_with(&line)), "{line} in /metrics:\n{text}");
    }
}
