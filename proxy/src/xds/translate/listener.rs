// SPDX-License-Identifier: Apache-2.0
//! `Listener` → [`config::Listener`], including the HTTP connection manager and tcp_proxy.

// istiod still emits deprecated fields (append, exact_match, total_weight…): we translate them on purpose.
#![allow(deprecated)]

use super::common::*;
use super::route::translate_route_config;
use crate::access_log::translate_access_logs;
use crate::config::{
    self, ChainKind, ChainMatch, Cidr, Codec, EscapedSlashes, FilterChain, HttpConnectionManager,
    Predicate, SourceType, TcpProxy,
};
use crate::xds::json::dynamic_from_json;
use envoy_types::pb::envoy::config::listener::v3 as l;
use envoy_types::pb::envoy::extensions::filters::http::{
    cors::v3 as cors, fault::v3 as fault, grpc_stats::v3 as grpc_stats, router::v3 as router,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::google::protobuf::Any;
use std::sync::Arc;
use std::time::Duration;

const CAPTURE: &str = "capture issue";
const MTLS: &str = "mTLS issue";
const RESILIENCE: &str = "resilience issue";
const TELEMETRY: &str = "telemetry issue";

/// Istio extensions recognised by type URL, accepted in istiod's shapes and not enforced yet (listed in
/// docs/COMPATIBILITY.md).
const ACCEPTED_NOT_ENFORCED: &[&str] = &[
    "stats.PluginConfig",
    "envoy.tcp.metadataexchange.config.MetadataExchange",
    "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
    "io.istio.http.peer_metadata.Config",
    // istio_authn: exposes the mTLS peer identity as filter state `io.istio.peer_principal`; the
    // RBAC input always carries it (None on plaintext).
    "io.istio.network.authn.Config",
    CONNECT_BAGGAGE,
    // Schema-less like the others; the HTTP filter is matched by name below and enforced.
    CONNECT_AUTHORITY,
];

/// Istio extensions without a schema here whose behaviour belongs to a later issue.
const LATER_TYPES: &[(&str, &str)] = &[];

/// Istio's HTTP filters of the HBONE CONNECT terminator (`connect_terminate`), schema-less.
const CONNECT_AUTHORITY: &str = "io.istio.http.connect_authority.Config";
/// `connect_baggage` decodes the CONNECT's `baggage` header into peer metadata for telemetry:
/// accepted, not enforced (telemetry).
const CONNECT_BAGGAGE: &str = "io.istio.http.connect_baggage.Config";
/// Istio's `set_dst_address` listener filter.
const SET_DST_ADDRESS: &str = "istio.set_internal_dst_address.v1.Config";

/// The inner type and JSON value of a `TypedStruct` (for Istio configs without a schema here).
pub(super) fn typed_struct_json(any: &Any) -> Option<(String, serde_json::Value)> {
    let url = type_name(&any.type_url);
    if url != "udpa.type.v1.TypedStruct" && url != "xds.type.v3.TypedStruct" {
        return None;
    }
    let ts: TypedStruct = prost::Message::decode(any.value.as_slice()).ok()?;
    let value = match &ts.value {
        Some(s) => struct_to_json(s),
        None => serde_json::Value::Object(Default::default()),
    };
    Some((type_name(&ts.type_url).to_string(), value))
}

/// Translates a listener.
pub fn translate_listener(li: &l::Listener, path: &Path) -> Result<config::Listener> {
    only(
        li,
        path,
        &[
            "name",
            "address",
            "filter_chains",
            "default_filter_chain",
            "listener_filters",
            "listener_filters_timeout",
            "continue_on_listener_filters_timeout",
            "bind_to_port",
            "traffic_direction",
            "stat_prefix",
            "metadata",
            "access_log",
            "use_original_dst",
            // pilot-agent's 15090/15021 listeners: no global connection limit or overload action is
            // enforced, so exempting a listener from them holds trivially.
            "ignore_global_conn_limit",
            "bypass_overload_manager",
            // TPROXY interception (IP_TRANSPARENT / IP_FREEBIND on the listening socket).
            "transparent",
            "freebind",
            "internal_listener",
        ],
        &[
            ("per_connection_buffer_limit_bytes", RESILIENCE),
            ("connection_balance_config", "performance"),
            ("filter_chain_matcher", "waypoint (gateway) issue"),
            ("socket_options", CAPTURE),
            ("drain_type", "xDS issue"),
        ],
    )?;
    if !li.access_log.is_empty() {
        return err(&path.field("access_log"), ErrorKind::NotYet(TELEMETRY));
    }
    let internal = li.listener_specifier.is_some();
    if let Some(l::listener::ListenerSpecifier::InternalListener(il)) = &li.listener_specifier {
        only(
            il,
            &path.field("internal_listener"),
            &[],
            &[("buffer_size_kb", "performance")],
        )?;
    }
    let address = match &li.address {
        Some(_) if internal => {
            return invalid(
                &path.field("address"),
                "an internal listener has no address",
            );
        }
        Some(addr) => socket_addr(addr, &path.field("address"))?,
        None if internal => std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        None => return err(&path.field("address"), ErrorKind::Required),
    };
    let mut set_dst_address = false;
    let mut http_inspector = None;
    let mut tls_inspector = None;
    let mut original_dst_filter = false;
    let mut original_src = None;
    for (i, f) in li.listener_filters.iter().enumerate() {
        let p = path.at("listener_filters", i);
        only(f, &p, &["name", "typed_config", "filter_disabled"], &[])?;
        // A filter that never runs is `Any`-disabled; one without `filter_disabled` always runs.
        let disabled = match &f.filter_disabled {
            Some(d) => Some(predicate(d, &p.field("filter_disabled"))?),
            None => None,
        };
        let url = match &f.config_type {
            Some(l::listener_filter::ConfigType::TypedConfig(a)) => typed_struct_inner_type(a),
            _ => return err(&p.field("typed_config"), ErrorKind::Required),
        };
        match url.as_str() {
            "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector" => {
                http_inspector = Some(disabled.unwrap_or(Predicate::Not(Box::new(Predicate::Any))));
            }
            "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" => {
                tls_inspector = Some(disabled.unwrap_or(Predicate::Not(Box::new(Predicate::Any))));
            }
            "envoy.extensions.filters.listener.original_dst.v3.OriginalDst" => {
                original_dst_filter = true;
            }
            SET_DST_ADDRESS if internal => {
                if disabled.is_some() {
                    return err(&p.field("filter_disabled"), ErrorKind::NotSupported);
                }
                set_dst_address = true;
            }
            SET_DST_ADDRESS => {
                return invalid(
                    &p.field("typed_config"),
                    "set_dst_address only runs on internal listeners",
                );
            }
            "envoy.extensions.filters.listener.original_src.v3.OriginalSrc" => {
                use envoy_types::pb::envoy::extensions::filters::listener::original_src::v3 as osrc;
                let Some(l::listener_filter::ConfigType::TypedConfig(a)) = &f.config_type else {
                    return err(&p.field("typed_config"), ErrorKind::Required);
                };
                let tp = p.field("typed_config");
                let o: osrc::OriginalSrc = unpack(a, &tp)?;
                only(&o, &tp, &["bind_port", "mark"], &[])?;
                if disabled.is_some() {
                    return err(&p.field("filter_disabled"), ErrorKind::NotSupported);
                }
                original_src = Some(config::OriginalSrc {
                    bind_port: o.bind_port,
                    mark: o.mark,
                });
            }
            other => {
                return err(
                    &p.field("typed_config"),
                    ErrorKind::UnknownType(other.to_string()),
                );
            }
        }
    }
    let sniff_timeout = match &li.listener_filters_timeout {
        Some(d) => {
            let d = duration(d, &path.field("listener_filters_timeout"))?;
            (!d.is_zero()).then_some(d)
        }
        None => Some(Duration::from_secs(15)),
    };
    let mut chains = Vec::new();
    for (i, fc) in li.filter_chains.iter().enumerate() {
        chains.push(Arc::new(filter_chain(fc, &path.at("filter_chains", i))?));
    }
    let default_chain = match &li.default_filter_chain {
        Some(fc) => Some(Arc::new(filter_chain(
            fc,
            &path.field("default_filter_chain"),
        )?)),
        None => None,
    };
    // Envoy only learns application protocols from a listener filter: without http_inspector no
    // chain with application_protocols can match, and we do not sniff (see listener::handle).
    Ok(config::Listener {
        name: li.name.as_str().into(),
        address,
        bind_to_port: !internal && li.bind_to_port.as_ref().is_none_or(|b| b.value),
        use_original_dst: li.use_original_dst.as_ref().is_some_and(|b| b.value),
        original_dst_filter,
        tls_inspector,
        http_inspector,
        continue_on_timeout: li.continue_on_listener_filters_timeout,
        chains,
        default_chain,
        sniff_timeout,
        inbound: li.traffic_direction
            == envoy_types::pb::envoy::config::core::v3::TrafficDirection::Inbound as i32,
        stat_prefix: if li.stat_prefix.is_empty() {
            if internal {
                li.name.as_str().into()
            } else {
                format!("{address}").replace(':', "_").into()
            }
        } else {
            li.stat_prefix.as_str().into()
        },
        transparent: li.transparent.as_ref().is_some_and(|b| b.value),
        freebind: li.freebind.as_ref().is_some_and(|b| b.value),
        original_src,
        internal,
        set_dst_address,
    })
}

fn filter_chain(fc: &l::FilterChain, path: &Path) -> Result<FilterChain> {
    only(
        fc,
        path,
        &[
            "filter_chain_match",
            "filters",
            "name",
            "metadata",
            "transport_socket",
        ],
        &[("transport_socket_connect_timeout", MTLS)],
    )?;
    let tls = match &fc.transport_socket {
        Some(ts) => match super::tls::downstream(ts, &path.field("transport_socket"))? {
            super::tls::Socket::Plain | super::tls::Socket::Internal(_) => None,
            super::tls::Socket::Tls(t) => Some(t),
        },
        None => None,
    };
    let mut matcher = ChainMatch::default();
    if let Some(m) = &fc.filter_chain_match {
        let p = path.field("filter_chain_match");
        only(
            m,
            &p,
            &[
                "destination_port",
                "transport_protocol",
                "application_protocols",
                "prefix_ranges",
                "direct_source_prefix_ranges",
                "source_type",
                "source_prefix_ranges",
                "source_ports",
                "server_names",
            ],
            &[],
        )?;
        let cidrs = |v: &[envoy_types::pb::envoy::config::core::v3::CidrRange], field: &str| {
            v.iter()
                .enumerate()
                .map(|(i, c)| cidr(c, &p.at(field, i)))
                .collect::<Result<Vec<_>>>()
        };
        matcher.prefix_ranges = cidrs(&m.prefix_ranges, "prefix_ranges")?;
        matcher.direct_source_prefix_ranges = cidrs(
            &m.direct_source_prefix_ranges,
            "direct_source_prefix_ranges",
        )?;
        matcher.source_prefix_ranges = cidrs(&m.source_prefix_ranges, "source_prefix_ranges")?;
        for (i, port) in m.source_ports.iter().enumerate() {
            matcher.source_ports.push(
                u16::try_from(*port)
                    .or_else(|_| invalid(&p.at("source_ports", i), "port out of range"))?,
            );
        }
        use l::filter_chain_match::ConnectionSourceType as ST;
        matcher.source_type = match ST::try_from(m.source_type) {
            Ok(ST::Any) => SourceType::Any,
            Ok(ST::SameIpOrLoopback) => SourceType::Local,
            Ok(ST::External) => SourceType::External,
            Err(_) => return invalid(&p.field("source_type"), "unknown source type"),
        };
        for (i, n) in m.server_names.iter().enumerate() {
            if n.is_empty()
                || (n.contains('*') && !(n.starts_with("*.") && n.matches('*').count() == 1))
            {
                return invalid(
                    &p.at("server_names", i),
                    format!("partial wildcards are not supported: {n}"),
                );
            }
            matcher.server_names.push(n.to_ascii_lowercase().into());
        }
        matcher.destination_port = match &m.destination_port {
            Some(v) => Some(
                u16::try_from(v.value)
                    .or_else(|_| invalid(&p.field("destination_port"), "port out of range"))?,
            ),
            None => None,
        };
        match m.transport_protocol.as_str() {
            "" => {}
            "raw_buffer" => matcher.transport_protocol = Some("raw_buffer".into()),
            "tls" => matcher.transport_protocol = Some("tls".into()),
            other => {
                return invalid(
                    &p.field("transport_protocol"),
                    format!("unknown transport protocol '{other}'"),
                );
            }
        }
        for a in &m.application_protocols {
            matcher.application_protocols.push(a.as_str().into());
        }
    }
    let mut terminal = None;
    let mut network_authz = Vec::new();
    let n = fc.filters.len();
    for (i, f) in fc.filters.iter().enumerate() {
        let p = path.at("filters", i);
        only(
            f,
            &p,
            &["name", "typed_config"],
            &[("config_discovery", "xDS issue")],
        )?;
        let Some(l::filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            return err(&p.field("typed_config"), ErrorKind::Required);
        };
        let tp = p.field("typed_config");
        let (url, any) = unwrap_typed_struct(any, &tp)?;
        match url.as_str() {
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager" => {
                let h: hcm::HttpConnectionManager = unpack(&any, &tp)?;
                terminal = Some(ChainKind::Http(Arc::new(http_connection_manager(&h, &tp)?)));
            }
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy" => {
                let t: tcp::TcpProxy = unpack(&any, &tp)?;
                terminal = Some(ChainKind::Tcp(Arc::new(tcp_proxy(&t, &tp)?)));
            }
            "envoy.extensions.filters.network.rbac.v3.RBAC" => {
                let r = unpack(&any, &tp)?;
                let (config, stat_prefix) = super::rbac::network_rbac(&r, &tp)?;
                let stats = crate::authz::RbacStats::new(
                    &stat_prefix,
                    &config.rules_stat_prefix,
                    &config.shadow_stat_prefix,
                );
                network_authz.push(crate::authz::NetworkAuthz::Rbac(Arc::new(
                    crate::authz::NetworkRbac { config, stats },
                )));
            }
            "envoy.extensions.filters.network.ext_authz.v3.ExtAuthz" => {
                let e = unpack(&any, &tp)?;
                network_authz.push(crate::authz::NetworkAuthz::ExtAuthz(Arc::new(
                    super::ext_authz::network_ext_authz(&e, &tp)?,
                )));
            }
            u if ACCEPTED_NOT_ENFORCED.contains(&u) => {}
            other => return err(&tp, ErrorKind::UnknownType(other.to_string())),
        }
        if terminal.is_some() && i + 1 != n {
            return invalid(
                &path.at("filters", i + 1),
                "a filter after the terminal filter",
            );
        }
    }
    let Some(kind) = terminal else {
        return invalid(
            &path.field("filters"),
            "the last filter must be http_connection_manager or tcp_proxy",
        );
    };
    Ok(FilterChain {
        name: fc.name.as_str().into(),
        matcher,
        kind,
        drain: Default::default(),
        tls,
        network_authz,
    })
}

