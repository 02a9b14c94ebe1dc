// SPDX-License-Identifier: Apache-2.0
//! Route tables: virtual host selection by domain, first-match route selection, and the route actions
//! (forward, redirect, direct response) with Envoy's semantics.

use crate::cors::CorsPolicy;
use crate::headers::HeaderOps;
use crate::matcher::{HeaderMatcher, HeaderSource, QueryMatcher, full_match};
use crate::retry::RetryPolicy;
use arcstr::ArcStr;
use regex::Regex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A compiled `RouteConfiguration`.
#[derive(Debug)]
pub struct RouteTable {
    /// `name` (e.g. `9080` in istiod output).
    pub name: ArcStr,
    /// Virtual hosts in configuration order.
    pub vhosts: Vec<VirtualHost>,
    /// Domain index, built once.
    domains: DomainIndex,
    /// Route-configuration level request header mutations (applied last).
    pub request_headers: HeaderOps,
    /// Route-configuration level response header mutations (applied last).
    pub response_headers: HeaderOps,
    /// `most_specific_header_mutations_wins`.
    pub most_specific_wins: bool,
    /// `ignore_port_in_host_matching`: the `:port` of the authority is dropped before matching.
    pub ignore_port_in_host_matching: bool,
}

#[derive(Debug, Default)]
struct DomainIndex {
    exact: HashMap<String, usize>,
    /// `*.example.com` / `*-bar.example.com` stored as the suffix without '*', longest first.
    suffix: Vec<(String, usize)>,
    /// `foo.*` stored as the prefix without '*', longest first.
    prefix: Vec<(String, usize)>,
    any: Option<usize>,
}

/// Returned by [`RouteTable::new`] for a configuration Envoy would reject.
#[derive(Debug, thiserror::Error)]
pub enum RouteTableError {
    /// Two virtual hosts claim the same domain.
    #[error(
        "virtual_hosts[{index}].domains: domain '{domain}' is already used by another virtual host"
    )]
    DuplicateDomain {
        /// vhost index
        index: usize,
        /// the domain
        domain: String,
    },
    /// A wildcard in the middle of a domain.
    #[error("virtual_hosts[{index}].domains: invalid wildcard domain '{domain}'")]
    BadWildcard {
        /// vhost index
        index: usize,
        /// the domain
        domain: String,
    },
}

impl RouteTable {
    /// Builds the table and its domain index, refusing duplicate domains as Envoy does.
    pub fn new(
        name: ArcStr,
        vhosts: Vec<VirtualHost>,
        request_headers: HeaderOps,
        response_headers: HeaderOps,
        most_specific_wins: bool,
    ) -> Result<Self, RouteTableError> {
        let mut idx = DomainIndex::default();
        for (i, vh) in vhosts.iter().enumerate() {
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                let dup = if d == "*" {
                    idx.any.replace(i).is_some()
                } else if let Some(s) = d.strip_prefix('*') {
                    if idx.suffix.iter().any(|(x, _)| x == s) {
                        true
                    } else {
                        idx.suffix.push((s.to_string(), i));
                        false
                    }
                } else if let Some(p) = d.strip_suffix('*') {
                    if idx.prefix.iter().any(|(x, _)| x == p) {
                        true
                    } else {
                        idx.prefix.push((p.to_string(), i));
                        false
                    }
                } else if d.contains('*') {
                    return Err(RouteTableError::BadWildcard {
                        index: i,
                        domain: d,
                    });
                } else {
                    idx.exact.insert(d.clone(), i).is_some()
                };
                if dup {
                    return Err(RouteTableError::DuplicateDomain {
                        index: i,
                        domain: d,
                    });
                }
            }
        }
        // Longest wildcard wins; stable sort keeps configuration order among equal lengths.
        idx.suffix.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        idx.prefix.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        Ok(RouteTable {
            name,
            vhosts,
            domains: idx,
            request_headers,
            response_headers,
            most_specific_wins,
            ignore_port_in_host_matching: false,
        })
    }

    /// Selects the virtual host for a `:authority` value: exact, then longest suffix wildcard, then longest
    /// prefix wildcard, then `*` (Envoy's order). The host is compared as sent, port included.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let host = if self.ignore_port_in_host_matching {
            split_host_port(host).0
        } else {
            host
        };
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        let d = &self.domains;
        let i = d
            .exact
            .get(host)
            .copied()
            // A wildcard must match at least one character of the host.
            .or_else(|| {
                d.suffix
                    .iter()
                    .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
                    .map(|x| x.1)
            })
            .or_else(|| {
                d.prefix
                    .iter()
                    .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
                    .map(|x| x.1)
            })
            .or(d.any)?;
        self.vhosts.get(i)
    }
}

