// SPDX-License-Identifier: Apache-2.0
//! Envoy internal listeners (`internal_listener: {}`): listeners without a socket, reached by
//! clusters whose endpoints are `envoy_internal_address { server_listener_name }`.
//!
//! An internal connection is an in-memory pipe plus what crosses it besides bytes:
//! - the `internal_upstream` transport socket's `passthrough_metadata` (host or cluster metadata
//!   namespaces), which the internal listener sees as its dynamic metadata;
//! - filter state shared with the upstream: the CONNECT authority (Istio's `connect_authority`),
//!   the downstream peer's identity (`istio_authn`), `envoy.filters.listener.original_dst.local_ip`.
//!
//! The listener filters that read them: Envoy's `original_dst` (metadata
//! `envoy.filters.listener.original_dst` `local`/`remote`, else the filter state) and Istio's
//! `set_dst_address` (metadata `tunnel` `destination`/`address`, else the CONNECT authority).
//! Istio's sidecar uses them for HBONE: `connect_originate` (tcp_proxy tunnelling over HTTP/2
//! CONNECT), `connect_terminate` → `main_internal` (inbound chains by destination port).

use crate::Apps;
use crate::config::{Cluster, InternalEndpoint, Listener};
use crate::listener::ConnInfo;
use arcstr::ArcStr;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::DuplexStream;

/// `metadata.filter_metadata` by namespace, as JSON.
pub type Metadata = Arc<BTreeMap<String, serde_json::Value>>;

/// Bytes buffered per direction of an internal connection (Envoy's default buffer is 1 MiB; a
/// smaller pipe only adds back-pressure sooner).
const PIPE: usize = 64 * 1024;

/// What an internal connection carries besides bytes.
#[derive(Debug, Default, Clone)]
pub struct Passed {
    /// dynamic metadata namespaces (`passthrough_metadata`)
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Istio `connect_authority`: the CONNECT `:authority` and the tunnel port override
    pub authority: Option<(String, u16)>,
    /// the downstream peer's SPIFFE identity (`io.istio.peer_principal`)
    pub peer_principal: Option<ArcStr>,
    /// `envoy.filters.listener.original_dst.local_ip` filter state
    pub local: Option<SocketAddr>,
    /// `envoy.filters.listener.original_dst.remote_ip` filter state
    pub remote: Option<SocketAddr>,
}

impl Passed {
    /// The `passthrough_metadata` of `cluster` for an internal endpoint.
    pub fn for_endpoint(cluster: &Cluster, ep: &InternalEndpoint) -> Self {
        let mut metadata = BTreeMap::new();
        if let Some(iu) = &cluster.internal_upstream {
            for (ns, from_host) in &iu.passthrough {
                let src = if *from_host {
                    &ep.metadata
                } else {
                    &cluster.metadata
                };
                if let Some(v) = src.get(ns) {
                    metadata.insert(ns.clone(), v.clone());
                }
            }
        }
        Passed {
            metadata,
            ..Default::default()
        }
    }
}

/// No address yet: Envoy gives internal connections `envoy://` addresses, which match no IP
/// criterion; 0.0.0.0:0 stands for them until a listener filter restores one.
pub const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Opens a connection to the internal listener `name`. Fails (connection refused, as Envoy) when
/// no such listener is configured.
pub fn connect(apps: &Arc<Apps>, name: &str, passed: Passed) -> std::io::Result<DuplexStream> {
    let Some(listener) = apps.shared.snapshot.load().internal_listener(name) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("no internal listener '{name}'"),
        ));
    };
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let apps = apps.clone();
    let stats = apps.shared.stats.listener(&listener.stat_prefix);
    tokio::spawn(async move {
        let active = crate::stats::ActiveConnection::new(stats);
        serve(apps, listener, theirs, passed).await;
        drop(active);
    });
    Ok(ours)
}

fn addr(v: Option<&serde_json::Value>) -> Option<SocketAddr> {
    v?.as_str()?.parse().ok()
}

/// The internal listener's side of one connection: listener filters, chain selection, then the
/// chain's filters, as for a socket connection (without TLS or sniffing: internal chains are
/// plaintext).
async fn serve(apps: Arc<Apps>, listener: Arc<Listener>, stream: DuplexStream, passed: Passed) {
    let mut local = UNSPECIFIED;
    let mut remote = UNSPECIFIED;
    // Where an ORIGINAL_DST cluster connects (Envoy's `DestinationAddress` filter state).
    let mut destination = None;
    if listener.original_dst_filter {
        match passed.metadata.get("envoy.filters.listener.original_dst") {
            Some(md) => {
                local = addr(md.get("local")).unwrap_or(local);
                remote = addr(md.get("remote")).unwrap_or(remote);
            }
            None => {
                local = passed.local.unwrap_or(local);
                remote = passed.remote.unwrap_or(remote);
            }
        }
    }
    if listener.set_dst_address {
        match passed.metadata.get("tunnel") {
            Some(md) => {
                local = addr(md.get("destination")).unwrap_or(local);
                destination = addr(md.get("address"));
            }
            None => {
                if let Some(a) = passed
                    .authority
                    .as_ref()
                    .and_then(|(a, _)| a.parse::<SocketAddr>().ok())
                {
                    local = a;
                    let port = passed.authority.as_ref().map_or(0, |(_, p)| *p);
                    destination = Some(if port > 0 {
                        SocketAddr::new(a.ip(), port)
                    } else {
                        a
                    });
                }
            }
        }
    }
    let info = ConnInfo {
        dst: local,
        src: remote,
        direct_src: remote,
        server_name: None,
        transport: "raw_buffer",
        alpn: &[],
    };
    let Some(chain) = crate::listener::select_chain(&listener, &info).cloned() else {
        tracing::debug!(listener = %listener.name, %local, "internal: no matching filter chain; closing");
        return;
    };
    let peer = passed.peer_principal.clone();
    if !crate::listener::network_allowed(&apps, &chain, remote, local, "", peer.as_deref()).await {
        return;
    }
    let original_dst = destination.or((local != UNSPECIFIED).then_some(local));
    let conn = crate::tcp::Conn {
        local,
        remote,
        original_dst,
        upstream_src: None,
        peer_principal: peer,
    };
    crate::listener::serve_chain(&apps, &listener, &chain, stream, -1, conn).await;
}
