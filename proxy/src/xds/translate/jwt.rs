// SPDX-License-Identifier: Apache-2.0
//! `envoy.filters.http.jwt_authn` (`JwtAuthentication`, `PerRouteConfig`) → [`JwtConfig`].

use super::common::*;
use super::route::route_match;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as pb;
use pingsail_filters::jwt::{
    Jwks, JwtConfig, Location, PerRoute, Provider, RemoteJwks, Requirement, RuleRequirement,
    parse_jwks,
};
use std::sync::Arc;
use std::time::Duration;

const MAX_DEPTH: usize = 32;

/// Translates the filter configuration.
pub fn jwt_authn(j: &pb::JwtAuthentication, path: &Path) -> Result<JwtConfig> {
    only(
        j,
        path,
        &[
            "providers",
            "rules",
            "bypass_cors_preflight",
            "requirement_map",
            "stat_prefix",
        ],
        &[],
    )?;
    let mut names: Vec<&String> = j.providers.keys().collect();
    names.sort();
    let mut providers = Vec::with_capacity(names.len());
    for name in &names {
        let p = &j.providers[*name];
        providers.push(provider(name, p, &path.field("providers").field(name))?);
    }
    let provider_index = |n: &str, p: &Path| -> Result<usize> {
        names
            .iter()
            .position(|x| *x == n)
            .map_or_else(|| invalid(p, format!("unknown provider '{n}'")), Ok)
    };
    let mut req_names: Vec<&String> = j.requirement_map.keys().collect();
    req_names.sort();
    let mut requirement_map = Vec::with_capacity(req_names.len());
    for n in &req_names {
        let p = path.field("requirement_map").field(n);
        requirement_map.push((
            (*n).clone(),
            requirement(&j.requirement_map[*n], &p, &provider_index, 0)?,
        ));
    }
    let mut rules = Vec::with_capacity(j.rules.len());
    for (i, r) in j.rules.iter().enumerate() {
        let p = path.at("rules", i);
        only(r, &p, &["match", "requires", "requirement_name"], &[])?;
        let Some(m) = &r.r#match else {
            return err(&p.field("match"), ErrorKind::Required);
        };
        let m = route_match(m, &p.field("match"))?;
        use pb::requirement_rule::RequirementType as T;
        let req = match &r.requirement_type {
            None => RuleRequirement::Inline(None),
            Some(T::Requires(q)) => RuleRequirement::Inline(Some(requirement(
                q,
                &p.field("requires"),
                &provider_index,
                0,
            )?)),
            Some(T::RequirementName(n)) => match req_names.iter().position(|x| *x == n) {
                Some(i) => RuleRequirement::Named(i),
                None => {
                    return invalid(
                        &p.field("requirement_name"),
                        format!("unknown requirement '{n}'"),
                    );
                }
            },
        };
        rules.push((m, req));
    }
    Ok(JwtConfig {
        providers,
        rules,
        requirement_map,
        bypass_cors_preflight: j.bypass_cors_preflight,
    })
}

/// `PerRouteConfig`.
pub fn jwt_per_route(r: &pb::PerRouteConfig, path: &Path) -> Result<PerRoute> {
    only(r, path, &["disabled", "requirement_name"], &[])?;
    use pb::per_route_config::RequirementSpecifier as S;
    match &r.requirement_specifier {
        Some(S::Disabled(true)) => Ok(PerRoute::Disabled),
        Some(S::Disabled(false)) => invalid(&path.field("disabled"), "must be true"),
        Some(S::RequirementName(n)) => Ok(PerRoute::Requirement(n.clone())),
        None => err(path, ErrorKind::Required),
    }
}

