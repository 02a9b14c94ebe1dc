// SPDX-License-Identifier: Apache-2.0
//! Node metadata as pilot-agent builds it (`GetNodeMetaData` + `marshalMetadata`): untyped
//! metadata from ProxyConfig `proxyMetadata` ISTIO_META_* entries, ISTIO_META_<K>=v (key K),
//! ISTIO_METAJSON_<K>={json} (its keys merged at the top level); then the typed fields
//! (NAME, NAMESPACE, LABELS, ANNOTATIONS, INSTANCE_IPS, PROXY_CONFIG, ports, …) written over them.
//! A typed field that is empty is omitted, so the untyped value of the same key shows through.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::{BootstrapError, BootstrapInput, invalid};
use crate::config::{ProxyConfig, read_downward_api};

/// Typed boolean metadata (`model.StringBool`): written `"true"` when true.
pub const STRING_BOOL_META: &[&str] = &[
    "ENABLE_SELF_DISCOVERY",
    "DNS_CAPTURE",
    "DNS_AUTO_ALLOCATE",
    "ENABLE_HBONE",
    "DISABLE_HBONE_SEND",
    "INBOUND_LISTENER_EXACT_BALANCE",
    "OUTBOUND_LISTENER_EXACT_BALANCE",
];

/// Go `strconv.ParseBool`.
pub fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// ISTIO_META_POD_PORTS: a JSON list of `{name, containerPort, protocol}`, re-serialised compactly
/// in that field order (as pilot-agent's `PodPortList`).
pub fn normalise_pod_ports(v: &str) -> Result<String, String> {
    let list: Vec<Map<String, Value>> =
        serde_json::from_str(v).map_err(|e| format!("expected a JSON list of ports: {e}"))?;
    // Written by hand: Go's field order (name, containerPort, protocol), not sorted keys.
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut items = Vec::new();
    for p in list {
        let mut fields = Vec::new();
        if let Some(n) = p
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            fields.push(format!("\"name\":{}", q(n)));
        }
        let port = p
            .get("containerPort")
            .map_or(Some(0), Value::as_i64)
            .ok_or("containerPort must be an integer")?;
        fields.push(format!("\"containerPort\":{port}"));
        let proto = match p.get("protocol") {
            None => "",
            Some(v) => v.as_str().ok_or("protocol must be a string")?,
        };
        fields.push(format!("\"protocol\":{}", q(proto)));
        items.push(format!("{{{}}}", fields.join(",")));
    }
    Ok(format!("[{}]", items.join(",")))
}

