// SPDX-License-Identifier: Apache-2.0
//! Role-based access control with Envoy's semantics (`envoy.config.rbac.v3.RBAC`): the `Permission`
//! and `Principal` trees, policies, ALLOW / DENY / LOG actions, shadow rules and per-route overrides.
//!
//! Configurations are compiled once (regexes, CIDRs, lower-cased literals); evaluation reads borrowed
//! request facts ([`Input`]) and does not allocate.

use crate::matcher::{HeaderMatcher, HeaderSource, Pseudo, StringMatcher};
use crate::metadata::{DynamicMetadata, MetadataMatcher, Value};
use std::net::{IpAddr, SocketAddr};

/// `envoy.config.core.v3.CidrRange`, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// A range; `None` if `len` is longer than the address (Envoy rejects that).
    pub fn new(addr: IpAddr, len: u32) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Cidr {
            addr,
            len: len as u8,
        })
    }

    /// Is `ip` inside? An IPv4 range never matches an IPv6 address and vice versa.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// A compiled `Permission`.
#[derive(Debug, Clone)]
pub enum Permission {
    /// `and_rules`
    And(Vec<Permission>),
    /// `or_rules`
    Or(Vec<Permission>),
    /// `not_rule`
    Not(Box<Permission>),
    /// `any`
    Any,
    /// `header`
    Header(HeaderMatcher),
    /// `url_path`: the path without query or fragment.
    UrlPath(StringMatcher),
    /// `destination_ip`
    DestinationIp(Cidr),
    /// `destination_port`
    DestinationPort(u32),
    /// `destination_port_range` (`start <= port < end`)
    DestinationPortRange(u32, u32),
    /// `metadata`
    Metadata(MetadataMatcher),
    /// `requested_server_name`
    RequestedServerName(StringMatcher),
}

/// A compiled `Principal`.
#[derive(Debug, Clone)]
pub enum Principal {
    /// `and_ids`
    And(Vec<Principal>),
    /// `or_ids`
    Or(Vec<Principal>),
    /// `not_id`
    Not(Box<Principal>),
    /// `any`
    Any,
    /// `authenticated` with an optional `principal_name`.
    Authenticated(Option<StringMatcher>),
    /// `source_ip` (the connection's remote address)
    SourceIp(Cidr),
    /// `direct_remote_ip`
    DirectRemoteIp(Cidr),
    /// `remote_ip` (the client address the connection manager derived, e.g. from XFF)
    RemoteIp(Cidr),
    /// `header`
    Header(HeaderMatcher),
    /// `url_path`
    UrlPath(StringMatcher),
    /// `metadata`
    Metadata(MetadataMatcher),
    /// `filter_state` with a string matcher.
    FilterState(String, StringMatcher),
}

/// What the engine can see of a request or connection. Everything is borrowed.
pub struct Input<'a, H: HeaderSource> {
    /// Request headers (and pseudo-headers); for the network filter an empty source.
    pub headers: &'a H,
    /// Our address as the client addressed it (the original destination when captured).
    pub local: SocketAddr,
    /// The peer of the TCP connection.
    pub direct_remote: SocketAddr,
    /// The client address the connection manager settled on (XFF rules); `direct_remote` otherwise.
    pub remote: IpAddr,
    /// TLS SNI, empty without TLS.
    pub sni: &'a str,
    /// The verified peer identity (URI SAN of the client certificate); `None` on plaintext.
    pub peer_principal: Option<&'a str>,
    /// Connection and stream filter state visible as strings (`io.istio.peer_principal` …).
    pub filter_state: &'a [(&'a str, &'a str)],
    /// Dynamic metadata written by earlier filters (jwt_authn payloads …).
    pub metadata: &'a DynamicMetadata,
}

impl<H: HeaderSource> Input<'_, H> {
    fn url_path(&self) -> Option<&str> {
        let p = self.headers.pseudo(Pseudo::Path)?;
        let end = p.find(['?', '#']).unwrap_or(p.len());
        Some(&p[..end])
    }
}

