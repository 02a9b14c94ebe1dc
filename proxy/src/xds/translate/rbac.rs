// SPDX-License-Identifier: Apache-2.0
//! `envoy.filters.http.rbac` / `envoy.filters.network.rbac` (and `RBACPerRoute`) → compiled
//! [`RbacConfig`]s.

// istiod still emits deprecated fields (exact_match…): we translate them on purpose.
#![allow(deprecated)]

use super::common::*;
use super::route::header_matcher;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::rbac::v3 as pb;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_rbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as net_rbac;
use envoy_types::pb::envoy::r#type::matcher::v3 as m;
use pingsail_filters::metadata::{MetadataMatcher, ValueMatcher};
use pingsail_filters::rbac::{
    Action, Cidr, Engine, PerRoute, Permission, Policy, Principal, RbacConfig,
};
use std::sync::Arc;

/// Nesting bound for permission/principal trees (Envoy's proto validation has none, but a
/// hostile config must not overflow our stack).
const MAX_DEPTH: usize = 64;

/// The HTTP filter's configuration.
pub fn http_rbac(r: &http_rbac::Rbac, path: &Path) -> Result<RbacConfig> {
    only(
        r,
        path,
        &[
            "rules",
            "rules_stat_prefix",
            "shadow_rules",
            "shadow_rules_stat_prefix",
            "track_per_rule_stats",
        ],
        &[],
    )?;
    Ok(RbacConfig {
        rules: engine(r.rules.as_ref(), &path.field("rules"))?,
        shadow: engine(r.shadow_rules.as_ref(), &path.field("shadow_rules"))?,
        rules_stat_prefix: r.rules_stat_prefix.clone(),
        shadow_stat_prefix: r.shadow_rules_stat_prefix.clone(),
    })
}

/// `RBACPerRoute`: without `rbac`, or with an `rbac` that has no rules, the filter is disabled on
/// the route (Envoy treats an empty per-route RBAC as "no engine").
pub fn http_rbac_per_route(r: &http_rbac::RbacPerRoute, path: &Path) -> Result<PerRoute> {
    only(r, path, &["rbac"], &[])?;
    match &r.rbac {
        None => Ok(PerRoute::Disabled),
        Some(inner) => {
            let cfg = http_rbac(inner, &path.field("rbac"))?;
            if cfg.rules.is_none() && cfg.shadow.is_none() {
                Ok(PerRoute::Disabled)
            } else {
                Ok(PerRoute::Override(Arc::new(cfg)))
            }
        }
    }
}

/// The network filter's configuration and its `stat_prefix`.
pub fn network_rbac(r: &net_rbac::Rbac, path: &Path) -> Result<(RbacConfig, String)> {
    only(
        r,
        path,
        &[
            "rules",
            "shadow_rules",
            "shadow_rules_stat_prefix",
            "stat_prefix",
            "enforcement_type",
        ],
        &[("delay_deny", "authorization issue")],
    )?;
    for (field, e) in [("rules", &r.rules), ("shadow_rules", &r.shadow_rules)] {
        if let Some(e) = e {
            for (name, p) in &e.policies {
                let pp = path.field(field).field("policies").field(name);
                if let Some(kind) = p.permissions.iter().find_map(http_only_permission) {
                    return invalid(
                        &pp.field("permissions"),
                        format!("Found {kind} rule, not supported by RBAC network filter"),
                    );
                }
                if let Some(kind) = p.principals.iter().find_map(http_only_principal) {
                    return invalid(
                        &pp.field("principals"),
                        format!("Found {kind} rule, not supported by RBAC network filter"),
                    );
                }
            }
        }
    }
    use net_rbac::rbac::EnforcementType as E;
    if E::try_from(r.enforcement_type) != Ok(E::OneTimeOnFirstByte) {
        return err(&path.field("enforcement_type"), ErrorKind::NotSupported);
    }
    Ok((
        RbacConfig {
            rules: engine(r.rules.as_ref(), &path.field("rules"))?,
            shadow: engine(r.shadow_rules.as_ref(), &path.field("shadow_rules"))?,
            rules_stat_prefix: String::new(),
            shadow_stat_prefix: r.shadow_rules_stat_prefix.clone(),
        },
        r.stat_prefix.clone(),
    ))
}

