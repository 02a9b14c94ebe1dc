// SPDX-License-Identifier: Apache-2.0
//! Authorization and end-user authentication filters as configured on listeners: the HTTP
//! `jwt_authn` and `rbac` filters (run by [`crate::http`]) and the network `rbac` filter (run by
//! [`crate::listener`] before the terminal filter).

use crate::Shared;
use crate::stats::{Counter, Stats};
use arcstr::ArcStr;
use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf as pbuf;
use pingsail_filters::jwt::JwtConfig;
use pingsail_filters::metadata::DynamicMetadata;
use pingsail_filters::rbac::{Decision, Input, NoHeaders, RbacConfig};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

/// The filter-state key istio_authn fills with the peer's identity.
pub const PEER_PRINCIPAL_KEY: &str = "io.istio.peer_principal";

/// One authorization-related HTTP filter, in HCM order.
#[derive(Debug)]
pub enum HttpAuthz {
    /// `envoy.filters.http.jwt_authn`
    Jwt(Arc<HttpJwt>),
    /// `envoy.filters.http.rbac`
    Rbac(Arc<HttpRbac>),
    /// `envoy.filters.http.ext_authz` with an HTTP or gRPC authorization service
    ExtAuthz(Arc<HttpExtAuthz>),
}

/// `with_request_body`
#[derive(Debug, Clone, Copy)]
pub struct ExtAuthzBody {
    /// `max_request_bytes`
    pub max_bytes: usize,
    /// `allow_partial_message`
    pub allow_partial: bool,
    /// `pack_as_bytes` (`raw_body` instead of `body`)
    pub as_bytes: bool,
}

/// A gRPC authorization service (`grpc_service.envoy_grpc`), with one lazily connected HTTP/2
/// channel per endpoint of its cluster.
#[derive(Debug)]
pub struct GrpcAuthz {
    /// `envoy_grpc.cluster_name`
    pub cluster: String,
    /// `envoy_grpc.authority` (default: the cluster name)
    pub authority: String,
    /// `grpc_service.timeout` (default 200 ms)
    pub timeout: std::time::Duration,
    /// `grpc_service.initial_metadata`
    pub initial_metadata: Vec<(http::HeaderName, http::HeaderValue)>,
    channels: parking_lot::Mutex<HashMap<(SocketAddr, Option<usize>), tonic::transport::Channel>>,
}

impl GrpcAuthz {
    /// A service with no channel yet.
    pub fn new(
        cluster: String,
        authority: String,
        timeout: std::time::Duration,
        initial_metadata: Vec<(http::HeaderName, http::HeaderValue)>,
    ) -> Self {
        GrpcAuthz {
            cluster,
            authority,
            timeout,
            initial_metadata,
            channels: Default::default(),
        }
    }