/// The type an extension config names: its own, or the inner type of a TypedStruct.
pub fn typed_struct_inner_type(any: &Any) -> String {
    let url = type_name(&any.type_url);
    if url != "udpa.type.v1.TypedStruct" && url != "xds.type.v3.TypedStruct" {
        return url.to_string();
    }
    match <TypedStruct as prost::Message>::decode(any.value.as_slice()) {
        Ok(ts) => type_name(&ts.type_url).to_string(),
        Err(_) => url.to_string(),
    }
}

/// `udpa.type.v1.TypedStruct` and `xds.type.v3.TypedStruct` share this wire shape.
#[derive(Clone, PartialEq, prost::Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(message, optional, tag = "2")]
    value: Option<envoy_types::pb::google::protobuf::Struct>,
}

/// Unwraps `udpa.type.v1.TypedStruct` / `xds.type.v3.TypedStruct`. Inner types we know are converted to
/// their binary form (validating the struct against the schema); Istio-only inner types that we accept
/// without a schema are returned as an empty Any of that type.
fn unwrap_typed_struct(any: &Any, path: &Path) -> Result<(String, Any)> {
    let url = type_name(&any.type_url).to_string();
    if url != "udpa.type.v1.TypedStruct" && url != "xds.type.v3.TypedStruct" {
        return Ok((url, any.clone()));
    }
    let ts: TypedStruct = prost::Message::decode(any.value.as_slice())
        .or_else(|e| invalid(path, format!("bad TypedStruct: {e}")))?;
    let inner = type_name(&ts.type_url).to_string();
    if ACCEPTED_NOT_ENFORCED.contains(&inner.as_str()) {
        // Not enforced, so its content is not needed (and no schema has to be loaded for it).
        return Ok((
            inner,
            Any {
                type_url: ts.type_url.clone(),
                value: vec![],
            },
        ));
    }
    let json = match &ts.value {
        Some(s) => struct_to_json(s),
        None => serde_json::Value::Object(Default::default()),
    };
    match dynamic_from_json(&inner, &json) {
        Ok(d) => Ok((
            inner.clone(),
            Any {
                type_url: ts.type_url.clone(),
                value: prost::Message::encode_to_vec(&d),
            },
        )),
        Err(crate::xds::json::DecodeError::UnknownType(_))
            if ACCEPTED_NOT_ENFORCED.contains(&inner.as_str()) =>
        {
            Ok((
                inner,
                Any {
                    type_url: ts.type_url.clone(),
                    value: vec![],
                },
            ))
        }
        Err(crate::xds::json::DecodeError::UnknownType(_)) => {
            match LATER_TYPES.iter().find(|(t, _)| *t == inner) {
                Some((_, issue)) => err(path, ErrorKind::NotYet(issue)),
                None => err(&path.field("type_url"), ErrorKind::UnknownType(inner)),
            }
        }
        Err(e) => invalid(&path.field("value"), e.to_string()),
    }
}

