// SPDX-License-Identifier: Apache-2.0
//! The Job pattern: an app runs to completion, then `curl -XPOST localhost:15020/quitquitquit` ends
//! the sidecar — agent and proxy gone, exit status 0, within a second. Also SIGTERM: drain, then exit
//! 0 at the termination drain deadline. The sidecar is a stand-in composing the agent's pieces
//! (support/bin/sidecar_standin.rs) around the real pingsail-proxy binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pingsail_tests::client::{self, Request};
use pingsail_tests::net::{TempDir, random_loopback_ip};

struct Sidecar {
    child: tokio::process::Child,
    status: SocketAddr,
    proxy_pid: u32,
    admin: SocketAddr,
    _dir: TempDir,
}

async fn start(drain_ms: u64) -> Sidecar {
    let dir = TempDir::new("pingsail-job").unwrap();
    let ip = random_loopback_ip();
    let admin = SocketAddr::from((ip, 15000));
    let bootstrap = dir.path().join("bootstrap.yaml");
    std::fs::write(
        &bootstrap,
        format!(
            r#"
admin: {{ address: {{ socket_address: {{ address: {ip}, port_value: 15000 }} }} }}
static_resources:
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment: {{ cluster_name: app, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 9 }} }} }} }} ] }} ] }}
"#
        ),
    )
    .unwrap();
    let proxy = pingsail_tests::netns::cargo_bin("pingsail-proxy", "pingsail-proxy").unwrap();
    let ready = dir.path().join("ready");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sidecar-standin"))
        .arg(&proxy)
        .arg(&bootstrap)
        .arg(admin.to_string())
        .arg(drain_ms.to_string())
        .arg(&ready)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Readiness signals: the ready file, then the proxy's admin answering /ready.
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&ready) {
            break t;
        }
        assert!(Instant::now() < deadline, "the stand-in never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut it = text.split_whitespace();
    let port: u16 = it.next().unwrap().parse().unwrap();
    let proxy_pid: u32 = it.next().unwrap().parse().unwrap();
    loop {
        let r = client::send(admin, &Request::get("/ready").header("host", "admin")).await;
        if matches!(r, Ok(ref r) if r.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never became ready: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Sidecar {
        child,
        status: SocketAddr::from(([127, 0, 0, 1], port)),
        proxy_pid,
        admin,
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
