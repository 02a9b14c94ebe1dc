// SPDX-License-Identifier: Apache-2.0
//! Strategic merge patch for Pods: the apply half of Kubernetes' `strategicpatch`, with the Pod
//! schema's patch strategies and merge keys. Istio overlays the rendered injection template onto
//! the pod with it, so list ordering and merge rules must match.

use serde_json::{Map, Value};

/// The Pod types whose lists carry patch strategies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ty {
    Pod,
    Meta,
    Spec,
    Container,
    Other,
}

/// Patch strategy for field `key` of type `t`: `Some(merge_key)` for merge lists (empty merge key
/// = list of primitives merged as a set), `None` for replace.
fn strategy(t: Ty, key: &str) -> Option<&'static str> {
    match (t, key) {
        (
            Ty::Spec,
            "volumes"
            | "containers"
            | "initContainers"
            | "ephemeralContainers"
            | "imagePullSecrets",
        ) => Some("name"),
        (Ty::Spec, "hostAliases") => Some("ip"),
        (Ty::Spec, "schedulingGates" | "resourceClaims") => Some("name"),
        (Ty::Container, "ports") => Some("containerPort"),
        (Ty::Container, "env") => Some("name"),
        (Ty::Container, "volumeMounts") => Some("mountPath"),
        (Ty::Container, "volumeDevices") => Some("devicePath"),
        (Ty::Meta, "finalizers") => Some(""),
        (Ty::Meta, "ownerReferences") => Some("uid"),
        _ => None,
    }
}

fn child(t: Ty, key: &str) -> Ty {
    match (t, key) {
        (Ty::Pod, "metadata") => Ty::Meta,
        (Ty::Pod, "spec") => Ty::Spec,
        (Ty::Spec, "containers" | "initContainers" | "ephemeralContainers") => Ty::Container,
        _ => Ty::Other,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("cannot merge lists without merge key for {0}")]
    NoMergeKey(String),
}

/// Applies `patch` to the pod `original`.
pub fn merge_pod(original: &Value, patch: &Value) -> Result<Value, MergeError> {
    merge_value(original, patch, Ty::Pod, "")
}

fn merge_value(original: &Value, patch: &Value, t: Ty, path: &str) -> Result<Value, MergeError> {
    match (original, patch) {
        (Value::Object(o), Value::Object(p)) => Ok(Value::Object(merge_map(o, p, t, path)?)),
        _ => Ok(discard_nulls(patch)),
    }
}

fn merge_map(
    original: &Map<String, Value>,
    patch: &Map<String, Value>,
    t: Ty,
    path: &str,
) -> Result<Map<String, Value>, MergeError> {
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut p = patch.clone();
        p.remove("$patch");
        return Ok(p);
    }
    let mut out = original.clone();
    for (k, pv) in patch {
        if k.starts_with('$') {
            continue;
        }
        let fpath = format!("{path}.{k}");
        if pv.is_null() {
            out.remove(k);
            continue;
        }
        let Some(ov) = original.get(k) else {
            out.insert(k.clone(), discard_nulls(pv));
            continue;
        };
        let ct = child(t, k);
        let merged = match (ov, pv) {
            (Value::Object(_), Value::Object(_)) => merge_value(ov, pv, ct, &fpath)?,
            (Value::Array(oa), Value::Array(pa)) => match strategy(t, k) {
                Some(mk) => Value::Array(merge_list(oa, pa, mk, ct, &fpath)?),
                None => discard_nulls(pv),
            },
            _ => discard_nulls(pv),
        };
        out.insert(k.clone(), merged);
    }
    Ok(out)
}

fn discard_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, x)| !x.is_null())
                .map(|(k, x)| (k.clone(), discard_nulls(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(discard_nulls).collect()),
        other => other.clone(),
    }
}

fn merge_list(
    original: &[Value],
    patch: &[Value],
    merge_key: &str,
    t: Ty,
    path: &str,
) -> Result<Vec<Value>, MergeError> {
    if original.is_empty() && patch.is_empty() {
        return Ok(Vec::new());
    }
    let maps = original.iter().chain(patch).all(Value::is_object);
    if !maps {
        // Primitive set merge: union, keeping the first occurrence.
        let mut out: Vec<Value> = Vec::new();
        for v in original.iter().chain(patch) {
            if !out.contains(v) {
                out.push(v.clone());
            }
        }
        return Ok(out);
    }
    if merge_key.is_empty() {
        return Err(MergeError::NoMergeKey(path.to_string()));
    }
    let key_of = |v: &Value| v.get(merge_key).cloned().unwrap_or(Value::Null);
    // Merge each patch item into its match, or append it.
    let mut merged: Vec<Value> = original.to_vec();
    let mut deletes: Vec<Value> = Vec::new();
    for p in patch {
        if p.get("$patch").and_then(Value::as_str) == Some("delete") {
            deletes.push(key_of(p));
            continue;
        }
        let k = key_of(p);
        match merged.iter_mut().find(|o| key_of(o) == k) {
            Some(o) => *o = merge_value(o, p, t, path)?,
            None => merged.push(discard_nulls(p)),
        }
    }
    merged.retain(|m| !deletes.contains(&key_of(m)));
    // Order: patch items in patch order, server-only items interleaved by their original order.
    let patch_keys: Vec<Value> = patch.iter().map(key_of).collect();
    let server_order: Vec<Value> = original.iter().map(key_of).collect();
    let mut patch_items: Vec<Value> = Vec::new();
    let mut server_only: Vec<Value> = Vec::new();
    for m in merged {
        if patch_keys.contains(&key_of(&m)) {
            patch_items.push(m);
        } else {
            server_only.push(m);
        }
    }
    patch_items.sort_by_key(|m| {
        patch_keys
            .iter()
            .position(|k| *k == key_of(m))
            .unwrap_or(usize::MAX)
    });
    let idx = |v: &Value| server_order.iter().position(|k| *k == key_of(v));
    let mut out = Vec::with_capacity(patch_items.len() + server_only.len());
    let (mut i, mut j) = (0, 0);
    while i < server_only.len() || j < patch_items.len() {
        if i >= server_only.len() {
            out.push(patch_items[j].clone());
            j += 1;
        } else if j >= patch_items.len() {
            out.push(server_only[i].clone());
            i += 1;
        } else {
            let left_first =
                matches!((idx(&server_only[i]), idx(&patch_items[j])), (Some(l), Some(r)) if l < r);
            if left_first {
                out.push(server_only[i].clone());
                i += 1;
            } else {
                out.push(patch_items[j].clone());
                j += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn containers_merge_by_name_and_patch_items_come_first() {
        let pod = json!({"spec": {"containers": [{"name": "app", "image": "a"}]}});
        let patch = json!({"spec": {"containers": [{"name": "istio-proxy", "image": "p"}]}});
        let out = merge_pod(&pod, &patch).unwrap();
        assert_eq!(out["spec"]["containers"][0]["name"], "istio-proxy");
        assert_eq!(out["spec"]["containers"][1]["name"], "app");
        let patch2 = json!({"spec": {"containers": [{"name": "app", "env": [{"name": "X", "value": "1"}]}]}});
        let out2 = merge_pod(&out, &patch2).unwrap();
        assert_eq!(out2["spec"]["containers"][1]["env"][0]["name"], "X");
        assert_eq!(out2["spec"]["containers"][1]["image"], "a");
    }
}
