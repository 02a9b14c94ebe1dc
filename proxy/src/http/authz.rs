// SPDX-License-Identifier: Apache-2.0
//! Runs the connection manager's jwt_authn and rbac filters on a request, in chain order, after
//! route selection (per-route configs need the route) and before CORS and the router.

use super::error::Failure;
use super::{ConnFacts, RequestCtx, Router, authority, forwarded, is_grpc};
use crate::authz::{HttpAuthz, HttpExtAuthz, HttpJwt, HttpRbac, PEER_PRINCIPAL_KEY};
use http::{HeaderName, HeaderValue};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_proxy::Session;
use pingsail_filters::jwt::{self, RemoteJwks, TokenSource};
use pingsail_filters::metadata::Value;
use pingsail_filters::rbac::{Input, PerRoute};
use pingsail_filters::route::{PerFilterAuthz, RequestView, RouteTable};
use std::time::Instant;

use crate::authz::{ExtAuthzBody, ExtAuthzStats as S, check_peer};
use envoy_types::pb::envoy::config::core::v3::{HeaderValueOption, Metadata};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, OkHttpResponse,
};
use pingsail_filters::route::{Action as RouteAction, ClusterSpecifier};

/// Largest JWKS document we accept.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Dynamic metadata namespace of the HTTP ext_authz filter.
const EXT_AUTHZ_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// Most request body bytes buffered for an authorization check (Pingora keeps a copy of what was
/// read to send upstream, up to 64 KiB).
const MAX_CHECK_BODY: usize = 60 * 1024;

/// How an ext_authz header mutation applies (`HeaderValueOption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Append,
    AddIfAbsent,
    Overwrite,
    OverwriteIfExists,
}

impl Action {
    /// The deprecated `append` wins when set; otherwise `append_action`.
    #[allow(deprecated)]
    fn of(h: &HeaderValueOption) -> Action {
        match h.append {
            Some(b) if b.value => Action::Append,
            Some(_) => Action::Overwrite,
            None => match h.append_action {
                1 => Action::AddIfAbsent,
                2 => Action::Overwrite,
                3 => Action::OverwriteIfExists,
                _ => Action::Append,
            },
        }
    }
}

/// One `response_headers_to_add` entry of an ext_authz OK response.
#[derive(Debug, Clone)]
pub(super) struct ResponseHeader {
    name: HeaderName,
    value: HeaderValue,
    action: Action,
}

impl ResponseHeader {
    fn from_option(h: &HeaderValueOption) -> Option<Self> {
        let (name, value) = header_pair(h)?;
        Some(ResponseHeader {
            name,
            value,
            action: Action::of(h),
        })
    }
}

fn header_pair(h: &HeaderValueOption) -> Option<(HeaderName, HeaderValue)> {
    let hv = h.header.as_ref()?;
    let name = HeaderName::from_bytes(hv.key.to_ascii_lowercase().as_bytes()).ok()?;
    let raw = if hv.raw_value.is_empty() {
        hv.value.as_bytes()
    } else {
        hv.raw_value.as_slice()
    };
    let value = HeaderValue::from_bytes(raw).ok()?;
    Some((name, value))
}

/// Applies the OK response's `response_headers_to_add` to a response.
pub(super) fn apply_response_headers(
    list: &[ResponseHeader],
    resp: &mut pingora_http::ResponseHeader,
) {
    for h in list {
        let present = resp.headers.contains_key(&h.name);
        let _ = match h.action {
            Action::Append => resp
                .append_header(h.name.clone(), h.value.clone())
                .map(|_| ()),
            Action::AddIfAbsent if present => Ok(()),
            Action::OverwriteIfExists if !present => Ok(()),
            _ => resp.insert_header(h.name.clone(), h.value.clone()),
        };
    }
}