pub(super) fn struct_to_json(s: &envoy_types::pb::google::protobuf::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &envoy_types::pb::google::protobuf::Value) -> serde_json::Value {
    use envoy_types::pb::google::protobuf::value::Kind;
    match &v.kind {
        Some(Kind::NullValue(_)) | None => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
    }
}

fn http_connection_manager(
    h: &hcm::HttpConnectionManager,
    path: &Path,
) -> Result<HttpConnectionManager> {
    only(
        h,
        path,
        &[
            "stat_prefix",
            "codec_type",
            "route_config",
            "http_filters",
            "server_name",
            "server_header_transformation",
            "use_remote_address",
            "xff_num_trusted_hops",
            "generate_request_id",
            "preserve_external_request_id",
            "normalize_path",
            "merge_slashes",
            "path_with_escaped_slashes_action",
            "stream_idle_timeout",
            "request_timeout",
            "max_request_headers_kb",
            "upgrade_configs",
            "access_log",
            "request_id_extension",
            "common_http_protocol_options",
            "http_protocol_options",
            "http2_protocol_options",
            "internal_address_config",
            "delayed_close_timeout",
            "stream_error_on_invalid_http_message",
            "rds",
            "forward_client_cert_details",
            "set_current_client_cert_details",
            "tracing",
        ],
        &[
            ("scoped_routes", "xDS issue"),
            ("drain_timeout", "xDS issue"),
            ("request_headers_timeout", RESILIENCE),
            ("max_connection_duration", RESILIENCE),
            ("local_reply_config", TELEMETRY),
            ("add_user_agent", TELEMETRY),
        ],
    )?;
    if let Some(t) = &h.tracing {
        super::telemetry::hcm_tracing(t, &path.field("tracing"))?;
    }
    use hcm::http_connection_manager::CodecType as CT;
    let codec = match CT::try_from(h.codec_type) {
        Ok(CT::Auto) => Codec::Auto,
        Ok(CT::Http1) => Codec::Http1,
        Ok(CT::Http2) => Codec::Http2,
        _ => return err(&path.field("codec_type"), ErrorKind::NotSupported),
    };
    use hcm::http_connection_manager::RouteSpecifier as RS;
    let (routes, validate_clusters, rds, rds_fetch_timeout) = match &h.route_specifier {
        Some(RS::RouteConfig(rc)) => (
            Arc::new(translate_route_config(rc, &path.field("route_config"))?),
            rc.validate_clusters.as_ref().is_none_or(|b| b.value),
            None,
            None,
        ),
        Some(RS::Rds(rds)) => {
            let p = path.field("rds");
            only(rds, &p, &["config_source", "route_config_name"], &[])?;
            if rds.route_config_name.is_empty() {
                return err(&p.field("route_config_name"), ErrorKind::Required);
            }
            let timeout = match &rds.config_source {
                Some(cs) => config_source(cs, &p.field("config_source"))?,
                None => return err(&p.field("config_source"), ErrorKind::Required),
            };
            let empty = pingsail_filters::route::RouteTable::new(
                rds.route_config_name.as_str().into(),
                Vec::new(),
                Default::default(),
                Default::default(),
                false,
            )
            .or_else(|e| invalid(&p, e.to_string()))?;
            (
                Arc::new(empty),
                false,
                Some(rds.route_config_name.as_str().into()),
                timeout,
            )
        }
        Some(_) => return err(path, ErrorKind::NotYet("xDS issue")),
        None => return err(&path.field("route_config"), ErrorKind::Required),
    };
    let mut cors_filter = false;
    let mut connect_authority = false;
    let mut set_filter_state = None;
    let mut authz = Vec::new();
    let http_stat_prefix = format!("http.{}.", h.stat_prefix);
    let mut fault_filter = None;
    let n = h.http_filters.len();
    for (i, f) in h.http_filters.iter().enumerate() {
        let p = path.at("http_filters", i);
        only(
            f,
            &p,
            &["name", "typed_config", "is_optional"],
            &[("config_discovery", "xDS issue")],
        )?;
        use hcm::http_filter::ConfigType as C;
        let Some(C::TypedConfig(any)) = &f.config_type else {
            return err(&p.field("typed_config"), ErrorKind::Required);
        };
        let tp = p.field("typed_config");
        let (url, any) = unwrap_typed_struct(any, &tp)?;
        match url.as_str() {
            "envoy.extensions.filters.http.router.v3.Router" => {
                let r: router::Router = unpack(&any, &tp)?;
                only(
                    &r,
                    &tp,
                    &["suppress_envoy_headers", "start_child_span"],
                    &[],
                )?;
                if r.suppress_envoy_headers {
                    return err(&tp.field("suppress_envoy_headers"), ErrorKind::NotSupported);
                }
                if i + 1 != n {
                    return invalid(
                        &path.at("http_filters", i + 1),
                        "filters after the router are never reached",
                    );
                }
            }
            "envoy.extensions.filters.http.cors.v3.Cors" => {
                let c: cors::Cors = unpack(&any, &tp)?;
                only(&c, &tp, &[], &[])?;
                cors_filter = true;
            }
            "envoy.extensions.filters.http.fault.v3.HTTPFault" => {
                // istiod's filter-level config is empty; the per-route configs carry the policy.
                let fl: fault::HttpFault = unpack(&any, &tp)?;
                let config = super::route::fault_config(&fl, &tp)?;
                fault_filter = Some(Arc::new(crate::config::FaultFilter {
                    name: f.name.as_str().into(),
                    config: Arc::new(config),
                    before_cors: !cors_filter,
                }));
            }
            "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig" => {
                let g: grpc_stats::FilterConfig = unpack(&any, &tp)?;
                only(
                    &g,
                    &tp,
                    &["emit_filter_state", "stats_for_all_methods"],
                    &[],
                )?;
            }
            "envoy.extensions.filters.http.rbac.v3.RBAC" => {
                let r = unpack(&any, &tp)?;
                let config = super::rbac::http_rbac(&r, &tp)?;
                let stats = crate::authz::RbacStats::new(
                    &http_stat_prefix,
                    &config.rules_stat_prefix,
                    &config.shadow_stat_prefix,
                );
                authz.push(crate::authz::HttpAuthz::Rbac(Arc::new(
                    crate::authz::HttpRbac {
                        name: f.name.as_str().into(),
                        config: Arc::new(config),
                        stats,
                    },
                )));
            }
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication" => {
                let j = unpack(&any, &tp)?;
                authz.push(crate::authz::HttpAuthz::Jwt(Arc::new(
                    crate::authz::HttpJwt {
                        name: f.name.as_str().into(),
                        config: super::jwt::jwt_authn(&j, &tp)?,
                    },
                )));
            }
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz" => {
                let e = unpack(&any, &tp)?;
                authz.push(crate::authz::HttpAuthz::ExtAuthz(Arc::new(
                    super::ext_authz::ext_authz(&e, &f.name, &http_stat_prefix, &tp)?,
                )));
            }
            "envoy.extensions.filters.http.compressor.v3.Compressor" => {
                super::telemetry::compressor(&unpack(&any, &tp)?, &tp)?;
            }
            "envoy.extensions.filters.http.wasm.v3.Wasm" => {
                super::telemetry::istio_wasm(&unpack(&any, &tp)?, &tp)?;
            }
            CONNECT_AUTHORITY => connect_authority = true,
            "envoy.extensions.filters.http.set_filter_state.v3.Config" => {
                set_filter_state = Some(Arc::new(filter_state(&unpack(&any, &tp)?, &tp)?));
            }
            u if ACCEPTED_NOT_ENFORCED.contains(&u) => {}
            other => return err(&tp, ErrorKind::UnknownType(other.to_string())),
        }
        if i + 1 == n && url != "envoy.extensions.filters.http.router.v3.Router" {
            return invalid(&p, "the last HTTP filter must be envoy.filters.http.router");
        }
    }
    if n == 0 {
        return invalid(
            &path.field("http_filters"),
            "the last HTTP filter must be envoy.filters.http.router",
        );
    }
    if let Some(rid) = &h.request_id_extension {
        let p = path.field("request_id_extension");
        if let Some(tc) = &rid.typed_config
            && type_name(&tc.type_url) != "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig"
        {
            return err(
                &p.field("typed_config"),
                ErrorKind::UnknownType(tc.type_url.clone()),
            );
        }
    }
    let mut websocket = None;
    let mut connect = None;
    for (i, u) in h.upgrade_configs.iter().enumerate() {
        let p = path.at("upgrade_configs", i);
        only(u, &p, &["upgrade_type", "enabled"], &[])?;
        if u.upgrade_type.eq_ignore_ascii_case("websocket") {
            websocket = Some(u.enabled.as_ref().is_none_or(|b| b.value));
        } else if u.upgrade_type.eq_ignore_ascii_case("CONNECT") {
            connect = Some(u.enabled.as_ref().is_none_or(|b| b.value));
        } else {
            return invalid(
                &p.field("upgrade_type"),
                format!("unsupported upgrade '{}'", u.upgrade_type),
            );
        }
    }
    use hcm::http_connection_manager::PathWithEscapedSlashesAction as E;
    let escaped_slashes = match E::try_from(h.path_with_escaped_slashes_action) {
        Ok(E::ImplementationSpecificDefault | E::KeepUnchanged) => EscapedSlashes::Keep,
        Ok(E::RejectRequest) => EscapedSlashes::Reject,
        Ok(E::UnescapeAndRedirect) => EscapedSlashes::UnescapeAndRedirect,
        Ok(E::UnescapeAndForward) => EscapedSlashes::UnescapeAndForward,
        Err(_) => {
            return invalid(
                &path.field("path_with_escaped_slashes_action"),
                "unknown action",
            );
        }
    };
    use hcm::http_connection_manager::ServerHeaderTransformation as SH;
    let server_pass_through = match SH::try_from(h.server_header_transformation) {
        Ok(SH::Overwrite) => false,
        Ok(SH::PassThrough) => true,
        _ => {
            return err(
                &path.field("server_header_transformation"),
                ErrorKind::NotSupported,
            );
        }
    };
    let opt_duration = |d: &Option<envoy_types::pb::google::protobuf::Duration>,
                        f: &str,
                        default: Option<Duration>|
     -> Result<Option<Duration>> {
        match d {
            Some(d) => {
                let d = duration(d, &path.field(f))?;
                Ok((!d.is_zero()).then_some(d))
            }
            None => Ok(default),
        }
    };
    let max_kb = h
        .max_request_headers_kb
        .as_ref()
        .map(|v| v.value)
        .unwrap_or(60);
    if !(1..=8192).contains(&max_kb) {
        return invalid(
            &path.field("max_request_headers_kb"),
            "must be in [1, 8192]",
        );
    }
    if let Some(o) = &h.common_http_protocol_options {
        only(
            o,
            &path.field("common_http_protocol_options"),
            &["idle_timeout", "max_connection_duration"],
            &[
                ("max_headers_count", RESILIENCE),
                ("headers_with_underscores_action", RESILIENCE),
                ("max_stream_duration", RESILIENCE),
                ("max_requests_per_connection", RESILIENCE),
            ],
        )?;
    }
    let max_connection_duration = match h
        .common_http_protocol_options
        .as_ref()
        .and_then(|o| o.max_connection_duration.as_ref())
    {
        Some(d) => {
            let d = duration(
                d,
                &path
                    .field("common_http_protocol_options")
                    .field("max_connection_duration"),
            )?;
            (!d.is_zero()).then_some(d)
        }
        None => None,
    };
    let mut accept_http_10 = false;
    if let Some(o) = &h.http_protocol_options {
        only(
            o,
            &path.field("http_protocol_options"),
            &["accept_http_10"],
            &[],
        )?;
        accept_http_10 = o.accept_http_10;
    }
    if let Some(o) = &h.http2_protocol_options {
        only(
            o,
            &path.field("http2_protocol_options"),
            &[
                "max_concurrent_streams",
                "initial_stream_window_size",
                "initial_connection_window_size",
                // CONNECT over HTTP/2 needs an HCM (and route) CONNECT upgrade here too.
                "allow_connect",
            ],
            &[],
        )?;
    }
    use hcm::http_connection_manager::ForwardClientCertDetails as F;
    let mut xfcc = crate::config::Xfcc {
        mode: match F::try_from(h.forward_client_cert_details) {
            Ok(F::Sanitize) => crate::config::XfccMode::Sanitize,
            Ok(F::ForwardOnly) => crate::config::XfccMode::ForwardOnly,
            Ok(F::AppendForward) => crate::config::XfccMode::AppendForward,
            Ok(F::SanitizeSet) => crate::config::XfccMode::SanitizeSet,
            Ok(F::AlwaysForwardOnly) => crate::config::XfccMode::AlwaysForwardOnly,
            Err(_) => return invalid(&path.field("forward_client_cert_details"), "unknown mode"),
        },
        ..Default::default()
    };
    if let Some(d) = &h.set_current_client_cert_details {
        let p = path.field("set_current_client_cert_details");
        only(d, &p, &["subject", "cert", "chain", "dns", "uri"], &[])?;
        xfcc.subject = d.subject.as_ref().is_some_and(|b| b.value);
        xfcc.cert = d.cert;
        xfcc.chain = d.chain;
        xfcc.dns = d.dns;
        xfcc.uri = d.uri;
    }
    let server_name = if h.server_name.is_empty() {
        "envoy"
    } else {
        h.server_name.as_str()
    };
    Ok(HttpConnectionManager {
        stat_prefix: h.stat_prefix.as_str().into(),
        codec,
        routes,
        rds,
        rds_fetch_timeout,
        validate_clusters,
        server_name: http::HeaderValue::from_str(server_name)
            .or_else(|_| invalid(&path.field("server_name"), "invalid header value"))?,
        server_pass_through,
        use_remote_address: h.use_remote_address.as_ref().is_some_and(|b| b.value),
        xfcc,
        xff_num_trusted_hops: h.xff_num_trusted_hops,
        generate_request_id: h.generate_request_id.as_ref().is_none_or(|b| b.value),
        preserve_external_request_id: h.preserve_external_request_id,
        normalize_path: h.normalize_path.as_ref().is_some_and(|b| b.value),
        merge_slashes: h.merge_slashes,
        escaped_slashes,
        stream_idle_timeout: opt_duration(
            &h.stream_idle_timeout,
            "stream_idle_timeout",
            Some(Duration::from_secs(300)),
        )?,
        request_timeout: opt_duration(&h.request_timeout, "request_timeout", None)?,
        max_connection_duration,
        delayed_close_timeout: opt_duration(
            &h.delayed_close_timeout,
            "delayed_close_timeout",
            Some(Duration::from_secs(1)),
        )?,
        max_request_headers_kb: max_kb,
        accept_http_10,
        websocket,
        connect,
        connect_authority,
        set_filter_state,
        cors_filter,
        authz,
        fault: fault_filter,
        access_logs: translate_access_logs(&h.access_log, &path.field("access_log"))?,
    })
}

