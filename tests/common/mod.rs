//! Shared helpers of the end-to-end tests: an in-process server on an ephemeral port, raw ingest
//! streams, a Totals reader, a hierarchy-walking totals check, a connection-cutting TCP proxy and
//! `eventually` (bounded polling instead of sleeps); for cluster mode, a real etcd cluster
//! (`etcd`), a proxy that partitions a node from it (`proxy`) and a history checker (`checker`).
//!
//! Every test binary compiles this module and uses a different part of it.

#![allow(dead_code, missing_docs)]

pub mod checker;
pub mod etcd;
pub mod proxy;
pub mod raw;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use headcount::{
    client::{
        Reporter, ReporterConfig, connect,
        reporter::{backoff::BackoffConfig, state::MemoryStore},
    },
    proto::v1::{
        Ack, BreakdownOrder, BreakdownRequest, BreakdownResponse, CorrectionsRequest, CorrectionsResponse, Report,
        ReportBatch, ReportRequest, ReportResponse, Resume, Scope, ScopeKind, ScopeTotals, SilentSitesRequest,
        SilentSitesResponse, TotalsRequest, WatchRequest, WatchUpdate, ingest_client::IngestClient, report_request,
        report_response, totals_client::TotalsClient,
    },
    server::{
        Aggregator, AggregatorConfig, Auth, RunningServer, Transport,
        ingest::{DESK_HEADER, SITE_HEADER},
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
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming, transport::Channel};

/// Deadline of every wait in the tests. Generous: a test that needs it has failed anyway.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// Polling interval of [`eventually`].
pub const POLL: Duration = Duration::from_millis(10);
/// The secret every test server signs tokens with.
pub const SECRET: &[u8] = b"headcount end-to-end test secret";
/// Session ids of the generated registries.
pub const SESSIONS: [u32; 4] = [1, 2, 3, 4];

// ───────────────────────────── eventually ─────────────────────────────

/// Polls `check` every [`POLL`] until it returns `Ok`, and returns that value. Panics with the
/// last `Err` message once `deadline` has passed. Each attempt is itself bounded by the time left.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let left = deadline.saturating_sub(start.elapsed());
        let last = match tokio::time::timeout(left.max(POLL), check()).await {
            Ok(Ok(v)) => return v,
            Ok(Err(e)) => e,
            Err(_) => format!("attempt {attempts} did not finish within the deadline"),
        };
        if start.elapsed() >= deadline {
            panic!("{what}: still not true after {deadline:?} ({attempts} attempts); last: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Awaits `fut` for at most [`DEADLINE`], panicking with `what` if it takes longer.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {DEADLINE:?}"),
    }
}

// ───────────────────────────── server ─────────────────────────────

/// The small registry most tests use: 60 sites over 34 provinces, 1–3 desks each, 4 sessions.
pub fn small_registry() -> Registry {
    generate(&GenerateOptions { sites: 60, sites_per_commune: 3.0, mean_registered: 150, seed: 7 })
}

/// Aggregator settings for tests: fast publish and sweep, everything else as in production.
pub fn test_config() -> AggregatorConfig {
    AggregatorConfig {
        publish_tick: Duration::from_millis(20),
        sweep_interval: Duration::from_millis(50),
        ..AggregatorConfig::default()
    }
}

/// A server running in this test, with the credentials and registry it was started with.
pub struct TestServer {
    pub server: RunningServer,
    pub auth: Auth,
    pub registry: Registry,
}

/// Starts an aggregator on `127.0.0.1:<ephemeral>`.
pub async fn start_server(registry: Registry, config: AggregatorConfig) -> TestServer {
    let auth = Auth::new(SECRET).expect("test secret is long enough");
    let agg = Aggregator::new(registry.clone(), config);
    let transport = Transport { grace: Duration::from_millis(500), ..Transport::default() };
    let server = RunningServer::start("127.0.0.1:0".parse().expect("literal address"), agg, auth.clone(), transport)
        .await
        .expect("bind an ephemeral port on 127.0.0.1");
    TestServer { server, auth, registry }
}

/// Starts an aggregator over [`small_registry`] with [`test_config`].
pub async fn start_small() -> TestServer {
    start_server(small_registry(), test_config()).await
}