impl Permission {
    /// Does the request match?
    pub fn matches<H: HeaderSource>(&self, i: &Input<'_, H>) -> bool {
        match self {
            Permission::And(rs) => rs.iter().all(|r| r.matches(i)),
            Permission::Or(rs) => rs.iter().any(|r| r.matches(i)),
            Permission::Not(r) => !r.matches(i),
            Permission::Any => true,
            Permission::Header(h) => h.matches(i.headers),
            Permission::UrlPath(m) => i.url_path().is_some_and(|p| m.matches(p)),
            Permission::DestinationIp(c) => c.contains(i.local.ip()),
            Permission::DestinationPort(p) => u32::from(i.local.port()) == *p,
            Permission::DestinationPortRange(s, e) => (*s..*e).contains(&u32::from(i.local.port())),
            Permission::Metadata(m) => m.matches(i.metadata),
            Permission::RequestedServerName(m) => m.matches(i.sni),
        }
    }
}

impl Principal {
    /// Does the requester match?
    pub fn matches<H: HeaderSource>(&self, i: &Input<'_, H>) -> bool {
        match self {
            Principal::And(ps) => ps.iter().all(|p| p.matches(i)),
            Principal::Or(ps) => ps.iter().any(|p| p.matches(i)),
            Principal::Not(p) => !p.matches(i),
            Principal::Any => true,
            Principal::Authenticated(m) => match (i.peer_principal, m) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(p), Some(m)) => m.matches(p),
            },
            Principal::SourceIp(c) | Principal::DirectRemoteIp(c) => {
                c.contains(i.direct_remote.ip())
            }
            Principal::RemoteIp(c) => c.contains(i.remote),
            Principal::Header(h) => h.matches(i.headers),
            Principal::UrlPath(m) => i.url_path().is_some_and(|p| m.matches(p)),
            Principal::Metadata(m) => m.matches(i.metadata),
            Principal::FilterState(key, m) => i
                .filter_state
                .iter()
                .find(|(k, _)| k == key)
                .is_some_and(|(_, v)| m.matches(v)),
        }
    }
}

/// One named policy: any permission and any principal.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The policy name (the effective policy id when it matches).
    pub name: String,
    /// `permissions` (OR)
    pub permissions: Vec<Permission>,
    /// `principals` (OR)
    pub principals: Vec<Principal>,
}

impl Policy {
    fn matches<H: HeaderSource>(&self, i: &Input<'_, H>) -> bool {
        self.permissions.iter().any(|p| p.matches(i))
            && self.principals.iter().any(|p| p.matches(i))
    }
}

/// `RBAC.action`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Allow only what a policy matches.
    Allow,
    /// Deny what a policy matches.
    Deny,
    /// Allow everything; record whether a policy matched.
    Log,
}

/// A compiled `envoy.config.rbac.v3.RBAC` (one engine).
#[derive(Debug, Clone)]
pub struct Engine {
    /// `action`
    pub action: Action,
    /// Policies in name order: Envoy keeps them in an ordered map, so the first match by name is the
    /// effective policy.
    policies: Vec<Policy>,
}

/// The verdict of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'a> {
    /// Let the request through?
    pub allowed: bool,
    /// The policy that matched, if any.
    pub policy: Option<&'a str>,
}

impl Engine {
    /// An engine; policies are sorted by name here.
    pub fn new(action: Action, mut policies: Vec<Policy>) -> Engine {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        Engine { action, policies }
    }

    /// Policies, in evaluation (name) order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Evaluates the request.
    pub fn evaluate<H: HeaderSource>(&self, i: &Input<'_, H>) -> Verdict<'_> {
        let policy = self
            .policies
            .iter()
            .find(|p| p.matches(i))
            .map(|p| p.name.as_str());
        let allowed = match self.action {
            Action::Allow => policy.is_some(),
            Action::Deny => policy.is_none(),
            Action::Log => true,
        };
        Verdict { allowed, policy }
    }
}

/// A compiled RBAC filter (HTTP or network): enforced rules, shadow rules and stat prefixes.
#[derive(Debug, Clone, Default)]
pub struct RbacConfig {
    /// `rules`; `None` = no enforcement (everything allowed).
    pub rules: Option<Engine>,
    /// `shadow_rules`
    pub shadow: Option<Engine>,
    /// `rules_stat_prefix`
    pub rules_stat_prefix: String,
    /// `shadow_rules_stat_prefix`
    pub shadow_stat_prefix: String,
}

/// What the filter decided and what it records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    /// Let the request (or connection) through?
    pub allowed: bool,
    /// Enforced engine verdict (`None` without `rules`).
    pub enforced: Option<Verdict<'a>>,
    /// Shadow engine verdict (`None` without `shadow_rules`).
    pub shadow: Option<Verdict<'a>>,
}