fn tcp_proxy(t: &tcp::TcpProxy, path: &Path) -> Result<TcpProxy> {
    only(
        t,
        path,
        &[
            "stat_prefix",
            "cluster",
            "weighted_clusters",
            "idle_timeout",
            "access_log",
            "tunneling_config",
        ],
        &[
            ("downstream_idle_timeout", RESILIENCE),
            ("upstream_idle_timeout", RESILIENCE),
            ("max_connect_attempts", RESILIENCE),
            ("hash_policy", "consistent-hash load balancing"),
            ("max_downstream_connection_duration", RESILIENCE),
            ("access_log_options", TELEMETRY),
        ],
    )?;
    use tcp::tcp_proxy::ClusterSpecifier as C;
    let clusters: Vec<(arcstr::ArcStr, u64)> = match &t.cluster_specifier {
        Some(C::Cluster(c)) => vec![(c.as_str().into(), 1)],
        Some(C::WeightedClusters(w)) => {
            let p = path.field("weighted_clusters");
            only(w, &p, &["clusters"], &[])?;
            let mut v = Vec::new();
            for (i, c) in w.clusters.iter().enumerate() {
                only(
                    c,
                    &p.at("clusters", i),
                    &["name", "weight"],
                    &[("metadata_match", "subset load balancing")],
                )?;
                if c.weight == 0 {
                    return invalid(&p.at("clusters", i).field("weight"), "must be at least 1");
                }
                v.push((c.name.as_str().into(), u64::from(c.weight)));
            }
            v
        }
        None => return err(&path.field("cluster"), ErrorKind::Required),
    };
    let total_weight = clusters.iter().map(|c| c.1).sum();
    let idle_timeout = match &t.idle_timeout {
        Some(d) => {
            let d = duration(d, &path.field("idle_timeout"))?;
            (!d.is_zero()).then_some(d)
        }
        None => Some(Duration::from_secs(3600)),
    };
    Ok(TcpProxy {
        stat_prefix: t.stat_prefix.as_str().into(),
        clusters,
        total_weight,
        idle_timeout,
        access_logs: translate_access_logs(&t.access_log, &path.field("access_log"))?,
        tunneling: match &t.tunneling_config {
            Some(tc) => Some(Arc::new(tunneling(tc, &path.field("tunneling_config"))?)),
            None => None,
        },
    })
}

