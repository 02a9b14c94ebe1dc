// SPDX-License-Identifier: Apache-2.0
//! `envoy.filters.http.ext_authz` (HTTP or gRPC authorization service) → [`HttpExtAuthz`], and
//! `envoy.filters.network.ext_authz` → [`NetworkExtAuthz`].

// `authorization_request.allowed_headers` is deprecated for the top-level field; both are honoured.
#![allow(deprecated)]

use super::common::*;
use crate::authz::{
    ExtAuthzBody, ExtAuthzStats, GrpcAuthz, HttpExtAuthz, NetworkExtAuthz, NetworkExtAuthzStats,
};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3 as pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as m;
use pingsail_filters::matcher::StringMatcher;

/// Envoy's ext_authz timeout when `grpc_service.timeout` is unset.
const DEFAULT_GRPC_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

/// A `GrpcService` with an `envoy_grpc` target.
fn grpc_service(g: &core::GrpcService, path: &Path) -> Result<GrpcAuthz> {
    only(g, path, &["envoy_grpc", "timeout", "initial_metadata"], &[])?;
    use core::grpc_service::TargetSpecifier as T;
    let e = match &g.target_specifier {
        Some(T::EnvoyGrpc(e)) => e,
        Some(T::GoogleGrpc(_)) => return err(&path.field("google_grpc"), ErrorKind::NotSupported),
        None => return err(&path.field("envoy_grpc"), ErrorKind::Required),
    };
    let ep = path.field("envoy_grpc");
    only(e, &ep, &["cluster_name", "authority"], &[])?;
    if e.cluster_name.is_empty() {
        return err(&ep.field("cluster_name"), ErrorKind::Required);
    }
    let authority = if e.authority.is_empty() {
        e.cluster_name.clone()
    } else {
        e.authority.clone()
    };
    let timeout = match &g.timeout {
        Some(t) => duration(t, &path.field("timeout"))?,
        None => DEFAULT_GRPC_TIMEOUT,
    };
    let mut initial_metadata = Vec::new();
    for (i, hv) in g.initial_metadata.iter().enumerate() {
        let p = path.at("initial_metadata", i);
        only(hv, &p, &["key", "value"], &[])?;
        let n = http::HeaderName::from_bytes(hv.key.to_ascii_lowercase().as_bytes())
            .or_else(|_| invalid(&p.field("key"), "invalid header name"))?;
        let v = http::HeaderValue::from_str(&hv.value)
            .or_else(|_| invalid(&p.field("value"), "invalid header value"))?;
        initial_metadata.push((n, v));
    }
    Ok(GrpcAuthz::new(
        e.cluster_name.clone(),
        authority,
        timeout,
        initial_metadata,
    ))
}

