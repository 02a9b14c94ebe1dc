// SPDX-License-Identifier: Apache-2.0
//! The injection core shared by the webhook and `kube-inject`: decides whether a pod is injected,
//! renders the injection templates, overlays them onto the pod with a strategic merge, re-applies
//! user overrides, then post-processes (metrics merge, probe rewrite, status annotation, container
//! order) exactly as Istio's injector does, and produces the JSON patch.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::config::InjectConfig;
use crate::gojson::{Ty, to_go_json};
use crate::gotmpl::TemplateError;
use crate::meshcfg;
use crate::probe;
use crate::smp;
use crate::validate;
use crate::value::{MapKind, V};

pub const PROXY_CONTAINER: &str = "istio-proxy";
pub const INIT_CONTAINER: &str = "istio-init";
pub const VALIDATION_CONTAINER: &str = "istio-validation";
pub const CORE_DUMP_CONTAINER: &str = "enable-core-dump";
pub const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
pub const OVERRIDES_ANNOTATION: &str = "proxy.istio.io/overrides";
pub const PROXY_CONFIG_ANNOTATION: &str = "proxy.istio.io/config";
pub const AUTO_IMAGE: &str = "auto";

/// Namespaces never injected (Istio's `IgnoredNamespaces`).
pub const IGNORED_NAMESPACES: &[&str] = &[
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("failed to run injection template: {0}")]
    InvalidAnnotations(String),
    #[error("failed to run injection template: {0}")]
    Template(#[from] TemplateError),
    #[error("failed to run injection template: requested template {0:?} not found; have {1}")]
    NoTemplate(String, String),
    #[error("failed parsing generated injected YAML (check sidecar injector configuration): {0}")]
    RenderedYaml(String),
    #[error("failed to run injection template: strategic merge: {0}")]
    Merge(#[from] smp::MergeError),
    #[error("failed to process pod: {0}")]
    PostProcess(String),
    #[error("could not parse {what}: {msg}")]
    BadInput { what: String, msg: String },
}

/// Everything injection reads that does not come from the pod. Immutable once built; reloads swap
/// a whole new `Settings`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Arc<InjectConfig>,
    /// Helm values (`values` key of `istio-sidecar-injector`).
    pub values: Arc<Value>,
    /// Mesh config with defaults applied (proto-JSON).
    pub mesh: Arc<Value>,
    /// `istio.io/rev` this injector serves ("" = default).
    pub revision: String,
    pub native_sidecars: bool,
    pub compliance_policy: String,
    /// OpenShift platform mode (Istio's `PLATFORM=openshift`).
    pub openshift: bool,
}

/// Identity of the workload owning the pod, as Istio derives it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeployMeta {
    pub name: String,
    pub namespace: String,
    pub kind: String,
    pub api_version: String,
}

pub struct Request<'a> {
    pub pod: Value,
    pub deploy: DeployMeta,
    pub settings: &'a Settings,
    /// Env overrides from the webhook path (`/inject/cluster/c1/net/n1`).
    pub proxy_envs: BTreeMap<String, String>,
    /// kube-inject uses the built-in sidecar template and Istio's fixed policy.
    pub kube_inject: bool,
}

pub struct Injected {
    /// The patched pod.
    pub pod: Value,
    /// JSON patch from the input pod to `pod`.
    pub patch: Vec<Value>,
}

fn annotations(pod: &Value) -> Map<String, Value> {
    pod.pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn labels(pod: &Value) -> Map<String, Value> {
    pod.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn str_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

pub fn ensure_object(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("value was just made an object"),
    }
}

fn meta_mut<'a>(pod: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    let meta = ensure_object(pod)
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let slot = ensure_object(meta).entry(key).or_insert_with(|| json!({}));
    ensure_object(slot)
}

fn containers(pod: &Value, key: &str) -> Vec<Value> {
    pod.pointer(&format!("/spec/{key}"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn set_containers(pod: &mut Value, key: &str, list: Vec<Value>) {
    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
        if list.is_empty() && key != "containers" {
            spec.remove(key);
        } else {
            spec.insert(key.to_string(), Value::Array(list));
        }
    }
}

fn name_of(c: &Value) -> &str {
    c.get("name").and_then(Value::as_str).unwrap_or("")
}

fn find<'a>(list: &'a [Value], name: &str) -> Option<&'a Value> {
    list.iter().find(|c| name_of(c) == name)
}

/// `injectRequired`: the namespace/pod policy check. The namespace selector itself is enforced by
/// the API server through the webhook configuration.
pub fn inject_required(
    config: &InjectConfig,
    pod: &Value,
    ignored: &[&str],
) -> (bool, &'static str) {
    if pod.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true) {
        return (false, "host networking enabled");
    }
    let ns = str_of(pod.pointer("/metadata/namespace"));
    if ignored.contains(&ns.as_str()) {
        return (false, "system namespace");
    }
    let annos = annotations(pod);
    let lbls = labels(pod);
    let mut selector = str_of(annos.get("sidecar.istio.io/inject"));
    if let Some(l) = lbls.get("sidecar.istio.io/inject") {
        selector = str_of(Some(l));
    }
    let (mut use_default, mut inject) = match selector.as_str() {
        "true" => (false, true),
        "false" => (false, false),
        _ => (true, false),
    };
    let label_map: BTreeMap<String, String> = lbls
        .iter()
        .map(|(k, v)| (k.clone(), str_of(Some(v))))
        .collect();
    if use_default
        && config
            .never_inject_selector
            .iter()
            .any(|s| !s.is_empty() && s.matches(&label_map))
    {
        inject = false;
        use_default = false;
    }
    if use_default
        && config
            .always_inject_selector
            .iter()
            .any(|s| !s.is_empty() && s.matches(&label_map))
    {
        inject = true;
        use_default = false;
    }
    let required = match config.policy.as_str() {
        "disabled" => !use_default && inject,
        "enabled" => use_default || inject,
        _ => false,
    };
    (required, if required { "" } else { "policy" })
}

