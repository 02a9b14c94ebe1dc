// SPDX-License-Identifier: Apache-2.0
//! `Cluster` → [`config::Cluster`].

// istiod still emits deprecated fields (append, exact_match, total_weight…): we translate them on purpose.
#![allow(deprecated)]

use super::common::*;
use crate::config::{self, Discovery, Endpoint, LbPolicy};
use envoy_types::pb::envoy::config::cluster::v3 as c;
use envoy_types::pb::envoy::config::endpoint::v3 as e;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as up;
use std::sync::Arc;
use std::time::Duration;

const RESILIENCE: &str = "resilience issue";
const MTLS: &str = "mTLS issue";

/// Translates a cluster.
pub fn translate_cluster(cl: &c::Cluster, path: &Path) -> Result<config::Cluster> {
    translate_cluster_with(cl, path, false)
}

/// Translates a cluster that only carries a gRPC control-plane stream (the bootstrap's `xds-grpc` and
/// `sds-grpc`): pipe (Unix socket) endpoints are allowed, and the connection-management fields
/// pilot-agent puts on them (circuit breakers at 100 000, TCP keepalive, one request per connection)
/// are accepted because they do not change one long-lived gRPC stream.
pub fn translate_control_plane_cluster(cl: &c::Cluster, path: &Path) -> Result<config::Cluster> {
    translate_cluster_with(cl, path, true)
}

const CONTROL_PLANE_ONLY: &[&str] = &[
    "circuit_breakers",
    "upstream_connection_options",
    "max_requests_per_connection",
];

