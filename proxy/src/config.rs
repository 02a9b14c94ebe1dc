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
    /// `use_original_dst`: a redirected connection is handed to the listener bound to its original
    /// destination (`virtualOutbound`).
    pub use_original_dst: bool,
    /// The `original_dst` listener filter: chain matching sees the original destination
    /// (`virtualInbound`).
    pub original_dst_filter: bool,
    /// The `tls_inspector` listener filter, with its `filter_disabled` predicate.
    pub tls_inspector: Option<Predicate>,
    /// The `http_inspector` listener filter, with its `filter_disabled` predicate.
    pub http_inspector: Option<Predicate>,
    /// `continue_on_listener_filters_timeout`: on timeout use what was learned (else close).
    pub continue_on_timeout: bool,
    /// `filter_chains`
    pub chains: Vec<Arc<FilterChain>>,
    /// `default_filter_chain`
    pub default_chain: Option<Arc<FilterChain>>,
    /// `listener_filters_timeout` (default 15 s; 0 = wait forever).
    pub sniff_timeout: Option<Duration>,
    /// `traffic_direction: INBOUND` (what admin `drain_listeners?inboundonly` drains).
    pub inbound: bool,
    /// The listener's stats scope: `listener.<stat_prefix>` or `listener.<address>` with `:` as `_`
    /// (`listener.0.0.0.0_15006`), as Envoy names it.
    pub stat_prefix: ArcStr,
    /// `transparent`: IP_TRANSPARENT on the listening socket (TPROXY interception: connections
    /// arrive addressed to their original destination).
    pub transparent: bool,
    /// `freebind`: IP_FREEBIND on the listening socket.
    pub freebind: bool,
    /// The `original_src` listener filter (istiod adds it to virtualInbound in TPROXY mode).
    pub original_src: Option<OriginalSrc>,
    /// `internal_listener`: no socket; connections come from clusters whose endpoints are
    /// `envoy_internal_address { server_listener_name }` (proxy/src/internal.rs).
    pub internal: bool,
    /// Istio's `set_dst_address` listener filter (`istio.set_internal_dst_address.v1.Config`) on
    /// an internal listener: the local address comes from the endpoint's `tunnel` metadata or the
    /// CONNECT authority.
    pub set_dst_address: bool,
}

/// `envoy.filters.listener.original_src`: upstream connections of a downstream connection leave
/// from the downstream's address (IP_TRANSPARENT), marked so the replies route back to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalSrc {
    /// `bind_port`: also reuse the downstream's port
    pub bind_port: bool,
    /// `mark`: SO_MARK on the upstream socket (0 = none; istiod uses 1337)
    pub mark: u32,
}

/// A listener filter's `filter_disabled` (`ListenerFilterChainMatchPredicate`): when it holds for a
/// connection the filter does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Predicate {
    /// `any_match` (and the absence of `filter_disabled`, as `Not(Any)`)
    Any,
    /// `not_match`
    Not(Box<Predicate>),
    /// `and_match`
    And(Vec<Predicate>),
    /// `or_match`
    Or(Vec<Predicate>),
    /// `destination_port_range` [start, end)
    PortRange(u16, u32),
}

impl Predicate {
    /// Evaluates for a connection to `dst_port`.
    pub fn holds(&self, dst_port: u16) -> bool {
        match self {
            Predicate::Any => true,
            Predicate::Not(p) => !p.holds(dst_port),
            Predicate::And(ps) => ps.iter().all(|p| p.holds(dst_port)),
            Predicate::Or(ps) => ps.iter().any(|p| p.holds(dst_port)),
            Predicate::PortRange(start, end) => dst_port >= *start && u32::from(dst_port) < *end,
        }
    }

    /// The filter runs unless its `filter_disabled` holds.
    pub fn enabled(disabled: Option<&Predicate>, dst_port: u16) -> bool {
        disabled.is_none_or(|p| !p.holds(dst_port))
    }
}

/// An address prefix (`CidrRange`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// the network address
    pub addr: std::net::IpAddr,
    /// prefix length
    pub len: u8,
}

impl Cidr {
    /// Whether `ip` is inside the range (v4-mapped v6 addresses count as v4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len.min(32)))
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len.min(128)))
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// `filter_chain_match.source_type`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SourceType {
    /// `ANY`
    #[default]
    Any,
    /// `SAME_IP_OR_LOOPBACK`
    Local,
    /// `EXTERNAL`
    External,
}

