// SPDX-License-Identifier: Apache-2.0
//! Malformed pods never panic the injector and never get a patch that does not apply: every Istio
//! reference input, plus systematic corruptions of its fields (wrong types, nulls, odd strings),
//! goes through the AdmissionReview handler.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pingsail_injector::admission;
use pingsail_injector::config::{self, Sources};
use pingsail_injector::kubeinject;
use serde_json::{Value, json};

const REF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/istio/injection/pkg-kube-inject-testdata-inject"
);

fn pods() -> Vec<Value> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(REF)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".yaml") || name.ends_with(".iop.yaml") {
            continue;
        }
        for doc in kubeinject::split_documents(&std::fs::read_to_string(&f).unwrap()) {
            let Ok(v) = serde_yaml::from_str::<Value>(&doc) else {
                continue;
            };
            let (meta, spec) = if v["kind"] == "Pod" {
                (v["metadata"].clone(), v["spec"].clone())
            } else {
                (
                    v["spec"]["template"]["metadata"].clone(),
                    v["spec"]["template"]["spec"].clone(),
                )
            };
            if spec.is_object() {
                out.push(json!({"metadata": meta, "spec": spec}));
            }
        }
    }
    out
}

/// Every leaf and container of `v`, replaced in turn by each of a few wrong values.
fn corruptions(v: &Value) -> Vec<Value> {
    let wrong = [
        json!(null),
        json!(7),
        json!("x"),
        json!([]),
        json!({}),
        json!(true),
        json!("\u{0}{{ \"'"),
    ];
    let mut paths = Vec::new();
    fn collect(v: &Value, path: String, out: &mut Vec<String>) {
        out.push(path.clone());
        match v {
            Value::Object(m) => m.iter().for_each(|(k, x)| {
                collect(
                    x,
                    format!("{path}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                )
            }),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, x)| collect(x, format!("{path}/{i}"), out)),
            _ => {}
        }
    }
    collect(v, String::new(), &mut paths);
    let mut out = Vec::new();
    for p in paths.iter().skip(1) {
        for w in &wrong {
            let mut c = v.clone();
            if let Some(slot) = c.pointer_mut(p) {
                *slot = w.clone();
                out.push(c);
            }
        }
    }
    out
}

#[test]
fn corrupted_pods_get_a_clean_answer() {
    let settings = config::build_settings(&Sources::default()).unwrap();
    let mut checked = 0usize;
    let mut injected = 0usize;
    for pod in pods().iter().take(40) {
        for c in corruptions(pod) {
            let body = serde_json::to_vec(
                &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {"uid": "u", "namespace": "ns", "object": c}}),
            )
            .unwrap();
            let r = admission::review(&settings, &body, "/inject", false)
                .expect("a well-formed review is answered");
            let resp: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(resp["response"]["uid"], "u");
            if let Some(p) = resp["response"]["patch"].as_str() {
                let bytes = decode(p);
                let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
                let mut target = c.clone();
                json_patch::patch(&mut target, &patch)
                    .unwrap_or_else(|e| panic!("patch does not apply: {e}"));
                injected += 1;
            } else if resp["response"]["allowed"] == false {
                assert!(
                    !resp["response"]["status"]["message"]
                        .as_str()
                        .unwrap_or("")
                        .is_empty()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 2000, "{checked}");
    assert!(injected > checked / 4, "{injected} of {checked}");
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
