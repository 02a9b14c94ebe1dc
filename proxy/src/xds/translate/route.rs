// SPDX-License-Identifier: Apache-2.0
//! `RouteConfiguration` → [`RouteTable`].

// istiod still emits deprecated fields (append, exact_match, total_weight…): we translate them on purpose.
#![allow(deprecated)]

use super::common::*;
use envoy_types::pb::envoy::config::route::v3 as r;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3 as cors_pb;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault_pb;
use pingsail_filters::ArcStr;
use pingsail_filters::cors::CorsPolicy;
use pingsail_filters::fault::FaultConfig;
use pingsail_filters::matcher::{
    HeaderMatcher, Pseudo, QueryMatcher, StringMatch, StringMatcher, ValueMatch,
};
use pingsail_filters::retry::{RetryOn, RetryPolicy};
use pingsail_filters::route::*;
use std::sync::Arc;
use std::time::Duration;

const RESILIENCE: &str = "resilience issue";
const AUTHZ: &str = "authorization issue";

/// Translates a route configuration.
pub fn translate_route_config(rc: &r::RouteConfiguration, path: &Path) -> Result<RouteTable> {
    only(
        rc,
        path,
        &[
            "name",
            "virtual_hosts",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "validate_clusters",
            "most_specific_header_mutations_wins",
            "ignore_port_in_host_matching",
            "max_direct_response_body_size_bytes",
        ],
        &[("vhds", "xDS issue"), ("typed_per_filter_config", AUTHZ)],
    )?;
    let mut vhosts = Vec::with_capacity(rc.virtual_hosts.len());
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        vhosts.push(virtual_host(vh, &path.at("virtual_hosts", i))?);
    }
    let req = header_ops(
        &rc.request_headers_to_add,
        &rc.request_headers_to_remove,
        path,
        "request_headers_to_add",
        "request_headers_to_remove",
    )?;
    let resp = header_ops(
        &rc.response_headers_to_add,
        &rc.response_headers_to_remove,
        path,
        "response_headers_to_add",
        "response_headers_to_remove",
    )?;
    let mut table = RouteTable::new(
        rc.name.as_str().into(),
        vhosts,
        req,
        resp,
        rc.most_specific_header_mutations_wins,
    )
    .or_else(|e| invalid(path, e.to_string()))?;
    table.ignore_port_in_host_matching = rc.ignore_port_in_host_matching;
    Ok(table)
}

fn virtual_host(vh: &r::VirtualHost, path: &Path) -> Result<VirtualHost> {
    only(
        vh,
        path,
        &[
            "name",
            "domains",
            "routes",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "retry_policy",
            "typed_per_filter_config",
            "include_request_attempt_count",
            "include_attempt_count_in_response",
        ],
        &[
            ("rate_limits", "rate limiting"),
            ("hedge_policy", RESILIENCE),
            ("retry_policy_typed_config", RESILIENCE),
        ],
    )?;
    if vh.domains.is_empty() {
        return err(&path.field("domains"), ErrorKind::Required);
    }
    let retry_policy = match &vh.retry_policy {
        Some(p) => Some(Arc::new(retry_policy(p, &path.field("retry_policy"))?)),
        None => None,
    };
    let (cors, authz, fault, _) = per_filter(
        &vh.typed_per_filter_config,
        &path.field("typed_per_filter_config"),
    )?;
    let mut routes = Vec::with_capacity(vh.routes.len());
    for (i, rt) in vh.routes.iter().enumerate() {
        routes.push(route(rt, &path.at("routes", i), retry_policy.as_ref())?);
    }
    Ok(VirtualHost {
        name: vh.name.as_str().into(),
        domains: vh.domains.clone(),
        routes,
        request_headers: header_ops(
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            path,
            "request_headers_to_add",
            "request_headers_to_remove",
        )?,
        response_headers: header_ops(
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
            path,
            "response_headers_to_add",
            "response_headers_to_remove",
        )?,
        retry_policy,
        cors,
        authz,
        fault,
        attempt_count_in_request: vh.include_request_attempt_count,
        attempt_count_in_response: vh.include_attempt_count_in_response,
    })
}

