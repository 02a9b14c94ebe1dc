// SPDX-License-Identifier: Apache-2.0
//! Application probe rewriting: kubelet probes are redirected to the agent's status port
//! (`/app-health/<container>/{readyz,livez,startupz}`, `/app-lifecycle/<container>/...`) and the
//! originals are handed to the agent in `ISTIO_KUBE_APP_PROBERS`.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::gojson::{Ty, to_go_json};

const PROBERS_ENV: &str = "ISTIO_KUBE_APP_PROBERS";

fn urls(c: &str) -> [String; 5] {
    [
        format!("/app-health/{c}/readyz"),
        format!("/app-health/{c}/livez"),
        format!("/app-health/{c}/startupz"),
        format!("/app-lifecycle/{c}/prestopz"),
        format!("/app-lifecycle/{c}/poststartz"),
    ]
}

/// The internal prober for a kubelet probe or lifecycle handler.
fn to_prober(p: Option<&Value>, lifecycle: bool) -> Option<Map<String, Value>> {
    let p = p?;
    let mut out = Map::new();
    let kinds: &[&str] = if lifecycle {
        &["httpGet", "tcpSocket"]
    } else {
        &["httpGet", "tcpSocket", "grpc"]
    };
    for k in kinds {
        if let Some(x) = p.get(*k).filter(|x| !x.is_null()) {
            out.insert((*k).to_string(), x.clone());
            if !lifecycle && let Some(t) = p.get("timeoutSeconds").filter(|t| t.as_i64() != Some(0))
            {
                out.insert("timeoutSeconds".into(), t.clone());
            }
            return Some(out);
        }
    }
    None
}

fn update_named_port(
    p: Option<Map<String, Value>>,
    ports: &BTreeMap<String, i64>,
    target: i64,
) -> Option<Map<String, Value>> {
    let mut p = p?;
    if p.contains_key("grpc") {
        return Some(p);
    }
    let key = if p.contains_key("httpGet") {
        "httpGet"
    } else {
        "tcpSocket"
    };
    let action = p.get_mut(key)?.as_object_mut()?;
    match action.get("port") {
        Some(Value::String(name)) => {
            let n = *ports.get(name)?;
            action.insert("port".into(), json!(n));
        }
        Some(v) if v.as_i64() == Some(target) => return None,
        _ => {}
    }
    Some(p)
}

fn all_containers(pod: &Value) -> Vec<Value> {
    let mut v: Vec<Value> = pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    v.extend(
        pod.pointer("/spec/containers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    );
    v
}

/// `DumpAppProbers`: the JSON for `ISTIO_KUBE_APP_PROBERS`, or `None` when there is nothing to proxy.
pub fn dump_app_probers(pod: &Value, status_port: i64) -> Option<String> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for c in all_containers(pod) {
        let name = c.get("name").and_then(Value::as_str).unwrap_or("");
        if name == crate::inject::PROXY_CONTAINER {
            continue;
        }
        let [readyz, livez, startupz, prestopz, poststartz] = urls(name);
        let mut ports = BTreeMap::new();
        for p in c
            .get("ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            if let (Some(n), Some(cp)) = (
                p.get("name").and_then(Value::as_str),
                p.get("containerPort").and_then(Value::as_i64),
            ) && !n.is_empty()
            {
                ports.insert(n.to_string(), cp);
            }
        }
        for (url, probe) in [
            (readyz, "readinessProbe"),
            (livez, "livenessProbe"),
            (startupz, "startupProbe"),
        ] {
            if let Some(h) = update_named_port(to_prober(c.get(probe), false), &ports, status_port)
            {
                out.insert(url, Value::Object(h));
            }
        }
        if let Some(lc) = c.get("lifecycle") {
            for (url, hook) in [(prestopz, "preStop"), (poststartz, "postStart")] {
                if let Some(h) =
                    update_named_port(to_prober(lc.get(hook), true), &ports, status_port)
                {
                    out.insert(url, Value::Object(h));
                }
            }
        }
    }
    if out.is_empty() {
        return None;
    }
    Some(probers_json(&out))
}

