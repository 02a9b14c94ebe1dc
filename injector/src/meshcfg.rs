// SPDX-License-Identifier: Apache-2.0
//! Istio mesh config (the `mesh` key of the `istio` ConfigMap) and ProxyConfig, held as proto-JSON
//! trees with Istio's defaults applied, plus the few typed reads injection needs.

use serde_json::{Map, Value, json};

use crate::value::{MapKind, V};

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("mesh config: {0}")]
    Parse(String),
    #[error("proxy config: {0}")]
    Proxy(String),
}

/// `mesh.DefaultProxyConfig()`.
pub fn default_proxy_config() -> Value {
    json!({
        "configPath": "./etc/istio/proxy",
        "binaryPath": "/usr/local/bin/envoy",
        "serviceCluster": "istio-proxy",
        "drainDuration": "45s",
        "terminationDrainDuration": "5s",
        "proxyAdminPort": 15000,
        "controlPlaneAuthPolicy": "MUTUAL_TLS",
        "discoveryAddress": "istiod.istio-system.svc:15012",
        "statNameLength": 189,
        "statusPort": 15020
    })
}

/// `mesh.DefaultMeshConfig()` (the fields injection reads, plus the common ones).
pub fn default_mesh_config() -> Value {
    json!({
        "enableTracing": true,
        "accessLogFile": "",
        "accessLogEncoding": "TEXT",
        "ingressService": "istio-ingressgateway",
        "ingressControllerMode": "STRICT",
        "ingressClass": "istio",
        "trustDomain": "cluster.local",
        "enableAutoMtls": true,
        "outboundTrafficPolicy": {"mode": "ALLOW_ANY"},
        "inboundTrafficPolicy": {"mode": "PASSTHROUGH"},
        "localityLbSetting": {"enabled": true},
        "defaultConfig": default_proxy_config(),
        "rootNamespace": "istio-system",
        "proxyListenPort": 15001,
        "proxyInboundListenPort": 15006,
        "connectTimeout": "10s",
        "defaultServiceExportTo": ["*"],
        "defaultVirtualServiceExportTo": ["*"],
        "defaultDestinationRuleExportTo": ["*"],
        "dnsRefreshRate": "60s",
        "enablePrometheusMerge": true,
        "defaultProviders": {},
        "extensionProviders": [
            {"name": "prometheus", "prometheus": {}},
            {"name": "stackdriver", "stackdriver": {}},
            {"name": "envoy", "envoyFileAccessLog": {"path": "/dev/stdout"}}
        ]
    })
}

/// ProxyConfig fields in proto declaration order (protojson writes them in this order).
const PROXY_CONFIG_FIELDS: &[&str] = &[
    "configPath",
    "binaryPath",
    "serviceCluster",
    "tracingServiceName",
    "drainDuration",
    "parentShutdownDuration",
    "discoveryAddress",
    "discoveryRefreshDelay",
    "zipkinAddress",
    "statsdUdpAddress",
    "envoyMetricsServiceAddress",
    "proxyAdminPort",
    "availabilityZone",
    "controlPlaneAuthPolicy",
    "customConfigFile",
    "statNameLength",
    "concurrency",
    "proxyBootstrapTemplatePath",
    "interceptionMode",
    "tracing",
    "sds",
    "envoyAccessLogService",
    "envoyMetricsService",
    "proxyMetadata",
    "runtimeValues",
    "statusPort",
    "extraStatTags",
    "gatewayTopology",
    "terminationDrainDuration",
    "meshId",
    "readinessProbe",
    "proxyStatsMatcher",
    "holdApplicationUntilProxyStarts",
    "caCertificatesPem",
    "image",
    "privateKeyProvider",
    "proxyHeaders",
    "fileFlushInterval",
    "fileFlushMinSizeKb",
];

/// Fields that are protobuf wrappers (BoolValue, Int32Value...): written even when zero.
const WRAPPER_FIELDS: &[&str] = &["concurrency", "holdApplicationUntilProxyStarts"];