/// Per-filter configs of a route or virtual host: CORS, fault, RBACPerRoute, ExtAuthzPerRoute
/// and jwt_authn PerRouteConfig are honoured.
#[allow(clippy::type_complexity)]
fn per_filter(
    map: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Any>,
    path: &Path,
) -> Result<(
    Option<Arc<CorsPolicy>>,
    PerFilterAuthz,
    Option<(ArcStr, Arc<FaultConfig>)>,
    Option<(bool, u16)>,
)> {
    let mut connect_authority = None;
    let mut cors = None;
    let mut authz = PerFilterAuthz::default();
    let mut fault = None;
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    for name in names {
        let any = &map[name];
        let p = path.field(name);
        if let Some((inner, v)) = super::listener::typed_struct_json(any)
            && inner == "io.istio.http.connect_authority.Config"
        {
            // Istio's connect_authority: `enabled` (bool), `port` (the tunnel port override).
            let enabled = v.get("enabled").and_then(|e| e.as_bool()).unwrap_or(false);
            let port = match v.get("port") {
                None => 0,
                Some(n) => n
                    .as_f64()
                    .filter(|n| n.fract() == 0.0 && (0.0..=65535.0).contains(n))
                    .map(|n| n as u16)
                    .map_or_else(
                        || invalid(&p.field("value").field("port"), "not a port"),
                        Ok,
                    )?,
            };
            if let Some(k) = v
                .as_object()
                .and_then(|o| o.keys().find(|k| *k != "enabled" && *k != "port"))
            {
                return err(&p.field("value").field(k), ErrorKind::NotSupported);
            }
            connect_authority = Some((enabled, port));
            continue;
        }
        match type_name(&any.type_url) {
            "envoy.extensions.filters.http.cors.v3.CorsPolicy" => {
                let c: cors_pb::CorsPolicy = unpack(any, &p)?;
                cors = Some(Arc::new(cors_policy(&c, &p)?));
            }
            "envoy.extensions.filters.http.fault.v3.HTTPFault" => {
                let f: fault_pb::HttpFault = unpack(any, &p)?;
                fault = Some((ArcStr::from(name.as_str()), Arc::new(fault_config(&f, &p)?)));
            }
            "envoy.extensions.filters.http.rbac.v3.RBACPerRoute" => {
                let r = unpack(any, &p)?;
                authz.rbac.push((
                    name.as_str().into(),
                    super::rbac::http_rbac_per_route(&r, &p)?,
                ));
            }
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute" => {
                let r = unpack(any, &p)?;
                match super::ext_authz::ext_authz_per_route(&r, &p)? {
                    super::ext_authz::PerRouteExtAuthz::Disabled => {
                        authz.ext_authz_disabled.push(name.as_str().into());
                    }
                    super::ext_authz::PerRouteExtAuthz::Context(c) => {
                        authz
                            .ext_authz_context
                            .push((name.as_str().into(), Arc::new(c)));
                    }
                }
            }
            "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig" => {
                let r = unpack(any, &p)?;
                authz
                    .jwt
                    .push((name.as_str().into(), super::jwt::jwt_per_route(&r, &p)?));
            }
            other => return err(&p, ErrorKind::UnknownType(other.to_string())),
        }
    }
    Ok((cors, authz, fault, connect_authority))
}

fn fraction(
    f: Option<&envoy_types::pb::envoy::r#type::v3::FractionalPercent>,
) -> pingsail_filters::fault::Fraction {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType as D;
    let Some(f) = f else {
        // An absent percentage is 0 %.
        return pingsail_filters::fault::Fraction {
            numerator: 0,
            denominator: 100,
        };
    };
    pingsail_filters::fault::Fraction {
        numerator: f.numerator,
        denominator: match D::try_from(f.denominator) {
            Ok(D::Hundred) => 100,
            Ok(D::TenThousand) => 10_000,
            Ok(D::Million) | Err(_) => 1_000_000,
        },
    }
}

/// Translates an `HTTPFault` (filter-level or per-route).
pub fn fault_config(f: &fault_pb::HttpFault, path: &Path) -> Result<FaultConfig> {
    use pingsail_filters::fault::{AbortSource, DelaySource, FaultAbort, FaultDelay};
    only(
        f,
        path,
        &[
            "delay",
            "abort",
            "upstream_cluster",
            "headers",
            "downstream_nodes",
            "max_active_faults",
            "disable_downstream_cluster_stats",
            "response_rate_limit",
            // Runtime key names: pingsail's runtime has no values, so every key falls back to
            // the configured value, as Envoy's does for a key no runtime layer sets.
            "delay_percent_runtime",
            "abort_percent_runtime",
            "delay_duration_runtime",
            "abort_http_status_runtime",
            "max_active_faults_runtime",
            "response_rate_limit_percent_runtime",
            "abort_grpc_status_runtime",
        ],
        &[("filter_metadata", "telemetry issue")],
    )?;
    let response_rate_limit = match &f.response_rate_limit {
        Some(r) => {
            use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_rate_limit::LimitType as L;
            let p = path.field("response_rate_limit");
            only(r, &p, &["fixed_limit", "header_limit", "percentage"], &[])?;
            let source = match &r.limit_type {
                Some(L::FixedLimit(l)) => {
                    if l.limit_kbps < 1 {
                        return invalid(
                            &p.field("fixed_limit").field("limit_kbps"),
                            format!(
                                "value must be greater than or equal to 1, got {}",
                                l.limit_kbps
                            ),
                        );
                    }
                    pingsail_filters::fault::RateLimitSource::Fixed(l.limit_kbps)
                }
                Some(L::HeaderLimit(_)) => pingsail_filters::fault::RateLimitSource::Header,
                None => return err(&p.field("fixed_limit"), ErrorKind::Required),
            };
            Some(pingsail_filters::fault::FaultRateLimit {
                source,
                percentage: fraction(r.percentage.as_ref()),
            })
        }
        None => None,
    };
    let delay = match &f.delay {
        Some(d) => {
            let p = path.field("delay");
            only(d, &p, &["fixed_delay", "header_delay", "percentage"], &[])?;
            use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier as S;
            let source = match &d.fault_delay_secifier {
                Some(S::FixedDelay(t)) => DelaySource::Fixed(duration(t, &p.field("fixed_delay"))?),
                Some(S::HeaderDelay(_)) => DelaySource::Header,
                None => return err(&p.field("fixed_delay"), ErrorKind::Required),
            };
            Some(FaultDelay {
                source,
                percentage: fraction(d.percentage.as_ref()),
            })
        }
        None => None,
    };
    let abort = match &f.abort {
        Some(a) => {
            let p = path.field("abort");
            only(
                a,
                &p,
                &["http_status", "grpc_status", "header_abort", "percentage"],
                &[("response_body", RESILIENCE)],
            )?;
            use fault_pb::fault_abort::ErrorType as E;
            let source = match a.error_type {
                Some(E::HttpStatus(s)) => {
                    if !(200..600).contains(&s) {
                        return invalid(
                            &p.field("http_status"),
                            format!("value must be inside range [200, 600), got {s}"),
                        );
                    }
                    AbortSource::Http(s as u16)
                }
                Some(E::GrpcStatus(g)) => AbortSource::Grpc(g),
                Some(E::HeaderAbort(_)) => AbortSource::Header,
                None => return err(&p.field("http_status"), ErrorKind::Required),
            };
            Some(FaultAbort {
                source,
                percentage: fraction(a.percentage.as_ref()),
            })
        }
        None => None,
    };
    let mut headers = Vec::new();
    for (i, h) in f.headers.iter().enumerate() {
        headers.push(header_matcher(h, &path.at("headers", i))?);
    }
    Ok(FaultConfig {
        delay,
        abort,
        response_rate_limit,
        headers,
        upstream_cluster: (!f.upstream_cluster.is_empty()).then(|| f.upstream_cluster.clone()),
        downstream_nodes: f.downstream_nodes.clone(),
        max_active_faults: f.max_active_faults.map(|v| u64::from(v.value)),
    })
}

