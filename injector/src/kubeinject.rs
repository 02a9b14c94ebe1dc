// SPDX-License-Identifier: Apache-2.0
//! Offline injection (`istioctl kube-inject`): multi-document YAML in, injected YAML out. Pod
//! templates of the workload kinds Istio knows are injected; every other document passes through
//! unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::inject::{self, DeployMeta, IGNORED_NAMESPACES, InjectError, Request, Settings};

#[derive(Debug, thiserror::Error)]
pub enum KubeInjectError {
    #[error("document {doc}: {msg}")]
    Yaml { doc: usize, msg: String },
    #[error("document {doc}: {err}")]
    Inject { doc: usize, err: InjectError },
    #[error("document {doc}: spec.template is required value")]
    NoTemplate { doc: usize },
}

/// Splits a YAML stream on `---` separator lines (like the Kubernetes YAML reader).
pub fn split_documents(input: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    for line in input.split_inclusive('\n') {
        let t = line.trim_end();
        if t == "---" || (t.starts_with("--- ") && !t.starts_with("----")) {
            if !cur.trim().is_empty() {
                docs.push(std::mem::take(&mut cur));
            }
            cur.clear();
            continue;
        }
        cur.push_str(line);
    }
    if !cur.trim().is_empty() {
        docs.push(cur);
    }
    docs
}

/// Whether Istio's kube-inject scheme knows the object. Istio registers its kinds as
/// "unversioned", so the kind alone decides (a `v1` DeploymentConfig is injected too).
fn registered(_api_version: &str, kind: &str) -> bool {
    matches!(
        kind,
        "ReplicationController"
            | "Pod"
            | "List"
            | "Deployment"
            | "DaemonSet"
            | "ReplicaSet"
            | "StatefulSet"
            | "Job"
            | "CronJob"
            | "DeploymentConfig"
    )
}

/// Injects every document of `input`; `warn` receives skip notices.
pub fn kube_inject(
    settings: &Settings,
    input: &str,
    warn: &mut dyn FnMut(String),
) -> Result<String, KubeInjectError> {
    let mut out = String::new();
    for (i, raw) in split_documents(input).into_iter().enumerate() {
        let doc: Value = serde_yaml::from_str(&raw).map_err(|e| KubeInjectError::Yaml {
            doc: i,
            msg: e.to_string(),
        })?;
        let av = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
        if !registered(av, kind) {
            out.push_str(&raw);
            if !raw.ends_with('\n') {
                out.push('\n');
            }
        } else {
            let injected = inject_object(settings, doc, i, warn)?;
            out.push_str(
                &serde_yaml::to_string(&crate::gojson::sorted(&injected)).unwrap_or_default(),
            );
        }
        out.push_str("---\n");
    }
    Ok(out)
}

/// `IntoObject`: injects one registered object.
pub fn inject_object(
    settings: &Settings,
    mut obj: Value,
    doc: usize,
    warn: &mut dyn FnMut(String),
) -> Result<Value, KubeInjectError> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if kind == "List" {
        if let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut) {
            for item in items.iter_mut() {
                let av = item.get("apiVersion").and_then(Value::as_str).unwrap_or("");
                let k = item.get("kind").and_then(Value::as_str).unwrap_or("");
                if registered(av, k) {
                    *item = inject_object(settings, item.take(), doc, warn)?;
                }
            }
        }
        return Ok(obj);
    }
    let obj_name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let obj_ns = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    // Where the pod metadata and spec live.
    let (meta_ptr, spec_ptr) = match kind.as_str() {
        "Pod" => ("/metadata".to_string(), "/spec".to_string()),
        "CronJob" => (
            "/spec/jobTemplate/metadata".to_string(),
            "/spec/jobTemplate/spec/template/spec".to_string(),
        ),
        _ => (
            "/spec/template/metadata".to_string(),
            "/spec/template/spec".to_string(),
        ),
    };
    // `Template` is a pointer in these older APIs (Istio's exact check).
    if (kind == "ReplicationController" || kind == "DeploymentConfig")
        && obj.pointer("/spec/template").is_none()
    {
        return Err(KubeInjectError::NoTemplate { doc });
    }
    let metadata = obj
        .pointer(&meta_ptr)
        .cloned()
        .filter(|m| !m.is_null())
        .unwrap_or_else(|| json!({}));
    let spec = obj
        .pointer(&spec_ptr)
        .cloned()
        .filter(|m| !m.is_null())
        .unwrap_or_else(|| json!({}));
    let pod = json!({"metadata": metadata, "spec": spec});
    let deploy = if kind == "Pod" {
        inject::deploy_meta_from_pod(&pod)
    } else {
        DeployMeta {
            name: obj_name.clone(),
            namespace: obj_ns.clone(),
            kind: kind.clone(),
            api_version: api_version.clone(),
        }
    };
    let name = metadata
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(&deploy.name)
        .to_string();
    let full_name = if deploy.namespace.is_empty() {
        name.clone()
    } else {
        format!("{}/{}", deploy.namespace, name)
    };
    if pod.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true) {
        warn(format!(
            "===> Skipping injection because {kind} {full_name:?} has host networking enabled\n"
        ));
        return Ok(obj);
    }
    // kube-inject applies the pod's proxy.istio.io/config annotation to the mesh config itself.
    let mut mesh = (*settings.mesh).clone();
    let pc = inject::effective_proxy_config(&mesh, &pod);
    if let Some(m) = mesh.as_object_mut() {
        m.insert("defaultConfig".into(), pc);
    }
    let local = Settings {
        mesh: Arc::new(mesh),
        ..settings.clone()
    };
    let policy = crate::config::InjectConfig {
        policy: "enabled".into(),
        ..Default::default()
    };
    if !inject::inject_required(&policy, &pod, IGNORED_NAMESPACES).0 {
        warn(format!(
            "===> Skipping injection because {kind} {full_name:?} has sidecar injection disabled\n"
        ));
        return Ok(obj);
    }
    let req = Request {
        pod: pod.clone(),
        deploy,
        settings: &local,
        proxy_envs: BTreeMap::new(),
        kube_inject: true,
    };
    let injected = inject::inject(&req).map_err(|err| KubeInjectError::Inject { doc, err })?;
    let new_meta = injected
        .pod
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let new_spec = injected
        .pod
        .get("spec")
        .cloned()
        .unwrap_or_else(|| json!({}));
    set_pointer(&mut obj, &meta_ptr, new_meta);
    set_pointer(&mut obj, &spec_ptr, new_spec);
    Ok(obj)
}

fn set_pointer(root: &mut Value, ptr: &str, v: Value) {
    let mut cur = root;
    let parts: Vec<&str> = ptr.trim_start_matches('/').split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        let m = inject::ensure_object(cur);
        if i + 1 == parts.len() {
            m.insert((*p).to_string(), v);
            return;
        }
        cur = m.entry((*p).to_string()).or_insert_with(|| json!({}));
    }
}
