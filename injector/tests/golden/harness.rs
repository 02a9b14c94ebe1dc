// SPDX-License-Identifier: Apache-2.0
//! Runs one golden case through kube-inject and through the HTTPS webhook.

use serde_json::{Value, json};

use super::REF;
use super::cases::Case;
use pingsail_injector::config::{self, Sources};
use pingsail_injector::inject::Settings;
use pingsail_injector::kubeinject;

#[path = "../support/mod.rs"]
mod support;

/// Our image coordinates (from conf/injector/values.json).
fn our_image(name: &str) -> String {
    let v: Value = serde_json::from_str(config::DEFAULT_VALUES).unwrap();
    let hub = v
        .pointer("/global/hub")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    let tag = v
        .pointer("/global/tag")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    let ours = v
        .pointer("/global/proxy/image")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    let name = if name == "proxyv2" {
        ours.as_str()
    } else {
        name
    };
    format!("{hub}/{name}:{tag}")
}

/// The image substitution rule: `registry.istio.io/testing/<name>:latest` → ours.
pub fn substitute_images(golden: &str) -> String {
    const PREFIX: &str = "registry.istio.io/testing/";
    let mut out = String::new();
    let mut rest = golden;
    while let Some(i) = rest.find(PREFIX) {
        out.push_str(&rest[..i]);
        let after = &rest[i + PREFIX.len()..];
        match after.find(":latest") {
            Some(j)
                if after[..j]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                out.push_str(&our_image(&after[..j]));
                rest = &after[j + ":latest".len()..];
            }
            _ => {
                out.push_str(PREFIX);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn set_path(root: &mut Value, path: &str, v: Value) {
    let parts: Vec<&str> = path.split('.').collect();
    let mut cur = root;
    for (i, p) in parts.iter().enumerate() {
        let m = pingsail_injector::inject::ensure_object(cur);
        if i + 1 == parts.len() {
            m.insert((*p).to_string(), v);
            return;
        }
        cur = m.entry((*p).to_string()).or_insert_with(|| json!({}));
    }
}

fn deep_merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(bv) if bv.is_object() && v.is_object() => deep_merge(bv, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

pub fn settings_for(case: &Case) -> Settings {
    let mut values: Value = serde_json::from_str(config::DEFAULT_VALUES).unwrap();
    for flag in &case.flags {
        let (k, v) = flag.split_once('=').unwrap();
        let val = match v {
            "true" => json!(true),
            "false" => json!(false),
            _ => v
                .parse::<i64>()
                .map(|n| json!(n))
                .unwrap_or_else(|_| json!(v)),
        };
        match k {
            "components.cni.enabled" => set_path(&mut values, "pilot.cni.enabled", val),
            "values.cni.provider" => set_path(&mut values, "pilot.cni.provider", val),
            k => set_path(&mut values, k.strip_prefix("values.").unwrap(), val),
        }
    }
    if let Some(iop) = case.iop {
        let text = std::fs::read_to_string(format!("{REF}/{iop}")).unwrap();
        let doc: Value = serde_yaml::from_str(&text).unwrap();
        if let Some(v) = doc.pointer("/spec/values") {
            deep_merge(&mut values, v);
        }
    }
    let src = Sources {
        values: Some(values.to_string()),
        native_sidecars: Some(!case.native_disabled),
        openshift: case.openshift,
        compliance_policy: if case.fips {
            "fips-140-3".into()
        } else {
            String::new()
        },
        ..Default::default()
    };
    let mut s = config::build_settings(&src).unwrap();
    if let Some(t) = case.mesh {
        let mut mesh = (*s.mesh).clone();
        t.apply(&mut mesh);
        s.mesh = std::sync::Arc::new(mesh);
    }
    s
}

/// Removes what Go's typed round trip makes incidental: nulls, empty maps and lists (except an
/// explicit `emptyDir: {}`), `creationTimestamp`.
pub fn normalize(v: &Value) -> Value {
    fn go(v: &Value, key: &str) -> Option<Value> {
        match v {
            Value::Null => None,
            Value::Object(m) => {
                let out: serde_json::Map<String, Value> = m
                    .iter()
                    .filter(|(k, _)| k.as_str() != "creationTimestamp")
                    // Go omits these int32 fields when zero.
                    .filter(|(k, x)| !(k.as_str() == "minReadySeconds" && x.as_i64() == Some(0)))
                    .filter(|(k, x)| {
                        !(matches!(k.as_str(), "paused" | "test") && x.as_bool() == Some(false))
                    })
                    .filter_map(|(k, x)| go(x, k).map(|x| (k.clone(), x)))
                    .collect();
                if out.is_empty() && key != "emptyDir" {
                    None
                } else {
                    Some(Value::Object(out))
                }
            }
            Value::Array(a) => {
                let out: Vec<Value> = a.iter().filter_map(|x| go(x, "")).collect();
                if out.is_empty() {
                    None
                } else {
                    Some(Value::Array(out))
                }
            }
            other => Some(other.clone()),
        }
    }
    // A manifest's `status` is not input to anything; Go writes its zero-valued counters.
    fn drop_status(v: &mut Value) {
        if let Some(o) = v.as_object_mut() {
            if o.contains_key("kind") && o.contains_key("apiVersion") {
                o.remove("status");
            }
            if let Some(Value::Array(items)) = o.get_mut("items") {
                items.iter_mut().for_each(drop_status);
            }
        }
    }
    let mut out = go(v, "").unwrap_or(json!({}));
    drop_status(&mut out);
    out
}

/// First difference between two JSON values, as a path.
pub fn first_diff(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, xv) in x {
                match y.get(k) {
                    Some(yv) => {
                        if let Some(d) = first_diff(xv, yv, &format!("{path}/{k}")) {
                            return Some(d);
                        }
                    }
                    None => return Some(format!("{path}/{k}: unexpected {}", short(xv))),
                }
            }
            y.iter()
                .find(|(k, _)| !x.contains_key(*k))
                .map(|(k, yv)| format!("{path}/{k}: missing, want {}", short(yv)))
        }
        (Value::Array(x), Value::Array(y)) => {
            for (i, (xv, yv)) in x.iter().zip(y).enumerate() {
                if let Some(d) = first_diff(xv, yv, &format!("{path}/{i}")) {
                    return Some(d);
                }
            }
            if x.len() != y.len() {
                return Some(format!("{path}: got {} items, want {}", x.len(), y.len()));
            }
            None
        }
        _ if a == b => None,
        _ => Some(format!("{path}: got {}, want {}", short(a), short(b))),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 300 {
        format!("{}...", &s[..300])
    } else {
        s
    }
}

fn parse_docs(text: &str) -> Vec<Value> {
    kubeinject::split_documents(text)
        .iter()
        .map(|d| serde_yaml::from_str::<Value>(d).unwrap_or(Value::Null))
        .collect()
}

/// `getInjectableYamlDocs`: workload documents, with `List`s flattened.
fn injectable(doc: &Value) -> Vec<Value> {
    match doc.get("kind").and_then(Value::as_str) {
        Some(
            "Deployment"
            | "DeploymentConfig"
            | "DaemonSet"
            | "StatefulSet"
            | "Job"
            | "ReplicaSet"
            | "ReplicationController"
            | "CronJob"
            | "Pod",
        ) => vec![doc.clone()],
        Some("List") => doc
            .get("items")
            .and_then(Value::as_array)
            .map(|a| a.iter().flat_map(injectable).collect())
            .unwrap_or_default(),
        _ => vec![],
    }
}

/// `objectToPod`: the pod the API server would send for a workload (owner reference simulated).
pub fn object_to_pod(obj: &Value) -> Value {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let owner = |meta: &mut Value, oname: &str, oav: &str, okind: &str| {
        let m = pingsail_injector::inject::ensure_object(meta);
        m.insert("generateName".into(), json!(oname));
        m.insert(
            "ownerReferences".into(),
            json!([{"apiVersion": oav, "kind": okind, "name": oname, "controller": true}]),
        );
    };
    match kind {
        "Pod" => obj.clone(),
        "CronJob" => {
            let mut meta = obj
                .pointer("/spec/jobTemplate/spec/template/metadata")
                .cloned()
                .unwrap_or(json!({}));
            owner(&mut meta, &name, av, kind);
            json!({"metadata": meta, "spec": obj.pointer("/spec/jobTemplate/spec/template/spec").cloned().unwrap_or(json!({}))})
        }
        "Deployment" => {
            let mut meta = obj
                .pointer("/spec/template/metadata")
                .cloned()
                .unwrap_or(json!({}));
            let rs = format!("{name}-fake");
            owner(&mut meta, &rs, "apps/v1", "ReplicaSet");
            let m = pingsail_injector::inject::ensure_object(&mut meta);
            m.insert("generateName".into(), json!(format!("{rs}-")));
            let labels = m.entry("labels").or_insert_with(|| json!({}));
            pingsail_injector::inject::ensure_object(labels)
                .insert("pod-template-hash".into(), json!("fake"));
            json!({"metadata": meta, "spec": obj.pointer("/spec/template/spec").cloned().unwrap_or(json!({}))})
        }
        _ => {
            let mut meta = obj
                .pointer("/spec/template/metadata")
                .cloned()
                .unwrap_or(json!({}));
            owner(&mut meta, &name, av, kind);
            json!({"metadata": meta, "spec": obj.pointer("/spec/template/spec").cloned().unwrap_or(json!({}))})
        }
    }
}

pub async fn run_case(case: &Case) -> Vec<String> {
    let mut errs = Vec::new();
    let settings = settings_for(case);
    // Inputs that are already injected carry Istio's image too: same substitution.
    let input =
        substitute_images(&std::fs::read_to_string(format!("{REF}/{}", case.input)).unwrap());
    let golden = if case.want.is_empty() {
        None
    } else {
        Some(substitute_images(
            &std::fs::read_to_string(format!("{REF}/{}", case.want)).unwrap(),
        ))
    };

    // kube-inject
    if !case.skip_kube_inject {
        let mut logs = Vec::new();
        match kubeinject::kube_inject(&settings, &input, &mut |s| logs.push(s)) {
            Err(e) => match case.expected_error {
                Some(want) if e.to_string().to_lowercase().contains(want) => {}
                Some(want) => errs.push(format!(
                    "kube-inject: error {e:?} does not mention {want:?}"
                )),
                None => errs.push(format!("kube-inject: unexpected error: {e}")),
            },
            Ok(out) => {
                if let Some(want) = case.expected_error {
                    errs.push(format!(
                        "kube-inject: expected an error mentioning {want:?}, got success"
                    ));
                }
                if let Some(l) = case.expected_log
                    && !logs.iter().any(|x| x.contains(l))
                {
                    errs.push(format!("kube-inject: expected log {l:?}, got {logs:?}"));
                }
                if let Some(g) = &golden {
                    let got = parse_docs(&out);
                    let want = parse_docs(g);
                    if got.len() != want.len() {
                        errs.push(format!(
                            "kube-inject: {} documents, want {}",
                            got.len(),
                            want.len()
                        ));
                    }
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        if let Some(d) = first_diff(&normalize(a), &normalize(b), "") {
                            errs.push(format!("kube-inject doc {i}: {d}"));
                        }
                    }
                }
            }
        }
    }

    // webhook
    if case.skip_webhook {
        return errs;
    }
    let wh = support::start_webhook(settings, false).await;
    let inputs: Vec<Value> = parse_docs(&input).iter().flat_map(injectable).collect();
    let wants: Vec<Value> = golden
        .as_deref()
        .map(|g| parse_docs(g).iter().flat_map(injectable).collect())
        .unwrap_or_default();
    for (i, doc) in inputs.iter().enumerate() {
        let pod = object_to_pod(doc);
        let ns = doc
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {"uid": format!("uid-{i}"), "namespace": ns, "operation": "CREATE",
                        "kind": {"group": "", "version": "v1", "kind": "Pod"}, "object": pod}
        });
        let reply = wh
            .post_json("/inject", serde_json::to_vec(&review).unwrap())
            .await;
        if reply.status != 200 {
            errs.push(format!("webhook part {i}: HTTP {}", reply.status));
            continue;
        }
        let resp: Value = serde_json::from_slice(&reply.body).unwrap();
        if resp.pointer("/response/uid") != Some(&json!(format!("uid-{i}"))) {
            errs.push(format!("webhook part {i}: uid not echoed"));
        }
        if let Some(want) = case.expected_error {
            let msg = resp
                .pointer("/response/status/message")
                .and_then(Value::as_str)
                .unwrap_or("");
            if resp.pointer("/response/allowed") != Some(&json!(false))
                || !msg.to_lowercase().contains(want)
            {
                errs.push(format!(
                    "webhook part {i}: want denial mentioning {want:?}, got {resp}"
                ));
            }
            continue;
        }
        let mut got = pod.clone();
        if let Some(p) = resp.pointer("/response/patch").and_then(Value::as_str) {
            let patch: json_patch::Patch = serde_json::from_slice(&support::b64decode(p)).unwrap();
            if let Err(e) = json_patch::patch(&mut got, &patch) {
                errs.push(format!("webhook part {i}: patch does not apply: {e}"));
                continue;
            }
        } else if resp.pointer("/response/allowed") != Some(&json!(true)) {
            errs.push(format!("webhook part {i}: not allowed: {resp}"));
            continue;
        }
        let Some(want_doc) = wants.get(i) else {
            errs.push(format!("webhook part {i}: golden has fewer parts"));
            continue;
        };
        let want = object_to_pod(want_doc);
        if let Some(d) = first_diff(&normalize(&got), &normalize(&want), "") {
            errs.push(format!("webhook part {i}: {d}"));
        }
    }
    errs
}