/// Opens a channel (connected now) to `url`, with the production endpoint settings.
pub async fn channel_to(url: &str) -> Channel {
    within("connect a channel", connect::channel(url)).await.expect("connect to the test server")
}

impl TestServer {
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub async fn channel(&self) -> Channel {
        channel_to(&self.url()).await
    }

    pub fn site_token(&self, site: &str) -> String {
        self.auth.site_token(site)
    }

    pub fn read_token(&self) -> String {
        self.auth.read_token("e2e-tests")
    }

    /// A Totals reader with a read token on a fresh channel.
    pub async fn reader(&self) -> Reader {
        Reader::new(self.channel().await, Some(self.read_token()))
    }

    /// Opens a raw ingest stream for `(site, desk)` with the site's own token.
    pub async fn open(&self, channel: &Channel, site: &str, desk: u32) -> RawStream {
        open_stream(channel.clone(), Some(&self.site_token(site)), Some(site), Some(&desk.to_string()))
            .await
            .unwrap_or_else(|s| panic!("open ingest stream for {site} desk {desk}: {s:?}"))
    }

    /// Index and id of the `n`-th site (in registry order) that has at least `desks` desks.
    pub fn site_with_desks(&self, desks: u16, n: usize) -> (u32, String) {
        let (i, s) = self
            .registry
            .sites
            .iter()
            .enumerate()
            .filter(|(_, s)| s.desks >= desks)
            .nth(n)
            .unwrap_or_else(|| panic!("registry has no {n}-th site with {desks} desks"));
        (i as u32, s.id.clone())
    }
}

// ───────────────────────────── raw ingest streams ─────────────────────────────

/// A report.
pub fn report(session: u32, seq: u64, count: i64) -> Report {
    Report { session, seq, count, reason: String::new() }
}

/// A correction report.
pub fn correction(session: u32, seq: u64, count: i64, reason: &str) -> Report {
    Report { session, seq, count, reason: reason.to_owned() }
}

/// A batch request.
pub fn batch(reports: Vec<Report>) -> ReportRequest {
    ReportRequest { kind: Some(report_request::Kind::Batch(ReportBatch { reports })) }
}

/// An open ingest stream after its resume handshake.
pub struct RawStream {
    pub tx: mpsc::Sender<ReportRequest>,
    pub rx: Streaming<ReportResponse>,
    pub resume: Resume,
}

/// Opens an ingest stream with exactly the given metadata (`None`: header absent) and reads the
/// resume handshake. `Err` is the status the stream was refused or ended with.
pub async fn open_stream(
    channel: Channel,
    token: Option<&str>,
    site: Option<&str>,
    desk: Option<&str>,
) -> Result<RawStream, Status> {
    let (tx, rx) = mpsc::channel(64);
    let mut req = Request::new(ReceiverStream::new(rx));
    let md = req.metadata_mut();
    if let Some(token) = token {
        md.insert("authorization", format!("Bearer {token}").parse().expect("token is ASCII"));
    }
    if let Some(site) = site {
        md.insert(SITE_HEADER, site.parse().expect("site id is ASCII"));
    }
    if let Some(desk) = desk {
        md.insert(DESK_HEADER, desk.parse().expect("desk is ASCII"));
    }
    let mut client = IngestClient::new(channel);
    let mut rx = within("open ingest stream", client.report(req)).await?.into_inner();
    match within("resume handshake", rx.message()).await? {
        Some(ReportResponse { kind: Some(report_response::Kind::Resume(resume)) }) => Ok(RawStream { tx, rx, resume }),
        other => panic!("first message of an ingest stream is not a resume: {other:?}"),
    }
}

impl RawStream {
    /// Sends a raw request (not awaiting anything).
    pub async fn send(&self, req: ReportRequest) {
        within("send on ingest stream", self.tx.send(req)).await.expect("ingest request stream is open");
    }

    /// The next message or the status the stream ended with (`Ok(None)`: ended cleanly).
    pub async fn next(&mut self) -> Result<Option<ReportResponse>, Status> {
        within("next ingest response", self.rx.message()).await
    }

