// SPDX-License-Identifier: Apache-2.0
//! The Pingora `ProxyHttp` implementation: maps Pingora's phases onto route selection and the filters,
//! and turns every failure into Envoy's local reply in one place ([`Router::fail_to_proxy`]).

mod authz;
mod connect;
pub mod error;
mod forwarded;
pub mod mirror;
mod path;

use crate::Shared;
use crate::access_log::Entry;
use crate::cluster::{ClusterState, Picked};
use crate::config::HttpConnectionManager;
use crate::stats::{ClusterStats, HttpStats, class_index};
use arcstr::ArcStr;
use async_trait::async_trait;
use bytes::Bytes;
use error::Failure;
use http::{HeaderName, HeaderValue};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use pingsail_filters::cors::Decision;
use pingsail_filters::headers::HeaderMut;
use pingsail_filters::retry::{Outcome, RetryPolicy};
use pingsail_filters::route::{
    Action, ClusterSpecifier, HashPolicy, RequestView, Route, RouteTable, VirtualHost,
};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Facts about a downstream connection, attached by the listener before Pingora sees the stream.
#[derive(Debug)]
pub struct ConnFacts {
    /// the chain's HTTP connection manager
    pub hcm: Arc<HttpConnectionManager>,
    /// its counters
    pub stats: Arc<HttpStats>,
    /// downstream peer
    pub remote: SocketAddr,
    /// our local address
    pub local: SocketAddr,
    /// original destination (capture), if any
    pub original_dst: Option<SocketAddr>,
    /// The verified peer identity (SPIFFE URI SAN) of an mTLS connection; `None` on plaintext.
    pub peer_principal: Option<ArcStr>,
    /// the connection was TLS-terminated by us
    pub tls: bool,
    /// the peer's certificate chain (DER, leaf first) on mTLS connections, kept only when the HCM's
    /// XFCC mode depends on it (FORWARD_ONLY, APPEND_FORWARD, SANITIZE_SET)
    pub peer_certs: Option<Arc<Vec<Vec<u8>>>>,
    /// our own certificate's URI SAN (XFCC `By=`)
    pub local_uri: Option<ArcStr>,
    /// the listener's `original_src`: plaintext upstream connections leave from the downstream's
    /// address (TPROXY)
    pub upstream_src: Option<crate::tcp::UpstreamSource>,
}

/// The `ProxyHttp` implementation.
pub struct Router {
    shared: Arc<Shared>,
}

impl Router {
    /// A router over shared proxy state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Router { shared }
    }
}

/// Per-request state (one small struct, as STYLE.md asks).
pub struct RequestCtx {
    facts: Option<Arc<ConnFacts>>,
    start: Instant,
    start_time: SystemTime,
    table: Option<Arc<RouteTable>>,
    vhost: usize,
    route: Option<usize>,
    weighted: Option<usize>,
    cluster: Option<Arc<ClusterState>>,
    cluster_stats: Option<Arc<ClusterStats>>,
    picked: Option<Picked>,
    tried: Vec<SocketAddr>,
    retries: u32,
    retry: Option<Arc<RetryPolicy>>,
    failure: Option<Failure>,
    upstream_start: Option<Instant>,
    upstream_host: Option<SocketAddr>,
    cors: Vec<(&'static str, String)>,
    deadline: Option<(Instant, Failure)>,
    hash: Option<u64>,
    status: u16,
    host_rewrite: Option<String>,
    auto_host: bool,
    /// The authority before `auto_host_rewrite`, for `x-envoy-original-host`.
    original_host: Option<String>,
    retry_status: bool,
    /// Body feeds of running request mirrors.
    mirrors: Vec<mirror::MirrorBody>,
    /// Which failure an upstream read timeout stands for (route deadline or stream idle).
    read_timeout_kind: Option<Failure>,
    /// HCM `request_timeout` deadline for receiving the whole request.
    request_deadline: Option<Instant>,
    /// Dynamic metadata written by filters (jwt_authn payloads, RBAC results).
    metadata: pingsail_filters::metadata::DynamicMetadata,
    /// An injected fault holds one `active_faults` until the request ends.
    fault_active: Option<FaultGuard>,
    /// The fault filter's abort (status, gRPC status) for [`Failure::FaultAbort`].
    fault_abort: Option<pingsail_filters::fault::Abort>,
    /// The cluster's circuit breaker admitted this request.
    admitted: Option<crate::cluster::Admitted>,
    /// The retry in flight holds a `max_retries` slot.
    retry_slot: Option<crate::cluster::RetrySlot>,
    /// The upstream read bound armed for this attempt is the per-try timeout (`Some(false)`) or
    /// the per-try idle timeout (`Some(true)`).
    per_try_armed: Option<bool>,
    /// Route `timeout` in force (for `x-envoy-expected-rq-timeout-ms`) and when it started.
    route_timeout: Option<(Duration, Instant)>,
    /// This request is the last `max_requests_per_connection` allows on its connection.
    last_on_connection: bool,
    /// The fault filter's `response_rate_limit` throttling the response body.
    throttle: Option<Throttle>,
    /// `rate_limited_retry_back_off`: the reset interval a retriable response announced (kept
    /// for the request's later retries, as Envoy keeps its strategy).
    ratelimited_backoff: Option<Duration>,
    /// Response flags raised before the final failure, in the order they were raised (Envoy
    /// prints flags in that order): DI, URX, UO.
    flag_events: [Option<&'static str>; 3],
    /// ext_authz `response_headers_to_add` for the response, local replies included.
    authz_response_headers: Vec<authz::ResponseHeader>,
}

/// Holds one `active_faults` of an HCM's fault filter.
pub struct FaultGuard(Arc<HttpStats>);

impl Drop for FaultGuard {
    fn drop(&mut self) {
        self.0.fault.active_faults.dec();
    }
}

fn new_ctx() -> RequestCtx {
    RequestCtx {
        facts: None,
        start: Instant::now(),
        start_time: SystemTime::now(),
        table: None,
        vhost: 0,
        route: None,
        weighted: None,
        cluster: None,
        cluster_stats: None,
        picked: None,
        tried: Vec::new(),
        retries: 0,
        retry: None,
        failure: None,
        upstream_start: None,
        upstream_host: None,
        cors: Vec::new(),
        deadline: None,
        hash: None,
        status: 0,
        host_rewrite: None,
        auto_host: false,
        original_host: None,
        retry_status: false,
        mirrors: Vec::new(),
        read_timeout_kind: None,
        request_deadline: None,
        metadata: Default::default(),
        fault_active: None,
        fault_abort: None,
        admitted: None,
        retry_slot: None,
        per_try_armed: None,
        route_timeout: None,
        last_on_connection: false,
        throttle: None,
        ratelimited_backoff: None,
        flag_events: [None; 3],
        authz_response_headers: Vec::new(),
    }
}

/// A response body rate limit (Envoy's `StreamRateLimiter`): a bucket of at most one second's
/// worth of bytes holding one 50 ms slice at the start, refilled continuously.
#[derive(Debug)]
struct Throttle {
    /// bytes per second
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Throttle {
    fn new(kbps: u64) -> Self {
        let rate = kbps as f64 * 1024.0;
        Throttle {
            rate,
            tokens: rate / 20.0,
            last: Instant::now(),
        }
    }

    /// How long to hold a chunk of `n` bytes before it may be written.
    fn take(&mut self, n: usize, now: Instant) -> Option<Duration> {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now.max(self.last);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            return None;
        }
        let wait = Duration::from_secs_f64((n - self.tokens) / self.rate);
        self.tokens = 0.0;
        // The wait spends the tokens that accrue meanwhile.
        self.last += wait;
        Some(wait)
    }
}

impl RequestCtx {
    /// Records a response flag once, in order.
    fn raise(&mut self, flag: &'static str) {
        for slot in self.flag_events.iter_mut() {
            match slot {
                Some(f) if *f == flag => return,
                Some(_) => {}
                None => {
                    *slot = Some(flag);
                    return;
                }
            }
        }
    }

    fn route(&self) -> Option<(&RouteTable, &VirtualHost, &Route)> {
        let t = self.table.as_deref()?;
        let vh = t.vhosts.get(self.vhost)?;
        let r = vh.routes.get(self.route?)?;
        Some((t, vh, r))
    }
}

struct Req<'a>(&'a mut RequestHeader);
struct Resp<'a>(&'a mut ResponseHeader);