    /// One `Authorization/Check` call to an endpoint of the cluster; `None` on any failure (no
    /// cluster or endpoint, transport error, timeout, non-OK gRPC status).
    pub async fn check(&self, shared: &Shared, request: CheckRequest) -> Option<CheckResponse> {
        let cluster = shared.clusters.get(&self.cluster)?;
        let picked = cluster.pick(None, &[], 1, None)?;
        // One channel per endpoint and transport socket: plaintext, or the TLS the cluster's
        // `transport_socket` / `transport_socket_matches` chose for the endpoint (istiod's
        // ISTIO_MUTUAL to an in-mesh authorization service).
        let tls = picked.tls.clone();
        let key = (picked.addr, tls.as_ref().map(|(i, _)| *i));
        let channel = {
            let mut channels = self.channels.lock();
            match channels.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let timeout = cluster.config.connect_timeout;
                    let mut ep =
                        tonic::transport::Endpoint::from_shared(format!("http://{}", picked.addr))
                            .ok()?
                            .connect_timeout(timeout);
                    if let Ok(origin) = format!("http://{}", self.authority).parse::<http::Uri>() {
                        ep = ep.origin(origin);
                    }
                    let c = match tls {
                        None => ep.connect_lazy(),
                        Some((_, ctx)) => {
                            let secrets = shared.secrets.clone();
                            let addr = picked.addr;
                            ep.connect_with_connector_lazy(tower::service_fn(
                                move |_: http::Uri| {
                                    let (ctx, secrets) = (ctx.clone(), secrets.clone());
                                    async move {
                                        let s = crate::tls::tunnel::connect_tls(
                                            &ctx,
                                            &secrets,
                                            addr,
                                            None,
                                            timeout,
                                            Some(true),
                                        )
                                        .await?;
                                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                                    }
                                },
                            ))
                        }
                    };
                    channels.insert(key, c.clone());
                    c
                }
            }
        };
        let mut client = AuthorizationClient::new(channel);
        let mut req = tonic::Request::new(request);
        req.set_timeout(self.timeout);
        for (n, v) in &self.initial_metadata {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::AsciiMetadataKey::from_bytes(n.as_str().as_bytes()),
                tonic::metadata::AsciiMetadataValue::try_from(v.as_bytes()),
            ) {
                req.metadata_mut().append(k, v);
            }
        }
        match pingora_timeout::timeout(self.timeout, client.check(req)).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            Ok(Err(status)) => {
                tracing::debug!(cluster = %self.cluster, %status, "ext_authz: check failed");
                None
            }
            Err(_) => {
                tracing::debug!(cluster = %self.cluster, "ext_authz: check timed out");
                None
            }
        }
    }
}

/// Counters named up front and resolved together on first use (Envoy creates a filter's
/// counters with the filter, so `/stats` lists them at 0).
#[derive(Debug)]
pub struct LazyCounters {
    names: Vec<String>,
    resolved: OnceLock<Vec<Arc<Counter>>>,
}

impl LazyCounters {
    fn new(base: &str, names: &[&str]) -> Self {
        LazyCounters {
            names: names.iter().map(|n| format!("{base}{n}")).collect(),
            resolved: OnceLock::new(),
        }
    }

    /// Increments counter `i` (an index into the names given to `new`).
    pub fn inc(&self, stats: &Stats, i: usize) {
        let all = self
            .resolved
            .get_or_init(|| self.names.iter().map(|n| stats.counter(n)).collect());
        if let Some(c) = all.get(i) {
            c.inc();
        }
    }

    /// Resolves every counter without counting anything.
    pub fn touch(&self, stats: &Stats) {
        self.resolved
            .get_or_init(|| self.names.iter().map(|n| stats.counter(n)).collect());
    }
}

/// `prefix` followed by a `.` unless empty or already ending with one.
fn dotted(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('.') {
        prefix.to_owned()
    } else {
        format!("{prefix}.")
    }
}

/// The HTTP ext_authz filter's counters: `<hcm prefix>ext_authz.[<stat_prefix>.]<name>`, and the
/// four it also keeps on the route's cluster: `cluster.<name>.ext_authz.[<stat_prefix>.]<name>`.
#[derive(Debug)]
pub struct ExtAuthzStats {
    /// The filter's counters, in [`ExtAuthzStats::NAMES`] order.
    pub filter: LazyCounters,
    /// `[<stat_prefix>.]` for the cluster counters.
    pub prefix: String,
}

impl ExtAuthzStats {
    /// The counters Envoy 1.40 creates (checked against its `/stats`).
    pub const NAMES: [&'static str; 13] = [
        "ok",
        "denied",
        "error",
        "failure_mode_allowed",
        "disabled",
        "invalid",
        "ignored_dynamic_metadata",
        "filter_state_name_collision",
        "omitted_response_headers",
        "request_header_limits_reached",
        "response_header_limits_reached",
        "shadow_denied",
        "shadow_error",
    ];
    /// index of `ok`
    pub const OK: usize = 0;
    /// index of `denied`
    pub const DENIED: usize = 1;
    /// index of `error`
    pub const ERROR: usize = 2;
    /// index of `failure_mode_allowed`
    pub const FAILURE_MODE_ALLOWED: usize = 3;
    /// index of `disabled`
    pub const DISABLED: usize = 4;

