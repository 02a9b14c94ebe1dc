// SPDX-License-Identifier: Apache-2.0
//! `pingsail-agent proxy sidecar|router` (pilot-agent `proxy`): identity (CA client + SDS) →
//! bootstrap → proxy under the supervisor, until the [`Lifecycle`] stops.
//!
//! Wiring points for the other agent services: each takes the [`AgentConfig`] and the
//! [`Lifecycle`] and is started in [`run`] before the proxy (status server on
//! `cfg.ports.status`, xDS proxy on `cfg.paths.xds_socket`, DNS on `cfg.dns_proxy_addr`).

use crate::bootstrap;
use crate::config::AgentConfig;
use crate::lifecycle::Lifecycle;
use crate::supervisor::{self, SupervisorConfig};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("workload identity: {0}")]
    Identity(#[from] crate::ca::ConfigError),
    #[error("SDS server: {0}")]
    Sds(#[from] crate::sds::SdsError),
    #[error("bootstrap: {0}")]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error("signals: {0}")]
    Signal(std::io::Error),
}

/// Writes the bootstrap (unless ProxyConfig customConfigFile names one) and returns the file the
/// proxy is started with.
pub fn prepare_bootstrap(cfg: &AgentConfig) -> Result<std::path::PathBuf, ProxyError> {
    if let Some(custom) = cfg
        .proxy_config
        .str("customConfigFile")
        .filter(|c| !c.is_empty())
    {
        return Ok(cfg.paths.base.join(custom));
    }
    let b = bootstrap::generate(&cfg.bootstrap_input())?;
    b.write(&cfg.paths.base, &cfg.paths.bootstrap)?;
    Ok(cfg.paths.bootstrap.clone())
}

/// Runs the agent; returns the process exit code.
pub async fn run(cfg: AgentConfig) -> Result<i32, ProxyError> {
    let lifecycle = Lifecycle::new();
    tracing::info!(
        id = %cfg.node_id, ips = ?cfg.ip_addresses, domain = %cfg.domain,
        "proxy role"
    );
    tracing::info!(config = %serde_json::Value::Object(cfg.proxy_config.0.clone()), "effective ProxyConfig");

    let cert_cfg = crate::ca::CertConfig::from_env(&cfg.env, &cfg.paths.base)?;
    let identity = crate::identity::start(&cert_cfg).await?;

    // Wiring point: status server (cfg.ports.status), xDS proxy (cfg.paths.xds_socket) and DNS
    // (cfg.dns_capture / cfg.dns_proxy_addr) start here, each with (&cfg, lifecycle.clone()).

    let bootstrap_file = prepare_bootstrap(&cfg)?;
    let binary = supervisor::resolve_binary(&cfg);
    let args = supervisor::proxy_args(&cfg, &bootstrap_file);
    let sup = SupervisorConfig::new(binary, args, cfg.paths.base.clone());

    // Signals → lifecycle. THE one place: SIGTERM/SIGINT stop now with exit code 0.
    // (The drain coordinator replaces this with Draining{terminationDrainDuration} → Stopping.)
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ProxyError::Signal)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(ProxyError::Signal)?;
    let signals = {
        let lifecycle = lifecycle.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = int.recv() => tracing::info!("SIGINT: stopping"),
            }
            lifecycle.stop(0);
        })
    };

    let code = supervisor::run(sup, lifecycle).await;
    signals.abort();
    identity.server.shutdown().await;
    Ok(code)
}
