//! The aggregator under test as a separate release-built process on 127.0.0.1, with its memory
//! and CPU read from `/proc`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running `headcount-server` child.
pub struct ServerProcess {
    child: Child,
    /// `host:port`.
    pub addr: String,
    /// Data directory (kept across restarts), None in memory.
    pub data_dir: Option<PathBuf>,
    started: Instant,
    /// `https` when the server was given `--tls-cert`, else `http`.
    scheme: &'static str,
}

/// How to start the server.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// The binary.
    pub binary: PathBuf,
    /// `127.0.0.1:PORT` (0: ephemeral).
    pub listen: String,
    /// Journal directory, or None for `--in-memory`.
    pub data_dir: Option<PathBuf>,
    /// Tokio worker threads of the server (None: one per core).
    pub worker_threads: Option<usize>,
    /// Auth secret.
    pub secret: String,
    /// Extra flags.
    pub extra: Vec<String>,
}

/// The `headcount-server` next to the running binary.
pub fn sibling_binary() -> std::io::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name("headcount-server"))
}

impl ServerProcess {
    /// Starts the server and waits (at most 120 s) until it serves.
    pub fn start(spec: &ServerSpec, scratch: &Path) -> std::io::Result<Self> {
        let addr_file = scratch.join(format!("addr-{}", std::process::id() ^ rand::random::<u32>()));
        let mut cmd = Command::new(&spec.binary);
        cmd.arg("--listen").arg(&spec.listen).arg("--addr-file").arg(&addr_file);
        match &spec.data_dir {
            Some(d) => cmd.arg("--data-dir").arg(d),
            None => cmd.arg("--in-memory"),
        };
        // The bench drives the generated reference registry, which the server serves only when asked.
        if !spec.extra.iter().any(|a| a.starts_with("--sites") || a.starts_with("--reference-registry")) {
            cmd.arg("--reference-registry");
        }
        cmd.args(&spec.extra)
            .env("HEADCOUNT_AUTH_SECRET", &spec.secret)
            .env("RUST_LOG", std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(n) = spec.worker_threads {
            cmd.env("TOKIO_WORKER_THREADS", n.to_string());
        }
        let started = Instant::now();
        let child = cmd.spawn()?;
        let deadline = started + Duration::from_secs(120);
        let scheme = if spec.extra.iter().any(|a| a.starts_with("--tls-cert")) { "https" } else { "http" };
        let mut this = Self { child, addr: String::new(), data_dir: spec.data_dir.clone(), started, scheme };
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                this.addr = a.trim().to_owned();
                let _ = std::fs::remove_file(&addr_file);
                return Ok(this);
            }
            if let Some(status) = this.child.try_wait()? {
                return Err(std::io::Error::other(format!("headcount-server exited early: {status}")));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("headcount-server did not start within 120 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Time from spawn to serving.
    pub fn startup(&self) -> Duration {
        self.started.elapsed()
    }

    /// `http://addr`, or `https://addr` over TLS.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident set size now and its peak, bytes.
    pub fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU seconds (user + system) used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are 14th and 15th overall.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
