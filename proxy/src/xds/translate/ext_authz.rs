// SPDX-License-Identifier: Apache-2.0
//! `envoy.filters.http.ext_authz` with an HTTP authorization service → [`HttpExtAuthz`].

// `authorization_request.allowed_headers` is deprecated for the top-level field; both are honoured.
#![allow(deprecated)]

use super::common::*;
use crate::authz::HttpExtAuthz;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3 as pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as m;
use pingsail_filters::matcher::StringMatcher;

const GRPC: &str = "ext_authz over gRPC: authorization issue";

/// Translates the filter (HTTP service only).
pub fn ext_authz(e: &pb::ExtAuthz, name: &str, path: &Path) -> Result<HttpExtAuthz> {
    only(
        e,
        path,
        &[
            "http_service",
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
        &[
            ("grpc_service", GRPC),
            (
                "with_request_body",
                "ext_authz request bodies: authorization issue",
            ),
        ],
    )?;
    use pb::ext_authz::Services as S;
    let h = match &e.services {
        Some(S::HttpService(h)) => h,
        Some(S::GrpcService(_)) => {
            return err(&path.field("grpc_service"), ErrorKind::NotYet(GRPC));
        }
        None => return err(&path.field("http_service"), ErrorKind::Required),
    };
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

/// `ExtAuthzPerRoute`: only `disabled: true` (check settings belong to the gRPC service).
pub fn ext_authz_per_route(r: &pb::ExtAuthzPerRoute, path: &Path) -> Result<bool> {
    only(r, path, &["disabled"], &[("check_settings", GRPC)])?;
    use pb::ext_authz_per_route::Override as O;
    match &r.r#override {
        Some(O::Disabled(true)) => Ok(true),
        Some(O::Disabled(false)) => invalid(&path.field("disabled"), "must be true"),
        Some(O::CheckSettings(_)) => err(&path.field("check_settings"), ErrorKind::NotYet(GRPC)),
        None => err(path, ErrorKind::Required),
    }
}