/// A compiled `VirtualHost`.
#[derive(Debug)]
pub struct VirtualHost {
    /// `name`
    pub name: ArcStr,
    /// `domains` as configured.
    pub domains: Vec<String>,
    /// Routes in order; the first match wins.
    pub routes: Vec<Route>,
    /// Virtual-host level request header mutations.
    pub request_headers: HeaderOps,
    /// Virtual-host level response header mutations.
    pub response_headers: HeaderOps,
    /// Virtual-host retry policy, used by routes without their own.
    pub retry_policy: Option<Arc<RetryPolicy>>,
    /// CORS policy (`typed_per_filter_config` for `envoy.filters.http.cors`, or the legacy field).
    pub cors: Option<Arc<CorsPolicy>>,
    /// Per-route configs of the authorization filters (`typed_per_filter_config`).
    pub authz: PerFilterAuthz,
    /// Per-filter fault config: (filter name it is keyed by, config).
    pub fault: Option<(ArcStr, Arc<crate::fault::FaultConfig>)>,
    /// `include_request_attempt_count`: `x-envoy-attempt-count` on upstream requests.
    pub attempt_count_in_request: bool,
    /// `include_attempt_count_in_response`: `x-envoy-attempt-count` on responses.
    pub attempt_count_in_response: bool,
}

impl VirtualHost {
    /// The first route whose match accepts the request.
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(req))
    }
}

/// What route matching looks at.
pub struct RequestView<'a> {
    /// `:path` as received (may include the query).
    pub path: &'a str,
    /// `:method`
    pub method: &'a str,
    /// `:authority`
    pub authority: &'a str,
    /// `:scheme`
    pub scheme: &'a str,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
    /// Whether this is a gRPC request (see [`is_grpc_content_type`]).
    pub is_grpc: bool,
    /// A uniformly random value in `0..1_000_000` for `runtime_fraction`.
    pub random: u64,
}

impl HeaderSource for RequestView<'_> {
    fn header(&self, name: &http::HeaderName) -> Option<std::borrow::Cow<'_, str>> {
        let mut it = self.headers.get_all(name).iter();
        let first = it.next()?;
        let first = first.to_str().unwrap_or("");
        match it.next() {
            None => Some(std::borrow::Cow::Borrowed(first)),
            Some(second) => {
                let mut s = String::from(first);
                s.push(',');
                s.push_str(second.to_str().unwrap_or(""));
                for v in it {
                    s.push(',');
                    s.push_str(v.to_str().unwrap_or(""));
                }
                Some(std::borrow::Cow::Owned(s))
            }
        }
    }

    fn any_value(
        &self,
        name: &http::HeaderName,
        test: &mut dyn FnMut(&str) -> bool,
    ) -> Option<bool> {
        let mut values = self.headers.get_all(name).iter().peekable();
        values.peek()?;
        Some(values.any(|v| test(v.to_str().unwrap_or(""))))
    }

    fn pseudo(&self, p: crate::matcher::Pseudo) -> Option<&str> {
        use crate::matcher::Pseudo;
        Some(match p {
            Pseudo::Authority => self.authority,
            Pseudo::Path => self.path,
            Pseudo::Method => self.method,
            Pseudo::Scheme => self.scheme,
        })
    }
}