    /// Reads the next message and expects an ack.
    pub async fn ack(&mut self) -> Ack {
        match self.next().await {
            Ok(Some(ReportResponse { kind: Some(report_response::Kind::Ack(ack)) })) => ack,
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    /// Sends one batch and returns its ack.
    pub async fn send_batch(&mut self, reports: Vec<Report>) -> Ack {
        self.send(batch(reports)).await;
        self.ack().await
    }

    /// The stored state of `session` according to the resume (seq 0, count 0 when absent).
    pub fn resumed(&self, session: u32) -> (u64, i64) {
        self.resume.registers.iter().find(|r| r.session == session).map_or((0, 0), |r| (r.seq, r.count))
    }
}

// ───────────────────────────── totals ─────────────────────────────

pub fn national() -> Scope {
    Scope { kind: ScopeKind::National as i32, id: String::new() }
}
pub fn province(code: &str) -> Scope {
    Scope { kind: ScopeKind::Province as i32, id: code.to_owned() }
}
pub fn commune(id: &str) -> Scope {
    Scope { kind: ScopeKind::Commune as i32, id: id.to_owned() }
}
pub fn site(id: &str) -> Scope {
    Scope { kind: ScopeKind::Site as i32, id: id.to_owned() }
}

/// A Totals client that attaches `authorization: Bearer <token>` (when it has one) to every call.
#[derive(Clone)]
pub struct Reader {
    pub client: TotalsClient<Channel>,
    pub token: Option<String>,
}

impl Reader {
    pub fn new(channel: Channel, token: Option<String>) -> Self {
        Self { client: TotalsClient::new(channel), token }
    }

    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("token is ASCII"));
        }
        req
    }

    pub async fn try_totals(&self, scope: Scope, session: Option<u32>) -> Result<ScopeTotals, Status> {
        let mut c = self.client.clone();
        within("GetTotals", c.get_totals(self.req(TotalsRequest { scope: Some(scope), session, min_revision: 0 })))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn totals(&self, scope: Scope, session: Option<u32>) -> ScopeTotals {
        let what = format!("GetTotals {scope:?} session {session:?}");
        self.try_totals(scope, session).await.unwrap_or_else(|s| panic!("{what}: {s:?}"))
    }

    pub async fn count(&self, scope: Scope, session: Option<u32>) -> i64 {
        self.totals(scope, session).await.count
    }

    pub async fn try_breakdown(
        &self,
        scope: Scope,
        session: Option<u32>,
        order: BreakdownOrder,
        limit: u32,
    ) -> Result<BreakdownResponse, Status> {
        let mut c = self.client.clone();
        let req = BreakdownRequest { scope: Some(scope), session, order: order as i32, limit };
        within("Breakdown", c.breakdown(self.req(req))).await.map(tonic::Response::into_inner)
    }

    pub async fn breakdown(&self, scope: Scope, session: Option<u32>) -> BreakdownResponse {
        let what = format!("Breakdown {scope:?} session {session:?}");
        self.try_breakdown(scope, session, BreakdownOrder::Id, 0).await.unwrap_or_else(|s| panic!("{what}: {s:?}"))
    }

    pub async fn silent_sites(&self, scope: Option<Scope>, limit: u32) -> SilentSitesResponse {
        let mut c = self.client.clone();
        within("SilentSites", c.silent_sites(self.req(SilentSitesRequest { scope, limit })))
            .await
            .expect("SilentSites")
            .into_inner()
    }

    pub async fn corrections(&self, limit: u32) -> CorrectionsResponse {
        let mut c = self.client.clone();
        within("Corrections", c.corrections(self.req(CorrectionsRequest { limit })))
            .await
            .expect("Corrections")
            .into_inner()
    }

    pub async fn watch(
        &self,
        scope: Scope,
        session: Option<u32>,
        include_children: bool,
    ) -> Result<Streaming<WatchUpdate>, Status> {
        let mut c = self.client.clone();
        within("Watch", c.watch(self.req(WatchRequest { scope: Some(scope), session, include_children })))
            .await
            .map(tonic::Response::into_inner)
    }
}

/// Ground truth kept by a test: checked-in count per (site index, session id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Truth(pub BTreeMap<(u32, u32), i64>);

impl Truth {
    pub fn add(&mut self, site: u32, session: u32, n: i64) {
        *self.0.entry((site, session)).or_default() += n;
    }

    pub fn set(&mut self, site: u32, session: u32, n: i64) {
        self.0.insert((site, session), n);
    }