    /// Counters of a filter in the connection manager whose stats start with `hcm_prefix`
    /// (`http.<stat_prefix>.`).
    pub fn new(hcm_prefix: &str, stat_prefix: &str) -> Self {
        let prefix = dotted(stat_prefix);
        ExtAuthzStats {
            filter: LazyCounters::new(&format!("{hcm_prefix}ext_authz.{prefix}"), &Self::NAMES),
            prefix,
        }
    }

    /// Counts outcome `i` (one of the first four) on the filter and, when known, on the route's
    /// cluster.
    pub fn count(&self, stats: &Stats, i: usize, cluster: Option<&str>) {
        self.filter.inc(stats, i);
        if let (Some(c), Some(name)) = (cluster, Self::NAMES.get(i)) {
            stats
                .counter(&format!("cluster.{c}.ext_authz.{}{name}", self.prefix))
                .inc();
        }
    }
}

/// The network ext_authz filter's counters: `ext_authz.<stat_prefix>.<name>`.
#[derive(Debug)]
pub struct NetworkExtAuthzStats(pub LazyCounters);

impl NetworkExtAuthzStats {
    /// index of `total`
    pub const TOTAL: usize = 0;
    /// index of `ok`
    pub const OK: usize = 1;
    /// index of `denied`
    pub const DENIED: usize = 2;
    /// index of `error`
    pub const ERROR: usize = 3;
    /// index of `failure_mode_allowed`
    pub const FAILURE_MODE_ALLOWED: usize = 4;
    /// index of `disabled`
    pub const DISABLED: usize = 5;
    /// index of `cx_closed`
    pub const CX_CLOSED: usize = 6;

    /// Counters under `ext_authz.<stat_prefix>.` (the `active` gauge is not kept).
    pub fn new(stat_prefix: &str) -> Self {
        NetworkExtAuthzStats(LazyCounters::new(
            &format!("ext_authz.{}", dotted(stat_prefix)),
            &[
                "total",
                "ok",
                "denied",
                "error",
                "failure_mode_allowed",
                "disabled",
                "cx_closed",
            ],
        ))
    }
}

/// `envoy.filters.network.ext_authz` as configured.
#[derive(Debug)]
pub struct NetworkExtAuthz {
    /// The service.
    pub grpc: GrpcAuthz,
    /// `failure_mode_allow`
    pub failure_mode_allow: bool,
    /// `include_peer_certificate`
    pub include_peer_certificate: bool,
    /// `filter_enabled_metadata` (read from the connection's dynamic metadata)
    pub enabled_metadata: Option<pingsail_filters::metadata::MetadataMatcher>,
    /// Its counters.
    pub stats: NetworkExtAuthzStats,
}

/// One network authorization filter of a chain, in chain order.
#[derive(Debug, Clone)]
pub enum NetworkAuthz {
    /// `envoy.filters.network.rbac`
    Rbac(Arc<NetworkRbac>),
    /// `envoy.filters.network.ext_authz`
    ExtAuthz(Arc<NetworkExtAuthz>),
}