/// `kube.GetDeployMetaFromPod`.
pub fn deploy_meta_from_pod(pod: &Value) -> DeployMeta {
    let name = str_of(pod.pointer("/metadata/name"));
    let mut dm = DeployMeta {
        name: name.clone(),
        namespace: str_of(pod.pointer("/metadata/namespace")),
        kind: "Pod".into(),
        api_version: "v1".into(),
    };
    let generate = str_of(pod.pointer("/metadata/generateName"));
    if !generate.is_empty() {
        let owners = pod
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(owner) = owners
            .iter()
            .find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))
        {
            let lbls = labels(pod);
            let oname = str_of(owner.get("name"));
            dm.api_version = str_of(owner.get("apiVersion"));
            dm.kind = str_of(owner.get("kind"));
            dm.name = oname.clone();
            let hash = str_of(lbls.get("pod-template-hash"));
            let rhash = str_of(lbls.get("rollouts-pod-template-hash"));
            if dm.kind == "ReplicaSet" && !hash.is_empty() && oname.ends_with(&hash) {
                dm.name = oname
                    .strip_suffix(&format!("-{hash}"))
                    .unwrap_or(&oname)
                    .to_string();
                dm.kind = "Deployment".into();
            } else if dm.kind == "ReplicaSet" && !rhash.is_empty() && oname.ends_with(&rhash) {
                dm.name = oname
                    .strip_suffix(&format!("-{rhash}"))
                    .unwrap_or(&oname)
                    .to_string();
                dm.kind = "Rollout".into();
                dm.api_version = "v1alpha1".into();
            } else if dm.kind == "ReplicationController"
                && !str_of(lbls.get("deploymentconfig")).is_empty()
            {
                dm.name = str_of(lbls.get("deploymentconfig"));
                dm.kind = "DeploymentConfig".into();
            } else if dm.kind == "Job"
                && let Some(base) = cron_job_base(&oname)
            {
                dm.name = base;
                dm.kind = "CronJob".into();
                dm.api_version = "batch/v1".into();
            }
        }
    }
    if dm.name.is_empty() {
        dm.name = name;
    }
    dm
}

/// `^(.+)-\d{8,10}$`
fn cron_job_base(name: &str) -> Option<String> {
    let idx = name.rfind('-')?;
    let digits = &name[idx + 1..];
    if idx > 0 && (8..=10).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit()) {
        Some(name[..idx].to_string())
    } else {
        None
    }
}

/// The effective ProxyConfig: mesh `defaultConfig` with the pod's `proxy.istio.io/config` merged in.
pub fn effective_proxy_config(mesh: &Value, pod: &Value) -> Value {
    let base = mesh
        .get("defaultConfig")
        .cloned()
        .unwrap_or_else(meshcfg::default_proxy_config);
    let annos = annotations(pod);
    match annos.get(PROXY_CONFIG_ANNOTATION).and_then(Value::as_str) {
        Some(pc) => match serde_yaml::from_str::<Value>(pc) {
            Ok(v) => meshcfg::merge_proxy_config(&base, &v).unwrap_or(base),
            Err(_) => base,
        },
        None => base,
    }
}

fn values_get<'a>(values: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = values;
    for p in path.split('.') {
        cur = cur.get(p)?;
    }
    Some(cur)
}

fn values_str(values: &Value, path: &str) -> String {
    str_of(values_get(values, path))
}

fn values_bool(values: &Value, path: &str) -> bool {
    match values_get(values, path) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

/// `ProxyImage` / `ProxyInitImage`: `hub/name:tag[-variant]`.
fn image_url(
    values: &Value,
    name_path: &str,
    image_type: &str,
    annos: &Map<String, Value>,
) -> String {
    let mut name = values_str(values, name_path);
    if name.is_empty() {
        name = "proxyv2".into();
    }
    let hub = values_str(values, "global.hub");
    let tag = match values_get(values, "global.tag") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => V::from_json(other, MapKind::Any).to_go_string(),
    };
    let mut it = if image_type.is_empty() {
        values_str(values, "global.variant")
    } else {
        image_type.to_string()
    };
    if let Some(a) = annos.get("sidecar.istio.io/proxyImageType") {
        it = str_of(Some(a));
    }
    let mut tag = tag;
    if !it.is_empty() {
        for known in ["distroless", "debug"] {
            if let Some(t) = tag.strip_suffix(&format!("-{known}")) {
                tag = t.to_string();
                break;
            }
        }
        if it != "default" {
            tag = format!("{tag}-{it}");
        }
    }
    format!("{hub}/{name}:{tag}")
}