fn translate_cluster_with(
    cl: &c::Cluster,
    path: &Path,
    control_plane: bool,
) -> Result<config::Cluster> {
    let mut allowed = vec![
        "name",
        "type",
        "connect_timeout",
        "lb_policy",
        "load_assignment",
        "typed_extension_protocol_options",
        "dns_refresh_rate",
        "dns_lookup_family",
        "respect_dns_ttl",
        "original_dst_lb_config",
        "alt_stat_name",
        "metadata",
        "http2_protocol_options",
        "common_lb_config",
        "ignore_health_on_host_removal",
        "filters",
        "ring_hash_lb_config",
        "maglev_lb_config",
        "eds_cluster_config",
        "upstream_bind_config",
        "transport_socket",
        "transport_socket_matches",
        "circuit_breakers",
        "outlier_detection",
        "max_requests_per_connection",
        "upstream_connection_options",
        // ORIGINAL_DST host expiry: we keep no per-destination hosts, so there is nothing to clean.
        "cleanup_interval",
    ];
    if control_plane {
        allowed.extend_from_slice(CONTROL_PLANE_ONLY);
    }
    only(
        cl,
        path,
        &allowed,
        &[
            ("health_checks", "active health checking"),
            ("per_connection_buffer_limit_bytes", RESILIENCE),
            ("least_request_lb_config", RESILIENCE),
        ],
    )?;
    if cl.name.is_empty() {
        return err(&path.field("name"), ErrorKind::Required);
    }
    use c::cluster::ClusterDiscoveryType as T;
    use c::cluster::DiscoveryType as D;
    let discovery = match &cl.cluster_discovery_type {
        None => Discovery::Static,
        Some(T::Type(t)) => match D::try_from(*t) {
            Ok(D::Static) => Discovery::Static,
            Ok(D::StrictDns) => Discovery::StrictDns,
            Ok(D::LogicalDns) => Discovery::LogicalDns,
            Ok(D::OriginalDst) => Discovery::OriginalDst,
            Ok(D::Eds) => {
                // Endpoints arrive over EDS (xDS issue); a cluster without `eds_cluster_config`
                // and with an inline load_assignment is served from it.
                Discovery::Static
            }
            Err(_) => return invalid(&path.field("type"), "unknown discovery type"),
        },
        Some(T::ClusterType(ct)) => {
            return err(
                &path.field("cluster_type"),
                ErrorKind::UnknownType(ct.name.clone()),
            );
        }
    };
    use c::cluster::LbPolicy as L;
    let lb = match L::try_from(cl.lb_policy) {
        Ok(L::RoundRobin) => LbPolicy::RoundRobin,
        Ok(L::LeastRequest) => LbPolicy::LeastRequest,
        Ok(L::Random) => LbPolicy::Random,
        Ok(L::RingHash) => LbPolicy::RingHash,
        Ok(L::Maglev) => LbPolicy::Maglev,
        Ok(L::ClusterProvided) if discovery == Discovery::OriginalDst => LbPolicy::RoundRobin,
        _ => return invalid(&path.field("lb_policy"), "unsupported lb_policy"),
    };
    let mut use_hostname_for_hashing = false;
    let mut panic_threshold = 50.0;
    if let Some(cfg) = &cl.common_lb_config {
        let p = path.field("common_lb_config");
        only(
            cfg,
            &p,
            &["consistent_hashing_lb_config", "healthy_panic_threshold"],
            &[("locality_weighted_lb_config", RESILIENCE)],
        )?;
        if let Some(t) = &cfg.healthy_panic_threshold {
            if !(0.0..=100.0).contains(&t.value) {
                return invalid(
                    &p.field("healthy_panic_threshold").field("value"),
                    format!("value must be inside range [0, 100], got {}", t.value),
                );
            }
            panic_threshold = t.value;
        }
        if let Some(ch) = &cfg.consistent_hashing_lb_config {
            only(
                ch,
                &p.field("consistent_hashing_lb_config"),
                &["use_hostname_for_hashing"],
                &[("hash_balance_factor", "bounded-load hashing")],
            )?;
            use_hostname_for_hashing = ch.use_hostname_for_hashing;
        }
    }
    let is_static_type = matches!(&cl.cluster_discovery_type, None | Some(T::Type(0)));
    if use_hostname_for_hashing && is_static_type {
        return invalid(
            &path
                .field("common_lb_config")
                .field("consistent_hashing_lb_config")
                .field("use_hostname_for_hashing"),
            "Cannot use hostname for consistent hashing loadbalancing for cluster of type: 'envoy.cluster.static'",
        );
    }
    let hash_lb = match lb {
        LbPolicy::RingHash => {
            let (mut min, mut max) = (1024u64, 8 * 1024 * 1024u64);
            if let Some(c::cluster::LbConfig::RingHashLbConfig(r)) = &cl.lb_config {
                let p = path.field("ring_hash_lb_config");
                only(
                    r,
                    &p,
                    &["minimum_ring_size", "maximum_ring_size", "hash_function"],
                    &[],
                )?;
                if r.hash_function != c::cluster::ring_hash_lb_config::HashFunction::XxHash as i32 {
                    return err(&p.field("hash_function"), ErrorKind::NotSupported);
                }
                if let Some(v) = &r.minimum_ring_size {
                    min = v.value;
                }
                if let Some(v) = &r.maximum_ring_size {
                    max = v.value;
                }
                if min == 0 || min > max || max > 8 * 1024 * 1024 {
                    return invalid(
                        &p,
                        format!("ring hash: minimum_ring_size ({min}) > maximum_ring_size ({max})"),
                    );
                }
            }
            Some(crate::cluster::lb::HashLb::Ring { min, max })
        }
        LbPolicy::Maglev => {
            let mut size = 65537u64;
            if let Some(c::cluster::LbConfig::MaglevLbConfig(m)) = &cl.lb_config {
                let p = path.field("maglev_lb_config");
                only(m, &p, &["table_size"], &[])?;
                if let Some(v) = &m.table_size {
                    size = v.value;
                }
                if !(2..=5_000_011).contains(&size)
                    || !(2..)
                        .take_while(|d| d * d <= size)
                        .all(|d| !size.is_multiple_of(d))
                {
                    return invalid(
                        &p.field("table_size"),
                        "The table size of maglev must be prime number",
                    );
                }
            }
            Some(crate::cluster::lb::HashLb::Maglev { size })
        }
        _ => None,
    };
    let connect_timeout = match &cl.connect_timeout {
        Some(d) => duration(d, &path.field("connect_timeout"))?,
        None => Duration::from_secs(5),
    };
    let dns_refresh_rate = match &cl.dns_refresh_rate {
        Some(d) => duration(d, &path.field("dns_refresh_rate"))?,
        None => Duration::from_secs(5),
    };
    let mut original_dst_use_header = false;
    let mut original_dst_port = None;
    if let Some(c::cluster::LbConfig::OriginalDstLbConfig(o)) = &cl.lb_config {
        let p = path.field("original_dst_lb_config");
        only(
            o,
            &p,
            &["use_http_header", "upstream_port_override"],
            &[
                ("http_header_name", "capture issue"),
                ("metadata_key", "capture issue"),
            ],
        )?;
        original_dst_use_header = o.use_http_header;
        if let Some(port) = &o.upstream_port_override {
            original_dst_port = Some(
                u16::try_from(port.value)
                    .ok()
                    .filter(|p| *p != 0)
                    .map_or_else(
                        || invalid(&p.field("upstream_port_override"), "port out of range"),
                        Ok,
                    )?,
            );
        }
    }
    let mut internal_upstream = None;
    let tls = match &cl.transport_socket {
        Some(ts) => match super::tls::upstream(ts, &path.field("transport_socket"))? {
            super::tls::Socket::Plain => None,
            super::tls::Socket::Tls(t) => Some(t),
            super::tls::Socket::Internal(i) => {
                internal_upstream = Some(i);
                None
            }
        },
        None => None,
    };
    let mut tls_matches = Vec::new();
    for (i, m) in cl.transport_socket_matches.iter().enumerate() {
        let p = path.at("transport_socket_matches", i);
        only(m, &p, &["name", "match", "transport_socket"], &[])?;
        let criteria = match &m.r#match {
            Some(st) => struct_strings(st, &p.field("match"))?,
            None => Vec::new(),
        };
        let t = match &m.transport_socket {
            Some(ts) => match super::tls::upstream(ts, &p.field("transport_socket"))? {
                super::tls::Socket::Plain => None,
                super::tls::Socket::Tls(t) => Some(t),
                // Internal endpoints are never TLS here; the passthrough applies to them all.
                super::tls::Socket::Internal(i) => {
                    internal_upstream.get_or_insert(i);
                    None
                }
            },
            None => return err(&p.field("transport_socket"), ErrorKind::Required),
        };
        tls_matches.push((criteria, t));
    }
    let mut bind_source = None;
    if let Some(b) = &cl.upstream_bind_config {
        let p = path.field("upstream_bind_config");
        only(b, &p, &["source_address"], &[])?;
        if let Some(sa) = &b.source_address {
            let sp = p.field("source_address");
            only(sa, &sp, &["address", "port_value"], &[])?;
            use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier as PS;
            if matches!(sa.port_specifier, Some(PS::PortValue(v)) if v != 0) {
                return err(&sp.field("port_value"), ErrorKind::NotSupported);
            }
            bind_source = Some(sa.address.parse::<std::net::IpAddr>().or_else(|_| {
                invalid(
                    &sp.field("address"),
                    format!("malformed IP address: {}", sa.address),
                )
            })?);
        }
    }
    let mut eds_service = None;
    if let Some(eds) = &cl.eds_cluster_config {
        let p = path.field("eds_cluster_config");
        if !matches!(&cl.cluster_discovery_type, Some(T::Type(t)) if *t == D::Eds as i32) {
            return invalid(
                &p,
                "eds_cluster_config is only valid for clusters of type EDS",
            );
        }
        only(eds, &p, &["eds_config", "service_name"], &[])?;
        match &eds.eds_config {
            Some(cs) => drop(config_source(cs, &p.field("eds_config"))?),
            None => return err(&p.field("eds_config"), ErrorKind::Required),
        }
        eds_service = Some(if eds.service_name.is_empty() {
            cl.name.as_str().into()
        } else {
            eds.service_name.as_str().into()
        });
    }
    let (endpoints, pipes) = match &cl.load_assignment {
        Some(la) => load_assignment(
            la,
            &path.field("load_assignment"),
            &discovery,
            control_plane,
        )?,
        None => (Vec::new(), Vec::new()),
    };
    if discovery == Discovery::LogicalDns && endpoints.len() > 1 {
        return invalid(
            &path.field("load_assignment"),
            "LOGICAL_DNS clusters must have a single host",
        );
    }
    for (i, f) in cl.filters.iter().enumerate() {
        let p = path.at("filters", i);
        only(f, &p, &["name", "typed_config"], &[])?;
        let url = f
            .typed_config
            .as_ref()
            .map(|a| type_name(&a.type_url).to_string())
            .unwrap_or_default();
        // istiod puts the TCP metadata exchange on outbound clusters: accepted, not yet enforced
        // (telemetry issue), as docs/COMPATIBILITY.md lists.
        if url != "envoy.tcp.metadataexchange.config.MetadataExchange" {
            return err(&p.field("typed_config"), ErrorKind::UnknownType(url));
        }
    }
    let (http2, use_downstream_protocol, mut conn) = protocol_options(cl, path)?;
    if let Some(v) = &cl.max_requests_per_connection {
        conn.max_requests_per_connection = (v.value > 0).then_some(v.value);
    }
    if let Some(o) = &cl.upstream_connection_options {
        // TCP keepalive probes on upstream sockets: accepted (the kernel's defaults apply).
        let p = path.field("upstream_connection_options");
        only(
            o,
            &p,
            &["tcp_keepalive"],
            &[(
                "set_local_interface_name_on_upstream_connections",
                RESILIENCE,
            )],
        )?;
    }
    let breakers = match &cl.circuit_breakers {
        Some(cb) if !control_plane => circuit_breakers(cb, &path.field("circuit_breakers"))?,
        _ => config::Thresholds::default(),
    };
    let outlier = match &cl.outlier_detection {
        Some(od) => Some(std::sync::Arc::new(outlier_detection(
            od,
            &path.field("outlier_detection"),
        )?)),
        None => None,
    };
    Ok(config::Cluster {
        name: cl.name.as_str().into(),
        discovery,
        endpoints: endpoints.into(),
        lb,
        hash_lb,
        use_hostname_for_hashing,
        connect_timeout,
        http2,
        use_downstream_protocol,
        dns_refresh_rate,
        original_dst_use_header,
        original_dst_port,
        internal_upstream,
        metadata: match &cl.metadata {
            Some(m) => metadata_json(m),
            None => Default::default(),
        },
        eds_service,
        pipes,
        bind_source,
        tls,
        tls_matches,
        breakers,
        outlier,
        panic_threshold,
        conn,
    })
}