impl HeaderMut for Req<'_> {
    fn remove(&mut self, name: &HeaderName) {
        self.0.remove_header(name);
    }
    fn contains(&self, name: &HeaderName) -> bool {
        self.0.headers.contains_key(name)
    }
    fn insert(&mut self, name: &HeaderName, value: &HeaderValue) {
        let _ = self.0.insert_header(name.clone(), value.clone());
    }
    fn append(&mut self, name: &HeaderName, value: &HeaderValue) {
        let _ = self.0.append_header(name.clone(), value.clone());
    }
}

impl HeaderMut for Resp<'_> {
    fn remove(&mut self, name: &HeaderName) {
        self.0.remove_header(name);
    }
    fn contains(&self, name: &HeaderName) -> bool {
        self.0.headers.contains_key(name)
    }
    fn insert(&mut self, name: &HeaderName, value: &HeaderValue) {
        let _ = self.0.insert_header(name.clone(), value.clone());
    }
    fn append(&mut self, name: &HeaderName, value: &HeaderValue) {
        let _ = self.0.append_header(name.clone(), value.clone());
    }
}

fn facts_of(session: &Session) -> Option<Arc<ConnFacts>> {
    let digest = session.as_downstream().digest()?;
    let pd = digest.proxy_digest.as_ref()?;
    pd.user_data
        .as_ref()?
        .downcast_ref::<Arc<ConnFacts>>()
        .cloned()
}

