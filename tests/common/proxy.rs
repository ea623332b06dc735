//! A TCP proxy on 127.0.0.1 that can cut a process off from what it talks to (a network
//! partition): `cut()` drops every connection through it and blackholes new ones (accepted, never
//! forwarded, never answered, like packets lost on the way), `restore()` lets new connections
//! through again. Used between an aggregator node and the etcd members it is given.

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

/// The proxy's state: `epoch` changes on every cut and restore, ending the connections of the
/// previous epoch; `cut` says whether new connections are blackholed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    epoch: u64,
    cut: bool,
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
        let (state, rx) = watch::channel(State { epoch: 0, cut: false });
        let forwarded = Arc::new(AtomicU64::new(0));
        let blackholed = Arc::new(AtomicU64::new(0));
        let accept_task = tokio::spawn({
            let (forwarded, blackholed) = (forwarded.clone(), blackholed.clone());
            async move {
                // An accept error (out of file descriptors) ends the proxy: the test then fails loudly.
                while let Ok((down, _)) = listener.accept().await {
                    let rx = rx.clone();
                    let now = *rx.borrow();
                    if now.cut {
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

    /// Partitions: closes every connection through the proxy and blackholes new ones until
    /// [`CutProxy::restore`].
    pub fn cut(&self) {
        self.state.send_modify(|s| {
            s.epoch += 1;
            s.cut = true;
        });
    }

    /// Heals the partition: new connections are forwarded again (blackholed ones are closed, as a
    /// client would have given up on them).
    pub fn restore(&self) {
        self.state.send_modify(|s| {
            s.epoch += 1;
            s.cut = false;
        });
    }

    /// True while cut.
    pub fn is_cut(&self) -> bool {
        self.state.borrow().cut
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

/// One accepted connection: forwarded (or held, when accepted while cut) until the epoch it was
/// accepted in ends or the proxy is dropped.
async fn connection(mut down: TcpStream, upstream: SocketAddr, at: State, mut rx: watch::Receiver<State>) {
    let epoch_over = async move {
        // Err: the proxy was dropped.
        let _ = rx.wait_for(|s| s.epoch != at.epoch).await;
    };
    if at.cut {
        epoch_over.await; // blackholed: nothing read, nothing sent
        return;
    }
    let forward = async {
        let Ok(mut up) = TcpStream::connect(upstream).await else { return };
        let _ = down.set_nodelay(true);
        let _ = up.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    };
    tokio::select! {
        () = forward => {}
        () = epoch_over => {}
    }
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