/// `envoy.filters.http.ext_authz` as configured.
#[derive(Debug)]
pub struct HttpExtAuthz {
    /// The filter's name (per-route configs are keyed by it).
    pub name: ArcStr,
    /// `server_uri.cluster`
    pub cluster: String,
    /// `server_uri.timeout`
    pub timeout: std::time::Duration,
    /// `path_prefix`
    pub path_prefix: String,
    /// `authorization_request.allowed_headers` (`None`: every request header)
    pub allowed_headers: Option<Vec<pingsail_filters::matcher::StringMatcher>>,
    /// `authorization_request.headers_to_add`
    pub headers_to_add: Vec<(http::HeaderName, http::HeaderValue)>,
    /// `authorization_response.allowed_upstream_headers`
    pub upstream_headers: Vec<pingsail_filters::matcher::StringMatcher>,
    /// `authorization_response.allowed_upstream_headers_to_append`
    pub upstream_headers_append: Vec<pingsail_filters::matcher::StringMatcher>,
    /// `authorization_response.allowed_client_headers` (`None`: every response header)
    pub client_headers: Option<Vec<pingsail_filters::matcher::StringMatcher>>,
    /// `failure_mode_allow`
    pub failure_mode_allow: bool,
    /// `failure_mode_allow_header_add`
    pub failure_mode_allow_header_add: bool,
    /// `status_on_error` (default 403)
    pub status_on_error: u16,
    /// `filter_enabled_metadata`
    pub enabled_metadata: Option<pingsail_filters::metadata::MetadataMatcher>,
    /// `grpc_service`: the service is gRPC (the HTTP-service fields above are unused then)
    pub grpc: Option<GrpcAuthz>,
    /// `with_request_body` (gRPC service only)
    pub with_body: Option<ExtAuthzBody>,
    /// `metadata_context_namespaces`
    pub metadata_namespaces: Vec<String>,
    /// `include_peer_certificate`
    pub include_peer_certificate: bool,
    /// `clear_route_cache`: an allowed request whose headers the service changed is routed again
    pub clear_route_cache: bool,
    /// Its counters.
    pub stats: ExtAuthzStats,
}

/// What the gRPC ext_authz filters of a connection manager need from a TLS connection: (the
/// peer's certificate, our own identity).
pub fn grpc_ext_authz_needs(filters: &[HttpAuthz]) -> (bool, bool) {
    filters
        .iter()
        .fold((false, false), |(cert, local), f| match f {
            HttpAuthz::ExtAuthz(e) if e.grpc.is_some() => {
                (cert || e.include_peer_certificate, true)
            }
            _ => (cert, local),
        })
}

/// `envoy.filters.http.jwt_authn` as configured.
#[derive(Debug)]
pub struct HttpJwt {
    /// The filter's name (per-route configs are keyed by it).
    pub name: ArcStr,
    /// The compiled configuration.
    pub config: JwtConfig,
}

/// RBAC counters (`<prefix>rbac.<rules_prefix>allowed` …), resolved once.
#[derive(Debug)]
pub struct RbacCounters {
    /// allowed
    pub allowed: Arc<Counter>,
    /// denied
    pub denied: Arc<Counter>,
    /// shadow_allowed
    pub shadow_allowed: Arc<Counter>,
    /// shadow_denied
    pub shadow_denied: Arc<Counter>,
}

/// Counter names and their lazily resolved handles.
#[derive(Debug)]
pub struct RbacStats {
    names: [String; 4],
    resolved: OnceLock<RbacCounters>,
}

impl RbacStats {
    /// Counters named as Envoy 1.40 names them (checked against its `/stats`):
    /// `<prefix>.rbac.[<rules_prefix>.]allowed` and
    /// `<prefix>.rbac.[<shadow_prefix>.]shadow_allowed`.
    pub fn new(prefix: &str, rules_prefix: &str, shadow_prefix: &str) -> RbacStats {
        let join = |p: &str| {
            if p.is_empty() || p.ends_with('.') {
                p.to_owned()
            } else {
                format!("{p}.")
            }
        };
        let base = format!("{}rbac.", join(prefix));
        let (rules, shadow) = (join(rules_prefix), join(shadow_prefix));
        RbacStats {
            names: [
                format!("{base}{rules}allowed"),
                format!("{base}{rules}denied"),
                format!("{base}{shadow}shadow_allowed"),
                format!("{base}{shadow}shadow_denied"),
            ],
            resolved: OnceLock::new(),
        }
    }

    fn get(&self, stats: &Stats) -> &RbacCounters {
        self.resolved.get_or_init(|| RbacCounters {
            allowed: stats.counter(&self.names[0]),
            denied: stats.counter(&self.names[1]),
            shadow_allowed: stats.counter(&self.names[2]),
            shadow_denied: stats.counter(&self.names[3]),
        })
    }

