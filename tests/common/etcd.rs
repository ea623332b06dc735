//! A real etcd 3.4 cluster for the cluster-mode tests: N member processes (`/usr/bin/etcd`, Debian
//! `etcd-server`) on free 127.0.0.1 ports in a temporary directory, killed (`SIGKILL`) and
//! restarted on demand, all killed when the handle is dropped.
//!
//! The data directories live on `/dev/shm` when it is writable (fsync is then free, so a loaded
//! disk cannot stall the Raft log and cost the leader its lease), else in the system temp dir.

use std::{
    collections::HashSet,
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use etcd_client::{Client, ConnectOptions};
use rand::Rng;

use super::eventually;

/// Heartbeat interval of the test clusters, ms (etcd's default is 100).
pub const HEARTBEAT_MS: u64 = 50;
/// Election timeout of the test clusters, ms (etcd's default is 1000): a dead leader is replaced
/// within about this long. Pre-vote is on so that a member stalled by a loaded machine does not
/// depose a healthy leader when it comes back.
pub const ELECTION_MS: u64 = 750;
/// `--max-txn-ops`: the aggregator's group commits put up to this many operations in one txn
/// (etcd's default is 128).
pub const MAX_TXN_OPS: u32 = 1024;
/// How long a cluster (or a restarted member) may take to serve linearizable reads.
pub const START_DEADLINE: Duration = Duration::from_secs(40);
/// Timeout of every request the harness makes to etcd.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Starts attempted with fresh ports when a member could not bind its port (another process took
/// it between our probe and etcd's bind).
const START_ATTEMPTS: usize = 5;

/// Where the etcd binary is looked for, in order.
const ETCD_PATHS: [&str; 2] = ["/usr/bin/etcd", "/usr/local/bin/etcd"];

/// The message every test panics with when etcd is not installed.
pub const NOT_FOUND: &str = "etcd not found: run scripts/test.sh, which installs Debian's etcd-server";

/// The etcd binary (the usual places, then `$PATH`), or a panic saying how to install it: tests
/// never skip for want of it.
pub fn etcd_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ETCD_PATHS
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path).map(|d| d.join("etcd")))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{NOT_FOUND}"))
}

/// One member: its ports and data directory stay the same across restarts.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// The last lines of this member's log, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n    ")
    }

    /// `Some(status)` when the process has exited (or was never started).
    fn exited(&mut self) -> Option<String> {
        match &mut self.child {
            None => Some("not running".to_owned()),
            Some(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("cannot wait for it: {e}")),
            },
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

/// A running etcd cluster owned by one test. Dropping it kills every member.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    /// Kept last: removed after the members are killed.
    dir: tempfile::TempDir,
}

static CLUSTERS: AtomicU64 = AtomicU64::new(0);