/// `filter_chain_match`, every criterion Envoy evaluates before the transport socket.
#[derive(Debug, Default)]
pub struct ChainMatch {
    /// `destination_port`
    pub destination_port: Option<u16>,
    /// `prefix_ranges` (destination IP)
    pub prefix_ranges: Vec<Cidr>,
    /// `server_names` (SNI; `*.suffix` wildcards), lower case
    pub server_names: Vec<ArcStr>,
    /// `transport_protocol` (`raw_buffer` or `tls`)
    pub transport_protocol: Option<ArcStr>,
    /// `application_protocols`
    pub application_protocols: Vec<ArcStr>,
    /// `direct_source_prefix_ranges`
    pub direct_source_prefix_ranges: Vec<Cidr>,
    /// `source_type`
    pub source_type: SourceType,
    /// `source_prefix_ranges`
    pub source_prefix_ranges: Vec<Cidr>,
    /// `source_ports`
    pub source_ports: Vec<u16>,
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
    /// Flips when this chain leaves the configuration: its connections drain.
    pub drain: Drain,
    /// `transport_socket` with a `DownstreamTlsContext`: the chain terminates TLS.
    pub tls: Option<Arc<crate::tls::DownstreamTls>>,
    /// `envoy.filters.network.rbac` and `envoy.filters.network.ext_authz` filters before the
    /// terminal filter, in order.
    pub network_authz: Vec<crate::authz::NetworkAuthz>,
}

/// A drain signal shared by every connection of one filter chain. When a listener update removes or
/// changes a chain (or the listener goes away) the signal flips: HTTP/1 responses carry
/// `connection: close`, h2 connections get GOAWAY, and whatever is still open after the drain time
/// is closed.
///
/// Admin `drain_listeners?graceful` drains without retiring: responses are discouraged the same way,
/// but open connections are never closed by the proxy (they end when the process exits).
#[derive(Debug)]
pub struct Drain {
    signal: tokio::sync::watch::Sender<bool>,
    retired: tokio::sync::watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            signal: tokio::sync::watch::Sender::new(false),
            retired: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Drain {
    /// The chain left the configuration: drain, and close what is left after the drain time
    /// (idempotent).
    pub fn start(&self) {
        self.signal.send_replace(true);
        self.retired.send_replace(true);
    }

    /// Discourage requests (`connection: close`, GOAWAY) without ever closing connections
    /// (idempotent).
    pub fn start_graceful(&self) {
        self.signal.send_replace(true);
    }

    /// Whether draining has started.
    pub fn draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// A receiver for connections (Pingora's shutdown watch has this type).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.signal.subscribe()
    }

    /// Flips when the chain is retired (the drain-time countdown to closing starts).
    pub fn retired(&self) -> tokio::sync::watch::Receiver<bool> {
        self.retired.subscribe()
    }
}

/// The terminal network filter of a chain.
#[derive(Debug)]
pub enum ChainKind {
    /// `envoy.filters.network.http_connection_manager`
    Http(Arc<HttpConnectionManager>),
    /// `envoy.filters.network.tcp_proxy`
    Tcp(Arc<TcpProxy>),
}

/// `envoy.filters.http.fault` in an HCM's chain.
#[derive(Debug)]
pub struct FaultFilter {
    /// The filter's `name` (per-route configs are keyed by it).
    pub name: ArcStr,
    /// Filter-level config, used when the route has none.
    pub config: Arc<pingsail_filters::fault::FaultConfig>,
    /// The filter comes before the CORS filter (Istio's order).
    pub before_cors: bool,
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

/// `forward_client_cert_details`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XfccMode {
    /// remove the header (Envoy's default)
    #[default]
    Sanitize,
    /// forward it unchanged on mTLS connections
    ForwardOnly,
    /// append this hop's details on mTLS connections
    AppendForward,
    /// replace it with this hop's details on mTLS connections
    SanitizeSet,
    /// forward it unchanged always
    AlwaysForwardOnly,
}

/// `forward_client_cert_details` + `set_current_client_cert_details`
#[derive(Debug, Clone, Copy, Default)]
pub struct Xfcc {
    /// mode
    pub mode: XfccMode,
    /// `Subject=`
    pub subject: bool,
    /// `Cert=`
    pub cert: bool,
    /// `Chain=`
    pub chain: bool,
    /// `DNS=`
    pub dns: bool,
    /// `URI=`
    pub uri: bool,
}