/// Applies mesh config YAML over the defaults like `mesh.ApplyMeshConfig`: fields replace the
/// defaults, except `defaultConfig`, which is merged as a proxy config, and extension providers,
/// which are added to the defaults by name.
pub fn apply_mesh_config(yaml: &str) -> Result<Value, MeshError> {
    let mut mesh = default_mesh_config();
    if yaml.trim().is_empty() {
        return Ok(mesh);
    }
    let user: Value = serde_yaml::from_str(yaml).map_err(|e| MeshError::Parse(e.to_string()))?;
    let Value::Object(user) = user else {
        if user.is_null() {
            return Ok(mesh);
        }
        return Err(MeshError::Parse("expected a mapping".into()));
    };
    let Value::Object(m) = &mut mesh else {
        return Ok(mesh);
    };
    for (k, v) in user {
        match k.as_str() {
            "defaultConfig" => {
                let base = m
                    .get("defaultConfig")
                    .cloned()
                    .unwrap_or_else(default_proxy_config);
                let merged = merge_proxy_config(&base, &v)?;
                m.insert(k, merged);
            }
            "extensionProviders" => {
                let mut list = match m.get("extensionProviders") {
                    Some(Value::Array(a)) => a.clone(),
                    _ => Vec::new(),
                };
                if let Value::Array(add) = v {
                    for p in add {
                        let name = p.get("name").cloned();
                        list.retain(|x| x.get("name") != name.as_ref());
                        list.push(p);
                    }
                }
                m.insert(k, Value::Array(list));
            }
            _ => {
                m.insert(k, v);
            }
        }
    }
    Ok(mesh)
}

/// Merges a proxy config (YAML/JSON value) over `base` like `mesh.MergeProxyConfig`: fields replace,
/// messages merge, `proxyMetadata` entries are added to the existing ones.
pub fn merge_proxy_config(base: &Value, over: &Value) -> Result<Value, MeshError> {
    let Value::Object(over) = over else {
        if over.is_null() {
            return Ok(base.clone());
        }
        return Err(MeshError::Proxy("expected a mapping".into()));
    };
    let mut out = match base {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    for (k, v) in over {
        if !PROXY_CONFIG_FIELDS.contains(&k.as_str()) {
            return Err(MeshError::Proxy(format!(
                "unknown field {k:?} in ProxyConfig"
            )));
        }
        let v = normalize_field(k, v)?;
        match (out.get_mut(k), &v) {
            (Some(Value::Object(cur)), Value::Object(add)) if k != "tracing" || !add.is_empty() => {
                for (ak, av) in add {
                    cur.insert(ak.clone(), av.clone());
                }
            }
            _ => {
                out.insert(k.clone(), v);
            }
        }
    }
    Ok(Value::Object(out))
}

fn normalize_field(k: &str, v: &Value) -> Result<Value, MeshError> {
    match k {
        "drainDuration"
        | "terminationDrainDuration"
        | "parentShutdownDuration"
        | "discoveryRefreshDelay"
        | "fileFlushInterval" => {
            let s = v
                .as_str()
                .ok_or_else(|| MeshError::Proxy(format!("{k}: expected a duration string")))?;
            Ok(Value::String(normalize_duration(s).ok_or_else(|| {
                MeshError::Proxy(format!("{k}: bad duration {s:?}"))
            })?))
        }
        "interceptionMode" => match v.as_str() {
            Some("REDIRECT" | "TPROXY" | "NONE") => Ok(v.clone()),
            _ => Err(MeshError::Proxy(format!(
                "interceptionMode: invalid value {v}"
            ))),
        },
        "statusPort" | "proxyAdminPort" => match v.as_i64() {
            Some(p) if (0..=65535).contains(&p) => Ok(v.clone()),
            _ => Err(MeshError::Proxy(format!("{k}: invalid port {v}"))),
        },
        "concurrency" => match v.as_i64() {
            Some(c) if c >= 0 => Ok(v.clone()),
            _ => Err(MeshError::Proxy(format!(
                "concurrency: must be a non-negative integer, got {v}"
            ))),
        },
        "proxyMetadata" => match v {
            Value::Object(m) => Ok(Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            Value::String(
                                v.as_str()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| v.to_string()),
                            ),
                        )
                    })
                    .collect(),
            )),
            _ => Err(MeshError::Proxy("proxyMetadata: expected a map".into())),
        },
        _ => Ok(v.clone()),
    }
}