fn cors_policy(c: &cors_pb::CorsPolicy, path: &Path) -> Result<CorsPolicy> {
    only(
        c,
        path,
        &[
            "allow_origin_string_match",
            "allow_methods",
            "allow_headers",
            "expose_headers",
            "max_age",
            "allow_credentials",
            "filter_enabled",
            "allow_private_network_access",
        ],
        &[],
    )?;
    if let Some(fe) = &c.filter_enabled {
        only(fe, &path.field("filter_enabled"), &["default_value"], &[])?;
    }
    let mut allow_origins = Vec::new();
    for (i, m) in c.allow_origin_string_match.iter().enumerate() {
        allow_origins.push(string_matcher(m, &path.at("allow_origin_string_match", i))?);
    }
    let enabled = c
        .filter_enabled
        .as_ref()
        .and_then(|f| f.default_value.as_ref())
        .map(|v| fraction_ppm(v.numerator, v.denominator) >= 1_000_000)
        .unwrap_or(true);
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(CorsPolicy {
        allow_origins,
        allow_methods: opt(&c.allow_methods),
        allow_headers: opt(&c.allow_headers),
        expose_headers: opt(&c.expose_headers),
        max_age: opt(&c.max_age),
        allow_credentials: c.allow_credentials.is_some_and(|b| b.value),
        enabled,
        allow_private_network_access: c.allow_private_network_access.is_some_and(|b| b.value),
    })
}

fn fraction_ppm(numerator: u32, denominator: i32) -> u64 {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType as D;
    let n = u64::from(numerator);
    match D::try_from(denominator) {
        Ok(D::Hundred) => n * 10_000,
        Ok(D::TenThousand) => n * 100,
        Ok(D::Million) | Err(_) => n,
    }
    .min(1_000_000)
}

fn route(rt: &r::Route, path: &Path, vh_retry: Option<&Arc<RetryPolicy>>) -> Result<Route> {
    only(
        rt,
        path,
        &[
            "name",
            "match",
            "route",
            "redirect",
            "direct_response",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "typed_per_filter_config",
            "decorator",
            "metadata",
        ],
        &[("tracing", "telemetry issue")],
    )?;
    let Some(m) = &rt.r#match else {
        return err(&path.field("match"), ErrorKind::Required);
    };
    let matcher = route_match(m, &path.field("match"))?;
    let (cors, authz, fault, connect_authority) = per_filter(
        &rt.typed_per_filter_config,
        &path.field("typed_per_filter_config"),
    )?;
    use r::route::Action as A;
    let action = match &rt.action {
        Some(A::Route(ra)) => {
            let mut a = route_action(ra, &path.field("route"), vh_retry)?;
            a.connect_authority = connect_authority;
            Action::Forward(a)
        }
        Some(A::Redirect(rd)) => Action::Redirect(redirect(rd, &path.field("redirect"))?),
        Some(A::DirectResponse(d)) => Action::Direct(direct(d, &path.field("direct_response"))?),
        Some(A::FilterAction(_)) | Some(A::NonForwardingAction(_)) => {
            return err(path, ErrorKind::NotSupported);
        }
        None => return err(&path.field("route"), ErrorKind::Required),
    };
    Ok(Route {
        name: rt.name.as_str().into(),
        matcher,
        action,
        request_headers: header_ops(
            &rt.request_headers_to_add,
            &rt.request_headers_to_remove,
            path,
            "request_headers_to_add",
            "request_headers_to_remove",
        )?,
        response_headers: header_ops(
            &rt.response_headers_to_add,
            &rt.response_headers_to_remove,
            path,
            "response_headers_to_add",
            "response_headers_to_remove",
        )?,
        cors,
        authz,
        fault,
    })
}