fn tunneling(
    tc: &tcp::tcp_proxy::TunnelingConfig,
    path: &Path,
) -> Result<crate::config::Tunneling> {
    only(
        tc,
        path,
        &["hostname", "headers_to_add"],
        &[
            ("use_post", "HTTP/1 POST tunnels"),
            ("post_path", "HTTP/1 POST tunnels"),
            ("propagate_response_headers", TELEMETRY),
            ("propagate_response_trailers", TELEMETRY),
            ("request_id_extension", TELEMETRY),
            ("request_id_header", TELEMETRY),
            ("request_id_metadata_key", TELEMETRY),
        ],
    )?;
    if tc.hostname.is_empty() {
        return err(&path.field("hostname"), ErrorKind::Required);
    }
    let hostname = template(&tc.hostname, &path.field("hostname"))?;
    let mut headers = Vec::new();
    for (i, h) in tc.headers_to_add.iter().enumerate() {
        let p = path.at("headers_to_add", i);
        only(h, &p, &["header", "append", "append_action"], &[])?;
        let Some(hv) = &h.header else {
            return err(&p.field("header"), ErrorKind::Required);
        };
        let name = http::HeaderName::from_bytes(hv.key.to_ascii_lowercase().as_bytes())
            .or_else(|_| invalid(&p.field("header").field("key"), "invalid header name"))?;
        if name.as_str().starts_with(':') {
            return invalid(
                &p.field("header").field("key"),
                "pseudo-headers cannot be added",
            );
        }
        headers.push((
            name,
            template(&hv.value, &p.field("header").field("value"))?,
        ));
    }
    Ok(crate::config::Tunneling { hostname, headers })
}