/// The first HTTP-only rule in a permission tree (Envoy refuses them in the network filter).
fn http_only_permission(p: &pb::Permission) -> Option<&'static str> {
    use pb::permission::Rule as R;
    match &p.rule {
        Some(R::Header(_)) => Some("header"),
        Some(R::UrlPath(_)) => Some("url_path"),
        Some(R::AndRules(s)) | Some(R::OrRules(s)) => s.rules.iter().find_map(http_only_permission),
        Some(R::NotRule(r)) => http_only_permission(r),
        _ => None,
    }
}

/// The first HTTP-only identifier in a principal tree.
fn http_only_principal(p: &pb::Principal) -> Option<&'static str> {
    use pb::principal::Identifier as I;
    match &p.identifier {
        Some(I::Header(_)) => Some("header"),
        Some(I::UrlPath(_)) => Some("url_path"),
        Some(I::AndIds(s)) | Some(I::OrIds(s)) => s.ids.iter().find_map(http_only_principal),
        Some(I::NotId(r)) => http_only_principal(r),
        _ => None,
    }
}

fn engine(r: Option<&pb::Rbac>, path: &Path) -> Result<Option<Engine>> {
    let Some(r) = r else { return Ok(None) };
    only(r, path, &["action", "policies"], &[])?;
    let action = match pb::rbac::Action::try_from(r.action) {
        Ok(pb::rbac::Action::Allow) => Action::Allow,
        Ok(pb::rbac::Action::Deny) => Action::Deny,
        Ok(pb::rbac::Action::Log) => Action::Log,
        Err(_) => return invalid(&path.field("action"), "unknown action"),
    };
    let mut policies = Vec::with_capacity(r.policies.len());
    for (name, p) in &r.policies {
        let pp = path.field("policies").field(name);
        only(p, &pp, &["permissions", "principals"], &[])?;
        if p.permissions.is_empty() {
            return invalid(
                &pp.field("permissions"),
                "at least one permission is required",
            );
        }
        if p.principals.is_empty() {
            return invalid(
                &pp.field("principals"),
                "at least one principal is required",
            );
        }
        let permissions = p
            .permissions
            .iter()
            .enumerate()
            .map(|(i, x)| permission(x, &pp.at("permissions", i), 0))
            .collect::<Result<Vec<_>>>()?;
        let principals = p
            .principals
            .iter()
            .enumerate()
            .map(|(i, x)| principal(x, &pp.at("principals", i), 0))
            .collect::<Result<Vec<_>>>()?;
        policies.push(Policy {
            name: name.clone(),
            permissions,
            principals,
        });
    }
    Ok(Some(Engine::new(action, policies)))
}

fn depth_check(depth: usize, path: &Path) -> Result<()> {
    if depth > MAX_DEPTH {
        return invalid(path, format!("nested deeper than {MAX_DEPTH} levels"));
    }
    Ok(())
}