    /// The expected count of a set of sites for one session or all.
    fn sum(&self, sites: impl Fn(u32) -> bool, session: Option<u32>) -> i64 {
        self.0.iter().filter(|((s, k), _)| sites(*s) && session.is_none_or(|x| x == *k)).map(|(_, n)| *n).sum()
    }

    pub fn total(&self, session: Option<u32>) -> i64 {
        self.sum(|_| true, session)
    }
}

fn check_node(errors: &mut Vec<String>, got: Option<&ScopeTotals>, want_id: &str, want: i64, session: Option<u32>) {
    match got {
        None => errors.push(format!("{want_id:?} session {session:?}: missing from the answer")),
        Some(t) => {
            let id = t.scope.as_ref().map(|s| s.id.as_str()).unwrap_or("<no scope>");
            if id != want_id {
                errors.push(format!("expected scope {want_id:?}, got {id:?}"));
            }
            if t.count != want {
                errors.push(format!("{want_id:?} session {session:?}: count {} != expected {want}", t.count));
            }
            if t.session != session {
                errors.push(format!("{want_id:?}: answer is for session {:?}, asked {session:?}", t.session));
            }
        }
    }
}

/// Every session, and `None` (all sessions).
pub fn all_sessions() -> Vec<Option<u32>> {
    std::iter::once(None).chain(SESSIONS.iter().copied().map(Some)).collect()
}

/// Walks the whole hierarchy with Breakdown (national → provinces → communes → sites) for every
/// session and for all sessions, and panics listing every count that differs from `truth`.
pub async fn assert_totals(reader: &Reader, registry: &Registry, truth: &Truth) {
    assert_totals_for(reader, registry, truth, &all_sessions()).await;
}

/// [`assert_totals`] for the given sessions only (`None`: all sessions summed).
pub async fn assert_totals_for(reader: &Reader, registry: &Registry, truth: &Truth, sessions: &[Option<u32>]) {
    walk_totals(reader, registry, truth, sessions, &|_| true).await;
}

/// [`assert_totals_for`], breaking down only the communes (by index) that `descend` picks. Every
/// province and commune count is still checked (from its parent's breakdown); counts are never
/// negative, so a commune whose count is right and zero has every site at zero.
pub async fn walk_totals(
    reader: &Reader,
    registry: &Registry,
    truth: &Truth,
    sessions: &[Option<u32>],
    descend: &dyn Fn(u32) -> bool,
) {
    let mut errors = Vec::new();
    let ids = |v: &[ScopeTotals]| -> Vec<String> {
        v.iter().map(|t| t.scope.as_ref().map(|s| s.id.clone()).unwrap_or_default()).collect()
    };
    for &session in sessions {
        let bd = reader.breakdown(national(), session).await;
        check_node(&mut errors, bd.parent.as_ref(), "", truth.total(session), session);
        let want: Vec<String> = registry.provinces.iter().map(|p| p.code.clone()).collect();
        if ids(&bd.children) != want {
            errors.push(format!("national children {:?} != provinces {want:?}", ids(&bd.children)));
        }
        for (pi, p) in registry.provinces.iter().enumerate() {
            let in_p = |s: u32| registry.sites[s as usize].province == pi as u32;
            let want_p = truth.sum(in_p, session);
            check_node(&mut errors, bd.children.get(pi), &p.code, want_p, session);
            let pb = reader.breakdown(province(&p.code), session).await;
            check_node(&mut errors, pb.parent.as_ref(), &p.code, want_p, session);
            let want: Vec<String> = p.communes.iter().map(|&c| registry.communes[c as usize].id.clone()).collect();
            if ids(&pb.children) != want {
                errors.push(format!("province {} children {:?} != {want:?}", p.code, ids(&pb.children)));
            }
            for (k, &ci) in p.communes.iter().enumerate() {
                let c = &registry.communes[ci as usize];
                let want_c = truth.sum(|s| registry.sites[s as usize].commune == ci, session);
                check_node(&mut errors, pb.children.get(k), &c.id, want_c, session);
                if !descend(ci) {
                    continue;
                }
                let cb = reader.breakdown(commune(&c.id), session).await;
                check_node(&mut errors, cb.parent.as_ref(), &c.id, want_c, session);
                if cb.children.len() != c.sites.len() {
                    errors.push(format!(
                        "commune {} has {} children, expected {}",
                        c.id,
                        cb.children.len(),
                        c.sites.len()
                    ));
                }
                for (j, &si) in c.sites.iter().enumerate() {
                    let want_s = truth.sum(|s| s == si, session);
                    check_node(&mut errors, cb.children.get(j), &registry.sites[si as usize].id, want_s, session);
                }
            }
        }
    }
    // GetTotals must agree with Breakdown at every level (spot checks).
    for &session in sessions {
        let n = reader.count(national(), session).await;
        if n != truth.total(session) {
            errors.push(format!("GetTotals national session {session:?}: {n} != {}", truth.total(session)));
        }
        let reported: BTreeSet<u32> = truth.0.keys().map(|(s, _)| *s).collect();
        for &s in reported.iter().take(5) {
            let site_id = &registry.sites[s as usize].id;
            let n = reader.count(site(site_id), session).await;
            let want = truth.sum(|x| x == s, session);
            if n != want {
                errors.push(format!("GetTotals site {site_id} session {session:?}: {n} != {want}"));
            }
        }
    }
    if !errors.is_empty() {
        let shown = errors.iter().take(40).cloned().collect::<Vec<_>>().join("\n  ");
        panic!("{} totals differ from the ground truth:\n  {shown}", errors.len());
    }
}