fn circuit_breakers(cb: &c::CircuitBreakers, path: &Path) -> Result<config::Thresholds> {
    only(
        cb,
        path,
        &["thresholds"],
        &[("per_host_thresholds", RESILIENCE)],
    )?;
    let mut out = config::Thresholds::default();
    for (i, t) in cb.thresholds.iter().enumerate() {
        let p = path.at("thresholds", i);
        only(
            t,
            &p,
            &[
                "priority",
                "max_connections",
                "max_pending_requests",
                "max_requests",
                "max_retries",
                "track_remaining",
                "max_connection_pools",
                "retry_budget",
            ],
            &[],
        )?;
        // Routes use the DEFAULT priority (pingsail does not honour a route `priority`).
        use envoy_types::pb::envoy::config::core::v3::RoutingPriority as RP;
        if RP::try_from(t.priority) != Ok(RP::Default) {
            continue;
        }
        let v = |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u64| {
            x.as_ref().map_or(d, |v| u64::from(v.value))
        };
        out = config::Thresholds {
            max_connections: v(&t.max_connections, 1024),
            max_pending_requests: v(&t.max_pending_requests, 1024),
            max_requests: v(&t.max_requests, 1024),
            max_retries: v(&t.max_retries, 3),
            track_remaining: t.track_remaining,
            retry_budget: match &t.retry_budget {
                Some(b) => {
                    let bp = p.field("retry_budget");
                    only(b, &bp, &["budget_percent", "min_retry_concurrency"], &[])?;
                    let pct = b.budget_percent.as_ref().map_or(20.0, |v| v.value);
                    if !(0.0..=100.0).contains(&pct) {
                        return invalid(
                            &bp.field("budget_percent"),
                            format!("value must be inside range [0, 100], got {pct}"),
                        );
                    }
                    Some((pct, v(&b.min_retry_concurrency, 3)))
                }
                None => None,
            },
        };
    }
    Ok(out)
}

