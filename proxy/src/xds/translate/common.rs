// SPDX-License-Identifier: Apache-2.0
//! Shared translation helpers: field paths, the "only these fields" reflection check, and conversions of
//! common Envoy types.

// istiod still emits deprecated fields (append, exact_match, total_weight…): we translate them on purpose.
#![allow(deprecated)]

use crate::xds::pool::pool;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::r#type::matcher::v3 as m;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use pingsail_filters::headers::{AppendAction, HeaderAdd, HeaderOps};
use pingsail_filters::matcher::{StringMatch, StringMatcher, compile_full};
use prost::Message;
use prost_reflect::DynamicMessage;
use std::fmt;
use std::time::Duration;

/// A field path such as `listeners[0].filter_chains[1].filters[0].typed_config`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Path(String);

impl Path {
    /// A root path (e.g. `static_resources.listeners`).
    pub fn root(s: impl Into<String>) -> Path {
        Path(s.into())
    }

    /// `self.name`
    pub fn field(&self, name: &str) -> Path {
        if self.0.is_empty() {
            Path(name.to_string())
        } else {
            Path(format!("{}.{name}", self.0))
        }
    }

    /// `self[i]`
    pub fn index(&self, i: usize) -> Path {
        Path(format!("{}[{i}]", self.0))
    }

    /// `self.name[i]`
    pub fn at(&self, name: &str, i: usize) -> Path {
        self.field(name).index(i)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A configuration we refuse, with the path of the offending field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {kind}")]
pub struct TranslateError {
    /// where
    pub path: Path,
    /// what
    pub kind: ErrorKind,
}

/// Why a field is refused.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// A field we do not honour.
    #[error("not supported")]
    NotSupported,
    /// A field whose behaviour belongs to a later piece of work.
    #[error("not supported yet ({0})")]
    NotYet(&'static str),
    /// A value Envoy would reject too.
    #[error("{0}")]
    Invalid(String),
    /// A required field is missing.
    #[error("required")]
    Required,
    /// An extension `@type` we do not know.
    #[error("unknown or unsupported extension type '{0}'")]
    UnknownType(String),
}

/// Result alias for translation.
pub type Result<T> = std::result::Result<T, TranslateError>;

/// Builds an error at `path`.
pub fn err<T>(path: &Path, kind: ErrorKind) -> Result<T> {
    Err(TranslateError {
        path: path.clone(),
        kind,
    })
}

/// Shorthand for an `Invalid` error.
pub fn invalid<T>(path: &Path, msg: impl Into<String>) -> Result<T> {
    err(path, ErrorKind::Invalid(msg.into()))
}

/// Fields that exist in Envoy's schema and are honoured by a later issue; the error names that issue.
pub type Deferred<'a> = &'a [(&'a str, &'static str)];

/// Refuses any set field of `msg` that is not in `allowed`. Set fields listed in `deferred` get an error
/// naming the issue that will honour them. Reflection runs at config time only.
pub fn only<M: Message + prost::Name>(
    msg: &M,
    path: &Path,
    allowed: &[&str],
    deferred: Deferred<'_>,
) -> Result<()> {
    let full = M::full_name();
    let Some(fields) = field_names(&full) else {
        return only_dynamic(msg, path, allowed, deferred);
    };
    // The fields set are the field numbers on the wire (proto3: defaults are not encoded), checked in
    // number order as a descriptor-based walk would.
    let bytes = msg.encode_to_vec();
    let mut set = wire_fields(&bytes).map_err(|e| TranslateError {
        path: path.clone(),
        kind: ErrorKind::Invalid(format!("internal: re-encoding {full}: {e}")),
    })?;
    set.sort_unstable();
    set.dedup();
    for number in set {
        let name = match fields.binary_search_by_key(&number, |(n, _)| *n) {
            Ok(i) => fields[i].1,
            Err(_) => return err(&path.field(&format!("#{number}")), ErrorKind::NotSupported),
        };
        if allowed.contains(&name) {
            continue;
        }
        if let Some((_, later)) = deferred.iter().find(|(f, _)| *f == name) {
            return err(&path.field(name), ErrorKind::NotYet(later));
        }
        return err(&path.field(name), ErrorKind::NotSupported);
    }
    Ok(())
}

mod generated {
    include!(concat!(env!("OUT_DIR"), "/field_names.rs"));
}

fn field_names(full: &str) -> Option<&'static [(u32, &'static str)]> {
    let t = generated::FIELD_NAMES;
    t.binary_search_by_key(&full, |(n, _)| n)
        .ok()
        .map(|i| t[i].1)
}

