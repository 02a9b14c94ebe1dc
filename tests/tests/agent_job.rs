// SPDX-License-Identifier: Apache-2.0
//! The Job pattern: an app runs to completion, then `curl -XPOST localhost:15020/quitquitquit` ends
//! the sidecar — agent and proxy gone, exit status 0, within a second. Also SIGTERM: drain, then exit
//! 0 at the termination drain deadline. The sidecar is the real thing: `pingsail-agent proxy
//! sidecar` (CA client, SDS, xDS proxy to a fake istiod behind TLS, status server, drain
//! coordinator, supervisor) running the real pingsail-proxy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pingsail_agent::testing::FakeCa;
use pingsail_tests::client::{self, Request};
use pingsail_tests::istiod::{CLUSTER, FakeIstiod, LISTENER};
use pingsail_tests::net::TempDir;

struct Sidecar {
    child: tokio::process::Child,
    status: SocketAddr,
    proxy_pid: u32,
    admin: SocketAddr,
    _istiod: FakeIstiod,
    _ca: FakeCa,
    _dir: TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The proxy the agent started: its only child process.
fn child_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// An injected pod's sidecar, for real: `pingsail-agent proxy sidecar` with pilot-agent's
/// environment, the fake istiod's CA issuing the workload certificate, the fake istiod (behind
/// TLS, through the agent's xDS proxy) serving a listener and a cluster, and pingsail-proxy as the
/// proxy. Returns once the status server says ready (the proxy has its first CDS and LDS).
async fn start(termination_drain_ms: u64) -> Sidecar {
    let dir = TempDir::new("pingsail-job").unwrap();
    let base = dir.path();
    let ca = FakeCa::start("spiffe://cluster.local/ns/default/sa/job", false)
        .await
        .unwrap();
    let istiod = FakeIstiod::start_tls(ca.pki().istiod_tls().unwrap())
        .await
        .unwrap();
    let app_port = free_port();
    istiod
        .set_yaml(
            CLUSTER,
            &format!(
                r#"
- name: "inbound|8080||"
  type: STATIC
  connect_timeout: 1s
  load_assignment: {{ cluster_name: "inbound|8080||", endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {app_port} }} }} }} }} ] }} ] }}
"#
            ),
        )
        .unwrap();
    istiod
        .set_yaml(
            LISTENER,
            &format!(
                r#"
- name: virtualInbound
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }}
  traffic_direction: INBOUND
  filter_chains:
  - filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: inbound
        cluster: "inbound|8080||"
"#,
                free_port()
            ),
        )
        .unwrap();
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
    ] {
        std::fs::create_dir_all(base.join(d)).unwrap();
        std::fs::write(base.join(d).join(f), content).unwrap();
    }
    let (admin_port, status_port) = (free_port(), free_port());
    let proxy_config = format!(
        r#"{{"proxyAdminPort":{admin_port},"statusPort":{status_port},"discoveryAddress":"{}","terminationDrainDuration":"{termination_drain_ms}ms","drainDuration":"2s"}}"#,
        istiod.addr().unwrap()
    );
    let agent = pingsail_tests::netns::cargo_bin("pingsail-agent", "pingsail-agent").unwrap();
    let proxy = pingsail_tests::netns::cargo_bin("pingsail-proxy", "pingsail-proxy").unwrap();
    let child = tokio::process::Command::new(&agent)
        .args(["proxy", "sidecar", "--domain", "default.svc.cluster.local"])
        .arg(format!("--proxy-binary={}", proxy.display()))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("POD_NAME", "job-x2")
        .env("POD_NAMESPACE", "default")
        .env("INSTANCE_IP", "127.0.0.1")
        .env("SERVICE_ACCOUNT", "job")
        .env("ISTIO_CPU_LIMIT", "1")
        .env("CA_ADDR", ca.addr().to_string())
        .env("PROXY_CONFIG", proxy_config)
        .env("ENVOY_STATUS_PORT", free_port().to_string())
        .env("ENVOY_PROMETHEUS_PORT", free_port().to_string())
        .current_dir(base)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let agent_pid = child.id().unwrap();
    let status = SocketAddr::from(([127, 0, 0, 1], status_port));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    // Readiness signal: the agent's /healthz/ready (first CDS and LDS applied by the proxy).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client::send(status, &Request::get("/healthz/ready")).await;
        if matches!(r, Ok(ref r) if r.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar never became ready: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let proxy_pid = child_of(agent_pid).expect("the agent runs the proxy as its child");
    Sidecar {
        child,
        status,
        proxy_pid,
        admin,
        _istiod: istiod,
        _ca: ca,
        _dir: dir,
    }
}

fn alive(pid: u32) -> bool {
    // A reaped process leaves no /proc entry; a zombie would say 'Z'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn job_ends_with_quitquitquit_within_a_second() {
    let mut sidecar = start(5000).await;
    assert!(alive(sidecar.proxy_pid));
    // The app: runs and exits 0.
    let app = tokio::process::Command::new("sh")
        .args(["-c", "exit 0"])
        .status()
        .await
        .unwrap();
    assert!(app.success());
    let t0 = Instant::now();
    let r = client::send(
        sidecar.status,
        &Request::new("POST", "/quitquitquit")
            .header("host", "localhost:15020")
            .body(""),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let status = tokio::time::timeout(Duration::from_secs(1), sidecar.child.wait())
        .await
        .expect("the sidecar still runs 1 s after /quitquitquit")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    while alive(sidecar.proxy_pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "the proxy outlived the sidecar"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert!(
        client::send(sidecar.admin, &Request::get("/ready"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn sigterm_drains_then_exits_zero_at_the_deadline() {
    let mut sidecar = start(600).await;
    let pid = sidecar.child.id().unwrap();
    let t0 = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // Draining: the proxy still answers its admin until the deadline.
    let r = client::send(
        sidecar.admin,
        &Request::get("/ready").header("host", "admin"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let status = tokio::time::timeout(Duration::from_secs(3), sidecar.child.wait())
        .await
        .expect("the sidecar did not exit after the drain deadline")
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(550),
        "exited after {took:?}, before the deadline"
    );
    assert!(took < Duration::from_millis(1600), "exited after {took:?}");
    assert!(!alive(sidecar.proxy_pid));
}
