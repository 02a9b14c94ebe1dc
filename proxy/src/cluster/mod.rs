// SPDX-License-Identifier: Apache-2.0
//! Runtime cluster state (endpoint selection, active request counts, DNS results), kept outside the
//! snapshot and keyed by cluster name so that it survives configuration swaps.

pub mod lb;
pub mod outlier;

use crate::config::{Cluster, Discovery, Endpoint, LbPolicy};
use crate::snapshot::ConfigSnapshot;
use arc_swap::ArcSwap;
use arcstr::ArcStr;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

/// Endpoints as currently usable (resolved for DNS clusters) with their derived selection tables.
#[derive(Debug)]
pub struct EndpointSet {
    /// endpoints with `addr` set
    pub endpoints: Arc<[Endpoint]>,
    schedule: lb::Schedule,
    hash: Option<lb::HashTable>,
    /// The hash keys and weights the table was built from (to rebuild it over healthy hosts).
    hash_keys: Vec<(String, u32)>,
    active: Box<[Arc<AtomicU32>]>,
    /// outlier-detection state per endpoint (carried by address like `active`)
    outlier: Box<[Arc<outlier::HostState>]>,
}

impl EndpointSet {
    /// A set for `endpoints`; hosts that were in `prev` keep their active-request counters.
    fn carry(cfg: &Cluster, endpoints: Arc<[Endpoint]>, prev: &EndpointSet) -> Self {
        let mut set = EndpointSet::new(cfg, endpoints);
        for (i, e) in set.endpoints.iter().enumerate() {
            if let Some(j) = prev
                .endpoints
                .iter()
                .position(|p| p.addr == e.addr && p.addr.is_some())
                && let (Some(slot), Some(old)) = (set.active.get_mut(i), prev.active.get(j))
            {
                *slot = old.clone();
                if let (Some(slot), Some(old)) = (set.outlier.get_mut(i), prev.outlier.get(j)) {
                    *slot = old.clone();
                }
            }
        }
        set
    }

    fn new(cfg: &Cluster, endpoints: Arc<[Endpoint]>) -> Self {
        let schedule = lb::Schedule::new(&endpoints);
        let mut hash_keys = Vec::new();
        let hash = cfg.hash_lb.as_ref().and_then(|h| {
            let keys: Vec<(String, u32)> = endpoints
                .iter()
                .map(|e| {
                    // Envoy's host key: the address, or the hostname with use_hostname_for_hashing.
                    let key = match (&e.hostname, e.addr) {
                        (Some(h), _) if cfg.use_hostname_for_hashing => h.to_string(),
                        (_, Some(a)) => a.to_string(),
                        (_, None) => format!("{}:{}", e.host, e.port),
                    };
                    (key, e.weight)
                })
                .collect();
            let table = lb::HashTable::build(h, &keys);
            hash_keys = keys;
            table
        });
        let active = endpoints
            .iter()
            .map(|_| Arc::new(AtomicU32::new(0)))
            .collect();
        let outlier = endpoints.iter().map(|_| Arc::default()).collect();
        EndpointSet {
            endpoints,
            schedule,
            hash,
            hash_keys,
            active,
            outlier,
        }
    }
}

/// Runtime state of one cluster.
#[derive(Debug)]
pub struct ClusterState {
    /// current config
    pub config: Arc<Cluster>,
    set: ArcSwap<EndpointSet>,
    rr: Arc<AtomicUsize>,
    /// circuit-breaker counters
    pub breakers: Arc<Breakers>,
    /// outlier-detection counters
    pub detector: Arc<outlier::Detector>,
    /// Requests sent per upstream connection (by socket) and when it opened, for
    /// `max_requests_per_connection` and `max_connection_duration`.
    conn_requests: parking_lot::Mutex<HashMap<i32, (u32, std::time::Instant)>>,
    /// Ring / Maglev table over the hosts not ejected (Envoy rebuilds its hashing balancer over the
    /// healthy hosts); rebuilt when the ejected set or the endpoints change.
    healthy_hash: arc_swap::ArcSwapOption<HealthyHash>,
}

