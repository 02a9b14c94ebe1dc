// SPDX-License-Identifier: Apache-2.0
//! AdmissionReview handling, independent of HTTP: body in, response body out.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::inject::{self, IGNORED_NAMESPACES, Request, Settings};

/// Requests that cannot be answered with an AdmissionReview at all (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("could not decode body: {0}")]
    Json(String),
    #[error("could not decode body: expected an AdmissionReview object")]
    NotObject,
    #[error("unsupported AdmissionReview apiVersion {0:?}, want admission.k8s.io/v1")]
    ApiVersion(String),
    #[error("unsupported kind {0:?}, want AdmissionReview")]
    Kind(String),
    #[error("AdmissionReview has no request")]
    NoRequest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(String),
    /// Injection failed; `allowed` tells whether the pod was admitted anyway.
    Failed {
        message: String,
        allowed: bool,
    },
}

pub struct Reviewed {
    pub body: Vec<u8>,
    pub outcome: Outcome,
    pub pod_name: String,
}

/// Decides injection for one AdmissionReview body. `allow_on_error` admits pods whose injection
/// fails (unpatched) instead of denying them as Istio does.
pub fn review(
    settings: &Settings,
    body: &[u8],
    path: &str,
    allow_on_error: bool,
) -> Result<Reviewed, ReviewError> {
    let ar: Value = serde_json::from_slice(body).map_err(|e| ReviewError::Json(e.to_string()))?;
    let Value::Object(ar) = ar else {
        return Err(ReviewError::NotObject);
    };
    let api_version = ar
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if api_version != "admission.k8s.io/v1" && api_version != "admission.k8s.io/v1beta1" {
        return Err(ReviewError::ApiVersion(api_version));
    }
    let kind = ar.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind != "AdmissionReview" {
        return Err(ReviewError::Kind(kind.to_string()));
    }
    let Some(req) = ar.get("request").filter(|r| r.is_object()) else {
        return Err(ReviewError::NoRequest);
    };
    let uid = req
        .get("uid")
        .cloned()
        .unwrap_or(Value::String(String::new()));
    let respond = |response: Value| -> Vec<u8> {
        let mut r = response;
        if let Some(o) = r.as_object_mut() {
            o.insert("uid".into(), uid.clone());
        }
        serde_json::to_vec(
            &json!({"apiVersion": api_version, "kind": "AdmissionReview", "response": r}),
        )
        .unwrap_or_default()
    };
    let fail = |message: String, pod_name: String| -> Reviewed {
        let allowed = allow_on_error;
        let mut resp = json!({"allowed": allowed, "status": {"message": message.clone()}});
        if !allowed && let Some(s) = resp.get_mut("status").and_then(Value::as_object_mut) {
            s.insert("code".into(), json!(400));
            s.insert("status".into(), json!("Failure"));
        }
        Reviewed {
            body: respond(resp),
            outcome: Outcome::Failed { message, allowed },
            pod_name,
        }
    };

    let mut pod = match req.get("object") {
        Some(o @ Value::Object(_)) => o.clone(),
        _ => {
            return Ok(fail(
                "could not unmarshal raw object: request.object is missing or not an object".into(),
                String::new(),
            ));
        }
    };
    // The patch must apply to the object exactly as the API server holds it.
    let raw = pod.clone();
    if let Err(msg) = check_pod_shape(&pod) {
        return Ok(fail(
            format!("could not unmarshal raw object: {msg}"),
            String::new(),
        ));
    }
    if let Some(m) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
    }
    let req_ns = req
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if pod
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
    {
        let meta = inject::ensure_object(&mut pod)
            .entry("metadata")
            .or_insert_with(|| json!({}));
        inject::ensure_object(meta).insert("namespace".into(), Value::String(req_ns));
    }
    let pod_name = potential_pod_name(&pod);
    let (required, why) = inject::inject_required(&settings.config, &pod, IGNORED_NAMESPACES);
    if !required {
        return Ok(Reviewed {
            body: respond(json!({"allowed": true})),
            outcome: Outcome::Skipped(why.to_string()),
            pod_name,
        });
    }
    if settings.openshift {
        inject::reset_openshift_sidecar_user(&mut pod);
    }
    let deploy = inject::deploy_meta_from_pod(&pod);
    let r = Request {
        pod,
        deploy,
        settings,
        proxy_envs: parse_inject_envs(path),
        kube_inject: false,
    };
    match inject::inject(&r) {
        Ok(done) => {
            // Fields we only filled in for our own use (namespace, dropped managedFields) go back
            // to what the API server sent, so the patch leaves them alone.
            let mut final_pod = done.pod;
            for key in ["namespace", "managedFields"] {
                let orig = raw.pointer(&format!("/metadata/{key}")).cloned();
                if let Some(meta) = final_pod.get_mut("metadata").and_then(Value::as_object_mut) {
                    match orig {
                        Some(v) => {
                            meta.insert(key.to_string(), v);
                        }
                        None => {
                            meta.remove(key);
                        }
                    }
                }
            }
            let patch =
                serde_json::to_vec(&crate::jsonpatch::diff(&raw, &final_pod)).unwrap_or_default();
            Ok(Reviewed {
                body: respond(
                    json!({"allowed": true, "patchType": "JSONPatch", "patch": base64(&patch)}),
                ),
                outcome: Outcome::Injected,
                pod_name,
            })
        }
        Err(e) => Ok(fail(format!("Pod injection failed: {e}"), pod_name)),
    }
}