/// Translates the HTTP filter of a connection manager whose counters start with `hcm_prefix`.
pub fn ext_authz(
    e: &pb::ExtAuthz,
    name: &str,
    hcm_prefix: &str,
    path: &Path,
) -> Result<HttpExtAuthz> {
    only(
        e,
        path,
        &[
            "http_service",
            "grpc_service",
            "with_request_body",
            "metadata_context_namespaces",
            "transport_api_version",
            "failure_mode_allow",
            "failure_mode_allow_header_add",
            "status_on_error",
            "filter_enabled_metadata",
            "stat_prefix",
            "clear_route_cache",
            "include_peer_certificate",
            "allowed_headers",
        ],
        &[],
    )?;
    let status_on_error = match &e.status_on_error {
        Some(s) => {
            only(s, &path.field("status_on_error"), &["code"], &[])?;
            u16::try_from(s.code)
                .ok()
                .filter(|c| (200..600).contains(c))
                .unwrap_or(403)
        }
        None => 403,
    };
    let enabled_metadata = match &e.filter_enabled_metadata {
        Some(md) => Some(super::rbac::metadata(
            md,
            &path.field("filter_enabled_metadata"),
        )?),
        None => None,
    };
    let with_body = match &e.with_request_body {
        Some(b) => {
            only(
                b,
                &path.field("with_request_body"),
                &[
                    "max_request_bytes",
                    "allow_partial_message",
                    "pack_as_bytes",
                ],
                &[],
            )?;
            Some(ExtAuthzBody {
                max_bytes: b.max_request_bytes as usize,
                allow_partial: b.allow_partial_message,
                as_bytes: b.pack_as_bytes,
            })
        }
        None => None,
    };
    use pb::ext_authz::Services as S;
    let h = match &e.services {
        Some(S::HttpService(h)) => h,
        Some(S::GrpcService(g)) => {
            let grpc = grpc_service(g, &path.field("grpc_service"))?;
            return Ok(HttpExtAuthz {
                name: name.into(),
                cluster: grpc.cluster.clone(),
                timeout: grpc.timeout,
                path_prefix: String::new(),
                allowed_headers: None,
                headers_to_add: Vec::new(),
                upstream_headers: Vec::new(),
                upstream_headers_append: Vec::new(),
                client_headers: None,
                failure_mode_allow: e.failure_mode_allow,
                failure_mode_allow_header_add: e.failure_mode_allow_header_add,
                status_on_error,
                enabled_metadata,
                grpc: Some(grpc),
                with_body,
                metadata_namespaces: e.metadata_context_namespaces.clone(),
                include_peer_certificate: e.include_peer_certificate,
                clear_route_cache: e.clear_route_cache,
                stats: ExtAuthzStats::new(hcm_prefix, &e.stat_prefix),
            });
        }
        None => return err(&path.field("http_service"), ErrorKind::Required),
    };
    if with_body.is_some() {
        return err(
            &path.field("with_request_body"),
            ErrorKind::NotYet("request bodies to an HTTP authorization service"),
        );
    }
    let hp = path.field("http_service");
    only(
        h,
        &hp,
        &[
            "server_uri",
            "path_prefix",
            "authorization_request",
            "authorization_response",
        ],
        &[],
    )?;
    let Some(u) = &h.server_uri else {
        return err(&hp.field("server_uri"), ErrorKind::Required);
    };
    let up = hp.field("server_uri");
    only(u, &up, &["uri", "cluster", "timeout"], &[])?;
    use core::http_uri::HttpUpstreamType as U;
    let cluster = match &u.http_upstream_type {
        Some(U::Cluster(c)) if !c.is_empty() => c.clone(),
        _ => return err(&up.field("cluster"), ErrorKind::Required),
    };
    let timeout = match &u.timeout {
        Some(t) => duration(t, &up.field("timeout"))?,
        None => return err(&up.field("timeout"), ErrorKind::Required),
    };
    let mut allowed_headers = match &e.allowed_headers {
        Some(l) => Some(list(l, &path.field("allowed_headers"))?),
        None => None,
    };
    let mut headers_to_add = Vec::new();
    if let Some(r) = &h.authorization_request {
        let rp = hp.field("authorization_request");
        only(r, &rp, &["allowed_headers", "headers_to_add"], &[])?;
        if let Some(l) = &r.allowed_headers {
            allowed_headers = Some(list(l, &rp.field("allowed_headers"))?);
        }
        for (i, hv) in r.headers_to_add.iter().enumerate() {
            let p = rp.at("headers_to_add", i);
            only(hv, &p, &["key", "value"], &[])?;
            let n = http::HeaderName::from_bytes(hv.key.to_ascii_lowercase().as_bytes())
                .or_else(|_| invalid(&p.field("key"), "invalid header name"))?;
            let v = http::HeaderValue::from_str(&hv.value)
                .or_else(|_| invalid(&p.field("value"), "invalid header value"))?;
            headers_to_add.push((n, v));
        }
    }
    let (mut upstream_headers, mut upstream_headers_append, mut client_headers) =
        (Vec::new(), Vec::new(), None);
    if let Some(r) = &h.authorization_response {
        let rp = hp.field("authorization_response");
        only(
            r,
            &rp,
            &[
                "allowed_upstream_headers",
                "allowed_upstream_headers_to_append",
                "allowed_client_headers",
            ],
            &[],
        )?;
        if let Some(l) = &r.allowed_upstream_headers {
            upstream_headers = list(l, &rp.field("allowed_upstream_headers"))?;
        }
        if let Some(l) = &r.allowed_upstream_headers_to_append {
            upstream_headers_append = list(l, &rp.field("allowed_upstream_headers_to_append"))?;
        }
        if let Some(l) = &r.allowed_client_headers {
            client_headers = Some(list(l, &rp.field("allowed_client_headers"))?);
        }
    }
    Ok(HttpExtAuthz {
        name: name.into(),
        cluster,
        timeout,
        path_prefix: h.path_prefix.clone(),
        allowed_headers,
        headers_to_add,
        upstream_headers,
        upstream_headers_append,
        client_headers,
        failure_mode_allow: e.failure_mode_allow,
        failure_mode_allow_header_add: e.failure_mode_allow_header_add,
        status_on_error,
        enabled_metadata,
        grpc: None,
        with_body: None,
        metadata_namespaces: e.metadata_context_namespaces.clone(),
        include_peer_certificate: e.include_peer_certificate,
        clear_route_cache: e.clear_route_cache,
        stats: ExtAuthzStats::new(hcm_prefix, &e.stat_prefix),
    })
}