impl EtcdCluster {
    /// Starts an `members`-member cluster and waits until every member serves linearizable reads.
    /// Retries with fresh ports when a member lost a race for its port; panics (with the members'
    /// logs) when the cluster does not come up within [`START_DEADLINE`].
    pub async fn start(members: usize) -> Self {
        assert!(members >= 1, "an etcd cluster needs at least one member");
        let binary = etcd_binary();
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let mut cluster = Self::spawn(&binary, members);
            match cluster.wait_up().await {
                Ok(()) => return cluster,
                Err(e) if e.contains("address already in use") => {
                    eprintln!("etcd start attempt {attempt}: a member lost a port race; starting again on fresh ports");
                    last = e;
                }
                Err(e) => panic!("etcd cluster of {members} did not start: {e}"),
            }
        }
        panic!("etcd cluster of {members} did not start in {START_ATTEMPTS} attempts (port races); last: {last}")
    }

    fn spawn(binary: &Path, n: usize) -> Self {
        let dir = scratch_dir();
        let id = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let token = format!("headcount-test-{}-{id}", std::process::id());
        let ports = free_ports(2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster =
            members.iter().map(|m| format!("{}={}", m.name, m.peer_url())).collect::<Vec<_>>().join(",");
        let mut cluster = Self { members, initial_cluster, token, dir };
        for i in 0..n {
            cluster.spawn_member(binary, i);
        }
        cluster
    }

    fn spawn_member(&mut self, binary: &Path, i: usize) {
        let m = &self.members[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap_or_else(|e| panic!("create etcd log {}: {e}", m.log.display()));
        let mut cmd = Command::new(binary);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(m.client_url())
            .arg("--advertise-client-urls")
            .arg(m.client_url())
            .arg("--listen-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            // Ignored once the data directory holds a member (a restart rejoins).
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--heartbeat-interval")
            .arg(HEARTBEAT_MS.to_string())
            .arg("--election-timeout")
            .arg(ELECTION_MS.to_string())
            .arg("--pre-vote")
            .arg("--max-txn-ops")
            .arg(MAX_TXN_OPS.to_string())
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .arg("--log-level")
            .arg("warn")
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}; {NOT_FOUND}", binary.display()));
        self.members[i].child = Some(child);
    }

    /// Waits until every running member serves a linearizable read; `Err` at once (with the logs)
    /// when a member exits, or when the deadline passes.
    async fn wait_up(&mut self) -> Result<(), String> {
        let mut clients: Vec<(usize, Client)> = Vec::new();
        for i in self.running() {
            clients.push((i, self.member_client(i).await));
        }
        let members = &mut self.members;
        eventually("etcd members serve linearizable reads", START_DEADLINE, || {
            let exited: Vec<String> = members
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| clients.iter().any(|(j, _)| j == i))
                .filter_map(|(_, m)| m.exited().map(|s| format!("{} exited ({s}):\n    {}", m.name, m.log_tail())))
                .collect();
            let clients = clients.clone();
            async move {
                if !exited.is_empty() {
                    return Ok(Err(exited.join("\n")));
                }
                for (i, mut c) in clients {
                    c.get("headcount-test/health", None).await.map_err(|e| format!("member m{i}: {e}"))?;
                }
                Ok(Ok(()))
            }
        })
        .await
    }

    /// Waits until every running member serves linearizable reads (quorum and a leader); panics
    /// with the members' logs otherwise.
    pub async fn wait_healthy(&mut self) {
        if let Err(e) = self.wait_up().await {
            panic!("etcd cluster is not healthy: {e}");
        }
    }

    /// Indexes of the members whose process is running.
    pub fn running(&self) -> Vec<usize> {
        (0..self.members.len()).filter(|&i| self.members[i].child.is_some()).collect()
    }

    /// Number of members (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Client URLs of every member (`http://127.0.0.1:PORT`), killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// The endpoints joined with commas, as `headcount-server --etcd` takes them.
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// Client port of member `i` (for a proxy in front of it).
    pub fn client_addr(&self, i: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.members[i].client_port))
    }

    /// A client over every member, each request bounded by [`REQUEST_TIMEOUT`].
    pub async fn client(&self) -> Client {
        connect(&self.endpoints()).await
    }

    /// A client of member `i` alone.
    pub async fn member_client(&self, i: usize) -> Client {
        connect(&[self.members[i].client_url()]).await
    }

    /// Kills member `i` with SIGKILL and waits for the process to end. Its data stays.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Restarts member `i` on its data directory and ports, and waits until every running member
    /// serves linearizable reads again (so restart enough members to regain quorum first).
    pub async fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "etcd member {i} is still running; kill it first");
        self.spawn_member(&etcd_binary(), i);
        self.wait_healthy().await;
    }

    /// Restarts member `i` without waiting for the cluster (e.g. the first of two members back).
    pub fn restart_nowait(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "etcd member {i} is still running; kill it first");
        self.spawn_member(&etcd_binary(), i);
    }

    /// Index of the member the running members agree is leader, if they have one.
    pub async fn leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        for i in self.running() {
            let mut c = self.member_client(i).await;
            let s = c.status().await.ok()?;
            ids.push((i, s.header().map(|h| h.member_id()).unwrap_or(0), s.leader()));
        }
        let leader = ids.first()?.2;
        if leader == 0 || ids.iter().any(|(_, _, l)| *l != leader) {
            return None;
        }
        ids.iter().find(|(_, id, _)| *id == leader).map(|(i, _, _)| *i)
    }

    /// The temporary directory holding the members' data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every member's log tail, for a test's failure message.
    pub fn logs(&self) -> String {
        self.members.iter().map(|m| format!("{}:\n    {}", m.name, m.log_tail())).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}

/// Client options of the harness: bounded connect and requests.
pub fn options() -> ConnectOptions {
    ConnectOptions::new().with_timeout(REQUEST_TIMEOUT).with_connect_timeout(Duration::from_secs(1))
}

/// Connects a client to `endpoints` (lazily: nothing is sent until the first request).
pub async fn connect(endpoints: &[String]) -> Client {
    Client::connect(endpoints, Some(options())).await.unwrap_or_else(|e| panic!("etcd client for {endpoints:?}: {e}"))
}

/// A temporary directory on `/dev/shm` when possible, else in the system temp dir.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new().prefix("headcount-etcd-").tempdir_in(shm)
    {
        return d;
    }
    tempfile::Builder::new().prefix("headcount-etcd-").tempdir().expect("create a temporary directory for etcd")
}

/// Ports handed out by this process (never twice, even after release).
static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// `n` distinct ports free on 127.0.0.1 now. Chosen below the kernel's ephemeral range, so that a
/// killed member's port is not taken by an outgoing connection before the member restarts on
/// it; each is checked by binding it (then released: etcd binds it next).
fn free_ports(n: usize) -> Vec<u16> {
    let low = ephemeral_low();
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let given = given.get_or_insert_with(HashSet::new);
    let mut rng = rand::rng();
    let mut out = Vec::with_capacity(n);
    for _ in 0..10_000 {
        if out.len() == n {
            break;
        }
        let port = if low > 12_000 { rng.random_range(10_000..low) } else { 0 };
        if port != 0 && given.contains(&port) {
            continue;
        }
        let Ok(l) = TcpListener::bind(("127.0.0.1", port)) else { continue };
        let Ok(addr) = l.local_addr() else { continue };
        if given.insert(addr.port()) {
            out.push(addr.port());
        }
    }
    assert_eq!(out.len(), n, "could not find {n} free ports on 127.0.0.1");
    out
}

/// The low end of the kernel's ephemeral port range (32768 when it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}