    /// Counts a decision.
    pub fn count(&self, stats: &Stats, d: &Decision<'_>) {
        let c = self.get(stats);
        if let Some(v) = d.shadow {
            if v.allowed {
                c.shadow_allowed.inc();
            } else {
                c.shadow_denied.inc();
            }
        }
        if d.enforced.is_some() {
            if d.allowed {
                c.allowed.inc();
            } else {
                c.denied.inc();
            }
        }
    }
}

/// `envoy.filters.http.rbac` as configured.
#[derive(Debug)]
pub struct HttpRbac {
    /// The filter's name (per-route configs are keyed by it).
    pub name: ArcStr,
    /// The compiled configuration.
    pub config: Arc<RbacConfig>,
    /// Its counters.
    pub stats: RbacStats,
}

/// `envoy.filters.network.rbac` as configured.
#[derive(Debug)]
pub struct NetworkRbac {
    /// The compiled configuration.
    pub config: RbacConfig,
    /// Its counters (`<stat_prefix>rbac.*`).
    pub stats: RbacStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_names_as_envoy() {
        let s = RbacStats::new("http.inbound_x.", "myrules_", "istio_dry_run_allow_");
        assert_eq!(s.names[0], "http.inbound_x.rbac.myrules_.allowed");
        assert_eq!(
            s.names[3],
            "http.inbound_x.rbac.istio_dry_run_allow_.shadow_denied"
        );
        let s = RbacStats::new("tcp.", "", "");
        assert_eq!(s.names[1], "tcp.rbac.denied");
        assert_eq!(s.names[2], "tcp.rbac.shadow_allowed");
        assert_eq!(RbacStats::new("tcp", "", "").names[0], "tcp.rbac.allowed");
    }
}

/// What the network filter sees of a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnView<'a> {
    /// downstream peer
    pub remote: SocketAddr,
    /// our address as addressed (original destination when captured)
    pub local: SocketAddr,
    /// TLS SNI, empty on plaintext
    pub sni: &'a str,
    /// verified peer identity, `None` on plaintext
    pub peer_principal: Option<&'a str>,
}

/// A `Peer` of a `CheckRequest`: the socket address and the identity.
pub fn check_peer(addr: SocketAddr, principal: &str, certificate: String) -> Peer {
    use core_pb::{address, socket_address};
    Peer {
        address: Some(core_pb::Address {
            address: Some(address::Address::SocketAddress(core_pb::SocketAddress {
                address: addr.ip().to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                    addr.port(),
                ))),
                ..Default::default()
            })),
        }),
        principal: principal.to_owned(),
        certificate,
        ..Default::default()
    }
}

/// A metadata struct as a `google.protobuf.Struct`.
pub fn to_pb_struct(s: &pingsail_filters::metadata::Struct) -> pbuf::Struct {
    use pbuf::value::Kind;
    use pingsail_filters::metadata::Value as V;
    fn value(v: &V) -> pbuf::Value {
        let kind = match v {
            V::Null => Kind::NullValue(0),
            V::Bool(b) => Kind::BoolValue(*b),
            V::Number(n) => Kind::NumberValue(*n),
            V::String(s) => Kind::StringValue(s.clone()),
            V::List(l) => Kind::ListValue(pbuf::ListValue {
                values: l.iter().map(value).collect(),
            }),
            V::Struct(s) => Kind::StructValue(to_pb_struct(s)),
        };
        pbuf::Value { kind: Some(kind) }
    }
    pbuf::Struct {
        fields: s.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
    }
}

/// A `google.protobuf.Struct` as a metadata struct.
pub fn from_pb_struct(s: &pbuf::Struct) -> pingsail_filters::metadata::Struct {
    use pbuf::value::Kind;
    use pingsail_filters::metadata::Value as V;
    fn value(v: &pbuf::Value) -> V {
        match &v.kind {
            None | Some(Kind::NullValue(_)) => V::Null,
            Some(Kind::BoolValue(b)) => V::Bool(*b),
            Some(Kind::NumberValue(n)) => V::Number(*n),
            Some(Kind::StringValue(s)) => V::String(s.clone()),
            Some(Kind::ListValue(l)) => V::List(l.values.iter().map(value).collect()),
            Some(Kind::StructValue(s)) => V::Struct(from_pb_struct(s)),
        }
    }
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value(v)))
        .collect()
}