/// Removes previously injected containers so re-injection is idempotent (`stripPod`).
fn strip_pod(pod: &Value, status_port: i64) -> Value {
    let annos = annotations(pod);
    let Some(status) = annos.get(STATUS_ANNOTATION).and_then(Value::as_str) else {
        return pod.clone();
    };
    let Ok(status) = serde_json::from_str::<Value>(status) else {
        return pod.clone();
    };
    let mut out = pod.clone();
    for (skey, pkey) in [
        ("containers", "containers"),
        ("initContainers", "initContainers"),
    ] {
        if let Some(names) = status.get(skey).and_then(Value::as_array) {
            let names: Vec<&str> = names.iter().filter_map(Value::as_str).collect();
            let mut list = containers(&out, pkey);
            list.retain(|c| !names.contains(&name_of(c)));
            set_containers_keep(&mut out, pkey, list);
        }
    }
    let target = status_port.to_string();
    if let Some((_, cur)) = prometheus_annotation(&annotations(&out), "prometheus_io_port")
        && cur == target
    {
        clear_prometheus_annotations(meta_mut(&mut out, "annotations"));
    }
    meta_mut(&mut out, "annotations").remove(STATUS_ANNOTATION);
    out
}

fn set_containers_keep(pod: &mut Value, key: &str, list: Vec<Value>) {
    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
        if list.is_empty() {
            spec.remove(key);
        } else {
            spec.insert(key.to_string(), Value::Array(list));
        }
    }
}

/// Re-adds containers recorded in the overrides annotation (`reinsertOverrides`).
fn reinsert_overrides(pod: &Value) -> Result<Value, InjectError> {
    let annos = annotations(pod);
    let Some(ov) = annos.get(OVERRIDES_ANNOTATION).and_then(Value::as_str) else {
        return Ok(pod.clone());
    };
    let ov: Value = serde_json::from_str(ov).map_err(|e| InjectError::BadInput {
        what: format!("annotation {OVERRIDES_ANNOTATION}"),
        msg: e.to_string(),
    })?;
    let mut out = pod.clone();
    for key in ["containers", "initContainers"] {
        let mut list = containers(&out, key);
        for c in ov
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            if find(&list, name_of(&c)).is_none() {
                list.push(c);
            }
        }
        set_containers_keep(&mut out, key, list);
    }
    Ok(out)
}

fn selected_templates(req: &Request<'_>) -> Vec<String> {
    let cfg = &req.settings.config;
    let annos = annotations(&req.pod);
    let names: Vec<String> = match annos
        .get("inject.istio.io/templates")
        .and_then(Value::as_str)
    {
        Some(a) => a.split(',').map(|s| s.trim().to_string()).collect(),
        None if req.kube_inject => vec!["sidecar".into()],
        None => cfg.default_templates.clone(),
    };
    let mut out = Vec::new();
    for n in names {
        match cfg.aliases.get(&n) {
            Some(al) => out.extend(al.iter().cloned()),
            None => out.push(n),
        }
    }
    out
}

fn template_data(req: &Request<'_>, stripped: &Value, proxy_config: &Value) -> V {
    let s = req.settings;
    let values = &*s.values;
    let meta = stripped
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let mut meta_v = V::from_kube(&meta);
    if let V::Map(m, _) = &mut meta_v {
        let m = std::sync::Arc::make_mut(m);
        for k in ["annotations", "labels"] {
            m.entry(k.to_string())
                .or_insert_with(|| V::map(BTreeMap::new(), MapKind::StrMap));
        }
    }
    let spec = stripped.get("spec").cloned().unwrap_or_else(|| json!({}));
    let annos = annotations(stripped);
    let image_type = str_of(proxy_config.pointer("/image/imageType"));
    let inbound = match s
        .mesh
        .pointer("/inboundTrafficPolicy/mode")
        .and_then(Value::as_str)
    {
        Some("LOCALHOST") => "localhost",
        _ => "passthrough",
    };
    let mut root = BTreeMap::new();
    root.insert(
        "TypeMeta".to_string(),
        V::map(
            [
                (
                    "APIVersion".to_string(),
                    V::str(req.deploy.api_version.clone()),
                ),
                ("Kind".to_string(), V::str(req.deploy.kind.clone())),
            ]
            .into_iter()
            .collect(),
            MapKind::Struct,
        ),
    );
    root.insert(
        "DeploymentMeta".to_string(),
        V::map(
            [
                ("Name".to_string(), V::str(req.deploy.name.clone())),
                (
                    "Namespace".to_string(),
                    V::str(req.deploy.namespace.clone()),
                ),
            ]
            .into_iter()
            .collect(),
            MapKind::Struct,
        ),
    );
    root.insert("ObjectMeta".into(), meta_v);
    root.insert("Spec".into(), V::from_kube(&spec));
    root.insert(
        "ProxyConfig".into(),
        meshcfg::proxy_config_template_value(proxy_config),
    );
    let mut mesh_v = V::from_json(&s.mesh, MapKind::Struct);
    if let V::Map(m, _) = &mut mesh_v {
        let m = std::sync::Arc::make_mut(m);
        m.insert(
            "DefaultConfig".into(),
            meshcfg::proxy_config_template_value(proxy_config),
        );
    }
    root.insert("MeshConfig".into(), mesh_v);
    root.insert("Values".into(), V::from_json(values, MapKind::Any));
    root.insert("Revision".into(), V::str(s.revision.clone()));
    root.insert("NativeSidecars".into(), V::Bool(s.native_sidecars));
    root.insert(
        "ProxyImage".into(),
        V::Str(image_url(values, "global.proxy.image", &image_type, &annos)),
    );
    root.insert(
        "ProxyInitImage".into(),
        V::Str(image_url(values, "global.proxy_init.image", "", &annos)),
    );
    root.insert("ProxyUID".into(), V::Int(1337));
    root.insert("ProxyGID".into(), V::Int(1337));
    root.insert("InboundTrafficPolicyMode".into(), V::str(inbound));
    root.insert(
        "CompliancePolicy".into(),
        V::str(s.compliance_policy.clone()),
    );
    V::map(root, MapKind::Struct)
}

