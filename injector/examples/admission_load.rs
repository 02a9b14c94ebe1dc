// SPDX-License-Identifier: Apache-2.0
//! Admission-latency benchmark: starts the real `pingsail-injector serve` binary with a generated
//! certificate, sends AdmissionReviews (Istio's hello-probes Deployment pod, so the full injection
//! path runs) at a fixed rate over N keep-alive HTTPS connections, and reports p50/p90/p99/max
//! latency and the injector's RSS.
//!
//!   cargo build --release -p pingsail-injector
//!   cargo run --release -p pingsail-injector --example admission_load -- \
//!       --bin target/release/pingsail-injector --rate 200 --concurrency 8 --seconds 30

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

struct Opts {
    bin: String,
    rate: u64,
    concurrency: usize,
    seconds: u64,
}

fn opts() -> Opts {
    let mut o = Opts {
        bin: "target/release/pingsail-injector".into(),
        rate: 200,
        concurrency: 8,
        seconds: 30,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < args.len() {
        match args[i].as_str() {
            "--bin" => o.bin = args[i + 1].clone(),
            "--rate" => o.rate = args[i + 1].parse().unwrap(),
            "--concurrency" => o.concurrency = args[i + 1].parse().unwrap(),
            "--seconds" => o.seconds = args[i + 1].parse().unwrap(),
            other => panic!("unknown flag {other}"),
        }
        i += 2;
    }
    o
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

fn review_body() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/reference/istio/injection/pkg-kube-inject-testdata-inject/hello-probes.yaml"
    );
    let dep: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut meta = dep["spec"]["template"]["metadata"].clone();
    meta["generateName"] = json!("hello-fake-");
    meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "hello-fake", "controller": true, "uid": "x"}]);
    meta["labels"]["pod-template-hash"] = json!("fake");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": dep["spec"]["template"]["spec"]});
    serde_json::to_vec(
        &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "bench", "namespace": "default", "operation": "CREATE", "object": pod}}),
    )
    .unwrap()
}

/// CPU cost of one admission in-process (no TLS/HTTP), single thread.
fn in_process_cost(body: &[u8]) -> Duration {
    let settings = pingsail_injector::config::build_settings(&Default::default()).unwrap();
    for _ in 0..50 {
        pingsail_injector::admission::review(&settings, body, "/inject", false).unwrap();
    }
    let n = 500;
    let t = Instant::now();
    for _ in 0..n {
        pingsail_injector::admission::review(&settings, body, "/inject", false).unwrap();
    }
    t.elapsed() / n
}

#[tokio::main]
async fn main() {
    let o = opts();
    println!(
        "in-process cost per admission: {:.1} us",
        in_process_cost(&review_body()).as_secs_f64() * 1e6
    );
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut child = Command::new(&o.bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        // Default (info) logging: one JSON line per admission, as in production.
        .stderr(Stdio::piped())
        .spawn()
        .expect("start injector");
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr: std::net::SocketAddr = loop {
        let line = lines.next().expect("injector exited").unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["message"] == "webhook listening" {
            break v["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    // Keep draining the log pipe so the injector never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    let (idle_rss, _) = rss_kib(pid);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(cfg));
    let body = Bytes::from(review_body());

    // Warm-up, then the measured run. Each connection sends at rate/concurrency, on a fixed
    // schedule (latency is measured from the scheduled send time, so stalls are not hidden).
    for (phase, secs) in [("warmup", 3u64), ("run", o.seconds)] {
        let per_conn = o.rate as f64 / o.concurrency as f64;
        let interval = Duration::from_secs_f64(1.0 / per_conn);
        let n_per_conn = (per_conn * secs as f64) as usize;
        let mut tasks = Vec::new();
        let start = Instant::now() + Duration::from_millis(50);
        for c in 0..o.concurrency {
            let connector = connector.clone();
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                    .unwrap();
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let offset = interval.mul_f64(c as f64 / 8.0);
                let mut lat = Vec::with_capacity(n_per_conn);
                for i in 0..n_per_conn {
                    let due = start + offset + interval * i as u32;
                    tokio::time::sleep_until(due.into()).await;
                    let req = http::Request::post("/inject")
                        .header("host", "localhost")
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    let b = resp.into_body().collect().await.unwrap().to_bytes();
                    assert!(b.windows(9).any(|w| w == b"JSONPatch"), "not injected");
                    lat.push(due.elapsed());
                }
                lat
            }));
        }
        let mut all: Vec<Duration> = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        if phase == "warmup" {
            continue;
        }
        all.sort();
        let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
        let (rss, hwm) = rss_kib(pid);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks: u64 = fields
            .get(11)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        println!(
            "requests={} rate={}/s concurrency={} p50={:.3}ms p90={:.3}ms p99={:.3}ms max={:.3}ms rss_idle={}KiB rss_after={}KiB rss_peak={}KiB cpu_ticks_total={}",
            all.len(),
            o.rate,
            o.concurrency,
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.90).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            all[all.len() - 1].as_secs_f64() * 1e3,
            idle_rss,
            rss,
            hwm,
            ticks
        );
    }
    child.kill().ok();
    child.wait().ok();
}