fn requirement(
    r: &pb::JwtRequirement,
    path: &Path,
    provider_index: &dyn Fn(&str, &Path) -> Result<usize>,
    depth: usize,
) -> Result<Requirement> {
    if depth > MAX_DEPTH {
        return invalid(path, "requirements nested too deeply");
    }
    only(
        r,
        path,
        &[
            "provider_name",
            "provider_and_audiences",
            "requires_any",
            "requires_all",
            "allow_missing_or_failed",
            "allow_missing",
        ],
        &[],
    )?;
    use pb::jwt_requirement::RequiresType as T;
    Ok(match &r.requires_type {
        Some(T::ProviderName(n)) => {
            Requirement::Provider(provider_index(n, &path.field("provider_name"))?)
        }
        Some(T::ProviderAndAudiences(pa)) => {
            let p = path.field("provider_and_audiences");
            only(pa, &p, &["provider_name", "audiences"], &[])?;
            Requirement::ProviderAndAudiences(
                provider_index(&pa.provider_name, &p.field("provider_name"))?,
                pa.audiences.clone(),
            )
        }
        Some(T::RequiresAny(l)) => {
            let p = path.field("requires_any");
            only(l, &p, &["requirements"], &[])?;
            Requirement::Any(
                l.requirements
                    .iter()
                    .enumerate()
                    .map(|(i, x)| {
                        requirement(x, &p.at("requirements", i), provider_index, depth + 1)
                    })
                    .collect::<Result<_>>()?,
            )
        }
        Some(T::RequiresAll(l)) => {
            let p = path.field("requires_all");
            only(l, &p, &["requirements"], &[])?;
            Requirement::All(
                l.requirements
                    .iter()
                    .enumerate()
                    .map(|(i, x)| {
                        requirement(x, &p.at("requirements", i), provider_index, depth + 1)
                    })
                    .collect::<Result<_>>()?,
            )
        }
        Some(T::AllowMissingOrFailed(_)) => Requirement::AllowMissingOrFailed,
        Some(T::AllowMissing(_)) => Requirement::AllowMissing,
        Some(T::ExtractOnlyWithoutValidation(_)) => {
            return err(
                &path.field("extract_only_without_validation"),
                ErrorKind::NotSupported,
            );
        }
        None => return err(path, ErrorKind::Required),
    })
}

fn header_name(s: &str, path: &Path) -> Result<http::HeaderName> {
    http::HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
        .or_else(|_| invalid(path, format!("invalid header name '{s}'")))
}

fn provider(name: &str, p: &pb::JwtProvider, path: &Path) -> Result<Provider> {
    only(
        p,
        path,
        &[
            "issuer",
            "audiences",
            "require_expiration",
            "forward",
            "from_headers",
            "from_params",
            "from_cookies",
            "forward_payload_header",
            "pad_forward_payload_header",
            "payload_in_metadata",
            "normalize_payload_in_metadata",
            "clock_skew_seconds",
            "claim_to_headers",
            "clear_route_cache",
            "local_jwks",
            "remote_jwks",
        ],
        &[],
    )?;
    use pb::jwt_provider::JwksSourceSpecifier as J;
    let jwks = match &p.jwks_source_specifier {
        Some(J::LocalJwks(ds)) => {
            let doc = data_source(ds, &path.field("local_jwks"))?;
            // Envoy accepts a provider whose JWKS does not parse (every token then fails).
            Jwks::Local(parse_jwks(&doc).unwrap_or_default())
        }
        Some(J::RemoteJwks(r)) => {
            Jwks::Remote(Arc::new(remote_jwks(r, &path.field("remote_jwks"))?))
        }
        None => return err(&path.field("local_jwks"), ErrorKind::Required),
    };
    let mut locations = Vec::new();
    for (i, h) in p.from_headers.iter().enumerate() {
        let hp = path.at("from_headers", i);
        only(h, &hp, &["name", "value_prefix"], &[])?;
        locations.push(Location::Header(
            header_name(&h.name, &hp.field("name"))?,
            h.value_prefix.clone(),
        ));
    }
    for q in &p.from_params {
        locations.push(Location::Param(q.clone()));
    }
    for c in &p.from_cookies {
        locations.push(Location::Cookie(c.clone()));
    }
    if locations.is_empty() {
        locations = Provider::default_locations();
    }
    let mut claim_to_headers = Vec::with_capacity(p.claim_to_headers.len());
    for (i, c) in p.claim_to_headers.iter().enumerate() {
        let cp = path.at("claim_to_headers", i);
        only(c, &cp, &["header_name", "claim_name"], &[])?;
        claim_to_headers.push((
            header_name(&c.header_name, &cp.field("header_name"))?,
            c.claim_name.split('.').map(str::to_owned).collect(),
        ));
    }
    let space_delimited_claims = match &p.normalize_payload_in_metadata {
        Some(n) => {
            only(
                n,
                &path.field("normalize_payload_in_metadata"),
                &["space_delimited_claims"],
                &[],
            )?;
            n.space_delimited_claims.clone()
        }
        None => Vec::new(),
    };
    Ok(Provider {
        name: name.to_owned(),
        issuer: p.issuer.clone(),
        audiences: p.audiences.clone(),
        jwks,
        locations,
        forward: p.forward,
        forward_payload_header: match p.forward_payload_header.as_str() {
            "" => None,
            h => Some(header_name(h, &path.field("forward_payload_header"))?),
        },
        pad_forward_payload_header: p.pad_forward_payload_header,
        payload_in_metadata: (!p.payload_in_metadata.is_empty())
            .then(|| p.payload_in_metadata.clone()),
        space_delimited_claims,
        claim_to_headers,
        clock_skew: if p.clock_skew_seconds == 0 {
            60
        } else {
            u64::from(p.clock_skew_seconds)
        },
        require_expiration: p.require_expiration,
        clear_route_cache: p.clear_route_cache,
        verified: Default::default(),
    })
}

