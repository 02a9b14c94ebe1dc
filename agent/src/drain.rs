// SPDX-License-Identifier: Apache-2.0
//! Draining with one deadline (pilot-agent's `pkg/envoy/agent.go`): when the [`Lifecycle`] enters
//! `Draining { deadline }` (SIGTERM), the proxy is asked to drain its inbound listeners gracefully
//! (`POST /drain_listeners?inboundonly&graceful`), then the agent stops (exit 0) at the deadline
//! (terminationDrainDuration) — or, with EXIT_ON_ZERO_ACTIVE_CONNECTIONS, after
//! MINIMUM_DRAIN_DURATION as soon as the proxy's listeners hold no connection (checked every second
//! from the admin's `downstream_cx_active` stats, ignoring the 15021, 15090 and admin listeners).
//!
//! `POST /drain` on the status server (the native-sidecar preStop) drains the proxy at once
//! ([`DrainCoordinator::drain_now`], with `skip_exit`) without exiting; the later SIGTERM then only
//! waits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::lifecycle::{Lifecycle, Phase};
use crate::status::client::Call;

/// Drain settings (ProxyConfig and pilot-agent's environment).
#[derive(Debug, Clone)]
pub struct DrainSettings {
    /// the proxy's admin (`127.0.0.1:15000`)
    pub proxy_admin: SocketAddr,
    /// ProxyConfig `terminationDrainDuration` (default 5 s)
    pub termination_drain_duration: Duration,
    /// MINIMUM_DRAIN_DURATION (default 5 s)
    pub minimum_drain_duration: Duration,
    /// EXIT_ON_ZERO_ACTIVE_CONNECTIONS
    pub exit_on_zero_active_connections: bool,
    /// the proxy's health listener port (15021), not counted as app connections
    pub status_port: u16,
    /// the proxy's Prometheus listener port (15090), not counted either
    pub prometheus_port: u16,
    /// how often active connections are checked (1 s)
    pub check_interval: Duration,
}

impl DrainSettings {
    /// pilot-agent's defaults.
    pub fn new() -> Self {
        DrainSettings {
            proxy_admin: SocketAddr::from(([127, 0, 0, 1], 15000)),
            termination_drain_duration: Duration::from_secs(5),
            minimum_drain_duration: Duration::from_secs(5),
            exit_on_zero_active_connections: false,
            status_port: 15021,
            prometheus_port: 15090,
            check_interval: Duration::from_secs(1),
        }
    }
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self::new()
    }
}

/// Drives the drain; share it with the status server (`/drain`) and the signal handler.
#[derive(Debug)]
pub struct DrainCoordinator {
    settings: DrainSettings,
    lifecycle: Lifecycle,
    drained: AtomicBool,
}

impl DrainCoordinator {
    pub fn new(settings: DrainSettings, lifecycle: Lifecycle) -> Arc<Self> {
        Arc::new(DrainCoordinator {
            settings,
            lifecycle,
            drained: AtomicBool::new(false),
        })
    }

    /// SIGTERM: start draining with the one deadline (now + terminationDrainDuration). False when
    /// already draining or stopping.
    pub fn terminate(&self) -> bool {
        self.lifecycle
            .drain(Instant::now() + self.settings.termination_drain_duration)
    }

    /// The status server's `POST /drain` hook ([`crate::status::DrainHook`]): runs
    /// [`DrainCoordinator::drain_now`] on the current runtime.
    pub fn hook(self: &Arc<Self>) -> crate::status::DrainHook {
        let me = self.clone();
        Arc::new(move || {
            let me = me.clone();
            tokio::spawn(async move { me.drain_now().await });
        })
    }

    /// `POST /drain`: ask the proxy to drain now, without a deadline (the pod's SIGTERM comes later).
    pub async fn drain_now(&self) {
        if self.drained.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.drain_listeners(true).await {
            tracing::warn!("draining the proxy: {e}");
        }
    }

    async fn drain_listeners(&self, skip_exit: bool) -> Result<(), String> {
        let target = if skip_exit {
            "/drain_listeners?inboundonly&graceful&skip_exit"
        } else {
            "/drain_listeners?inboundonly&graceful"
        };
        let r = Call::post(self.settings.proxy_admin, target)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!(
                "proxy admin answered {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body).trim()
            ));
        }
        Ok(())
    }

    /// Active downstream connections on the app-facing listeners; `None` when the stats are empty
    /// (pilot-agent then stops waiting).
    async fn active_connections(&self) -> Result<Option<u64>, String> {
        let r = Call::get(
            self.settings.proxy_admin,
            "/stats?usedonly&filter=downstream_cx_active%24",
        )
        .send()
        .await
        .map_err(|e| e.to_string())?;
        let body = String::from_utf8_lossy(&r.body);
        if body.trim().is_empty() {
            return Ok(None);
        }
        let known = [
            format!(
                "listener.0.0.0.0_{}.downstream_cx_active",
                self.settings.status_port
            ),
            format!(
                "listener.0.0.0.0_{}.downstream_cx_active",
                self.settings.prometheus_port
            ),
            "listener.admin.downstream_cx_active".to_owned(),
            "listener.admin.main_thread.downstream_cx_active".to_owned(),
        ];
        let mut n = 0;
        for line in body.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let k = k.trim();
            if !k.starts_with("listener.") || k.contains("worker_") || known.iter().any(|x| x == k)
            {
                continue;
            }
            n += v.trim().parse::<u64>().unwrap_or(0);
        }
        Ok(Some(n))
    }

    /// Waits for the lifecycle to drain, drives the drain and moves the lifecycle to
    /// `Stopping { exit_code: 0 }`. Returns when the lifecycle is stopping.
    pub async fn run(self: Arc<Self>) {
        let mut rx = self.lifecycle.subscribe();
        let deadline = loop {
            match *rx.borrow_and_update() {
                Phase::Draining { deadline } => break deadline,
                Phase::Stopping { .. } => return,
                Phase::Running => {}
            }
            if rx.changed().await.is_err() {
                return;
            }
        };
        let stopped = async {
            let _ = rx.wait_for(|p| matches!(p, Phase::Stopping { .. })).await;
        };
        tokio::select! {
            _ = stopped => {}
            _ = self.clone().drain_until(deadline) => {
                self.lifecycle.stop(0);
            }
        }
    }

    async fn drain_until(self: Arc<Self>, deadline: Instant) {
        let started = Instant::now();
        if !self.drained.swap(true, Ordering::SeqCst) {
            tracing::info!("draining the proxy");
            if let Err(e) = self.drain_listeners(false).await {
                tracing::warn!("error in invoking drain listeners endpoint: {e}");
            }
        }
        if !self.settings.exit_on_zero_active_connections {
            tracing::info!(
                "graceful termination period is {:?}, starting",
                deadline.saturating_duration_since(Instant::now())
            );
            tokio::time::sleep_until(deadline.into()).await;
            tracing::info!("graceful termination period complete, terminating the proxy");
            return;
        }
        tokio::time::sleep_until((started + self.settings.minimum_drain_duration).into()).await;
        loop {
            tokio::time::sleep(self.settings.check_interval).await;
            match self.active_connections().await {
                Err(e) => {
                    tracing::error!("unable to get listener stats from the proxy: {e}");
                    return;
                }
                Ok(None) => {
                    tracing::info!("downstream_cx_active are not available; not waiting");
                    return;
                }
                Ok(Some(0)) => {
                    tracing::info!("no more active connections; terminating the proxy");
                    return;
                }
                Ok(Some(n)) => tracing::info!("there are still {n} active connections"),
            }
        }
    }
}
