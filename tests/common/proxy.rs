//! A TCP proxy on 127.0.0.1 that can cut a process off from what it talks to: `cut()` closes every
//! connection through it and blackholes new ones (accepted, never forwarded, never answered, like
//! packets lost on the way); `freeze()` is a silent partition: open connections stay open but
//! nothing crosses them any more (no FIN, no RST: only timeouts and keepalives can notice), new
//! ones are blackholed; `restore()` closes what was held and lets new connections through again.
//! Used between an aggregator node and the etcd members it is given.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forwards.
    Open,
    /// Closed the open connections; blackholes new ones.
    Cut,
    /// Holds the open connections silently; blackholes new ones.
    Frozen,
}

/// The proxy's state: `epoch` changes on every change of mode, ending (or freezing) the
/// connections of the previous epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    epoch: u64,
    mode: Mode,
}

/// A cuttable TCP proxy in front of one upstream address. Dropping it closes every connection.
pub struct CutProxy {
    pub addr: SocketAddr,
    pub upstream: SocketAddr,
    state: watch::Sender<State>,
    forwarded: Arc<AtomicU64>,
    blackholed: Arc<AtomicU64>,
    accept_task: JoinHandle<()>,
}

impl CutProxy {
    /// Starts a proxy on `127.0.0.1:<ephemeral>` forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a proxy on 127.0.0.1");
        let addr = listener.local_addr().expect("proxy address");
        let (state, rx) = watch::channel(State { epoch: 0, mode: Mode::Open });
        let forwarded = Arc::new(AtomicU64::new(0));
        let blackholed = Arc::new(AtomicU64::new(0));
        let accept_task = tokio::spawn({
            let (forwarded, blackholed) = (forwarded.clone(), blackholed.clone());
            async move {
                // An accept error (out of file descriptors) ends the proxy: the test then fails loudly.
                while let Ok((down, _)) = listener.accept().await {
                    let rx = rx.clone();
                    let now = *rx.borrow();
                    if now.mode != Mode::Open {
                        blackholed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::spawn(connection(down, upstream, now, rx));
                }
            }
        });
        Self { addr, upstream, state, forwarded, blackholed, accept_task }
    }

    /// `http://127.0.0.1:PORT`, to give a client in place of the upstream's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, mode: Mode) {
        self.state.send_modify(|s| {
            s.epoch += 1;
            s.mode = mode;
        });
    }

    /// Partitions loudly: closes every connection through the proxy and blackholes new ones until
    /// [`CutProxy::restore`].
    pub fn cut(&self) {
        self.set(Mode::Cut);
    }

    /// Partitions silently: open connections stay open but carry nothing more; new ones are
    /// blackholed, until [`CutProxy::restore`].
    pub fn freeze(&self) {
        self.set(Mode::Frozen);
    }

    /// Heals the partition: new connections are forwarded again (held ones are closed, as a
    /// client would have given up on them).
    pub fn restore(&self) {
        self.set(Mode::Open);
    }

    /// True while cut or frozen.
    pub fn is_cut(&self) -> bool {
        self.state.borrow().mode != Mode::Open
    }

    /// Connections forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Connections accepted while cut (held, never forwarded).
    pub fn blackholed(&self) -> u64 {
        self.blackholed.load(Ordering::Relaxed)
    }
}

/// One accepted connection: forwarded until the epoch it was accepted in ends (then closed, or
/// held silently until the next change when frozen), held from the start when accepted while not
/// open; everything ends when the proxy is dropped.
async fn connection(mut down: TcpStream, upstream: SocketAddr, at: State, mut rx: watch::Receiver<State>) {
    // The next state after `epoch`; None once the proxy is dropped.
    async fn next(rx: &mut watch::Receiver<State>, epoch: u64) -> Option<State> {
        rx.wait_for(|s| s.epoch != epoch).await.ok().map(|s| *s)
    }
    if at.mode != Mode::Open {
        next(&mut rx, at.epoch).await; // blackholed: nothing read, nothing sent
        return;
    }
    let Ok(mut up) = TcpStream::connect(upstream).await else { return };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let changed = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => return,
        changed = next(&mut rx, at.epoch) => changed,
    };
    if let Some(frozen @ State { mode: Mode::Frozen, .. }) = changed {
        // Both sockets stay open, unread and unwritten, until the partition heals.
        next(&mut rx, frozen.epoch).await;
    }
    drop((down, up));
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        // The accept task holds a receiver only: once it is gone, dropping `state` ends every
        // connection task.
        self.accept_task.abort();
    }
}

/// One proxy in front of each address, and the URLs to give a client instead of them.
pub async fn proxies(upstreams: &[SocketAddr]) -> Vec<CutProxy> {
    let mut v = Vec::with_capacity(upstreams.len());
    for &u in upstreams {
        v.push(CutProxy::start(u).await);
    }
    v
}