pub(super) fn route_match(m: &r::RouteMatch, path: &Path) -> Result<RouteMatch> {
    only(
        m,
        path,
        &[
            "prefix",
            "path",
            "safe_regex",
            "path_separated_prefix",
            "connect_matcher",
            "case_sensitive",
            "headers",
            "query_parameters",
            "grpc",
            "runtime_fraction",
            "dynamic_metadata",
        ],
        &[("tls_context", "mTLS issue"), ("filter_state", AUTHZ)],
    )?;
    use r::route_match::PathSpecifier as P;
    let pm = match &m.path_specifier {
        Some(P::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => PathMatch::Exact(p.clone()),
        Some(P::SafeRegex(re)) => PathMatch::Regex(regex(re, &path.field("safe_regex"))?),
        Some(P::PathSeparatedPrefix(p)) => {
            if p.contains(['?', '#']) || (p.ends_with('/') && p.len() > 1) {
                return invalid(
                    &path.field("path_separated_prefix"),
                    "must not contain ?, # or end with /",
                );
            }
            PathMatch::SeparatedPrefix(p.clone())
        }
        Some(P::ConnectMatcher(c)) => {
            only(c, &path.field("connect_matcher"), &[], &[])?;
            PathMatch::Connect
        }
        Some(P::PathMatchPolicy(_)) => {
            return err(&path.field("path_match_policy"), ErrorKind::NotSupported);
        }
        None => return err(path, ErrorKind::Required),
    };
    let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
    let pm = match (pm, case_sensitive) {
        (PathMatch::Prefix(p), false) => PathMatch::Prefix(p.to_ascii_lowercase()),
        (other, _) => other,
    };
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        headers.push(header_matcher(h, &path.at("headers", i))?);
    }
    let mut query = Vec::new();
    for (i, q) in m.query_parameters.iter().enumerate() {
        let p = path.at("query_parameters", i);
        only(q, &p, &["name", "string_match", "present_match"], &[])?;
        use r::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let value = match &q.query_parameter_match_specifier {
            Some(Q::StringMatch(s)) => {
                ValueMatch::String(string_matcher(s, &p.field("string_match"))?)
            }
            Some(Q::PresentMatch(true)) | None => ValueMatch::Present,
            Some(Q::PresentMatch(false)) => {
                return invalid(
                    &p.field("present_match"),
                    "present_match: false is not meaningful",
                );
            }
        };
        query.push(QueryMatcher {
            name: q.name.clone(),
            value,
        });
    }
    if let Some(g) = &m.grpc {
        only(g, &path.field("grpc"), &[], &[])?;
    }
    let fraction_ppm = match &m.runtime_fraction {
        Some(rf) => {
            let p = path.field("runtime_fraction");
            only(rf, &p, &["default_value", "runtime_key"], &[])?;
            let d = rf
                .default_value
                .as_ref()
                .map(|v| fraction_ppm(v.numerator, v.denominator))
                .unwrap_or(0);
            Some(d)
        }
        None => None,
    };
    let dynamic_metadata = m
        .dynamic_metadata
        .iter()
        .enumerate()
        .map(|(i, md)| super::rbac::metadata(md, &path.at("dynamic_metadata", i)))
        .collect::<Result<Vec<_>>>()?;
    Ok(RouteMatch {
        path: pm,
        case_sensitive,
        headers,
        query,
        grpc: m.grpc.is_some(),
        fraction_ppm,
        dynamic_metadata,
    })
}

