//! TLS end to end, with certificates generated here (rcgen): the agent and the dashboard over
//! TLS on all three listeners, a wrong CA refused, a certificate renewed on disk while streams
//! run, mTLS site identity, and the client's refusal of plain text to a non-loopback address.

mod common;

use std::{path::Path, sync::Arc, time::Duration};

use common::{
    DEADLINE, Reader, SECRET, eventually, memory_reporter, national, open_stream, report, small_registry, test_config,
    wait_connected, within,
};
use headcount::{
    client::connect::{self, ConnectError, ConnectOptions},
    server::{
        Aggregator, Auth, RunningServer, Transport,
        http::HttpConfig,
        tls::{ServerTls, TlsSettings},
    },
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, transport::Channel};

/// A CA that signs server and client certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Self { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// (certificate PEM, key PEM) for `names` (DNS names or IP addresses), subject CN `cn` (none
    /// when empty).
    fn issue(&self, cn: &str, names: &[&str]) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("leaf params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        if !cn.is_empty() {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes `content` to `path` atomically (as certificate renewal tools do).
fn write(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write a temporary file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// A TLS aggregator on 127.0.0.1 with its certificate files in a temporary directory.
struct TlsServer {
    server: RunningServer,
    tls: ServerTls,
    auth: Auth,
    dir: tempfile::TempDir,
}

impl TlsServer {
    async fn start(ca: &Ca, client_ca: Option<&Ca>) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (cert, key) = ca.issue("aggregator", &["127.0.0.1", "localhost"]);
        write(&dir.path().join("cert.pem"), &cert);
        write(&dir.path().join("key.pem"), &key);
        let client_ca = client_ca.map(|c| {
            let path = dir.path().join("client-ca.pem");
            write(&path, &c.pem);
            path
        });
        let tls = ServerTls::load(TlsSettings {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            client_ca,
            poll: Duration::from_millis(50),
        })
        .expect("load the test certificate");
        let auth = Auth::new(SECRET).expect("test secret");
        let agg = Aggregator::new(small_registry(), test_config());
        let transport = Transport { grace: Duration::from_millis(500), tls: Some(tls.clone()), ..Transport::default() };
        let server = RunningServer::start("127.0.0.1:0".parse().expect("address"), agg, auth.clone(), transport)
            .await
            .expect("bind 127.0.0.1");
        Self { server, tls, auth, dir }
    }

    fn url(&self) -> String {
        format!("https://{}", self.server.addr)
    }

    fn ca_file(&self, ca: &Ca, name: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        write(&path, &ca.pem);
        path
    }

    fn site(&self, n: usize) -> String {
        self.server.aggregator.registry().sites[n].id.clone()
    }
}

fn trusting(ca: &Path) -> ConnectOptions {
    ConnectOptions { ca: Some(ca.to_owned()), ..ConnectOptions::default() }
}

async fn tls_channel(url: &str, opts: &ConnectOptions) -> Channel {
    within("TLS connect", connect::channel_with(url, opts)).await.unwrap_or_else(|e| panic!("{e}"))
}

/// One HTTP/1.1 GET over TLS (ALPN http/1.1); returns the whole response.
async fn https_get(addr: std::net::SocketAddr, ca_pem: &str, path: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add the CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(headcount::server::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = within("TCP connect", tokio::net::TcpStream::connect(addr)).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("IP name");
    let mut tls = within("TLS handshake", connector.connect(name, tcp)).await.expect("TLS handshake");
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    within("send", tls.write_all(request.as_bytes())).await.expect("write the request");
    let mut response = Vec::new();
    // The server closes after the response (Connection: close); a missing close_notify is fine.
    let _ = within("read", tls.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn agent_and_dashboard_over_tls_on_every_listener() {
    let ca = Ca::new("test CA");
    let ts = TlsServer::start(&ca, None).await;
    let opts = trusting(&ts.ca_file(&ca, "ca.pem"));
    let ch = tls_channel(&ts.url(), &opts).await;
    let site = ts.site(0);
    let agent = memory_reporter(&ch, &ts.auth, &site, 1);
    wait_connected(&agent, "agent over TLS").await;
    agent.check_in(1, 7).await.expect("check in");
    common::flush(&agent, "agent over TLS").await;
    let reader = Reader::new(ch.clone(), Some(ts.auth.read_token("tls")));
    assert_eq!(reader.count(national(), Some(1)).await, 7, "dashboard over TLS reads what the agent sent");

    // The read listener, with the same certificate.
    let read = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the read listener");
    let read_url = format!("https://{}", read.local_addr().expect("read address"));
    let transport = Transport { tls: Some(ts.tls.clone()), ..Transport::default() };
    headcount::server::serve::spawn_read_server(read, ts.server.aggregator.clone(), ts.auth.clone(), transport)
        .expect("read thread");
    let reader = Reader::new(tls_channel(&read_url, &opts).await, Some(ts.auth.read_token("tls")));
    assert_eq!(reader.count(national(), Some(1)).await, 7, "read listener over TLS");

    // The HTTP listener, HTTP/1.1 over TLS.
    let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the HTTP listener");
    let config = HttpConfig { public: true, tls: Some(ts.tls.clone()), ..HttpConfig::default() };
    let (addr, _) = headcount::server::http::spawn(http, ts.server.aggregator.clone(), ts.auth.clone(), config)
        .expect("HTTP thread");
    let response = https_get(addr, &ca.pem, "/api/totals?session=1").await;
    assert!(response.starts_with("HTTP/1.1 200"), "HTTPS GET /api/totals: {response}");
    assert!(response.contains("\"count\":7"), "totals in the answer: {response}");

    // A plain-text client to the TLS listener gets nothing.
    let plain = format!("http://{}", ts.server.addr);
    let refused = Reader::new(connect::lazy_channel(&plain).expect("loopback http is allowed"), None);
    assert!(refused.try_totals(national(), None).await.is_err(), "plain text to a TLS listener must fail");
    agent.shutdown().await;
}

#[tokio::test]
async fn a_wrong_ca_is_refused_with_a_clear_error() {
    let ca = Ca::new("test CA");
    let other = Ca::new("another CA");
    let ts = TlsServer::start(&ca, None).await;
    let opts = trusting(&ts.ca_file(&other, "other-ca.pem"));
    let err = within("connect with the wrong CA", connect::channel_with(&ts.url(), &opts))
        .await
        .expect_err("a certificate from another CA must be refused");
    let message = err.to_string();
    assert!(matches!(err, ConnectError::Connect { .. }), "{message}");
    assert!(message.contains(&ts.url()), "the error names the address: {message}");
    assert!(message.to_lowercase().contains("certificate"), "the error says it is the certificate: {message}");
    // And the system roots do not vouch for a private CA either.
    let err = within("connect with the system roots", connect::channel(&ts.url()))
        .await
        .expect_err("a private CA is not in the system roots");
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
}

#[tokio::test]
async fn a_renewed_certificate_drops_no_stream_and_serves_new_connections() {
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let ts = TlsServer::start(&old_ca, None).await;
    let old_opts = trusting(&ts.ca_file(&old_ca, "old-ca.pem"));
    let new_opts = trusting(&ts.ca_file(&new_ca, "new-ca.pem"));
    let ch = tls_channel(&ts.url(), &old_opts).await;
    let sites: Vec<String> = (0..8).map(|i| ts.site(i)).collect();
    let mut streams = Vec::new();
    for site in &sites {
        let token = ts.auth.site_token(site);
        let mut s = open_stream(ch.clone(), Some(&token), Some(site), Some("1")).await.expect("open a stream");
        let ack = s.send_batch(vec![report(1, 1, 1)]).await;
        assert!(ack.rejections.is_empty(), "{ack:?}");
        streams.push(s);
    }

    // Renew: a certificate from another CA (so which one is served is visible to clients), the
    // certificate file first, as renewal tools do: alone it does not go with the old key.
    let (cert, key) = new_ca.issue("aggregator", &["127.0.0.1"]);
    write(&ts.dir.path().join("cert.pem"), &cert);
    let store = ts.tls.store().clone();
    eventually("the half-renewed pair is tried and refused", DEADLINE, || {
        let failures = store.failures();
        async move { if failures >= 1 { Ok(()) } else { Err(format!("failures {failures}")) } }
    })
    .await;
    assert_eq!(store.generation(), 0, "a certificate without its key is not served");
    let old = within("connect trusting the old CA", connect::channel_with(&ts.url(), &old_opts)).await;
    assert!(old.is_ok(), "the old certificate is still served: {:?}", old.err());
    write(&ts.dir.path().join("key.pem"), &key);
    eventually("the renewed certificate is loaded", DEADLINE, || {
        let generation = store.generation();
        async move { if generation >= 1 { Ok(()) } else { Err(format!("generation {generation}")) } }
    })
    .await;
    let fresh = tls_channel(&ts.url(), &new_opts).await;
    let reader = Reader::new(fresh, Some(ts.auth.read_token("tls")));
    assert!(reader.try_totals(national(), None).await.is_ok(), "a new connection gets the new certificate");
    let stale = within("connect trusting the old CA", connect::channel_with(&ts.url(), &old_opts)).await;
    assert!(stale.is_err(), "new connections no longer get the old certificate");

    // Every stream opened before the renewal is still the same stream.
    for s in &mut streams {
        let ack = s.send_batch(vec![report(1, 2, 2)]).await;
        assert!(ack.rejections.is_empty(), "{ack:?}");
    }
    assert_eq!(reader.count(national(), Some(1)).await, 2 * sites.len() as i64);

    // A broken renewal keeps the certificate that works.
    write(&ts.dir.path().join("cert.pem"), "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n");
    eventually("the broken certificate is tried", DEADLINE, || {
        let failures = store.failures();
        async move { if failures >= 2 { Ok(()) } else { Err(format!("failures {failures}")) } }
    })
    .await;
    assert_eq!(store.generation(), 1, "a broken pair is not served");
    let again = Reader::new(tls_channel(&ts.url(), &new_opts).await, Some(ts.auth.read_token("tls")));
    assert!(again.try_totals(national(), None).await.is_ok(), "still served the last good certificate");
    for s in &mut streams {
        let ack = s.send_batch(vec![report(1, 3, 3)]).await;
        assert!(ack.rejections.is_empty(), "{ack:?}");
    }
}

#[tokio::test]
async fn mtls_a_site_certificate_reports_for_its_own_site_only() {
    let ca = Ca::new("server CA");
    let sites_ca = Ca::new("sites CA");
    let ts = TlsServer::start(&ca, Some(&sites_ca)).await;
    let (own, other) = (ts.site(3), ts.site(4));
    let (cert, key) = sites_ca.issue(&own, &[]);
    write(&ts.dir.path().join("site.pem"), &cert);
    write(&ts.dir.path().join("site-key.pem"), &key);
    let opts = ConnectOptions {
        tls_client_cert: Some(ts.dir.path().join("site.pem")),
        tls_client_key: Some(ts.dir.path().join("site-key.pem")),
        ..trusting(&ts.ca_file(&ca, "ca.pem"))
    };
    let ch = tls_channel(&ts.url(), &opts).await;

    let refused = open_stream(ch.clone(), None, Some(&other), Some("1")).await.err().expect("another site is refused");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(&own) && refused.message().contains(&other), "{refused:?}");

    let mut stream = open_stream(ch.clone(), None, Some(&own), Some("1")).await.expect("own site, no token");
    let ack = stream.send_batch(vec![report(1, 1, 5)]).await;
    assert!(ack.rejections.is_empty(), "{ack:?}");
    let reader = Reader::new(ch.clone(), Some(ts.auth.read_token("tls")));
    assert_eq!(reader.count(common::site(&own), Some(1)).await, 5, "the certificate's site counts");

    // A certificate from the right CA that names no site grants nothing.
    let (nameless, nameless_key) = sites_ca.issue("", &[]);
    write(&ts.dir.path().join("nameless.pem"), &nameless);
    write(&ts.dir.path().join("nameless-key.pem"), &nameless_key);
    let nameless = ConnectOptions {
        tls_client_cert: Some(ts.dir.path().join("nameless.pem")),
        tls_client_key: Some(ts.dir.path().join("nameless-key.pem")),
        ..opts.clone()
    };
    let ch_nameless = tls_channel(&ts.url(), &nameless).await;
    let refused = open_stream(ch_nameless, None, Some(&own), Some("1")).await.err().expect("no CN, no site");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("CN"), "{refused:?}");

    // Without a client certificate, the token rule applies as before.
    let plain = tls_channel(&ts.url(), &trusting(&ts.ca_file(&ca, "ca2.pem"))).await;
    let anonymous = open_stream(plain.clone(), None, Some(&own), Some("1")).await.err().expect("no cert, no token");
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    let token = ts.auth.site_token(&other);
    assert!(open_stream(plain, Some(&token), Some(&other), Some("1")).await.is_ok(), "token still works");

    // A certificate from a CA the server does not trust fails the handshake.
    let (bad_cert, bad_key) = ca.issue(&own, &[]);
    write(&ts.dir.path().join("bad.pem"), &bad_cert);
    write(&ts.dir.path().join("bad-key.pem"), &bad_key);
    let bad = ConnectOptions {
        tls_client_cert: Some(ts.dir.path().join("bad.pem")),
        tls_client_key: Some(ts.dir.path().join("bad-key.pem")),
        ..opts.clone()
    };
    // With TLS 1.3 the client may only learn it from the first request.
    let opened = match within("connect with an untrusted client cert", connect::channel_with(&ts.url(), &bad)).await {
        Err(_) => None,
        Ok(ch) => open_stream(ch, None, Some(&own), Some("1")).await.ok(),
    };
    assert!(opened.is_none(), "an untrusted client certificate gets nowhere");
}

#[test]
fn plain_text_to_a_non_loopback_address_is_refused_unless_insecure() {
    for url in ["http://203.0.113.5:50051", "http://aggregator.example:50051", "http://10.0.0.1"] {
        let err = connect::endpoint(url).expect_err("plain text off loopback is refused");
        assert!(matches!(err, ConnectError::Plaintext { .. }), "{url}: {err}");
        assert!(err.to_string().contains(url), "the error names the address: {err}");
        assert!(err.to_string().contains("--insecure"), "the error says how to override: {err}");
        let insecure = ConnectOptions { insecure: true, ..ConnectOptions::default() };
        assert!(connect::endpoint_with(url, &insecure).is_ok(), "--insecure accepts {url}");
    }
    for url in ["http://127.0.0.1:50051", "http://127.8.9.1:1", "http://localhost:50051", "http://[::1]:50051"] {
        assert!(connect::endpoint(url).is_ok(), "loopback plain text is fine: {url}");
    }
    let with_ca = ConnectOptions { ca: Some("ca.pem".into()), ..ConnectOptions::default() };
    let err = connect::endpoint_with("http://127.0.0.1:50051", &with_ca).expect_err("--ca with http://");
    assert!(matches!(err, ConnectError::Scheme { .. }), "{err}");
    assert!(connect::endpoint("ftp://127.0.0.1:1").is_err(), "unknown scheme");
}

#[test]
fn the_cli_refuses_plain_text_to_a_non_loopback_address_before_connecting() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_headcount"))
        .args(["totals", "--server", "http://203.0.113.5:50051", "--token", "x"])
        .env_remove("HEADCOUNT_CA")
        .output()
        .expect("run headcount");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("http://203.0.113.5:50051") && stderr.contains("--insecure"), "{stderr}");
}