fn remote_jwks(r: &pb::RemoteJwks, path: &Path) -> Result<RemoteJwks> {
    only(
        r,
        path,
        &["http_uri", "cache_duration", "async_fetch", "retry_policy"],
        &[],
    )?;
    let Some(u) = &r.http_uri else {
        return err(&path.field("http_uri"), ErrorKind::Required);
    };
    let up = path.field("http_uri");
    only(u, &up, &["uri", "cluster", "timeout"], &[])?;
    use core::http_uri::HttpUpstreamType as U;
    let cluster = match &u.http_upstream_type {
        Some(U::Cluster(c)) if !c.is_empty() => c.clone(),
        _ => return err(&up.field("cluster"), ErrorKind::Required),
    };
    if !(u.uri.starts_with("http://") || u.uri.starts_with("https://")) {
        return invalid(&up.field("uri"), format!("not an http(s) URI: '{}'", u.uri));
    }
    if u.uri.starts_with("https://") {
        return err(
            &up.field("uri"),
            ErrorKind::NotYet("TLS to upstreams: mTLS issue"),
        );
    }
    let timeout = match &u.timeout {
        Some(t) => duration(t, &up.field("timeout"))?,
        None => return err(&up.field("timeout"), ErrorKind::Required),
    };
    let cache_duration = match &r.cache_duration {
        Some(d) => duration(d, &path.field("cache_duration"))?,
        None => Duration::from_secs(600),
    };
    if let Some(a) = &r.async_fetch {
        // Fetching on first use instead of at start-up: the request waits for the fetch.
        only(
            a,
            &path.field("async_fetch"),
            &["fast_listener", "failed_refetch_duration"],
            &[],
        )?;
    }
    let num_retries = match &r.retry_policy {
        Some(rp) => {
            only(
                rp,
                &path.field("retry_policy"),
                &["num_retries", "retry_back_off"],
                &[],
            )?;
            rp.num_retries.as_ref().map_or(1, |n| n.value)
        }
        None => 0,
    };
    Ok(RemoteJwks::new(
        u.uri.clone(),
        cluster,
        timeout,
        cache_duration,
        num_retries,
    ))
}

fn data_source(ds: &core::DataSource, path: &Path) -> Result<String> {
    only(
        ds,
        path,
        &["filename", "inline_bytes", "inline_string"],
        &[],
    )?;
    use core::data_source::Specifier as S;
    match &ds.specifier {
        Some(S::InlineString(s)) => Ok(s.clone()),
        Some(S::InlineBytes(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
        Some(S::Filename(f)) => std::fs::read_to_string(f)
            .or_else(|e| invalid(&path.field("filename"), format!("cannot read '{f}': {e}"))),
        Some(S::EnvironmentVariable(_)) => {
            err(&path.field("environment_variable"), ErrorKind::NotSupported)
        }
        None => err(path, ErrorKind::Required),
    }
}