/// `envoy.filters.network.http_connection_manager`
#[derive(Debug)]
pub struct HttpConnectionManager {
    /// `stat_prefix`
    pub stat_prefix: ArcStr,
    /// `codec_type`
    pub codec: Codec,
    /// Inline `route_config` (empty when the routes come over RDS).
    pub routes: Arc<RouteTable>,
    /// `rds.route_config_name`: the route table is looked up per request in the snapshot.
    pub rds: Option<ArcStr>,
    /// The RDS config source's `initial_fetch_timeout` (None = wait for the routes forever).
    pub rds_fetch_timeout: Option<Duration>,
    /// `route_config.validate_clusters` (default true for inline route configurations).
    pub validate_clusters: bool,
    /// `server_name` (default "envoy")
    pub server_name: http::HeaderValue,
    /// `server_header_transformation` PASS_THROUGH
    pub server_pass_through: bool,
    /// `use_remote_address`
    pub use_remote_address: bool,
    /// `x-forwarded-client-cert` handling
    pub xfcc: Xfcc,
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
    /// `common_http_protocol_options.max_connection_duration` (None = unlimited): a downstream
    /// connection older than this is drained (`connection: close` on its next response).
    pub max_connection_duration: Option<Duration>,
    /// `delayed_close_timeout` (default 1 s; None = disabled): how long a connection the proxy
    /// closes after a stream reset lingers before the socket is closed.
    pub delayed_close_timeout: Option<Duration>,
    /// `max_request_headers_kb` (default 60)
    pub max_request_headers_kb: u32,
    /// `http_protocol_options.accept_http_10` (otherwise HTTP/1.0 gets 426)
    pub accept_http_10: bool,
    /// `upgrade_configs` websocket entry: `None` = not configured (upgrades refused with 403),
    /// `Some(enabled)`; a route's own `upgrade_configs` may override `enabled`.
    pub websocket: Option<bool>,
    /// `upgrade_configs` CONNECT entry, like `websocket`.
    pub connect: Option<bool>,
    /// Istio's `connect_authority` HTTP filter is in the chain: a route enabling it hands the
    /// CONNECT authority to the internal listener behind it (`set_dst_address`).
    pub connect_authority: bool,
    /// `envoy.filters.http.set_filter_state`: the values shared with the upstream connection
    /// that an internal listener reads.
    pub set_filter_state: Option<Arc<SetFilterState>>,
    /// The CORS filter is in the chain.
    pub cors_filter: bool,
    /// jwt_authn and rbac HTTP filters, in chain order (they run before CORS and the router).
    pub authz: Vec<crate::authz::HttpAuthz>,
    /// The fault filter, when in the chain.
    pub fault: Option<Arc<FaultFilter>>,
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
    /// `tunneling_config`: the bytes travel inside an HTTP/2 CONNECT stream to the upstream.
    pub tunneling: Option<Arc<Tunneling>>,
}

/// The `set_filter_state` values an internal listener's `original_dst` filter reads
/// (`envoy.filters.listener.original_dst.local_ip` / `.remote_ip`, shared with the upstream).
#[derive(Debug, Default)]
pub struct SetFilterState {
    /// `…original_dst.local_ip`
    pub local: Option<Template>,
    /// `…original_dst.remote_ip`
    pub remote: Option<Template>,
}

/// `tcp_proxy.tunneling_config` (HBONE origination).
#[derive(Debug)]
pub struct Tunneling {
    /// `hostname`: the CONNECT `:authority`
    pub hostname: Template,
    /// `headers_to_add` (name, value), added to the CONNECT request
    pub headers: Vec<(http::HeaderName, Template)>,
}

/// A string with the few Envoy substitution operators the tunnel uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(pub Vec<TemplatePart>);

/// One piece of a [`Template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    /// literal text
    Text(String),
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`
    LocalAddress,
    /// `%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%`
    LocalIp,
    /// `%DOWNSTREAM_LOCAL_PORT%`
    LocalPort,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`
    RemoteAddress,
    /// `%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%`
    RemoteIp,
    /// `%REQ(name)%` (lower case; `:authority` is the request's authority)
    Req(String),
    /// `%DOWNSTREAM_PEER_URI_SAN%`
    PeerUriSan,
}