fn authority(req: &RequestHeader) -> &str {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

fn is_grpc(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(pingsail_filters::route::is_grpc_content_type)
}

/// Envoy's `PercentEncoding::encode` for grpc-message: bytes outside `' '..='~'` and `%`.
fn percent_encode(body: &[u8]) -> String {
    let mut out = String::with_capacity(body.len());
    for &b in body {
        if (b' '..=b'~').contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn protocol(session: &Session) -> &'static str {
    if session.as_downstream().is_http2() {
        return "HTTP/2";
    }
    match session.req_header().version {
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// Applies response header mutations in Envoy's level order.
fn finalize_response(ctx: &RequestCtx, resp: &mut ResponseHeader) {
    let Some((table, vh, route)) = ctx.route() else {
        return;
    };
    let mut levels: [Option<&pingsail_filters::headers::HeaderOps>; 4] = [None; 4];
    if let (Some(i), Action::Forward(a)) = (ctx.weighted, &route.action)
        && let ClusterSpecifier::Weighted(w) = &a.cluster
    {
        levels[0] = w.clusters.get(i).map(|c| &c.response_headers);
    }
    levels[1] = Some(&route.response_headers);
    levels[2] = Some(&vh.response_headers);
    levels[3] = Some(&table.response_headers);
    if table.most_specific_wins {
        levels.reverse();
    }
    let mut h = Resp(resp);
    for ops in levels.into_iter().flatten() {
        if !ops.is_empty() {
            ops.apply(&mut h);
        }
    }
}

impl Router {
    /// Writes a local reply (status, optional body, extra headers), as Envoy formats them.
    async fn local_reply(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        body: &[u8],
        extra: &[(HeaderName, HeaderValue)],
    ) -> Result<()> {
        let head_only = session.req_header().method == http::Method::HEAD;
        if is_grpc(session.req_header()) {
            // Envoy answers a gRPC request with a trailers-only style reply: HTTP 200, the status
            // mapped to grpc-status and the body as grpc-message.
            let mut resp = ResponseHeader::build(200, Some(6))?;
            resp.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
            let grpc_status = match ctx.fault_abort {
                Some(a) if ctx.failure == Some(Failure::FaultAbort) => {
                    a.grpc_status.unwrap_or_else(|| {
                        u32::from(pingsail_filters::route::http_to_grpc_status(a.status))
                    })
                }
                _ => ctx
                    .failure
                    .and_then(Failure::grpc_status)
                    .unwrap_or_else(|| {
                        u32::from(pingsail_filters::route::http_to_grpc_status(status))
                    }),
            };
            resp.insert_header("grpc-status", grpc_status.to_string())?;
            if !body.is_empty() {
                resp.insert_header("grpc-message", percent_encode(body))?;
            }
            resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
            for (k, v) in extra {
                resp.insert_header(k.clone(), v.clone())?;
            }
            finalize_response(ctx, &mut resp);
            self.decorate_response(ctx, &mut resp);
            ctx.status = 200;
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(());
        }
        let mut resp = ResponseHeader::build(status, Some(4))?;
        // 204 and 304 carry no body and no content-length.
        let bodyless = status == 204 || status == 304;
        let body = if bodyless { &[][..] } else { body };
        // Envoy answers a HEAD with an empty local body without content-length.
        if !(bodyless || head_only && body.is_empty()) {
            resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        }
        if !body.is_empty() {
            resp.insert_header(http::header::CONTENT_TYPE, "text/plain")?;
        }
        for (k, v) in extra {
            resp.insert_header(k.clone(), v.clone())?;
        }
        finalize_response(ctx, &mut resp);
        self.decorate_response(ctx, &mut resp);
        drain_if_expired(session, ctx);
        ctx.status = status;
        session
            .write_response_header(Box::new(resp), body.is_empty() || head_only)
            .await?;
        if !body.is_empty() && !head_only {
            session
                .write_response_body(Some(Bytes::copy_from_slice(body)), true)
                .await?;
        }
        Ok(())
    }

    /// Headers every response gets from the connection manager (server, CORS decoration).
    fn decorate_response(&self, ctx: &RequestCtx, resp: &mut ResponseHeader) {
        // The router's own local replies (overflow, timeouts, resets) carry the attempt count.
        if ctx.cluster.is_some()
            && ctx.failure.is_some_and(Failure::from_router)
            && ctx
                .route()
                .is_some_and(|(_, vh, _)| vh.attempt_count_in_response)
        {
            let _ = resp.insert_header("x-envoy-attempt-count", (ctx.retries + 1).to_string());
        }
        if let Some(f) = &ctx.facts
            && !f.hcm.server_pass_through
        {
            let _ = resp.insert_header(http::header::SERVER, f.hcm.server_name.clone());
        }
        for (k, v) in &ctx.cors {
            let _ = resp.insert_header(*k, v.as_str());
        }
        authz::apply_response_headers(&ctx.authz_response_headers, resp);
    }

    /// The fault filter: delay and/or abort as the most specific fault config says. Returns true
    /// when the request was answered (aborted).
    async fn inject_fault(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        facts: &ConnFacts,
        ff: &crate::config::FaultFilter,
        vh: &VirtualHost,
        route: &Route,
    ) -> Result<bool> {
        let stats = &facts.stats;
        if !stats
            .fault
            .enabled
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            stats
                .fault
                .enabled
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let pick = |f: &Option<(ArcStr, Arc<pingsail_filters::fault::FaultConfig>)>| {
            f.as_ref()
                .filter(|(name, _)| *name == ff.name)
                .map(|(_, c)| c.clone())
        };
        let cfg = pick(&route.fault)
            .or_else(|| pick(&vh.fault))
            .unwrap_or_else(|| ff.config.clone());
        if cfg.delay.is_none() && cfg.abort.is_none() && cfg.response_rate_limit.is_none() {
            return Ok(false);
        }
        let cluster = match &route.action {
            Action::Forward(a) => match &a.cluster {
                ClusterSpecifier::Cluster(c) => Some(c.as_str()),
                _ => None,
            },
            _ => None,
        };
        let (delay, rate, applies) = {
            let req = session.req_header();
            let path = std::str::from_utf8(req.raw_path()).unwrap_or("/");
            let view = RequestView {
                path,
                method: req.method.as_str(),
                authority: authority(req),
                scheme: "http",
                headers: &req.headers,
                is_grpc: false,
                random: 0,
            };
            if !cfg.applies(&view, cluster) {
                (None, None, false)
            } else {
                (
                    cfg.delay(&view, rand::random()),
                    cfg.response_rate_kbps(&view, rand::random()),
                    true,
                )
            }
        };
        if !applies {
            return Ok(false);
        }
        // Each injection takes the request's one `active_faults` slot, or overflows
        // `max_active_faults` (and is skipped).
        let try_activate = |ctx: &mut RequestCtx| {
            if ctx.fault_active.is_some() {
                return true;
            }
            if cfg
                .max_active_faults
                .is_some_and(|m| stats.fault.active_faults.get() >= m)
            {
                stats.fault.faults_overflow.inc();
                return false;
            }
            stats.fault.active_faults.inc();
            ctx.fault_active = Some(FaultGuard(facts.stats.clone()));
            true
        };
        // Envoy sets up the response rate limiter first (it takes the fault slot before a delay).
        if let Some(k) = rate
            && try_activate(ctx)
        {
            stats.fault.response_rl_injected.inc();
            ctx.throttle = Some(Throttle::new(k));
        }
        if let Some(d) = delay
            && try_activate(ctx)
        {
            stats.fault.delays_injected.inc();
            ctx.raise("DI");
            pingora_timeout::sleep(d).await;
        }
        let abort = {
            let req = session.req_header();
            let view = RequestView {
                path: "",
                method: req.method.as_str(),
                authority: "",
                scheme: "http",
                headers: &req.headers,
                is_grpc: false,
                random: 0,
            };
            cfg.abort(&view, rand::random())
        };
        if let Some(a) = abort
            && try_activate(ctx)
        {
            stats.fault.aborts_injected.inc();
            ctx.fault_abort = Some(a);
            return self.fail(session, ctx, Failure::FaultAbort).await;
        }
        Ok(false)
    }

    async fn fail(&self, session: &mut Session, ctx: &mut RequestCtx, f: Failure) -> Result<bool> {
        tracing::debug!(failure = ?f, "local reply");
        if f == Failure::Overflow {
            ctx.failure = Some(f);
            let over = [(
                HeaderName::from_static("x-envoy-overloaded"),
                HeaderValue::from_static("true"),
            )];
            self.local_reply(session, ctx, f.status(), f.body().as_bytes(), &over)
                .await?;
            return Ok(true);
        }
        ctx.failure = Some(f);
        if f.closes_connection() {
            session.set_keepalive(None);
        }
        if let Some(facts) = &ctx.facts {
            match f {
                Failure::NoRoute => facts.stats.no_route.inc(),
                Failure::ClusterNotFound => facts.stats.no_cluster.inc(),
                _ => {}
            }
        }
        let mut status = f.status();
        if f == Failure::ClusterNotFound
            && let Some((_, _, r)) = ctx.route()
            && let Action::Forward(a) = &r.action
        {
            status = a.cluster_not_found_status;
        }
        if f == Failure::FaultAbort
            && let Some(a) = ctx.fault_abort
        {
            status = a.status;
        }
        self.local_reply(session, ctx, status, f.body().as_bytes(), &[])
            .await?;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Router {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        new_ctx()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let Some(facts) = facts_of(session) else {
            return Error::e_explain(
                ErrorType::InternalError,
                "connection without listener facts",
            );
        };
        facts.stats.rq_total.inc();
        let hcm = facts.hcm.clone();
        ctx.facts = Some(facts.clone());
        // stream_idle_timeout bounds silence on the downstream side (request body reads), and
        // request_timeout the whole request: each read waits at most until the request deadline.
        ctx.request_deadline = hcm.request_timeout.map(|t| ctx.start + t);
        session
            .as_downstream_mut()
            .set_read_timeout(downstream_read_bound(
                hcm.stream_idle_timeout,
                ctx.request_deadline,
            ));

        // Codec-level checks, in Envoy's order: HTTP/1.0 (no `accept_http_10`), header limits,
        // a fragment in the request target.
        if !hcm.accept_http_10
            && !session.as_downstream().is_http2()
            && session.req_header().version == http::Version::HTTP_10
        {
            return self.fail(session, ctx, Failure::UpgradeRequired).await;
        }
        // Header limits (Envoy: 60 KiB default, 100 headers).
        {
            let req = session.req_header();
            let size: usize = req
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len())
                .sum();
            if size > hcm.max_request_headers_kb as usize * 1024 || req.headers.len() > 100 {
                return self.fail(session, ctx, Failure::HeadersTooLarge).await;
            }
        }

        // Pingora drops a fragment while parsing; Envoy rejects it: look at the request line.
        if let Some(h1) = session.as_downstream().as_http1() {
            let raw = h1.get_headers_raw_bytes();
            let line = raw.split(|b| *b == b'\n').next().unwrap_or_default();
            if line.contains(&b'#') {
                return self.fail(session, ctx, Failure::InvalidUrl).await;
            }
            match path::check_target(line) {
                path::Target::Ok => {}
                path::Target::Invalid => return self.fail(session, ctx, Failure::BadRequest).await,
                // Envoy's connection manager only routes paths starting with '/': `*` gets a 404
                // before any filter runs.
                path::Target::Asterisk => return self.fail(session, ctx, Failure::NoRoute).await,
            }
        }
        // Absolute-form target (`GET http://host/path`): route on its authority and path.
        if let Some((auth, path)) = path::split_absolute_form(session.req_header().raw_path()) {
            let (auth, path) = (auth.to_vec(), path.to_vec());
            let req = session.req_header_mut();
            if !req.headers.contains_key(http::header::HOST) {
                req.insert_header(http::header::HOST, auth)?;
            }
            req.set_raw_path(&path)?;
        }
        if authority(session.req_header()).is_empty() && !session.as_downstream().is_http2() {
            return self.fail(session, ctx, Failure::MissingHost).await;
        }

        // Path normalisation (normalize_path, merge_slashes, escaped slashes); a CONNECT has no path.
        // Borrow the path; allocate only when normalisation changes it.
        let is_connect = session.req_header().method == http::Method::CONNECT;
        let raw: &[u8] = if is_connect {
            b"/"
        } else {
            session.req_header().raw_path()
        };
        let normalized = match std::str::from_utf8(raw) {
            Ok(p) => path::normalize(
                p,
                hcm.normalize_path,
                hcm.merge_slashes,
                hcm.escaped_slashes,
            ),
            Err(_) => path::normalize(
                &String::from_utf8_lossy(raw),
                hcm.normalize_path,
                hcm.merge_slashes,
                hcm.escaped_slashes,
            ),
        };
        match normalized {
            Ok(path::Normalized::Same) => {}
            Ok(path::Normalized::Changed(p)) => {
                session.req_header_mut().set_raw_path(p.as_bytes())?
            }
            Ok(path::Normalized::Redirect(p)) => {
                let loc = HeaderValue::from_str(&p)
                    .map_err(|_| Error::new(ErrorType::InvalidHTTPHeader))?;
                self.local_reply(session, ctx, 307, b"", &[(http::header::LOCATION, loc)])
                    .await?;
                return Ok(true);
            }
            Err(()) => return self.fail(session, ctx, Failure::InvalidPath).await,
        }

        // Connection-manager request headers.
        {
            let req = session.req_header_mut();
            if hcm.generate_request_id && !req.headers.contains_key("x-request-id") {
                req.insert_header("x-request-id", uuid::Uuid::new_v4().to_string())?;
            }
            let m = forwarded::mutation(
                &req.headers,
                facts.remote.ip(),
                hcm.use_remote_address,
                hcm.xff_num_trusted_hops,
            );
            if let Some(xff) = m.xff {
                req.insert_header("x-forwarded-for", xff)?;
            }
            if m.set_xfp {
                req.insert_header(
                    "x-forwarded-proto",
                    if facts.tls { "https" } else { "http" },
                )?;
            }
            xfcc(req, &hcm.xfcc, &facts)?;
            forwarded::strip_internal(m.edge, |n| {
                req.remove_header(n);
            });
            if let Some(ip) = m.external_address {
                req.insert_header("x-envoy-external-address", ip.to_string())?;
            }
        }

        // Route selection.
        let table = match &hcm.rds {
            None => hcm.routes.clone(),
            // RDS: the table in force now (a listener promoted by its fetch timeout may have none).
            Some(name) => match self.shared.snapshot.load().routes.get(name) {
                Some(r) => r.table.clone(),
                None => return self.fail(session, ctx, Failure::NoRoute).await,
            },
        };
        let (vidx, ridx) = {
            let req = session.req_header();
            let host = authority(req);
            let Some(vh) = table.virtual_host(host) else {
                // No virtual host: the authorization filters still run before the router.
                if !hcm.authz.is_empty()
                    && self
                        .authorize(session, ctx, &facts, &table, usize::MAX, &mut None)
                        .await?
                {
                    return Ok(true);
                }
                return self.fail(session, ctx, Failure::NoRoute).await;
            };
            let vidx = table
                .vhosts
                .iter()
                .position(|v| std::ptr::eq(v, vh))
                .unwrap_or(0);
            let path = if is_connect {
                ""
            } else {
                std::str::from_utf8(req.raw_path()).unwrap_or("/")
            };
            let is_grpc = is_grpc(req);
            let view = RequestView {
                path,
                method: req.method.as_str(),
                authority: host,
                scheme: "http",
                headers: &req.headers,
                is_grpc,
                random: rand::random::<u64>() % 1_000_000,
            };
            let ridx = vh
                .routes
                .iter()
                .position(|r| r.matcher.matches_with(&view, &ctx.metadata));
            if let Some(Action::Forward(a)) = ridx.and_then(|i| vh.routes.get(i)).map(|r| &r.action)
                && !a.hash_policy.is_empty()
            {
                let src = facts.remote.ip().to_string();
                ctx.hash = HashPolicy::compute(&a.hash_policy, &view, Some(&src));
            }
            (vidx, ridx)
        };
        ctx.table = Some(table.clone());
        ctx.vhost = vidx;
        let mut ridx = ridx;
        // jwt_authn and rbac run before the router (so before "no route") and CORS.
        if !hcm.authz.is_empty()
            && self
                .authorize(session, ctx, &facts, &table, vidx, &mut ridx)
                .await?
        {
            return Ok(true);
        }
        let Some(ridx) = ridx else {
            return self.fail(session, ctx, Failure::NoRoute).await;
        };
        ctx.route = Some(ridx);
        let vh = &table.vhosts[vidx];
        let route = &vh.routes[ridx];

        if let Some(ff) = hcm.fault.as_ref().filter(|f| f.before_cors)
            && self
                .inject_fault(session, ctx, &facts, ff, vh, route)
                .await?
        {
            return Ok(true);
        }
        // CORS.
        if hcm.cors_filter
            && let Some(policy) = route.cors.as_ref().or(vh.cors.as_ref())
        {
            let req = session.req_header();
            let get = |n: &str| req.headers.get(n).and_then(|v| v.to_str().ok());
            match policy.decide(
                req.method.as_str(),
                get("origin"),
                get("access-control-request-method"),
            ) {
                Decision::PassThrough => {}
                Decision::Preflight(headers) => {
                    ctx.cors = headers;
                    self.local_reply(session, ctx, 200, b"", &[]).await?;
                    return Ok(true);
                }
                Decision::Decorate(headers) => ctx.cors = headers,
            }
        }

        if let Some(ff) = hcm.fault.as_ref().filter(|f| !f.before_cors)
            && self
                .inject_fault(session, ctx, &facts, ff, vh, route)
                .await?
        {
            return Ok(true);
        }
        match &route.action {
            Action::Direct(d) => {
                let body = d.body.as_deref().unwrap_or(b"");
                if (300..400).contains(&d.status) {
                    // Envoy points a 3xx direct response at the request's own URL.
                    let req = session.req_header();
                    let mut url = String::from("http://");
                    url.push_str(authority(req));
                    url.push_str(&String::from_utf8_lossy(req.raw_path()));
                    let loc = HeaderValue::from_str(&url)
                        .map_err(|_| Error::new(ErrorType::InvalidHTTPHeader))?;
                    self.local_reply(
                        session,
                        ctx,
                        d.status,
                        body,
                        &[(http::header::LOCATION, loc)],
                    )
                    .await?;
                } else {
                    self.local_reply(session, ctx, d.status, body, &[]).await?;
                }
                Ok(true)
            }
            Action::Redirect(r) => {
                let req = session.req_header();
                let path = String::from_utf8_lossy(req.raw_path()).into_owned();
                let loc = r.location("http", authority(req), &path, &route.matcher.path);
                let loc = HeaderValue::from_str(&loc)
                    .map_err(|_| Error::new(ErrorType::InvalidHTTPHeader))?;
                self.local_reply(
                    session,
                    ctx,
                    r.status,
                    b"",
                    &[(http::header::LOCATION, loc)],
                )
                .await?;
                Ok(true)
            }
            Action::Forward(a) => {
                // HTTP/1 upgrades (websocket) need an HCM upgrade config; a route may override it.
                let req = session.req_header();
                let upgrade = req
                    .headers
                    .get(http::header::UPGRADE)
                    .and_then(|v| v.to_str().ok());
                let conn_upgrade = req
                    .headers
                    .get_all(http::header::CONNECTION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| {
                        v.split(',')
                            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                    });
                if let (Some(kind), true) = (upgrade, conn_upgrade) {
                    let allowed = kind.eq_ignore_ascii_case("websocket")
                        && hcm
                            .websocket
                            .is_some_and(|enabled| a.websocket.unwrap_or(enabled));
                    if !allowed {
                        return self.fail(session, ctx, Failure::UpgradeFailed).await;
                    }
                }
                let cluster_name: ArcStr = match &a.cluster {
                    ClusterSpecifier::Cluster(c) => c.clone(),
                    ClusterSpecifier::Header(h) => {
                        match session
                            .req_header()
                            .headers
                            .get(h)
                            .and_then(|v| v.to_str().ok())
                        {
                            Some(v) => v.into(),
                            None => return self.fail(session, ctx, Failure::ClusterNotFound).await,
                        }
                    }
                    ClusterSpecifier::Weighted(w) => {
                        let r = rand::random::<u64>();
                        let Some(c) = w.pick(r) else {
                            return self.fail(session, ctx, Failure::ClusterNotFound).await;
                        };
                        ctx.weighted = w.clusters.iter().position(|x| std::ptr::eq(x, c));
                        c.name.clone()
                    }
                };
                let Some(cluster) = self.shared.clusters.get(&cluster_name) else {
                    return self.fail(session, ctx, Failure::ClusterNotFound).await;
                };
                if is_connect {
                    // CONNECT needs the connection manager's CONNECT upgrade (a route may
                    // switch it off or on) and is terminated only with `connect_config`.
                    let enabled = hcm
                        .connect
                        .is_some_and(|on| a.connect.map_or(on, |(route_on, _)| route_on));
                    // HTTP/1.1 CONNECT never gets here: Pingora's HTTP/1 server answers 405.
                    if !enabled || !a.connect.is_some_and(|(_, terminate)| terminate) {
                        return self.fail(session, ctx, Failure::UpgradeFailed).await;
                    }
                    ctx.cluster_stats = Some(self.shared.stats.cluster(&cluster_name));
                    return self
                        .connect_terminate(session, ctx, &facts, cluster, a)
                        .await;
                }
                // Answer "no healthy upstream" here rather than from upstream_peer: Pingora closes the
                // downstream connection after any upstream-phase error, Envoy keeps it.
                if cluster.endpoint_count() == 0
                    && cluster.config.discovery != crate::config::Discovery::OriginalDst
                {
                    self.shared.stats.cluster(&cluster_name).none_healthy.inc();
                    return self.fail(session, ctx, Failure::NoHealthyUpstream).await;
                }
                // Circuit breakers (the request waits here while it is pending).
                let h2 = cluster.config.http2
                    || (cluster.config.use_downstream_protocol
                        && session.as_downstream().is_http2());
                let cstats = self.shared.stats.cluster(&cluster_name);
                match cluster.admit(h2, &cstats).await {
                    Ok(a) => {
                        ctx.admitted = Some(a);
                        ctx.cluster_stats = Some(cstats);
                    }
                    Err(_) => {
                        ctx.cluster_stats = Some(cstats);
                        ctx.cluster = Some(cluster);
                        return self.fail(session, ctx, Failure::Overflow).await;
                    }
                }
                ctx.cluster = Some(cluster);
                ctx.retry = a.retry_policy.clone().filter(|p| {
                    p.retriable_request_headers.is_empty() || {
                        let req = session.req_header();
                        p.request_retriable(&RequestView {
                            path: std::str::from_utf8(req.raw_path()).unwrap_or("/"),
                            method: req.method.as_str(),
                            authority: authority(req),
                            scheme: "http",
                            headers: &req.headers,
                            is_grpc: false,
                            random: 0,
                        })
                    }
                });
                ctx.auto_host = a.auto_host_rewrite;
                let now = Instant::now();
                let grpc = a.grpc_timeout.and_then(|g| {
                    let h = session
                        .req_header()
                        .headers
                        .get("grpc-timeout")?
                        .to_str()
                        .ok()?;
                    g.bound(h)
                });
                ctx.deadline = match (a.timeout, a.max_stream_duration.or(grpc)) {
                    (_, Some(msd)) => Some((now + msd, Failure::StreamDuration)),
                    (Some(t), None) => Some((now + t, Failure::UpstreamTimeout)),
                    (None, None) => None,
                };

                // Request header mutations: most specific first (Envoy's observed order).
                let req = session.req_header_mut();
                if a.prefix_rewrite.is_some() || a.regex_rewrite.is_some() {
                    // Envoy records the path whenever a rewrite is configured, even a no-op one.
                    let original = String::from_utf8_lossy(req.raw_path()).into_owned();
                    if let Some(new_path) = a.rewrite_path(&route.matcher.path, &original) {
                        req.set_raw_path(new_path.as_bytes())?;
                    }
                    req.insert_header("x-envoy-original-path", original)?;
                }
                if a.auto_host_rewrite {
                    ctx.original_host = Some(authority(req).to_owned());
                }
                let mut levels: [Option<&pingsail_filters::headers::HeaderOps>; 4] = [None; 4];
                if let (Some(i), ClusterSpecifier::Weighted(w)) = (ctx.weighted, &a.cluster)
                    && let Some(c) = w.clusters.get(i)
                {
                    levels[0] = Some(&c.request_headers);
                    ctx.host_rewrite = c.host_rewrite.clone();
                }
                levels[1] = Some(&route.request_headers);
                levels[2] = Some(&vh.request_headers);
                levels[3] = Some(&table.request_headers);
                if table.most_specific_wins {
                    levels.reverse();
                }
                {
                    let mut h = Req(req);
                    for ops in levels.into_iter().flatten() {
                        if !ops.is_empty() {
                            ops.apply(&mut h);
                        }
                    }
                }
                if let Some(h) = &ctx.host_rewrite {
                    set_authority(req, h)?;
                } else if let Some(h) = &a.host_rewrite {
                    // A route-level rewrite keeps the original (a weighted cluster's does not).
                    let original = authority(req).to_owned();
                    req.insert_header("x-envoy-original-host", original)?;
                    set_authority(req, h)?;
                }
                // Set per attempt in upstream_request_filter.
                req.remove_header("x-envoy-expected-rq-timeout-ms");
                ctx.route_timeout = match ctx.deadline {
                    Some((_, Failure::UpstreamTimeout)) => a.timeout.map(|t| (t, now)),
                    _ => None,
                };
                // Shadow traffic: a copy of the request as it goes upstream, fire-and-forget.
                for (name, ppm) in &a.mirrors {
                    if rand::random::<u64>() % 1_000_000 >= *ppm {
                        continue;
                    }
                    let Some(target) = self.shared.clusters.get(name) else {
                        continue;
                    };
                    let has_body = !session.as_downstream_mut().is_body_empty();
                    let mut copy = session.req_header().clone();
                    if vh.attempt_count_in_request {
                        copy.insert_header("x-envoy-attempt-count", "1")?;
                    }
                    if let Some(feed) =
                        mirror::spawn(self.shared.mirror_connector.clone(), target, copy, has_body)
                    {
                        ctx.mirrors.push(feed);
                    }
                }
                Ok(false)
            }
        }
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.request_deadline.is_some() {
            let idle = ctx.facts.as_ref().and_then(|f| f.hcm.stream_idle_timeout);
            // The request is complete: only the idle bound remains.
            let deadline = if end_of_stream {
                None
            } else {
                ctx.request_deadline
            };
            session
                .as_downstream_mut()
                .set_read_timeout(downstream_read_bound(idle, deadline));
        }
        if let Some(chunk) = body.as_ref() {
            for m in &ctx.mirrors {
                m.send(chunk);
            }
        }
        if end_of_stream {
            // Dropping the feeds ends the mirrored bodies.
            ctx.mirrors.clear();
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx
            .route()
            .is_some_and(|(_, vh, _)| vh.attempt_count_in_request)
        {
            upstream_request
                .insert_header("x-envoy-attempt-count", (ctx.retries + 1).to_string())?;
        }
        // max_requests_per_connection: the last request closes its HTTP/1 connection.
        if ctx.last_on_connection && upstream_request.version != http::Version::HTTP_2 {
            upstream_request.insert_header(http::header::CONNECTION, "close")?;
        }
        // Envoy's expected timeout for this attempt: the per-try timeout when it is shorter than
        // what is left of the route timeout.
        let per_try = ctx.retry.as_ref().and_then(|p| p.per_try_timeout);
        let left = ctx.route_timeout.map(|(t, start)| {
            let elapsed = Duration::from_millis(start.elapsed().as_millis() as u64);
            t.saturating_sub(elapsed)
        });
        let expected = match (per_try, left) {
            (Some(p), Some(l)) => Some(p.min(l)),
            (p, l) => p.or(l),
        };
        if let Some(t) = expected.filter(|t| !t.is_zero()) {
            upstream_request
                .insert_header("x-envoy-expected-rq-timeout-ms", t.as_millis().to_string())?;
        }
        // Envoy's HTTP/1 encoder announces an empty body (`content-length: 0`) on a headers-only
        // request unless the method never carries one. An HTTP/1 request without framing
        // headers has no body.
        let h1_upstream = ctx
            .cluster
            .as_ref()
            .is_some_and(|c| !c.config.http2 && !c.config.use_downstream_protocol);
        // Pingora has already dropped hop-by-hop framing from the upstream copy: look at the
        // request as received.
        let h = &session.req_header().headers;
        if h1_upstream
            && !session.as_downstream().is_http2()
            && !h.contains_key(http::header::CONTENT_LENGTH)
            && !h.contains_key(http::header::TRANSFER_ENCODING)
            && !matches!(
                upstream_request.method,
                http::Method::GET
                    | http::Method::HEAD
                    | http::Method::DELETE
                    | http::Method::TRACE
                    | http::Method::CONNECT
            )
        {
            upstream_request.insert_header(http::header::CONTENT_LENGTH, "0")?;
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(cluster) = ctx.cluster.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no cluster selected");
        };
        if ctx.retries > 0
            && let Some(p) = &ctx.retry
        {
            let wait = match ctx.ratelimited_backoff {
                Some(interval) => {
                    if let Some(s) = &ctx.cluster_stats {
                        s.rq_retry_backoff_ratelimited.inc();
                    }
                    pingsail_filters::retry::RateLimitedBackOff::backoff(interval, rand::random())
                }
                None => p.backoff(ctx.retries, rand::random()),
            };
            pingora_timeout::sleep(wait).await;
        }
        let attempts = ctx
            .retry
            .as_ref()
            .filter(|p| p.previous_hosts)
            .map_or(1, |p| p.host_selection_max_attempts);
        // ORIGINAL_DST: `x-envoy-original-dst-host` (with use_http_header) wins over the connection's
        // original destination.
        let from_header = cluster
            .config
            .original_dst_use_header
            .then(|| {
                session
                    .req_header()
                    .headers
                    .get("x-envoy-original-dst-host")
            })
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<SocketAddr>().ok());
        let orig = from_header.or_else(|| ctx.facts.as_ref().and_then(|f| f.original_dst));
        let Some(picked) = cluster.pick(ctx.hash, &ctx.tried, attempts, orig) else {
            ctx.failure = Some(Failure::NoHealthyUpstream);
            if let Some(s) = &ctx.cluster_stats {
                s.none_healthy.inc();
            }
            return Error::e_explain(ErrorType::ConnectNoRoute, "no healthy upstream");
        };
        let addr = picked.addr;
        if ctx.auto_host
            && let Some(h) = &picked.hostname
        {
            let req = session.req_header_mut();
            if let Some(original) = ctx.original_host.take() {
                req.insert_header("x-envoy-original-host", original)?;
            }
            set_authority(req, h)?;
        }
        let tls_socket = picked.tls.as_ref().map(|(i, _)| *i);
        let internal = picked.internal.clone();
        ctx.picked = Some(picked);
        ctx.upstream_host = Some(addr);
        ctx.tried.push(addr);
        let cfg = &cluster.config;
        let h2 = cfg.http2 || (cfg.use_downstream_protocol && session.as_downstream().is_http2());
        let tunnel = tls_socket.and_then(|i| Some((i, self.shared.tunnel.get()?)));
        let mut peer = match (tunnel, &internal) {
            // An internal listener: the tunnel connects to it (an `envoy_internal_address`
            // endpoint, e.g. Istio's `connect_originate` for HBONE destinations); pooled per
            // endpoint like any peer.
            (_, Some(ep)) => {
                let Some(tunnel) = self.shared.tunnel.get() else {
                    return Error::e_explain(ErrorType::ConnectError, "no tunnel");
                };
                let mut h = std::collections::BTreeMap::new();
                h.insert(
                    crate::tls::tunnel::H_CLUSTER.to_string(),
                    cfg.name.as_bytes().to_vec(),
                );
                h.insert(
                    crate::tls::tunnel::H_INTERNAL.to_string(),
                    ep.listener.as_bytes().to_vec(),
                );
                h.insert(
                    crate::tls::tunnel::H_ENDPOINT.to_string(),
                    ep.endpoint_id.as_bytes().to_vec(),
                );
                let path = tunnel.path().to_string_lossy().to_string();
                HttpPeer::new_proxy(&path, addr.ip(), addr.port(), false, "", h)
            }
            // TLS origination (mTLS in the mesh) goes through our tunnel; Pingora pools the tunnel
            // connections, so TLS connections are reused like plaintext ones.
            (Some((socket, tunnel)), None) => {
                let mut h = std::collections::BTreeMap::new();
                h.insert(
                    crate::tls::tunnel::H_CLUSTER.to_string(),
                    cfg.name.as_bytes().to_vec(),
                );
                let socket = if socket == usize::MAX {
                    "default".to_string()
                } else {
                    socket.to_string()
                };
                h.insert(
                    crate::tls::tunnel::H_SOCKET.to_string(),
                    socket.into_bytes(),
                );
                h.insert(
                    crate::tls::tunnel::H_HTTP.to_string(),
                    if h2 { b"2".to_vec() } else { b"1".to_vec() },
                );
                h.insert(
                    crate::tls::tunnel::H_TIMEOUT.to_string(),
                    cfg.connect_timeout.as_millis().to_string().into_bytes(),
                );
                if let Some(src) = cfg.bind_source {
                    h.insert(
                        crate::tls::tunnel::H_BIND.to_string(),
                        src.to_string().into_bytes(),
                    );
                }
                let path = tunnel.path().to_string_lossy().to_string();
                HttpPeer::new_proxy(&path, addr.ip(), addr.port(), false, "", h)
            }
            (None, None) => {
                let mut peer = HttpPeer::new(addr, false, String::new());
                if let Some(src) = cfg.bind_source {
                    let mut bind = pingora_core::connectors::l4::BindTo::default();
                    bind.addr = Some(std::net::SocketAddr::new(src, 0));
                    peer.options.bind_to = Some(bind);
                }
                peer
            }
        };
        // Envoy keeps one connection pool per cluster: two clusters on the same endpoint do not
        // share upstream connections.
        peer.group_key = xxhash_rust::xxh64::xxh64(cfg.name.as_bytes(), 0);
        // original_src (TPROXY): connect from the client's address; pools are per source address.
        if tunnel.is_none()
            && internal.is_none()
            && let Some(src) = ctx.facts.as_ref().and_then(|f| f.upstream_src)
            && src.addr.is_ipv4() == addr.is_ipv4()
        {
            peer.options.bind_to = None;
            peer.options.custom_l4 = Some(Arc::new(crate::tcp::TransparentConnect {
                src,
                timeout: cfg.connect_timeout,
            }));
            peer.group_key =
                xxhash_rust::xxh64::xxh64(src.addr.ip().to_string().as_bytes(), peer.group_key);
        }
        peer.options.connection_timeout = Some(cfg.connect_timeout);
        if h2 {
            peer.options.set_http_version(2, 2);
            // Envoy multiplexes without a practical stream limit on one upstream h2 connection
            // (Pingora's default is one stream per connection); `max_concurrent_streams` caps it.
            peer.options.max_h2_streams = cfg
                .conn
                .max_concurrent_streams
                .map_or(1024, |n| n.max(1) as usize);
        }
        peer.options.idle_timeout = cfg.conn.idle_timeout;
        // Route timeouts bound the wait for upstream bytes (see docs/COMPATIBILITY.md); the HCM's
        // stream_idle_timeout bounds silence when it is shorter (or when there is no route deadline).
        let route_left = ctx.deadline.map(|(deadline, kind)| {
            (
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
                kind,
            )
        });
        let idle = ctx
            .facts
            .as_ref()
            .and_then(|f| f.hcm.stream_idle_timeout)
            .map(|d| (d, Failure::StreamIdleTimeoutUpstream));
        // A route-level idle_timeout replaces the connection manager's stream_idle_timeout.
        let idle = match ctx.route().map(|(_, _, r)| &r.action) {
            Some(Action::Forward(a)) if a.idle_timeout.is_some() => a
                .idle_timeout
                .flatten()
                .map(|d| (d, Failure::StreamIdleTimeoutUpstream)),
            _ => idle,
        };
        let shorter = |a: Option<(Duration, Failure)>, b: Option<(Duration, Failure)>| match (a, b)
        {
            (Some(x), Some(y)) => Some(if y.0 < x.0 { y } else { x }),
            (x, y) => x.or(y),
        };
        let mut bound = shorter(route_left, idle);
        ctx.per_try_armed = None;
        if let Some(p) = ctx.retry.clone() {
            for (t, is_idle) in [(p.per_try_timeout, false), (p.per_try_idle_timeout, true)] {
                if let Some(t) = t
                    && bound.is_none_or(|b| t < b.0)
                {
                    bound = Some((t, Failure::UpstreamTimeout));
                    ctx.per_try_armed = Some(is_idle);
                }
            }
        }
        if let Some((d, kind)) = bound {
            peer.options.read_timeout = Some(d);
            ctx.read_timeout_kind = Some(kind);
        }
        if let Some(s) = &ctx.cluster_stats {
            s.rq_total.inc();
        }
        ctx.upstream_start = Some(Instant::now());
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(a) = &mut ctx.admitted {
            a.connected();
        }
        if !reused && let Some(s) = &ctx.cluster_stats {
            s.cx_total.inc();
        }
        #[cfg(unix)]
        if let Some(c) = &ctx.cluster {
            ctx.last_on_connection = c.last_request_on(fd, reused);
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(s) = &ctx.cluster_stats {
            s.cx_connect_fail.inc();
        }
        if let Some(a) = &mut ctx.admitted {
            a.connection_lost();
        }
        if let (Some(c), Some(p)) = (&ctx.cluster, &ctx.picked) {
            c.record(p, crate::cluster::outlier::Outcome::ConnectFailed);
        }
        ctx.picked = None;
        let retry = retry_due(ctx, Outcome::ConnectFailure);
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e;
        if std::mem::take(&mut ctx.retry_status) {
            // upstream_response_filter decided to retry a retriable status.
            e.set_retry(true);
            return e;
        }
        if let Some(a) = &mut ctx.admitted {
            a.connection_lost();
        }
        if ctx.status == 0
            && let (Some(c), Some(p)) = (&ctx.cluster, &ctx.picked)
        {
            let o = match e.etype() {
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    crate::cluster::outlier::Outcome::Timeout
                }
                _ => crate::cluster::outlier::Outcome::Reset,
            };
            c.record(p, o);
        }
        let timed_out = matches!(e.etype(), ErrorType::ReadTimedout);
        let per_try = timed_out.then_some(ctx.per_try_armed).flatten();
        if let (Some(is_idle), Some(s)) = (per_try, &ctx.cluster_stats) {
            if is_idle {
                s.rq_per_try_idle_timeout.inc();
            } else {
                s.rq_per_try_timeout.inc();
            }
        }
        let outcome = match e.etype() {
            ErrorType::H2Error => Outcome::RefusedStream,
            ErrorType::ReadTimedout => Outcome::PerTryTimeout,
            _ => Outcome::Reset,
        };
        // A route timeout or stream idle timeout ends the request; a per-try timeout may retry.
        let retry = ctx.status == 0
            && !session.as_ref().retry_buffer_truncated()
            && (!timed_out || per_try.is_some())
            && retry_due(ctx, outcome);
        if retry {
            ctx.picked = None;
        }
        e.set_retry(retry);
        e
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if resp.status.is_informational() {
            return Ok(());
        }
        let status = resp.status.as_u16();
        // Envoy's HTTP/1 codec refuses a 204 that announces a body.
        if status == 204
            && (resp.headers.contains_key(http::header::TRANSFER_ENCODING)
                || resp
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .is_some_and(|v| v.as_bytes() != b"0"))
        {
            ctx.failure = Some(Failure::UpstreamProtocolError);
            return Error::e_explain(ErrorType::InvalidHTTPHeader, "204 response with a body");
        }
        if let (Some(c), Some(p)) = (&ctx.cluster, &ctx.picked) {
            c.record(p, crate::cluster::outlier::Outcome::Status(status));
        }
        if ctx.retry.is_some() {
            let grpc_status = resp
                .headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let headers_hit = ctx.retry.as_ref().is_some_and(|p| {
                // `envoy-ratelimited`: the upstream (an Envoy rate limiter) set x-envoy-ratelimited.
                (p.on
                    .contains(pingsail_filters::retry::RetryOn::ENVOY_RATELIMITED)
                    && resp.headers.contains_key("x-envoy-ratelimited"))
                    || !p.retriable_headers.is_empty()
                        && p.retriable_response_headers(&RequestView {
                            path: "",
                            method: "",
                            authority: "",
                            scheme: "http",
                            headers: &resp.headers,
                            is_grpc: false,
                            random: 0,
                        })
            });
            if retry_due_or(
                ctx,
                Outcome::Response {
                    status,
                    grpc_status,
                },
                headers_hit,
            ) {
                ctx.picked = None;
                if let Some(rl) = ctx.retry.as_ref().and_then(|p| p.rate_limited.as_ref())
                    && let Some(d) = rl.interval(&resp.headers, SystemTime::now())
                    && d > Duration::from_millis(1)
                {
                    ctx.ratelimited_backoff = Some(d);
                }
                if let Some(s) = &ctx.cluster_stats
                    && let Some(i) = class_index(status)
                {
                    s.rq_class[i].inc();
                }
                ctx.retry_status = true;
                let mut e =
                    Error::explain(ErrorType::HTTPStatus(status), "retriable upstream status");
                e.set_retry(true);
                return Err(e);
            }
        }
        if let Some(s) = &ctx.cluster_stats
            && let Some(i) = class_index(status)
        {
            s.rq_class[i].inc();
        }
        if let Some(t) = ctx.upstream_start {
            resp.insert_header(
                "x-envoy-upstream-service-time",
                t.elapsed().as_millis().to_string(),
            )?;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        // The route timeout (or max_stream_duration) lasts until the response is complete, as
        // Envoy's: a body still arriving past the deadline resets the stream (the response has
        // started, so there is no local reply). Pingora has no response timer, so the deadline is
        // checked as each body chunk arrives.
        if let Some((deadline, kind)) = ctx.deadline
            && Instant::now() >= deadline
        {
            ctx.failure = Some(kind);
            ctx.read_timeout_kind = None;
            ctx.per_try_armed = None;
            return Error::e_explain(ErrorType::ReadTimedout, "route timeout during the body");
        }
        Ok(None)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        let Some(t) = &mut ctx.throttle else {
            return Ok(None);
        };
        Ok(t.take(body.as_ref().map_or(0, Bytes::len), Instant::now()))
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if resp.status.is_informational() {
            return Ok(());
        }
        finalize_response(ctx, resp);
        self.decorate_response(ctx, resp);
        drain_if_expired(session, ctx);
        if ctx.upstream_start.is_some()
            && ctx
                .route()
                .is_some_and(|(_, vh, _)| vh.attempt_count_in_response)
        {
            resp.insert_header("x-envoy-attempt-count", (ctx.retries + 1).to_string())?;
        }
        ctx.status = resp.status.as_u16();
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        // The one rescue point: a typed failure recorded by a phase wins; otherwise classify Pingora's.
        let failure = match (ctx.failure, e.esource()) {
            (Some(f), _) => Some(f),
            (None, pingora_error::ErrorSource::Upstream) => Some(Failure::from_pingora(e)),
            (None, pingora_error::ErrorSource::Downstream) => match e.etype() {
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => None,
                ErrorType::ReadTimedout => Some(match ctx.request_deadline {
                    Some(d) if Instant::now() >= d => Failure::RequestTimeout,
                    _ => Failure::StreamIdleTimeout,
                }),
                _ => Some(Failure::BadRequest),
            },
            (None, _) => match e.etype() {
                ErrorType::HTTPStatus(s) if *s >= 500 => Some(Failure::ConnectionTermination),
                ErrorType::ConnectRefused => Some(Failure::ConnectRefused),
                ErrorType::ConnectTimedout | ErrorType::ConnectError => {
                    Some(Failure::ConnectFailure)
                }
                ErrorType::ReadTimedout => Some(Failure::UpstreamTimeout),
                _ => Some(Failure::ConnectionTermination),
            },
        };
        // A read timeout means whichever bound upstream_peer armed: route deadline or stream idle.
        let failure = match (failure, ctx.read_timeout_kind) {
            (Some(Failure::UpstreamTimeout), Some(kind)) => Some(kind),
            (f, _) => f,
        };
        let Some(f) = failure else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        if f == Failure::UpstreamTimeout
            && ctx.per_try_armed.is_none()
            && let Some(s) = &ctx.cluster_stats
        {
            s.rq_timeout.inc();
        }
        ctx.failure = Some(f);
        let code = f.status();
        // Pingora does not reuse the downstream connection after an upstream-phase error; say so.
        session.set_keepalive(None);
        let body = if ctx.retries > 0 {
            f.body_after_retries()
        } else {
            f.body()
        };
        // A route deadline that expires once the response has started resets the stream; Envoy
        // then closes the HTTP/1 connection after its `delayed_close_timeout` (the bytes already
        // forwarded stay; the client sees the connection end then).
        if ctx.status != 0
            && matches!(f, Failure::UpstreamTimeout | Failure::StreamDuration)
            && !session.as_downstream().is_http2()
            && let Some(d) = ctx.facts.as_ref().and_then(|f| f.hcm.delayed_close_timeout)
        {
            pingora_timeout::sleep(d).await;
        }
        if ctx.status == 0
            && let Err(err) = self
                .local_reply(session, ctx, code, body.as_bytes(), &[])
                .await
        {
            tracing::debug!("failed to send local reply: {err}");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        true
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let Some(facts) = ctx.facts.clone() else {
            return;
        };
        if let Some(i) = class_index(ctx.status) {
            facts.stats.rq_class[i].inc();
        }
        if facts.hcm.access_logs.is_empty() {
            return;
        }
        let req = session.req_header();
        let flags_buf = response_flags(ctx);
        let flags = flags_buf.as_str();
        let path = String::from_utf8_lossy(req.raw_path());
        let resp = session.response_written().map(|r| &r.headers);
        let entry = Entry {
            start: Some(ctx.start_time),
            req: Some(&req.headers),
            resp,
            pseudo: (
                req.method.as_str(),
                &path,
                authority(req),
                protocol(session),
            ),
            status: ctx.status,
            flags,
            bytes_received: session.as_downstream().body_bytes_read() as u64,
            bytes_sent: session.as_downstream().body_bytes_sent() as u64,
            duration_ms: ctx.start.elapsed().as_millis() as u64,
            upstream_host: ctx.upstream_host.map(|a| a.to_string()),
            upstream_cluster: ctx.cluster.as_ref().map(|c| c.config.name.as_str()),
            downstream_remote: Some(facts.remote.to_string()),
            downstream_local: Some(facts.local.to_string()),
            route_name: ctx
                .route()
                .map(|(_, _, r)| r.name.as_str())
                .filter(|n| !n.is_empty()),
            details: ctx.failure.map(|f| f.details()).or(Some("via_upstream")),
        };
        for log in &facts.hcm.access_logs {
            log.write(&entry);
        }
    }
}

/// `%RESPONSE_FLAGS%`: Envoy 1.40 prints the flags in the order they were raised: the events
/// of the request (DI, URX, UO), then the final failure's flag; `-` for none.
fn response_flags(ctx: &RequestCtx) -> String {
    let mut out = String::new();
    let failure = ctx.failure.map(|f| f.flag()).filter(|f| *f != "-");
    for f in ctx.flag_events.iter().flatten().copied().chain(failure) {
        if out.split(',').any(|x| x == f) {
            continue;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(f);
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

/// A retry condition matched: decides whether the retry happens (the policy's `num_retries`, the
/// cluster's `max_retries` breaker) and keeps Envoy's counters.
fn retry_due(ctx: &mut RequestCtx, outcome: Outcome) -> bool {
    retry_due_or(ctx, outcome, false)
}

/// [`retry_due`], with `also` as one more retriable condition (`retriable-headers`).
fn retry_due_or(ctx: &mut RequestCtx, outcome: Outcome, also: bool) -> bool {
    let Some(p) = &ctx.retry else {
        return false;
    };
    if !(also || p.retriable(outcome)) {
        // A retried attempt ended in something not worth retrying: the retry succeeded.
        if ctx.retry_slot.take().is_some()
            && let Some(s) = &ctx.cluster_stats
        {
            s.rq_retry_success.inc();
        }
        return false;
    }
    if ctx.retries >= p.num_retries {
        ctx.raise("URX");
        if let Some(s) = &ctx.cluster_stats {
            s.rq_retry_limit_exceeded.inc();
        }
        return false;
    }
    // The previous retry (if any) is over; this one needs a slot of its own.
    ctx.retry_slot = None;
    match ctx.cluster.as_ref().and_then(|c| c.retry_slot()) {
        Some(slot) => ctx.retry_slot = Some(slot),
        None => {
            ctx.raise("UO");
            if let Some(s) = &ctx.cluster_stats {
                s.rq_retry_overflow.inc();
            }
            return false;
        }
    }
    ctx.retries += 1;
    if let Some(s) = &ctx.cluster_stats {
        s.rq_retry.inc();
    }
    true
}

/// HCM `max_connection_duration` on an HTTP/1 downstream connection: once it is over, the
/// response in hand closes the connection (`connection: close`, Envoy's drain); before, an idle
/// keep-alive wait ends no later than the expiry (rounded up to Pingora's whole seconds).
fn drain_if_expired(session: &mut Session, ctx: &RequestCtx) {
    let Some(max) = ctx
        .facts
        .as_ref()
        .and_then(|f| f.hcm.max_connection_duration)
    else {
        return;
    };
    if session.as_downstream().is_http2() {
        return;
    }
    let Some(established) = session
        .as_downstream()
        .digest()
        .and_then(|d| d.timing_digest.first().cloned().flatten())
        .map(|t| t.established_ts)
    else {
        return;
    };
    let age = SystemTime::now()
        .duration_since(established)
        .unwrap_or_default();
    match max.checked_sub(age).filter(|left| !left.is_zero()) {
        None => session.set_keepalive(None),
        Some(left) => {
            // Only ever shorten the keep-alive wait (never re-enable a closing connection).
            let left = left.as_secs_f64().ceil() as u64;
            let shorter = match session.as_downstream().get_keepalive() {
                None => false,
                Some(0) => true,
                Some(current) => left < current,
            };
            if shorter {
                session.set_keepalive(Some(left));
            }
        }
    }
}

/// The downstream read timeout: the stream idle bound, shortened to what is left until the request
/// deadline.
fn downstream_read_bound(idle: Option<Duration>, deadline: Option<Instant>) -> Option<Duration> {
    let left = deadline.map(|d| {
        d.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    });
    match (idle, left) {
        (Some(i), Some(l)) => Some(i.min(l)),
        (i, l) => i.or(l),
    }
}

fn set_authority(req: &mut RequestHeader, host: &str) -> Result<()> {
    req.insert_header(http::header::HOST, host)?;
    if req.uri.authority().is_some() {
        let mut parts = req.uri.clone().into_parts();
        parts.authority = host.parse().ok();
        if let Ok(uri) = http::Uri::from_parts(parts) {
            req.set_uri(uri);
        }
    }
    Ok(())
}

/// `x-forwarded-client-cert` as Envoy's `forward_client_cert_details` /
/// `set_current_client_cert_details` define it.
fn xfcc(
    req: &mut pingora_http::RequestHeader,
    cfg: &crate::config::Xfcc,
    facts: &ConnFacts,
) -> pingora_error::Result<()> {
    use crate::config::XfccMode as M;
    const NAME: &str = "x-forwarded-client-cert";
    let mtls = facts.peer_certs.as_ref().filter(|c| !c.is_empty());
    let Some(certs) = mtls else {
        if cfg.mode != M::AlwaysForwardOnly {
            req.remove_header(NAME);
        }
        return Ok(());
    };
    let current = || {
        let leaf = &certs[0];
        let mut parts = Vec::new();
        if let Some(by) = &facts.local_uri {
            parts.push(format!("By={by}"));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, leaf);
        let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        parts.push(format!("Hash={hash}"));
        let pem = |der: &[u8]| {
            use base64::Engine as _;
            let b = base64::engine::general_purpose::STANDARD.encode(der);
            let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
            for chunk in b.as_bytes().chunks(64) {
                s.push_str(&String::from_utf8_lossy(chunk));
                s.push('\n');
            }
            s.push_str("-----END CERTIFICATE-----\n");
            s
        };
        let url = |s: &str| -> String {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        if cfg.cert {
            parts.push(format!("Cert=\"{}\"", url(&pem(leaf))));
        }
        if cfg.chain {
            let all: String = certs.iter().map(|c| pem(c)).collect();
            parts.push(format!("Chain=\"{}\"", url(&all)));
        }
        let sans = crate::tls::sans(&rustls::pki_types::CertificateDer::from(leaf.as_slice()));
        if cfg.subject {
            parts.push(format!("Subject=\"{}\"", crate::tls::subject_rfc2253(leaf)));
        }
        if cfg.uri {
            for u in sans.iter().filter(|s| s.contains("://")) {
                parts.push(format!("URI={u}"));
            }
        }
        if cfg.dns {
            for d in sans.iter().filter(|s| !s.contains("://")) {
                parts.push(format!("DNS={d}"));
            }
        }
        parts.join(";")
    };
    match cfg.mode {
        M::Sanitize => {
            req.remove_header(NAME);
        }
        M::ForwardOnly | M::AlwaysForwardOnly => {}
        M::SanitizeSet => {
            req.insert_header(NAME, current())?;
        }
        M::AppendForward => {
            let v = match req.headers.get(NAME).and_then(|v| v.to_str().ok()) {
                Some(prev) if !prev.is_empty() => format!("{prev},{}", current()),
                _ => current(),
            };
            req.insert_header(NAME, v)?;
        }
    }
    Ok(())
}