fn outlier_detection(od: &c::OutlierDetection, path: &Path) -> Result<config::OutlierDetection> {
    only(
        od,
        path,
        &[
            "consecutive_5xx",
            "interval",
            "base_ejection_time",
            "max_ejection_percent",
            "enforcing_consecutive_5xx",
            "enforcing_success_rate",
            "success_rate_minimum_hosts",
            "success_rate_request_volume",
            "success_rate_stdev_factor",
            "consecutive_gateway_failure",
            "enforcing_consecutive_gateway_failure",
            "split_external_local_origin_errors",
            "consecutive_local_origin_failure",
            "enforcing_consecutive_local_origin_failure",
            "enforcing_local_origin_success_rate",
            "failure_percentage_threshold",
            "enforcing_failure_percentage",
            "enforcing_failure_percentage_local_origin",
            "failure_percentage_minimum_hosts",
            "failure_percentage_request_volume",
            "max_ejection_time",
            "always_eject_one_host",
            "max_ejection_time_jitter",
        ],
        &[
            (
                "successful_active_health_check_uneject_host",
                "active health checking",
            ),
            ("monitors", RESILIENCE),
            ("detect_degraded_hosts", RESILIENCE),
        ],
    )?;
    let u = |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| {
        x.as_ref().map_or(d, |v| v.value)
    };
    let pct = |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>,
               d: u32,
               f: &str|
     -> Result<u32> {
        let v = u(x, d);
        if v > 100 {
            return invalid(
                &path.field(f),
                format!("value must be less than or equal to 100, got {v}"),
            );
        }
        Ok(v)
    };
    let dur = |x: &Option<envoy_types::pb::google::protobuf::Duration>,
               d: Duration,
               f: &str|
     -> Result<Duration> {
        match x {
            Some(v) => {
                let v = duration(v, &path.field(f))?;
                if v.is_zero() {
                    return invalid(&path.field(f), "value must be greater than 0s");
                }
                Ok(v)
            }
            None => Ok(d),
        }
    };
    let base = dur(
        &od.base_ejection_time,
        Duration::from_secs(30),
        "base_ejection_time",
    )?;
    let max = dur(
        &od.max_ejection_time,
        Duration::from_secs(300),
        "max_ejection_time",
    )?;
    // Envoy: base_ejection_time must not exceed max_ejection_time (the default max grows to base).
    let max = if od.max_ejection_time.is_none() {
        max.max(base)
    } else {
        max
    };
    if base > max {
        return invalid(
            &path.field("base_ejection_time"),
            "base_ejection_time must be less than or equal to max_ejection_time",
        );
    }
    Ok(config::OutlierDetection {
        consecutive_5xx: u(&od.consecutive_5xx, 5),
        consecutive_gateway_failure: u(&od.consecutive_gateway_failure, 5),
        consecutive_local_origin_failure: u(&od.consecutive_local_origin_failure, 5),
        interval: dur(&od.interval, Duration::from_secs(10), "interval")?,
        base_ejection_time: base,
        max_ejection_time: max,
        max_ejection_time_jitter: match &od.max_ejection_time_jitter {
            Some(j) => duration(j, &path.field("max_ejection_time_jitter"))?,
            None => Duration::ZERO,
        },
        max_ejection_percent: pct(&od.max_ejection_percent, 10, "max_ejection_percent")?,
        enforcing_consecutive_5xx: pct(
            &od.enforcing_consecutive_5xx,
            100,
            "enforcing_consecutive_5xx",
        )?,
        enforcing_consecutive_gateway_failure: pct(
            &od.enforcing_consecutive_gateway_failure,
            0,
            "enforcing_consecutive_gateway_failure",
        )?,
        enforcing_consecutive_local_origin_failure: pct(
            &od.enforcing_consecutive_local_origin_failure,
            100,
            "enforcing_consecutive_local_origin_failure",
        )?,
        split_external_local_origin_errors: od.split_external_local_origin_errors,
        enforcing_success_rate: pct(&od.enforcing_success_rate, 100, "enforcing_success_rate")?,
        success_rate_minimum_hosts: u(&od.success_rate_minimum_hosts, 5),
        success_rate_request_volume: u(&od.success_rate_request_volume, 100),
        success_rate_stdev_factor: u(&od.success_rate_stdev_factor, 1900),
        enforcing_local_origin_success_rate: pct(
            &od.enforcing_local_origin_success_rate,
            100,
            "enforcing_local_origin_success_rate",
        )?,
        failure_percentage_threshold: pct(
            &od.failure_percentage_threshold,
            85,
            "failure_percentage_threshold",
        )?,
        enforcing_failure_percentage: pct(
            &od.enforcing_failure_percentage,
            0,
            "enforcing_failure_percentage",
        )?,
        enforcing_failure_percentage_local_origin: pct(
            &od.enforcing_failure_percentage_local_origin,
            0,
            "enforcing_failure_percentage_local_origin",
        )?,
        failure_percentage_minimum_hosts: u(&od.failure_percentage_minimum_hosts, 5),
        failure_percentage_request_volume: u(&od.failure_percentage_request_volume, 50),
        always_eject_one_host: od.always_eject_one_host.is_some_and(|b| b.value),
    })
}

