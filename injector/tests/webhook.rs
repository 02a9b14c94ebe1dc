// SPDX-License-Identifier: Apache-2.0
//! The webhook over real HTTPS: bad input, skip decisions, re-injection, metrics, certificate
//! reload, and the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pingsail_injector::config::{self, Sources};
use serde_json::{Value, json};
use support::{Webhook, b64decode, start_webhook};

fn settings() -> pingsail_injector::inject::Settings {
    config::build_settings(&Sources::default()).unwrap()
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "prod", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}],
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": 80}}}]}
    })
}

fn review(object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "abc-123", "namespace": "prod", "operation": "CREATE", "object": object}
    }))
    .unwrap()
}

async fn admit(wh: &Webhook, object: Value) -> Value {
    let r = wh.post_json("/inject", review(object)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.content_type, "application/json");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    assert_eq!(v["response"]["uid"], "abc-123", "uid must be echoed");
    v["response"].clone()
}

fn apply(pod: &Value, resp: &Value) -> Value {
    assert_eq!(resp["patchType"], "JSONPatch");
    let patch: json_patch::Patch =
        serde_json::from_slice(&b64decode(resp["patch"].as_str().unwrap())).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

fn names(pod: &Value, key: &str) -> Vec<String> {
    pod["spec"][key]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn injects_and_reinjection_is_idempotent() {
    let wh = start_webhook(settings(), false).await;
    let resp = admit(&wh, pod()).await;
    assert_eq!(resp["allowed"], true);
    let injected = apply(&pod(), &resp);
    assert_eq!(
        names(&injected, "initContainers"),
        ["istio-init", "istio-proxy"]
    );
    assert_eq!(names(&injected, "containers"), ["web"]);
    let proxy = &injected["spec"]["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["image"], "ghcr.io/pingsail/pingsail-proxy:0.1.0");
    assert_eq!(
        injected["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/app-health/web/readyz"
    );
    assert_eq!(
        injected["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"],
        15020
    );
    assert_eq!(
        injected["metadata"]["labels"]["security.istio.io/tlsMode"],
        "istio"
    );
    // Sending the injected pod again must not add a second sidecar.
    let again = apply(&injected, &admit(&wh, injected.clone()).await);
    assert_eq!(
        names(&again, "initContainers"),
        ["istio-init", "istio-proxy"]
    );
    assert_eq!(again["spec"]["containers"], injected["spec"]["containers"]);
    assert_eq!(again["spec"]["volumes"], injected["spec"]["volumes"]);
}

#[tokio::test]
async fn skips_what_istio_skips() {
    let wh = start_webhook(settings(), false).await;
    let mut off = pod();
    off["metadata"]["labels"]["sidecar.istio.io/inject"] = json!("false");
    let mut host = pod();
    host["spec"]["hostNetwork"] = json!(true);
    let mut system = pod();
    system["metadata"]["namespace"] = json!("kube-system");
    for p in [off, host, system] {
        let resp = admit(&wh, p).await;
        assert_eq!(resp["allowed"], true);
        assert!(
            resp.get("patch").is_none(),
            "no patch for a skipped pod: {resp}"
        );
    }
    assert_eq!(wh.state.metrics.skipped.get(), 3);
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let wh = start_webhook(settings(), false).await;
    let r = wh.post_json("/inject", b"{not json".to_vec()).await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("could not decode body"));
    let r = wh
        .post_json(
            "/inject",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("no request"));
    let r = wh
        .post_json("/inject", br#"{"apiVersion":"v1","kind":"Pod"}"#.to_vec())
        .await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("apiVersion"));
    let r = wh
        .request("POST", "/inject", "text/plain", review(pod()))
        .await;
    assert_eq!(r.status, 415);
    let r = wh.post_json("/inject", Vec::new()).await;
    assert_eq!(r.status, 400);
    let r = wh
        .post_json(
            "/inject",
            vec![b' '; pingsail_injector::server::MAX_BODY + 10],
        )
        .await;
    assert_eq!(r.status, 413);
    let r = wh
        .request("GET", "/inject", "application/json", Vec::new())
        .await;
    assert_eq!(r.status, 405);
    let r = wh
        .request("GET", "/nope", "application/json", Vec::new())
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(wh.state.metrics.bad_requests.get(), 6);
}

#[tokio::test]
async fn unparsable_pods_and_bad_annotations_are_denied_with_a_message() {
    let wh = start_webhook(settings(), false).await;
    let resp = admit(
        &wh,
        json!({"metadata": {"name": "x"}, "spec": {"containers": "oops"}}),
    )
    .await;
    assert_eq!(resp["allowed"], false);
    assert!(
        resp["status"]["message"]
            .as_str()
            .unwrap()
            .contains("/spec/containers"),
        "{resp}"
    );
    assert!(resp.get("patch").is_none());

    let mut bad = pod();
    bad["metadata"]["annotations"] =
        json!({"traffic.sidecar.istio.io/excludeOutboundPorts": "70000"});
    let resp = admit(&wh, bad.clone()).await;
    assert_eq!(resp["allowed"], false);
    let msg = resp["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("traffic.sidecar.istio.io/excludeOutboundPorts"),
        "{msg}"
    );
    assert_eq!(wh.state.metrics.denied.get(), 2);

    // Configured to fail open: admitted, unpatched.
    let open = start_webhook(settings(), true).await;
    let resp = admit(&open, bad).await;
    assert_eq!(resp["allowed"], true);
    assert!(resp.get("patch").is_none());
    assert!(
        resp["status"]["message"]
            .as_str()
            .unwrap()
            .contains("excludeOutboundPorts")
    );
}

#[tokio::test]
async fn health_and_metrics() {
    let wh = start_webhook(settings(), false).await;
    assert_eq!(
        wh.request("GET", "/healthz", "", Vec::new()).await.status,
        200
    );
    assert_eq!(
        wh.request("GET", "/readyz", "", Vec::new()).await.status,
        200
    );
    admit(&wh, pod()).await;
    let m = wh.request("GET", "/metrics", "", Vec::new()).await;
    let text = String::from_utf8(m.body).unwrap();
    assert!(
        text.contains("pingsail_injector_requests_total 1"),
        "{text}"
    );
    assert!(
        text.contains("pingsail_injector_injections_total{outcome=\"injected\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("pingsail_injector_admission_duration_seconds_count 1"),
        "{text}"
    );
}

#[tokio::test]
async fn certificate_is_reloaded_when_files_change() {
    let wh = start_webhook(settings(), false).await;
    let fresh = support::make_certs();
    std::fs::copy(&fresh.cert_path, &wh.certs.cert_path).unwrap();
    std::fs::copy(&fresh.key_path, &wh.certs.key_path).unwrap();
    // Poll until the server presents the new certificate (the watcher ticks every 100 ms).
    let client = support::connector(&fresh.cert_der);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tcp = tokio::net::TcpStream::connect(wh.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let r = client.connect(name, tcp).await;
        if r.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "new certificate never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn binary_kube_inject_and_serve() {
    let bin = env!("CARGO_BIN_EXE_pingsail-injector");
    let input = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/reference/istio/injection/pkg-kube-inject-testdata-inject/job.yaml"
    );
    let out = Command::new(bin)
        .args(["kube-inject", "-f", input])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let doc: Value = serde_yaml::from_str(text.split("---\n").next().unwrap()).unwrap();
    let inits = &doc["spec"]["template"]["spec"]["initContainers"];
    assert_eq!(inits[1]["name"], "istio-proxy");
    assert_eq!(
        inits[1]["restartPolicy"], "Always",
        "a Job's sidecar must be native so the Job completes"
    );

    // A bad document fails with a message and a non-zero exit.
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), "apiVersion: v1\nkind: Pod\nmetadata: {name: x, annotations: {sidecar.istio.io/proxyCPU: lots}}\nspec: {containers: [{name: a, image: b}]}\n").unwrap();
    let out = Command::new(bin)
        .args(["kube-inject", "-f"])
        .arg(bad.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sidecar.istio.io/proxyCPU"));

    // serve: starts, logs JSON with its address, answers /healthz over HTTPS.
    let certs = support::make_certs();
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &certs.cert_path,
            "--tls-key",
            &certs.key_path,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut addr = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["message"] == "webhook listening" {
            addr = v["addr"]
                .as_str()
                .map(|s| s.parse::<std::net::SocketAddr>().unwrap());
            break;
        }
    }
    let addr = addr.expect("listening log line");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt.block_on(support::request_with(
        &support::connector(&certs.cert_der),
        addr,
        "GET",
        "/healthz",
        "",
        Vec::new(),
    ));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn mesh_config_is_reloaded_when_its_file_changes() {
    let certs = support::make_certs();
    let mesh_path = certs.dir.path().join("mesh").to_string_lossy().to_string();
    std::fs::write(
        &mesh_path,
        "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n",
    )
    .unwrap();
    let src = Sources {
        mesh: Some(std::fs::read_to_string(&mesh_path).unwrap()),
        ..Default::default()
    };
    let opts = pingsail_injector::server::ServeOptions {
        tls_cert: certs.cert_path.clone(),
        tls_key: certs.key_path.clone(),
        sources: Sources::default(),
        source_files: (None, None, Some(mesh_path.clone())),
        allow_on_error: false,
        reload_interval: Duration::from_millis(100),
    };
    let running = pingsail_injector::server::start(
        "127.0.0.1:0".parse().unwrap(),
        opts,
        config::build_settings(&src).unwrap(),
    )
    .await
    .unwrap();
    let client = support::connector(&certs.cert_der);
    let proxy_config = |resp: &Value| -> String {
        let out = apply(&pod(), resp);
        let proxy = out["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "istio-proxy")
            .unwrap()
            .clone();
        proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "PROXY_CONFIG")
            .unwrap()["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let post = || {
        support::request_with(
            &client,
            running.addr,
            "POST",
            "/inject",
            "application/json",
            review(pod()),
        )
    };
    let first: Value = serde_json::from_slice(&post().await.body).unwrap();
    assert_eq!(proxy_config(&first["response"]).trim(), "{}");
    std::fs::write(&mesh_path, "defaultConfig:\n  drainDuration: 23s\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r: Value = serde_json::from_slice(&post().await.body).unwrap();
        if proxy_config(&r["response"]).contains("\"drainDuration\":\"23s\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mesh config change never picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A broken file keeps the last good configuration.
    std::fs::write(&mesh_path, "defaultConfig: [not, a, map\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r: Value = serde_json::from_slice(&post().await.body).unwrap();
    assert!(proxy_config(&r["response"]).contains("23s"));
}