fn permission(p: &pb::Permission, path: &Path, depth: usize) -> Result<Permission> {
    use pb::permission::Rule as R;
    depth_check(depth, path)?;
    let set = |s: &pb::permission::Set, f: &str| -> Result<Vec<Permission>> {
        let sp = path.field(f);
        only(s, &sp, &["rules"], &[])?;
        s.rules
            .iter()
            .enumerate()
            .map(|(i, r)| permission(r, &sp.at("rules", i), depth + 1))
            .collect()
    };
    Ok(match &p.rule {
        Some(R::AndRules(s)) => Permission::And(set(s, "and_rules")?),
        Some(R::OrRules(s)) => Permission::Or(set(s, "or_rules")?),
        Some(R::NotRule(r)) => {
            Permission::Not(Box::new(permission(r, &path.field("not_rule"), depth + 1)?))
        }
        Some(R::Any(true)) => Permission::Any,
        Some(R::Any(false)) => return invalid(&path.field("any"), "must be true"),
        Some(R::Header(h)) => Permission::Header(header_matcher(h, &path.field("header"))?),
        Some(R::UrlPath(u)) => Permission::UrlPath(path_matcher(u, &path.field("url_path"))?),
        Some(R::DestinationIp(c)) => {
            Permission::DestinationIp(cidr(c, &path.field("destination_ip"))?)
        }
        Some(R::DestinationPort(port)) => Permission::DestinationPort(*port),
        Some(R::DestinationPortRange(r)) => {
            let rp = path.field("destination_port_range");
            only(r, &rp, &["start", "end"], &[])?;
            let (Ok(s), Ok(e)) = (u32::try_from(r.start), u32::try_from(r.end)) else {
                return invalid(&rp, "negative port");
            };
            Permission::DestinationPortRange(s, e)
        }
        Some(R::Metadata(md)) => Permission::Metadata(metadata(md, &path.field("metadata"))?),
        Some(R::RequestedServerName(s)) => Permission::RequestedServerName(string_matcher(
            s,
            &path.field("requested_server_name"),
        )?),
        Some(R::Matcher(_)) => return err(&path.field("matcher"), ErrorKind::NotSupported),
        Some(R::UriTemplate(_)) => {
            return err(&path.field("uri_template"), ErrorKind::NotSupported);
        }
        Some(R::SourcedMetadata(_)) => {
            return err(&path.field("sourced_metadata"), ErrorKind::NotSupported);
        }
        None => return err(path, ErrorKind::Required),
    })
}

fn principal(p: &pb::Principal, path: &Path, depth: usize) -> Result<Principal> {
    use pb::principal::Identifier as I;
    depth_check(depth, path)?;
    let set = |s: &pb::principal::Set, f: &str| -> Result<Vec<Principal>> {
        let sp = path.field(f);
        only(s, &sp, &["ids"], &[])?;
        s.ids
            .iter()
            .enumerate()
            .map(|(i, r)| principal(r, &sp.at("ids", i), depth + 1))
            .collect()
    };
    Ok(match &p.identifier {
        Some(I::AndIds(s)) => Principal::And(set(s, "and_ids")?),
        Some(I::OrIds(s)) => Principal::Or(set(s, "or_ids")?),
        Some(I::NotId(r)) => {
            Principal::Not(Box::new(principal(r, &path.field("not_id"), depth + 1)?))
        }
        Some(I::Any(true)) => Principal::Any,
        Some(I::Any(false)) => return invalid(&path.field("any"), "must be true"),
        Some(I::Authenticated(a)) => {
            let ap = path.field("authenticated");
            only(a, &ap, &["principal_name"], &[])?;
            Principal::Authenticated(match &a.principal_name {
                Some(s) => Some(string_matcher(s, &ap.field("principal_name"))?),
                None => None,
            })
        }
        Some(I::SourceIp(c)) => Principal::SourceIp(cidr(c, &path.field("source_ip"))?),
        Some(I::DirectRemoteIp(c)) => {
            Principal::DirectRemoteIp(cidr(c, &path.field("direct_remote_ip"))?)
        }
        Some(I::RemoteIp(c)) => Principal::RemoteIp(cidr(c, &path.field("remote_ip"))?),
        Some(I::Header(h)) => Principal::Header(header_matcher(h, &path.field("header"))?),
        Some(I::UrlPath(u)) => Principal::UrlPath(path_matcher(u, &path.field("url_path"))?),
        Some(I::Metadata(md)) => Principal::Metadata(metadata(md, &path.field("metadata"))?),
        Some(I::FilterState(f)) => {
            let fp = path.field("filter_state");
            only(f, &fp, &["key", "string_match"], &[])?;
            match &f.matcher {
                Some(m::filter_state_matcher::Matcher::StringMatch(s)) => Principal::FilterState(
                    f.key.clone(),
                    string_matcher(s, &fp.field("string_match"))?,
                ),
                Some(_) => return err(&fp.field("address_match"), ErrorKind::NotSupported),
                None => return err(&fp.field("string_match"), ErrorKind::Required),
            }
        }
        Some(I::SourcedMetadata(_)) => {
            return err(&path.field("sourced_metadata"), ErrorKind::NotSupported);
        }
        Some(I::Custom(_)) => return err(&path.field("custom"), ErrorKind::NotSupported),
        None => return err(path, ErrorKind::Required),
    })
}