/// The field numbers present at the top level of an encoded message.
fn wire_fields(mut b: &[u8]) -> std::result::Result<Vec<u32>, &'static str> {
    fn varint(b: &mut &[u8]) -> std::result::Result<u64, &'static str> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&x, rest) = b.split_first().ok_or("truncated varint")?;
            *b = rest;
            v |= u64::from(x & 0x7f) << shift;
            if x & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long")
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let skip = match key & 7 {
            0 => {
                varint(&mut b)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut b)?).map_err(|_| "length")?,
            5 => 4,
            _ => return Err("unsupported wire type"),
        };
        if b.len() < skip {
            return Err("truncated field");
        }
        b = &b[skip..];
        out.push(u32::try_from(key >> 3).map_err(|_| "field number")?);
    }
    Ok(out)
}

/// The descriptor-pool check, for messages outside the generated table (Istio's own types).
fn only_dynamic<M: Message + prost::Name>(
    msg: &M,
    path: &Path,
    allowed: &[&str],
    deferred: Deferred<'_>,
) -> Result<()> {
    let Some(desc) = pool().get_message_by_name(&M::full_name()) else {
        return invalid(
            path,
            format!("internal: no descriptor for {}", M::full_name()),
        );
    };
    let dynamic = match DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()) {
        Ok(d) => d,
        Err(e) => return invalid(path, e.to_string()),
    };
    for (field, _) in dynamic.fields() {
        let name = field.name();
        if allowed.contains(&name) {
            continue;
        }
        if let Some((_, later)) = deferred.iter().find(|(f, _)| *f == name) {
            return err(&path.field(name), ErrorKind::NotYet(later));
        }
        return err(&path.field(name), ErrorKind::NotSupported);
    }
    Ok(())
}

/// Decodes an `Any` whose type URL must be `M`'s.
pub fn unpack<M: Message + Default + prost::Name>(any: &Any, path: &Path) -> Result<M> {
    if any.type_url != M::type_url() {
        return err(path, ErrorKind::UnknownType(any.type_url.clone()));
    }
    M::decode(any.value.as_slice()).map_err(|e| TranslateError {
        path: path.clone(),
        kind: ErrorKind::Invalid(e.to_string()),
    })
}

/// The bare type name of a type URL.
pub fn type_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

/// A proto Duration as std Duration (negative is invalid).
pub fn duration(d: &PbDuration, path: &Path) -> Result<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return invalid(path, "negative duration");
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// Compiles a `RegexMatcher` (RE2 syntax; full-match semantics).
pub fn regex(r: &m::RegexMatcher, path: &Path) -> Result<regex::Regex> {
    only(r, path, &["regex", "google_re2"], &[])?;
    compile_full(&r.regex).or_else(|e| {
        invalid(
            &path.field("regex"),
            format!("invalid regex '{}': {e}", r.regex),
        )
    })
}

/// Compiles a `RegexMatcher` for substitution (not anchored).
pub fn regex_unanchored(r: &m::RegexMatcher, path: &Path) -> Result<regex::Regex> {
    only(r, path, &["regex", "google_re2"], &[])?;
    regex::Regex::new(&r.regex).or_else(|e| {
        invalid(
            &path.field("regex"),
            format!("invalid regex '{}': {e}", r.regex),
        )
    })
}