impl RbacConfig {
    /// Runs the shadow engine (never enforced) and the enforced engine.
    pub fn decide<H: HeaderSource>(&self, i: &Input<'_, H>) -> Decision<'_> {
        let shadow = self.shadow.as_ref().map(|e| e.evaluate(i));
        let enforced = self.rules.as_ref().map(|e| e.evaluate(i));
        Decision {
            allowed: enforced.is_none_or(|v| v.allowed),
            enforced,
            shadow,
        }
    }

    /// Writes Envoy's dynamic metadata for a decision under `filter`
    /// (`envoy.filters.http.rbac` / `envoy.filters.network.rbac`): the shadow result and effective
    /// policy id (prefixed with `shadow_rules_stat_prefix`), the enforced ones (prefixed with
    /// `rules_stat_prefix`), and `envoy.common.access_log_hint` for a LOG action.
    pub fn record(&self, d: &Decision<'_>, filter: &str, md: &mut DynamicMetadata) {
        let result =
            |allowed: bool| Value::String(if allowed { "allowed" } else { "denied" }.into());
        if let Some(v) = d.shadow {
            if let Some(p) = v.policy {
                let key = format!("{}shadow_effective_policy_id", self.shadow_stat_prefix);
                md.set(filter, &key, Value::String(p.to_owned()));
            }
            let key = format!("{}shadow_engine_result", self.shadow_stat_prefix);
            md.set(filter, &key, result(v.allowed));
        }
        if let Some(v) = d.enforced {
            if let Some(e) = &self.rules
                && e.action == Action::Log
            {
                md.set(
                    "envoy.common",
                    "access_log_hint",
                    Value::Bool(v.policy.is_some()),
                );
                return;
            }
            if let Some(p) = v.policy {
                let key = format!("{}enforced_effective_policy_id", self.rules_stat_prefix);
                md.set(filter, &key, Value::String(p.to_owned()));
            }
            let key = format!("{}enforced_engine_result", self.rules_stat_prefix);
            md.set(filter, &key, result(v.allowed));
        }
    }
}

/// `RBACPerRoute`: a route either disables the filter (`rbac` unset or without rules) or replaces
/// its configuration.
#[derive(Debug, Clone)]
pub enum PerRoute {
    /// The filter does nothing on this route.
    Disabled,
    /// This route uses its own configuration.
    Override(std::sync::Arc<RbacConfig>),
}

/// A header source with no headers (the network filter's view).
pub struct NoHeaders;

impl HeaderSource for NoHeaders {
    fn header(&self, _: &http::HeaderName) -> Option<std::borrow::Cow<'_, str>> {
        None
    }
    fn pseudo(&self, _: Pseudo) -> Option<&str> {
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::matcher::{StringMatch, ValueMatch, compile_full};
    use crate::metadata::ValueMatcher;

    struct Req {
        headers: http::HeaderMap,
        path: &'static str,
        method: &'static str,
        authority: &'static str,
    }

    impl HeaderSource for Req {
        fn header(&self, name: &http::HeaderName) -> Option<std::borrow::Cow<'_, str>> {
            self.headers
                .get(name)
                .map(|v| std::borrow::Cow::Borrowed(v.to_str().unwrap()))
        }
        fn pseudo(&self, p: Pseudo) -> Option<&str> {
            Some(match p {
                Pseudo::Path => self.path,
                Pseudo::Method => self.method,
                Pseudo::Authority => self.authority,
                Pseudo::Scheme => "http",
            })
        }
    }

    fn req(method: &'static str, path: &'static str) -> Req {
        Req {
            headers: http::HeaderMap::new(),
            path,
            method,
            authority: "svc",
        }
    }