/// Envoy's `Grpc::Common::hasGrpcContentType`: `application/grpc`, optionally followed by
/// `+suffix` or `;params` (so `application/grpc-web` is not gRPC).
pub fn is_grpc_content_type(content_type: &str) -> bool {
    const GRPC: &str = "application/grpc";
    content_type.starts_with(GRPC)
        && matches!(
            content_type.as_bytes().get(GRPC.len()),
            None | Some(b'+' | b';')
        )
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`, for local replies to gRPC requests.
pub fn http_to_grpc_status(status: u16) -> u8 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// How the path is matched.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// `prefix` (against the whole `:path`, query included, as Envoy does).
    Prefix(String),
    /// `path` (query removed).
    Exact(String),
    /// `safe_regex` (query removed, full match).
    Regex(Regex),
    /// `path_separated_prefix` (query removed; the prefix must end at '/' or the end).
    SeparatedPrefix(String),
    /// `connect_matcher`: CONNECT requests (which no path matcher matches).
    Connect,
}

/// A compiled `RouteMatch`.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    /// Path test.
    pub path: PathMatch,
    /// `case_sensitive` (default true); applies to prefix, path and path_separated_prefix.
    pub case_sensitive: bool,
    /// `headers`, all must match.
    pub headers: Vec<HeaderMatcher>,
    /// `query_parameters`, all must match.
    pub query: Vec<QueryMatcher>,
    /// `grpc: {}`
    pub grpc: bool,
    /// `runtime_fraction` default value as parts per million (runtime overrides are not supported).
    pub fraction_ppm: Option<u64>,
    /// `dynamic_metadata`, all must match the request's dynamic metadata.
    pub dynamic_metadata: Vec<crate::metadata::MetadataMatcher>,
}

impl RouteMatch {
    /// Does this match accept the request with this dynamic metadata?
    pub fn matches_with(
        &self,
        req: &RequestView<'_>,
        md: &crate::metadata::DynamicMetadata,
    ) -> bool {
        self.matches_request(req) && self.dynamic_metadata.iter().all(|m| m.matches(md))
    }

    /// Does this match accept the request (no dynamic metadata yet)?
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.matches_with(req, &crate::metadata::DynamicMetadata::default())
    }

    fn matches_request(&self, req: &RequestView<'_>) -> bool {
        let (path_only, query) = split_query(req.path);
        let connect = req.method == "CONNECT";
        let path_ok = match &self.path {
            PathMatch::Connect => connect,
            // A CONNECT request has no path: only connect_matcher routes take it (as Envoy).
            _ if connect => false,
            PathMatch::Prefix(p) => starts_with(req.path, p, self.case_sensitive),
            PathMatch::Exact(p) => {
                path_only.len() == p.len() && starts_with(path_only, p, self.case_sensitive)
            }
            PathMatch::Regex(re) => full_match(re, path_only),
            PathMatch::SeparatedPrefix(p) => {
                starts_with(path_only, p, self.case_sensitive)
                    && (path_only.len() == p.len() || path_only.as_bytes()[p.len()] == b'/')
            }
        };
        path_ok
            && (!self.grpc || req.is_grpc)
            && self.headers.iter().all(|h| h.matches(req))
            && self.query.iter().all(|q| q.matches(query))
            && self.fraction_ppm.is_none_or(|ppm| req.random < ppm)
    }
}

fn starts_with(s: &str, p: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        s.starts_with(p)
    } else {
        s.len() >= p.len() && s.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
    }
}

/// Splits `:path` into path and query (a fragment, which should never arrive, is dropped).
pub fn split_query(path: &str) -> (&str, Option<&str>) {
    let path = path.split_once('#').map_or(path, |(p, _)| p);
    match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    }
}

/// A compiled `Route`.
#[derive(Debug)]
pub struct Route {
    /// `name`
    pub name: ArcStr,
    /// `match`
    pub matcher: RouteMatch,
    /// `route` / `redirect` / `direct_response`
    pub action: Action,
    /// Route-level request header mutations (applied first).
    pub request_headers: HeaderOps,
    /// Route-level response header mutations (applied first).
    pub response_headers: HeaderOps,
    /// Per-route CORS policy, overriding the virtual host's.
    pub cors: Option<Arc<CorsPolicy>>,
    /// Per-route configs of the authorization filters (`typed_per_filter_config`).
    pub authz: PerFilterAuthz,
    /// Per-route fault config (filter name it is keyed by, config), overriding the virtual host's.
    pub fault: Option<(ArcStr, Arc<crate::fault::FaultConfig>)>,
}

/// `typed_per_filter_config` entries of the authorization filters, keyed by filter name (a route's
/// entry wins over its virtual host's).
#[derive(Debug, Default, Clone)]
pub struct PerFilterAuthz {
    /// `RBACPerRoute` by filter name.
    pub rbac: Vec<(ArcStr, crate::rbac::PerRoute)>,
    /// jwt_authn `PerRouteConfig` by filter name.
    pub jwt: Vec<(ArcStr, crate::jwt::PerRoute)>,
    /// ext_authz filters disabled by `ExtAuthzPerRoute.disabled`, by filter name.
    pub ext_authz_disabled: Vec<ArcStr>,
    /// `ExtAuthzPerRoute.check_settings.context_extensions` by filter name.
    pub ext_authz_context: Vec<(ArcStr, ContextExtensions)>,
}

/// ext_authz `context_extensions` (key, value), sorted by key.
pub type ContextExtensions = Arc<Vec<(String, String)>>;

impl PerFilterAuthz {
    /// The RBAC override for the filter named `name`.
    pub fn rbac(&self, name: &str) -> Option<&crate::rbac::PerRoute> {
        self.rbac.iter().find(|(n, _)| n == name).map(|(_, p)| p)
    }
    /// The ext_authz `context_extensions` for the filter named `name` configured here.
    pub fn ext_authz_context(&self, name: &str) -> Option<&[(String, String)]> {
        self.ext_authz_context
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.as_slice())
    }
    /// Whether the ext_authz filter named `name` is disabled here (`None`: not configured here).
    pub fn ext_authz_disabled(&self, name: &str) -> Option<bool> {
        self.ext_authz_disabled
            .iter()
            .any(|n| n == name)
            .then_some(true)
    }
    /// The jwt_authn override for the filter named `name`.
    pub fn jwt(&self, name: &str) -> Option<&crate::jwt::PerRoute> {
        self.jwt.iter().find(|(n, _)| n == name).map(|(_, p)| p)
    }
}

/// What a route does.
#[derive(Debug)]
pub enum Action {
    /// Forward upstream.
    Forward(RouteAction),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer locally.
    Direct(DirectResponse),
}

/// `direct_response`
#[derive(Debug, Clone)]
pub struct DirectResponse {
    /// status
    pub status: u16,
    /// inline body, if any
    pub body: Option<bytes_like::Body>,
}

/// A tiny owned body type so this crate does not depend on `bytes`.
pub mod bytes_like {
    /// Immutable shared body bytes.
    pub type Body = std::sync::Arc<[u8]>;
}

/// Which cluster(s) a forwarding route uses.
#[derive(Debug)]
pub enum ClusterSpecifier {
    /// `cluster`
    Cluster(ArcStr),
    /// `cluster_header`: the cluster named by this request header.
    Header(http::HeaderName),
    /// `weighted_clusters`
    Weighted(WeightedClusters),
}

/// `weighted_clusters`
#[derive(Debug)]
pub struct WeightedClusters {
    /// Entries with cumulative upper bounds for selection.
    pub clusters: Vec<WeightedCluster>,
    /// Sum of weights.
    pub total: u64,
}

/// One weighted cluster.
#[derive(Debug)]
pub struct WeightedCluster {
    /// cluster name
    pub name: ArcStr,
    /// weight
    pub weight: u64,
    /// per-cluster request header mutations (most specific level)
    pub request_headers: HeaderOps,
    /// per-cluster response header mutations
    pub response_headers: HeaderOps,
    /// per-cluster `host_rewrite_literal`
    pub host_rewrite: Option<String>,
}

impl WeightedClusters {
    /// Picks a cluster for `random` in `0..u64::MAX` (Envoy: `random % total`, then walk the
    /// cumulative weights).
    pub fn pick(&self, random: u64) -> Option<&WeightedCluster> {
        if self.total == 0 {
            return None;
        }
        let mut v = random % self.total;
        for c in &self.clusters {
            if v < c.weight {
                return Some(c);
            }
            v -= c.weight;
        }
        None
    }
}

/// `route` action.
#[derive(Debug)]
pub struct RouteAction {
    /// target
    pub cluster: ClusterSpecifier,
    /// `prefix_rewrite`
    pub prefix_rewrite: Option<String>,
    /// `regex_rewrite` (pattern, substitution)
    pub regex_rewrite: Option<(Regex, String)>,
    /// `host_rewrite_literal`
    pub host_rewrite: Option<String>,
    /// `auto_host_rewrite`
    pub auto_host_rewrite: bool,
    /// Effective upstream timeout after Envoy's precedence rules; `None` = no timeout.
    pub timeout: Option<Duration>,
    /// `max_stream_duration.max_stream_duration` when set and non-zero.
    pub max_stream_duration: Option<Duration>,
    /// Retry policy (route's own, else the virtual host's).
    pub retry_policy: Option<Arc<RetryPolicy>>,
    /// `hash_policy`
    pub hash_policy: Vec<HashPolicy>,
    /// `request_mirror_policies`: (cluster, fraction in ppm)
    pub mirrors: Vec<(ArcStr, u64)>,
    /// `max_stream_duration.grpc_timeout_header_max` (or the older `max_grpc_timeout`) present:
    /// honour the client's `grpc-timeout`.
    pub grpc_timeout: Option<GrpcTimeout>,
    /// `cluster_not_found_response_code`: 503 (default), 404 or 500.
    pub cluster_not_found_status: u16,
    /// Route-level websocket `upgrade_configs.enabled`, overriding the connection manager's.
    pub websocket: Option<bool>,
    /// Route-level CONNECT `upgrade_configs`: `enabled`, and whether `connect_config` is set (the
    /// proxy terminates the CONNECT and forwards its payload as raw TCP).
    pub connect: Option<(bool, bool)>,
    /// Istio's `connect_authority` per-route config: (`enabled`, `port`).
    pub connect_authority: Option<(bool, u16)>,
    /// `idle_timeout`: overrides the connection manager's `stream_idle_timeout` (`Some(None)` =
    /// disabled).
    pub idle_timeout: Option<Option<Duration>>,
}

/// How a `grpc-timeout` request header bounds the stream.
#[derive(Debug, Clone, Copy)]
pub struct GrpcTimeout {
    /// cap (`None` = uncapped)
    pub max: Option<Duration>,
    /// subtracted from the header's value
    pub offset: Duration,
}

impl GrpcTimeout {
    /// The stream bound for a `grpc-timeout` header value (`<digits><H|M|S|m|u|n>`), if valid and non-zero.
    pub fn bound(&self, header: &str) -> Option<Duration> {
        let (digits, unit) = header.split_at(header.len().checked_sub(1)?);
        if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        let d = match unit {
            "H" => Duration::from_secs(n * 3600),
            "M" => Duration::from_secs(n * 60),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return None,
        };
        let d = match self.max {
            Some(m) if d > m => m,
            _ => d,
        };
        let d = d.saturating_sub(self.offset);
        (!d.is_zero()).then_some(d)
    }
}

impl RouteAction {
    /// The upstream path after `prefix_rewrite` / `regex_rewrite`, or `None` if unchanged.
    pub fn rewrite_path(&self, matched: &PathMatch, path: &str) -> Option<String> {
        if let Some(new_prefix) = &self.prefix_rewrite {
            let old_len = match matched {
                PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => p.len(),
                PathMatch::Exact(p) => p.len(),
                PathMatch::Regex(_) | PathMatch::Connect => return None,
            };
            // Literal substitution, as Envoy 1.40 does: prefix "/api" rewritten to "/" turns
            // "/api/x" into "//x" (configure prefix "/api/" to get "/x").
            let rest = path.get(old_len..).unwrap_or("");
            let mut out = String::with_capacity(new_prefix.len() + rest.len());
            out.push_str(new_prefix);
            out.push_str(rest);
            return Some(out);
        }
        if let Some((re, sub)) = &self.regex_rewrite {
            let (p, q) = split_query(path);
            let mut out = re.replace_all(p, sub.as_str()).into_owned();
            if let Some(q) = q {
                out.push('?');
                out.push_str(q);
            }
            return Some(out);
        }
        None
    }
}

/// `hash_policy` entries; the first one producing a hash wins unless `terminal` says otherwise.
#[derive(Debug, Clone)]
pub struct HashPolicy {
    /// What to hash.
    pub kind: HashKind,
    /// `terminal`
    pub terminal: bool,
}

/// Hash sources.
#[derive(Debug, Clone)]
pub enum HashKind {
    /// `header.header_name`
    Header(http::HeaderName),
    /// `cookie.name` (generating cookies with `ttl` is refused at translation).
    Cookie(String),
    /// `connection_properties.source_ip`
    SourceIp,
    /// `query_parameter.name`
    QueryParameter(String),
}

impl HashPolicy {
    /// Computes the request hash as Envoy does: xxHash64 of each value, combined as
    /// `(hash << 1 | hash >> 63) ^ new` across policies.
    pub fn compute(
        policies: &[HashPolicy],
        req: &RequestView<'_>,
        source_ip: Option<&str>,
    ) -> Option<u64> {
        let mut acc: Option<u64> = None;
        for p in policies {
            let h = match &p.kind {
                HashKind::Header(name) => req.header(name).map(|v| xxh(v.as_bytes())),
                HashKind::Cookie(name) => cookie(req.headers, name).map(|v| xxh(v.as_bytes())),
                HashKind::SourceIp => source_ip.map(|ip| xxh(ip.as_bytes())),
                HashKind::QueryParameter(name) => split_query(req.path).1.and_then(|q| {
                    q.split('&').find_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k == name).then(|| xxh(v.as_bytes()))
                    })
                }),
            };
            if let Some(h) = h {
                acc = Some(match acc {
                    None => h,
                    Some(a) => a.rotate_left(1) ^ h,
                });
                if p.terminal {
                    break;
                }
            }
        }
        acc
    }
}

fn xxh(b: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(b, 0)
}

fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(http::header::COOKIE).iter().find_map(|v| {
        v.to_str().ok()?.split(';').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v.trim_matches('"'))
        })
    })
}

/// `redirect` action.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// `https_redirect` (→ "https") or `scheme_redirect`.
    pub scheme: Option<String>,
    /// `host_redirect`
    pub host: Option<String>,
    /// `port_redirect`
    pub port: Option<u16>,
    /// How the path changes.
    pub path: RedirectPath,
    /// Status: 301 (default), 302, 303, 307, 308.
    pub status: u16,
    /// `strip_query`
    pub strip_query: bool,
}

/// Path part of a redirect.
#[derive(Debug, Clone)]
pub enum RedirectPath {
    /// Keep the request path.
    Keep,
    /// `path_redirect`
    Replace(String),
    /// `prefix_rewrite`
    Prefix(String),
    /// `regex_rewrite`
    Regex(Regex, String),
}

impl Redirect {
    /// Builds the `location` header value.
    pub fn location(
        &self,
        req_scheme: &str,
        authority: &str,
        path: &str,
        matched: &PathMatch,
    ) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(req_scheme);
        let (host, req_port) = split_host_port(authority);
        let host = self
            .host
            .as_deref()
            .map(|h| split_host_port(h).0)
            .unwrap_or(host);
        let host_port = match (
            self.port,
            self.host.as_deref().and_then(|h| split_host_port(h).1),
        ) {
            (Some(p), _) => Some(p.to_string()),
            (None, Some(p)) => Some(p.to_string()),
            (None, None) if self.host.is_none() => {
                // A scheme change drops the old scheme's default port (http://h:80 →
                // https://h), as Envoy does; any other port is kept.
                let old_default = if req_scheme.eq_ignore_ascii_case("https") {
                    "443"
                } else {
                    "80"
                };
                match req_port {
                    Some(p) if !scheme.eq_ignore_ascii_case(req_scheme) && p == old_default => None,
                    Some(p) => Some(p.to_string()),
                    None => None,
                }
            }
            (None, None) => None,
        };
        let (orig_path, orig_query) = split_query(path);
        let new_path = match &self.path {
            RedirectPath::Keep => orig_path.to_string(),
            RedirectPath::Replace(p) => split_query(p).0.to_string(),
            RedirectPath::Prefix(prefix) => {
                let n = match matched {
                    PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) | PathMatch::Exact(p) => {
                        p.len()
                    }
                    PathMatch::Regex(_) | PathMatch::Connect => 0,
                };
                format!("{prefix}{}", orig_path.get(n..).unwrap_or(""))
            }
            RedirectPath::Regex(re, sub) => re.replace_all(orig_path, sub.as_str()).into_owned(),
        };
        let query = if self.strip_query {
            None
        } else {
            // A `path_redirect` with its own query replaces the request's query.
            match &self.path {
                RedirectPath::Replace(p) => split_query(p).1.or(orig_query),
                _ => orig_query,
            }
        };
        let mut out = format!("{scheme}://{host}");
        if let Some(p) = host_port {
            out.push(':');
            out.push_str(&p);
        }
        out.push_str(&new_path);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets are kept whole).
pub fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.rfind("]:") {
            Some(i) => (&authority[..=i], Some(&authority[i + 2..])),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests;