/// Compiles a `StringMatcher`.
pub fn string_matcher(s: &m::StringMatcher, path: &Path) -> Result<StringMatcher> {
    use m::string_matcher::MatchPattern as P;
    only(
        s,
        path,
        &[
            "exact",
            "prefix",
            "suffix",
            "safe_regex",
            "contains",
            "ignore_case",
        ],
        &[],
    )?;
    let kind = match &s.match_pattern {
        Some(P::Exact(v)) => StringMatch::Exact(v.clone()),
        Some(P::Prefix(v)) => StringMatch::Prefix(v.clone()),
        Some(P::Suffix(v)) => StringMatch::Suffix(v.clone()),
        Some(P::Contains(v)) => StringMatch::Contains(v.clone()),
        Some(P::SafeRegex(r)) => StringMatch::Regex(regex(r, &path.field("safe_regex"))?),
        Some(P::Custom(_)) => return err(&path.field("custom"), ErrorKind::NotSupported),
        None => return err(path, ErrorKind::Required),
    };
    Ok(StringMatcher::new(kind, s.ignore_case))
}

/// Builds one level of header mutations.
pub fn header_ops(
    add: &[core::HeaderValueOption],
    remove: &[String],
    path: &Path,
    add_field: &str,
    remove_field: &str,
) -> Result<HeaderOps> {
    let mut ops = HeaderOps::default();
    for (i, r) in remove.iter().enumerate() {
        let name =
            http::HeaderName::from_bytes(r.to_ascii_lowercase().as_bytes()).or_else(|_| {
                invalid(
                    &path.at(remove_field, i),
                    format!("invalid header name '{r}'"),
                )
            })?;
        ops.remove.push(name);
    }
    for (i, o) in add.iter().enumerate() {
        let p = path.at(add_field, i);
        only(
            o,
            &p,
            &["header", "append", "append_action", "keep_empty_value"],
            &[],
        )?;
        let Some(h) = &o.header else {
            return err(&p.field("header"), ErrorKind::Required);
        };
        only(h, &p.field("header"), &["key", "value", "raw_value"], &[])?;
        let value = if h.raw_value.is_empty() {
            h.value.as_bytes()
        } else {
            h.raw_value.as_slice()
        };
        if value.contains(&b'%') {
            // Header formatters (%DOWNSTREAM_REMOTE_ADDRESS% …) are access-log/telemetry work.
            return err(
                &p.field("header").field("value"),
                ErrorKind::NotYet("header value formatters: telemetry issue"),
            );
        }
        let name =
            http::HeaderName::from_bytes(h.key.to_ascii_lowercase().as_bytes()).or_else(|_| {
                invalid(
                    &p.field("header").field("key"),
                    format!("invalid header name '{}'", h.key),
                )
            })?;
        if name.as_str().starts_with(':') || name == http::header::HOST {
            return invalid(
                &p.field("header").field("key"),
                format!("'{}' may not be modified", h.key),
            );
        }
        let value = http::HeaderValue::from_bytes(value)
            .or_else(|_| invalid(&p.field("header").field("value"), "invalid header value"))?;
        use core::header_value_option::HeaderAppendAction as A;
        let action = match (o.append, A::try_from(o.append_action)) {
            (Some(b), _) if b.value => AppendAction::AppendIfExistsOrAdd,
            (Some(_), _) => AppendAction::OverwriteIfExistsOrAdd,
            (None, Ok(A::AppendIfExistsOrAdd)) => AppendAction::AppendIfExistsOrAdd,
            (None, Ok(A::AddIfAbsent)) => AppendAction::AddIfAbsent,
            (None, Ok(A::OverwriteIfExistsOrAdd)) => AppendAction::OverwriteIfExistsOrAdd,
            (None, Ok(A::OverwriteIfExists)) => AppendAction::OverwriteIfExists,
            (None, Err(_)) => return invalid(&p.field("append_action"), "unknown append_action"),
        };
        ops.add.push(HeaderAdd {
            name,
            value,
            action,
            keep_empty: o.keep_empty_value,
        });
    }
    Ok(ops)
}

