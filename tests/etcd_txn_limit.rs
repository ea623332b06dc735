//! The size of a cluster node's etcd transactions against a real etcd 3.4 (its default
//! `--max-txn-ops` of 128): a transaction of `txn_registers` register compare-and-sets, as a group
//! commit sends, is accepted; one more is refused. etcd counts the transactions nested in each
//! compare-and-set against the limit (n + 2 ≤ 128), so at 128 per transaction every group commit
//! of 127 or more changed registers was refused on every retry and nothing was acknowledged again.

use etcd_client::Txn;
use headcount::{
    client::cluster::etcd::LocalEtcd,
    server::cluster::{ClusterConfig, commit::compare_and_set},
};

fn cas_txn(n: usize) -> Txn {
    Txn::new().and_then((0..n).map(|i| compare_and_set(format!("/t/r/S{i:05}/1/1"), 7, 3)).collect::<Vec<_>>())
}

#[tokio::test]
async fn a_full_transaction_of_register_compare_and_sets_is_accepted_and_one_more_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = LocalEtcd::start(1, dir.path()).await.expect("start local etcd");
    let per_txn = ClusterConfig::new(etcd.endpoints(), "t").txn_registers;
    let mut c = etcd_client::Client::connect(etcd.endpoints(), None).await.expect("connect");

    c.txn(cas_txn(per_txn)).await.expect("a group commit's full transaction is accepted");
    let stored = c.get("/t/r/S00000/1/1", None).await.expect("get");
    assert_eq!(stored.kvs().first().map(|kv| kv.value().to_vec()), Some(b"00000000000000000007 3".to_vec()));

    let err = c.txn(cas_txn(per_txn + 1)).await.expect_err("one more operation is over etcd's limit");
    assert!(err.to_string().contains("too many operations in txn request"), "{err}");
}
