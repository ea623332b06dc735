//! `LocalEtcd` (client/cluster/etcd.rs), the local etcd cluster the benchmark and the simulation
//! start: three real members of the installed `etcd` on free 127.0.0.1 ports, a write survives
//! the SIGKILL of one member and is read back from the restarted member, a missing binary says
//! how to install it, and every member is gone after the drop.

mod common;

use std::time::Duration;

use common::{eventually, within};
use headcount::client::cluster::etcd::{EtcdError, LocalEtcd};

async fn client(endpoints: &[String]) -> etcd_client::Client {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    etcd_client::Client::connect(endpoints, Some(opts)).await.expect("connect to the local etcd")
}

async fn value_at(endpoint: &str, key: &str) -> Result<Option<String>, String> {
    let mut c = client(&[endpoint.to_owned()]).await;
    let r = c.get(key, None).await.map_err(|e| e.to_string())?;
    Ok(r.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

#[tokio::test]
async fn three_members_survive_a_kill_and_a_restart_reads_what_was_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut etcd = within("start 3 members", LocalEtcd::start(3, dir.path())).await.expect("start local etcd");
    let endpoints = etcd.endpoints();
    assert_eq!(endpoints.len(), 3);
    assert!(endpoints.iter().all(|e| e.starts_with("http://127.0.0.1:")), "{endpoints:?}");
    let pid = etcd.pid(0).expect("member 0 runs");

    etcd.kill(0);
    assert_eq!(etcd.pid(0), None);
    assert!(!std::path::Path::new(&format!("/proc/{pid}/stat")).exists(), "member 0 was reaped");
    // Two of three members are a quorum: writes go on (once a new leader is elected if member 0
    // led).
    let c = client(&endpoints[1..]).await;
    eventually("a write with member 0 down", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { c.put("/t/k", "after-kill", None).await.map(drop).map_err(|e| e.to_string()) }
    })
    .await;

    within("restart member 0", etcd.restart(0)).await.expect("restart member 0");
    // The restarted member catches up from the others and answers linearizable reads.
    eventually("member 0 reads the write made while it was down", Duration::from_secs(30), || async {
        match value_at(&etcd.endpoint(0), "/t/k").await? {
            Some(v) if v == "after-kill" => Ok(()),
            other => Err(format!("member 0 has {other:?}")),
        }
    })
    .await;

    let pids: Vec<u32> = (0..3).filter_map(|i| etcd.pid(i)).collect();
    assert_eq!(pids.len(), 3);
    drop(etcd);
    for pid in pids {
        // Reaped on drop: no process is left behind.
        assert!(!std::path::Path::new(&format!("/proc/{pid}/stat")).exists(), "member {pid} left running");
    }
}

#[tokio::test]
async fn a_missing_etcd_binary_says_how_to_install_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-etcd");
    let err = LocalEtcd::start_with(missing, 3, dir.path()).await.err().expect("a missing binary is an error");
    assert!(matches!(err, EtcdError::NotInstalled(_)), "{err:?}");
    assert!(err.to_string().contains("install Debian's etcd-server"), "{err}");
}
