// SPDX-License-Identifier: Apache-2.0
//! istiod's name table (`istio.networking.nds.v1.NameTable`, istio `pkg/dns/proto/nds.proto`): the
//! hostnames and addresses (auto-allocated ones included) of the services the proxy can reach.
//! pilot-agent subscribes to it over its xDS connection when DNS capture is on and feeds it to
//! the DNS proxy; so do we ([`crate::xdsproxy`] → [`crate::dns`]). The messages are small, so they
//! are declared with prost's derive; field numbers follow the proto.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

/// The NDS type URL.
pub const NAME_TABLE_TYPE_URL: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";

/// `istio.networking.nds.v1.NameTable`: hostname → what is known of it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NameTable {
    #[prost(map = "string, message", tag = "1")]
    pub table: HashMap<String, NameInfo>,
}

/// `istio.networking.nds.v1.NameTable.NameInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NameInfo {
    /// The addresses (IPv4 and/or IPv6, as text).
    #[prost(string, repeated, tag = "1")]
    pub ips: Vec<String>,
    /// The registry the host comes from; `Kubernetes` gets short-name variants.
    #[prost(string, tag = "2")]
    pub registry: String,
    /// The service's short name (Kubernetes only).
    #[prost(string, tag = "3")]
    pub shortname: String,
    /// The service's namespace (Kubernetes only).
    #[prost(string, tag = "4")]
    pub namespace: String,
    /// Further names of the host (deprecated in Istio, still honoured).
    #[prost(string, repeated, tag = "5")]
    pub alt_hosts: Vec<String>,
}

/// The registry value of Kubernetes services (`provider.Kubernetes`).
pub const KUBERNETES_REGISTRY: &str = "Kubernetes";

/// Where the xDS proxy publishes the latest name table.
pub type NameTableSender = watch::Sender<Option<Arc<NameTable>>>;
/// What the DNS proxy reads.
pub type NameTableReceiver = watch::Receiver<Option<Arc<NameTable>>>;

/// A fresh channel: no table yet.
pub fn name_table_channel() -> (NameTableSender, NameTableReceiver) {
    watch::channel(None)
}
