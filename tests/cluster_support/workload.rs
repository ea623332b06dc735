//! The counter workload over cluster nodes: real reporters (each given every node's address, its
//! home node first) taking check-ins, every attempt and ack recorded in a [`History`]; readers
//! reading totals on every node while it runs (fresh reads: `min_revision` = etcd's revision when
//! the read started); and, after the run, each node's final registers (resume handshake) and
//! totals at every level (Breakdown), for [`crate::common::checker::check`].

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use headcount::{
    client::{
        Reporter,
        aggregators::{Aggregators, ServerList},
        connect::ConnectOptions,
        reporter::state::MemoryStore,
    },
    proto::v1::{BreakdownOrder, Scope, ScopeTotals, TotalsRequest},
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinHandle;

use super::Cluster;
use crate::common::{
    SESSIONS, all_sessions,
    checker::{Finals, History, Read, Reg, Registers},
    commune, national, open_stream, province, reporter_config, site, within,
};

/// One desk's reporter and what the test asked it to count.
pub struct Desk {
    pub site: String,
    pub desk: u32,
    /// The node first in its address list.
    pub home: usize,
    pub reporter: Reporter,
    /// Session → count handed to the reporter so far.
    pub counts: BTreeMap<u32, i64>,
}

/// Reporters over the cluster and the history of what they did.
pub struct Workload {
    pub history: Arc<History>,
    pub desks: Vec<Desk>,
    rng: ChaCha8Rng,
    taps: Vec<JoinHandle<()>>,
}

impl Workload {
    /// Reporters for the first `sites` sites of the registry (desk 1, and desk 2 where the site
    /// has one); site k's home node is `homes[k % homes.len()]`.
    pub fn spawn(cluster: &Cluster, sites: usize, homes: &[usize], seed: u64) -> Self {
        let history = Arc::new(History::default());
        let mut desks = Vec::new();
        let mut taps = Vec::new();
        for (k, s) in cluster.registry.sites.iter().take(sites).enumerate() {
            let home = homes[k % homes.len()];
            let list: ServerList = cluster.urls_from(home).join(",").parse().unwrap();
            for desk in 1..=u32::from(s.desks.min(2)) {
                let aggregators = Aggregators::connect_lazy(&list, &ConnectOptions::default()).unwrap();
                let config = reporter_config(&cluster.auth, &s.id, desk);
                let reporter = Reporter::spawn_with(aggregators, config, Arc::new(MemoryStore::new())).unwrap();
                taps.push(tap(&reporter, &s.id, desk, history.clone()));
                desks.push(Desk { site: s.id.clone(), desk, home, reporter, counts: BTreeMap::new() });
            }
        }
        Self { history, desks, rng: ChaCha8Rng::seed_from_u64(seed), taps }
    }

    /// One check-in of 1–3 people at every desk (`only`: at these desks' indexes), each in a
    /// random session; the attempt is recorded before the reporter gets it.
    pub async fn round(&mut self, only: Option<&[usize]>) {
        for (i, d) in self.desks.iter_mut().enumerate() {
            if only.is_some_and(|o| !o.contains(&i)) {
                continue;
            }
            let session = SESSIONS[self.rng.random_range(0..SESSIONS.len())];
            let n: u32 = self.rng.random_range(1..=3);
            let count = d.counts.entry(session).or_default();
            *count += i64::from(n);
            self.history.attempt(Reg::new(&d.site, d.desk, session), *count);
            within("check_in", d.reporter.check_in(session, n))
                .await
                .unwrap_or_else(|e| panic!("check-in at {}/{}: {e}", d.site, d.desk));
        }
    }

    /// Waits until every reporter has everything acknowledged, within `deadline` each.
    pub async fn flush_all(&self, deadline: Duration) {
        for d in &self.desks {
            if let Err(e) = d.reporter.flush(deadline).await {
                panic!(
                    "{}/{} not acknowledged within {deadline:?}: {e}; status {:?}",
                    d.site,
                    d.desk,
                    d.reporter.status()
                );
            }
        }
    }

    /// Registers (site, desk) of the run.
    pub fn desk_ids(&self) -> Vec<(String, u32)> {
        self.desks.iter().map(|d| (d.site.clone(), d.desk)).collect()
    }

    /// What the desks were asked to count, per register.
    pub fn model(&self) -> BTreeMap<Reg, i64> {
        let mut out = BTreeMap::new();
        for d in &self.desks {
            for (&session, &count) in &d.counts {
                out.insert(Reg::new(&d.site, d.desk, session), count);
            }
        }
        out
    }

    /// Highest acknowledged count per register, as the reporters say now.
    pub fn acked_now(&self) -> BTreeMap<Reg, i64> {
        let mut out = BTreeMap::new();
        for d in &self.desks {
            for (session, (_, count)) in d.reporter.status().acked {
                out.insert(Reg::new(&d.site, d.desk, session), count);
            }
        }
        out
    }

    /// Stops every reporter (after its pending commands) and their taps.
    pub async fn shutdown(self) -> Arc<History> {
        for d in self.desks {
            within("reporter shutdown", d.reporter.shutdown()).await;
        }
        for t in self.taps {
            let _ = within("ack tap ends with its reporter", t).await;
        }
        self.history
    }
}

/// Records every new ack the reporter reports (seen after it arrived: a sound lower bound).
fn tap(reporter: &Reporter, site: &str, desk: u32, history: Arc<History>) -> JoinHandle<()> {
    let mut rx = reporter.watch_status();
    let site = site.to_owned();
    tokio::spawn(async move {
        let mut seen: BTreeMap<u32, u64> = BTreeMap::new();
        loop {
            let acked = rx.borrow_and_update().acked.clone();
            for (session, (seq, count)) in acked {
                if seen.get(&session).is_none_or(|s| seq > *s) {
                    seen.insert(session, seq);
                    history.ack(Reg::new(&site, desk, session), seq, count);
                }
            }
            // Err: the reporter stopped.
            if rx.changed().await.is_err() {
                break;
            }
        }
    })
}

/// Readers on `nodes` reading totals until [`Readers::stop`], recording each successful read.
pub struct Readers {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<usize>>,
}

/// Bound on each reader's reads.
const MAX_READS: usize = 5_000;

impl Readers {
    /// Starts one reader per node in `nodes`, over the scopes of the workload's sites.
    pub async fn start(cluster: &Cluster, nodes: &[usize], history: Arc<History>, sites: &[String], seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut scopes = vec![national()];
        for id in sites.iter().take(6) {
            let i = cluster.registry.site(id).unwrap() as usize;
            let s = &cluster.registry.sites[i];
            scopes.push(site(id));
            scopes.push(province(&cluster.registry.provinces[s.province as usize].code));
            scopes.push(commune(&cluster.registry.communes[s.commune as usize].id));
        }
        let mut tasks = Vec::new();
        for &i in nodes {
            let reader = cluster.reader(i).await;
            let etcd = cluster.etcd_client.clone();
            let (stop, history, scopes, node) =
                (stop.clone(), history.clone(), scopes.clone(), cluster.nodes[i].name.clone());
            let mut rng = ChaCha8Rng::seed_from_u64(seed + i as u64);
            tasks.push(tokio::spawn(async move {
                let mut reads = 0;
                let sessions = all_sessions();
                for _ in 0..MAX_READS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let scope = scopes[rng.random_range(0..scopes.len())].clone();
                    let session = sessions[rng.random_range(0..sessions.len())];
                    let start = Instant::now();
                    // Fresh when etcd answers (a linearizable read after `start`).
                    let rev =
                        tokio::time::timeout(Duration::from_secs(2), etcd.clone().get("headcount-test/probe", None))
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .and_then(|r| r.header().map(|h| h.revision() as u64));
                    let min_revision = rev.unwrap_or(0);
                    let req = TotalsRequest { scope: Some(scope.clone()), session, min_revision };
                    let mut c = reader.client.clone();
                    let answer = tokio::time::timeout(Duration::from_secs(8), c.get_totals(reader.req(req))).await;
                    let end = Instant::now();
                    if let Ok(Ok(t)) = answer {
                        let t: ScopeTotals = t.into_inner();
                        history.read(Read {
                            node: node.clone(),
                            scope,
                            session,
                            value: t.count,
                            start,
                            end,
                            fresh: rev.is_some(),
                        });
                        reads += 1;
                    } else {
                        // The node is down or cut off: nothing was read. Not a busy loop.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                reads
            }));
        }
        Self { stop, tasks }
    }

    /// Stops the readers; returns how many reads each recorded.
    pub async fn stop(self) -> Vec<usize> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(within("reader stops", t).await.unwrap());
        }
        out
    }
}

