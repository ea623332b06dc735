//! Durability with real processes: the `headcount-server` binary is started as a child with a
//! data directory, killed with SIGKILL at random moments, its journal truncated or corrupted, and
//! restarted; acknowledged state must survive and the totals must end exact.

#![allow(missing_docs, clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use headcount::{
    client::{
        Reporter, ReporterConfig, connect,
        reporter::{backoff::BackoffConfig, state::MemoryStore},
    },
    proto::v1::{Scope, ScopeKind, TotalsRequest, totals_client::TotalsClient},
    server::{
        Auth,
        registry::{
            Registry,
            generate::{GenerateOptions, generate},
        },
    },
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};
use tonic::Request;

const SECRET: &str = "durability test secret, 32 bytes";
const DEADLINE: Duration = Duration::from_secs(30);
const SITES: u32 = 40;
const SEED: u64 = 11;

fn registry() -> Registry {
    // The server generates the same registry from `--seed` and `--sites`-less defaults would be
    // 10,035 sites; write a small one to CSV so both sides agree.
    generate(&GenerateOptions { sites: SITES, sites_per_commune: 3.0, mean_registered: 100, seed: SEED })
}

/// Polls `cond` until it holds or the deadline passes.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The aggregator as a child process.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

struct Harness {
    dir: tempfile::TempDir,
    data: PathBuf,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = registry();
        let sites = std::fs::File::create(dir.path().join("sites.csv")).expect("sites.csv");
        let sessions = std::fs::File::create(dir.path().join("sessions.csv")).expect("sessions.csv");
        headcount::server::registry::csv::write(&reg, sites, sessions).expect("write registry");
        let data = dir.path().join("data");
        Self { dir, data }
    }

    fn command(&self, addr_file: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_headcount-server"));
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--addr-file")
            .arg(addr_file)
            .arg("--sites")
            .arg(self.dir.path().join("sites.csv"))
            .arg("--sessions")
            .arg(self.dir.path().join("sessions.csv"))
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--snapshot-interval")
            .arg("300ms")
            .arg("--grace")
            .arg("5s")
            .env("HEADCOUNT_AUTH_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts the server and waits until it has written its address.
    async fn start(&self) -> ServerProcess {
        let addr_file = self.dir.path().join(format!("addr-{}", rand::rng().random::<u64>()));
        let child = self.command(&addr_file).spawn().expect("spawn headcount-server");
        let mut addr = None;
        eventually("server address file", || {
            let found = std::fs::read_to_string(&addr_file).ok().and_then(|s| s.trim().parse().ok());
            addr = found;
            async move { found.is_some() }
        })
        .await;
        ServerProcess { child, addr: addr.expect("address") }
    }

    /// Starts the server and expects it to exit with an error; returns its stderr.
    fn start_failing(&self) -> String {
        let addr_file = self.dir.path().join("addr-failing");
        let out = self.command(&addr_file).output().expect("run headcount-server");
        assert!(!out.status.success(), "server was expected to refuse to start");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn journals(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.data)
            .expect("data dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        v.sort();
        v
    }
}

impl ServerProcess {
    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy on a fixed loopback port whose backend can be switched or blocked, so clients
/// keep one URL across server restarts (each restart gets a new ephemeral port).
struct Proxy {
    addr: SocketAddr,
    target: watch::Sender<Option<SocketAddr>>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (target, rx) = watch::channel(None::<SocketAddr>);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut rx = rx.clone();
                let Some(to) = *rx.borrow_and_update() else { continue };
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(to).await else { return };
                    let (mut a, mut b) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        // Any switch (or block) cuts existing connections.
                        _ = rx.changed() => {}
                    }
                });
            }
        });
        Self { addr, target }
    }

    fn set(&self, to: Option<SocketAddr>) {
        self.target.send_replace(to);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn auth() -> Auth {
    Auth::new(SECRET.as_bytes()).expect("auth")
}

async fn site_count(url: &str, site: &str) -> i64 {
    let ch = connect::channel(url).await.expect("connect to server");
    let mut c = TotalsClient::new(ch);
    let mut req = Request::new(TotalsRequest {
        scope: Some(Scope { kind: ScopeKind::Site as i32, id: site.to_owned() }),
        session: None,
        min_revision: 0,
    });
    req.metadata_mut().insert("authorization", connect::bearer(&auth().read_token("test")).expect("bearer"));
    c.get_totals(req).await.expect("get totals").into_inner().count
}

async fn scope_count(url: &str, kind: ScopeKind, id: &str, session: Option<u32>) -> i64 {
    let ch = connect::channel(url).await.expect("connect to server");
    let mut c = TotalsClient::new(ch);
    let mut req = Request::new(TotalsRequest {
        scope: Some(Scope { kind: kind as i32, id: id.to_owned() }),
        session,
        min_revision: 0,
    });
    req.metadata_mut().insert("authorization", connect::bearer(&auth().read_token("test")).expect("bearer"));
    c.get_totals(req).await.expect("get totals").into_inner().count
}

struct Desk {
    site: String,
    reporter: Reporter,
    /// session → check-ins handed to the reporter (ground truth).
    truth: Mutex<BTreeMap<u32, i64>>,
}

fn fast_backoff() -> BackoffConfig {
    BackoffConfig { initial: Duration::from_millis(20), max: Duration::from_millis(300), ..BackoffConfig::default() }
}

async fn spawn_desks(reg: &Registry, url: &str) -> Vec<Arc<Desk>> {
    let channel = connect::lazy_channel(url).expect("channel");
    let mut desks = Vec::new();
    for site in &reg.sites {
        for desk in 1..=u32::from(site.desks) {
            let mut cfg = ReporterConfig::new(site.id.clone(), desk, auth().site_token(&site.id));
            cfg.backoff = fast_backoff();
            cfg.connect_timeout = Duration::from_secs(2);
            let reporter = Reporter::spawn(channel.clone(), cfg, Arc::new(MemoryStore::new())).expect("reporter");
            desks.push(Arc::new(Desk { site: site.id.clone(), reporter, truth: Mutex::new(BTreeMap::new()) }));
        }
    }
    desks
}

/// Each desk checks in `rounds` times a random 1..=3 people for a random session.
async fn drive(desks: &[Arc<Desk>], rounds: u32, seed: u64) {
    let mut set = tokio::task::JoinSet::new();
    for (i, d) in desks.iter().enumerate() {
        let d = d.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ i as u64);
        set.spawn(async move {
            for _ in 0..rounds {
                let session = rng.random_range(1..=2u32);
                let n = rng.random_range(1..=3u32);
                d.reporter.check_in(session, n).await.expect("check-in persisted locally");
                *d.truth.lock().expect("truth").entry(session).or_default() += i64::from(n);
                tokio::task::yield_now().await;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("desk task");
    }
}

/// Sum of what each site's reporters saw acknowledged.
fn acked_by_site(desks: &[Arc<Desk>]) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for d in desks {
        let s: i64 = d.reporter.status().acked.values().map(|(_, c)| *c).sum();
        *out.entry(d.site.clone()).or_default() += s;
    }
    out
}

async fn assert_exact(reg: &Registry, desks: &[Arc<Desk>], url: &str) {
    let mut by_site: BTreeMap<String, BTreeMap<u32, i64>> = BTreeMap::new();
    for d in desks {
        for (s, n) in d.truth.lock().expect("truth").iter() {
            *by_site.entry(d.site.clone()).or_default().entry(*s).or_default() += n;
        }
    }
    let national: i64 = by_site.values().flat_map(|m| m.values()).sum();
    assert_eq!(scope_count(url, ScopeKind::National, "", None).await, national, "national total");
    for session in [1u32, 2] {
        let want: i64 = by_site.values().filter_map(|m| m.get(&session)).sum();
        assert_eq!(scope_count(url, ScopeKind::National, "", Some(session)).await, want, "session {session}");
    }
    for p in &reg.provinces {
        let want: i64 = reg
            .sites
            .iter()
            .filter(|s| reg.provinces[s.province as usize].code == p.code)
            .map(|s| by_site.get(&s.id).map_or(0, |m| m.values().sum()))
            .sum();
        assert_eq!(scope_count(url, ScopeKind::Province, &p.code, None).await, want, "province {}", p.code);
    }
    for s in &reg.sites {
        let want = by_site.get(&s.id).map_or(0, |m| m.values().sum());
        assert_eq!(site_count(url, &s.id).await, want, "site {}", s.id);
    }
}

/// A data directory, a server behind a switchable proxy and reporters for every desk.
async fn setup_behind_proxy() -> (Harness, Registry, Proxy, ServerProcess, Vec<Arc<Desk>>) {
    let h = Harness::new();
    let reg = registry();
    let proxy = Proxy::start().await;
    let server = h.start().await;
    proxy.set(Some(server.addr));
    let desks = spawn_desks(&reg, &proxy.url()).await;
    (h, reg, proxy, server, desks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let (h, reg, proxy, mut server, desks) = setup_behind_proxy().await;
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    for round in 0..3u64 {
        // Every reporter is connected to this server incarnation, so the kill cuts live streams.
        eventually("every reporter connected", || {
            let all = desks.iter().all(|d| {
                let st = d.reporter.status();
                st.connected && st.connects > round
            });
            async move { all }
        })
        .await;
        // Kill at a random moment while check-ins flow.
        let delay = Duration::from_millis(rng.random_range(5..60));
        let driving = drive(&desks, 15, round);
        tokio::pin!(driving);
        let killed = tokio::select! {
            () = &mut driving => false,
            () = tokio::time::sleep(delay) => true,
        };
        proxy.set(None);
        server.kill9();
        // Whatever any reporter saw acknowledged was on disk before the kill.
        let acked = acked_by_site(&desks);
        server = h.start().await;
        for (site, acked) in &acked {
            let stored = site_count(&server.url(), site).await;
            assert!(
                stored >= *acked,
                "round {round}: site {site} has {stored} after restart, {acked} were acknowledged"
            );
        }
        proxy.set(Some(server.addr));
        if killed {
            driving.await;
        }
    }
    for d in &desks {
        d.reporter.flush(DEADLINE).await.expect("everything acknowledged after the last restart");
    }
    assert_exact(&reg, &desks, &server.url()).await;
    // Every reporter reconnects by itself after the last restart (flush may return before that
    // when nothing was left unacknowledged).
    // Each reporter was connected to each of the three killed servers and reconnects by itself
    // to the last one (flush may return first when nothing was left unacknowledged).
    eventually("every reporter reconnected after every restart", || {
        let all = desks.iter().all(|d| d.reporter.status().connects >= 4);
        async move { all }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_truncated_journal_is_cut_and_sites_heal_it() {
    let reg = registry();
    for (case, seed) in [("truncate", 1u64), ("flip", 2), ("truncate", 3), ("flip", 4)] {
        let h = Harness::new();
        let proxy = Proxy::start().await;
        let server = h.start().await;
        proxy.set(Some(server.addr));
        let desks = spawn_desks(&reg, &proxy.url()).await;
        drive(&desks, 10, seed).await;
        for d in &desks {
            d.reporter.flush(DEADLINE).await.expect("acknowledged");
        }
        let before: BTreeMap<String, i64> = {
            let mut m = BTreeMap::new();
            for s in &reg.sites {
                m.insert(s.id.clone(), site_count(&server.url(), &s.id).await);
            }
            m
        };
        proxy.set(None);
        server.kill9();
        // Damage the newest journal at a random offset past its header.
        let journal = h.journals().pop().expect("a journal");
        let mut bytes = std::fs::read(&journal).expect("read journal");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        if bytes.len() > 60 {
            let at = rng.random_range(56..bytes.len());
            match case {
                "truncate" => bytes.truncate(at),
                _ => bytes[at] ^= 0x5a,
            }
            std::fs::write(&journal, &bytes).expect("write journal");
        }
        let server = h.start().await;
        // Nothing is invented: every site holds at most what it had.
        for s in &reg.sites {
            let now = site_count(&server.url(), &s.id).await;
            let had = before[&s.id];
            assert!(now <= had && now >= 0, "{case}: site {} has {now} after recovery, had {had}", s.id);
        }
        // Sites resend through the resume handshake: exact again.
        proxy.set(Some(server.addr));
        for d in &desks {
            d.reporter.reconnect().await.expect("reconnect");
        }
        let url = server.url();
        eventually("sites resynced", || {
            let url = url.clone();
            let before = before.clone();
            async move {
                let mut ok = true;
                for (site, want) in &before {
                    ok &= site_count(&url, site).await == *want;
                }
                ok
            }
        })
        .await;
        assert_exact(&reg, &desks, &url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_snapshot_is_ignored_and_corrupt_snapshot_refuses_start() {
    let h = Harness::new();
    let reg = registry();
    let server = h.start().await;
    let desks = spawn_desks(&reg, &server.url()).await;
    drive(&desks, 5, 7).await;
    for d in &desks {
        d.reporter.flush(DEADLINE).await.expect("acknowledged");
    }
    let total = scope_count(&server.url(), ScopeKind::National, "", None).await;
    // Wait for at least one periodic snapshot, then crash "while writing the next one".
    let data = h.data.clone();
    eventually("two snapshot generations", || {
        let data = data.clone();
        async move {
            std::fs::read_dir(&data)
                .map(|d| {
                    d.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "snap")).count() >= 2
                })
                .unwrap_or(false)
        }
    })
    .await;
    server.kill9();
    std::fs::write(h.data.join("snapshot-9999999999.tmp"), b"half a snapshot").expect("tmp");
    let server = h.start().await;
    assert_eq!(scope_count(&server.url(), ScopeKind::National, "", None).await, total, "state after crash in snapshot");
    server.kill9();
    // A corrupt (complete-looking) snapshot: refuse to start, with a way out in the message.
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(&h.data)
        .expect("data")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    snaps.sort();
    let snap = snaps.pop().expect("snapshot");
    assert!(!snaps.is_empty(), "the previous snapshot generation was not kept");
    let mut bytes = std::fs::read(&snap).expect("read snapshot");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&snap, &bytes).expect("corrupt snapshot");
    let stderr = h.start_failing();
    assert!(
        stderr.contains("corrupt")
            && stderr.contains("Move this file out")
            && stderr.contains(&*snap.to_string_lossy()),
        "unclear error: {stderr}"
    );
    // The way out the message gives: move the corrupt snapshot aside; the previous generation
    // (older snapshot or the journals from the start) still holds everything.
    std::fs::rename(&snap, h.dir.path().join("corrupt.snap")).expect("move the snapshot aside");
    let server = h.start().await;
    assert_eq!(scope_count(&server.url(), ScopeKind::National, "", None).await, total, "state after moving it aside");
    drop(desks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_nothing_and_exits_in_time() {
    let (h, reg, proxy, mut server, desks) = setup_behind_proxy().await;
    let driving = drive(&desks, 20, 5);
    tokio::pin!(driving);
    // (In a fast build the drive can finish within this window; then it must not be polled again.)
    let finished_early = tokio::time::timeout(Duration::from_millis(30), &mut driving).await.is_ok();
    // SIGTERM while reports flow.
    let pid = server.child.id().to_string();
    let started = std::time::Instant::now();
    let status = Command::new("kill").arg("-TERM").arg(&pid).status().expect("kill -TERM");
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || {
        let st = server.child.wait();
        (st, server)
    })
    .await
    .expect("wait");
    let (st, old) = exit;
    assert!(st.expect("exit status").success(), "graceful exit code 0");
    assert!(started.elapsed() < Duration::from_secs(5) + Duration::from_secs(5), "exited within its grace period");
    drop(old);
    let acked = acked_by_site(&desks);
    server = h.start().await;
    for (site, acked) in &acked {
        let stored = site_count(&server.url(), site).await;
        assert!(stored >= *acked, "site {site}: {stored} stored, {acked} acknowledged before shutdown");
    }
    proxy.set(Some(server.addr));
    if !finished_early {
        driving.await;
    }
    for d in &desks {
        d.reporter.flush(DEADLINE).await.expect("acknowledged");
    }
    assert_exact(&reg, &desks, &server.url()).await;
}
