// SPDX-License-Identifier: Apache-2.0
//! Injection decisions and features no Istio golden covers: gRPC probes, revisions, policy and
//! selectors. Driven through the AdmissionReview handler.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pingsail_injector::admission::{self, Outcome};
use pingsail_injector::config::{self, Sources};
use pingsail_injector::inject::Settings;
use serde_json::{Value, json};

fn settings_with(config_yaml: Option<&str>, revision: &str) -> Settings {
    config::build_settings(&Sources {
        config: config_yaml.map(str::to_string),
        revision: revision.to_string(),
        ..Default::default()
    })
    .unwrap()
}

fn review(pod: &Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u1", "namespace": "prod", "object": pod}}),
    )
    .unwrap()
}

fn run(s: &Settings, pod: &Value) -> (Outcome, Value) {
    let r = admission::review(s, &review(pod), "/inject", false).unwrap();
    let resp: Value = serde_json::from_slice(&r.body).unwrap();
    let mut out = pod.clone();
    if let Some(p) = resp.pointer("/response/patch").and_then(Value::as_str) {
        let bytes = decode(p);
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut out, &patch).unwrap();
    }
    (r.outcome, out)
}

fn decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let b: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::new();
    for ch in b.chunks(4) {
        let mut n = 0u32;
        for (i, c) in ch.iter().enumerate() {
            n |= u32::from(val(*c)) << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if ch.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if ch.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

fn pod(labels: Value) -> Value {
    json!({"metadata": {"name": "p", "namespace": "prod", "labels": labels},
           "spec": {"containers": [{"name": "app", "image": "app:1",
               "livenessProbe": {"grpc": {"port": 1234}, "timeoutSeconds": 3}}]}})
}

fn env(pod: &Value, name: &str) -> Option<String> {
    let proxy = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "istio-proxy")
        .unwrap();
    proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_string))
}

#[test]
fn grpc_probes_are_rewritten_like_istio() {
    let s = settings_with(None, "");
    let (o, out) = run(&s, &pod(json!({"app": "a"})));
    assert_eq!(o, Outcome::Injected);
    let probe = &out["spec"]["containers"][0]["livenessProbe"];
    assert_eq!(
        probe["httpGet"],
        json!({"path": "/app-health/app/livez", "port": 15020})
    );
    assert!(probe.get("grpc").is_none());
    assert_eq!(
        env(&out, "ISTIO_KUBE_APP_PROBERS").unwrap(),
        r#"{"/app-health/app/livez":{"grpc":{"port":1234,"service":null},"timeoutSeconds":3}}"#
    );
}

#[test]
fn revision_is_recorded() {
    let s = settings_with(None, "canary");
    let (_, out) = run(&s, &pod(json!({})));
    assert_eq!(out["metadata"]["annotations"]["istio.io/rev"], "canary");
    let status: Value = serde_json::from_str(
        out["metadata"]["annotations"]["sidecar.istio.io/status"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["revision"], "canary");
}

#[test]
fn policy_and_selectors() {
    let disabled = settings_with(Some("policy: disabled\n"), "");
    assert!(matches!(
        run(&disabled, &pod(json!({}))).0,
        Outcome::Skipped(_)
    ));
    assert_eq!(
        run(&disabled, &pod(json!({"sidecar.istio.io/inject": "true"}))).0,
        Outcome::Injected
    );

    let cfg = "policy: enabled\nneverInjectSelector:\n- matchExpressions:\n  - {key: batch, operator: Exists}\n";
    let never = settings_with(Some(cfg), "");
    assert!(matches!(
        run(&never, &pod(json!({"batch": "x"}))).0,
        Outcome::Skipped(_)
    ));
    // An explicit label beats the selector.
    assert_eq!(
        run(
            &never,
            &pod(json!({"batch": "x", "sidecar.istio.io/inject": "true"}))
        )
        .0,
        Outcome::Injected
    );

    let cfg = "policy: disabled\nalwaysInjectSelector:\n- matchLabels: {mesh: \"yes\"}\n";
    let always = settings_with(Some(cfg), "");
    assert_eq!(
        run(&always, &pod(json!({"mesh": "yes"}))).0,
        Outcome::Injected
    );
    assert!(matches!(
        run(&always, &pod(json!({"mesh": "no"}))).0,
        Outcome::Skipped(_)
    ));
}

#[test]
fn unknown_template_is_an_error_naming_it() {
    let s = settings_with(None, "");
    let mut p = pod(json!({}));
    p["metadata"]["annotations"] = json!({"inject.istio.io/templates": "nope"});
    match run(&s, &p).0 {
        Outcome::Failed { message, allowed } => {
            assert!(!allowed);
            assert!(message.contains("\"nope\""), "{message}");
        }
        other => panic!("expected failure, got {other:?}"),
    }
}