impl Template {
    /// Renders with the connection's addresses.
    pub fn render(&self, local: SocketAddr, remote: SocketAddr) -> String {
        self.render_req(local, remote, None, |_| None)
    }

    /// Renders with the connection's addresses, its peer identity and a request's headers.
    pub fn render_req<'a>(
        &self,
        local: SocketAddr,
        remote: SocketAddr,
        peer: Option<&str>,
        header: impl Fn(&str) -> Option<&'a str>,
    ) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                TemplatePart::Text(t) => out.push_str(t),
                TemplatePart::LocalAddress => out.push_str(&local.to_string()),
                TemplatePart::LocalIp => out.push_str(&local.ip().to_string()),
                TemplatePart::LocalPort => out.push_str(&local.port().to_string()),
                TemplatePart::RemoteAddress => out.push_str(&remote.to_string()),
                TemplatePart::RemoteIp => out.push_str(&remote.ip().to_string()),
                // Envoy renders a missing value as "-".
                TemplatePart::Req(h) => out.push_str(header(h).unwrap_or("-")),
                TemplatePart::PeerUriSan => out.push_str(peer.unwrap_or("-")),
            }
        }
        out
    }
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
    /// `metadata.filter_metadata["envoy.transport_socket_match"]` string values (e.g. `tlsMode`)
    pub socket_match: Vec<(ArcStr, ArcStr)>,
    /// `envoy_internal_address`: connections go to an internal listener of this proxy.
    pub internal: Option<Arc<InternalEndpoint>>,
}

/// An endpoint that is one of our own internal listeners.
#[derive(Debug, PartialEq)]
pub struct InternalEndpoint {
    /// `server_listener_name`
    pub listener: ArcStr,
    /// `endpoint_id`
    pub endpoint_id: ArcStr,
    /// the endpoint's `metadata.filter_metadata` (what `passthrough_metadata` of kind `host` passes)
    pub metadata: crate::internal::Metadata,
}

/// `envoy.transport_sockets.internal_upstream`: which metadata namespaces an internal connection
/// carries to the internal listener (as its dynamic metadata).
#[derive(Debug, Default, PartialEq)]
pub struct InternalUpstream {
    /// `passthrough_metadata`: (namespace, from the host (`true`) or the cluster (`false`))
    pub passthrough: Vec<(String, bool)>,
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
    /// ORIGINAL_DST `upstream_port_override`
    pub original_dst_port: Option<u16>,
    /// EDS: the `ClusterLoadAssignment` name whose endpoints this cluster uses (`eds_cluster_config`).
    pub eds_service: Option<ArcStr>,
    /// Unix socket endpoints (`pipe` addresses); only control-plane gRPC clusters may have them.
    pub pipes: Vec<ArcStr>,
    /// `upstream_bind_config.source_address`: the local address upstream connections bind to
    /// (127.0.0.6 for Istio's inbound passthrough).
    pub bind_source: Option<std::net::IpAddr>,
    /// `transport_socket` (TLS origination), when not plaintext.
    pub tls: Option<Arc<crate::tls::UpstreamTls>>,
    /// `transport_socket_matches`: (criteria, TLS or plaintext), first match wins, else `tls`.
    pub tls_matches: Vec<TlsMatch>,
    /// `circuit_breakers.thresholds` for the DEFAULT priority (Envoy's defaults when absent).
    pub breakers: Thresholds,
    /// `outlier_detection`
    pub outlier: Option<Arc<OutlierDetection>>,
    /// `common_lb_config.healthy_panic_threshold` in percent (default 50; 0 disables panic routing).
    pub panic_threshold: f64,
    /// Upstream HTTP connection options (`HttpProtocolOptions`).
    pub conn: ConnOptions,
    /// `internal_upstream` transport socket (cluster's or in `transport_socket_matches`).
    pub internal_upstream: Option<Arc<InternalUpstream>>,
    /// the cluster's `metadata.filter_metadata` (for `passthrough_metadata` of kind `cluster`)
    pub metadata: crate::internal::Metadata,
}

/// One `transport_socket_matches` entry: the criteria and the transport (TLS, or plaintext).
pub type TlsMatch = (Vec<(ArcStr, ArcStr)>, Option<Arc<crate::tls::UpstreamTls>>);