/// Waits until the national total (all sessions) equals the ground truth, then walks everything.
pub async fn assert_totals_eventually(reader: &Reader, registry: &Registry, truth: &Truth) {
    let want = truth.total(None);
    eventually("national total reaches the ground truth", DEADLINE, || async {
        let n = reader.count(national(), None).await;
        if n == want { Ok(()) } else { Err(format!("national {n}, expected {want}")) }
    })
    .await;
    assert_totals(reader, registry, truth).await;
}

/// Site index by id.
pub fn site_index(registry: &Registry, id: &str) -> u32 {
    registry.site(id).unwrap_or_else(|| panic!("site {id} is in the registry"))
}

/// Sites grouped by province index, to pick sites in different provinces.
pub fn sites_by_province(registry: &Registry) -> HashMap<u32, Vec<u32>> {
    let mut m: HashMap<u32, Vec<u32>> = HashMap::new();
    for (i, s) in registry.sites.iter().enumerate() {
        m.entry(s.province).or_default().push(i as u32);
    }
    m
}

// ───────────────────────────── reporters ─────────────────────────────

/// Reconnect backoff for tests: 20 ms initial, at most 200 ms.
pub fn fast_backoff() -> BackoffConfig {
    BackoffConfig { initial: Duration::from_millis(20), multiplier: 1.6, jitter: 0.2, max: Duration::from_millis(200) }
}

/// A reporter configuration for `(site, desk)` with the site's token and [`fast_backoff`].
pub fn reporter_config(auth: &Auth, site: &str, desk: u32) -> ReporterConfig {
    ReporterConfig {
        backoff: fast_backoff(),
        connect_timeout: Duration::from_secs(5),
        ..ReporterConfig::new(site, desk, auth.site_token(site))
    }
}

/// Spawns a reporter with an in-memory state store.
pub fn memory_reporter(channel: &Channel, auth: &Auth, site: &str, desk: u32) -> Reporter {
    Reporter::spawn(channel.clone(), reporter_config(auth, site, desk), Arc::new(MemoryStore::new()))
        .unwrap_or_else(|e| panic!("spawn reporter {site}/{desk}: {e}"))
}

/// Flushes a reporter within [`DEADLINE`], panicking with its status otherwise.
pub async fn flush(r: &Reporter, what: &str) {
    if let Err(e) = r.flush(DEADLINE).await {
        panic!("{what}: flush failed: {e}; status {:?}", r.status());
    }
}

/// Waits until a reporter has an open, resumed stream.
pub async fn wait_connected(r: &Reporter, what: &str) {
    let mut rx = r.watch_status();
    if within(what, rx.wait_for(|s| s.connected)).await.is_err() {
        panic!("{what}: reporter stopped");
    }
}

// ───────────────────────────── proxy ─────────────────────────────

