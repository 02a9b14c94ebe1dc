// SPDX-License-Identifier: Apache-2.0
//! Authorization and end-user authentication filters as configured on listeners: the HTTP
//! `jwt_authn` and `rbac` filters (run by [`crate::http`]) and the network `rbac` filter (run by
//! [`crate::listener`] before the terminal filter).

use crate::stats::{Counter, Stats};
use arcstr::ArcStr;
use pingsail_filters::jwt::JwtConfig;
use pingsail_filters::metadata::DynamicMetadata;
use pingsail_filters::rbac::{Decision, Input, NoHeaders, RbacConfig};
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
    /// `envoy.filters.http.ext_authz` with an HTTP authorization service
    ExtAuthz(Arc<HttpExtAuthz>),
}

/// `envoy.filters.http.ext_authz` (`http_service`) as configured.
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

/// Runs a chain's network RBAC filters in order; `false` = close the connection.
///
/// Envoy evaluates on the first bytes from the client; pingsail decides when the connection is
/// accepted, before any upstream connection is opened (docs/COMPATIBILITY.md).
pub fn network_allows(filters: &[Arc<NetworkRbac>], stats: &Stats, c: ConnView<'_>) -> bool {
    if filters.is_empty() {
        return true;
    }
    let metadata = DynamicMetadata::default();
    let fs: [(&str, &str); 1];
    let filter_state: &[(&str, &str)] = match c.peer_principal {
        Some(p) => {
            fs = [(PEER_PRINCIPAL_KEY, p)];
            &fs
        }
        None => &[],
    };
    let input = Input {
        headers: &NoHeaders,
        local: c.local,
        direct_remote: c.remote,
        remote: c.remote.ip(),
        sni: c.sni,
        peer_principal: c.peer_principal,
        filter_state,
        metadata: &metadata,
    };
    for f in filters {
        let d = f.config.decide(&input);
        f.stats.count(stats, &d);
        if !d.allowed {
            tracing::debug!(remote = %c.remote, policy = ?d.enforced.and_then(|v| v.policy),
                "network RBAC denied the connection");
            return false;
        }
    }
    true
}