/// Dynamic metadata namespace of the network RBAC filter.
const NETWORK_RBAC_NAMESPACE: &str = "envoy.filters.network.rbac";

/// Runs a chain's network authorization filters (RBAC, ext_authz) in order; `false` = close the
/// connection.
///
/// Envoy evaluates on the first bytes from the client; pingsail decides when the connection is
/// accepted, before any upstream connection is opened (docs/COMPATIBILITY.md).
pub async fn network_allows(filters: &[NetworkAuthz], shared: &Shared, c: ConnView<'_>) -> bool {
    if filters.is_empty() {
        return true;
    }
    let mut metadata = DynamicMetadata::default();
    let fs: [(&str, &str); 1];
    let filter_state: &[(&str, &str)] = match c.peer_principal {
        Some(p) => {
            fs = [(PEER_PRINCIPAL_KEY, p)];
            &fs
        }
        None => &[],
    };
    for f in filters {
        match f {
            NetworkAuthz::Rbac(f) => {
                let mut md = std::mem::take(&mut metadata);
                let allowed = {
                    let input = Input {
                        headers: &NoHeaders,
                        local: c.local,
                        direct_remote: c.remote,
                        remote: c.remote.ip(),
                        sni: c.sni,
                        peer_principal: c.peer_principal,
                        filter_state,
                        metadata: &md,
                    };
                    let d = f.config.decide(&input);
                    f.stats.count(&shared.stats, &d);
                    if !d.allowed {
                        tracing::debug!(remote = %c.remote,
                            policy = ?d.enforced.and_then(|v| v.policy),
                            "network RBAC denied the connection");
                    }
                    let record =
                        d.shadow.is_some() || d.enforced.is_some_and(|v| v.policy.is_some());
                    let mut out = DynamicMetadata::default();
                    if record {
                        f.config.record(&d, NETWORK_RBAC_NAMESPACE, &mut out);
                    }
                    (d.allowed, record.then_some(out))
                };
                if let (_, Some(out)) = &allowed {
                    merge(&mut md, out);
                }
                metadata = md;
                if !allowed.0 {
                    return false;
                }
            }
            NetworkAuthz::ExtAuthz(e) => {
                type N = NetworkExtAuthzStats;
                let count = |i| e.stats.0.inc(&shared.stats, i);
                e.stats.0.touch(&shared.stats);
                if let Some(m) = &e.enabled_metadata
                    && !m.matches(&metadata)
                {
                    count(N::DISABLED);
                    continue;
                }
                count(N::TOTAL);
                let request = CheckRequest {
                    attributes: Some(AttributeContext {
                        source: Some(check_peer(
                            c.remote,
                            c.peer_principal.unwrap_or(""),
                            String::new(),
                        )),
                        destination: Some(check_peer(c.local, "", String::new())),
                        ..Default::default()
                    }),
                };
                match e.grpc.check(shared, request).await {
                    Some(r) if r.status.as_ref().is_none_or(|s| s.code == 0) => count(N::OK),
                    Some(_) => {
                        tracing::debug!(remote = %c.remote, "network ext_authz denied the connection");
                        count(N::DENIED);
                        count(N::CX_CLOSED);
                        return false;
                    }
                    None if e.failure_mode_allow => {
                        count(N::ERROR);
                        count(N::FAILURE_MODE_ALLOWED);
                    }
                    None => {
                        count(N::ERROR);
                        count(N::CX_CLOSED);
                        return false;
                    }
                }
            }
        }
    }
    true
}

/// Copies every namespace key of `from` into `into`.
fn merge(into: &mut DynamicMetadata, from: &DynamicMetadata) {
    for ns in [NETWORK_RBAC_NAMESPACE] {
        if let Some(s) = from.filter(ns) {
            for (k, v) in s {
                into.set(ns, k, v.clone());
            }
        }
    }
}
