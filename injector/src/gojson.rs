// SPDX-License-Identifier: Apache-2.0
//! JSON text the way Go's `encoding/json` writes Kubernetes structs: fields in struct declaration
//! order, maps with sorted keys. Istio embeds such strings in annotations and env values
//! (`proxy.istio.io/overrides`, `ISTIO_KUBE_APP_PROBERS`, `ISTIO_META_POD_PORTS`), so the byte
//! form matters for re-injection idempotency and for matching Istio's output.

use serde_json::Value;

use crate::value::V;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Ty {
    Container,
    ContainerPort,
    EnvVar,
    EnvVarSource,
    FieldRef,
    ResourceFieldRef,
    KeyRef,
    Resources,
    VolumeMount,
    Probe,
    HttpGet,
    HttpHeader,
    TcpSocket,
    Grpc,
    Exec,
    Lifecycle,
    Handler,
    SecurityContext,
    Capabilities,
    Prober,
    /// Unknown: keys sorted.
    Map,
}

fn order(t: Ty) -> &'static [&'static str] {
    match t {
        Ty::Container => &[
            "name",
            "image",
            "command",
            "args",
            "workingDir",
            "ports",
            "envFrom",
            "env",
            "resources",
            "resizePolicy",
            "restartPolicy",
            "restartPolicyRules",
            "volumeMounts",
            "volumeDevices",
            "livenessProbe",
            "readinessProbe",
            "startupProbe",
            "lifecycle",
            "terminationMessagePath",
            "terminationMessagePolicy",
            "imagePullPolicy",
            "securityContext",
            "stdin",
            "stdinOnce",
            "tty",
        ],
        Ty::ContainerPort => &["name", "hostPort", "containerPort", "protocol", "hostIP"],
        Ty::EnvVar => &["name", "value", "valueFrom"],
        Ty::EnvVarSource => &[
            "fieldRef",
            "resourceFieldRef",
            "configMapKeyRef",
            "secretKeyRef",
            "fileKeyRef",
        ],
        Ty::FieldRef => &["apiVersion", "fieldPath"],
        Ty::ResourceFieldRef => &["containerName", "resource", "divisor"],
        Ty::KeyRef => &["name", "key", "optional"],
        Ty::Resources => &["limits", "requests", "claims"],
        Ty::VolumeMount => &[
            "name",
            "readOnly",
            "recursiveReadOnly",
            "mountPath",
            "subPath",
            "mountPropagation",
            "subPathExpr",
        ],
        Ty::Probe => &[
            "exec",
            "httpGet",
            "tcpSocket",
            "grpc",
            "initialDelaySeconds",
            "timeoutSeconds",
            "periodSeconds",
            "successThreshold",
            "failureThreshold",
            "terminationGracePeriodSeconds",
        ],
        Ty::HttpGet => &["path", "port", "host", "scheme", "httpHeaders"],
        Ty::HttpHeader => &["name", "value"],
        Ty::TcpSocket => &["port", "host"],
        Ty::Grpc => &["port", "service"],
        Ty::Exec => &["command"],
        Ty::Lifecycle => &["postStart", "preStop", "stopSignal"],
        Ty::Handler => &["exec", "httpGet", "tcpSocket", "sleep"],
        Ty::SecurityContext => &[
            "capabilities",
            "privileged",
            "seLinuxOptions",
            "windowsOptions",
            "runAsUser",
            "runAsGroup",
            "runAsNonRoot",
            "readOnlyRootFilesystem",
            "allowPrivilegeEscalation",
            "procMount",
            "seccompProfile",
            "appArmorProfile",
        ],
        Ty::Capabilities => &["add", "drop"],
        Ty::Prober => &["httpGet", "tcpSocket", "grpc", "timeoutSeconds"],
        Ty::Map => &[],
    }
}

fn child(t: Ty, key: &str) -> Ty {
    match (t, key) {
        (Ty::Container, "ports") => Ty::ContainerPort,
        (Ty::Container, "env") => Ty::EnvVar,
        (Ty::Container, "resources") => Ty::Resources,
        (Ty::Container, "volumeMounts") => Ty::VolumeMount,
        (Ty::Container, "livenessProbe" | "readinessProbe" | "startupProbe") => Ty::Probe,
        (Ty::Container, "lifecycle") => Ty::Lifecycle,
        (Ty::Container, "securityContext") => Ty::SecurityContext,
        (Ty::EnvVar, "valueFrom") => Ty::EnvVarSource,
        (Ty::EnvVarSource, "fieldRef") => Ty::FieldRef,
        (Ty::EnvVarSource, "resourceFieldRef") => Ty::ResourceFieldRef,
        (Ty::EnvVarSource, _) => Ty::KeyRef,
        (Ty::Probe | Ty::Handler | Ty::Prober, "httpGet") => Ty::HttpGet,
        (Ty::Probe | Ty::Handler | Ty::Prober, "tcpSocket") => Ty::TcpSocket,
        (Ty::Probe | Ty::Prober, "grpc") => Ty::Grpc,
        (Ty::Probe | Ty::Handler, "exec") => Ty::Exec,
        (Ty::HttpGet, "httpHeaders") => Ty::HttpHeader,
        (Ty::Lifecycle, "postStart" | "preStop") => Ty::Handler,
        (Ty::SecurityContext, "capabilities") => Ty::Capabilities,
        _ => Ty::Map,
    }
}

/// Serialises `v` as Go would marshal a value of type `t`.
pub fn to_go_json(v: &Value, t: Ty) -> String {
    let mut out = String::new();
    write(&mut out, v, t);
    out
}

fn write(out: &mut String, v: &Value, t: Ty) {
    match v {
        Value::Object(m) => {
            out.push('{');
            let mut first = true;
            let mut emit = |out: &mut String, k: &str, x: &Value| {
                if !first {
                    out.push(',');
                }
                first = false;
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push(':');
                write(out, x, child(t, k));
            };
            let ord = order(t);
            for k in ord {
                if let Some(x) = m.get(*k) {
                    emit(out, k, x);
                } else if t == Ty::Grpc && *k == "service" {
                    // `GRPCAction.Service` is a pointer without omitempty: Go writes null.
                    emit(out, k, &Value::Null);
                } else if t == Ty::Container && *k == "resources" {
                    // ResourceRequirements is not a pointer: Go always writes it.
                    emit(out, k, &Value::Object(serde_json::Map::new()));
                }
            }
            let mut rest: Vec<&String> = m.keys().filter(|k| !ord.contains(&k.as_str())).collect();
            rest.sort();
            for k in rest {
                if let Some(x) = m.get(k) {
                    emit(out, k, x);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(out, x, t);
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// `structToJSON` in templates: only container ports are passed to it by Istio's templates.
pub fn struct_to_json(v: &V) -> String {
    let j = v.to_json();
    let t = if j.get("containerPort").is_some() {
        Ty::ContainerPort
    } else {
        Ty::Map
    };
    to_go_json(&j, t)
}

/// A copy of `v` with object keys in sorted order (what Go's map marshalling produces).
pub fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}