/// `envoy.filters.http.set_filter_state`: the keys that cross to an internal listener.
fn filter_state(
    c: &envoy_types::pb::envoy::extensions::filters::http::set_filter_state::v3::Config,
    path: &Path,
) -> Result<crate::config::SetFilterState> {
    use envoy_types::pb::envoy::config::core::v3::substitution_format_string::Format;
    use envoy_types::pb::envoy::extensions::filters::common::set_filter_state::v3::filter_state_value as fsv;
    only(
        c,
        path,
        &["on_request_headers"],
        &[("clear_route_cache", "routing on filter state")],
    )?;
    let mut out = crate::config::SetFilterState::default();
    for (i, v) in c.on_request_headers.iter().enumerate() {
        let p = path.at("on_request_headers", i);
        only(
            v,
            &p,
            &[
                "object_key",
                "factory_key",
                "format_string",
                "shared_with_upstream",
                "read_only",
                "skip_if_empty",
            ],
            &[],
        )?;
        let Some(fsv::Key::ObjectKey(key)) = &v.key else {
            return err(&p.field("object_key"), ErrorKind::Required);
        };
        if key == "io.istio.local_principal" {
            // Read only by telemetry.
            continue;
        }
        let fp = p.field("format_string");
        let Some(fsv::Value::FormatString(f)) = &v.value else {
            return err(&fp, ErrorKind::Required);
        };
        only(f, &fp, &["text_format_source", "text_format"], &[])?;
        let text = match &f.format {
            Some(Format::TextFormat(t)) => t.clone(),
            Some(Format::TextFormatSource(ds)) => {
                use envoy_types::pb::envoy::config::core::v3::data_source::Specifier as S;
                match &ds.specifier {
                    Some(S::InlineString(s)) => s.clone(),
                    _ => return err(&fp.field("text_format_source"), ErrorKind::NotSupported),
                }
            }
            _ => return err(&fp, ErrorKind::NotSupported),
        };
        let t = template(&text, &fp)?;
        let shared = v.shared_with_upstream != fsv::SharedWithUpstream::None as i32;
        match key.as_str() {
            "envoy.filters.listener.original_dst.local_ip" if shared => out.local = Some(t),
            "envoy.filters.listener.original_dst.remote_ip" if shared => out.remote = Some(t),
            // The peer identity always travels to internal listeners (istio_authn).
            "io.istio.peer_principal" if t.0 == [crate::config::TemplatePart::PeerUriSan] => {}
            _ => return err(&p.field("object_key"), ErrorKind::NotSupported),
        }
    }
    Ok(out)
}