/// A socket address from an `Address` (only `socket_address` with `port_value`).
pub fn socket_addr(a: &core::Address, path: &Path) -> Result<std::net::SocketAddr> {
    use core::address::Address as A;
    match &a.address {
        Some(A::SocketAddress(s)) => {
            let p = path.field("socket_address");
            only(
                s,
                &p,
                &["address", "port_value", "protocol", "ipv4_compat"],
                &[("resolver_name", "DNS")],
            )?;
            if s.protocol != core::socket_address::Protocol::Tcp as i32 {
                return err(&p.field("protocol"), ErrorKind::NotSupported);
            }
            let port = match s.port_specifier {
                Some(core::socket_address::PortSpecifier::PortValue(v)) => v,
                Some(core::socket_address::PortSpecifier::NamedPort(_)) => {
                    return err(&p.field("named_port"), ErrorKind::NotSupported);
                }
                None => 0,
            };
            let port = u16::try_from(port)
                .or_else(|_| invalid(&p.field("port_value"), "port out of range"))?;
            let ip: std::net::IpAddr = s.address.parse().or_else(|_| {
                invalid(
                    &p.field("address"),
                    format!("malformed IP address: {}", s.address),
                )
            })?;
            Ok(std::net::SocketAddr::new(ip, port))
        }
        Some(A::Pipe(_)) => err(
            &path.field("pipe"),
            ErrorKind::NotYet("pipe addresses: xDS issue"),
        ),
        Some(A::EnvoyInternalAddress(_)) => err(
            &path.field("envoy_internal_address"),
            ErrorKind::NotSupported,
        ),
        None => err(path, ErrorKind::Required),
    }
}

/// The `(host, port)` of a socket address that may be a DNS name (for DNS clusters).
pub fn host_port(a: &core::Address, path: &Path) -> Result<(String, u16)> {
    use core::address::Address as A;
    match &a.address {
        Some(A::SocketAddress(s)) => {
            let p = path.field("socket_address");
            only(
                s,
                &p,
                &["address", "port_value", "protocol", "ipv4_compat"],
                &[],
            )?;
            let port = match s.port_specifier {
                Some(core::socket_address::PortSpecifier::PortValue(v)) => v,
                _ => return err(&p.field("port_value"), ErrorKind::Required),
            };
            let port = u16::try_from(port)
                .or_else(|_| invalid(&p.field("port_value"), "port out of range"))?;
            Ok((s.address.clone(), port))
        }
        _ => err(path, ErrorKind::NotSupported),
    }
}

/// A `ConfigSource` for a dynamic resource: only ADS is supported (what istiod and pilot-agent use).
/// Returns `initial_fetch_timeout` (`None` = wait forever; Envoy's default is 15 s).
pub fn config_source(
    cs: &envoy_types::pb::envoy::config::core::v3::ConfigSource,
    path: &Path,
) -> Result<Option<std::time::Duration>> {
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier as S;
    only(
        cs,
        path,
        &["ads", "initial_fetch_timeout", "resource_api_version"],
        &[],
    )?;
    match &cs.config_source_specifier {
        Some(S::Ads(_)) => {}
        Some(_) | None => {
            return invalid(path, "only aggregated (ads) config sources are supported");
        }
    }
    match &cs.initial_fetch_timeout {
        None => Ok(Some(std::time::Duration::from_secs(15))),
        Some(d) => {
            let d = duration(d, &path.field("initial_fetch_timeout"))?;
            Ok((!d.is_zero()).then_some(d))
        }
    }
}

#[cfg(test)]
mod field_table_tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_has_envoy_types() {
        let t = generated::FIELD_NAMES;
        assert!(t.windows(2).all(|w| w[0].0 < w[1].0));
        let l = field_names("envoy.config.listener.v3.Listener");
        assert!(l.is_some_and(|f| f.iter().any(|(n, name)| *n == 1 && *name == "name")));
    }
}