/// Parses a Go/proto duration ("23s", "1.5s", "1m30s", "500ms") and writes it as protojson does.
pub fn normalize_duration(s: &str) -> Option<String> {
    let nanos = parse_go_duration(s)?;
    let secs = nanos / 1_000_000_000;
    let frac = nanos % 1_000_000_000;
    Some(if frac == 0 {
        format!("{secs}s")
    } else if frac % 1_000_000 == 0 {
        format!("{secs}.{:03}s", frac / 1_000_000)
    } else if frac % 1000 == 0 {
        format!("{secs}.{:06}s", frac / 1000)
    } else {
        format!("{secs}.{frac:09}s")
    })
}

fn parse_go_duration(s: &str) -> Option<i128> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let nlen = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..nlen].parse().ok()?;
        rest = &rest[nlen..];
        let ulen = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..ulen] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[ulen..];
    }
    Some(total.round() as i128)
}

/// `protoToJSON .ProxyConfig` after Istio's `cleanProxyConfig`: only the fields that differ from
/// the defaults, in proto field order.
pub fn proxy_config_to_json(v: &V) -> String {
    let Value::Object(pc) = v.to_json() else {
        return "{}".into();
    };
    let defaults = default_proxy_config();
    let mut out = String::from("{");
    let mut first = true;
    let mut keys: Vec<&String> = pc.keys().collect();
    keys.sort_by_key(|k| {
        PROXY_CONFIG_FIELDS
            .iter()
            .position(|f| f == k)
            .unwrap_or(usize::MAX)
    });
    for k in keys {
        let val = &pc[k];
        if defaults.get(k) == Some(val) {
            continue;
        }
        let wrapper = WRAPPER_FIELDS.contains(&k.as_str());
        let zero = match val {
            Value::Null => true,
            Value::String(s) => s.is_empty() || (k == "interceptionMode" && s == "REDIRECT"),
            Value::Number(n) => n.as_f64() == Some(0.0) && !wrapper,
            Value::Bool(b) => !*b && !wrapper,
            Value::Array(a) => a.is_empty(),
            Value::Object(m) => m.is_empty() && k != "tracing",
        };
        if zero {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&serde_json::to_string(k).unwrap_or_default());
        out.push(':');
        out.push_str(&serde_json::to_string(&crate::gojson::sorted(val)).unwrap_or_default());
    }
    out.push('}');
    out
}

/// The ProxyConfig as templates see it: Go zero values filled in (the interception mode enum reads
/// as `REDIRECT`, `proxyMetadata` as an empty string map).
pub fn proxy_config_template_value(pc: &Value) -> V {
    let mut v = V::from_json(pc, MapKind::Struct);
    if let V::Map(m, _) = &mut v {
        let m = std::sync::Arc::make_mut(m);
        m.entry("interceptionMode".into())
            .or_insert_with(|| V::str("REDIRECT"));
        let meta = match m.remove("proxyMetadata") {
            Some(V::Map(mm, _)) => V::Map(mm, MapKind::StrMap),
            _ => V::map(Default::default(), MapKind::StrMap),
        };
        m.insert("proxyMetadata".into(), meta);
    }
    v
}

pub fn status_port(pc: &Value) -> i64 {
    pc.get("statusPort")
        .and_then(Value::as_i64)
        .unwrap_or(15020)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_like_protojson() {
        assert_eq!(normalize_duration("23s").as_deref(), Some("23s"));
        assert_eq!(normalize_duration("1m30s").as_deref(), Some("90s"));
        assert_eq!(normalize_duration("1.5s").as_deref(), Some("1.500s"));
        assert_eq!(normalize_duration("bogus"), None);
    }

    #[test]
    fn cleaned_proxy_config_keeps_only_changes() {
        let pc = merge_proxy_config(&default_proxy_config(), &json!({"drainDuration": "23s"}))
            .unwrap_or_default();
        assert_eq!(
            proxy_config_to_json(&proxy_config_template_value(&pc)),
            r#"{"drainDuration":"23s"}"#
        );
        let pc = merge_proxy_config(
            &default_proxy_config(),
            &json!({"holdApplicationUntilProxyStarts": false}),
        )
        .unwrap_or_default();
        assert_eq!(
            proxy_config_to_json(&proxy_config_template_value(&pc)),
            r#"{"holdApplicationUntilProxyStarts":false}"#
        );
    }
}