/// A value with Envoy's `%DOWNSTREAM_…%` substitutions (the ones tunnels use); others are refused.
fn template(s: &str, path: &Path) -> Result<crate::config::Template> {
    use crate::config::TemplatePart as T;
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find('%') {
        if start > 0 {
            parts.push(T::Text(rest[..start].to_string()));
        }
        let after = &rest[start + 1..];
        let Some(end) = after.find('%') else {
            return invalid(path, format!("unterminated command operator in '{s}'"));
        };
        parts.push(match &after[..end] {
            "DOWNSTREAM_LOCAL_ADDRESS" => T::LocalAddress,
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => T::LocalIp,
            "DOWNSTREAM_LOCAL_PORT" => T::LocalPort,
            "DOWNSTREAM_REMOTE_ADDRESS" => T::RemoteAddress,
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => T::RemoteIp,
            "DOWNSTREAM_PEER_URI_SAN" => T::PeerUriSan,
            op if op.starts_with("REQ(") && op.ends_with(')') => {
                T::Req(op[4..op.len() - 1].to_ascii_lowercase())
            }
            other => {
                return invalid(
                    path,
                    format!("command operator %{other}% is not supported here"),
                );
            }
        });
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        parts.push(T::Text(rest.to_string()));
    }
    Ok(crate::config::Template(parts))
}