/// Translates an EDS `ClusterLoadAssignment` into the endpoints of the clusters that name it.
pub fn translate_load_assignment(
    la: &e::ClusterLoadAssignment,
    path: &Path,
) -> Result<Vec<Endpoint>> {
    if la.cluster_name.is_empty() {
        return err(&path.field("cluster_name"), ErrorKind::Required);
    }
    Ok(load_assignment(la, path, &Discovery::Static, false)?.0)
}

fn protocol_options(cl: &c::Cluster, path: &Path) -> Result<(bool, bool, config::ConnOptions)> {
    let mut http2 = cl.http2_protocol_options.is_some();
    let mut downstream = false;
    let mut conn = config::ConnOptions {
        idle_timeout: Some(Duration::from_secs(3600)),
        ..Default::default()
    };
    if let Some(h2) = &cl.http2_protocol_options {
        conn.max_concurrent_streams = h2.max_concurrent_streams.map(|v| v.value);
    }
    for (name, any) in &cl.typed_extension_protocol_options {
        let p = path.field("typed_extension_protocol_options").field(name);
        let o: up::HttpProtocolOptions = unpack(any, &p)?;
        only(
            &o,
            &p,
            &[
                "explicit_http_config",
                "use_downstream_protocol_config",
                "common_http_protocol_options",
            ],
            &[
                ("upstream_http_protocol_options", RESILIENCE),
                ("auto_config", MTLS),
            ],
        )?;
        if let Some(common) = &o.common_http_protocol_options {
            let cp = p.field("common_http_protocol_options");
            only(
                common,
                &cp,
                &[
                    "idle_timeout",
                    "max_requests_per_connection",
                    "max_connection_duration",
                ],
                &[
                    ("max_headers_count", RESILIENCE),
                    ("max_stream_duration", RESILIENCE),
                    ("headers_with_underscores_action", RESILIENCE),
                ],
            )?;
            if let Some(d) = &common.idle_timeout {
                let d = duration(d, &cp.field("idle_timeout"))?;
                conn.idle_timeout = (!d.is_zero()).then_some(d);
            }
            if let Some(v) = &common.max_requests_per_connection {
                conn.max_requests_per_connection = (v.value > 0).then_some(v.value);
            }
            if let Some(d) = &common.max_connection_duration {
                let d = duration(d, &cp.field("max_connection_duration"))?;
                conn.max_connection_duration = (!d.is_zero()).then_some(d);
            }
        }
        use up::http_protocol_options::UpstreamProtocolOptions as U;
        match &o.upstream_protocol_options {
            Some(U::ExplicitHttpConfig(ex)) => {
                use up::http_protocol_options::explicit_http_config::ProtocolConfig as P;
                http2 = matches!(ex.protocol_config, Some(P::Http2ProtocolOptions(_)));
                if let Some(P::Http2ProtocolOptions(h2)) = &ex.protocol_config {
                    conn.max_concurrent_streams = h2.max_concurrent_streams.map(|v| v.value);
                }
                if matches!(ex.protocol_config, Some(P::Http3ProtocolOptions(_))) {
                    return err(
                        &p.field("explicit_http_config")
                            .field("http3_protocol_options"),
                        ErrorKind::NotSupported,
                    );
                }
            }
            Some(U::UseDownstreamProtocolConfig(_)) => downstream = true,
            Some(U::AutoConfig(_)) => {
                return err(&p.field("auto_config"), ErrorKind::NotYet(MTLS));
            }
            None => {}
        }
    }
    Ok((http2, downstream, conn))
}