fn probers_json(m: &BTreeMap<String, Value>) -> String {
    let parts: Vec<String> = m
        .iter()
        .map(|(k, v)| {
            format!(
                "{}:{}",
                serde_json::to_string(k).unwrap_or_default(),
                to_go_json(v, Ty::Prober)
            )
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// `mergeOrAppendProbers` on the proxy container.
pub fn merge_or_append_probers(c: &mut Value, previously_injected: bool, probers: &str) {
    let Some(o) = c.as_object_mut() else { return };
    let env = o.entry("env").or_insert_with(|| json!([]));
    let Some(env) = env.as_array_mut() else {
        return;
    };
    if previously_injected
        && let Some(e) = env
            .iter_mut()
            .find(|e| e.get("name").and_then(Value::as_str) == Some(PROBERS_ENV))
    {
        let existing: Option<BTreeMap<String, Value>> = e
            .get("value")
            .and_then(Value::as_str)
            .and_then(|s| serde_json::from_str(s).ok());
        let new: Option<BTreeMap<String, Value>> = serde_json::from_str(probers).ok();
        if let (Some(existing), Some(mut new)) = (existing, new) {
            for (k, v) in existing {
                new.insert(k, v);
            }
            *e = json!({"name": PROBERS_ENV, "value": probers_json(&new)});
        }
        return;
    }
    env.push(json!({"name": PROBERS_ENV, "value": probers}));
}

fn rewrite_http_get(action: &mut Map<String, Value>, url: &str, port: i64) {
    action.insert("port".into(), json!(port));
    action.insert("path".into(), json!(url));
    if action.get("scheme").and_then(Value::as_str) == Some("HTTPS") {
        action.insert("scheme".into(), json!("HTTP"));
    }
}

fn convert(p: &mut Value, url: &str, port: i64, lifecycle: bool) {
    let Some(o) = p.as_object_mut() else { return };
    if let Some(h) = o.get_mut("httpGet").and_then(Value::as_object_mut) {
        rewrite_http_get(h, url, port);
        return;
    }
    let others: &[&str] = if lifecycle {
        &["tcpSocket"]
    } else {
        &["tcpSocket", "grpc"]
    };
    for k in others {
        if o.get(*k).is_some_and(|x| !x.is_null()) {
            o.remove(*k);
            let mut h = Map::new();
            rewrite_http_get(&mut h, url, port);
            o.insert("httpGet".into(), Value::Object(h));
            return;
        }
    }
}

/// `patchRewriteProbe`: points every app probe and lifecycle hook at the status port.
pub fn patch_rewrite_probes(pod: &mut Value, annotations: &Map<String, Value>, default_port: i64) {
    let port = match annotations
        .get("status.sidecar.istio.io/port")
        .and_then(Value::as_str)
    {
        Some(v) => v.trim().parse::<i64>().unwrap_or(0),
        None => default_port,
    };
    for key in ["containers", "initContainers"] {
        let Some(list) = pod
            .pointer_mut(&format!("/spec/{key}"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for c in list.iter_mut() {
            let name = c
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if name == crate::inject::PROXY_CONTAINER {
                continue;
            }
            let [readyz, livez, startupz, prestopz, poststartz] = urls(&name);
            for (probe, url) in [
                ("readinessProbe", &readyz),
                ("livenessProbe", &livez),
                ("startupProbe", &startupz),
            ] {
                if let Some(p) = c.get_mut(probe) {
                    convert(p, url, port, false);
                }
            }
            if let Some(lc) = c.get_mut("lifecycle") {
                for (hook, url) in [("preStop", &prestopz), ("postStart", &poststartz)] {
                    if let Some(h) = lc.get_mut(hook) {
                        convert(h, url, port, true);
                    }
                }
            }
        }
    }
}
