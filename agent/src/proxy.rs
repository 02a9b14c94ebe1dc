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
    #[error("xDS proxy: {0}")]
    Xds(#[from] crate::xdsproxy::XdsProxyError),
    #[error("DNS proxy: {0}")]
    Dns(#[from] crate::dns::DnsError),
    #[error("status server: {0}")]
    Status(#[from] crate::status::StatusError),
    #[error("{0}")]
    Invalid(String),
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

    // The proxy's ADS stream goes through us to istiod; the name table comes back for DNS.
    let (names_tx, names_rx) = crate::nds::name_table_channel();
    let xds = crate::xdsproxy::XdsProxy::start(
        xds_config(&cfg),
        Some(identity.secrets.clone()),
        cfg.dns_capture.then_some(names_tx),
    )
    .await?;
    let dns = if cfg.dns_capture {
        Some(crate::dns::DnsServer::start(dns_config(&cfg)?, names_rx).await?)
    } else {
        None
    };

    // One deadline for the pod: SIGTERM → drain → stop; the status server's /drain and
    // /quitquitquit act on the same lifecycle.
    let drain = crate::drain::DrainCoordinator::new(drain_settings(&cfg), lifecycle.clone());
    let (status, status_listener) = crate::status::StatusServer::bind(
        status_config(&cfg)?,
        lifecycle.clone(),
        Some(drain.hook()),
    )
    .await?;
    let status_task = tokio::spawn(status.serve(status_listener));
    let drain_task = tokio::spawn(drain.clone().run());

    let bootstrap_file = prepare_bootstrap(&cfg)?;
    let binary = supervisor::resolve_binary(&cfg);
    let args = supervisor::proxy_args(&cfg, &bootstrap_file);
    let sup = SupervisorConfig::new(binary, args, cfg.paths.base.clone());

    // Signals: SIGTERM and SIGINT start the drain (pilot-agent treats both alike); the
    // coordinator stops the lifecycle at the deadline, and the supervisor then stops the proxy.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ProxyError::Signal)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(ProxyError::Signal)?;
    let signals = {
        let drain = drain.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: draining"),
                    _ = int.recv() => tracing::info!("SIGINT: draining"),
                }
                drain.terminate();
            }
        })
    };

    let code = supervisor::run(sup, lifecycle).await;
    signals.abort();
    drain_task.abort();
    let _ = status_task.await;
    if let Some(dns) = dns {
        dns.shutdown().await;
    }
    xds.shutdown().await;
    identity.server.shutdown().await;
    Ok(code)
}

/// The xDS proxy as pilot-agent configures it: istiod's root from the mounted CA bundle unless
/// `controlPlaneAuthPolicy: NONE`, the projected token, ClusterID, ISTIOD_SAN, XDS_HEADER_*.
fn xds_config(cfg: &AgentConfig) -> crate::xdsproxy::XdsProxyConfig {
    use crate::xdsproxy::{DEFAULT_ROOT_CERT_PATH, DEFAULT_TOKEN_PATH, XdsProxyConfig};
    let base = &cfg.paths.base;
    let mut x = XdsProxyConfig::new(cfg.paths.xds_socket.clone(), cfg.discovery_address.clone());
    x.root_cert_path = match cfg.proxy_config.str("controlPlaneAuthPolicy") {
        Some("NONE") => None,
        _ => Some(base.join(DEFAULT_ROOT_CERT_PATH)),
    };
    x.token_path = Some(base.join(DEFAULT_TOKEN_PATH));
    if let Some(san) = cfg.env.get("ISTIOD_SAN").filter(|s| !s.is_empty()) {
        x.server_name = Some(san.clone());
    }
    if let Some(id) = cfg
        .env
        .get("ISTIO_META_CLUSTER_ID")
        .filter(|s| !s.is_empty())
    {
        x.cluster_id = id.clone();
    }
    x.extra_headers = cfg
        .env
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("XDS_HEADER_")?.to_owned(), v.clone())))
        .collect();
    x
}

/// DNS_PROXY_ADDR: `localhost:<port>` keeps pilot-agent's choice of loopback addresses (from the
/// pod's nameservers) on that port; an explicit `ip:port` is used as given.
fn dns_config(cfg: &AgentConfig) -> Result<crate::dns::DnsConfig, ProxyError> {
    let mut d = crate::dns::DnsConfig::new(cfg.pod_namespace.clone(), cfg.domain.clone());
    let addr = cfg.dns_proxy_addr.as_str();
    if let Some(port) = addr.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| ProxyError::Invalid(format!("DNS_PROXY_ADDR {addr:?}: bad port")))?;
        if port != 15053 {
            d.listen = vec![
                std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            ];
        }
    } else if !addr.is_empty() {
        d.listen =
            vec![addr.parse().map_err(|_| {
                ProxyError::Invalid(format!("DNS_PROXY_ADDR {addr:?}: not host:port"))
            })?];
    }
    Ok(d)
}

fn drain_settings(cfg: &AgentConfig) -> crate::drain::DrainSettings {
    let mut d = crate::drain::DrainSettings::new();
    d.proxy_admin = std::net::SocketAddr::from(([127, 0, 0, 1], cfg.ports.proxy_admin));
    d.termination_drain_duration = cfg.drain.termination_drain_duration;
    d.minimum_drain_duration = cfg.drain.minimum_drain_duration;
    d.exit_on_zero_active_connections = cfg.drain.exit_on_zero_active_connections;
    d.status_port = cfg.ports.envoy_status;
    d.prometheus_port = cfg.ports.envoy_prometheus;
    d
}

fn status_config(cfg: &AgentConfig) -> Result<crate::status::StatusConfig, ProxyError> {
    let mut s = crate::status::StatusConfig::new();
    s.listen = std::net::SocketAddr::from(([0, 0, 0, 0], cfg.ports.status));
    s.proxy_admin = std::net::SocketAddr::from(([127, 0, 0, 1], cfg.ports.proxy_admin));
    s.proxy_prometheus = std::net::SocketAddr::from(([127, 0, 0, 1], cfg.ports.envoy_prometheus));
    s.app_probers = cfg
        .app_probers
        .as_ref()
        .map(|m| serde_json::Value::Object(m.clone()).to_string())
        .unwrap_or_default();
    s.prometheus_annotations = cfg
        .prometheus_annotations
        .as_ref()
        .map(|m| serde_json::Value::Object(m.clone()).to_string());
    s.pod_ip = cfg.env.get("INSTANCE_IP").and_then(|ip| ip.parse().ok());
    Ok(s)
}
