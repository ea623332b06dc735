//! The real `headcount-server` binary as a child process over a data directory of its own, for
//! the crash and recovery tests: start (optionally with crash points armed through
//! `FAILPOINTS`), wait for it to die at a crash point, `kill -9`, restart, and read back what
//! each register holds through the resume handshake.

#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use headcount::server::{Auth, registry::Registry};

use crate::common::{DEADLINE, SECRET, eventually};

/// A data directory plus the registry files the server is started with.
pub struct DataDir {
    pub root: tempfile::TempDir,
    pub data: PathBuf,
    pub registry: Registry,
    /// `--snapshot-interval`.
    pub snapshot_interval: &'static str,
    /// `--curve-bucket`.
    pub curve_bucket: &'static str,
}

/// One row of a registry file.
pub type SiteRow = Vec<String>;

static STARTS: AtomicU64 = AtomicU64::new(0);

impl DataDir {
    pub fn new(registry: Registry) -> Self {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let d = Self { root, data, registry, snapshot_interval: "100ms", curve_bucket: "60s" };
        d.write_registry(&d.registry.clone());
        d
    }

    /// Rewrites the registry files the next start reads.
    pub fn write_registry(&self, reg: &Registry) {
        let sites = std::fs::File::create(self.root.path().join("sites.csv")).unwrap();
        let sessions = std::fs::File::create(self.root.path().join("sessions.csv")).unwrap();
        headcount::server::registry::csv::write(reg, sites, sessions).unwrap();
    }

    /// The header and rows of a registry's `sites.csv` and `sessions.csv`, as the registry
    /// writes them (sites: id, name, province code, province name, commune id, commune name,
    /// registered, desks, then optional columns).
    pub fn rows(reg: &Registry) -> (Vec<SiteRow>, Vec<SiteRow>) {
        let (mut sites, mut sessions) = (Vec::new(), Vec::new());
        headcount::server::registry::csv::write(reg, &mut sites, &mut sessions).unwrap();
        let parse = |b: &[u8]| -> Vec<SiteRow> {
            let mut r = csv::ReaderBuilder::new().has_headers(false).from_reader(b);
            r.records().map(|rec| rec.unwrap().iter().map(str::to_owned).collect()).collect()
        };
        (parse(&sites), parse(&sessions))
    }

    /// Rewrites the registry files from rows (header first, as [`DataDir::rows`] gives them).
    pub fn write_rows(&self, sites: &[SiteRow], sessions: &[SiteRow]) {
        for (name, rows) in [("sites.csv", sites), ("sessions.csv", sessions)] {
            let mut w = csv::Writer::from_path(self.root.path().join(name)).unwrap();
            rows.iter().for_each(|r| w.write_record(r).unwrap());
            w.flush().unwrap();
        }
    }

    /// The server's command line (add flags to it, or send stderr elsewhere, before
    /// [`DataDir::spawn`]).
    pub fn command(&self, addr_file: &Path, failpoints: Option<&str>) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_headcount-server"));
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--addr-file")
            .arg(addr_file)
            .arg("--sites")
            .arg(self.root.path().join("sites.csv"))
            .arg("--sessions")
            .arg(self.root.path().join("sessions.csv"))
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--snapshot-interval")
            .arg(self.snapshot_interval)
            .arg("--curve-bucket")
            .arg(self.curve_bucket)
            .arg("--grace")
            .arg("2s")
            .env("HEADCOUNT_AUTH_SECRET", std::str::from_utf8(SECRET).unwrap())
            .env("RUST_LOG", "warn")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(f) = failpoints {
            cmd.env("FAILPOINTS", f);
        }
        cmd
    }

    /// Starts the server and waits until it has written its address.
    pub async fn start(&self, failpoints: Option<&str>) -> Server {
        let addr_file = self.addr_file();
        self.spawn(self.command(&addr_file, failpoints), &addr_file).await
    }

    /// A fresh path for a start's address file.
    pub fn addr_file(&self) -> PathBuf {
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        self.root.path().join(format!("addr-{n}"))
    }

    /// Spawns `cmd` (from [`DataDir::command`] with `addr_file`) and waits until the server has
    /// written its address.
    pub async fn spawn(&self, mut cmd: Command, addr_file: &Path) -> Server {
        let mut child = cmd.spawn().expect("spawn headcount-server");
        let addr = eventually("server address file", DEADLINE, || {
            let found = std::fs::read_to_string(addr_file).ok().and_then(|s| s.trim().parse::<SocketAddr>().ok());
            let exited = child.try_wait().ok().flatten();
            async move {
                match (found, exited) {
                    (Some(a), _) => Ok(a),
                    (None, Some(status)) => panic!("server exited at start: {status}"),
                    (None, None) => Err("not yet".to_owned()),
                }
            }
        })
        .await;
        Server { child, addr }
    }

    /// Starts the server and expects it to refuse to start; returns its stderr.
    pub fn start_failing(&self) -> String {
        let out = self.command(&self.root.path().join("addr-failing"), None).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "the server was expected to refuse to start; stderr: {stderr}");
        stderr
    }

    /// File names in the data directory, sorted.
    pub fn files(&self, suffix: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.data)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        v.sort();
        v
    }
}

/// A running server process (killed when dropped).
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }

    /// Waits for the process to end by itself (a crash point) and returns how it ended.
    pub async fn exited(&mut self) -> ExitStatus {
        let child = &mut self.child;
        let mut status = None;
        eventually("the server to die at its crash point", DEADLINE, || {
            status = child.try_wait().ok().flatten();
            let done = status.is_some();
            async move { if done { Ok(()) } else { Err("still running".to_owned()) } }
        })
        .await;
        status.unwrap()
    }

    /// Stops with SIGTERM and waits for the process (graceful shutdown, final snapshot).
    pub async fn terminate(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").arg("-TERM").arg(&pid).status().unwrap();
        let _ = self.exited().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when the process was ended by SIGABRT (a crash point fired).
pub fn aborted(status: ExitStatus) -> bool {
    status.signal() == Some(6)
}

/// The state stored for `(site, desk)` per session, read through the resume handshake.
pub async fn resumed(url: &str, site: &str, desk: u32) -> Vec<(u32, u64, i64)> {
    let auth = Auth::new(SECRET).unwrap();
    let channel = crate::common::channel_to(url).await;
    let s = crate::common::open_stream(channel, Some(&auth.site_token(site)), Some(site), Some(&desk.to_string()))
        .await
        .unwrap();
    s.resume.registers.iter().map(|r| (r.session, r.seq, r.count)).collect()
}

/// Bound on a test's writers.
pub const MAX_BATCHES: u64 = 100_000;

/// A pause a writer takes when the server is gone, before it gives up.
pub const GONE: Duration = Duration::from_millis(10);