/// Status, headers and body of a denied (or error) response; `fallback` when no status is set.
fn denied_parts(
    d: &envoy_types::pb::envoy::service::auth::v3::DeniedHttpResponse,
    fallback: u16,
) -> (u16, Vec<(HeaderName, HeaderValue)>, String) {
    let status = d
        .status
        .as_ref()
        .and_then(|s| u16::try_from(s.code).ok())
        .filter(|c| (200..600).contains(c))
        .unwrap_or(fallback);
    let headers = d.headers.iter().filter_map(header_pair).collect();
    (status, headers, d.body.clone())
}

/// Applies an OK response to the request: headers set/appended/removed, query parameters.
fn apply_ok(req: &mut pingora_http::RequestHeader, o: &OkHttpResponse) -> Result<()> {
    for h in &o.headers {
        let Some((name, value)) = header_pair(h) else {
            continue;
        };
        // Envoy appends only with the deprecated `append: true`, and only to a header that is
        // there (joined into its value with `,`); every `append_action` (APPEND_IF_EXISTS_OR_ADD
        // included) sets the request header.
        #[allow(deprecated)]
        let append = h.append.is_some_and(|b| b.value);
        if !append {
            req.insert_header(name, value)?;
        } else if let Some(cur) = req.headers.get(&name) {
            let mut joined = cur.as_bytes().to_vec();
            joined.push(b',');
            joined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                req.insert_header(name, v)?;
            }
        }
    }
    for n in &o.headers_to_remove {
        let n = n.to_ascii_lowercase();
        if n.starts_with(':') || n == "host" {
            continue;
        }
        req.remove_header(n.as_str());
    }
    if o.query_parameters_to_set.is_empty() && o.query_parameters_to_remove.is_empty() {
        return Ok(());
    }
    let raw = String::from_utf8_lossy(req.raw_path()).into_owned();
    let (path, query) = raw.split_once('?').unwrap_or((raw.as_str(), ""));
    // Envoy rebuilds the query from its parameters ordered by name.
    let mut params: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    for k in &o.query_parameters_to_remove {
        params.remove(k);
    }
    for q in &o.query_parameters_to_set {
        params.insert(q.key.clone(), vec![q.value.clone()]);
    }
    let mut new = path.to_owned();
    let mut sep = '?';
    for (k, vs) in &params {
        for v in vs {
            new.push(sep);
            new.push_str(k);
            new.push('=');
            new.push_str(v);
            sep = '&';
        }
    }
    req.set_raw_path(new.as_bytes())?;
    Ok(())
}

/// Dynamic metadata namespace of the HTTP RBAC filter.
const RBAC_NAMESPACE: &str = "envoy.filters.http.rbac";

fn view<'a>(req: &'a pingora_http::RequestHeader) -> RequestView<'a> {
    RequestView {
        path: std::str::from_utf8(req.raw_path()).unwrap_or("/"),
        method: req.method.as_str(),
        authority: authority(req),
        scheme: "http",
        headers: &req.headers,
        is_grpc: is_grpc(req),
        random: 0,
    }
}