fn potential_pod_name(pod: &Value) -> String {
    let ns = pod
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let generate = pod
        .pointer("/metadata/generateName")
        .and_then(Value::as_str)
        .unwrap_or("");
    let n = if !name.is_empty() {
        name.to_string()
    } else if !generate.is_empty() {
        format!("{generate}***** (actual name not yet known)")
    } else {
        String::new()
    };
    format!("{ns}/{n}")
}

/// The checks Go's typed decoding of a Pod would make on the fields injection touches.
fn check_pod_shape(pod: &Value) -> Result<(), String> {
    let obj_at = |p: &str| -> Result<(), String> {
        match pod.pointer(p) {
            None | Some(Value::Null) | Some(Value::Object(_)) => Ok(()),
            Some(other) => Err(format!("{p}: expected an object, got {other}")),
        }
    };
    obj_at("/metadata")?;
    obj_at("/spec")?;
    for m in ["/metadata/labels", "/metadata/annotations"] {
        obj_at(m)?;
        if let Some(Value::Object(o)) = pod.pointer(m) {
            for (k, v) in o {
                if !v.is_string() {
                    return Err(format!("{m}/{k}: expected a string, got {v}"));
                }
            }
        }
    }
    for key in [
        "containers",
        "initContainers",
        "volumes",
        "imagePullSecrets",
    ] {
        let p = format!("/spec/{key}");
        match pod.pointer(&p) {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for (i, c) in a.iter().enumerate() {
                    if !c.is_object() {
                        return Err(format!("{p}/{i}: expected an object"));
                    }
                    match c.get("name") {
                        None | Some(Value::String(_)) => {}
                        Some(other) => {
                            return Err(format!("{p}/{i}/name: expected a string, got {other}"));
                        }
                    }
                    for list in ["env", "ports", "volumeMounts", "args", "command"] {
                        match c.get(list) {
                            None | Some(Value::Null) | Some(Value::Array(_)) => {}
                            Some(other) => {
                                return Err(format!(
                                    "{p}/{i}/{list}: expected a list, got {other}"
                                ));
                            }
                        }
                    }
                }
            }
            Some(other) => return Err(format!("{p}: expected a list, got {other}")),
        }
    }
    match pod.pointer("/spec/hostNetwork") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => Ok(()),
        Some(other) => Err(format!(
            "/spec/hostNetwork: expected a boolean, got {other}"
        )),
    }
}

/// `parseInjectEnvs`: `/inject/k1/v1/k2/v2` → env overrides (`cluster`, `net` map to Istio names).
pub fn parse_inject_envs(path: &str) -> BTreeMap<String, String> {
    let path = path.trim_end_matches('/');
    let parts: Vec<&str> = path.splitn(3, '/').collect();
    let mut kv: Vec<String> = Vec::new();
    if parts.len() == 3 {
        if parts[2].starts_with(":ENV:") {
            for pair in parts[2].split(":ENV:").skip(1) {
                if let Some((k, v)) = pair.split_once('=')
                    && !k.is_empty()
                {
                    kv.push(k.to_string());
                    kv.push(v.to_string());
                }
            }
        } else {
            kv = parts[2].split('/').map(str::to_string).collect();
            for (i, v) in kv.iter_mut().enumerate() {
                if i % 2 == 1 {
                    *v = v.replace("--slash--", "/");
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for pair in kv.chunks(2) {
        if pair.len() < 2 {
            break;
        }
        let env = match pair[0].as_str() {
            "cluster" => "ISTIO_META_CLUSTER_ID".to_string(),
            "net" => "ISTIO_META_NETWORK".to_string(),
            k => k.to_uppercase(),
        };
        if !env.is_empty() {
            out.insert(env, pair[1].clone());
        }
    }
    out
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn inject_path_envs() {
        let e = parse_inject_envs("/inject/cluster/c1/net/n--slash--1");
        assert_eq!(
            e.get("ISTIO_META_CLUSTER_ID").map(String::as_str),
            Some("c1")
        );
        assert_eq!(e.get("ISTIO_META_NETWORK").map(String::as_str), Some("n/1"));
        assert!(parse_inject_envs("/inject").is_empty());
    }
}
