// SPDX-License-Identifier: Apache-2.0
//! Validated, immutable configuration types built only by [`crate::xds::translate`].

use arcstr::ArcStr;
use pingsail_filters::route::RouteTable;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A listener.
#[derive(Debug)]
pub struct Listener {
    /// `name`
    pub name: ArcStr,
    /// `address`
    pub address: SocketAddr,
    /// `bind_to_port` (default true). Listeners without it only receive hand-offs from 15001/15006.
    pub bind_to_port: bool,
    /// `use_original_dst` (hand-off by original destination; the capture issue).
    pub use_original_dst: bool,
    /// `filter_chains`
    pub chains: Vec<Arc<FilterChain>>,
    /// `default_filter_chain`
    pub default_chain: Option<Arc<FilterChain>>,
    /// Whether any chain matches on application protocol (then HTTP sniffing runs).
    pub sniff_http: bool,
    /// `listener_filters_timeout` (default 15 s; 0 = wait forever).
    pub sniff_timeout: Option<Duration>,
}

/// `filter_chain_match` (the subset that applies before TLS: port, transport, ALPN from sniffing).
#[derive(Debug, Default)]
pub struct ChainMatch {
    /// `destination_port`
    pub destination_port: Option<u16>,
    /// `transport_protocol` (`raw_buffer` or `tls`)
    pub transport_protocol: Option<ArcStr>,
    /// `application_protocols`
    pub application_protocols: Vec<ArcStr>,
}

/// One filter chain.
#[derive(Debug)]
pub struct FilterChain {
    /// `name`
    pub name: ArcStr,
    /// `filter_chain_match`
    pub matcher: ChainMatch,
    /// The terminal network filter.
    pub kind: ChainKind,
    /// `envoy.filters.network.rbac` filters before the terminal filter, in order.
    pub network_rbac: Vec<Arc<crate::authz::NetworkRbac>>,
}

/// The terminal network filter of a chain.
#[derive(Debug)]
pub enum ChainKind {
    /// `envoy.filters.network.http_connection_manager`
    Http(Arc<HttpConnectionManager>),
    /// `envoy.filters.network.tcp_proxy`
    Tcp(Arc<TcpProxy>),
}

/// HTTP codec selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Sniff HTTP/1 vs h2 prior knowledge.
    Auto,
    /// HTTP/1.x only.
    Http1,
    /// h2 (prior knowledge) only.
    Http2,
}

/// `path_with_escaped_slashes_action`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// keep (default)
    Keep,
    /// 400 on %2F / %5C
    Reject,
    /// 307 redirect to the unescaped path
    UnescapeAndRedirect,
    /// unescape and forward
    UnescapeAndForward,
}

/// `envoy.filters.network.http_connection_manager`
#[derive(Debug)]
pub struct HttpConnectionManager {
    /// `stat_prefix`
    pub stat_prefix: ArcStr,
    /// `codec_type`
    pub codec: Codec,
    /// Inline `route_config`.
    pub routes: Arc<RouteTable>,
    /// `route_config.validate_clusters` (default true for inline route configurations).
    pub validate_clusters: bool,
    /// `server_name` (default "envoy")
    pub server_name: http::HeaderValue,
    /// `server_header_transformation` PASS_THROUGH
    pub server_pass_through: bool,
    /// `use_remote_address`
    pub use_remote_address: bool,
    /// `xff_num_trusted_hops`
    pub xff_num_trusted_hops: u32,
    /// `generate_request_id` (default true)
    pub generate_request_id: bool,
    /// `preserve_external_request_id`
    pub preserve_external_request_id: bool,
    /// `normalize_path`
    pub normalize_path: bool,
    /// `merge_slashes`
    pub merge_slashes: bool,
    /// `path_with_escaped_slashes_action`
    pub escaped_slashes: EscapedSlashes,
    /// `stream_idle_timeout` (default 5 min; None = disabled)
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout` (None = disabled)
    pub request_timeout: Option<Duration>,
    /// `max_request_headers_kb` (default 60)
    pub max_request_headers_kb: u32,
    /// `http_protocol_options.accept_http_10` (otherwise HTTP/1.0 gets 426)
    pub accept_http_10: bool,
    /// `upgrade_configs` websocket entry: `None` = not configured (upgrades refused with 403),
    /// `Some(enabled)`; a route's own `upgrade_configs` may override `enabled`.
    pub websocket: Option<bool>,
    /// The CORS filter is in the chain.
    pub cors_filter: bool,
    /// jwt_authn and rbac HTTP filters, in chain order (they run before CORS and the router).
    pub authz: Vec<crate::authz::HttpAuthz>,
    /// `access_log`
    pub access_logs: Vec<Arc<crate::access_log::AccessLog>>,
}

/// `envoy.filters.network.tcp_proxy`
#[derive(Debug)]
pub struct TcpProxy {
    /// `stat_prefix`
    pub stat_prefix: ArcStr,
    /// `cluster` or `weighted_clusters` (name, weight), total weight
    pub clusters: Vec<(ArcStr, u64)>,
    /// sum of weights
    pub total_weight: u64,
    /// `idle_timeout` (default 1 h; None = disabled)
    pub idle_timeout: Option<Duration>,
    /// `access_log`
    pub access_logs: Vec<Arc<crate::access_log::AccessLog>>,
}

/// Cluster discovery types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// STATIC or EDS with inline endpoints.
    Static,
    /// STRICT_DNS: resolve every host, refresh periodically.
    StrictDns,
    /// LOGICAL_DNS: one host, first address.
    LogicalDns,
    /// ORIGINAL_DST: the connection's original destination.
    OriginalDst,
}

/// `lb_policy`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// smooth weighted round robin
    RoundRobin,
    /// power of two choices, weighted
    LeastRequest,
    /// uniform random (weighted)
    Random,
    /// Ketama ring with xxHash, Envoy-compatible
    RingHash,
    /// Maglev table, Envoy-compatible
    Maglev,
}

/// One endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// host as configured (IP, or DNS name for DNS clusters)
    pub host: ArcStr,
    /// port
    pub port: u16,
    /// resolved address (static clusters)
    pub addr: Option<SocketAddr>,
    /// `load_balancing_weight` (default 1)
    pub weight: u32,
    /// `hostname` for auto_host_rewrite
    pub hostname: Option<ArcStr>,
}

/// A validated cluster.
#[derive(Debug)]
pub struct Cluster {
    /// `name`
    pub name: ArcStr,
    /// discovery type
    pub discovery: Discovery,
    /// endpoints in priority 0 (other priorities are refused for now)
    pub endpoints: Arc<[Endpoint]>,
    /// `lb_policy`
    pub lb: LbPolicy,
    /// Consistent-hash settings for RING_HASH / MAGLEV (tables are built per endpoint set).
    pub hash_lb: Option<crate::cluster::lb::HashLb>,
    /// `consistent_hashing_lb_config.use_hostname_for_hashing`
    pub use_hostname_for_hashing: bool,
    /// `connect_timeout` (default 5 s)
    pub connect_timeout: Duration,
    /// Upstream protocol: HTTP/2 (explicit), or follow the downstream.
    pub http2: bool,
    /// `use_downstream_protocol_config`
    pub use_downstream_protocol: bool,
    /// `dns_refresh_rate` (default 5 s)
    pub dns_refresh_rate: Duration,
    /// ORIGINAL_DST `use_http_header`
    pub original_dst_use_header: bool,
}
