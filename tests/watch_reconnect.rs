//! `headcount watch` survives an aggregator restart: the watch stream ends when the aggregator
//! stops, the CLI says so, reconnects with backoff to the restarted aggregator (behind the same
//! address) and goes on showing its totals.

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use common::*;
use headcount::client::watch::{WatchOptions, run};

/// A `Write` into a shared buffer, readable while the watch runs.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer lock").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("buffer lock")).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnects_after_the_aggregator_restarts_and_says_so() {
    let first = start_small().await;
    let (_, sid) = first.site_with_desks(1, 18);
    let token = first.read_token();
    // Clients reach the aggregator through one address (a proxy standing for its host:port).
    let proxy = Proxy::start(first.addr()).await;
    let ch = tonic::transport::Endpoint::from_shared(proxy.url()).expect("url").connect_lazy();
    let mut raw = first.open(&first.channel().await, &sid, 1).await;
    assert!(raw.send_batch(vec![report(1, 1, 3)]).await.rejections.is_empty());
    let (out, notes) = (Shared::default(), Shared::default());
    let opts = WatchOptions {
        scope: site(&sid),
        session: Some(1),
        include_children: false,
        json: false,
        max_updates: None,
        duration: Some(DEADLINE),
        redraw: false,
        backoff: fast_backoff(),
    };
    let task = {
        let (mut out, mut notes) = (out.clone(), notes.clone());
        tokio::spawn(async move { run(ch, &token, &opts, &mut out, &mut notes).await })
    };
    eventually("first snapshot", DEADLINE, || async {
        if out.text().contains(": 3 checked in") { Ok(()) } else { Err(out.text()) }
    })
    .await;
    // The aggregator stops (streams end), and comes back empty on the same address.
    drop(raw);
    first.server.stop().await.expect("stop the first aggregator");
    proxy.cut_all().await;
    eventually("the watch says the connection is lost", DEADLINE, || async {
        if notes.text().contains("connection lost") { Ok(()) } else { Err(notes.text()) }
    })
    .await;
    let second = start_small().await;
    proxy.set_upstream(second.addr());
    let mut raw = second.open(&second.channel().await, &sid, 1).await;
    assert!(raw.send_batch(vec![report(1, 1, 8)]).await.rejections.is_empty());
    eventually("the watch shows the restarted aggregator's total", DEADLINE, || async {
        if out.text().contains(": 8 checked in") && notes.text().contains("reconnected") {
            Ok(())
        } else {
            Err(format!("out: {}\nnotes: {}", out.text(), notes.text()))
        }
    })
    .await;
    // Piped output appends: both updates are there, no terminal escapes.
    let text = out.text();
    assert!(text.contains(": 3 checked in") && !text.contains('\x1b'), "{text}");
    task.abort();
}
