// SPDX-License-Identifier: Apache-2.0
//! The resources an ADS stream delivered, their warming state, and the snapshots built from them.
//!
//! One owner (the ADS task) applies updates; every accepted change produces a new
//! [`ConfigSnapshot`]. Warming follows Envoy: a listener whose route configurations have not arrived
//! is held back (an older version, if any, keeps serving), and so is a cluster whose endpoints have not
//! arrived, until they arrive or the config source's `initial_fetch_timeout` passes.

use super::translate::{self, Path};
use crate::config::{ChainKind, Listener};
use crate::snapshot::{
    ClusterEntry, ConfigSnapshot, EndpointsEntry, ListenerEntry, RouteEntry, UpdateFailure,
    XdsState,
};
use arcstr::ArcStr;
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterProto;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerProto;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// `envoy.config.listener.v3.Listener`
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// `envoy.config.cluster.v3.Cluster`
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// `envoy.config.route.v3.RouteConfiguration`
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// `envoy.config.endpoint.v3.ClusterLoadAssignment`
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// `envoy.extensions.transport_sockets.tls.v3.Secret`
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The type URLs we subscribe to, in Envoy's dependency order.
pub const TYPES: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];

/// Our static `&'static str` for a type URL, if it is one we know.
pub fn known_type(url: &str) -> Option<&'static str> {
    TYPES.iter().copied().find(|t| *t == url)
}

/// One resource of an update.
#[derive(Debug, Clone)]
pub struct Resource {
    /// the name the control plane gave (delta); may be empty in state-of-the-world
    pub name: String,
    /// the version the control plane gave (delta), else the response's
    pub version: String,
    /// the resource
    pub any: Any,
}

/// One response's worth of changes.
#[derive(Debug, Clone)]
pub struct Update {
    /// type URL (one of [`TYPES`])
    pub type_url: &'static str,
    /// `version_info` / `system_version_info`
    pub version: String,
    /// added or changed resources
    pub resources: Vec<Resource>,
    /// delta `removed_resources`
    pub removed: Vec<String>,
    /// a state-of-the-world response: for LDS and CDS, what is absent is removed
    pub state_of_the_world: bool,
}

#[derive(Debug)]
struct Warming<T> {
    entry: Arc<T>,
    deadline: Option<Instant>,
}

#[derive(Debug)]
struct Slot<T> {
    active: Option<Arc<T>>,
    warming: Option<Warming<T>>,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            active: None,
            warming: None,
        }
    }
}

/// All resources known to one proxy, static and dynamic.
#[derive(Debug)]
pub struct Store {
    bootstrap: Arc<Bootstrap>,
    static_listeners: Vec<Arc<ListenerEntry>>,
    static_clusters: HashMap<ArcStr, Arc<ClusterEntry>>,
    listeners: BTreeMap<ArcStr, Slot<ListenerEntry>>,
    clusters: BTreeMap<ArcStr, Slot<ClusterEntry>>,
    routes: HashMap<ArcStr, Arc<RouteEntry>>,
    endpoints: HashMap<ArcStr, Arc<EndpointsEntry>>,
    secrets: HashMap<ArcStr, (Arc<Secret>, ArcStr, SystemTime)>,
    versions: HashMap<&'static str, ArcStr>,
    resource_versions: HashMap<&'static str, HashMap<ArcStr, ArcStr>>,
    errors: HashMap<(&'static str, ArcStr), UpdateFailure>,
    initialized: bool,
    /// active clusters as published, rebuilt only when clusters change (EDS-only updates share it)
    cluster_map: Option<Arc<HashMap<ArcStr, Arc<ClusterEntry>>>>,
    /// [`Store::wanted`] per type, until listeners or clusters change
    wanted_cache: HashMap<&'static str, BTreeSet<ArcStr>>,
}

fn decode<M: Message + Default>(any: &Any, want: &str) -> Result<M, String> {
    if any.type_url != want {
        return Err(format!(
            "resource of type '{}' in a response for '{}'",
            any.type_url, want
        ));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("malformed resource: {e}"))
}

impl Store {
    /// A store holding the bootstrap's static resources.
    pub fn new(initial: &ConfigSnapshot) -> Self {
        Store {
            bootstrap: initial.bootstrap.clone(),
            static_listeners: initial.listeners.clone(),
            static_clusters: (*initial.clusters).clone(),
            listeners: BTreeMap::new(),
            clusters: BTreeMap::new(),
            routes: HashMap::new(),
            endpoints: HashMap::new(),
            secrets: HashMap::new(),
            versions: HashMap::new(),
            resource_versions: HashMap::new(),
            errors: HashMap::new(),
            initialized: false,
            cluster_map: None,
            wanted_cache: HashMap::new(),
        }
    }