fn path_matcher(
    u: &m::PathMatcher,
    path: &Path,
) -> Result<pingsail_filters::matcher::StringMatcher> {
    only(u, path, &["path"], &[])?;
    match &u.rule {
        Some(m::path_matcher::Rule::Path(s)) => string_matcher(s, &path.field("path")),
        None => err(&path.field("path"), ErrorKind::Required),
    }
}

fn cidr(c: &core::CidrRange, path: &Path) -> Result<Cidr> {
    only(c, path, &["address_prefix", "prefix_len"], &[])?;
    let ip: std::net::IpAddr = c.address_prefix.parse().or_else(|_| {
        invalid(
            &path.field("address_prefix"),
            format!("malformed IP address: {}", c.address_prefix),
        )
    })?;
    let len = c.prefix_len.as_ref().map_or(0, |v| v.value);
    Cidr::new(ip, len).map_or_else(
        || {
            invalid(
                &path.field("prefix_len"),
                format!("prefix length {len} too long"),
            )
        },
        Ok,
    )
}

/// A `MetadataMatcher` (also used by the JWT and ext_authz translations).
pub fn metadata(md: &m::MetadataMatcher, path: &Path) -> Result<MetadataMatcher> {
    only(md, path, &["filter", "path", "value", "invert"], &[])?;
    let mut keys = Vec::with_capacity(md.path.len());
    for (i, s) in md.path.iter().enumerate() {
        let sp = path.at("path", i);
        only(s, &sp, &["key"], &[])?;
        match &s.segment {
            Some(m::metadata_matcher::path_segment::Segment::Key(k)) => keys.push(k.clone()),
            None => return err(&sp.field("key"), ErrorKind::Required),
        }
    }
    if keys.is_empty() {
        return invalid(&path.field("path"), "at least one path segment is required");
    }
    let Some(v) = &md.value else {
        return err(&path.field("value"), ErrorKind::Required);
    };
    Ok(MetadataMatcher {
        filter: md.filter.clone(),
        path: keys,
        value: value_matcher(v, &path.field("value"), 0)?,
        invert: md.invert,
    })
}

