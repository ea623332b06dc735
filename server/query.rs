//! The read side: turns rollups into wire answers. Every query is O(1) or O(children) in the
//! hierarchy (plus O(sessions × shards) per node); nothing here scans all sites.

use super::{
    aggregator::Aggregator,
    curve::Sample,
    error::Error,
    tally::{Level, Node},
};
use crate::proto::v1::{
    BreakdownOrder, BreakdownResponse, CurvePoint, CurveResponse, Scope, ScopeKind, ScopeTotals, SilentSite,
    SilentSitesResponse,
};

impl Aggregator {
    /// Resolves a wire scope to a node.
    pub fn node(&self, scope: Option<&Scope>) -> Result<Node, Error> {
        let registry = self.registry();
        let Some(scope) = scope else { return Ok(Node::NATIONAL) };
        let kind = ScopeKind::try_from(scope.kind)
            .map_err(|_| Error::InvalidArgument(format!("unknown scope kind {}", scope.kind)))?;
        let find = |kind: &'static str, found: Option<u32>| {
            found.ok_or_else(|| Error::UnknownScope { kind, id: scope.id.clone() })
        };
        Ok(match kind {
            ScopeKind::Unspecified | ScopeKind::National => Node::NATIONAL,
            ScopeKind::Province => {
                Node { level: Level::Province, index: find("province", registry.province(&scope.id))? }
            }
            ScopeKind::Commune => Node { level: Level::Commune, index: find("commune", registry.commune(&scope.id))? },
            ScopeKind::Site => Node { level: Level::Site, index: find("site", registry.site(&scope.id))? },
        })
    }

    /// Resolves an optional wire session id to a session index.
    pub fn session_index(&self, session: Option<u32>) -> Result<Option<usize>, Error> {
        session.map(|id| self.registry().session(id).map(usize::from).ok_or(Error::UnknownSession(id))).transpose()
    }

    /// The wire scope, name, registered delegates and site count of a node.
    fn describe(&self, node: Node) -> (Scope, String, u64, u32) {
        let r = self.registry();
        let i = node.index as usize;
        match node.level {
            Level::National => (
                Scope { kind: ScopeKind::National as i32, id: String::new() },
                "National".to_owned(),
                r.registered_total(),
                r.sites.len() as u32,
            ),
            Level::Province => {
                let p = &r.provinces[i];
                (
                    Scope { kind: ScopeKind::Province as i32, id: p.code.clone() },
                    p.name.clone(),
                    p.registered,
                    p.sites_total,
                )
            }
            Level::Commune => {
                let c = &r.communes[i];
                (
                    Scope { kind: ScopeKind::Commune as i32, id: c.id.clone() },
                    c.name.clone(),
                    c.registered,
                    c.sites.len() as u32,
                )
            }
            Level::Site => {
                let s = &r.sites[i];
                (Scope { kind: ScopeKind::Site as i32, id: s.id.clone() }, s.name.clone(), u64::from(s.registered), 1)
            }
        }
    }

    /// Totals of a node for one session index or all sessions.
    pub fn totals_of(&self, node: Node, session: Option<usize>) -> ScopeTotals {
        // Read before the rollups: they reflect at least this revision.
        let revision = self.shared().replication.as_ref().map_or(0, |r| r.applied());
        let reading = self.shared().tallies.read(node, session);
        let (scope, name, registered, sites_total) = self.describe(node);
        let sessions = self.registry().sessions.len() as u64;
        let registered = (if session.is_some() { registered } else { registered * sessions }) as i64;
        let turnout_pct = if registered > 0 { 100.0 * reading.count as f64 / registered as f64 } else { 0.0 };
        ScopeTotals {
            scope: Some(scope),
            name,
            session: session.map(|s| self.registry().sessions[s].id),
            count: reading.count,
            registered,
            turnout_pct,
            sites_reporting: reading.reporting,
            sites_total,
            sites_over_capacity: reading.over_capacity,
            last_change_unix_ms: self.shared().config.clock.to_wall(reading.changed_ms),
            revision,
        }
    }

    /// The children of a node (provinces, communes, sites; a site has none).
    pub fn children(&self, node: Node) -> Result<Vec<Node>, Error> {
        let r = self.registry();
        let nodes = |level, idx: &mut dyn Iterator<Item = u32>| idx.map(|index| Node { level, index }).collect();
        Ok(match node.level {
            Level::National => nodes(Level::Province, &mut (0..r.provinces.len() as u32)),
            Level::Province => nodes(Level::Commune, &mut r.provinces[node.index as usize].communes.iter().copied()),
            Level::Commune => nodes(Level::Site, &mut r.communes[node.index as usize].sites.iter().copied()),
            Level::Site => return Err(Error::InvalidArgument("a site has no children".into())),
        })
    }

    /// Totals of a node and of each of its children, sorted.
    pub fn breakdown(
        &self,
        node: Node,
        session: Option<usize>,
        order: BreakdownOrder,
        limit: usize,
    ) -> Result<BreakdownResponse, Error> {
        let mut children: Vec<ScopeTotals> =
            self.children(node)?.into_iter().map(|c| self.totals_of(c, session)).collect();
        // Registry order is the order of the files, not of the ids: sort by id first (byte-wise),
        // which also breaks ties of the other orders (the sorts are stable).
        let id = |t: &ScopeTotals| t.scope.as_ref().map_or(String::new(), |s| s.id.clone());
        children.sort_by_cached_key(id);
        match order {
            BreakdownOrder::Id => {}
            BreakdownOrder::CountDesc => children.sort_by_key(|c| std::cmp::Reverse(c.count)),
            BreakdownOrder::TurnoutAsc => children.sort_by(|a, b| a.turnout_pct.total_cmp(&b.turnout_pct)),
        }
        if limit > 0 {
            children.truncate(limit);
        }
        Ok(BreakdownResponse { parent: Some(self.totals_of(node, session)), children })
    }

    /// Silent sites within a node, as of the last sweep, by site id. O(silent sites).
    pub fn silent_sites(&self, node: Node, limit: usize) -> SilentSitesResponse {
        let r = self.registry();
        let silent = self.shared().liveness.silent();
        let within = |site: u32| {
            let s = &r.sites[site as usize];
            match node.level {
                Level::National => true,
                Level::Province => s.province == node.index,
                Level::Commune => s.commune == node.index,
                Level::Site => site == node.index,
            }
        };
        let mut total = 0u32;
        let mut sites = Vec::new();
        for &i in silent.iter().filter(|&&i| within(i)) {
            total += 1;
            if limit == 0 || sites.len() < limit {
                let s = &r.sites[i as usize];
                sites.push(SilentSite {
                    site_id: s.id.clone(),
                    name: s.name.clone(),
                    province: r.provinces[s.province as usize].code.clone(),
                    commune: r.communes[s.commune as usize].id.clone(),
                    last_seen_unix_ms: self.shared().config.clock.to_wall(self.shared().liveness.last_seen(i)),
                    contact_name: s.contact_name.clone(),
                    contact_phone: s.contact_phone.clone(),
                });
            }
        }
        SilentSitesResponse { sites, total_silent: total }
    }

    /// The curve of a national or province node, ending with a live point for the open bucket.
    pub fn curve(&self, node: Node, session: Option<usize>) -> Result<CurveResponse, Error> {
        let s = self.shared();
        let row = match node.level {
            Level::National => 0,
            Level::Province => node.index as usize + 1,
            _ => return Err(Error::InvalidArgument("the curve is kept for national and province scopes".into())),
        };
        let per_row = s.tallies.sessions();
        let sessions = match session {
            Some(k) => k..k + 1,
            None => 0..per_row,
        };
        let mut raw = s.curve.points(row, sessions.clone(), per_row);
        let now = s.config.clock.wall_ms();
        let live: Sample = super::curve::Curve::read(&s.tallies, s.registry.provinces.len(), s.curve.bucket_start(now));
        let live_count = sessions.map(|k| live.counts[row * per_row + k]).sum();
        match raw.last_mut() {
            // Same bucket, or the wall clock stepped back behind the last sample: the live
            // count updates the last point (labels stay in order).
            Some(last) if last.0 >= live.unix_ms => last.1 = live_count,
            _ => raw.push((live.unix_ms, live_count)),
        }
        let mut prev = 0;
        let points = raw
            .into_iter()
            .map(|(unix_ms, count)| {
                let p = CurvePoint { unix_ms, count, delta: count - prev };
                prev = count;
                p
            })
            .collect();
        Ok(CurveResponse { bucket_ms: s.curve.bucket_ms(), points })
    }
}
