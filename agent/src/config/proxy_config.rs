// SPDX-License-Identifier: Apache-2.0
//! Istio's `ProxyConfig` (mesh.v1alpha1) in its protobuf-JSON form, the form pilot-agent writes into
//! the node metadata (`PROXY_CONFIG`). Inputs may come as YAML or JSON with camelCase or
//! snake_case names (the mesh config file, `proxy.istio.io/config`, `PROXY_CONFIG`), or from the
//! proto text format (tests); [`ProxyConfig::from_value`] brings them to the canonical form:
//! camelCase names, durations as `"2s"`, wrapper values unwrapped, default enum values dropped.
//!
//! Layers merge as protobuf merges do: later scalar fields win, messages and maps merge field by
//! field (repeated fields are replaced rather than appended; see docs/COMPATIBILITY.md).

use std::time::Duration;

use serde_json::{Map, Value};

/// Fields whose values are maps: their keys are data, never renamed.
const MAP_FIELDS: &[&str] = &["proxyMetadata", "runtimeValues"];

/// Enum fields and their default (zero) value, omitted by protobuf JSON.
const ENUM_DEFAULTS: &[(&str, &str)] = &[
    ("controlPlaneAuthPolicy", "NONE"),
    ("interceptionMode", "REDIRECT"),
    ("tracingServiceName", "APP_LABEL_AND_NAMESPACE"),
];

#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {detail}")]
pub struct ProxyConfigError {
    pub source_name: String,
    pub detail: String,
}

/// A ProxyConfig in canonical protobuf-JSON form.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyConfig(pub Map<String, Value>);

impl ProxyConfig {
    /// pilot-agent's defaults (`mesh.DefaultProxyConfig`).
    pub fn mesh_default() -> Self {
        let Value::Object(m) = serde_json::json!({
            "configPath": "./etc/istio/proxy",
            "serviceCluster": "istio-proxy",
            "drainDuration": "45s",
            "terminationDrainDuration": "5s",
            "proxyAdminPort": 15000,
            "controlPlaneAuthPolicy": "MUTUAL_TLS",
            "discoveryAddress": "istiod.istio-system.svc:15012",
            "binaryPath": "/usr/local/bin/envoy",
            "statNameLength": 189,
            "statusPort": 15020,
        }) else {
            return Self::default();
        };
        Self(m)
    }

    /// Canonicalises a parsed document (`source_name` names it in errors).
    pub fn from_value(v: Value, source_name: &str) -> Result<Self, ProxyConfigError> {
        match canonical(v, false) {
            Value::Object(m) => {
                let pc = Self(m);
                pc.validate(source_name)?;
                Ok(pc)
            }
            Value::Null => Ok(Self::default()),
            other => Err(ProxyConfigError {
                source_name: source_name.into(),
                detail: format!("expected a ProxyConfig object, got {other}"),
            }),
        }
    }

    /// Parses YAML (a superset of JSON).
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Self, ProxyConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let v: Value = serde_yaml::from_str(text).map_err(|e| ProxyConfigError {
            source_name: source_name.into(),
            detail: format!("not valid YAML/JSON: {e}"),
        })?;
        Self::from_value(v, source_name)
    }

    /// Protobuf merge: `other`'s set fields win; messages and maps merge.
    pub fn merge(&mut self, other: &ProxyConfig) {
        merge_map(&mut self.0, &other.0);
    }

    fn validate(&self, source_name: &str) -> Result<(), ProxyConfigError> {
        let err = |detail: String| ProxyConfigError {
            source_name: source_name.into(),
            detail,
        };
        for f in [
            "drainDuration",
            "terminationDrainDuration",
            "parentShutdownDuration",
            "fileFlushInterval",
        ] {
            if let Some(v) = self.0.get(f) {
                let s = v
                    .as_str()
                    .ok_or_else(|| err(format!("{f}: expected a duration, got {v}")))?;
                parse_proto_duration(s).ok_or_else(|| err(format!("{f}: bad duration {s:?}")))?;
            }
        }
        for f in [
            "proxyAdminPort",
            "statusPort",
            "statNameLength",
            "concurrency",
        ] {
            if let Some(v) = self.0.get(f)
                && v.as_i64().is_none()
            {
                return Err(err(format!("{f}: expected an integer, got {v}")));
            }
        }
        for f in ["proxyAdminPort", "statusPort"] {
            if let Some(p) = self.0.get(f).and_then(Value::as_i64)
                && !(0..=65535).contains(&p)
            {
                return Err(err(format!("{f}: port {p} out of range")));
            }
        }
        for f in MAP_FIELDS {
            if let Some(v) = self.0.get(*f) {
                let ok = v
                    .as_object()
                    .is_some_and(|m| m.values().all(Value::is_string));
                if !ok {
                    return Err(err(format!("{f}: expected a map of strings, got {v}")));
                }
            }
        }
        Ok(())
    }

    pub fn str(&self, field: &str) -> Option<&str> {
        self.0.get(field).and_then(Value::as_str)
    }

    pub fn int(&self, field: &str) -> Option<i64> {
        self.0.get(field).and_then(Value::as_i64)
    }

    pub fn duration(&self, field: &str) -> Option<Duration> {
        self.str(field).and_then(parse_proto_duration)
    }

    pub fn set(&mut self, field: &str, v: Value) {
        self.0.insert(field.into(), v);
    }

    /// A string map field (`proxyMetadata`, `runtimeValues`), in key order.
    pub fn string_map(&self, field: &str) -> Vec<(String, String)> {
        self.0
            .get(field)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn config_path(&self) -> &str {
        self.str("configPath").unwrap_or("./etc/istio/proxy")
    }
    pub fn proxy_admin_port(&self) -> u16 {
        port(self.int("proxyAdminPort"), 15000)
    }
    pub fn status_port(&self) -> u16 {
        port(self.int("statusPort"), 15020)
    }
    pub fn discovery_address(&self) -> &str {
        self.str("discoveryAddress")
            .unwrap_or("istiod.istio-system.svc:15012")
    }
    pub fn drain_duration(&self) -> Duration {
        self.duration("drainDuration")
            .unwrap_or(Duration::from_secs(45))
    }
    pub fn termination_drain_duration(&self) -> Duration {
        self.duration("terminationDrainDuration")
            .unwrap_or(Duration::from_secs(5))
    }
    pub fn concurrency(&self) -> Option<i64> {
        self.int("concurrency")
    }
    pub fn control_plane_mtls(&self) -> bool {
        self.str("controlPlaneAuthPolicy") == Some("MUTUAL_TLS")
    }
}

