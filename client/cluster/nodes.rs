//! Aggregator nodes as `headcount-server` processes on 127.0.0.1 (for the cluster simulation):
//! started from their specs, killed with SIGKILL, restarted from the same spec.

use std::path::{Path, PathBuf};

use crate::client::bench::process::{ServerProcess, ServerSpec};

/// Node processes, each with the spec it was started from; every live one is SIGKILLed on drop.
pub struct NodeSet {
    specs: Vec<ServerSpec>,
    procs: Vec<Option<ServerProcess>>,
    scratch: PathBuf,
}

impl NodeSet {
    /// Starts one process per spec, in order, each waited for until it serves (at most 120 s;
    /// `scratch` holds their address files). Errors: a process that exits or does not serve.
    pub fn start(specs: Vec<ServerSpec>, scratch: &Path) -> std::io::Result<Self> {
        let procs = specs.iter().map(|s| ServerProcess::start(s, scratch).map(Some)).collect::<Result<_, _>>()?;
        Ok(Self { specs, procs, scratch: scratch.to_owned() })
    }

    /// Number of nodes (live or not).
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// True when there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// `http://addr` of node `k`, None while it is killed (or out of range).
    pub fn url(&self, k: usize) -> Option<String> {
        self.procs.get(k).and_then(Option::as_ref).map(ServerProcess::url)
    }

    /// SIGKILLs node `k` and reaps it: no graceful drain, its streams die mid-flight.
    pub fn kill9(&mut self, k: usize) {
        if let Some(mut p) = self.procs.get_mut(k).and_then(Option::take) {
            p.kill9();
        }
    }

    /// Starts node `k` again from its spec (killing it first if it runs); it may get a new port.
    pub fn restart(&mut self, k: usize) -> std::io::Result<()> {
        self.kill9(k);
        let spec = self.specs.get(k).ok_or_else(|| std::io::Error::other(format!("no node {k}")))?;
        self.procs[k] = Some(ServerProcess::start(spec, &self.scratch)?);
        Ok(())
    }
}