    fn input<'a>(r: &'a Req, md: &'a DynamicMetadata) -> Input<'a, Req> {
        Input {
            headers: r,
            local: "10.0.0.5:9080".parse().unwrap(),
            direct_remote: "192.168.1.7:40000".parse().unwrap(),
            remote: "203.0.113.9".parse().unwrap(),
            sni: "",
            peer_principal: None,
            filter_state: &[],
            metadata: md,
        }
    }

    fn s(kind: StringMatch) -> StringMatcher {
        StringMatcher::new(kind, false)
    }

    fn method(m: &str) -> Permission {
        Permission::Header(HeaderMatcher {
            name: http::HeaderName::from_static("x-unused"),
            pseudo: Some(Pseudo::Method),
            value: ValueMatch::String(s(StringMatch::Exact(m.into()))),
            invert: false,
            missing_as_empty: false,
        })
    }

    fn policy(name: &str, perms: Vec<Permission>, princs: Vec<Principal>) -> Policy {
        Policy {
            name: name.into(),
            permissions: perms,
            principals: princs,
        }
    }

    #[test]
    fn cidr() {
        let c = Cidr::new("10.0.0.0".parse().unwrap(), 8).unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.1.2.3".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let all = Cidr::new("0.0.0.0".parse().unwrap(), 0).unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6 = Cidr::new("2001:db8::".parse().unwrap(), 32).unwrap();
        assert!(v6.contains("2001:db8::1".parse().unwrap()));
        assert!(Cidr::new("10.0.0.0".parse().unwrap(), 33).is_none());
    }

    #[test]
    fn allow_and_deny() {
        let md = DynamicMetadata::default();
        let admin = Permission::UrlPath(s(StringMatch::Prefix("/admin".into())));
        let deny = Engine::new(
            Action::Deny,
            vec![policy(
                "deny-admin",
                vec![admin.clone()],
                vec![Principal::Any],
            )],
        );
        let r = req("GET", "/admin/x?y=1");
        let v = deny.evaluate(&input(&r, &md));
        assert_eq!(
            v,
            Verdict {
                allowed: false,
                policy: Some("deny-admin")
            }
        );
        let r = req("GET", "/public?/admin");
        assert!(deny.evaluate(&input(&r, &md)).allowed);

        let allow = Engine::new(
            Action::Allow,
            vec![policy(
                "get-only",
                vec![Permission::And(vec![
                    method("GET"),
                    Permission::Not(Box::new(admin)),
                ])],
                vec![Principal::Any],
            )],
        );
        assert!(allow.evaluate(&input(&req("GET", "/x"), &md)).allowed);
        assert!(!allow.evaluate(&input(&req("POST", "/x"), &md)).allowed);
        assert!(!allow.evaluate(&input(&req("GET", "/admin"), &md)).allowed);
        // `rules: {}`: ALLOW with no policies denies everything.
        let none = Engine::new(Action::Allow, vec![]);
        assert!(!none.evaluate(&input(&req("GET", "/x"), &md)).allowed);
        // LOG allows whatever matches.
        let log = Engine::new(
            Action::Log,
            vec![policy("p", vec![Permission::Any], vec![Principal::Any])],
        );
        assert_eq!(
            log.evaluate(&input(&req("GET", "/x"), &md)),
            Verdict {
                allowed: true,
                policy: Some("p")
            }
        );
    }

    #[test]
    fn first_policy_by_name() {
        let md = DynamicMetadata::default();
        let e = Engine::new(
            Action::Deny,
            vec![
                policy("zeta", vec![Permission::Any], vec![Principal::Any]),
                policy("alpha", vec![Permission::Any], vec![Principal::Any]),
            ],
        );
        assert_eq!(
            e.evaluate(&input(&req("GET", "/"), &md)).policy,
            Some("alpha")
        );
    }