fn is_cors_preflight(req: &pingora_http::RequestHeader) -> bool {
    req.method == http::Method::OPTIONS
        && req.headers.contains_key(http::header::ORIGIN)
        && req
            .headers
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

impl Router {
    /// Runs the authorization filters. `Ok(true)` = a local reply was sent. A jwt_authn provider
    /// with `clear_route_cache` whose token verified makes the route be chosen again (`ridx`), now
    /// with the dynamic metadata it wrote.
    pub(super) async fn authorize(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        facts: &ConnFacts,
        table: &RouteTable,
        vidx: usize,
        ridx: &mut Option<usize>,
    ) -> Result<bool> {
        let vh = table.vhosts.get(vidx);
        for f in &facts.hcm.authz {
            let route = ridx.and_then(|i| vh?.routes.get(i));
            let levels: [Option<&PerFilterAuthz>; 2] =
                [route.map(|r| &r.authz), vh.map(|v| &v.authz)];
            let denied = match f {
                HttpAuthz::Jwt(j) => {
                    let per_route = levels.iter().flatten().find_map(|l| l.jwt(&j.name));
                    let (denied, clear_route) = self.run_jwt(session, ctx, j, per_route).await?;
                    if clear_route && let Some(vh) = vh {
                        let v = view(session.req_header());
                        *ridx = vh
                            .routes
                            .iter()
                            .position(|r| r.matcher.matches_with(&v, &ctx.metadata));
                    }
                    denied
                }
                HttpAuthz::Rbac(r) => {
                    let per_route = levels.iter().flatten().find_map(|l| l.rbac(&r.name));
                    self.run_rbac(session, ctx, facts, r, per_route).await?
                }
                HttpAuthz::ExtAuthz(e) => {
                    let disabled = levels
                        .iter()
                        .flatten()
                        .find_map(|l| l.ext_authz_disabled(&e.name))
                        .unwrap_or(false);
                    e.stats.filter.touch(&self.shared.stats);
                    let cluster = route.and_then(|r| match &r.action {
                        RouteAction::Forward(a) => match &a.cluster {
                            ClusterSpecifier::Cluster(c) => Some(c.as_str()),
                            _ => None,
                        },
                        _ => None,
                    });
                    let before = e
                        .clear_route_cache
                        .then(|| session.req_header().headers.clone());
                    let denied = if disabled {
                        false
                    } else if e.grpc.is_some() {
                        // Context extensions: the virtual host's, then the route's (a key set
                        // on the route wins).
                        let mut context: Vec<(String, String)> = Vec::new();
                        for l in levels.iter().rev().flatten() {
                            for (k, v) in l.ext_authz_context(&e.name).unwrap_or(&[]) {
                                match context.iter_mut().find(|(ck, _)| ck == k) {
                                    Some(slot) => slot.1.clone_from(v),
                                    None => context.push((k.clone(), v.clone())),
                                }
                            }
                        }
                        self.run_ext_authz_grpc(session, ctx, facts, e, context, cluster)
                            .await?
                    } else {
                        self.run_ext_authz(session, ctx, e, cluster).await?
                    };
                    // `clear_route_cache`: the service changed the request, route it again.
                    if !denied
                        && let (Some(before), Some(vh)) = (before, vh)
                        && before != session.req_header().headers
                    {
                        let v = view(session.req_header());
                        *ridx = vh
                            .routes
                            .iter()
                            .position(|r| r.matcher.matches_with(&v, &ctx.metadata));
                    }
                    denied
                }
            };
            if denied {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn run_jwt(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        j: &HttpJwt,
        per_route: Option<&jwt::PerRoute>,
    ) -> Result<(bool, bool)> {
        let cfg = &j.config;
        // Remote JWKS: fetch (through its cluster) when nothing fresh is cached.
        for p in &cfg.providers {
            if let jwt::Jwks::Remote(r) = &p.jwks
                && r.keys(Instant::now()).is_none()
            {
                self.fetch_jwks(r).await;
                // New keys: tokens verified with the old ones are checked again.
                p.verified.clear();
            }
        }
        let outcome = {
            let req = session.req_header();
            let v = view(req);
            let Some(requirement) = cfg.requirement(per_route, &v) else {
                return Ok((false, false));
            };
            if cfg.bypass_cors_preflight && is_cors_preflight(req) {
                return Ok((false, false));
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let src = TokenSource {
                headers: &req.headers,
                query: req.uri.query(),
                now,
            };
            cfg.check(requirement, &src)
        };
        let verified = match outcome {
            Ok(v) => v,
            Err(f) => {
                let req = session.req_header();
                let mut realm = format!("Bearer realm=\"http://{}", authority(req));
                realm.push_str(&String::from_utf8_lossy(req.raw_path()));
                realm.push('"');
                if f != jwt::Failure::Missing {
                    realm.push_str(", error=\"invalid_token\"");
                }
                let hv = HeaderValue::from_str(&realm)
                    .unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
                ctx.failure = Some(Failure::JwtDenied);
                self.local_reply(
                    session,
                    ctx,
                    f.status(),
                    f.message().as_bytes(),
                    &[(http::header::WWW_AUTHENTICATE, hv)],
                )
                .await?;
                return Ok((true, false));
            }
        };
        let mut clear_route = false;
        for v in &verified {
            let Some(p) = cfg.providers.get(v.provider) else {
                continue;
            };
            clear_route |= p.clear_route_cache;
            let req = session.req_header_mut();
            if !p.forward {
                match &v.location {
                    jwt::Location::Header(name, _) => {
                        req.remove_header(name);
                    }
                    jwt::Location::Param(name) => {
                        let raw = String::from_utf8_lossy(req.raw_path()).into_owned();
                        if let Some((path, query)) = raw.split_once('?') {
                            let new = match jwt::query_without(query, name) {
                                Some(q) => format!("{path}?{q}"),
                                None => path.to_owned(),
                            };
                            req.set_raw_path(new.as_bytes())?;
                        }
                    }
                    // Envoy leaves cookies alone.
                    jwt::Location::Cookie(_) => {}
                }
            }
            if let Some(h) = &p.forward_payload_header {
                let value = jwt::forwarded_payload(v, p.pad_forward_payload_header);
                req.insert_header(h.clone(), value)?;
            }
            for (h, claim) in &p.claim_to_headers {
                if let Some(value) = jwt::claim_header_value(&v.payload, claim)
                    && let Ok(value) = HeaderValue::from_str(&value)
                {
                    req.insert_header(HeaderName::clone(h), value)?;
                }
            }
            if let Some(key) = &p.payload_in_metadata {
                let payload = jwt::payload_struct(&v.payload, &p.space_delimited_claims);
                ctx.metadata
                    .set(jwt::METADATA_NAMESPACE, key, Value::Struct(payload));
            }
        }
        Ok((false, clear_route))
    }

    /// Fetches a remote JWKS through its cluster (plain HTTP/1.1 GET, `http_uri.timeout` per
    /// attempt, `retry_policy.num_retries` retries) and caches it; on failure nothing is cached
    /// and tokens of that provider fail with `Jwks remote fetch is failed`.
    async fn fetch_jwks(&self, r: &RemoteJwks) {
        let Some(cluster) = self.shared.clusters.get(&r.cluster) else {
            tracing::debug!(cluster = %r.cluster, "jwt_authn: JWKS cluster not found");
            return;
        };
        let (path, host) = r.target();
        for _ in 0..=r.num_retries {
            let attempt = async {
                let picked = cluster.pick(None, &[], 1, None)?;
                let mut peer = HttpPeer::new(picked.addr, false, String::new());
                peer.options.connection_timeout = Some(cluster.config.connect_timeout);
                let connector = &self.shared.mirror_connector;
                let (mut session, _) = connector.get_http_session(&peer).await.ok()?;
                let mut req =
                    pingora_http::RequestHeader::build("GET", path.as_bytes(), None).ok()?;
                req.insert_header(http::header::HOST, host).ok()?;
                session.write_request_header(Box::new(req)).await.ok()?;
                session.finish_request_body().await.ok()?;
                session.read_response_header().await.ok()?;
                let ok = session.response_header().is_some_and(|h| h.status == 200);
                let mut body = Vec::new();
                while let Ok(Some(chunk)) = session.read_response_body().await {
                    if body.len() + chunk.len() > MAX_JWKS_BYTES {
                        return None;
                    }
                    body.extend_from_slice(&chunk);
                }
                connector.release_http_session(session, &peer, None).await;
                ok.then_some(body)
            };
            if let Ok(Some(body)) = pingora_timeout::timeout(r.timeout, attempt).await
                && r.store(&String::from_utf8_lossy(&body), Instant::now())
                    .is_ok()
            {
                return;
            }
        }
        tracing::debug!(uri = %r.uri, "jwt_authn: JWKS fetch failed");
    }

    /// Asks the HTTP authorization service. `Ok(true)` = a local reply was sent.
    async fn run_ext_authz(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        e: &HttpExtAuthz,
        cluster: Option<&str>,
    ) -> Result<bool> {
        if let Some(m) = &e.enabled_metadata
            && !m.matches(&ctx.metadata)
        {
            e.stats.filter.inc(&self.shared.stats, S::DISABLED);
            return Ok(false);
        }
        let count = |i| e.stats.count(&self.shared.stats, i, cluster);
        let check = {
            let req = session.req_header();
            let mut path = e.path_prefix.clone();
            path.push_str(&String::from_utf8_lossy(req.raw_path()));
            let mut out =
                pingora_http::RequestHeader::build(req.method.as_str(), path.as_bytes(), None)?;
            for (name, value) in req.headers.iter() {
                let always = name == http::header::HOST || name == http::header::AUTHORIZATION;
                let allowed = always
                    || e.allowed_headers
                        .as_ref()
                        .is_none_or(|l| l.iter().any(|m| m.matches(name.as_str())));
                if allowed
                    && name != http::header::CONTENT_LENGTH
                    && name != http::header::TRANSFER_ENCODING
                {
                    out.append_header(name.clone(), value.clone())?;
                }
            }
            out.insert_header(http::header::CONTENT_LENGTH, "0")?;
            // Envoy's async HTTP client marks the call as internal and announces its timeout.
            out.insert_header("x-envoy-internal", "true")?;
            out.insert_header(
                "x-envoy-expected-rq-timeout-ms",
                e.timeout.as_millis().to_string(),
            )?;
            for (n, v) in &e.headers_to_add {
                out.insert_header(n.clone(), v.clone())?;
            }
            out
        };
        let answer = self.call_authz(e, check).await;
        let Some((status, headers, body)) = answer.filter(|(s, _, _)| *s < 500) else {
            count(S::ERROR);
            if e.failure_mode_allow {
                count(S::FAILURE_MODE_ALLOWED);
                if e.failure_mode_allow_header_add {
                    session
                        .req_header_mut()
                        .insert_header("x-envoy-auth-failure-mode-allowed", "true")?;
                }
                return Ok(false);
            }
            ctx.failure = Some(Failure::ExtAuthzDenied);
            self.local_reply(session, ctx, e.status_on_error, b"", &[])
                .await?;
            return Ok(true);
        };
        let matches = |l: &[pingsail_filters::matcher::StringMatcher], n: &HeaderName| {
            l.iter().any(|m| m.matches(n.as_str()))
        };
        count(if status == 200 { S::OK } else { S::DENIED });
        if status == 200 {
            let req = session.req_header_mut();
            for (n, v) in headers.iter() {
                if matches(&e.upstream_headers, n) {
                    req.insert_header(n.clone(), v.clone())?;
                } else if matches(&e.upstream_headers_append, n) {
                    req.append_header(n.clone(), v.clone())?;
                }
            }
            return Ok(false);
        }
        let extra: Vec<(HeaderName, HeaderValue)> = headers
            .iter()
            .filter(|(n, _)| {
                !matches!(
                    n.as_str(),
                    "content-length"
                        | "transfer-encoding"
                        | "connection"
                        | "date"
                        | "server"
                        | "content-type"
                        | "keep-alive"
                ) && e.client_headers.as_ref().is_none_or(|l| matches(l, n))
            })
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        ctx.failure = Some(Failure::ExtAuthzDenied);
        self.local_reply(session, ctx, status, &body, &extra)
            .await?;
        Ok(true)
    }

    /// Asks the gRPC authorization service (`Authorization/Check`). `Ok(true)` = a local reply
    /// was sent.
    async fn run_ext_authz_grpc(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        facts: &ConnFacts,
        e: &HttpExtAuthz,
        context: Vec<(String, String)>,
        cluster: Option<&str>,
    ) -> Result<bool> {
        let Some(grpc) = &e.grpc else {
            return Ok(false);
        };
        if let Some(m) = &e.enabled_metadata
            && !m.matches(&ctx.metadata)
        {
            e.stats.filter.inc(&self.shared.stats, S::DISABLED);
            return Ok(false);
        }
        let count = |i| e.stats.count(&self.shared.stats, i, cluster);
        // The body, when asked for and the request has one.
        let body = match &e.with_body {
            Some(b) if !session.as_downstream_mut().is_body_empty() => {
                match read_body(session, b).await? {
                    Some(body) => Some(body),
                    None => {
                        ctx.failure = Some(Failure::ExtAuthzDenied);
                        self.local_reply(session, ctx, 413, b"Payload Too Large", &[])
                            .await?;
                        return Ok(true);
                    }
                }
            }
            _ => None,
        };
        let request = check_request(session, ctx, facts, e, context, body.as_ref());
        let response = grpc.check(&self.shared, request).await;
        let failed = |r: &Option<CheckResponse>| match r {
            None => true,
            Some(r) => matches!(r.http_response, Some(HttpResponse::ErrorResponse(_))),
        };
        if failed(&response) {
            count(S::ERROR);
            if e.failure_mode_allow {
                count(S::FAILURE_MODE_ALLOWED);
                if e.failure_mode_allow_header_add {
                    session
                        .req_header_mut()
                        .insert_header("x-envoy-auth-failure-mode-allowed", "true")?;
                }
                return Ok(false);
            }
            let (status, headers, body) = match response.and_then(|r| r.http_response) {
                Some(HttpResponse::ErrorResponse(d)) => denied_parts(&d, e.status_on_error),
                _ => (e.status_on_error, Vec::new(), String::new()),
            };
            ctx.failure = Some(Failure::ExtAuthzDenied);
            self.local_reply(session, ctx, status, body.as_bytes(), &headers)
                .await?;
            return Ok(true);
        }
        let Some(r) = response else {
            return Ok(false);
        };
        if let Some(md) = &r.dynamic_metadata {
            for (k, v) in crate::authz::from_pb_struct(md) {
                ctx.metadata.set(EXT_AUTHZ_NAMESPACE, &k, v);
            }
        }
        let ok = r.status.as_ref().is_none_or(|s| s.code == 0);
        count(if ok { S::OK } else { S::DENIED });
        if ok {
            if let Some(HttpResponse::OkResponse(o)) = &r.http_response {
                // The deprecated OK-response metadata still counts.
                #[allow(deprecated)]
                let ok_metadata = &o.dynamic_metadata;
                if let Some(md) = ok_metadata {
                    for (k, v) in crate::authz::from_pb_struct(md) {
                        ctx.metadata.set(EXT_AUTHZ_NAMESPACE, &k, v);
                    }
                }
                apply_ok(session.req_header_mut(), o)?;
                for h in &o.response_headers_to_add {
                    if let Some(rh) = ResponseHeader::from_option(h) {
                        ctx.authz_response_headers.push(rh);
                    }
                }
            }
            return Ok(false);
        }
        let (status, headers, body) = match &r.http_response {
            Some(HttpResponse::DeniedResponse(d)) => denied_parts(d, 403),
            _ => (403, Vec::new(), String::new()),
        };
        ctx.failure = Some(Failure::ExtAuthzDenied);
        self.local_reply(session, ctx, status, body.as_bytes(), &headers)
            .await?;
        Ok(true)
    }

    /// One exchange with the authorization service: status, headers, body; `None` on a
    /// transport failure or timeout.
    async fn call_authz(
        &self,
        e: &HttpExtAuthz,
        check: pingora_http::RequestHeader,
    ) -> Option<(u16, http::HeaderMap, Vec<u8>)> {
        let cluster = self.shared.clusters.get(&e.cluster)?;
        let exchange = async {
            let picked = cluster.pick(None, &[], 1, None)?;
            let mut peer = HttpPeer::new(picked.addr, false, String::new());
            peer.options.connection_timeout = Some(cluster.config.connect_timeout);
            let connector = &self.shared.mirror_connector;
            let (mut s, _) = connector.get_http_session(&peer).await.ok()?;
            s.write_request_header(Box::new(check)).await.ok()?;
            s.finish_request_body().await.ok()?;
            s.read_response_header().await.ok()?;
            let (status, headers) = {
                let h = s.response_header()?;
                (h.status.as_u16(), h.headers.clone())
            };
            let mut body = Vec::new();
            while let Ok(Some(chunk)) = s.read_response_body().await {
                if body.len() + chunk.len() > MAX_JWKS_BYTES {
                    return None;
                }
                body.extend_from_slice(&chunk);
            }
            connector.release_http_session(s, &peer, None).await;
            Some((status, headers, body))
        };
        pingora_timeout::timeout(e.timeout, exchange)
            .await
            .ok()
            .flatten()
    }

    async fn run_rbac(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        facts: &ConnFacts,
        r: &HttpRbac,
        per_route: Option<&PerRoute>,
    ) -> Result<bool> {
        let config = match per_route {
            Some(PerRoute::Disabled) => return Ok(false),
            Some(PerRoute::Override(c)) => c.as_ref(),
            None => r.config.as_ref(),
        };
        let (allowed, policy) = {
            let req = session.req_header();
            let v = view(req);
            let peer = facts.peer_principal.as_deref();
            let fs: [(&str, &str); 1];
            let filter_state: &[(&str, &str)] = match peer {
                Some(p) => {
                    fs = [(PEER_PRINCIPAL_KEY, p)];
                    &fs
                }
                None => &[],
            };
            let input = Input {
                headers: &v,
                local: facts.local,
                direct_remote: facts.remote,
                remote: forwarded::final_remote(
                    &req.headers,
                    facts.remote.ip(),
                    facts.hcm.use_remote_address,
                    facts.hcm.xff_num_trusted_hops,
                ),
                sni: "",
                peer_principal: peer,
                filter_state,
                metadata: &ctx.metadata,
            };
            let d = config.decide(&input);
            r.stats.count(&self.shared.stats, &d);
            let mut md = std::mem::take(&mut ctx.metadata);
            // Recording allocates (keys, ids): only when there is something to record.
            if d.shadow.is_some() || d.enforced.is_some_and(|v| v.policy.is_some()) {
                config.record(&d, RBAC_NAMESPACE, &mut md);
            }
            let out = (
                d.allowed,
                d.enforced.and_then(|v| v.policy).map(str::to_owned),
            );
            ctx.metadata = md;
            out
        };
        if allowed {
            return Ok(false);
        }
        tracing::debug!(policy = ?policy, "RBAC denied the request");
        self.fail(session, ctx, Failure::RbacDenied).await
    }
}

/// A buffered request body for a check: the bytes and whether it was cut at the limit.
struct CheckBody {
    bytes: Vec<u8>,
    partial: bool,
}

/// Reads the request body up to `max_request_bytes` (what is read still goes upstream: Pingora
/// replays its copy). `None`: larger than allowed without `allow_partial_message`.
async fn read_body(session: &mut Session, b: &ExtAuthzBody) -> Result<Option<CheckBody>> {
    let cap = b.max_bytes.min(MAX_CHECK_BODY);
    session.as_downstream_mut().enable_retry_buffering();
    let mut bytes = Vec::new();
    while bytes.len() <= cap {
        match session.as_downstream_mut().read_request_body().await? {
            Some(chunk) => bytes.extend_from_slice(&chunk),
            None => break,
        }
        if bytes.len() >= cap && !session.as_downstream_mut().is_body_done() {
            break;
        }
    }
    let partial = bytes.len() > cap || !session.as_downstream_mut().is_body_done();
    if partial && !b.allow_partial {
        return Ok(None);
    }
    bytes.truncate(cap);
    Ok(Some(CheckBody { bytes, partial }))
}

/// `%XX` for everything but RFC 3986 unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The peer's leaf certificate, PEM then URL-encoded (`include_peer_certificate`).
fn peer_certificate_pem(facts: &ConnFacts) -> String {
    use base64::Engine as _;
    let Some(leaf) = facts.peer_certs.as_ref().and_then(|c| c.first()) else {
        return String::new();
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(leaf);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    url_encode(&pem)
}

/// The `CheckRequest` Envoy sends for an HTTP request.
fn check_request(
    session: &Session,
    ctx: &RequestCtx,
    facts: &ConnFacts,
    e: &HttpExtAuthz,
    context: Vec<(String, String)>,
    body: Option<&CheckBody>,
) -> CheckRequest {
    let req = session.req_header();
    // Envoy's `:scheme`: the client's on HTTP/2; on HTTP/1 the (final) `x-forwarded-proto` when it
    // is http or https, else the connection's.
    let xfp = req
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|v| matches!(*v, "http" | "https"));
    let scheme = req
        .uri
        .scheme_str()
        .or(xfp)
        .unwrap_or(if facts.tls { "https" } else { "http" })
        .to_owned();
    let path = String::from_utf8_lossy(req.raw_path()).into_owned();
    let host = authority(req).to_owned();
    let mut headers: std::collections::HashMap<String, String> = Default::default();
    headers.insert(":authority".into(), host.clone());
    headers.insert(":method".into(), req.method.as_str().to_owned());
    headers.insert(":path".into(), path.clone());
    headers.insert(":scheme".into(), scheme.clone());
    for (name, value) in req.headers.iter() {
        if name == http::header::HOST {
            continue;
        }
        let v = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|cur| {
                cur.push(',');
                cur.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    if let Some(b) = body {
        headers.insert(
            "x-envoy-auth-partial-body".into(),
            if b.partial { "true" } else { "false" }.into(),
        );
    }
    let size = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<i64>().ok())
        .or_else(|| body.map(|b| b.bytes.len() as i64))
        .unwrap_or(0);
    let protocol = match req.version {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    };
    let (body_text, raw_body) = match (body, e.with_body) {
        (Some(b), Some(cfg)) if cfg.as_bytes => (String::new(), b.bytes.clone()),
        (Some(b), _) => (String::from_utf8_lossy(&b.bytes).into_owned(), Vec::new()),
        _ => (String::new(), Vec::new()),
    };
    let since_epoch = ctx
        .start_time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let filter_metadata = e
        .metadata_namespaces
        .iter()
        .filter_map(|ns| {
            ctx.metadata
                .filter(ns)
                .map(|s| (ns.clone(), crate::authz::to_pb_struct(s)))
        })
        .collect();
    let certificate = if e.include_peer_certificate {
        peer_certificate_pem(facts)
    } else {
        String::new()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(check_peer(
                facts.remote,
                facts.peer_principal.as_deref().unwrap_or(""),
                certificate,
            )),
            destination: Some(check_peer(
                facts.local,
                facts.local_uri.as_deref().unwrap_or(""),
                String::new(),
            )),
            request: Some(Request {
                time: Some(envoy_types::pb::google::protobuf::Timestamp {
                    seconds: since_epoch.as_secs() as i64,
                    nanos: since_epoch.subsec_nanos() as i32,
                }),
                http: Some(HttpRequest {
                    id: rand::random::<u64>().to_string(),
                    method: req.method.as_str().to_owned(),
                    headers,
                    path,
                    host,
                    scheme,
                    size,
                    protocol: protocol.into(),
                    body: body_text,
                    raw_body,
                    ..Default::default()
                }),
            }),
            context_extensions: context.into_iter().collect(),
            metadata_context: Some(Metadata {
                filter_metadata,
                ..Default::default()
            }),
            route_metadata_context: Some(Metadata::default()),
            ..Default::default()
        }),
    }
}