/// Runs the real `headcount` binary with `stdin`; returns (success, stdout, stderr).
async fn headcount(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount"))
        .args(args)
        .env("RUST_LOG", "error")
        .env_remove("HEADCOUNT_CA")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn headcount");
    let mut input = child.stdin.take().expect("piped stdin");
    input.write_all(stdin.as_bytes()).await.expect("write stdin");
    drop(input);
    let out = within("headcount command", child.wait_with_output()).await.expect("run headcount");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_totals_command_connects_with_ca_and_refuses_an_unknown_ca() {
    let ca = Ca::new("test CA");
    let ts = TlsServer::start(&ca, None).await;
    let ca_file = ts.ca_file(&ca, "ca.pem");
    let ca_arg = ca_file.to_str().expect("UTF-8 path");
    let site = ts.site(5);
    let ch = tls_channel(&ts.url(), &trusting(&ca_file)).await;
    let token = ts.auth.site_token(&site);
    let mut stream = open_stream(ch, Some(&token), Some(&site), Some("1")).await.expect("open a stream");
    assert!(stream.send_batch(vec![report(1, 1, 3)]).await.rejections.is_empty());

    let (url, read, scope) = (ts.url(), ts.auth.read_token("cli"), format!("site:{site}"));
    let totals =
        ["totals", "--server", &url, "--ca", ca_arg, "--token", &read, "--scope", &scope, "--session", "1", "--csv"];
    let (ok, stdout, stderr) = headcount(&totals, "").await;
    assert!(ok, "headcount totals over TLS: {stderr}");
    assert!(stdout.lines().nth(1).is_some_and(|row| row.contains(&site) && row.contains(",3,")), "{stdout}");

    // Without --ca the system roots are used, and they do not know the test CA.
    let (ok, _, stderr) = headcount(&["totals", "--server", &url, "--token", &read], "").await;
    assert!(!ok && stderr.contains("certificate"), "a private CA without --ca is refused: {stderr}");
}
