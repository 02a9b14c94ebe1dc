// SPDX-License-Identifier: Apache-2.0
//! The one immutable [`ConfigSnapshot`] and its [`SnapshotHandle`] (one `ArcSwap`, one publisher).

use crate::config::{Cluster, Endpoint, Listener};
use arc_swap::ArcSwap;
use arcstr::ArcStr;
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterProto;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerProto;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use pingsail_filters::route::RouteTable;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;

/// A listener as configured plus where it came from (for `/config_dump`).
#[derive(Debug)]
pub struct ListenerEntry {
    /// translated
    pub config: Arc<Listener>,
    /// source proto
    pub proto: Arc<ListenerProto>,
    /// version it arrived with ("" for static)
    pub version: ArcStr,
    /// when it was last updated
    pub updated: SystemTime,
    /// came over LDS
    pub dynamic: bool,
}

/// A cluster as configured plus its source.
#[derive(Debug)]
pub struct ClusterEntry {
    /// translated
    pub config: Arc<Cluster>,
    /// source proto
    pub proto: Arc<ClusterProto>,
    /// version ("" for static)
    pub version: ArcStr,
    /// when it was last updated
    pub updated: SystemTime,
    /// came over CDS
    pub dynamic: bool,
}

/// A route configuration received over RDS.
#[derive(Debug)]
pub struct RouteEntry {
    /// translated
    pub table: Arc<RouteTable>,
    /// source proto
    pub proto: Arc<RouteConfiguration>,
    /// version it arrived with
    pub version: ArcStr,
    /// when it was last updated
    pub updated: SystemTime,
}

/// A `ClusterLoadAssignment` received over EDS.
#[derive(Debug)]
pub struct EndpointsEntry {
    /// translated endpoints (priority 0)
    pub endpoints: Arc<[Endpoint]>,
    /// source proto
    pub proto: Arc<ClusterLoadAssignment>,
    /// version it arrived with
    pub version: ArcStr,
    /// when it was last updated
    pub updated: SystemTime,
}

/// A resource the control plane sent that is held but not (or not yet) in use, or the last rejection
/// of a resource: what `/config_dump` shows as warming state and `error_state`.
#[derive(Debug, Clone)]
pub struct UpdateFailure {
    /// the rejected resource as received
    pub resource: Option<envoy_types::pb::google::protobuf::Any>,
    /// why (the NACK's error_detail)
    pub details: String,
    /// version of the rejected update
    pub version: ArcStr,
    /// when
    pub at: SystemTime,
}

/// A secret as received: the resource, its version and when it arrived.
pub type SecretEntry = (
    Arc<envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret>,
    ArcStr,
    SystemTime,
);

/// The dynamic (xDS) side of a snapshot, for `/config_dump` and status.
#[derive(Debug, Default)]
pub struct XdsState {
    /// last accepted version per type URL
    pub versions: HashMap<&'static str, ArcStr>,
    /// listeners waiting for their routes
    pub warming_listeners: Vec<Arc<ListenerEntry>>,
    /// clusters waiting for their endpoints
    pub warming_clusters: Vec<Arc<ClusterEntry>>,
    /// last rejection per (type URL, resource name)
    pub errors: HashMap<(&'static str, ArcStr), UpdateFailure>,
    /// secrets as received (served to the TLS layer by the mTLS issue)
    pub secrets: HashMap<ArcStr, SecretEntry>,
    /// the initial CDS and LDS fetches are done (or timed out)
    pub initialized: bool,
}

/// Everything the data plane reads, frozen.
#[derive(Debug, Default)]
pub struct ConfigSnapshot {
    /// Monotonic version, bumped on every publish.
    pub version: u64,
    /// The bootstrap as loaded.
    pub bootstrap: Arc<Bootstrap>,
    /// Static listeners, in bootstrap order.
    pub listeners: Vec<Arc<ListenerEntry>>,
    /// Clusters by name (static and active dynamic); shared between snapshots while unchanged.
    pub clusters: Arc<HashMap<ArcStr, Arc<ClusterEntry>>>,
    /// RDS route configurations by name.
    pub routes: HashMap<ArcStr, Arc<RouteEntry>>,
    /// EDS assignments by cluster (service) name.
    pub endpoints: HashMap<ArcStr, Arc<EndpointsEntry>>,
    /// `None` without `dynamic_resources`.
    pub xds: Option<Arc<XdsState>>,
    /// Listeners by address, for the original-destination hand-off (built by [`Self::index`]).
    pub by_address: HashMap<std::net::SocketAddr, Arc<Listener>>,
    /// Internal listeners by name (built by [`Self::index`]).
    pub internal: HashMap<ArcStr, Arc<Listener>>,
}

impl ConfigSnapshot {
    /// Builds the address index (call before publishing).
    pub fn index(&mut self) {
        self.by_address = self
            .listeners
            .iter()
            .filter(|l| !l.config.internal)
            .map(|l| (l.config.address, l.config.clone()))
            .collect();
        self.internal = self
            .listeners
            .iter()
            .filter(|l| l.config.internal)
            .map(|l| (l.config.name.clone(), l.config.clone()))
            .collect();
    }

    /// The listener a connection to `dst` is handed to: the one bound to exactly `dst`, else the
    /// wildcard one on its port (`0.0.0.0:<port>` / `[::]:<port>`).
    pub fn listener_for(&self, dst: std::net::SocketAddr) -> Option<Arc<Listener>> {
        if let Some(l) = self.by_address.get(&dst) {
            return Some(l.clone());
        }
        let any: std::net::IpAddr = if dst.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        self.by_address
            .get(&std::net::SocketAddr::new(any, dst.port()))
            .cloned()
    }

    /// An internal listener by name.
    pub fn internal_listener(&self, name: &str) -> Option<Arc<Listener>> {
        self.internal.get(name).cloned()
    }

    /// A cluster by name.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name).map(|c| &c.config)
    }
}

/// Publishes snapshots. The only writer of the `ArcSwap`.
#[derive(Debug)]
pub struct SnapshotHandle {
    current: ArcSwap<ConfigSnapshot>,
    version_tx: watch::Sender<u64>,
}

impl SnapshotHandle {
    /// A handle holding `initial`.
    pub fn new(initial: ConfigSnapshot) -> Self {
        let (version_tx, _) = watch::channel(initial.version);
        SnapshotHandle {
            current: ArcSwap::from_pointee(initial),
            version_tx,
        }
    }

    /// The current snapshot (one atomic load).
    pub fn load(&self) -> Arc<ConfigSnapshot> {
        self.current.load_full()
    }

    /// Publishes a new snapshot with the next version.
    pub fn publish(&self, mut next: ConfigSnapshot) {
        next.version = self.current.load().version + 1;
        let v = next.version;
        self.current.store(Arc::new(next));
        self.version_tx.send_replace(v);
    }

    /// Subscribes to version announcements.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }
}