/// A TCP proxy on `127.0.0.1:<ephemeral>` in front of one upstream, able to drop every current
/// connection at once (both directions closed), on command or at random intervals.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accepted: Arc<AtomicU64>,
    cuts: Arc<AtomicU64>,
    blocked: Arc<AtomicBool>,
    accept_task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy on 127.0.0.1");
        let addr = listener.local_addr().expect("proxy address");
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accepted = Arc::new(AtomicU64::new(0));
        let blocked = Arc::new(AtomicBool::new(false));
        let upstream = Arc::new(Mutex::new(upstream));
        let accept_task = tokio::spawn({
            let upstream = upstream.clone();
            let conns = conns.clone();
            let accepted = accepted.clone();
            let blocked = blocked.clone();
            async move {
                loop {
                    // An accept error (e.g. out of file descriptors) ends the proxy: tests then fail loudly.
                    let Ok((mut down, _)) = listener.accept().await else { break };
                    if blocked.load(Ordering::SeqCst) {
                        drop(down); // refused: closed at once
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let upstream = *upstream.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let task = tokio::spawn(async move {
                        let Ok(mut up) = TcpStream::connect(upstream).await else { return };
                        let _ = down.set_nodelay(true);
                        let _ = up.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    });
                    let mut conns = conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    conns.retain(|h| !h.is_finished());
                    conns.push(task);
                }
            }
        });
        Self { addr, upstream, conns, accepted, cuts: Arc::default(), blocked, accept_task }
    }

    /// Where new connections go from now on (existing ones are not moved).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = upstream;
    }

    /// While blocked, new connections are closed as soon as they are accepted (the aggregator
    /// looks unreachable). Existing connections are not affected; see [`Proxy::cut_all`].
    pub fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Cuts performed so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }

    /// Drops every current connection and waits until their sockets are closed. Returns how many
    /// were still open.
    pub async fn cut_all(&self) -> usize {
        cut(&self.conns, &self.cuts).await
    }

    /// Cuts all connections `cuts` times, each after a random pause in `min..max` (fault
    /// injection, not synchronisation). The task ends after the last cut; it yields the number of
    /// connections it dropped.
    pub fn spawn_random_cuts(&self, cuts: usize, min: Duration, max: Duration, seed: u64) -> JoinHandle<usize> {
        let conns = self.conns.clone();
        let counter = self.cuts.clone();
        tokio::spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut dropped = 0;
            for _ in 0..cuts {
                let pause = rng.random_range(min..max);
                tokio::time::sleep(pause).await;
                dropped += cut(&conns, &counter).await;
            }
            dropped
        })
    }
}

async fn cut(conns: &Mutex<Vec<JoinHandle<()>>>, counter: &AtomicU64) -> usize {
    let taken = std::mem::take(&mut *conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    let mut open = 0;
    for h in &taken {
        if !h.is_finished() {
            open += 1;
        }
        h.abort();
    }
    for h in taken {
        let _ = within("aborted proxy connection to close", h).await;
    }
    counter.fetch_add(1, Ordering::Relaxed);
    open
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        for h in self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            h.abort();
        }
    }
}

// ───────────────────────────── HTTP side ─────────────────────────────

/// Starts the HTTP side of `ts`'s aggregator on `127.0.0.1:<ephemeral>`; returns `http://addr`.
pub fn start_http(ts: &TestServer, public: bool) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral HTTP port on 127.0.0.1");
    let config = headcount::server::http::HttpConfig { public, ..Default::default() };
    let (addr, _thread) =
        headcount::server::http::spawn(listener, ts.server.aggregator.clone(), ts.auth.clone(), config)
            .expect("start the HTTP thread");
    format!("http://{addr}")
}

// ───────────────────────────── the headcount binary ─────────────────────────────

/// Runs the real `headcount` binary with `args` (which must include `--json`), at most
/// `deadline` (killed and failed after it), asserts it succeeded and returns its JSON output.
/// `RUST_LOG=error` keeps its standard error to what went wrong.
pub fn headcount_json(args: &[&str], deadline: Duration) -> serde_json::Value {
    use std::io::Read;
    let what = format!("headcount {}", args.join(" "));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_headcount"))
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the child") {
            break s;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read stdout");
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("read stderr");
    assert!(status.success(), "{what} failed: {status}\n{err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: --json prints JSON ({e}): {out}"))
}
