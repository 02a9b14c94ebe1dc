// SPDX-License-Identifier: Apache-2.0
//! Runtime cluster state (endpoint selection, active request counts, DNS results), kept outside the
//! snapshot and keyed by cluster name so that it survives configuration swaps.

pub mod lb;

use crate::config::{Cluster, Discovery, Endpoint, LbPolicy};
use crate::snapshot::ConfigSnapshot;
use arc_swap::ArcSwap;
use arcstr::ArcStr;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

/// Endpoints as currently usable (resolved for DNS clusters) with their derived selection tables.
#[derive(Debug)]
pub struct EndpointSet {
    /// endpoints with `addr` set
    pub endpoints: Arc<[Endpoint]>,
    schedule: lb::Schedule,
    hash: Option<lb::HashTable>,
    active: Box<[Arc<AtomicU32>]>,
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
            }
        }
        set
    }

    fn new(cfg: &Cluster, endpoints: Arc<[Endpoint]>) -> Self {
        let schedule = lb::Schedule::new(&endpoints);
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
            lb::HashTable::build(h, &keys)
        });
        let active = endpoints
            .iter()
            .map(|_| Arc::new(AtomicU32::new(0)))
            .collect();
        EndpointSet {
            endpoints,
            schedule,
            hash,
            active,
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
    active: Option<Arc<AtomicU32>>,
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
                addr,
                hostname: None,
                tls: self.config.tls_for(&[]).1.map(|t| (usize::MAX, t.clone())),
                active: None,
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
        for attempt in 0..attempts.max(1) {
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
                LbPolicy::RingHash | LbPolicy::Maglev => {
                    set.hash.as_ref()?.choose(hash, attempt)?
                }
            };
            choice = Some(i);
            let addr = set.endpoints[i].addr;
            if addr.is_some_and(|a| !exclude.contains(&a)) {
                break;
            }
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
            tls: tls.map(|t| (idx, t.clone())),
            active,
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
                    config: cfg,
                }),
                None => Arc::new(ClusterState {
                    set: ArcSwap::from_pointee(EndpointSet::new(&cfg, endpoints)),
                    rr: Arc::new(AtomicUsize::new(rand::random::<u16>() as usize)),
                    config: cfg,
                }),
            };
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