/// Translates the network filter (`envoy.filters.network.ext_authz`, gRPC only).
pub fn network_ext_authz(
    e: &envoy_types::pb::envoy::extensions::filters::network::ext_authz::v3::ExtAuthz,
    path: &Path,
) -> Result<NetworkExtAuthz> {
    only(
        e,
        path,
        &[
            "stat_prefix",
            "grpc_service",
            "failure_mode_allow",
            "include_peer_certificate",
            "transport_api_version",
            "filter_enabled_metadata",
        ],
        &[],
    )?;
    let Some(g) = &e.grpc_service else {
        return err(&path.field("grpc_service"), ErrorKind::Required);
    };
    let enabled_metadata = match &e.filter_enabled_metadata {
        Some(md) => Some(super::rbac::metadata(
            md,
            &path.field("filter_enabled_metadata"),
        )?),
        None => None,
    };
    Ok(NetworkExtAuthz {
        grpc: grpc_service(g, &path.field("grpc_service"))?,
        failure_mode_allow: e.failure_mode_allow,
        include_peer_certificate: e.include_peer_certificate,
        enabled_metadata,
        stats: NetworkExtAuthzStats::new(&e.stat_prefix),
    })
}

fn list(l: &m::ListStringMatcher, path: &Path) -> Result<Vec<StringMatcher>> {
    only(l, path, &["patterns"], &[])?;
    l.patterns
        .iter()
        .enumerate()
        .map(|(i, s)| string_matcher(s, &path.at("patterns", i)))
        .collect()
}

/// `ExtAuthzPerRoute`.
pub enum PerRouteExtAuthz {
    /// `disabled: true`
    Disabled,
    /// `check_settings.context_extensions`, sorted by key
    Context(Vec<(String, String)>),
}

/// `ExtAuthzPerRoute`: `disabled: true` or `check_settings.context_extensions`.
pub fn ext_authz_per_route(r: &pb::ExtAuthzPerRoute, path: &Path) -> Result<PerRouteExtAuthz> {
    only(r, path, &["disabled", "check_settings"], &[])?;
    use pb::ext_authz_per_route::Override as O;
    match &r.r#override {
        Some(O::Disabled(true)) => Ok(PerRouteExtAuthz::Disabled),
        Some(O::Disabled(false)) => invalid(&path.field("disabled"), "must be true"),
        Some(O::CheckSettings(c)) => {
            only(
                c,
                &path.field("check_settings"),
                &["context_extensions"],
                &[],
            )?;
            let mut v: Vec<(String, String)> = c
                .context_extensions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            v.sort();
            Ok(PerRouteExtAuthz::Context(v))
        }
        None => err(path, ErrorKind::Required),
    }
}
