// SPDX-License-Identifier: Apache-2.0
//! A stand-in sidecar: the agent's status server, drain coordinator and lifecycle around a child
//! proxy, the way `pingsail-agent proxy sidecar` composes them (the real supervisor restarts the
//! proxy; this one only starts it and stops it when the lifecycle says so).
//!
//! `sidecar-standin PROXY_BIN BOOTSTRAP ADMIN_ADDR TERMINATION_DRAIN_MS READY_FILE`: once serving,
//! writes `<status port> <proxy pid>` to READY_FILE. Exits with the lifecycle's exit code (1 when
//! the proxy dies on its own).

use std::net::SocketAddr;
use std::time::Duration;

use pingsail_agent::drain::{DrainCoordinator, DrainSettings};
use pingsail_agent::lifecycle::Lifecycle;
use pingsail_agent::status::{StatusConfig, StatusServer};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, proxy, bootstrap, admin, drain_ms, ready_file] = args.as_slice() else {
        eprintln!(
            "usage: sidecar-standin PROXY_BIN BOOTSTRAP ADMIN_ADDR TERMINATION_DRAIN_MS READY_FILE"
        );
        std::process::exit(2);
    };
    let (Ok(admin), Ok(drain_ms)) = (admin.parse::<SocketAddr>(), drain_ms.parse::<u64>()) else {
        eprintln!("sidecar-standin: bad ADMIN_ADDR or TERMINATION_DRAIN_MS");
        std::process::exit(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sidecar-standin: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(run(proxy, bootstrap, admin, drain_ms, ready_file));
    std::process::exit(code);
}

async fn run(proxy: &str, bootstrap: &str, admin: SocketAddr, drain_ms: u64, ready: &str) -> i32 {
    let lifecycle = Lifecycle::new();
    let coordinator = DrainCoordinator::new(
        DrainSettings {
            proxy_admin: admin,
            termination_drain_duration: Duration::from_millis(drain_ms),
            ..DrainSettings::new()
        },
        lifecycle.clone(),
    );
    let drain_hook = coordinator.hook();
    let cfg = StatusConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        proxy_admin: admin,
        proxy_prometheus: admin,
        ..StatusConfig::new()
    };
    let (server, listener) =
        match StatusServer::bind(cfg, lifecycle.clone(), Some(drain_hook)).await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("sidecar-standin: {e}");
                return 1;
            }
        };
    let port = server.port();
    tokio::spawn(server.serve(listener));
    tokio::spawn(coordinator.clone().run());
    let mut child = match tokio::process::Command::new(proxy)
        .args(["-c", bootstrap, "--concurrency", "1"])
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sidecar-standin: starting {proxy}: {e}");
            return 1;
        }
    };
    let pid = child.id().unwrap_or(0);
    let tmp = format!("{ready}.tmp");
    if std::fs::write(&tmp, format!("{port} {pid}\n")).is_err()
        || std::fs::rename(&tmp, ready).is_err()
    {
        eprintln!("sidecar-standin: writing {ready}");
        return 1;
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sidecar-standin: SIGTERM handler: {e}");
            return 1;
        }
    };
    let code = loop {
        tokio::select! {
            code = lifecycle.stopped() => break code,
            _ = term.recv() => {
                coordinator.terminate();
            }
            status = child.wait() => {
                eprintln!("sidecar-standin: the proxy exited on its own: {status:?}");
                return 1;
            }
        }
    };
    // Stopping: the proxy goes now (pilot-agent kills Envoy at the end of the drain, too).
    let _ = child.start_kill();
    let _ = child.wait().await;
    code
}
