// SPDX-License-Identifier: Apache-2.0
//! The Helm chart in conf/injector/chart, rendered with our Go-template engine (Helm itself is not
//! installable here), must equal the checked-in plain manifests (regenerate with
//! `UPDATE_MANIFESTS=1 cargo test -p pingsail-injector --test chart`), must have the webhook shape
//! the issue asks for, and its ConfigMap must configure the injector exactly like the built-ins.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use pingsail_injector::config::{self, Sources};
use pingsail_injector::gotmpl::Template;
use pingsail_injector::kubeinject;
use pingsail_injector::value::{MapKind, V};
use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/injector/chart");
const MANIFESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../conf/injector/manifests/pingsail-injector.yaml"
);

/// Renders the chart like `helm template pingsail-injector ./chart -n istio-system`.
pub fn render_chart(values_override: Option<Value>) -> String {
    let values_yaml = std::fs::read_to_string(format!("{CHART}/values.yaml")).unwrap();
    let mut values: Value = serde_yaml::from_str(&values_yaml).unwrap();
    if let (Some(o), Some(Value::Object(add))) = (values.as_object_mut(), values_override) {
        for (k, v) in add {
            o.insert(k, v);
        }
    }
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(format!("{CHART}/files")).unwrap() {
        let e = e.unwrap();
        let name = format!("files/{}", e.file_name().to_string_lossy());
        files.insert(name, V::Str(std::fs::read_to_string(e.path()).unwrap()));
    }
    let mut root = BTreeMap::new();
    root.insert("Values".to_string(), V::from_json(&values, MapKind::Any));
    root.insert(
        "Release".to_string(),
        V::map(
            [
                ("Name".to_string(), V::str("pingsail-injector")),
                ("Namespace".to_string(), V::str("istio-system")),
            ]
            .into_iter()
            .collect(),
            MapKind::Any,
        ),
    );
    root.insert(
        "Files".to_string(),
        V::map(
            [("Get".to_string(), V::map(files, MapKind::Any))]
                .into_iter()
                .collect(),
            MapKind::Any,
        ),
    );
    let data = V::map(root, MapKind::Any);
    let mut names: Vec<String> = std::fs::read_dir(format!("{CHART}/templates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let mut out = String::new();
    for n in names {
        let src = std::fs::read_to_string(format!("{CHART}/templates/{n}")).unwrap();
        let text = Template::parse(&n, &src).unwrap().execute(&data).unwrap();
        if text.trim().is_empty() {
            continue;
        }
        out.push_str(&format!(
            "---\n# Source: pingsail-injector/templates/{n}\n{}\n",
            text.trim()
        ));
    }
    out
}

fn docs(text: &str) -> Vec<Value> {
    kubeinject::split_documents(text)
        .iter()
        .map(|d| serde_yaml::from_str(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn rendered_chart_matches_checked_in_manifests() {
    let rendered = render_chart(None);
    if std::env::var("UPDATE_MANIFESTS").is_ok() {
        std::fs::write(MANIFESTS, &rendered).unwrap();
    }
    let checked_in =
        std::fs::read_to_string(MANIFESTS).expect("conf/injector/manifests/pingsail-injector.yaml");
    assert!(
        checked_in == rendered,
        "manifests are stale: run UPDATE_MANIFESTS=1 cargo test -p pingsail-injector --test chart"
    );
}

#[test]
fn webhook_configuration_has_the_required_shape() {
    let all = docs(&render_chart(None));
    let kind = |k: &str| {
        all.iter()
            .filter(|d| d["kind"] == k)
            .cloned()
            .collect::<Vec<_>>()
    };
    let dep = &kind("Deployment")[0];
    assert_eq!(dep["spec"]["replicas"], 2);
    assert_eq!(kind("PodDisruptionBudget")[0]["spec"]["minAvailable"], 1);
    assert_eq!(kind("Service").len(), 1);
    assert_eq!(kind("Certificate").len(), 1);
    let mwc = &kind("MutatingWebhookConfiguration")[0];
    let hooks = mwc["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 4);
    for h in hooks {
        assert_eq!(h["sideEffects"], "None");
        assert_eq!(h["admissionReviewVersions"], serde_json::json!(["v1"]));
        assert_eq!(h["failurePolicy"], "Fail");
        assert_eq!(h["reinvocationPolicy"], "Never");
        assert_eq!(h["clientConfig"]["service"]["path"], "/inject");
        assert!(
            h["objectSelector"]["matchExpressions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["key"] == "sidecar.istio.io/inject")
        );
    }
    let ns = hooks
        .iter()
        .find(|h| h["name"] == "namespace.sidecar-injector.pingsail.io")
        .unwrap();
    assert_eq!(
        ns["namespaceSelector"]["matchExpressions"][0],
        serde_json::json!({"key": "istio-injection", "operator": "In", "values": ["enabled"]})
    );
    assert_eq!(
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "istio-system/pingsail-injector"
    );

    // A revisioned install only answers for its revision.
    let rev = docs(&render_chart(Some(
        serde_json::json!({"revision": "canary"}),
    )));
    let mwc = rev
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    let names: Vec<&str> = mwc["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "rev.namespace.sidecar-injector.pingsail.io",
            "rev.object.sidecar-injector.pingsail.io"
        ]
    );
    assert_eq!(
        mwc["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["values"][0],
        "canary"
    );
}

#[test]
fn configmap_configures_the_injector_like_the_built_ins() {
    let all = docs(&render_chart(None));
    let cm = all.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let get = |k: &str| cm["data"][k].as_str().unwrap().to_string();
    let from_cm = config::build_settings(&Sources {
        config: Some(get("config")),
        values: Some(get("values")),
        mesh: Some(get("mesh")),
        ..Default::default()
    })
    .unwrap();
    let built_in = config::build_settings(&Sources::default()).unwrap();
    let input = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/reference/istio/injection/pkg-kube-inject-testdata-inject/hello-probes.yaml"
    ))
    .unwrap();
    let a = kubeinject::kube_inject(&from_cm, &input, &mut |_| {}).unwrap();
    let b = kubeinject::kube_inject(&built_in, &input, &mut |_| {}).unwrap();
    assert_eq!(a, b);
    assert!(a.contains("istio-proxy"));
}