fn load_assignment(
    la: &e::ClusterLoadAssignment,
    path: &Path,
    discovery: &Discovery,
    allow_pipes: bool,
) -> Result<(Vec<Endpoint>, Vec<arcstr::ArcStr>)> {
    let mut pipes = Vec::new();
    only(
        la,
        path,
        &["cluster_name", "endpoints", "policy"],
        &[("named_endpoints", "xDS issue")],
    )?;
    if let Some(policy) = &la.policy {
        let p = path.field("policy");
        only(
            policy,
            &p,
            &["overprovisioning_factor"],
            &[
                ("drop_overloads", RESILIENCE),
                ("endpoint_stale_after", "xDS issue"),
                ("weighted_priority_health", RESILIENCE),
            ],
        )?;
        // 140 is Envoy's default and what istiod sends; with one priority and no localities it has no
        // effect on selection among healthy hosts. Other values change failover: resilience work.
        if policy
            .overprovisioning_factor
            .as_ref()
            .is_some_and(|v| v.value != 140)
        {
            return err(
                &p.field("overprovisioning_factor"),
                ErrorKind::NotYet(RESILIENCE),
            );
        }
    }
    let mut out = Vec::new();
    for (i, le) in la.endpoints.iter().enumerate() {
        let p = path.at("endpoints", i);
        only(
            le,
            &p,
            &[
                "lb_endpoints",
                "locality",
                "load_balancing_weight",
                "priority",
            ],
            &[("metadata", RESILIENCE)],
        )?;
        if le.priority != 0 {
            return err(&p.field("priority"), ErrorKind::NotYet(RESILIENCE));
        }
        for (j, lbe) in le.lb_endpoints.iter().enumerate() {
            let q = p.at("lb_endpoints", j);
            only(
                lbe,
                &q,
                &[
                    "endpoint",
                    "load_balancing_weight",
                    "health_status",
                    "metadata",
                ],
                &[],
            )?;
            use e::lb_endpoint::HostIdentifier as H;
            let ep = match &lbe.host_identifier {
                Some(H::Endpoint(ep)) => ep,
                Some(H::EndpointName(_)) => {
                    return err(&q.field("endpoint_name"), ErrorKind::NotSupported);
                }
                None => return err(&q.field("endpoint"), ErrorKind::Required),
            };
            let ep_path = q.field("endpoint");
            only(
                ep,
                &ep_path,
                &["address", "hostname", "health_check_config"],
                &[],
            )?;
            if let Some(hc) = &ep.health_check_config {
                // istiod sends an empty message; any content configures active health checks.
                only(
                    hc,
                    &ep_path.field("health_check_config"),
                    &[],
                    &[
                        ("port_value", RESILIENCE),
                        ("hostname", RESILIENCE),
                        ("address", RESILIENCE),
                        ("disable_active_health_check", RESILIENCE),
                    ],
                )?;
            }
            let Some(addr) = &ep.address else {
                return err(&ep_path.field("address"), ErrorKind::Required);
            };
            use envoy_types::pb::envoy::config::core::v3::address::Address as A;
            if let Some(A::Pipe(pipe)) = &addr.address {
                if !allow_pipes {
                    return err(
                        &ep_path.field("address").field("pipe"),
                        ErrorKind::NotYet("pipe endpoints on data-plane clusters"),
                    );
                }
                pipes.push(pipe.path.as_str().into());
                continue;
            }
            // Envoy: unhealthy / draining / timeout hosts are not used for load balancing.
            use envoy_types::pb::envoy::config::core::v3::HealthStatus as HS;
            let healthy = matches!(
                HS::try_from(lbe.health_status),
                Ok(HS::Unknown | HS::Healthy | HS::Degraded)
            );
            let weight = lbe.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if weight == 0 {
                return invalid(&q.field("load_balancing_weight"), "must be at least 1");
            }
            let socket_match = match lbe
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"))
            {
                Some(st) => struct_strings(st, &q.field("metadata"))?,
                None => Vec::new(),
            };
            if let Some(A::EnvoyInternalAddress(ia)) = &addr.address {
                let ip = ep_path.field("address").field("envoy_internal_address");
                only(ia, &ip, &["server_listener_name", "endpoint_id"], &[])?;
                use envoy_types::pb::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier as N;
                let Some(N::ServerListenerName(listener)) = &ia.address_name_specifier else {
                    return err(&ip.field("server_listener_name"), ErrorKind::Required);
                };
                if !matches!(discovery, Discovery::Static) {
                    return invalid(&ip, "internal addresses need a STATIC or EDS cluster");
                }
                if healthy {
                    out.push(Endpoint {
                        host: format!("envoy://{listener}/{}", ia.endpoint_id).into(),
                        port: 0,
                        // The internal listener is the destination: no socket address (see
                        // proxy/src/internal.rs); 0.0.0.0:0 keeps the balancers' bookkeeping
                        // uniform.
                        addr: Some(std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
                        weight,
                        hostname: (!ep.hostname.is_empty()).then(|| ep.hostname.as_str().into()),
                        socket_match,
                        internal: Some(Arc::new(crate::config::InternalEndpoint {
                            listener: listener.as_str().into(),
                            endpoint_id: ia.endpoint_id.as_str().into(),
                            metadata: lbe.metadata.as_ref().map(metadata_json).unwrap_or_default(),
                        })),
                    });
                }
                continue;
            }
            let (host, port, sock) = match discovery {
                Discovery::StrictDns | Discovery::LogicalDns => {
                    let (h, p) = host_port(addr, &ep_path.field("address"))?;
                    (h, p, None)
                }
                _ => {
                    let s = socket_addr(addr, &ep_path.field("address"))?;
                    (s.ip().to_string(), s.port(), Some(s))
                }
            };
            if !healthy {
                continue;
            }
            // Envoy's DNS hosts carry their DNS name as hostname (used by auto_host_rewrite).
            let hostname: Option<arcstr::ArcStr> = if !ep.hostname.is_empty() {
                Some(ep.hostname.as_str().into())
            } else if matches!(discovery, Discovery::StrictDns | Discovery::LogicalDns) {
                Some(host.as_str().into())
            } else {
                None
            };
            out.push(Endpoint {
                host: host.into(),
                port,
                addr: sock,
                weight,
                hostname,
                socket_match,
                internal: None,
            });
        }
    }
    Ok((out, pipes))
}

/// `metadata.filter_metadata` as JSON by namespace.
fn metadata_json(
    m: &envoy_types::pb::envoy::config::core::v3::Metadata,
) -> crate::internal::Metadata {
    Arc::new(
        m.filter_metadata
            .iter()
            .map(|(k, v)| (k.clone(), super::listener::struct_to_json(v)))
            .collect(),
    )
}

/// The string fields of a `Struct` (transport socket match criteria / endpoint metadata).
fn struct_strings(
    st: &envoy_types::pb::google::protobuf::Struct,
    path: &Path,
) -> Result<Vec<(arcstr::ArcStr, arcstr::ArcStr)>> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let mut out = Vec::new();
    for (k, v) in &st.fields {
        match &v.kind {
            Some(Kind::StringValue(s)) => out.push((k.as_str().into(), s.as_str().into())),
            _ => {
                return invalid(
                    &path.field(k),
                    "only string values are supported in transport socket matching",
                );
            }
        }
    }
    Ok(out)
}
