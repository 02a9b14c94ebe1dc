// SPDX-License-Identifier: Apache-2.0
//! The one immutable [`ConfigSnapshot`] and its [`SnapshotHandle`] (one `ArcSwap`, one publisher).

use crate::config::{Cluster, Listener};
use arc_swap::ArcSwap;
use arcstr::ArcStr;
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterProto;
use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerProto;
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
    /// Clusters by name.
    pub clusters: HashMap<ArcStr, Arc<ClusterEntry>>,
}

impl ConfigSnapshot {
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