    #[test]
    fn connection_facts() {
        let md = DynamicMetadata::default();
        let r = req("GET", "/");
        let i = input(&r, &md);
        let cidr = |s: &str, l| Cidr::new(s.parse().unwrap(), l).unwrap();
        assert!(Permission::DestinationIp(cidr("10.0.0.0", 24)).matches(&i));
        assert!(Permission::DestinationPort(9080).matches(&i));
        assert!(Permission::DestinationPortRange(9000, 9081).matches(&i));
        assert!(!Permission::DestinationPortRange(9000, 9080).matches(&i));
        assert!(Permission::RequestedServerName(s(StringMatch::Exact(String::new()))).matches(&i));
        assert!(Principal::DirectRemoteIp(cidr("192.168.0.0", 16)).matches(&i));
        assert!(Principal::SourceIp(cidr("192.168.1.7", 32)).matches(&i));
        assert!(Principal::RemoteIp(cidr("203.0.113.0", 24)).matches(&i));
        assert!(!Principal::RemoteIp(cidr("192.168.0.0", 16)).matches(&i));
        // Plaintext: no principal, so `authenticated` never matches, not even without a name.
        assert!(!Principal::Authenticated(None).matches(&i));
        let spiffe = s(StringMatch::Exact(
            "spiffe://cluster.local/ns/default/sa/sleep".into(),
        ));
        assert!(!Principal::Authenticated(Some(spiffe.clone())).matches(&i));
        assert!(Principal::Not(Box::new(Principal::Authenticated(None))).matches(&i));
        let mut i = i;
        i.peer_principal = Some("spiffe://cluster.local/ns/default/sa/sleep");
        assert!(Principal::Authenticated(Some(spiffe.clone())).matches(&i));
        assert!(
            !Principal::FilterState("io.istio.peer_principal".into(), spiffe.clone()).matches(&i)
        );
        i.filter_state = &[(
            "io.istio.peer_principal",
            "spiffe://cluster.local/ns/default/sa/sleep",
        )];
        assert!(Principal::FilterState("io.istio.peer_principal".into(), spiffe).matches(&i));
        let re = s(StringMatch::Regex(compile_full(".*/ns/test/.*").unwrap()));
        assert!(!Principal::FilterState("io.istio.peer_principal".into(), re).matches(&i));
    }

    #[test]
    fn network_view_has_no_headers() {
        let md = DynamicMetadata::default();
        let i = Input {
            headers: &NoHeaders,
            local: "10.0.0.5:9080".parse().unwrap(),
            direct_remote: "192.168.1.7:40000".parse().unwrap(),
            remote: "192.168.1.7".parse().unwrap(),
            sni: "",
            peer_principal: None,
            filter_state: &[],
            metadata: &md,
        };
        assert!(!method("GET").matches(&i));
        assert!(!Permission::UrlPath(s(StringMatch::Prefix("/".into()))).matches(&i));
        assert!(Permission::Not(Box::new(method("GET"))).matches(&i));
    }

    #[test]
    fn shadow_and_metadata() {
        let mut md = DynamicMetadata::default();
        let cfg = RbacConfig {
            rules: None,
            shadow: Some(Engine::new(
                Action::Deny,
                vec![policy(
                    "istio-ext-authz-ns[default]-policy[x]-rule[0]",
                    vec![Permission::UrlPath(s(StringMatch::Prefix("/info".into())))],
                    vec![Principal::Any],
                )],
            )),
            rules_stat_prefix: String::new(),
            shadow_stat_prefix: "istio_ext_authz_".into(),
        };
        let r = req("GET", "/info");
        let d = cfg.decide(&input(&r, &md));
        assert!(d.allowed);
        assert_eq!(d.shadow.map(|v| v.allowed), Some(false));
        cfg.record(&d, "envoy.filters.http.rbac", &mut md);
        let id = ValueMatcher::String(s(StringMatch::Prefix("istio-ext-authz".into())));
        let m = MetadataMatcher {
            filter: "envoy.filters.http.rbac".into(),
            path: vec!["istio_ext_authz_shadow_effective_policy_id".into()],
            value: id,
            invert: false,
        };
        assert!(m.matches(&md));
        assert_eq!(
            md.lookup(
                "envoy.filters.http.rbac",
                &["istio_ext_authz_shadow_engine_result"]
            ),
            Some(&Value::String("denied".into()))
        );
        // No rules at all: nothing is enforced.
        assert!(RbacConfig::default().decide(&input(&r, &md)).allowed);
    }
}
