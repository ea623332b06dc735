//! A local etcd cluster of the installed `etcd` binary (Debian's `etcd-server`), for the
//! benchmark, the simulation and the tests: N members on free 127.0.0.1 ports in one directory,
//! quick elections, members that can be killed (SIGKILL) and restarted, everything killed on drop.
//!
//! ```no_run
//! # async fn demo() -> Result<(), headcount::client::cluster::etcd::EtcdError> {
//! use headcount::client::cluster::etcd::LocalEtcd;
//! let dir = tempfile::tempdir().map_err(|e| headcount::client::cluster::etcd::EtcdError::io("tempdir", e))?;
//! let mut etcd = LocalEtcd::start(3, dir.path()).await?;
//! let urls = etcd.endpoints(); // ["http://127.0.0.1:PORT", ...]: pass to --etcd
//! etcd.kill(0); // SIGKILL: the other two still hold a quorum
//! etcd.restart(0).await?;
//! # Ok(()) }
//! ```

use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Longest wait for every member to answer (after a start or a restart).
pub const HEALTH_DEADLINE: Duration = Duration::from_secs(60);

/// Whole-cluster start attempts: a port picked free can be taken by another process before etcd
/// binds it; the start is then retried on new ports.
const START_ATTEMPTS: usize = 3;

/// Raft heartbeat and election timeout, ms: quicker than etcd's defaults (100, 1000) so a killed
/// leader is replaced within about a second, yet tolerant of a busy 2-core machine.
const HEARTBEAT_MS: u32 = 50;
const ELECTION_MS: u32 = 600;

/// Why the local etcd cluster cannot run.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No `etcd` binary on this machine.
    #[error(
        "etcd is not installed ({0}): install Debian's etcd-server (`sudo apt-get install etcd-server`), or set \
         HEADCOUNT_ETCD_BIN to an etcd 3.4+ binary"
    )]
    NotInstalled(String),
    /// A file, directory, port or process could not be set up.
    #[error("local etcd: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system error.
        source: std::io::Error,
    },
    /// Members did not become healthy in time; the message names them and their log files.
    #[error("local etcd: {0}")]
    Unhealthy(String),
}

impl EtcdError {
    /// An [`EtcdError::Io`] saying what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { what: what.into(), source }
    }
}

/// One member: its name, ports and process (None while killed).
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// An N-member etcd cluster on 127.0.0.1; every member is SIGKILLed on drop.
pub struct LocalEtcd {
    binary: PathBuf,
    dir: PathBuf,
    /// Cluster token: unique per start, so members of two clusters never join each other.
    token: String,
    members: Vec<Member>,
}

/// The `etcd` binary: `HEADCOUNT_ETCD_BIN`, else `etcd` on `PATH`, else `/usr/bin/etcd`.
pub fn etcd_binary() -> Result<PathBuf, EtcdError> {
    if let Some(p) = std::env::var_os("HEADCOUNT_ETCD_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(EtcdError::NotInstalled(format!("HEADCOUNT_ETCD_BIN={} is not a file", p.display())))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| EtcdError::NotInstalled("no `etcd` on PATH or in /usr/bin".into()))
}

/// `n` distinct free ports on 127.0.0.1 (bound to port 0, then released).
fn free_ports(n: usize) -> Result<Vec<u16>, EtcdError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EtcdError::io("pick a free 127.0.0.1 port", e))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| EtcdError::io("read a picked port", e))
}

