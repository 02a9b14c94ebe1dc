// SPDX-License-Identifier: Apache-2.0
//! `pingsail-agent proxy sidecar` as a process, also under the name `pilot-agent`: the injected
//! istio-proxy container's arguments and environment (from Istio's injection golden) start the
//! workload identity, write the bootstrap and run the proxy (the real Envoy); SIGTERM stops both.
//! Bad flags and malformed environment values fail at start, naming what is wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pingsail_agent::testing::FakeCa;
use support::{envoy_binary, eventually, http_get, within};

const BIN: &str = env!("CARGO_BIN_EXE_pingsail-agent");
const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/istio/injection/pkg-kube-inject-testdata-inject/hello.yaml.injected"
);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `pilot-agent` → this binary, in `dir`.
fn pilot_agent_link(dir: &Path) -> PathBuf {
    let link = dir.join("pilot-agent");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    link
}

fn run_sync(bin: &Path, args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (i32, String) {
    let out = std::process::Command::new(bin)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_flags_are_rejected_by_both_names() {
    let dir = tempfile::tempdir().unwrap();
    let link = pilot_agent_link(dir.path());
    let (code, err) = run_sync(
        Path::new(BIN),
        &["proxy", "sidecar", "--bogus"],
        &[],
        dir.path(),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("--bogus") && err.contains("pingsail-agent"),
        "{err}"
    );
    let (code, err) = run_sync(&link, &["proxy", "sidecar", "--bogus=1"], &[], dir.path());
    assert_ne!(code, 0);
    assert!(
        err.contains("--bogus") && err.contains("pilot-agent proxy"),
        "{err}"
    );
    let (code, err) = run_sync(&link, &["proxy", "gateway"], &[], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("gateway"), "{err}");
    let (code, err) = run_sync(
        &link,
        &["proxy", "sidecar", "--templateFile", "/x.tmpl"],
        &[],
        dir.path(),
    );
    assert_eq!(code, 1);
    assert!(err.contains("--templateFile"), "{err}");
}

#[test]
fn malformed_environment_fails_at_start_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value) in [
        ("INSTANCE_IP", "not-an-ip"),
        ("PROXY_CONFIG", "drainDuration: soon"),
        ("PROXY_CONFIG", "{not yaml"),
        ("ISTIO_META_DNS_CAPTURE", "maybe"),
        ("ISTIO_METAJSON_LABELS", "[1,2]"),
        ("ISTIO_META_POD_PORTS", "80"),
        ("ISTIO_KUBE_APP_PROBERS", "{\"/app-health/x/livez\":"),
        ("ISTIO_PROMETHEUS_ANNOTATIONS", "[]"),
        ("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "yes please"),
        ("MINIMUM_DRAIN_DURATION", "forever"),
        ("ISTIO_CPU_LIMIT", "two"),
        ("ENVOY_STATUS_PORT", "99999"),
    ] {
        let (code, err) = run_sync(
            Path::new(BIN),
            &["proxy", "sidecar"],
            &[("POD_NAMESPACE", "default"), (var, value)],
            dir.path(),
        );
        assert_eq!(code, 1, "{var}={value}: {err}");
        assert!(
            err.contains("invalid configuration") && err.contains(var),
            "{var}: {err}"
        );
        assert!(
            !dir.path().join("etc/istio/proxy/envoy-rev.json").exists(),
            "nothing is started on a configuration error"
        );
    }
}

/// The istio-proxy container of Istio's `hello` injection golden: (args, env with valueFrom
/// entries filled as the kubelet would).
fn injected_container(fill: &BTreeMap<&str, String>) -> (Vec<String>, Vec<(String, String)>) {
    let text = std::fs::read_to_string(GOLDEN).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
        let spec = &v["spec"]["template"]["spec"];
        for list in ["initContainers", "containers"] {
            let Some(cs) = spec[list].as_sequence() else {
                continue;
            };
            if let Some(c) = cs.iter().find(|c| c["name"] == "istio-proxy") {
                let ns = &fill["POD_NAMESPACE"];
                let args = c["args"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().replace("$(POD_NAMESPACE)", ns))
                    .collect();
                let env = c["env"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        let name = e["name"].as_str().unwrap().to_owned();
                        let value = fill.get(name.as_str()).cloned().unwrap_or_else(|| {
                            e["value"]
                                .as_str()
                                .unwrap_or_else(|| panic!("{name} needs a value"))
                                .to_owned()
                        });
                        (name, value)
                    })
                    .collect();
                return (args, env);
            }
        }
    }
    panic!("no istio-proxy container in {GOLDEN}");
}

/// Direct children of `pid`.
fn children_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let kids = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            kids.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    out
}

fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_pilot_agent_command_runs_envoy_and_stops_on_sigterm() {
    let ca = FakeCa::start("spiffe://cluster.local/ns/default/sa/hello", false)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    for (d, f, content) in [
        (
            "var/run/secrets/istio",
            "root-cert.pem",
            ca.root_pem().to_owned(),
        ),
        (
            "var/run/secrets/tokens",
            "istio-token",
            "projected-token".to_owned(),
        ),
        (
            "etc/istio/pod",
            "labels",
            "app=\"hello\"\npod-template-hash=\"abc\"\nversion=\"v1\"\n".to_owned(),
        ),
        (
            "etc/istio/pod",
            "annotations",
            "sidecar.istio.io/status=\"{}\"\n".to_owned(),
        ),
    ] {
        std::fs::create_dir_all(base.join(d)).unwrap();
        std::fs::write(base.join(d).join(f), content).unwrap();
    }
    let admin = free_port();
    let fill: BTreeMap<&str, String> = [
        ("POD_NAME", "hello-7d4f-x2".to_owned()),
        ("POD_NAMESPACE", "default".to_owned()),
        ("INSTANCE_IP", "127.0.0.1".to_owned()),
        ("SERVICE_ACCOUNT", "hello".to_owned()),
        ("HOST_IP", "127.0.0.1".to_owned()),
        ("ISTIO_CPU_LIMIT", "1".to_owned()),
        ("GOMEMLIMIT", "1073741824".to_owned()),
        ("ISTIO_META_NODE_NAME", "node-1".to_owned()),
        ("CA_ADDR", ca.addr().to_string()),
        (
            "PROXY_CONFIG",
            format!(
                r#"{{"proxyAdminPort":{admin},"statusPort":{},"drainDuration":"2s"}}"#,
                free_port()
            ),
        ),
    ]
    .into_iter()
    .collect();
    let (args, env) = injected_container(&fill);
    assert_eq!(args[..2], ["proxy", "sidecar"]);
    let link = pilot_agent_link(base);
    let mut child = tokio::process::Command::new(&link)
        .args(&args)
        .arg(format!("--proxy-binary={}", envoy_binary().display()))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("ENVOY_STATUS_PORT", free_port().to_string())
        .env("ENVOY_PROMETHEUS_PORT", free_port().to_string())
        .current_dir(base)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let agent_pid = child.id().unwrap();

    // Envoy up with our bootstrap and pilot-agent's command line.
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let info = eventually(
        Duration::from_secs(60),
        "Envoy started by the agent",
        || async move { http_get(admin_addr, "/server_info").await.ok() },
    )
    .await;
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let id = "sidecar~127.0.0.1~hello-7d4f-x2.default~default.svc.cluster.local";
    assert_eq!(info["node"]["id"], id);
    let opts = &info["command_line_options"];
    assert_eq!(opts["log_level"], "warning", "{opts}");
    assert_eq!(opts["component_log_level"], "misc:error", "{opts}");
    assert_eq!(opts["concurrency"], 1, "ISTIO_CPU_LIMIT: {opts}");
    assert_eq!(opts["drain_time"], "2s", "{opts}");

    let bootstrap: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(base.join("etc/istio/proxy/envoy-rev.json")).unwrap(),
    )
    .unwrap();
    let md = &bootstrap["node"]["metadata"];
    assert_eq!(bootstrap["node"]["cluster"], "hello.default");
    assert_eq!(md["NAME"], "hello-7d4f-x2");
    assert_eq!(md["NAMESPACE"], "default");
    assert_eq!(md["CLUSTER_ID"], "Kubernetes");
    assert_eq!(md["WORKLOAD_NAME"], "hello");
    assert_eq!(md["NODE_NAME"], "node-1");
    assert_eq!(
        md["LABELS"],
        serde_json::json!({"app": "hello", "version": "v1"})
    );
    assert_eq!(
        md["ANNOTATIONS"],
        serde_json::json!({"sidecar.istio.io/status": "{}"})
    );
    assert_eq!(
        md["POD_PORTS"],
        r#"[{"name":"http","containerPort":80,"protocol":""}]"#
    );
    assert_eq!(
        md["PILOT_SAN"],
        serde_json::json!(["istiod.istio-system.svc"])
    );
    assert_eq!(md["PROXY_CONFIG"]["concurrency"], 1);
    assert_eq!(
        bootstrap["static_resources"]["clusters"][3]["load_assignment"]["endpoints"][0]["lb_endpoints"]
            [0]["endpoint"]["address"]["pipe"]["path"],
        "./etc/istio/proxy/XDS"
    );
    // The identity is served to the proxy over SDS.
    assert!(
        base.join("var/run/secrets/workload-spiffe-uds/socket")
            .exists()
    );
    eventually(Duration::from_secs(30), "a certificate from the CA", || {
        let n = ca.issued();
        async move { (n > 0).then_some(()) }
    })
    .await;

    let envoys = children_of(agent_pid);
    assert_eq!(envoys.len(), 1, "{envoys:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent_pid).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = within(
        Duration::from_secs(10),
        "agent exit after SIGTERM",
        child.wait(),
    )
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!running(envoys[0]), "Envoy must be stopped with the agent");
}
