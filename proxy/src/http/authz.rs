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

/// Largest JWKS document we accept.
const MAX_JWKS_BYTES: usize = 1 << 20;

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
    /// Runs the authorization filters. `Ok(true)` = a local reply was sent.
    pub(super) async fn authorize(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        facts: &ConnFacts,
        table: &RouteTable,
        vidx: usize,
        ridx: Option<usize>,
    ) -> Result<bool> {
        let vh = table.vhosts.get(vidx);
        let route = ridx.and_then(|i| vh?.routes.get(i));
        let levels: [Option<&PerFilterAuthz>; 2] = [route.map(|r| &r.authz), vh.map(|v| &v.authz)];
        for f in &facts.hcm.authz {
            let denied = match f {
                HttpAuthz::Jwt(j) => {
                    let per_route = levels.iter().flatten().find_map(|l| l.jwt(&j.name));
                    self.run_jwt(session, ctx, j, per_route).await?
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
                    !disabled && self.run_ext_authz(session, ctx, e).await?
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
    ) -> Result<bool> {
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
                return Ok(false);
            };
            if cfg.bypass_cors_preflight && is_cors_preflight(req) {
                return Ok(false);
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
                return Ok(true);
            }
        };
        for v in &verified {
            let Some(p) = cfg.providers.get(v.provider) else {
                continue;
            };
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
        Ok(false)
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
    ) -> Result<bool> {
        if let Some(m) = &e.enabled_metadata
            && !m.matches(&ctx.metadata)
        {
            return Ok(false);
        }
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
            if e.failure_mode_allow {
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
