// SPDX-License-Identifier: Apache-2.0
//! pingsail's data plane: an Envoy-compatible sidecar proxy on Pingora.
//!
//! Configuration enters through [`xds`] (bootstrap today, ADS next), is translated once into the frozen
//! [`snapshot::ConfigSnapshot`], and is read by the data path ([`listener`], [`http`], [`tcp`]) with one
//! atomic load. Runtime state that must outlive configuration swaps lives in [`cluster`] and [`stats`].

pub mod access_log;
pub mod admin;
pub mod authz;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod http;
pub mod listener;
pub mod snapshot;
pub mod stats;
pub mod tcp;
pub mod testing;
pub mod xds;

use anyhow::Context as _;
use pingora_core::apps::HttpServerOptions;
use pingora_core::server::configuration::ServerConf;
use pingora_proxy::HttpProxy;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// State shared by every listener and request of one proxy instance.
pub struct Shared {
    /// the configuration
    pub snapshot: snapshot::SnapshotHandle,
    /// runtime cluster state
    pub clusters: cluster::ClusterManager,
    /// counters
    pub stats: stats::Stats,
    /// Upstream connections for shadow (mirrored) requests, pooled apart from the primary traffic.
    pub mirror_connector: Arc<pingora_core::connectors::http::Connector>,
}

/// The HTTP proxies the listeners hand connections to (one per downstream codec).
pub struct Apps {
    /// shared state
    pub shared: Arc<Shared>,
    /// HTTP/1.x
    pub h1: Arc<HttpProxy<http::Router>>,
    /// h2 with prior knowledge
    pub h2: Arc<HttpProxy<http::Router>>,
}

/// Process options (the meaningful subset of Envoy's command line).
#[derive(Debug, Clone)]
pub struct Options {
    /// `--concurrency` worker threads for the data plane (default: available parallelism)
    pub concurrency: usize,
    /// `--drain-time-s`
    pub drain_time: std::time::Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            drain_time: std::time::Duration::from_secs(600),
        }
    }
}

/// A running proxy. Dropping it stops every listener and runtime.
pub struct Running {
    /// bound listener addresses by listener name
    pub listeners: Vec<(String, SocketAddr)>,
    /// bound admin address
    pub admin: Option<SocketAddr>,
    /// shared state
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    quit: watch::Receiver<bool>,
    _quit_tx: Arc<watch::Sender<bool>>,
    data_rt: Option<tokio::runtime::Runtime>,
    admin_rt: Option<tokio::runtime::Runtime>,
}

impl Running {
    /// Resolves when `/quitquitquit` was called.
    pub async fn quit_requested(&self) {
        let mut q = self.quit.clone();
        let _ = q.wait_for(|v| *v).await;
    }

    /// Stops listeners (open connections end when their runtime stops).
    pub fn stop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(rt) = self.data_rt.take() {
            rt.shutdown_background();
        }
        if let Some(rt) = self.admin_rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn std_bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    // std sets SO_REUSEADDR on Unix, as Envoy does for its listeners.
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Starts a proxy from a validated bootstrap. Returns once every listener and the admin socket are bound.
pub fn start(
    loaded: xds::bootstrap::Loaded,
    opts: &Options,
    log_control: Option<admin::LogControl>,
) -> anyhow::Result<Running> {
    let shared = Arc::new(Shared {
        snapshot: snapshot::SnapshotHandle::new(snapshot::ConfigSnapshot::default()),
        clusters: cluster::ClusterManager::default(),
        stats: stats::Stats::default(),
        mirror_connector: Arc::new(pingora_core::connectors::http::Connector::new(None)),
    });
    let data_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.concurrency.max(1))
        .thread_name("pingsail-worker")
        .enable_all()
        .build()
        .context("building the data-plane runtime")?;
    let admin_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("pingsail-admin")
        .enable_all()
        .build()
        .context("building the admin runtime")?;

    let snap = loaded.snapshot;
    {
        let _guard = data_rt.enter();
        shared.clusters.sync(&snap);
    }
    let listeners: Vec<_> = snap.listeners.iter().map(|l| l.config.clone()).collect();
    // Envoy lists every counter from the start, at zero.
    for name in snap.clusters.keys() {
        shared.stats.cluster(name);
    }
    for l in &listeners {
        for chain in l.chains.iter().chain(l.default_chain.iter()) {
            match &chain.kind {
                config::ChainKind::Http(h) => drop(shared.stats.http(&h.stat_prefix)),
                config::ChainKind::Tcp(t) => drop(shared.stats.tcp(&t.stat_prefix)),
            }
        }
    }
    shared.snapshot.publish(snap);

    let conf = Arc::new(ServerConf {
        threads: opts.concurrency.max(1),
        ..ServerConf::default()
    });
    let h1 = Arc::new(pingora_proxy::http_proxy(
        &conf,
        http::Router::new(shared.clone()),
    ));
    let mut h2 = pingora_proxy::http_proxy(&conf, http::Router::new(shared.clone()));
    let mut h2_opts = HttpServerOptions::default();
    h2_opts.h2c = true;
    h2.server_options = Some(h2_opts);
    let apps = Arc::new(Apps {
        shared: shared.clone(),
        h1,
        h2: Arc::new(h2),
    });

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut bound = Vec::new();
    for l in listeners.iter().filter(|l| l.bind_to_port) {
        let std_l = std_bind(l.address)
            .with_context(|| format!("listener '{}': binding {}", l.name, l.address))?;
        let addr = std_l.local_addr()?;
        bound.push((l.name.to_string(), addr));
        let (apps, l, rx) = (apps.clone(), l.clone(), shutdown_rx.clone());
        data_rt.spawn(async move {
            match tokio::net::TcpListener::from_std(std_l) {
                Ok(sock) => listener::serve(apps, l, sock, rx).await,
                Err(e) => tracing::error!("listener '{}': {e}", l.name),
            }
        });
    }
    let (quit_tx, quit_rx) = watch::channel(false);
    let quit_tx = Arc::new(quit_tx);
    let mut admin_addr = None;
    if let Some(addr) = loaded.admin {
        let std_l = std_bind(addr).with_context(|| format!("admin: binding {addr}"))?;
        admin_addr = Some(std_l.local_addr()?);
        let admin = Arc::new(admin::Admin {
            shared: shared.clone(),
            quit: quit_tx.clone(),
            log_control,
        });
        admin_rt.spawn(async move {
            match tokio::net::TcpListener::from_std(std_l) {
                Ok(sock) => admin::serve(admin, sock).await,
                Err(e) => tracing::error!("admin: {e}"),
            }
        });
    }
    Ok(Running {
        listeners: bound,
        admin: admin_addr,
        shared,
        shutdown,
        quit: quit_rx,
        _quit_tx: quit_tx,
        data_rt: Some(data_rt),
        admin_rt: Some(admin_rt),
    })
}