/// Each of `nodes`' final registers of `desks` (resume handshake) and totals at every level:
/// national and every province and commune for every session and all sessions, and the sites of
/// the communes that hold a desk of the run. Call after [`Cluster::wait_caught_up`].
pub async fn finals(cluster: &Cluster, nodes: &[usize], desks: &[(String, u32)]) -> Finals {
    let mut finals = Finals::default();
    let reg = &cluster.registry;
    let busy: BTreeSet<u32> = desks.iter().map(|(s, _)| reg.sites[reg.site(s).unwrap() as usize].commune).collect();
    for &i in nodes {
        let node = cluster.nodes[i].name.clone();
        let mut regs = Registers::new();
        let channel = crate::common::channel_to(&cluster.url(i)).await;
        for (s, desk) in desks {
            let token = cluster.auth.site_token(s);
            // A node that was fenced off takes up to a keepalive round to accept streams again.
            let stream = cluster
                .eventually(&format!("resume {s}/{desk} on {node}"), || {
                    let (channel, token, desk) = (channel.clone(), token.clone(), desk.to_string());
                    async move {
                        open_stream(channel, Some(&token), Some(s), Some(&desk)).await.map_err(|e| format!("{e:?}"))
                    }
                })
                .await;
            for r in &stream.resume.registers {
                regs.insert(Reg::new(s, desk, r.session), (r.seq, r.count));
            }
        }
        finals.registers.insert(node.clone(), regs);

        let reader = cluster.reader(i).await;
        let mut totals = Vec::new();
        let mut push = |t: &ScopeTotals, session: Option<u32>| {
            totals.push((t.scope.clone().unwrap_or_default(), session, t.count));
        };
        for session in all_sessions() {
            let mut scopes: Vec<Scope> = vec![national()];
            scopes.extend(reg.provinces.iter().map(|p| province(&p.code)));
            scopes.extend(busy.iter().map(|&c| commune(&reg.communes[c as usize].id)));
            for scope in scopes {
                let b = reader
                    .try_breakdown(scope.clone(), session, BreakdownOrder::Id, 0)
                    .await
                    .unwrap_or_else(|e| panic!("Breakdown {scope:?} on {node}: {e:?}"));
                if let Some(p) = &b.parent {
                    push(p, session);
                }
                b.children.iter().for_each(|c| push(c, session));
            }
        }
        finals.totals.insert(node, totals);
    }
    finals
}

/// The final registers must be exactly what the desks were asked to count (everything flushed).
pub fn assert_counts_are_the_model(finals: &Finals, model: &BTreeMap<Reg, i64>) {
    for (node, regs) in &finals.registers {
        for (reg, &count) in model {
            let got = regs.get(reg).map(|r| r.1);
            assert_eq!(got, Some(count), "{node}: {reg:?}");
        }
    }
}

/// Deadline for reporters to get everything acknowledged after a failure heals.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(45);