impl Cluster {
    /// The transport socket for an endpoint: (index for the tunnel, context).
    pub fn tls_for(
        &self,
        ep_match: &[(ArcStr, ArcStr)],
    ) -> (usize, Option<&Arc<crate::tls::UpstreamTls>>) {
        for (i, (criteria, tls)) in self.tls_matches.iter().enumerate() {
            if criteria.iter().all(|c| ep_match.contains(c)) {
                return (i, tls.as_ref());
            }
        }
        (usize::MAX, self.tls.as_ref())
    }
}

/// `circuit_breakers.thresholds` of one priority.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// `max_connections` (default 1024)
    pub max_connections: u64,
    /// `max_pending_requests` (default 1024)
    pub max_pending_requests: u64,
    /// `max_requests` (default 1024)
    pub max_requests: u64,
    /// `max_retries` (default 3)
    pub max_retries: u64,
    /// `track_remaining`: publish `circuit_breakers.default.remaining_*`.
    pub track_remaining: bool,
    /// `retry_budget` (`budget_percent`, default 20 %; `min_retry_concurrency`, default 3):
    /// replaces `max_retries` by `max(budget_percent × (active + pending requests),
    /// min_retry_concurrency)`.
    pub retry_budget: Option<(f64, u64)>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            track_remaining: false,
            retry_budget: None,
        }
    }
}

/// Upstream connection management (`HttpProtocolOptions.common_http_protocol_options`,
/// `http2_protocol_options`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnOptions {
    /// `idle_timeout` (Envoy's default 1 h)
    pub idle_timeout: Option<Duration>,
    /// `max_requests_per_connection` (None = unlimited)
    pub max_requests_per_connection: Option<u32>,
    /// `max_connection_duration`
    pub max_connection_duration: Option<Duration>,
    /// `http2_protocol_options.max_concurrent_streams`
    pub max_concurrent_streams: Option<u32>,
}

/// `outlier_detection`, with Envoy's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    /// `consecutive_5xx` (5)
    pub consecutive_5xx: u32,
    /// `consecutive_gateway_failure` (5)
    pub consecutive_gateway_failure: u32,
    /// `consecutive_local_origin_failure` (5)
    pub consecutive_local_origin_failure: u32,
    /// `interval` (10 s)
    pub interval: Duration,
    /// `base_ejection_time` (30 s)
    pub base_ejection_time: Duration,
    /// `max_ejection_time` (300 s)
    pub max_ejection_time: Duration,
    /// `max_ejection_time_jitter` (0): a random extra added to each ejection
    pub max_ejection_time_jitter: Duration,
    /// `max_ejection_percent` (10)
    pub max_ejection_percent: u32,
    /// `enforcing_consecutive_5xx` (100)
    pub enforcing_consecutive_5xx: u32,
    /// `enforcing_consecutive_gateway_failure` (0)
    pub enforcing_consecutive_gateway_failure: u32,
    /// `enforcing_consecutive_local_origin_failure` (100)
    pub enforcing_consecutive_local_origin_failure: u32,
    /// `split_external_local_origin_errors`
    pub split_external_local_origin_errors: bool,
    /// `enforcing_success_rate` (100)
    pub enforcing_success_rate: u32,
    /// `success_rate_minimum_hosts` (5)
    pub success_rate_minimum_hosts: u32,
    /// `success_rate_request_volume` (100)
    pub success_rate_request_volume: u32,
    /// `success_rate_stdev_factor` (1900, i.e. 1.9)
    pub success_rate_stdev_factor: u32,
    /// `enforcing_local_origin_success_rate` (100)
    pub enforcing_local_origin_success_rate: u32,
    /// `failure_percentage_threshold` (85)
    pub failure_percentage_threshold: u32,
    /// `enforcing_failure_percentage` (0)
    pub enforcing_failure_percentage: u32,
    /// `enforcing_failure_percentage_local_origin` (0)
    pub enforcing_failure_percentage_local_origin: u32,
    /// `failure_percentage_minimum_hosts` (5)
    pub failure_percentage_minimum_hosts: u32,
    /// `failure_percentage_request_volume` (50)
    pub failure_percentage_request_volume: u32,
    /// `always_eject_one_host`
    pub always_eject_one_host: bool,
}
