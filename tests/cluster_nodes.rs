//! Cluster mode with in-process aggregator nodes on a real local etcd (one member: these tests
//! are about what the nodes share, not about etcd's fault tolerance, which `cluster.rs` covers
//! with real processes): install slots unique across nodes, one audit trail on every node, a
//! node started late lists everything, and a stale write never overrides a newer one.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{
    DEADLINE, Reader, SECRET, correction, eventually, national, report, site, small_registry, test_config, within,
};
use headcount::{
    client::cluster::etcd::LocalEtcd,
    proto::{
        metadata::AGENT_HEADER,
        v1::{ReportRequest, ReportResponse, TotalsRequest, ingest_client::IngestClient, report_response},
    },
    server::{
        Aggregator, Auth, RunningServer, Transport,
        cluster::ClusterConfig,
        ingest::{DESK_HEADER, SITE_HEADER},
        registry::Registry,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;

/// A node: its aggregator handle and its server.
struct Node {
    agg: Aggregator,
    server: RunningServer,
}

async fn node(registry: &Registry, endpoints: Vec<String>, name: &str) -> Node {
    node_with(registry, endpoints, name, test_config()).await
}

async fn node_with(
    registry: &Registry,
    endpoints: Vec<String>,
    name: &str,
    config: headcount::server::AggregatorConfig,
) -> Node {
    let mut cluster = ClusterConfig::new(endpoints, name);
    cluster.lease_ttl = Duration::from_secs(3);
    let agg = within("open a cluster node", Aggregator::open_cluster(registry.clone(), config, cluster))
        .await
        .expect("cluster node opens on the local etcd");
    let transport = Transport { grace: Duration::from_millis(500), ..Transport::default() };
    let auth = Auth::new(SECRET).expect("test secret");
    let server = RunningServer::start("127.0.0.1:0".parse().unwrap(), agg.clone(), auth, transport).await.unwrap();
    Node { agg, server }
}

async fn etcd() -> (tempfile::TempDir, LocalEtcd) {
    let dir = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(1, dir.path()).await.expect("etcd is installed (scripts/test.sh installs it)");
    (dir, etcd)
}

fn auth() -> Auth {
    Auth::new(SECRET).expect("test secret")
}

/// Opens an ingest stream as agent install `install` of `site` and returns its resume's slot
/// and the sender/receiver of the stream.
async fn open_install(
    url: &str,
    site: &str,
    install: &str,
) -> (u32, mpsc::Sender<ReportRequest>, tonic::Streaming<ReportResponse>) {
    let (tx, rx) = mpsc::channel(16);
    let mut req = Request::new(ReceiverStream::new(rx));
    let md = req.metadata_mut();
    md.insert("authorization", format!("Bearer {}", auth().site_token(site)).parse().unwrap());
    md.insert(SITE_HEADER, site.parse().unwrap());
    md.insert(DESK_HEADER, "1".parse().unwrap());
    md.insert(AGENT_HEADER, install.parse().unwrap());
    let channel = common::channel_to(url).await;
    let mut stream = within("open", IngestClient::new(channel).report(req)).await.expect("stream opens").into_inner();
    match within("resume", stream.message()).await.expect("resume") {
        Some(ReportResponse { kind: Some(report_response::Kind::Resume(r)) }) => (r.agent_slot, tx, stream),
        other => panic!("expected a resume, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_slots_are_unique_across_nodes() {
    let (_dir, etcd) = etcd().await;
    let registry = small_registry();
    let (a, b) = (node(&registry, etcd.endpoints(), "a").await, node(&registry, etcd.endpoints(), "b").await);
    let site_id = registry.sites[0].id.clone();
    // Eight installs of one site open at once, alternately on the two nodes.
    let opens = (0..8).map(|i| {
        let url = if i % 2 == 0 { a.server.url() } else { b.server.url() };
        let site_id = site_id.clone();
        async move { open_install(&url, &site_id, &format!("install{i:02}abcdef")).await.0 }
    });
    let mut slots = futures_join(opens).await;
    slots.sort_unstable();
    assert_eq!(slots, (1..=8).collect::<Vec<u32>>(), "every install got its own slot, whichever node it opened on");
    for n in [&a, &b] {
        eventually("both nodes know all eight installs", DEADLINE, || async {
            let n = n.agg.shared().installs.count(0);
            if n == 8 { Ok(()) } else { Err(format!("{n} installs known")) }
        })
        .await;
    }
    // The same install again, on the other node: its slot, not a new one.
    let again = open_install(&b.server.url(), &site_id, "install00abcdef").await.0;
    let first = open_install(&a.server.url(), &site_id, "install00abcdef").await.0;
    assert_eq!(again, first);
}

/// Runs the futures concurrently, results in order.
async fn futures_join<F: Future<Output = u32> + Send + 'static>(futs: impl Iterator<Item = F>) -> Vec<u32> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_holds_the_same_audit_trail_and_totals() {
    let (_dir, etcd) = etcd().await;
    let registry = small_registry();
    let (a, b) = (node(&registry, etcd.endpoints(), "a").await, node(&registry, etcd.endpoints(), "b").await);
    let (s1, s2) = (registry.sites[1].id.clone(), registry.sites[2].id.clone());
    let ts = common::TestServer { server: a.server, auth: auth(), registry: registry.clone() };
    let tb = common::TestServer { server: b.server, auth: auth(), registry: registry.clone() };
    let mut on_a = ts.open(&ts.channel().await, &s1, 1).await;
    let mut on_b = tb.open(&tb.channel().await, &s2, 1).await;
    let ack = on_a.send_batch(vec![report(1, 1, 40)]).await;
    assert!(ack.revision > 0, "a cluster ack carries the etcd revision it was committed at");
    on_b.send_batch(vec![report(1, 1, 30)]).await;
    on_a.send_batch(vec![correction(1, 2, 35, "recount at the door")]).await;
    let last = on_b.send_batch(vec![correction(1, 2, 20, "duplicate scans")]).await;
    // Read-your-writes on the OTHER node: at least the revision of the last ack.
    let reader_a = ts.reader().await;
    let mut req =
        reader_a.req(TotalsRequest { scope: Some(national()), session: Some(1), min_revision: last.revision });
    req.set_timeout(Duration::from_secs(10));
    let totals = within("min_revision read", reader_a.client.clone().get_totals(req)).await.unwrap().into_inner();
    assert_eq!(totals.count, 55, "node a shows node b's correction once it reached its revision");
    assert!(totals.revision >= last.revision);
    let reader_b = tb.reader().await;
    for r in [&reader_a, &reader_b] {
        eventually("both corrections on the node, in one order", DEADLINE, || async {
            let trail = r.corrections(0).await.corrections;
            if trail.len() == 2 { Ok(()) } else { Err(format!("{} corrections", trail.len())) }
        })
        .await;
    }
    let (ta, tb_) = (reader_a.corrections(0).await.corrections, reader_b.corrections(0).await.corrections);
    assert_eq!(ta, tb_, "the same trail on every node");
    assert_eq!(reader_b.count(site(&s1), Some(1)).await, 35);
    assert_eq!(reader_b.count(national(), None).await, 55);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_late_lists_everything_and_a_stale_write_changes_nothing() {
    let (_dir, etcd) = etcd().await;
    let registry = small_registry();
    let a = node(&registry, etcd.endpoints(), "a").await;
    let ta = common::TestServer { server: a.server, auth: auth(), registry: registry.clone() };
    let ch = ta.channel().await;
    let mut expected = 0;
    for (i, s) in registry.sites.iter().take(10).enumerate() {
        let mut stream = ta.open(&ch, &s.id, 1).await;
        stream.send_batch(vec![report(1, 5, i as i64 + 1)]).await;
        expected += i as i64 + 1;
    }
    let c = node(&registry, etcd.endpoints(), "c").await;
    let tc = common::TestServer { server: c.server, auth: auth(), registry: registry.clone() };
    let reader_c = tc.reader().await;
    assert_eq!(reader_c.count(national(), Some(1)).await, expected, "listed at start: exact before any watch event");
    // The same register written through node c with an older seq: refused by the counting rule
    // on c, and even a forced write could not win in etcd (compare-and-set on seq).
    let s0 = &registry.sites[0].id;
    let mut stale = tc.open(&tc.channel().await, s0, 1).await;
    assert_eq!(stale.resumed(1), (5, 1), "the resume on c shows what a acknowledged");
    stale.send_batch(vec![report(1, 4, 999)]).await;
    stale.send_batch(vec![report(1, 6, 2)]).await;
    let reader_a = Reader::new(ta.channel().await, Some(ta.read_token()));
    eventually("the newer seq reaches node a", DEADLINE, || async {
        let n = reader_a.count(site(s0), Some(1)).await;
        if n == 2 { Ok(()) } else { Err(format!("site count {n}")) }
    })
    .await;
    assert_eq!(reader_a.count(national(), Some(1)).await, expected + 1);
    assert_eq!(reader_c.count(national(), Some(1)).await, expected + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compare_and_set_on_seq_creates_raises_and_never_lowers() {
    use headcount::server::{cluster::commit::compare_and_set, replication::keys};
    let (_dir, etcd) = etcd().await;
    let client = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    let key = "/t/r/S1/1/1".to_owned();
    let write = |seq: u64, count: i64| {
        let (mut kv, key) = (client.kv_client(), key.clone());
        async move {
            kv.txn(etcd_client::Txn::new().and_then([compare_and_set(key.clone(), seq, count)])).await.unwrap();
            let got = kv.get(key, None).await.unwrap();
            keys::parse_register(got.kvs()[0].value()).unwrap()
        }
    };
    assert_eq!(write(7, 70).await, (7, 70), "a missing register is created");
    assert_eq!(write(5, 999).await, (7, 70), "an older seq changes nothing");
    assert_eq!(write(7, 1).await, (7, 70), "the same seq changes nothing");
    assert_eq!(write(10, 9).await, (10, 9), "seq 10 > seq 7 although \"10\" < \"7\" as text");
    assert_eq!(write(u64::MAX, 3).await, (u64::MAX, 3));
    assert_eq!(write(u64::MAX - 1, 4).await, (u64::MAX, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_across_a_compaction_lists_again_and_ends_exact() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (_dir, etcd) = etcd().await;
    let registry = small_registry();
    let upstream = etcd.endpoint(0).trim_start_matches("http://").parse().expect("etcd endpoint is host:port");
    let proxy = common::Proxy::start(upstream).await;
    let a = node(&registry, etcd.endpoints(), "a").await;
    let b = node(&registry, vec![proxy.url()], "b").await;
    let (ta, tb) = (
        common::TestServer { server: a.server, auth: auth(), registry: registry.clone() },
        common::TestServer { server: b.server, auth: auth(), registry: registry.clone() },
    );
    let (reader_a, reader_b) = (ta.reader().await, tb.reader().await);
    let ch = ta.channel().await;
    let mut first = ta.open(&ch, &registry.sites[0].id, 1).await;
    first.send_batch(vec![report(1, 1, 5)]).await;
    eventually("node b sees the first write", DEADLINE, || async {
        let n = reader_b.count(national(), Some(1)).await;
        if n == 5 { Ok(()) } else { Err(format!("b shows {n}")) }
    })
    .await;
    // Cut node b off from etcd; meanwhile node a writes and etcd compacts its history.
    proxy.set_blocked(true);
    proxy.cut_all().await;
    for (i, s) in registry.sites.iter().enumerate().skip(1).take(8) {
        let mut stream = ta.open(&ch, &s.id, 1).await;
        stream.send_batch(vec![report(1, 1, i as i64)]).await;
    }
    first.send_batch(vec![correction(1, 2, 3, "recount while b was away")]).await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    let now = client.get("/headcount/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    let revision = now.header().unwrap().revision();
    client.compact(revision, None).await.expect("compact etcd's history");
    eventually("node b fences itself off within its lease", DEADLINE, || async {
        if b.agg.shared().replication.as_ref().unwrap().is_healthy() { Err("still healthy".to_owned()) } else { Ok(()) }
    })
    .await;
    // Back: its watch cannot resume from a compacted revision, so it lists again.
    proxy.set_blocked(false);
    let want = reader_a.count(national(), Some(1)).await;
    assert_eq!(want, 3 + (1..=8).sum::<i64>());
    eventually("node b lists again and shows node a's totals", DEADLINE, || async {
        let n = reader_b.count(national(), Some(1)).await;
        if n == want { Ok(()) } else { Err(format!("b shows {n}, a {want}")) }
    })
    .await;
    eventually("node b accepts streams again", DEADLINE, || async {
        if b.agg.shared().replication.as_ref().unwrap().is_healthy() { Ok(()) } else { Err("fenced".to_owned()) }
    })
    .await;
    let trail = reader_b.corrections(0).await.corrections;
    assert_eq!(trail.len(), 1, "the correction made while b was away is in its trail, once");
}

/// An etcd member serving its clients over TLS and requiring client certificates, killed on drop.
struct TlsEtcd(std::process::Child);

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_etcd_over_tls_with_its_client_certificate_and_is_refused_without() {
    use headcount::server::cluster::EtcdTls;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "etcd test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let issue = |cn: &str, names: Vec<String>| {
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        (p.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = issue("etcd", vec!["127.0.0.1".into()]);
    let (client_cert, client_key) = issue("agg-1", vec![]);
    let path = |n: &str| dir.path().join(n);
    for (name, pem) in [("ca.pem", &ca_pem), ("server.pem", &server_cert), ("server.key", &server_key)] {
        std::fs::write(path(name), pem).unwrap();
    }
    let ports: Vec<u16> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect::<Vec<_>>()
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    let (client, peer) = (format!("https://127.0.0.1:{}", ports[0]), format!("http://127.0.0.1:{}", ports[1]));
    let binary = headcount::client::cluster::etcd::etcd_binary().expect("etcd is installed (scripts/test.sh)");
    let _etcd = TlsEtcd(
        std::process::Command::new(binary)
            .args(["--name", "tls", "--data-dir"])
            .arg(path("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("tls={peer}"), "--client-cert-auth"])
            .arg("--cert-file")
            .arg(path("server.pem"))
            .arg("--key-file")
            .arg(path("server.key"))
            .arg("--trusted-ca-file")
            .arg(path("ca.pem"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start etcd"),
    );
    let registry = small_registry();
    let config = |identity: Option<(Vec<u8>, Vec<u8>)>| {
        let mut c = ClusterConfig::new(vec![client.clone()], "agg-1");
        c.tls = Some(EtcdTls { ca: ca_pem.clone().into_bytes(), identity });
        c
    };
    let with_cert = Some((client_cert.clone().into_bytes(), client_key.clone().into_bytes()));
    let agg = eventually("a node opens over TLS with its client certificate", DEADLINE, || async {
        Aggregator::open_cluster(registry.clone(), test_config(), config(with_cert.clone()))
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    let rep = agg.shared().replication.clone().unwrap();
    assert!(rep.barrier().await.unwrap() > 0, "writes reach etcd over TLS");
    let refused = Aggregator::open_cluster(registry.clone(), test_config(), config(None)).await;
    assert!(refused.is_err(), "etcd refuses a node without a client certificate");
    let plain =
        Aggregator::open_cluster(registry.clone(), test_config(), ClusterConfig::new(vec![client.clone()], "x")).await;
    let why = plain.err().expect("https without a CA is refused").to_string();
    assert!(why.contains("--etcd-ca"), "{why}");
    agg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_streaming_on_one_node_is_reporting_on_every_node_until_its_stream_ends() {
    let (_dir, etcd) = etcd().await;
    let registry = small_registry();
    let silent_after = Duration::from_millis(800);
    let config = headcount::server::AggregatorConfig { silent_after, ..test_config() };
    let a = node_with(&registry, etcd.endpoints(), "a", config.clone()).await;
    let b = node_with(&registry, etcd.endpoints(), "b", config).await;
    let (ta, tb) = (
        common::TestServer { server: a.server, auth: auth(), registry: registry.clone() },
        common::TestServer { server: b.server, auth: auth(), registry: registry.clone() },
    );
    let reader_b = tb.reader().await;
    let id = registry.sites[3].id.clone();
    let reporting_on_b = || async { reader_b.totals(site(&id), None).await.sites_reporting };
    assert_eq!(reporting_on_b().await, 0, "never seen: silent");
    // A stream on node a that reports once, then stays open and idle (no heartbeats).
    let mut stream = ta.open(&ta.channel().await, &id, 1).await;
    stream.send_batch(vec![report(1, 1, 2)]).await;
    let since = std::time::Instant::now();
    eventually("node b counts the site as reporting well past the silence interval", DEADLINE, || async {
        let reporting = reporting_on_b().await;
        if reporting == 1 && since.elapsed() > silent_after * 3 {
            Ok(())
        } else {
            Err(format!("reporting {reporting} after {:?}", since.elapsed()))
        }
    })
    .await;
    // The stream ends: its presence key goes, and node b flags the site silent.
    drop(stream);
    eventually("node b flags the site silent once its only stream (on node a) ended", DEADLINE, || async {
        let reporting = reporting_on_b().await;
        if reporting == 0 { Ok(()) } else { Err(format!("reporting {reporting}")) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_a_running_nodes_name_is_refused() {
    let (_dir, etcd) = etcd().await;
    let registry = small_registry();
    let _a = node(&registry, etcd.endpoints(), "agg-1").await;
    let mut twin = ClusterConfig::new(etcd.endpoints(), "agg-1");
    twin.lease_ttl = Duration::from_secs(2);
    let refused =
        within("the twin's start gives up after its wait", Aggregator::open_cluster(registry, test_config(), twin))
            .await
            .err()
            .expect("a second node named agg-1 is refused while the first runs");
    assert!(refused.to_string().contains("--node"), "{refused}");
}