pub(super) fn dedup(v: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in v {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

pub(super) struct Node {
    pub metadata: Map<String, Value>,
    pub raw: Map<String, Value>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub workload_name: String,
    pub namespace: String,
    pub locality: (String, String, String),
}

fn string_map(v: &Value) -> Option<BTreeMap<String, String>> {
    let m = v.as_object()?;
    let mut out = BTreeMap::new();
    for (k, v) in m {
        out.insert(k.clone(), v.as_str()?.to_owned());
    }
    Some(out)
}

fn to_value(m: &BTreeMap<String, String>) -> Value {
    Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect(),
    )
}

pub(super) fn node_metadata(input: &BootstrapInput) -> Result<Node, BootstrapError> {
    let mut raw = Map::new();
    for (k, v) in input.proxy_config.string_map("proxyMetadata") {
        if let Some(key) = k.strip_prefix("ISTIO_META_") {
            raw.insert(key.into(), v.into());
        }
    }
    for (k, v) in &input.env {
        if let Some(key) = k.strip_prefix("ISTIO_META_") {
            raw.insert(key.into(), v.clone().into());
        }
    }
    for (k, v) in &input.env {
        if k.starts_with("ISTIO_METAJSON_") {
            match serde_json::from_str::<Map<String, Value>>(v) {
                Ok(m) => raw.extend(m),
                Err(e) => tracing::warn!(var = %k, error = %e, "metadata JSON ignored"),
            }
        }
    }
    let env_get = |name: &str| {
        input
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(v) = env_get("DNS_PROXY_ADDR").filter(|v| !v.is_empty()) {
        raw.insert("DNS_PROXY_ADDR".into(), v.into());
    }

    let mut typed = Map::new();
    let raw_str = |k: &str| raw.get(k).and_then(Value::as_str).unwrap_or("");

    // Typed values taken from the untyped ones.
    for k in STRING_BOOL_META {
        if let Some(v) = raw.get(*k) {
            let s = v
                .as_str()
                .ok_or_else(|| invalid(&format!("ISTIO_META_{k}"), "expected a string"))?;
            match parse_go_bool(s) {
                Some(true) => {
                    typed.insert((*k).into(), "true".into());
                }
                Some(false) => {}
                None => {
                    return Err(invalid(
                        &format!("ISTIO_META_{k}"),
                        format!("{s:?} is not a boolean"),
                    ));
                }
            }
        }
    }
    if let Some(v) = raw.get("POD_PORTS") {
        let s = v
            .as_str()
            .ok_or_else(|| invalid("ISTIO_META_POD_PORTS", "expected a string"))?;
        if !s.is_empty() {
            let n = normalise_pod_ports(s).map_err(|e| invalid("ISTIO_META_POD_PORTS", e))?;
            typed.insert("POD_PORTS".into(), n.into());
        }
    }
    if raw_str("ISTIO_VERSION").is_empty() {
        typed.insert("ISTIO_VERSION".into(), input.istio_version.clone().into());
    }
    let ips = dedup(&input.instance_ips);
    if !ips.is_empty() {
        typed.insert("INSTANCE_IPS".into(), ips.join(",").into());
    }
    if input.sts_port != 0 {
        typed.insert("STS_PORT".into(), input.sts_port.to_string().into());
    }
    for (k, p) in [
        ("ENVOY_STATUS_PORT", input.envoy_status_port),
        ("ENVOY_PROMETHEUS_PORT", input.envoy_prometheus_port),
    ] {
        if p != 0 {
            typed.insert(k.into(), p.into());
        }
    }
    if input.exit_on_zero_active_connections {
        typed.insert("EXIT_ON_ZERO_ACTIVE_CONNECTIONS".into(), "true".into());
    }
    if !input.workload_identity_socket_file.is_empty() {
        typed.insert(
            "WORKLOAD_IDENTITY_SOCKET_FILE".into(),
            input.workload_identity_socket_file.clone().into(),
        );
    }
    typed.insert(
        "PROXY_CONFIG".into(),
        Value::Object(input.proxy_config.0.clone()),
    );

    // Labels: ISTIO_METAJSON_LABELS (also the static labels), then the downward-API file.
    let mut labels: BTreeMap<String, String> =
        raw.get("LABELS").and_then(string_map).unwrap_or_default();
    let mut static_labels: Option<BTreeMap<String, String>> = None;
    for (k, v) in &input.env {
        match k.as_str() {
            "ISTIO_METAJSON_LABELS" => {
                if let Ok(m) = serde_json::from_str::<BTreeMap<String, String>>(v)
                    && !m.is_empty()
                {
                    labels = m.clone();
                    static_labels = Some(m);
                }
            }
            "POD_NAME" if !v.is_empty() => {
                typed.insert("NAME".into(), v.clone().into());
            }
            "POD_NAMESPACE" if !v.is_empty() => {
                typed.insert("NAMESPACE".into(), v.clone().into());
            }
            "SERVICE_ACCOUNT" if !v.is_empty() => {
                typed.insert("SERVICE_ACCOUNT".into(), v.clone().into());
            }
            _ => {}
        }
    }
    // With no labels file, Istio's LABELS and STATIC_LABELS are one map (so the locality label
    // below is rewritten in both).
    let mut shared_static = true;
    match read_downward_api(&input.labels_file) {
        Ok(file_labels) => {
            shared_static = false;
            let mut l = static_labels.clone().unwrap_or_default();
            for (k, v) in file_labels {
                if k != "pod-template-hash" {
                    l.insert(k, v);
                }
            }
            labels = l;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, "pod labels not read"),
    }
    let mut annotations: BTreeMap<String, String> = raw
        .get("ANNOTATIONS")
        .and_then(string_map)
        .unwrap_or_default();
    match read_downward_api(&input.annotations_file) {
        Ok(a) => annotations.extend(a),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, "pod annotations not read"),
    }

    let mut locality = (String::new(), String::new(), String::new());
    if let Some(l) = labels.get("istio-locality").cloned() {
        let sanitized = l.replace('.', "/");
        if !sanitized.is_empty() {
            labels.insert("istio-locality".into(), sanitized.clone());
            if shared_static && let Some(s) = static_labels.as_mut() {
                s.insert("istio-locality".into(), sanitized.clone());
            }
        }
        let mut parts = sanitized.splitn(3, '/');
        locality = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
    }
    if !labels.is_empty() {
        typed.insert("LABELS".into(), to_value(&labels));
    }
    if let Some(s) = static_labels.as_ref().filter(|s| !s.is_empty()) {
        typed.insert("STATIC_LABELS".into(), to_value(s));
    }
    if !annotations.is_empty() {
        typed.insert("ANNOTATIONS".into(), to_value(&annotations));
    }
    if !input.pilot_san.is_empty() {
        typed.insert("PILOT_SAN".into(), input.pilot_san.clone().into());
    }
    if !input.outlier_log_path.is_empty() {
        typed.insert(
            "OUTLIER_LOG_PATH".into(),
            input.outlier_log_path.clone().into(),
        );
    }
    let hbone = typed.get("ENABLE_HBONE").and_then(Value::as_str) == Some("true");
    let discovery = input.metadata_discovery.unwrap_or(hbone);
    typed.insert("METADATA_DISCOVERY".into(), discovery.to_string().into());

    // Untyped keys the typed ones left empty (Istio: `marshalMetadata`).
    let mut metadata = typed;
    for (k, v) in &raw {
        if !metadata.contains_key(k) {
            metadata.insert(k.clone(), v.clone());
        }
    }
    let workload_name = raw_str("WORKLOAD_NAME").to_owned();
    let namespace = metadata
        .get("NAMESPACE")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    Ok(Node {
        metadata,
        raw,
        labels,
        annotations,
        workload_name,
        namespace,
        locality,
    })
}

fn app_label(labels: &BTreeMap<String, String>) -> Option<&str> {
    labels
        .get("app")
        .or_else(|| labels.get("app.kubernetes.io/name"))
        .map(String::as_str)
}

fn canonical_service<'a>(labels: &'a BTreeMap<String, String>, workload: &'a str) -> &'a str {
    labels
        .get("service.istio.io/canonical-name")
        .or_else(|| labels.get("app.kubernetes.io/name"))
        .or_else(|| labels.get("app"))
        .map_or(workload, String::as_str)
}

/// The node's cluster (pilot-agent `getServiceCluster`).
pub(super) fn service_cluster(pc: &ProxyConfig, node: &Node) -> String {
    let or_default = |name: &str| -> String {
        if !name.is_empty() && name != "istio-proxy" {
            return name.to_owned();
        }
        if let Some(app) = app_label(&node.labels) {
            return format!("{app}.{}", node.namespace);
        }
        if !node.workload_name.is_empty() {
            return format!("{}.{}", node.workload_name, node.namespace);
        }
        if !node.namespace.is_empty() {
            return format!("istio-proxy.{}", node.namespace);
        }
        "istio-proxy".into()
    };
    if let Some(sc) = pc.str("serviceCluster") {
        return or_default(sc);
    }
    let workload = if node.workload_name.is_empty() {
        "istio-proxy"
    } else {
        node.workload_name.as_str()
    };
    match pc.str("tracingServiceName") {
        Some("CANONICAL_NAME_ONLY") => or_default(canonical_service(&node.labels, workload)),
        Some("CANONICAL_NAME_AND_NAMESPACE") => {
            let cs = canonical_service(&node.labels, workload);
            if node.namespace.is_empty() {
                or_default(cs)
            } else {
                format!("{cs}.{}", node.namespace)
            }
        }
        _ => or_default("istio-proxy"),
    }
}