    /// Whether the initial fetch is done.
    pub fn is_initialized(&self) -> bool {
        self.initialized
    }

    /// Marks the initial fetch as done (`/ready`, config dump).
    pub fn set_initialized(&mut self) {
        self.initialized = true;
    }

    /// The last accepted version of a type.
    pub fn version(&self, type_url: &str) -> Option<&ArcStr> {
        self.versions.get(type_url)
    }

    /// Resource name → version held, for delta `initial_resource_versions` on reconnect.
    pub fn resource_versions(&self, type_url: &str) -> HashMap<String, String> {
        self.resource_versions
            .get(type_url)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Names this proxy needs of a non-wildcard type: route configurations named by listeners
    /// (static, active and warming), assignments named by EDS clusters.
    pub fn wanted(&mut self, type_url: &'static str) -> BTreeSet<ArcStr> {
        if let Some(w) = self.wanted_cache.get(type_url) {
            return w.clone();
        }
        let w = self.compute_wanted(type_url);
        self.wanted_cache.insert(type_url, w.clone());
        w
    }

    /// Listeners or clusters changed: derived views are stale.
    fn touch(&mut self) {
        self.cluster_map = None;
        self.wanted_cache.clear();
    }

    fn compute_wanted(&self, type_url: &str) -> BTreeSet<ArcStr> {
        let mut out = BTreeSet::new();
        match type_url {
            ROUTE => {
                let all = self.static_listeners.iter().chain(
                    self.listeners
                        .values()
                        .flat_map(|s| s.active.iter().chain(s.warming.as_ref().map(|w| &w.entry))),
                );
                for l in all {
                    for name in rds_names(&l.config) {
                        out.insert(name);
                    }
                }
            }
            ENDPOINT => {
                let all = self.static_clusters.values().chain(
                    self.clusters
                        .values()
                        .flat_map(|s| s.active.iter().chain(s.warming.as_ref().map(|w| &w.entry))),
                );
                for c in all {
                    if let Some(s) = &c.config.eds_service {
                        out.insert(s.clone());
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// Whether any dynamic cluster is still waiting for its endpoints.
    pub fn clusters_warming(&self) -> bool {
        self.clusters.values().any(|s| s.warming.is_some())
    }

    /// Whether any dynamic listener is still waiting for its routes.
    pub fn listeners_warming(&self) -> bool {
        self.listeners.values().any(|s| s.warming.is_some())
    }

    /// The earliest warming deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        let l = self
            .listeners
            .values()
            .filter_map(|s| s.warming.as_ref()?.deadline);
        let c = self
            .clusters
            .values()
            .filter_map(|s| s.warming.as_ref()?.deadline);
        l.chain(c).min()
    }

    /// Promotes whatever has warmed (its dependencies arrived) or timed out. Returns whether anything
    /// changed.
    pub fn promote(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for slot in self.clusters.values_mut() {
            let ready = slot.warming.as_ref().is_some_and(|w| {
                w.deadline.is_some_and(|d| d <= now)
                    || w.entry
                        .config
                        .eds_service
                        .as_ref()
                        .is_none_or(|s| self.endpoints.contains_key(s))
            });
            if ready && let Some(w) = slot.warming.take() {
                slot.active = Some(w.entry);
                changed = true;
            }
        }
        for slot in self.listeners.values_mut() {
            let ready = slot.warming.as_ref().is_some_and(|w| {
                w.deadline.is_some_and(|d| d <= now)
                    || rds_names(&w.entry.config).all(|n| self.routes.contains_key(&n))
            });
            if ready && let Some(w) = slot.warming.take() {
                slot.active = Some(w.entry);
                changed = true;
            }
        }
        if changed {
            self.touch();
        }
        changed
    }

    /// Applies one response. `Err` carries the NACK's message; resources that were valid are applied
    /// even then (as Envoy does for listeners and clusters).
    pub fn apply(&mut self, u: Update) -> Result<(), String> {
        let version: ArcStr = u.version.as_str().into();
        let now = SystemTime::now();
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for r in &u.resources {
            let res_version: ArcStr = if r.version.is_empty() {
                version.clone()
            } else {
                r.version.as_str().into()
            };
            let outcome = match u.type_url {
                LISTENER => self.put_listener(r, &res_version, now),
                CLUSTER => self.put_cluster(r, &res_version, now),
                ROUTE => self.put_route(r, &res_version, now),
                ENDPOINT => self.put_endpoints(r, &res_version, now),
                SECRET => self.put_secret(r, &res_version, now),
                _ => Err((r.name.clone(), "unsupported type".into())),
            };
            match outcome {
                Ok(name) => {
                    if !seen.insert(name.clone()) && u.state_of_the_world {
                        errors.push(format!("duplicate resource '{name}' in one response"));
                    }
                    self.errors.remove(&(u.type_url, name.clone()));
                    self.resource_versions
                        .entry(u.type_url)
                        .or_default()
                        .insert(name, res_version.clone());
                }
                Err((name, why)) => {
                    let name: ArcStr = name.as_str().into();
                    seen.insert(name.clone());
                    errors.push(format!("{} '{name}': {why}", kind_name(u.type_url)));
                    self.errors.insert(
                        (u.type_url, name),
                        UpdateFailure {
                            resource: Some(r.any.clone()),
                            details: why,
                            version: version.clone(),
                            at: now,
                        },
                    );
                }
            }
        }
        let mut removed: Vec<ArcStr> = u.removed.iter().map(|n| n.as_str().into()).collect();
        if u.state_of_the_world && matches!(u.type_url, LISTENER | CLUSTER) {
            let held: Vec<ArcStr> = match u.type_url {
                LISTENER => self.listeners.keys().cloned().collect(),
                _ => self.clusters.keys().cloned().collect(),
            };
            removed.extend(held.into_iter().filter(|n| !seen.contains(n)));
        }
        for name in removed {
            match u.type_url {
                LISTENER => drop(self.listeners.remove(&name)),
                CLUSTER => drop(self.clusters.remove(&name)),
                ROUTE => drop(self.routes.remove(&name)),
                ENDPOINT => drop(self.endpoints.remove(&name)),
                SECRET => drop(self.secrets.remove(&name)),
                _ => {}
            }
            if let Some(m) = self.resource_versions.get_mut(u.type_url) {
                m.remove(&name);
            }
        }
        if matches!(u.type_url, LISTENER | CLUSTER) {
            self.touch();
        }
        self.promote(Instant::now());
        if errors.is_empty() {
            self.versions.insert(u.type_url, version);
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn put_listener(
        &mut self,
        r: &Resource,
        version: &ArcStr,
        now: SystemTime,
    ) -> Result<ArcStr, (String, String)> {
        let proto: ListenerProto = decode(&r.any, LISTENER).map_err(|e| (r.name.clone(), e))?;
        let name: ArcStr = proto.name.as_str().into();
        let fail = |e: String| (proto.name.clone(), e);
        if name.is_empty() {
            return Err(fail("listener without a name".into()));
        }
        if self.static_listeners.iter().any(|l| l.config.name == name) {
            return Err(fail(format!(
                "'{name}' is a static listener and cannot be updated or removed"
            )));
        }
        let slot = self.listeners.get(&name);
        let newest = slot.and_then(|s| s.warming.as_ref().map(|w| &w.entry).or(s.active.as_ref()));
        if newest.is_some_and(|e| *e.proto == proto) {
            return Ok(name);
        }
        let path = Path::default();
        let mut config =
            translate::translate_listener(&proto, &path).map_err(|e| fail(e.to_string()))?;
        if config.bind_to_port {
            let clash = self
                .static_listeners
                .iter()
                .chain(
                    self.listeners
                        .iter()
                        .filter(|(n, _)| **n != name)
                        .flat_map(|(_, s)| {
                            s.active.iter().chain(s.warming.as_ref().map(|w| &w.entry))
                        }),
                )
                .find(|l| l.config.bind_to_port && l.config.address == config.address);
            if let Some(other) = clash {
                return Err(fail(format!(
                    "listener '{name}' has duplicate address '{}' as existing listener '{}'",
                    config.address, other.config.name
                )));
            }
        }
        // Chains that did not change keep their identity, so their connections do not drain.
        if let Some(old) = slot.and_then(|s| s.active.as_ref()) {
            reuse_chains(&mut config, &proto, old);
        }
        let entry = Arc::new(ListenerEntry {
            config: Arc::new(config),
            proto: Arc::new(proto),
            version: version.clone(),
            updated: now,
            dynamic: true,
        });
        let deadline = rds_deadline(&entry.config);
        let slot = self.listeners.entry(name.clone()).or_default();
        slot.warming = Some(Warming { entry, deadline });
        Ok(name)
    }

    fn put_cluster(
        &mut self,
        r: &Resource,
        version: &ArcStr,
        now: SystemTime,
    ) -> Result<ArcStr, (String, String)> {
        let proto: ClusterProto = decode(&r.any, CLUSTER).map_err(|e| (r.name.clone(), e))?;
        let name: ArcStr = proto.name.as_str().into();
        let fail = |e: String| (proto.name.clone(), e);
        if name.is_empty() {
            return Err(fail("cluster without a name".into()));
        }
        if self.static_clusters.contains_key(&name) {
            return Err(fail(format!(
                "'{name}' is a static cluster and cannot be updated or removed"
            )));
        }
        let slot = self.clusters.get(&name);
        let newest = slot.and_then(|s| s.warming.as_ref().map(|w| &w.entry).or(s.active.as_ref()));
        if newest.is_some_and(|e| *e.proto == proto) {
            return Ok(name);
        }
        let path = Path::default();
        let config =
            translate::translate_cluster(&proto, &path).map_err(|e| fail(e.to_string()))?;
        let deadline = match &proto.eds_cluster_config {
            Some(e) => e
                .eds_config
                .as_ref()
                .and_then(|cs| translate::config_source(cs, &path).ok().flatten())
                .map(|d| Instant::now() + d),
            None => None,
        };
        let entry = Arc::new(ClusterEntry {
            config: Arc::new(config),
            proto: Arc::new(proto),
            version: version.clone(),
            updated: now,
            dynamic: true,
        });
        let slot = self.clusters.entry(name.clone()).or_default();
        slot.warming = Some(Warming { entry, deadline });
        Ok(name)
    }

    fn put_route(
        &mut self,
        r: &Resource,
        version: &ArcStr,
        now: SystemTime,
    ) -> Result<ArcStr, (String, String)> {
        let proto: RouteConfiguration = decode(&r.any, ROUTE).map_err(|e| (r.name.clone(), e))?;
        let name: ArcStr = proto.name.as_str().into();
        if name.is_empty() {
            return Err((r.name.clone(), "route configuration without a name".into()));
        }
        if self.routes.get(&name).is_some_and(|e| *e.proto == proto) {
            return Ok(name);
        }
        let path = Path::default();
        let table = translate::translate_route_config(&proto, &path)
            .map_err(|e| (proto.name.clone(), e.to_string()))?;
        self.routes.insert(
            name.clone(),
            Arc::new(RouteEntry {
                table: Arc::new(table),
                proto: Arc::new(proto),
                version: version.clone(),
                updated: now,
            }),
        );
        Ok(name)
    }

    fn put_endpoints(
        &mut self,
        r: &Resource,
        version: &ArcStr,
        now: SystemTime,
    ) -> Result<ArcStr, (String, String)> {
        let proto: ClusterLoadAssignment =
            decode(&r.any, ENDPOINT).map_err(|e| (r.name.clone(), e))?;
        let name: ArcStr = proto.cluster_name.as_str().into();
        if name.is_empty() {
            return Err((r.name.clone(), "assignment without a cluster_name".into()));
        }
        if self.endpoints.get(&name).is_some_and(|e| *e.proto == proto) {
            return Ok(name);
        }
        let path = Path::default();
        let endpoints = translate::translate_load_assignment(&proto, &path)
            .map_err(|e| (proto.cluster_name.clone(), e.to_string()))?;
        self.endpoints.insert(
            name.clone(),
            Arc::new(EndpointsEntry {
                endpoints: endpoints.into(),
                proto: Arc::new(proto),
                version: version.clone(),
                updated: now,
            }),
        );
        Ok(name)
    }

    fn put_secret(
        &mut self,
        r: &Resource,
        version: &ArcStr,
        now: SystemTime,
    ) -> Result<ArcStr, (String, String)> {
        let proto: Secret = decode(&r.any, SECRET).map_err(|e| (r.name.clone(), e))?;
        let name: ArcStr = proto.name.as_str().into();
        self.secrets
            .insert(name.clone(), (Arc::new(proto), version.clone(), now));
        Ok(name)
    }

    /// Takes a listener out after the data plane could not start it (e.g. its address cannot be
    /// bound), recording why.
    pub fn reject_listener(&mut self, name: &str, why: String) {
        self.touch();
        if let Some(slot) = self.listeners.remove(name) {
            let entry = slot.active.or(slot.warming.map(|w| w.entry));
            let (resource, version) = match entry {
                Some(e) => (
                    Some(Any {
                        type_url: LISTENER.into(),
                        value: e.proto.encode_to_vec(),
                    }),
                    e.version.clone(),
                ),
                None => (None, ArcStr::default()),
            };
            self.errors.insert(
                (LISTENER, name.into()),
                UpdateFailure {
                    resource,
                    details: why,
                    version,
                    at: SystemTime::now(),
                },
            );
        }
        if let Some(m) = self.resource_versions.get_mut(LISTENER) {
            m.remove(name);
        }
    }

    /// The configuration the data plane should run now.
    pub fn snapshot(&mut self) -> ConfigSnapshot {
        let mut listeners = self.static_listeners.clone();
        listeners.extend(self.listeners.values().filter_map(|s| s.active.clone()));
        let clusters = match &self.cluster_map {
            Some(m) => m.clone(),
            None => {
                let mut clusters = self.static_clusters.clone();
                for (n, s) in &self.clusters {
                    if let Some(a) = &s.active {
                        clusters.insert(n.clone(), a.clone());
                    }
                }
                let m = Arc::new(clusters);
                self.cluster_map = Some(m.clone());
                m
            }
        };
        let xds = XdsState {
            versions: self.versions.iter().map(|(k, v)| (*k, v.clone())).collect(),
            warming_listeners: self
                .listeners
                .values()
                .filter_map(|s| s.warming.as_ref().map(|w| w.entry.clone()))
                .collect(),
            warming_clusters: self
                .clusters
                .values()
                .filter_map(|s| s.warming.as_ref().map(|w| w.entry.clone()))
                .collect(),
            errors: self.errors.clone(),
            secrets: self.secrets.clone(),
            initialized: self.initialized,
        };
        ConfigSnapshot {
            version: 0,
            bootstrap: self.bootstrap.clone(),
            listeners,
            clusters,
            routes: self.routes.clone(),
            endpoints: self.endpoints.clone(),
            xds: Some(Arc::new(xds)),
            by_address: HashMap::new(),
            internal: HashMap::new(),
        }
    }
}

fn kind_name(type_url: &str) -> &'static str {
    match type_url {
        LISTENER => "listener",
        CLUSTER => "cluster",
        ROUTE => "route configuration",
        ENDPOINT => "cluster load assignment",
        SECRET => "secret",
        _ => "resource",
    }
}

/// The RDS names a listener's HTTP chains use.
fn rds_names(l: &Listener) -> impl Iterator<Item = ArcStr> + '_ {
    l.chains
        .iter()
        .chain(l.default_chain.iter())
        .filter_map(|c| match &c.kind {
            ChainKind::Http(h) => h.rds.clone(),
            ChainKind::Tcp(_) => None,
        })
}

fn rds_deadline(l: &Listener) -> Option<Instant> {
    let t = l
        .chains
        .iter()
        .chain(l.default_chain.iter())
        .filter_map(|c| match &c.kind {
            ChainKind::Http(h) if h.rds.is_some() => Some(h.rds_fetch_timeout),
            _ => None,
        })
        .collect::<Vec<_>>();
    if t.is_empty() {
        return None;
    }
    // Any chain that waits forever keeps the listener warming until its routes arrive.
    let mut min = None;
    for d in t {
        let d = d?;
        min = Some(min.map_or(d, |m: std::time::Duration| m.min(d)));
    }
    min.map(|d| Instant::now() + d)
}

/// Gives chains whose source did not change the previous version's `Arc` (and with it its drain
/// signal), so an in-place listener update only drains the chains that changed.
fn reuse_chains(config: &mut Listener, proto: &ListenerProto, old: &ListenerEntry) {
    for (i, fc) in proto.filter_chains.iter().enumerate() {
        let Some(j) = old.proto.filter_chains.iter().position(|o| o == fc) else {
            continue;
        };
        if let (Some(slot), Some(prev)) = (config.chains.get_mut(i), old.config.chains.get(j)) {
            *slot = prev.clone();
        }
    }
    if let (Some(new), Some(old_fc)) =
        (&proto.default_filter_chain, &old.proto.default_filter_chain)
        && new == old_fc
        && let Some(prev) = &old.config.default_chain
    {
        config.default_chain = Some(prev.clone());
    }
}