pub(super) fn header_matcher(h: &r::HeaderMatcher, path: &Path) -> Result<HeaderMatcher> {
    only(
        h,
        path,
        &[
            "name",
            "exact_match",
            "safe_regex_match",
            "range_match",
            "present_match",
            "prefix_match",
            "suffix_match",
            "contains_match",
            "string_match",
            "invert_match",
            "treat_missing_header_as_empty",
        ],
        &[],
    )?;
    let lower = h.name.to_ascii_lowercase();
    let pseudo = match lower.as_str() {
        ":authority" | "host" => Some(Pseudo::Authority),
        ":path" => Some(Pseudo::Path),
        ":method" => Some(Pseudo::Method),
        ":scheme" => Some(Pseudo::Scheme),
        n if n.starts_with(':') => {
            return invalid(
                &path.field("name"),
                format!("unknown pseudo-header '{}'", h.name),
            );
        }
        _ => None,
    };
    let name = if pseudo.is_some() {
        http::HeaderName::from_static("x-pingsail-pseudo")
    } else {
        http::HeaderName::from_bytes(lower.as_bytes())
            .or_else(|_| invalid(&path.field("name"), "invalid header name"))?
    };
    use r::header_matcher::HeaderMatchSpecifier as H;
    let s = |k: StringMatch| ValueMatch::String(StringMatcher::new(k, false));
    let mut invert = h.invert_match;
    let value = match &h.header_match_specifier {
        Some(H::ExactMatch(v)) => s(StringMatch::Exact(v.clone())),
        Some(H::SafeRegexMatch(re)) => s(StringMatch::Regex(regex(
            re,
            &path.field("safe_regex_match"),
        )?)),
        Some(H::RangeMatch(rg)) => ValueMatch::Range {
            start: rg.start,
            end: rg.end,
        },
        Some(H::PresentMatch(p)) => {
            if !p {
                invert = !invert;
            }
            ValueMatch::Present
        }
        Some(H::PrefixMatch(v)) => s(StringMatch::Prefix(v.clone())),
        Some(H::SuffixMatch(v)) => s(StringMatch::Suffix(v.clone())),
        Some(H::ContainsMatch(v)) => s(StringMatch::Contains(v.clone())),
        Some(H::StringMatch(m)) => {
            ValueMatch::String(string_matcher(m, &path.field("string_match"))?)
        }
        // No specifier: Envoy treats it as a presence match.
        None => ValueMatch::Present,
    };
    Ok(HeaderMatcher {
        name,
        pseudo,
        value,
        invert,
        missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn route_action(
    ra: &r::RouteAction,
    path: &Path,
    vh_retry: Option<&Arc<RetryPolicy>>,
) -> Result<RouteAction> {
    only(
        ra,
        path,
        &[
            "cluster",
            "cluster_header",
            "weighted_clusters",
            "prefix_rewrite",
            "regex_rewrite",
            "host_rewrite_literal",
            "auto_host_rewrite",
            "timeout",
            "max_stream_duration",
            "retry_policy",
            "hash_policy",
            "request_mirror_policies",
            "cluster_not_found_response_code",
            "upgrade_configs",
            "max_grpc_timeout",
            "grpc_timeout_offset",
            "idle_timeout",
        ],
        &[
            ("hedge_policy", RESILIENCE),
            ("retry_policy_typed_config", RESILIENCE),
            ("rate_limits", "rate limiting"),
            ("internal_redirect_policy", RESILIENCE),
            ("priority", RESILIENCE),
            ("metadata_match", "subset load balancing"),
        ],
    )?;
    use r::route_action::ClusterSpecifier as C;
    let cluster = match &ra.cluster_specifier {
        Some(C::Cluster(c)) => ClusterSpecifier::Cluster(c.as_str().into()),
        Some(C::ClusterHeader(h)) => ClusterSpecifier::Header(
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .or_else(|_| invalid(&path.field("cluster_header"), "invalid header name"))?,
        ),
        Some(C::WeightedClusters(w)) => {
            ClusterSpecifier::Weighted(weighted(w, &path.field("weighted_clusters"))?)
        }
        Some(_) => return err(path, ErrorKind::NotSupported),
        None => return err(&path.field("cluster"), ErrorKind::Required),
    };
    use r::route_action::ClusterNotFoundResponseCode as CNF;
    let cluster_not_found_status = match CNF::try_from(ra.cluster_not_found_response_code) {
        Ok(CNF::ServiceUnavailable) => 503,
        Ok(CNF::NotFound) => 404,
        Ok(CNF::InternalServerError) => 500,
        Err(_) => {
            return invalid(
                &path.field("cluster_not_found_response_code"),
                "unknown code",
            );
        }
    };
    let mut websocket = None;
    let mut connect = None;
    if !ra.upgrade_configs.is_empty() {
        for (i, u) in ra.upgrade_configs.iter().enumerate() {
            let p = path.at("upgrade_configs", i);
            only(u, &p, &["upgrade_type", "enabled", "connect_config"], &[])?;
            let enabled = u.enabled.as_ref().is_none_or(|b| b.value);
            if u.upgrade_type.eq_ignore_ascii_case("CONNECT") {
                if let Some(cc) = &u.connect_config {
                    only(
                        cc,
                        &p.field("connect_config"),
                        &[],
                        &[
                            ("proxy_protocol_config", "PROXY protocol"),
                            ("allow_post", "HTTP/1 POST tunnels"),
                        ],
                    )?;
                }
                connect = Some((enabled, u.connect_config.is_some()));
                continue;
            }
            if u.connect_config.is_some() {
                return invalid(
                    &p.field("connect_config"),
                    "connect_config is only for the CONNECT upgrade",
                );
            }
            if u.upgrade_type.eq_ignore_ascii_case("websocket") {
                websocket = Some(enabled);
            } else {
                return invalid(
                    &p.field("upgrade_type"),
                    format!("unsupported upgrade '{}'", u.upgrade_type),
                );
            }
        }
    }
    use r::route_action::HostRewriteSpecifier as HR;
    let (host_rewrite, auto_host_rewrite) = match &ra.host_rewrite_specifier {
        Some(HR::HostRewriteLiteral(h)) => (Some(h.clone()), false),
        Some(HR::AutoHostRewrite(b)) => (None, b.value),
        Some(_) => return err(path, ErrorKind::NotSupported),
        None => (None, false),
    };
    let regex_rewrite = match &ra.regex_rewrite {
        Some(rr) => {
            let p = path.field("regex_rewrite");
            only(rr, &p, &["pattern", "substitution"], &[])?;
            let Some(pat) = &rr.pattern else {
                return err(&p.field("pattern"), ErrorKind::Required);
            };
            Some((
                regex_unanchored(pat, &p.field("pattern"))?,
                re2_substitution(&rr.substitution),
            ))
        }
        None => None,
    };
    if ra.prefix_rewrite.is_empty() && regex_rewrite.is_none() {
        // nothing
    } else if !ra.prefix_rewrite.is_empty() && regex_rewrite.is_some() {
        return invalid(
            path,
            "prefix_rewrite and regex_rewrite are mutually exclusive",
        );
    }
    let mut grpc_timeout = None;
    // Envoy: when max_stream_duration is present the route timeout is not used at all; its own
    // max_stream_duration (if non-zero) bounds the whole stream.
    let (timeout, max_stream_duration) = match &ra.max_stream_duration {
        Some(msd) => {
            let p = path.field("max_stream_duration");
            only(
                msd,
                &p,
                &[
                    "max_stream_duration",
                    "grpc_timeout_header_max",
                    "grpc_timeout_header_offset",
                ],
                &[],
            )?;
            let d = match &msd.max_stream_duration {
                Some(d) => duration(d, &p.field("max_stream_duration"))?,
                None => Duration::ZERO,
            };
            if msd.grpc_timeout_header_max.is_some() {
                let max = match &msd.grpc_timeout_header_max {
                    Some(m) => duration(m, &p.field("grpc_timeout_header_max"))?,
                    None => Duration::ZERO,
                };
                let offset = match &msd.grpc_timeout_header_offset {
                    Some(o) => duration(o, &p.field("grpc_timeout_header_offset"))?,
                    None => Duration::ZERO,
                };
                grpc_timeout = Some(GrpcTimeout {
                    max: (!max.is_zero()).then_some(max),
                    offset,
                });
            } else if msd.grpc_timeout_header_offset.is_some() {
                return err(
                    &p.field("grpc_timeout_header_offset"),
                    ErrorKind::NotYet(RESILIENCE),
                );
            }
            (None, (!d.is_zero()).then_some(d))
        }
        None => {
            let t = match &ra.timeout {
                Some(t) => duration(t, &path.field("timeout"))?,
                None => Duration::from_secs(15),
            };
            ((!t.is_zero()).then_some(t), None)
        }
    };
    // The older `max_grpc_timeout` / `grpc_timeout_offset` (istiod still sets `max_grpc_timeout: 0s`)
    // apply when max_stream_duration does not configure the grpc-timeout header itself.
    if grpc_timeout.is_none()
        && let Some(m) = &ra.max_grpc_timeout
    {
        let max = duration(m, &path.field("max_grpc_timeout"))?;
        let offset = match &ra.grpc_timeout_offset {
            Some(o) => duration(o, &path.field("grpc_timeout_offset"))?,
            None => Duration::ZERO,
        };
        grpc_timeout = Some(GrpcTimeout {
            max: (!max.is_zero()).then_some(max),
            offset,
        });
    }
    let retry = match &ra.retry_policy {
        Some(p) => Some(Arc::new(retry_policy(p, &path.field("retry_policy"))?)),
        None => vh_retry.cloned(),
    };
    let mut hash_policy = Vec::new();
    for (i, h) in ra.hash_policy.iter().enumerate() {
        let p = path.at("hash_policy", i);
        only(
            h,
            &p,
            &[
                "header",
                "cookie",
                "connection_properties",
                "query_parameter",
                "terminal",
            ],
            &[],
        )?;
        use r::route_action::hash_policy::PolicySpecifier as HP;
        let kind = match &h.policy_specifier {
            Some(HP::Header(hh)) => {
                only(hh, &p.field("header"), &["header_name"], &[])?;
                HashKind::Header(
                    http::HeaderName::from_bytes(hh.header_name.to_ascii_lowercase().as_bytes())
                        .or_else(|_| {
                            invalid(
                                &p.field("header").field("header_name"),
                                "invalid header name",
                            )
                        })?,
                )
            }
            Some(HP::Cookie(c)) => {
                only(
                    c,
                    &p.field("cookie"),
                    &["name"],
                    &[("ttl", RESILIENCE), ("path", RESILIENCE)],
                )?;
                HashKind::Cookie(c.name.clone())
            }
            Some(HP::ConnectionProperties(cp)) => {
                only(cp, &p.field("connection_properties"), &["source_ip"], &[])?;
                if !cp.source_ip {
                    return invalid(
                        &p.field("connection_properties").field("source_ip"),
                        "must be true",
                    );
                }
                HashKind::SourceIp
            }
            Some(HP::QueryParameter(q)) => {
                only(q, &p.field("query_parameter"), &["name"], &[])?;
                HashKind::QueryParameter(q.name.clone())
            }
            Some(HP::FilterState(_)) => {
                return err(&p.field("filter_state"), ErrorKind::NotSupported);
            }
            None => return err(&p, ErrorKind::Required),
        };
        hash_policy.push(HashPolicy {
            kind,
            terminal: h.terminal,
        });
    }
    let mut mirrors = Vec::new();
    for (i, mp) in ra.request_mirror_policies.iter().enumerate() {
        let p = path.at("request_mirror_policies", i);
        only(
            mp,
            &p,
            &["cluster", "runtime_fraction", "trace_sampled"],
            &[],
        )?;
        let ppm = mp
            .runtime_fraction
            .as_ref()
            .and_then(|rf| rf.default_value.as_ref())
            .map(|v| fraction_ppm(v.numerator, v.denominator))
            .unwrap_or(1_000_000);
        if mp.cluster.is_empty() {
            return err(&p.field("cluster"), ErrorKind::Required);
        }
        mirrors.push((mp.cluster.as_str().into(), ppm));
    }
    Ok(RouteAction {
        cluster,
        prefix_rewrite: (!ra.prefix_rewrite.is_empty()).then(|| ra.prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite,
        auto_host_rewrite,
        timeout,
        max_stream_duration,
        retry_policy: retry,
        hash_policy,
        mirrors,
        grpc_timeout,
        cluster_not_found_status,
        websocket,
        connect,
        connect_authority: None,
        idle_timeout: match &ra.idle_timeout {
            Some(d) => {
                let d = duration(d, &path.field("idle_timeout"))?;
                Some((!d.is_zero()).then_some(d))
            }
            None => None,
        },
    })
}

/// RE2 substitutions use `\1`; the regex crate uses `${1}`.
fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                out.push_str("${");
                if let Some(d) = chars.next() {
                    out.push(d);
                }
                out.push('}');
            }
            '\\' if chars.peek() == Some(&'\\') => {
                chars.next();
                out.push('\\');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn weighted(w: &r::WeightedCluster, path: &Path) -> Result<WeightedClusters> {
    only(
        w,
        path,
        &["clusters", "total_weight"],
        &[
            ("runtime_key_prefix", "runtime"),
            ("header_name", RESILIENCE),
            ("use_hash_policy", RESILIENCE),
        ],
    )?;
    let mut clusters = Vec::new();
    let mut total = 0u64;
    for (i, c) in w.clusters.iter().enumerate() {
        let p = path.at("clusters", i);
        only(
            c,
            &p,
            &[
                "name",
                "weight",
                "request_headers_to_add",
                "request_headers_to_remove",
                "response_headers_to_add",
                "response_headers_to_remove",
                "host_rewrite_literal",
            ],
            &[
                ("typed_per_filter_config", AUTHZ),
                ("metadata_match", "subset load balancing"),
                ("cluster_header", RESILIENCE),
            ],
        )?;
        if c.name.is_empty() {
            return err(&p.field("name"), ErrorKind::Required);
        }
        let weight = u64::from(c.weight.as_ref().map(|v| v.value).unwrap_or(0));
        total += weight;
        use r::weighted_cluster::cluster_weight::HostRewriteSpecifier as HR;
        clusters.push(WeightedCluster {
            name: c.name.as_str().into(),
            weight,
            request_headers: header_ops(
                &c.request_headers_to_add,
                &c.request_headers_to_remove,
                &p,
                "request_headers_to_add",
                "request_headers_to_remove",
            )?,
            response_headers: header_ops(
                &c.response_headers_to_add,
                &c.response_headers_to_remove,
                &p,
                "response_headers_to_add",
                "response_headers_to_remove",
            )?,
            host_rewrite: c
                .host_rewrite_specifier
                .as_ref()
                .map(|HR::HostRewriteLiteral(h)| h.clone()),
        });
    }
    if clusters.is_empty() {
        return err(&path.field("clusters"), ErrorKind::Required);
    }
    if let Some(t) = &w.total_weight
        && u64::from(t.value) != total
        && t.value > 0
    {
        return invalid(
            &path.field("total_weight"),
            format!("sum of weights {total} != total_weight {}", t.value),
        );
    }
    if total == 0 {
        return invalid(path, "sum of weights must be greater than 0");
    }
    Ok(WeightedClusters { clusters, total })
}

fn retry_policy(p: &r::RetryPolicy, path: &Path) -> Result<RetryPolicy> {
    only(
        p,
        path,
        &[
            "retry_on",
            "num_retries",
            "retriable_status_codes",
            "retry_host_predicate",
            "host_selection_retry_max_attempts",
            "retry_back_off",
            "per_try_timeout",
            "per_try_idle_timeout",
            "retriable_headers",
            "retriable_request_headers",
            "rate_limited_retry_back_off",
            "retry_priority",
        ],
        &[("retry_options_predicates", RESILIENCE)],
    )?;
    // previous_priorities only moves retries between endpoint priorities; every endpoint here is
    // priority 0 (others are refused), where Envoy's load stays on P0: validated, no effect.
    if let Some(rp) = &p.retry_priority {
        let pp = path.field("retry_priority");
        const PREVIOUS: &str =
            "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig";
        match &rp.config_type {
            Some(r::retry_policy::retry_priority::ConfigType::TypedConfig(a)) => {
                let tp = pp.field("typed_config");
                match type_name(&a.type_url) {
                    PREVIOUS => {
                        let c: envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig =
                            unpack(a, &tp)?;
                        if c.update_frequency <= 0 {
                            return invalid(
                                &tp.field("update_frequency"),
                                format!("value must be greater than 0, got {}", c.update_frequency),
                            );
                        }
                    }
                    other => return err(&tp, ErrorKind::UnknownType(other.to_string())),
                }
            }
            None => return err(&pp.field("typed_config"), ErrorKind::Required),
        }
    }
    let rate_limited = match &p.rate_limited_retry_back_off {
        Some(b) => {
            use pingsail_filters::retry::ResetFormat;
            use r::retry_policy::ResetHeaderFormat as F;
            let bp = path.field("rate_limited_retry_back_off");
            only(b, &bp, &["reset_headers", "max_interval"], &[])?;
            if b.reset_headers.is_empty() {
                return invalid(
                    &bp.field("reset_headers"),
                    "value must contain at least 1 item",
                );
            }
            let mut reset_headers = Vec::new();
            for (i, h) in b.reset_headers.iter().enumerate() {
                let hp = bp.at("reset_headers", i);
                let name = http::HeaderName::from_bytes(h.name.as_bytes())
                    .or_else(|_| invalid(&hp.field("name"), "invalid header name"))?;
                let format = match F::try_from(h.format) {
                    Ok(F::Seconds) => ResetFormat::Seconds,
                    Ok(F::UnixTimestamp) => ResetFormat::UnixTimestamp,
                    Err(_) => return invalid(&hp.field("format"), "unknown format"),
                };
                reset_headers.push((name, format));
            }
            let max_interval = match &b.max_interval {
                Some(d) => duration(d, &bp.field("max_interval"))?,
                None => Duration::from_secs(300),
            };
            Some(pingsail_filters::retry::RateLimitedBackOff {
                reset_headers,
                max_interval,
            })
        }
        None => None,
    };
    let opt_dur = |d: &Option<envoy_types::pb::google::protobuf::Duration>,
                   f: &str|
     -> Result<Option<Duration>> {
        match d {
            Some(d) => {
                let d = duration(d, &path.field(f))?;
                Ok((!d.is_zero()).then_some(d))
            }
            None => Ok(None),
        }
    };
    let per_try_timeout = opt_dur(&p.per_try_timeout, "per_try_timeout")?;
    let per_try_idle_timeout = opt_dur(&p.per_try_idle_timeout, "per_try_idle_timeout")?;
    let mut retriable_headers = Vec::new();
    for (i, h) in p.retriable_headers.iter().enumerate() {
        retriable_headers.push(header_matcher(h, &path.at("retriable_headers", i))?);
    }
    let mut retriable_request_headers = Vec::new();
    for (i, h) in p.retriable_request_headers.iter().enumerate() {
        retriable_request_headers
            .push(header_matcher(h, &path.at("retriable_request_headers", i))?);
    }
    let on = RetryOn::parse(&p.retry_on).or_else(|t| {
        invalid(
            &path.field("retry_on"),
            format!("unknown retry condition '{t}'"),
        )
    })?;
    let mut previous_hosts = false;
    for (i, hp) in p.retry_host_predicate.iter().enumerate() {
        let pp = path.at("retry_host_predicate", i);
        let tn = hp.config_type.as_ref().map(|c| match c {
            r::retry_policy::retry_host_predicate::ConfigType::TypedConfig(a) => {
                type_name(&a.type_url).to_string()
            }
        });
        match (hp.name.as_str(), tn.as_deref()) {
            (_, Some("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"))
            | ("envoy.retry_host_predicates.previous_hosts", None) => previous_hosts = true,
            (_, Some(other)) => {
                return err(
                    &pp.field("typed_config"),
                    ErrorKind::UnknownType(other.to_string()),
                );
            }
            (name, None) => {
                return invalid(
                    &pp.field("name"),
                    format!("unknown retry host predicate '{name}'"),
                );
            }
        }
    }
    let mut codes = Vec::new();
    for (i, c) in p.retriable_status_codes.iter().enumerate() {
        codes.push(
            u16::try_from(*c)
                .or_else(|_| invalid(&path.at("retriable_status_codes", i), "invalid status"))?,
        );
    }
    let (base, max) = match &p.retry_back_off {
        Some(b) => {
            let bp = path.field("retry_back_off");
            only(b, &bp, &["base_interval", "max_interval"], &[])?;
            let base = match &b.base_interval {
                Some(d) => duration(d, &bp.field("base_interval"))?,
                None => return err(&bp.field("base_interval"), ErrorKind::Required),
            };
            let max = match &b.max_interval {
                Some(d) => duration(d, &bp.field("max_interval"))?,
                None => base * 10,
            };
            (base, max)
        }
        None => (Duration::from_millis(25), Duration::from_millis(250)),
    };
    Ok(RetryPolicy {
        rate_limited,
        on,
        num_retries: p.num_retries.as_ref().map(|v| v.value).unwrap_or(1),
        retriable_status_codes: codes,
        previous_hosts,
        host_selection_max_attempts: u32::try_from(p.host_selection_retry_max_attempts)
            .unwrap_or(1)
            .max(1),
        backoff_base: base,
        backoff_max: max,
        per_try_timeout,
        per_try_idle_timeout,
        retriable_headers,
        retriable_request_headers,
    })
}

fn redirect(rd: &r::RedirectAction, path: &Path) -> Result<Redirect> {
    only(
        rd,
        path,
        &[
            "https_redirect",
            "scheme_redirect",
            "host_redirect",
            "port_redirect",
            "path_redirect",
            "prefix_rewrite",
            "regex_rewrite",
            "response_code",
            "strip_query",
        ],
        &[],
    )?;
    use r::redirect_action::PathRewriteSpecifier as PR;
    use r::redirect_action::RedirectResponseCode as RC;
    use r::redirect_action::SchemeRewriteSpecifier as SR;
    let scheme = match &rd.scheme_rewrite_specifier {
        Some(SR::HttpsRedirect(true)) => Some("https".to_string()),
        Some(SR::HttpsRedirect(false)) | None => None,
        Some(SR::SchemeRedirect(s)) => Some(s.to_ascii_lowercase()),
    };
    let path_kind = match &rd.path_rewrite_specifier {
        Some(PR::PathRedirect(p)) => RedirectPath::Replace(p.clone()),
        Some(PR::PrefixRewrite(p)) => RedirectPath::Prefix(p.clone()),
        Some(PR::RegexRewrite(rr)) => {
            let p = path.field("regex_rewrite");
            let Some(pat) = &rr.pattern else {
                return err(&p.field("pattern"), ErrorKind::Required);
            };
            RedirectPath::Regex(
                regex_unanchored(pat, &p.field("pattern"))?,
                re2_substitution(&rr.substitution),
            )
        }
        Some(PR::PathRewrite(_)) => {
            return err(&path.field("path_rewrite"), ErrorKind::NotSupported);
        }
        None => RedirectPath::Keep,
    };
    let status = match RC::try_from(rd.response_code) {
        Ok(RC::MovedPermanently) => 301,
        Ok(RC::Found) => 302,
        Ok(RC::SeeOther) => 303,
        Ok(RC::TemporaryRedirect) => 307,
        Ok(RC::PermanentRedirect) => 308,
        Err(_) => return invalid(&path.field("response_code"), "unknown response code"),
    };
    Ok(Redirect {
        scheme,
        host: (!rd.host_redirect.is_empty()).then(|| rd.host_redirect.clone()),
        port: match rd.port_redirect {
            0 => None,
            p => Some(
                u16::try_from(p)
                    .or_else(|_| invalid(&path.field("port_redirect"), "port out of range"))?,
            ),
        },
        path: path_kind,
        status,
        strip_query: rd.strip_query,
    })
}

fn direct(d: &r::DirectResponseAction, path: &Path) -> Result<DirectResponse> {
    only(
        d,
        path,
        &["status", "body"],
        &[("body_format", "telemetry issue")],
    )?;
    if !(200..600).contains(&d.status) {
        return invalid(
            &path.field("status"),
            format!("status {} out of range [200, 600)", d.status),
        );
    }
    let body = match &d.body {
        Some(ds) => {
            let p = path.field("body");
            use envoy_types::pb::envoy::config::core::v3::data_source::Specifier as S;
            match &ds.specifier {
                Some(S::InlineString(s)) => Some(Arc::from(s.as_bytes())),
                Some(S::InlineBytes(b)) => Some(Arc::from(b.as_slice())),
                Some(S::Filename(f)) => Some(Arc::from(
                    std::fs::read(f)
                        .or_else(|e| invalid(&p.field("filename"), format!("{f}: {e}")))?
                        .as_slice(),
                )),
                Some(S::EnvironmentVariable(v)) => Some(Arc::from(
                    std::env::var(v)
                        .or_else(|_| {
                            invalid(&p.field("environment_variable"), format!("{v} is not set"))
                        })?
                        .as_bytes(),
                )),
                None => None,
            }
        }
        None => None,
    };
    Ok(DirectResponse {
        status: d.status as u16,
        body,
    })
}