fn port(v: Option<i64>, default: u16) -> u16 {
    v.and_then(|p| u16::try_from(p).ok()).unwrap_or(default)
}

fn merge_map(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge_map(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// snake_case → lowerCamelCase (names already in camelCase are unchanged).
fn camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut up = false;
    for c in name.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn canonical(v: Value, is_map: bool) -> Value {
    match v {
        Value::Object(m) => {
            // Well-known types written as messages: Duration {seconds, nanos}, wrappers {value}.
            if !is_map && !m.is_empty() && m.keys().all(|k| k == "seconds" || k == "nanos") {
                let secs = m.get("seconds").and_then(as_i64).unwrap_or(0);
                let nanos = m.get("nanos").and_then(as_i64).unwrap_or(0);
                return Value::String(format_proto_duration(secs, nanos));
            }
            if !is_map && m.len() == 1 && m.contains_key("value") {
                return m.into_iter().next().map(|(_, v)| v).unwrap_or(Value::Null);
            }
            let mut out = Map::new();
            for (k, v) in m {
                if is_map {
                    out.insert(k, v);
                    continue;
                }
                let key = camel(&k);
                let child_is_map = MAP_FIELDS.contains(&key.as_str());
                let v = if child_is_map {
                    map_entries(v)
                } else {
                    canonical(v, false)
                };
                if ENUM_DEFAULTS
                    .iter()
                    .any(|(f, d)| *f == key && v.as_str() == Some(d))
                {
                    continue;
                }
                out.insert(key, canonical(v, child_is_map));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(|v| canonical(v, false)).collect()),
        other => other,
    }
}

/// A map written as proto-text entries (`[{key: k, value: v}]`) becomes an object.
fn map_entries(v: Value) -> Value {
    match v {
        Value::Array(entries) => {
            let mut m = Map::new();
            for e in entries {
                if let Value::Object(mut e) = e
                    && let Some(Value::String(k)) = e.remove("key")
                {
                    m.insert(k, e.remove("value").unwrap_or(Value::Null));
                }
            }
            Value::Object(m)
        }
        other => other,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// protobuf JSON duration text: `2s`, `0.250s`, `1.000000500s`.
pub fn format_proto_duration(secs: i64, nanos: i64) -> String {
    if nanos == 0 {
        format!("{secs}s")
    } else if nanos % 1_000_000 == 0 {
        format!("{secs}.{:03}s", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!("{secs}.{:06}s", nanos / 1_000)
    } else {
        format!("{secs}.{nanos:09}s")
    }
}

/// Parses a protobuf JSON duration (`"2s"`, `"0.5s"`) — also accepts Go durations (`"1m30s"`)
/// as Istio's YAML loader does.
pub fn parse_proto_duration(s: &str) -> Option<Duration> {
    if let Some(num) = s.strip_suffix('s')
        && !num.is_empty()
        && num.chars().all(|c| c.is_ascii_digit() || c == '.')
    {
        let f: f64 = num.parse().ok()?;
        return Some(Duration::from_secs_f64(f));
    }
    crate::ca::config::parse_duration("duration", s).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn canonicalises_names_durations_wrappers_and_enum_defaults() {
        let pc = ProxyConfig::from_value(
            json!({
                "drain_duration": {"seconds": 2},
                "stats_compression": {"value": false},
                "control_plane_auth_policy": "NONE",
                "proxy_metadata": {"ISTIO_META_X": "1"},
                "runtime_values": [{"key": "a.b_c", "value": "true"}],
                "connection_settings": {"global_downstream_connection_limit": {"value": 15000}},
            }),
            "test",
        )
        .unwrap();
        assert_eq!(
            Value::Object(pc.0),
            json!({
                "drainDuration": "2s",
                "statsCompression": false,
                "proxyMetadata": {"ISTIO_META_X": "1"},
                "runtimeValues": {"a.b_c": "true"},
                "connectionSettings": {"globalDownstreamConnectionLimit": 15000},
            })
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = ProxyConfig::from_yaml("drainDuration: soon", "PROXY_CONFIG").unwrap_err();
        assert!(e.to_string().contains("PROXY_CONFIG: drainDuration"), "{e}");
        let e = ProxyConfig::from_yaml("statusPort: x", "PROXY_CONFIG").unwrap_err();
        assert!(e.to_string().contains("statusPort"), "{e}");
        let mut base = ProxyConfig::mesh_default();
        base.merge(&ProxyConfig::from_yaml("{\"drainDuration\":\"1.5s\"}", "x").unwrap());
        assert_eq!(base.drain_duration(), Duration::from_millis(1500));
        assert_eq!(base.status_port(), 15020);
    }
}