/// A consistent-hash table over a subset of an endpoint set.
#[derive(Debug)]
struct HealthyHash {
    /// the endpoint set it was built for (pointer identity)
    set: usize,
    /// which endpoints were ejected then
    ejected: Vec<bool>,
    table: lb::HashTable,
    /// subset index → endpoint index
    index: Vec<usize>,
}

/// Circuit-breaker state of a cluster (DEFAULT priority).
#[derive(Debug, Default)]
pub struct Breakers {
    /// requests admitted and not finished (`rq_open` / `remaining_rq`)
    pub requests: AtomicU64,
    /// requests waiting for an HTTP/1 connection (`remaining_pending`)
    pub pending: AtomicU64,
    /// retries in flight (`remaining_retries`)
    pub retries: AtomicU64,
    /// HTTP/1 connections believed open (opened for requests; closed on upstream errors)
    pub conns: AtomicU64,
    /// tcp_proxy upstream connections open
    pub tcp_conns: AtomicU64,
    waiters: tokio::sync::Notify,
}

/// An admitted request; releases its slot (and wakes a pending request) when dropped.
#[derive(Debug)]
pub struct Admitted {
    breakers: Arc<Breakers>,
    /// Still pending while its new connection is being established.
    connecting: bool,
}

impl Admitted {
    /// The upstream connection is ready: the request is no longer pending.
    pub fn connected(&mut self) {
        if std::mem::take(&mut self.connecting) {
            self.breakers.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The connection failed or was reset: it no longer counts as open.
    pub fn connection_lost(&mut self) {
        self.connected();
        let c = &self.breakers.conns;
        let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.connected();
        self.breakers.requests.fetch_sub(1, Ordering::Relaxed);
        self.breakers.waiters.notify_one();
    }
}

/// A retry in flight (held until the next retry decision or the end of the request).
#[derive(Debug)]
pub struct RetrySlot(Arc<Breakers>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An open tcp_proxy upstream connection (released when dropped).
#[derive(Debug)]
pub struct TcpSlot(Arc<Breakers>);

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.0.tcp_conns.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which circuit breaker refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// `max_pending_requests`: `upstream_rq_pending_overflow`
    Pending,
    /// `max_requests`: `upstream_rq_active_overflow`
    Active,
}

impl ClusterState {
    /// Circuit breaking at request admission, as Envoy's connection pools apply it: over HTTP/1 a
    /// request needs a connection of its own; with `max_connections` in use it waits as a pending
    /// request (bounded by `max_pending_requests`); `max_requests` bounds requests in flight.
    pub async fn admit(
        &self,
        h2: bool,
        stats: &crate::stats::ClusterStats,
    ) -> Result<Admitted, Overflow> {
        let t = &self.config.breakers;
        let b = &self.breakers;
        let mut connecting = false;
        // HTTP/1: a request takes an idle connection, or waits as pending for a new one (while it
        // is being established) or for one to free up (when max_connections are open).
        if !h2 && b.requests.load(Ordering::Relaxed) >= b.conns.load(Ordering::Relaxed) {
            if b.pending.load(Ordering::Relaxed) >= t.max_pending_requests {
                stats.rq_pending_overflow.inc();
                return Err(Overflow::Pending);
            }
            b.pending.fetch_add(1, Ordering::Relaxed);
            if b.conns.load(Ordering::Relaxed) < t.max_connections {
                b.conns.fetch_add(1, Ordering::Relaxed);
                connecting = true;
            } else {
                stats.cx_overflow.inc();
                loop {
                    let notified = b.waiters.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if b.requests.load(Ordering::Relaxed) < b.conns.load(Ordering::Relaxed) {
                        break;
                    }
                    notified.await;
                }
                b.pending.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if b.requests.load(Ordering::Relaxed) >= t.max_requests {
            if connecting {
                b.pending.fetch_sub(1, Ordering::Relaxed);
            }
            // Wake the next waiter: this slot was not taken.
            b.waiters.notify_one();
            stats.rq_active_overflow.inc();
            return Err(Overflow::Active);
        }
        b.requests.fetch_add(1, Ordering::Relaxed);
        Ok(Admitted {
            breakers: self.breakers.clone(),
            connecting,
        })
    }

    /// A tcp_proxy connection slot under `max_connections` (None = overflow).
    pub fn tcp_slot(&self) -> Option<TcpSlot> {
        let b = &self.breakers;
        if b.tcp_conns.load(Ordering::Relaxed) >= self.config.breakers.max_connections {
            return None;
        }
        b.tcp_conns.fetch_add(1, Ordering::Relaxed);
        Some(TcpSlot(self.breakers.clone()))
    }

    /// The `max_retries` in force: the threshold, or what the `retry_budget` allows now.
    pub fn max_retries(&self) -> u64 {
        let t = &self.config.breakers;
        match t.retry_budget {
            None => t.max_retries,
            Some((pct, min)) => {
                let b = &self.breakers;
                let active = b.requests.load(Ordering::Relaxed) + b.pending.load(Ordering::Relaxed);
                ((pct / 100.0 * active as f64) as u64).max(min)
            }
        }
    }

    /// A retry slot under `max_retries` (or the retry budget), or None when the breaker is open.
    pub fn retry_slot(&self) -> Option<RetrySlot> {
        let b = &self.breakers;
        if b.retries.load(Ordering::Relaxed) >= self.max_retries() {
            return None;
        }
        b.retries.fetch_add(1, Ordering::Relaxed);
        Some(RetrySlot(self.breakers.clone()))
    }

    /// Feeds outlier detection with how an attempt on `picked` ended.
    pub fn record(&self, picked: &Picked, o: outlier::Outcome) {
        if let (Some(cfg), Some(h)) = (&self.config.outlier, &picked.outlier) {
            self.detector.record(cfg, h, self.endpoint_count(), o);
        }
    }

    /// Counts a request on upstream connection `fd` (`reused` = pooled); true when it is the last
    /// one `max_requests_per_connection` or `max_connection_duration` allows.
    pub fn last_request_on(&self, fd: i32, reused: bool) -> bool {
        let conn = &self.config.conn;
        if conn.max_requests_per_connection.is_none() && conn.max_connection_duration.is_none() {
            return false;
        }
        let mut m = self.conn_requests.lock();
        let now = std::time::Instant::now();
        let e = m.entry(fd).or_insert((0, now));
        if !reused {
            *e = (0, now);
        }
        e.0 += 1;
        let last = conn
            .max_requests_per_connection
            .is_some_and(|max| e.0 >= max)
            || conn
                .max_connection_duration
                .is_some_and(|d| now.duration_since(e.1) >= d);
        if last {
            m.remove(&fd);
        }
        last
    }

    /// The hash table over the hosts not ejected now (cached until that set changes).
    fn healthy_hash(&self, set: &Arc<EndpointSet>) -> Option<Arc<HealthyHash>> {
        let id = Arc::as_ptr(set) as usize;
        if let Some(h) = self.healthy_hash.load_full()
            && h.set == id
            && h.ejected.len() == set.outlier.len()
            && h.ejected
                .iter()
                .zip(set.outlier.iter())
                .all(|(e, o)| *e == o.ejected())
        {
            return Some(h);
        }
        let lb = self.config.hash_lb.as_ref()?;
        let ejected: Vec<bool> = set.outlier.iter().map(|o| o.ejected()).collect();
        let index: Vec<usize> = (0..set.hash_keys.len())
            .filter(|i| !ejected.get(*i).copied().unwrap_or(false))
            .collect();
        let keys: Vec<(String, u32)> = index.iter().map(|i| set.hash_keys[*i].clone()).collect();
        let table = lb::HashTable::build(lb, &keys)?;
        let h = Arc::new(HealthyHash {
            set: id,
            ejected,
            table,
            index,
        });
        self.healthy_hash.store(Some(h.clone()));
        Some(h)
    }

    /// Outlier state of each current endpoint (for `/clusters`).
    pub fn host_ejected(&self) -> Vec<bool> {
        self.set
            .load()
            .outlier
            .iter()
            .map(|h| h.ejected())
            .collect()
    }
}

/// A chosen endpoint; holds the active-request count until dropped.
#[derive(Debug)]
pub struct Picked {
    /// where to connect
    pub addr: SocketAddr,
    /// the endpoint's `hostname`, for auto_host_rewrite
    pub hostname: Option<ArcStr>,
    /// the transport socket chosen for this endpoint (`transport_socket_matches`, else the
    /// cluster's): its index for the TLS tunnel and the context
    pub tls: Option<(usize, Arc<crate::tls::UpstreamTls>)>,
    /// an internal listener of ours (`envoy_internal_address`)
    pub internal: Option<Arc<crate::config::InternalEndpoint>>,
    active: Option<Arc<AtomicU32>>,
    outlier: Option<Arc<outlier::HostState>>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        if let Some(a) = &self.active {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl ClusterState {
    /// Picks an endpoint. `exclude` holds previously tried hosts (retry_host_predicate previous_hosts);
    /// like Envoy, after `attempts` re-picks we accept a previously used host.
    pub fn pick(
        &self,
        hash: Option<u64>,
        exclude: &[SocketAddr],
        attempts: u32,
        original_dst: Option<SocketAddr>,
    ) -> Option<Picked> {
        if self.config.discovery == Discovery::OriginalDst {
            return original_dst.map(|addr| Picked {
                addr: match self.config.original_dst_port {
                    Some(port) => SocketAddr::new(addr.ip(), port),
                    None => addr,
                },
                hostname: None,
                internal: None,
                tls: self.config.tls_for(&[]).1.map(|t| (usize::MAX, t.clone())),
                active: None,
                outlier: None,
            });
        }
        let set = self.set.load();
        let n = set.endpoints.len();
        if n == 0 {
            return None;
        }
        let mut rng = rand::thread_rng();
        let mut choice = None;
        // Without a request hash Envoy's hashing balancers use a random one.
        let hash = hash.unwrap_or_else(rand::random);
        // Outlier ejections: ejected hosts are skipped unless the healthy share is under the panic
        // threshold (then Envoy balances over all hosts); with none healthy and no panic there is
        // no healthy upstream.
        let skip_ejected = self.config.outlier.is_some() && {
            let ejected = set.outlier.iter().filter(|h| h.ejected()).count();
            let healthy = n - ejected;
            let panic = (healthy as f64) * 100.0 < self.config.panic_threshold * n as f64;
            if ejected > 0 && healthy == 0 && !panic {
                return None;
            }
            ejected > 0 && !panic
        };
        let ejected = |i: usize| skip_ejected && set.outlier.get(i).is_some_and(|h| h.ejected());
        let healthy_hash = match self.config.lb {
            LbPolicy::RingHash | LbPolicy::Maglev if skip_ejected => self.healthy_hash(&set),
            _ => None,
        };
        let mut attempt = 0u32;
        let mut skips = 0usize;
        while attempt < attempts.max(1) {
            let i = match self.config.lb {
                LbPolicy::RoundRobin => {
                    set.schedule.pick(self.rr.fetch_add(1, Ordering::Relaxed))?
                }
                LbPolicy::Random => lb::random(&set.endpoints, &mut rng)?,
                LbPolicy::LeastRequest => {
                    let load =
                        |i: usize| set.active.get(i).map_or(0, |a| a.load(Ordering::Relaxed));
                    lb::least_request(&set.endpoints, load, &mut rng)?
                }
                LbPolicy::RingHash | LbPolicy::Maglev => match &healthy_hash {
                    Some(h) => *h.index.get(h.table.choose(hash, attempt)?)?,
                    None => set.hash.as_ref()?.choose(hash, attempt + skips as u32)?,
                },
            };
            if ejected(i) && skips < 4 * n {
                skips += 1;
                if !matches!(self.config.lb, LbPolicy::RoundRobin) {
                    // Random choices redraw; hashing moves on the ring like a retry.
                    attempt += u32::from(matches!(
                        self.config.lb,
                        LbPolicy::RingHash | LbPolicy::Maglev
                    ));
                }
                continue;
            }
            choice = Some(i);
            let addr = set.endpoints[i].addr;
            if addr.is_some_and(|a| !exclude.contains(&a)) {
                break;
            }
            attempt += 1;
        }
        let i = choice?;
        let ep = &set.endpoints[i];
        let addr = ep.addr?;
        let active = set.active.get(i).cloned();
        if let Some(a) = &active {
            a.fetch_add(1, Ordering::Relaxed);
        }
        let (idx, tls) = self.config.tls_for(&ep.socket_match);
        Some(Picked {
            addr,
            hostname: ep.hostname.clone(),
            internal: ep.internal.clone(),
            tls: tls.map(|t| (idx, t.clone())),
            active,
            outlier: set.outlier.get(i).cloned(),
        })
    }

    /// Number of usable endpoints now.
    pub fn endpoint_count(&self) -> usize {
        self.set.load().endpoints.len()
    }

    /// Current endpoints (for `/clusters`).
    pub fn endpoints(&self) -> Arc<[Endpoint]> {
        self.set.load().endpoints.clone()
    }
}

/// All clusters' runtime state.
#[derive(Debug, Default)]
pub struct ClusterManager {
    clusters: ArcSwap<HashMap<ArcStr, Arc<ClusterState>>>,
    /// the snapshot cluster map last synced (an EDS-only update shares it)
    synced: arc_swap::ArcSwapOption<HashMap<ArcStr, Arc<crate::snapshot::ClusterEntry>>>,
}

impl ClusterManager {
    /// The state of a cluster.
    pub fn get(&self, name: &str) -> Option<Arc<ClusterState>> {
        self.clusters.load().get(name).cloned()
    }

    /// All cluster states.
    pub fn all(&self) -> Arc<HashMap<ArcStr, Arc<ClusterState>>> {
        self.clusters.load_full()
    }

    /// Brings runtime state in line with a new snapshot: clusters that stay keep their round-robin
    /// position; clusters whose endpoints did not change keep their tables and counters; endpoints
    /// that stay across an EDS update keep their counters (and, being the same address, their pooled
    /// connections).
    pub fn sync(&self, snap: &ConfigSnapshot) {
        if self
            .synced
            .load()
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, &snap.clusters))
        {
            // Same clusters: only endpoint sets can have changed.
            for state in self.clusters.load().values() {
                let Some(s) = &state.config.eds_service else {
                    continue;
                };
                let endpoints = snap
                    .endpoints
                    .get(s)
                    .map(|e| e.endpoints.clone())
                    .unwrap_or_else(|| Arc::from(Vec::new()));
                let cur = state.set.load();
                if !Arc::ptr_eq(&cur.endpoints, &endpoints) {
                    state
                        .set
                        .store(Arc::new(EndpointSet::carry(&state.config, endpoints, &cur)));
                }
            }
            return;
        }
        self.synced.store(Some(snap.clusters.clone()));
        let old = self.clusters.load_full();
        let mut next = HashMap::with_capacity(snap.clusters.len());
        for (name, entry) in snap.clusters.iter() {
            let cfg = entry.config.clone();
            let endpoints = match &cfg.eds_service {
                Some(s) => snap
                    .endpoints
                    .get(s)
                    .map(|e| e.endpoints.clone())
                    .unwrap_or_else(|| Arc::from(Vec::new())),
                None => static_endpoints(&cfg),
            };
            let state = match old.get(name) {
                Some(prev) if Arc::ptr_eq(&prev.config, &cfg) => {
                    if cfg.eds_service.is_some() {
                        let cur = prev.set.load();
                        if !Arc::ptr_eq(&cur.endpoints, &endpoints) {
                            prev.set
                                .store(Arc::new(EndpointSet::carry(&cfg, endpoints, &cur)));
                        }
                    }
                    prev.clone()
                }
                Some(prev) => Arc::new(ClusterState {
                    set: ArcSwap::from_pointee(EndpointSet::carry(
                        &cfg,
                        endpoints,
                        &prev.set.load(),
                    )),
                    rr: prev.rr.clone(),
                    breakers: prev.breakers.clone(),
                    detector: prev.detector.clone(),
                    conn_requests: Default::default(),
                    healthy_hash: Default::default(),
                    config: cfg,
                }),
                None => Arc::new(ClusterState {
                    set: ArcSwap::from_pointee(EndpointSet::new(&cfg, endpoints)),
                    rr: Arc::new(AtomicUsize::new(rand::random::<u16>() as usize)),
                    breakers: Arc::default(),
                    detector: Arc::default(),
                    conn_requests: Default::default(),
                    healthy_hash: Default::default(),
                    config: cfg,
                }),
            };
            if state.config.outlier.is_some()
                && !old.get(name).is_some_and(|p| Arc::ptr_eq(p, &state))
            {
                spawn_outlier_sweep(Arc::downgrade(&state));
            }
            if matches!(
                state.config.discovery,
                Discovery::StrictDns | Discovery::LogicalDns
            ) && !old.get(name).is_some_and(|p| Arc::ptr_eq(p, &state))
            {
                spawn_dns(Arc::downgrade(&state));
            }
            next.insert(name.clone(), state);
        }
        self.clusters.store(Arc::new(next));
    }
}

fn static_endpoints(c: &Cluster) -> Arc<[Endpoint]> {
    match c.discovery {
        Discovery::StrictDns | Discovery::LogicalDns => {
            // Literal IPs need no resolution; names are resolved by the DNS task.
            c.endpoints
                .iter()
                .filter_map(|e| {
                    e.host.parse::<std::net::IpAddr>().ok().map(|ip| Endpoint {
                        addr: Some(SocketAddr::new(ip, e.port)),
                        ..e.clone()
                    })
                })
                .collect()
        }
        _ => c.endpoints.clone(),
    }
}

/// Runs the outlier detector's interval sweep until the cluster state is dropped (or replaced).
fn spawn_outlier_sweep(state: Weak<ClusterState>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        loop {
            let every = match state.upgrade() {
                Some(s) => match &s.config.outlier {
                    Some(cfg) => outlier::interval(cfg),
                    None => return,
                },
                None => return,
            };
            pingora_timeout::sleep(every).await;
            let Some(s) = state.upgrade() else { return };
            let Some(cfg) = s.config.outlier.clone() else {
                return;
            };
            let set = s.set.load();
            let hosts: Vec<&outlier::HostState> = set.outlier.iter().map(|h| &**h).collect();
            s.detector.sweep(&cfg, &hosts);
        }
    });
}

/// Resolves a DNS cluster's hosts now and every `dns_refresh_rate`, until the state is dropped.
fn spawn_dns(state: Weak<ClusterState>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        loop {
            let Some(s) = state.upgrade() else { return };
            let cfg = s.config.clone();
            let mut resolved = Vec::new();
            for e in cfg.endpoints.iter() {
                match tokio::net::lookup_host((e.host.as_str(), e.port)).await {
                    Ok(addrs) => {
                        let addrs: Vec<_> = addrs.collect();
                        let take = if cfg.discovery == Discovery::LogicalDns { 1 } else { addrs.len() };
                        for a in addrs.into_iter().take(take) {
                            resolved.push(Endpoint { addr: Some(a), ..e.clone() });
                        }
                    }
                    Err(err) => tracing::debug!(cluster = %cfg.name, host = %e.host, "DNS resolution failed: {err}"),
                }
            }
            let changed = {
                let cur = s.set.load();
                cur.endpoints.iter().map(|e| e.addr).ne(resolved.iter().map(|e| e.addr))
            };
            if changed {
                s.set.store(Arc::new(EndpointSet::new(&cfg, resolved.into())));
            }
            let rate = cfg.dns_refresh_rate;
            drop(s);
            tokio::time::sleep(rate).await;
        }
    });
}