fn cidr(c: &envoy_types::pb::envoy::config::core::v3::CidrRange, path: &Path) -> Result<Cidr> {
    only(c, path, &["address_prefix", "prefix_len"], &[])?;
    let addr: std::net::IpAddr = c.address_prefix.parse().or_else(|_| {
        invalid(
            &path.field("address_prefix"),
            format!("malformed IP address: {}", c.address_prefix),
        )
    })?;
    let len = c.prefix_len.as_ref().map_or(0, |v| v.value);
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return invalid(
            &path.field("prefix_len"),
            format!("prefix length {len} > {max}"),
        );
    }
    Ok(Cidr {
        addr,
        len: len as u8,
    })
}

fn predicate(
    d: &envoy_types::pb::envoy::config::listener::v3::ListenerFilterChainMatchPredicate,
    path: &Path,
) -> Result<Predicate> {
    use envoy_types::pb::envoy::config::listener::v3::listener_filter_chain_match_predicate::Rule as R;
    only(
        d,
        path,
        &[
            "or_match",
            "and_match",
            "not_match",
            "any_match",
            "destination_port_range",
        ],
        &[],
    )?;
    Ok(match &d.rule {
        Some(R::AnyMatch(_)) => Predicate::Any,
        Some(R::NotMatch(n)) => Predicate::Not(Box::new(predicate(n, &path.field("not_match"))?)),
        Some(R::OrMatch(s)) => Predicate::Or(
            s.rules
                .iter()
                .enumerate()
                .map(|(i, r)| predicate(r, &path.field("or_match").at("rules", i)))
                .collect::<Result<_>>()?,
        ),
        Some(R::AndMatch(s)) => Predicate::And(
            s.rules
                .iter()
                .enumerate()
                .map(|(i, r)| predicate(r, &path.field("and_match").at("rules", i)))
                .collect::<Result<_>>()?,
        ),
        Some(R::DestinationPortRange(r)) => {
            let start = u16::try_from(r.start)
                .or_else(|_| invalid(&path.field("destination_port_range"), "port out of range"))?;
            Predicate::PortRange(start, r.end.max(0) as u32)
        }
        None => return err(path, ErrorKind::Required),
    })
}