impl LocalEtcd {
    /// Starts `members` etcd members (1 to 9) with their data and logs under `dir` (created if
    /// missing; `<dir>/m<i>.etcd`, `<dir>/m<i>.log`) and waits until every member answers a read
    /// through the quorum, within [`HEALTH_DEADLINE`]. A port race restarts the whole cluster on
    /// new ports, up to 3 times. Errors: `etcd` not installed, `dir` not writable, no health.
    pub async fn start(members: usize, dir: &Path) -> Result<Self, EtcdError> {
        if !(1..=9).contains(&members) {
            return Err(EtcdError::Unhealthy(format!("{members} members: use 1 to 9")));
        }
        let binary = etcd_binary()?;
        let mut last = None;
        for attempt in 0..START_ATTEMPTS {
            let run_dir = dir.join(format!("etcd-{attempt}"));
            std::fs::create_dir_all(&run_dir).map_err(|e| EtcdError::io(format!("create {}", run_dir.display()), e))?;
            let ports = free_ports(2 * members)?;
            let mut etcd = Self {
                binary: binary.clone(),
                dir: run_dir,
                token: format!("headcount-{}-{}", std::process::id(), rand::random::<u64>()),
                members: (0..members)
                    .map(|i| Member {
                        name: format!("m{i}"),
                        client_port: ports[2 * i],
                        peer_port: ports[2 * i + 1],
                        child: None,
                    })
                    .collect(),
            };
            for i in 0..members {
                etcd.spawn(i)?;
            }
            match etcd.wait_healthy(0..members).await {
                Ok(()) => return Ok(etcd),
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "local etcd did not start; retrying on new ports");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::Unhealthy("no start attempted".into())))
    }

    /// Client URLs of every member (`http://127.0.0.1:PORT`), in member order: `--etcd`'s value.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Client URL of member `i`. Panics if `i` is out of range.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// etcd's Prometheus metrics of member `i` (served on its client port).
    pub fn metrics_url(&self, i: usize) -> String {
        format!("{}/metrics", self.endpoint(i))
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never true: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Process id of member `i`, None while it is killed.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i).and_then(|m| m.child.as_ref()).map(Child::id)
    }

    /// SIGKILLs member `i` and reaps it (no-op if already down or out of range).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members.get_mut(i).and_then(|m| m.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts member `i` (killed or not) on its ports with its data, and waits until it
    /// answers a read through the quorum (within [`HEALTH_DEADLINE`]; needs a quorum up).
    pub async fn restart(&mut self, i: usize) -> Result<(), EtcdError> {
        if i >= self.members.len() {
            return Err(EtcdError::Unhealthy(format!("no member {i} (cluster of {})", self.members.len())));
        }
        self.kill(i);
        self.spawn(i)?;
        self.wait_healthy(i..i + 1).await
    }

    /// Starts member `i`'s process (stderr to `<dir>/m<i>.log`).
    fn spawn(&mut self, i: usize) -> Result<(), EtcdError> {
        let cluster: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port)).collect();
        let m = &self.members[i];
        let log_path = self.dir.join(format!("{}.log", m.name));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| EtcdError::io(format!("open {}", log_path.display()), e))?;
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.join(format!("{}.etcd", m.name)))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", &HEARTBEAT_MS.to_string()])
            .args(["--election-timeout", &ELECTION_MS.to_string()])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().map_err(|e| EtcdError::io(format!("start {}", self.binary.display()), e))?;
        tracing::debug!(member = %m.name, pid = child.id(), %client, "local etcd member started");
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Waits until each member in `which` answers a linearizable read (so a leader is elected
    /// and the member is in the quorum), within [`HEALTH_DEADLINE`]. A member that exited (e.g.
    /// its port was taken) fails at once.
    async fn wait_healthy(&mut self, which: std::ops::Range<usize>) -> Result<(), EtcdError> {
        let deadline = Instant::now() + HEALTH_DEADLINE;
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        for i in which {
            let endpoint = self.endpoint(i);
            let mut last: String;
            loop {
                let log = self.dir.join(format!("{}.log", self.members[i].name));
                if let Some(child) = self.members[i].child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    self.members[i].child = None;
                    return Err(EtcdError::Unhealthy(format!(
                        "member {i} ({endpoint}) exited: {status}; see {}",
                        log.display()
                    )));
                }
                match etcd_client::Client::connect([endpoint.as_str()], Some(options.clone())).await {
                    Ok(mut c) => match c.get("/headcount-local-etcd-health", None).await {
                        Ok(_) => break,
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last = e.to_string(),
                }
                if Instant::now() > deadline {
                    return Err(EtcdError::Unhealthy(format!(
                        "member {i} ({endpoint}) not healthy within {HEALTH_DEADLINE:?}: {last}; see {}",
                        log.display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