fn value_matcher(v: &m::ValueMatcher, path: &Path, depth: usize) -> Result<ValueMatcher> {
    use m::value_matcher::MatchPattern as P;
    depth_check(depth, path)?;
    only(
        v,
        path,
        &[
            "null_match",
            "double_match",
            "string_match",
            "bool_match",
            "present_match",
            "list_match",
            "or_match",
        ],
        &[],
    )?;
    Ok(match &v.match_pattern {
        Some(P::NullMatch(_)) => ValueMatcher::Null,
        Some(P::DoubleMatch(d)) => {
            let dp = path.field("double_match");
            only(d, &dp, &["range", "exact"], &[])?;
            match &d.match_pattern {
                Some(m::double_matcher::MatchPattern::Exact(x)) => ValueMatcher::DoubleExact(*x),
                Some(m::double_matcher::MatchPattern::Range(r)) => {
                    ValueMatcher::DoubleRange(r.start, r.end)
                }
                None => return err(&dp, ErrorKind::Required),
            }
        }
        Some(P::StringMatch(s)) => {
            ValueMatcher::String(string_matcher(s, &path.field("string_match"))?)
        }
        Some(P::BoolMatch(b)) => ValueMatcher::Bool(*b),
        Some(P::PresentMatch(b)) => ValueMatcher::Present(*b),
        Some(P::ListMatch(l)) => {
            let lp = path.field("list_match");
            only(l.as_ref(), &lp, &["one_of"], &[])?;
            match &l.match_pattern {
                Some(m::list_matcher::MatchPattern::OneOf(inner)) => ValueMatcher::ListOneOf(
                    Box::new(value_matcher(inner, &lp.field("one_of"), depth + 1)?),
                ),
                None => return err(&lp.field("one_of"), ErrorKind::Required),
            }
        }
        Some(P::OrMatch(o)) => {
            let op = path.field("or_match");
            only(o, &op, &["value_matchers"], &[])?;
            ValueMatcher::Or(
                o.value_matchers
                    .iter()
                    .enumerate()
                    .map(|(i, x)| value_matcher(x, &op.at("value_matchers", i), depth + 1))
                    .collect::<Result<Vec<_>>>()?,
            )
        }
        None => return err(path, ErrorKind::Required),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use pingsail_filters::metadata::{DynamicMetadata, Value};
    use pingsail_filters::rbac::Input;
    use pingsail_filters::route::RequestView;
    use prost::Message as _;

    const DUMP: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/reference/istio/configdumps/istioctl-authz/sidecar-listeners-configdump.json"
    );

    /// Every RBAC filter config (name, type, JSON) in the reference sidecar dump.
    fn rbac_configs() -> Vec<(String, serde_json::Value)> {
        fn walk(v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
            match v {
                serde_json::Value::Object(m) => {
                    let name = m.get("name").and_then(|n| n.as_str()).unwrap_or("");
                    if name == "envoy.filters.http.rbac" || name == "envoy.filters.network.rbac" {
                        let mut tc = m["typed_config"].clone();
                        tc.as_object_mut().unwrap().remove("@type");
                        out.push((name.to_owned(), tc));
                        return;
                    }
                    m.values().for_each(|x| walk(x, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        let dump: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(DUMP).unwrap()).unwrap();
        let mut out = Vec::new();
        walk(&dump, &mut out);
        out
    }

    fn decode<M: prost::Message + Default>(full: &str, json: &serde_json::Value) -> M {
        let d = crate::xds::json::dynamic_from_json(full, json).unwrap();
        M::decode(d.encode_to_vec().as_slice()).unwrap()
    }

    fn input<'a>(
        view: &'a RequestView<'a>,
        peer: Option<&'a str>,
        fs: &'a [(&'a str, &'a str)],
        md: &'a DynamicMetadata,
    ) -> Input<'a, RequestView<'a>> {
        Input {
            headers: view,
            local: "10.244.0.7:8080".parse().unwrap(),
            direct_remote: "10.244.0.9:41000".parse().unwrap(),
            remote: "10.244.0.9".parse().unwrap(),
            sni: "",
            peer_principal: peer,
            filter_state: fs,
            metadata: md,
        }
    }

    /// The AuthorizationPolicies istiod compiled into the reference sidecar load, and enforce what
    /// they say: `httpbin` allows GET /info* and POST /data only to the sleep service account
    /// with a Google-issued JWT; TCP chains get `rules: {}` (deny all); the ext-authz policy is a
    /// DENY shadow that only tags requests.
    #[test]
    fn reference_dump_policies_load_and_enforce() {
        let configs = rbac_configs();
        assert_eq!(configs.len(), 13, "{configs:#?}");
        let mut http = Vec::new();
        for (name, json) in &configs {
            let p = Path::root(name.as_str());
            if name == "envoy.filters.http.rbac" {
                let r: http_rbac::Rbac = decode("envoy.extensions.filters.http.rbac.v3.RBAC", json);
                http.push(http_rbac(&r, &p).unwrap());
            } else {
                let r: net_rbac::Rbac =
                    decode("envoy.extensions.filters.network.rbac.v3.RBAC", json);
                let (cfg, prefix) = network_rbac(&r, &p).unwrap();
                assert_eq!(prefix, "tcp.");
                let md = DynamicMetadata::default();
                let view_headers = http::HeaderMap::new();
                let v = RequestView {
                    path: "/",
                    method: "GET",
                    authority: "",
                    scheme: "http",
                    headers: &view_headers,
                    is_grpc: false,
                    random: 0,
                };
                let sleep = "spiffe://cluster.local/ns/default/sa/sleep";
                let fs = [("io.istio.peer_principal", sleep)];
                assert!(!cfg.decide(&input(&v, Some(sleep), &fs, &md)).allowed);
            }
        }
        let enforced = http.iter().find(|c| c.rules.is_some()).unwrap();
        let shadow = http.iter().find(|c| c.shadow.is_some()).unwrap();

        let headers = http::HeaderMap::new();
        let view = |method: &'static str, path: &'static str| RequestView {
            path,
            method,
            authority: "httpbin:8000",
            scheme: "http",
            headers: &headers,
            is_grpc: false,
            random: 0,
        };
        let sleep = "spiffe://cluster.local/ns/default/sa/sleep";
        let fs = [("io.istio.peer_principal", sleep)];
        let mut md = DynamicMetadata::default();
        let mut claims = pingsail_filters::metadata::Struct::new();
        claims.insert(
            "iss".into(),
            Value::List(vec![Value::String("https://accounts.google.com".into())]),
        );
        md.set("istio_authn", "request.auth.claims", Value::Struct(claims));
        let none = DynamicMetadata::default();

        let get_info = view("GET", "/info/x?y=1");
        let allowed = enforced.decide(&input(&get_info, Some(sleep), &fs, &md));
        assert!(allowed.allowed);
        assert_eq!(
            allowed.enforced.and_then(|v| v.policy),
            Some("ns[default]-policy[httpbin]-rule[0]")
        );
        // Plaintext (no peer identity), no JWT, wrong method or path: denied.
        assert!(!enforced.decide(&input(&get_info, None, &[], &md)).allowed);
        assert!(
            !enforced
                .decide(&input(&get_info, Some(sleep), &fs, &none))
                .allowed
        );
        let post_info = view("POST", "/info");
        assert!(
            !enforced
                .decide(&input(&post_info, Some(sleep), &fs, &md))
                .allowed
        );
        let post_data = view("POST", "/data");
        assert!(
            enforced
                .decide(&input(&post_data, Some(sleep), &fs, &md))
                .allowed
        );
        let other = "spiffe://cluster.local/ns/prod/sa/web";
        let other_fs = [("io.istio.peer_principal", other)];
        assert!(
            !enforced
                .decide(&input(&get_info, Some(other), &other_fs, &md))
                .allowed
        );

        // The CUSTOM (ext_authz) shadow policy never blocks; it tags matching requests.
        let d = shadow.decide(&input(&get_info, Some(sleep), &fs, &md));
        assert!(d.allowed);
        assert_eq!(d.shadow.map(|v| v.allowed), Some(false));
        let mut out = DynamicMetadata::default();
        shadow.record(&d, "envoy.filters.http.rbac", &mut out);
        assert_eq!(
            out.lookup(
                "envoy.filters.http.rbac",
                &["istio_ext_authz_shadow_effective_policy_id"]
            ),
            Some(&Value::String(
                "istio-ext-authz-ns[default]-policy[ext-authz]-rule[0]".into()
            ))
        );
    }
}