/// Drops nulls and canonicalises resource quantities: the round trip through Go's typed Pod.
pub fn normalize_pod(pod: &mut Value) {
    fn strip_nulls(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.retain(|_, x| !x.is_null());
                for x in m.values_mut() {
                    strip_nulls(x);
                }
            }
            Value::Array(a) => a.iter_mut().for_each(strip_nulls),
            _ => {}
        }
    }
    strip_nulls(pod);
    for key in ["containers", "initContainers"] {
        if let Some(list) = pod
            .pointer_mut(&format!("/spec/{key}"))
            .and_then(Value::as_array_mut)
        {
            for c in list {
                go_omitempty(c);
                for rk in ["limits", "requests"] {
                    if let Some(m) = c
                        .pointer_mut(&format!("/resources/{rk}"))
                        .and_then(Value::as_object_mut)
                    {
                        for q in m.values_mut() {
                            let s = match q {
                                Value::String(s) => s.clone(),
                                Value::Number(n) => n.to_string(),
                                _ => continue,
                            };
                            if let Some(c) = crate::quantity::canonical(&s) {
                                *q = Value::String(c);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Fields Go writes with `omitempty`: zero values disappear in a typed round trip.
fn go_omitempty(c: &mut Value) {
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe).and_then(Value::as_object_mut) {
            for f in [
                "initialDelaySeconds",
                "timeoutSeconds",
                "periodSeconds",
                "successThreshold",
                "failureThreshold",
            ] {
                if p.get(f).and_then(Value::as_i64) == Some(0) {
                    p.remove(f);
                }
            }
        }
    }
    if let Some(env) = c.get_mut("env").and_then(Value::as_array_mut) {
        for e in env.iter_mut() {
            if let Some(o) = e.as_object_mut()
                && o.get("value").and_then(Value::as_str) == Some("")
            {
                o.remove("value");
            }
        }
    }
    for key in ["ports"] {
        if let Some(ports) = c.get_mut(key).and_then(Value::as_array_mut) {
            for p in ports.iter_mut() {
                if let Some(o) = p.as_object_mut()
                    && o.get("hostPort").and_then(Value::as_i64) == Some(0)
                {
                    o.remove("hostPort");
                }
            }
        }
    }
}

/// OpenShift assigns one UID to every container; a user `istio-proxy` whose `runAsUser` equals the
/// app's would make traffic capture fail, so (like Istio on OpenShift) that UID/GID is dropped.
pub fn reset_openshift_sidecar_user(pod: &mut Value) {
    let mut all = containers(pod, "containers");
    all.extend(containers(pod, "initContainers"));
    let mut sidecar_user = 0;
    let mut app_user = 0;
    let mut has_sc = false;
    for c in &all {
        let uid = c
            .pointer("/securityContext/runAsUser")
            .and_then(Value::as_i64);
        match name_of(c) {
            PROXY_CONTAINER => {
                has_sc = c.get("securityContext").is_some_and(Value::is_object);
                if let Some(u) = uid {
                    sidecar_user = u;
                }
            }
            INIT_CONTAINER | VALIDATION_CONTAINER => {}
            _ => {
                if let Some(u) = uid {
                    app_user = u;
                }
            }
        }
    }
    if has_sc && sidecar_user == app_user {
        with_container_mut(pod, PROXY_CONTAINER, |c| {
            if let Some(sc) = c.get_mut("securityContext").and_then(Value::as_object_mut) {
                sc.remove("runAsUser");
                sc.remove("runAsGroup");
            }
        });
    }
}

/// Runs injection for one pod (the caller has already decided it must be injected).
pub fn inject(req: &Request<'_>) -> Result<Injected, InjectError> {
    let s = req.settings;
    let mut original = req.pod.clone();
    normalize_pod(&mut original);
    let annos = annotations(&original);

    // RunTemplate.
    validate::validate_annotations(&annos).map_err(InjectError::InvalidAnnotations)?;
    let proxy_config = if req.kube_inject {
        s.mesh
            .get("defaultConfig")
            .cloned()
            .unwrap_or_else(meshcfg::default_proxy_config)
    } else {
        effective_proxy_config(&s.mesh, &original)
    };
    let mut proxy_envs = req.proxy_envs.clone();
    let mut cluster = values_str(&s.values, "global.multiCluster.clusterName");
    let mut network = values_str(&s.values, "global.network");
    if let Some(c) = proxy_envs
        .get("ISTIO_META_CLUSTER_ID")
        .filter(|c| !c.is_empty())
    {
        cluster = c.clone();
    }
    if let Some(n) = proxy_envs
        .get("ISTIO_META_NETWORK")
        .filter(|n| !n.is_empty())
    {
        network = n.clone();
    }
    if let Some(n) = labels(&original).get("topology.istio.io/network") {
        network = str_of(Some(n));
    }
    if !cluster.is_empty() {
        proxy_envs.insert("ISTIO_META_CLUSTER_ID".into(), cluster);
    }
    if !network.is_empty() {
        proxy_envs.insert("ISTIO_META_NETWORK".into(), network);
    }
    let mesh_status_port = s
        .mesh
        .pointer("/defaultConfig/statusPort")
        .and_then(Value::as_i64)
        .unwrap_or(15020);
    let stripped = reinsert_overrides(&strip_pod(&original, mesh_status_port))?;
    let data = template_data(req, &stripped, &proxy_config);

    let mut merged = original.clone();
    let mut template_pod = json!({});
    for name in selected_templates(req) {
        let Some(t) = s.config.templates.get(&name) else {
            let mut have: Vec<&String> = s.config.templates.keys().collect();
            have.sort();
            return Err(InjectError::NoTemplate(
                name,
                have.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        };
        let rendered = t.execute(&data)?;
        let overlay: Value = if rendered.trim().is_empty() {
            json!({})
        } else {
            serde_yaml::from_str(&rendered).map_err(|e| InjectError::RenderedYaml(e.to_string()))?
        };
        let overlay = if overlay.is_null() {
            json!({})
        } else {
            overlay
        };
        template_pod = smp::merge_pod(&template_pod, &overlay)?;
        let mut native = s.native_sidecars;
        match annotations(&merged)
            .get("sidecar.istio.io/nativeSidecar")
            .and_then(Value::as_str)
        {
            Some("true") => native = true,
            Some("false") => native = false,
            _ => {}
        }
        if native
            && find(
                containers_ref(&template_pod, "initContainers"),
                PROXY_CONTAINER,
            )
            .is_some()
            && find(containers_ref(&merged, "containers"), PROXY_CONTAINER).is_some()
        {
            let mut cs = containers(&merged, "containers");
            let mut inits = containers(&merged, "initContainers");
            if let Some(i) = cs.iter().position(|c| name_of(c) == PROXY_CONTAINER) {
                inits.push(cs.remove(i));
            }
            set_containers(&mut merged, "containers", cs);
            set_containers(&mut merged, "initContainers", inits);
        }
        merged = smp::merge_pod(&merged, &overlay)?;
        normalize_pod(&mut merged);
    }
    normalize_pod(&mut template_pod);

    let mut merged =
        reapply_overwritten_containers(merged, &original, &template_pod, &proxy_config)?;
    post_process(&mut merged, &template_pod, req, &proxy_envs)?;
    normalize_pod(&mut merged);
    let patch = crate::jsonpatch::diff(&req.pod, &merged);
    Ok(Injected { pod: merged, patch })
}

fn reapply_overwritten_containers(
    mut final_pod: Value,
    original: &Value,
    template_pod: &Value,
    proxy_config: &Value,
) -> Result<Value, InjectError> {
    let annos = annotations(original);
    let existing: Value = match annos.get(OVERRIDES_ANNOTATION).and_then(Value::as_str) {
        Some(s) => serde_json::from_str(s).map_err(|e| InjectError::BadInput {
            what: format!("annotation {OVERRIDES_ANNOTATION}"),
            msg: e.to_string(),
        })?,
        None => json!({}),
    };
    let status: Option<Value> = annos
        .get(STATUS_ANNOTATION)
        .and_then(Value::as_str)
        .map(|s| serde_json::from_str(s).unwrap_or(json!({})));
    let already = status.is_some();
    let status_names = |key: &str| -> Vec<String> {
        status
            .as_ref()
            .and_then(|s| s.get(key))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut overrides: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for key in ["containers", "initContainers"] {
        let injected_before = status_names(key);
        let existing_list = existing
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for c in containers_ref(template_pod, key) {
            let name = name_of(c);
            if injected_before.iter().any(|n| n == name) {
                continue;
            }
            let m = find(&existing_list, name).cloned().or_else(|| {
                if key == "containers" {
                    find(containers_ref(original, "containers"), name).cloned()
                } else {
                    find_in_pod(original, name)
                }
            });
            let Some(mut overlay) = m else { continue };
            if overlay.get("image").and_then(Value::as_str) == Some(AUTO_IMAGE)
                && let Some(o) = overlay.as_object_mut()
            {
                o.remove("image");
            }
            if let Some(o) = overlay.as_object_mut() {
                o.entry("resources").or_insert_with(|| json!({}));
            }
            overrides.entry(key).or_default().push(overlay.clone());
            let patch = if key == "containers" {
                json!({"spec": {"containers": [overlay]}})
            } else {
                json!({"spec": {"containers": [], "initContainers": [overlay]}})
            };
            final_pod = smp::merge_pod(&final_pod, &patch)?;
            normalize_pod(&mut final_pod);
        }
    }
    if !already && !overrides.is_empty() {
        let mut s = String::from("{");
        let mut first = true;
        for key in ["containers", "initContainers"] {
            if let Some(list) = overrides.get(key) {
                if !first {
                    s.push(',');
                }
                first = false;
                s.push_str(&format!(
                    "\"{key}\":{}",
                    to_go_json(&Value::Array(list.clone()), Ty::Container)
                ));
            }
        }
        s.push('}');
        meta_mut(&mut final_pod, "annotations")
            .insert(OVERRIDES_ANNOTATION.into(), Value::String(s));
    }
    adjust_init_container_user(&mut final_pod, original, proxy_config);
    Ok(final_pod)
}

fn containers_ref<'a>(pod: &'a Value, key: &str) -> &'a [Value] {
    pod.get("spec")
        .and_then(|s| s.get(key))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn find_in_pod(pod: &Value, name: &str) -> Option<Value> {
    find(containers_ref(pod, "containers"), name)
        .or_else(|| find(containers_ref(pod, "initContainers"), name))
        .cloned()
}

fn find_sidecar(pod: &Value) -> Option<Value> {
    find_in_pod(pod, PROXY_CONTAINER)
}

/// Applies `f` to the named container wherever it is (containers first, then init containers).
fn with_container_mut(pod: &mut Value, name: &str, f: impl FnOnce(&mut Value)) -> bool {
    for key in ["containers", "initContainers"] {
        if let Some(list) = pod
            .pointer_mut(&format!("/spec/{key}"))
            .and_then(Value::as_array_mut)
            && let Some(c) = list.iter_mut().find(|c| name_of(c) == name)
        {
            f(c);
            return true;
        }
    }
    false
}

fn adjust_init_container_user(final_pod: &mut Value, original: &Value, proxy_config: &Value) {
    let Some(user) = find_sidecar(original) else {
        return;
    };
    let run_as_user = user
        .pointer("/securityContext/runAsUser")
        .and_then(Value::as_i64);
    let run_as_group = user
        .pointer("/securityContext/runAsGroup")
        .and_then(Value::as_i64);
    if run_as_user.is_none() && run_as_group.is_none() {
        return;
    }
    let inits = containers(final_pod, "initContainers");
    let Some(init_name) = [INIT_CONTAINER, VALIDATION_CONTAINER]
        .into_iter()
        .find(|n| find(&inits, n).is_some())
    else {
        return;
    };
    let tproxy = proxy_config.get("interceptionMode").and_then(Value::as_str) == Some("TPROXY")
        || annotations(final_pod)
            .get("sidecar.istio.io/interceptionMode")
            .and_then(Value::as_str)
            == Some("TPROXY");
    if tproxy && run_as_user.is_some() {
        with_container_mut(final_pod, PROXY_CONTAINER, |c| {
            if let Some(sc) = c.get_mut("securityContext").and_then(Value::as_object_mut) {
                sc.insert("runAsUser".into(), json!(0));
            }
        });
    }
    if !tproxy && init_name == VALIDATION_CONTAINER {
        with_container_mut(final_pod, VALIDATION_CONTAINER, |c| {
            if let Some(o) = c.as_object_mut() {
                let sc = o.entry("securityContext").or_insert_with(|| json!({}));
                if let Some(sc) = sc.as_object_mut() {
                    if let Some(u) = run_as_user {
                        sc.insert("runAsUser".into(), json!(u));
                    }
                    if let Some(g) = run_as_group {
                        sc.insert("runAsGroup".into(), json!(g));
                    }
                }
            }
        });
    }
    let Some(uid) = run_as_user.filter(|u| *u != 0) else {
        return;
    };
    with_container_mut(final_pod, init_name, |c| {
        if let Some(args) = c.get_mut("args").and_then(Value::as_array_mut)
            && let Some(i) = args.iter().position(|a| a.as_str() == Some("-u"))
            && i + 1 < args.len()
        {
            args[i + 1] = Value::String(uid.to_string());
        }
    });
}

/// Prometheus' `SanitizeLabelName`.
fn sanitize_label(k: &str) -> String {
    k.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn prometheus_annotation(annos: &Map<String, Value>, which: &str) -> Option<(String, String)> {
    let mut keys: Vec<&String> = annos.keys().collect();
    keys.sort();
    keys.into_iter()
        .find(|k| sanitize_label(k) == which)
        .map(|k| (k.clone(), str_of(annos.get(k))))
}

fn clear_prometheus_annotations(annos: &mut Map<String, Value>) {
    annos.retain(|k, _| {
        !matches!(
            sanitize_label(k).as_str(),
            "prometheus_io_path"
                | "prometheus_io_port"
                | "prometheus_io_scrape"
                | "prometheus_istio_io_scrape_targets"
        )
    });
}

fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

const RESERVED_PORTS: &[(&str, &str)] = &[
    ("15000", "Envoy admin"),
    ("15001", "outbound traffic capture"),
    ("15004", "pilot debug"),
    ("15006", "inbound traffic capture"),
    ("15008", "HBONE tunnel"),
    ("15020", "pilot-agent status / merged Prometheus"),
    ("15021", "Envoy health"),
    ("15053", "DNS proxy"),
    ("15090", "Envoy Prometheus (already merged)"),
];

fn check_scrape_port(port: &str, target: &str, what: &str, label: &str) -> Result<(), InjectError> {
    let n: i64 = port.parse().unwrap_or(-1);
    if !(1..=65535).contains(&n) {
        return Err(InjectError::PostProcess(format!(
            "invalid prometheus {what}: invalid {label}port {port:?}"
        )));
    }
    let canon = n.to_string();
    if canon == target {
        return Err(InjectError::PostProcess(format!(
            "invalid prometheus {what}: {label}port {port} conflicts with agent port"
        )));
    }
    if let Some((_, reason)) = RESERVED_PORTS.iter().find(|(p, _)| *p == canon) {
        return Err(InjectError::PostProcess(format!(
            "invalid prometheus {what}: {label}port {port} is reserved for Istio ({reason}) and cannot be scraped"
        )));
    }
    Ok(())
}

fn apply_prometheus_merge(pod: &mut Value, mesh: &Value) -> Result<(), InjectError> {
    let annos = annotations(pod);
    let scrape = match prometheus_annotation(&annos, "prometheus_io_scrape") {
        Some((_, v)) => parse_go_bool(&v).unwrap_or(true),
        None => true,
    };
    let merge = match annos
        .get("prometheus.istio.io/merge-metrics")
        .and_then(Value::as_str)
        .and_then(parse_go_bool)
    {
        Some(b) => b,
        None => mesh
            .get("enablePrometheusMerge")
            .and_then(Value::as_bool)
            .unwrap_or(true),
    };
    if !scrape || !merge {
        return Ok(());
    }
    let target = mesh
        .pointer("/defaultConfig/statusPort")
        .and_then(Value::as_i64)
        .unwrap_or(15020)
        .to_string();
    if let Some((_, cur)) = prometheus_annotation(&annos, "prometheus_io_port")
        && cur == target
    {
        return Ok(());
    }
    let mut cfg_scrape = String::new();
    let mut cfg_path = String::new();
    let mut cfg_port = String::new();
    let mut targets: Vec<(String, String)> = Vec::new();
    let mut keys: Vec<&String> = annos.keys().collect();
    keys.sort();
    for k in keys {
        let v = str_of(annos.get(k));
        match sanitize_label(k).as_str() {
            "prometheus_io_port" => cfg_port = v,
            "prometheus_io_scrape" => cfg_scrape = v,
            "prometheus_io_path" => cfg_path = v,
            "prometheus_istio_io_scrape_targets" => {
                let mut t = Vec::new();
                let mut ok = true;
                for entry in v.split(',') {
                    let entry = entry.trim();
                    if entry.is_empty() {
                        continue;
                    }
                    let (port, path) = entry.split_once(':').unwrap_or((entry, ""));
                    let port = port.trim();
                    if port.is_empty() {
                        ok = false;
                        break;
                    }
                    let path = if path.trim().is_empty() {
                        "/metrics"
                    } else {
                        path.trim()
                    };
                    t.push((port.to_string(), path.to_string()));
                }
                if ok {
                    targets = t;
                }
            }
            _ => {}
        }
    }
    if let Some((p, path)) = targets.first() {
        cfg_port = p.clone();
        cfg_path = path.clone();
        for (p, _) in &targets {
            check_scrape_port(p, &target, "scrape targets", "target ")?;
        }
    } else if !cfg_port.is_empty() {
        check_scrape_port(&cfg_port, &target, "scrape configuration", "")?;
    }
    let empty =
        cfg_scrape.is_empty() && cfg_path.is_empty() && cfg_port.is_empty() && targets.is_empty();
    if !empty {
        let mut js = format!(
            "{{\"scrape\":{},\"path\":{},\"port\":{}",
            serde_json::to_string(&cfg_scrape).unwrap_or_default(),
            serde_json::to_string(&cfg_path).unwrap_or_default(),
            serde_json::to_string(&cfg_port).unwrap_or_default()
        );
        if !targets.is_empty() {
            let ts: Vec<String> = targets
                .iter()
                .map(|(p, path)| {
                    format!(
                        "{{\"port\":{},\"path\":{}}}",
                        serde_json::to_string(p).unwrap_or_default(),
                        serde_json::to_string(path).unwrap_or_default()
                    )
                })
                .collect();
            js.push_str(&format!(",\"targets\":[{}]", ts.join(",")));
        }
        js.push('}');
        with_container_mut(pod, PROXY_CONTAINER, |c| {
            push_env(c, "ISTIO_PROMETHEUS_ANNOTATIONS", &js)
        });
    }
    let annos = meta_mut(pod, "annotations");
    clear_prometheus_annotations(annos);
    annos.insert("prometheus.io/port".into(), Value::String(target));
    annos.insert(
        "prometheus.io/path".into(),
        Value::String("/stats/prometheus".into()),
    );
    annos.insert("prometheus.io/scrape".into(), Value::String("true".into()));
    Ok(())
}

fn push_env(c: &mut Value, name: &str, value: &str) {
    if let Some(o) = c.as_object_mut() {
        let env = o.entry("env").or_insert_with(|| json!([]));
        if let Some(a) = env.as_array_mut() {
            a.push(json!({"name": name, "value": value}));
        }
    }
}

fn apply_secure_prometheus_annotation(pod: &mut Value) {
    let annos = annotations(pod);
    if annos
        .keys()
        .any(|k| sanitize_label(k) == "prometheus_istio_io_secure_port")
    {
        return;
    }
    let Some(sc) = find_sidecar(pod) else { return };
    let port = sc.get("env").and_then(Value::as_array).and_then(|env| {
        env.iter()
            .find(|e| {
                name_of(e) == "ENVOY_SECURE_MERGED_METRICS_PORT"
                    && !matches!(
                        e.get("value").and_then(Value::as_str),
                        None | Some("") | Some("0")
                    )
            })
            .map(|e| str_of(e.get("value")))
    });
    if let Some(p) = port {
        meta_mut(pod, "annotations")
            .insert("prometheus.istio.io/secure-port".into(), Value::String(p));
    }
}

fn post_process(
    pod: &mut Value,
    template_pod: &Value,
    req: &Request<'_>,
    proxy_envs: &BTreeMap<String, String>,
) -> Result<(), InjectError> {
    let s = req.settings;
    meta_mut(pod, "annotations");
    meta_mut(pod, "labels");
    // overwriteClusterInfo
    if !proxy_envs.is_empty() {
        with_container_mut(pod, PROXY_CONTAINER, |c| {
            if let Some(o) = c.as_object_mut() {
                let mut env: Vec<Value> = o
                    .get("env")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                env.retain(|e| !proxy_envs.contains_key(name_of(e)));
                for (k, v) in proxy_envs {
                    env.push(json!({"name": k, "value": v}));
                }
                o.insert("env".into(), Value::Array(env));
            }
        });
    }
    apply_prometheus_merge(pod, &s.mesh)?;
    apply_secure_prometheus_annotation(pod);
    // applyRewrite
    if find(containers_ref(pod, "containers"), PROXY_CONTAINER)
        .or_else(|| find(containers_ref(pod, "initContainers"), PROXY_CONTAINER))
        .is_some()
    {
        let annos = annotations(pod);
        let default_rewrite =
            match values_get(&s.values, "sidecarInjectorWebhook.rewriteAppHTTPProbe") {
                Some(Value::Bool(b)) => *b,
                _ => false,
            };
        let rewrite = annos
            .get("sidecar.istio.io/rewriteAppHTTPProbers")
            .and_then(Value::as_str)
            .and_then(parse_go_bool)
            .unwrap_or(default_rewrite);
        if rewrite {
            let status_port =
                meshcfg::status_port(s.mesh.get("defaultConfig").unwrap_or(&Value::Null));
            if let Some(probers) = probe::dump_app_probers(pod, status_port) {
                let previously = annos.contains_key(STATUS_ANNOTATION);
                with_container_mut(pod, PROXY_CONTAINER, |c| {
                    probe::merge_or_append_probers(c, previously, &probers)
                });
            }
            probe::patch_rewrite_probes(pod, &annos, status_port);
        }
    }
    // applyMetadata
    if let Some(nw) = proxy_envs.get("ISTIO_META_NETWORK") {
        meta_mut(pod, "labels").insert(
            "topology.istio.io/network".into(),
            Value::String(nw.clone()),
        );
    }
    let status = injection_status(template_pod, &s.revision);
    meta_mut(pod, "annotations").insert(STATUS_ANNOTATION.into(), Value::String(status));
    if !req.kube_inject {
        for (k, v) in &s.config.injected_annotations {
            meta_mut(pod, "annotations").insert(k.clone(), Value::String(v.clone()));
        }
    }
    reorder(pod, req)
}

fn injection_status(template_pod: &Value, revision: &str) -> String {
    let names = |key: &str| -> Value {
        let list = template_pod
            .pointer(&format!("/spec/{key}"))
            .and_then(Value::as_array);
        match list {
            Some(l) if !l.is_empty() => Value::Array(
                l.iter()
                    .map(|c| Value::String(name_of(c).to_string()))
                    .collect(),
            ),
            _ => Value::Null,
        }
    };
    let rev = if revision.is_empty() {
        "default"
    } else {
        revision
    };
    format!(
        "{{\"initContainers\":{},\"containers\":{},\"volumes\":{},\"imagePullSecrets\":{},\"revision\":{}}}",
        names("initContainers"),
        names("containers"),
        names("volumes"),
        names("imagePullSecrets"),
        serde_json::to_string(rev).unwrap_or_default()
    )
}

#[derive(Clone, Copy)]
enum Move {
    First,
    Last,
}

fn modify(list: Vec<Value>, name: &str, m: Move) -> Vec<Value> {
    let Some(i) = list.iter().position(|c| name_of(c) == name) else {
        return list;
    };
    let mut list = list;
    let c = list.remove(i);
    match m {
        Move::First => list.insert(0, c),
        Move::Last => list.push(c),
    }
    list
}

fn reorder(pod: &mut Value, req: &Request<'_>) -> Result<(), InjectError> {
    let s = req.settings;
    let pc = effective_proxy_config(&s.mesh, &req.pod);
    let hold = pc
        .get("holdApplicationUntilProxyStarts")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || values_bool(&s.values, "global.proxy.holdApplicationUntilProxyStarts");
    let cs = containers(pod, "containers");
    let cs = modify(
        cs,
        PROXY_CONTAINER,
        if hold { Move::First } else { Move::Last },
    );
    set_containers(pod, "containers", cs);
    let mut inits = containers(pod, "initContainers");
    if find(&inits, PROXY_CONTAINER).is_some() {
        for n in [
            CORE_DUMP_CONTAINER,
            PROXY_CONTAINER,
            VALIDATION_CONTAINER,
            INIT_CONTAINER,
        ] {
            inits = modify(inits, n, Move::First);
        }
    } else {
        inits = modify(inits, VALIDATION_CONTAINER, Move::First);
        inits = modify(inits, INIT_CONTAINER, Move::Last);
        inits = modify(inits, CORE_DUMP_CONTAINER, Move::Last);
    }
    set_containers(pod, "initContainers", inits);
    Ok(())
}
