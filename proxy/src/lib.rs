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
pub mod internal;
pub mod listener;
pub mod orig_dst;
pub mod snapshot;
pub mod sniff;
pub mod stats;
pub mod tcp;
pub mod testing;
pub mod tls;
pub mod tunnel;
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
    /// `--drain-time-s`: how long connections on a removed or changed filter chain may finish.
    pub drain_time: std::time::Duration,
    /// TLS material by secret name (SDS, static)
    pub secrets: Arc<tls::Secrets>,
    /// the upstream TLS tunnel (HTTP path)
    pub tunnel: std::sync::OnceLock<Arc<tls::tunnel::Tunnel>>,
    /// the secret names the configuration uses (followed by the SDS client)
    pub secret_names: watch::Sender<std::collections::BTreeSet<String>>,
    /// the HTTP proxies, for connections to internal listeners (set once at start)
    pub apps: std::sync::OnceLock<std::sync::Weak<Apps>>,
    /// HTTP/2 connections carrying tcp_proxy CONNECT tunnels (HBONE)
    pub tunnels: tunnel::Pool,
}

impl Shared {
    /// The listeners' HTTP proxies (`None` before start or after shutdown).
    pub fn apps(&self) -> Option<Arc<Apps>> {
        self.apps.get()?.upgrade()
    }
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
    /// bound addresses of the bootstrap's listeners by listener name
    pub listeners: Vec<(String, SocketAddr)>,
    /// every running listener (static and from LDS)
    pub manager: Arc<listener::Manager>,
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
        self.manager.stop_all();
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

/// Every named (SDS or static) secret the listeners and clusters reference.
fn secret_names(snap: &snapshot::ConfigSnapshot) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut add = |c: &tls::Common| {
        for s in c.cert.iter().chain(c.ca.iter()) {
            if let tls::Source::Named(n) = s {
                out.insert(n.to_string());
            }
        }
    };
    for l in &snap.listeners {
        for ch in l.config.chains.iter().chain(l.config.default_chain.iter()) {
            if let Some(t) = &ch.tls {
                add(&t.common);
            }
        }
    }
    for c in snap.clusters.values() {
        if let Some(t) = &c.config.tls {
            add(&t.common);
        }
        for t in c.config.tls_matches.iter().filter_map(|(_, t)| t.as_ref()) {
            add(&t.common);
        }
    }
    out
}

fn std_bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    // std sets SO_REUSEADDR on Unix, as Envoy does for its listeners.
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Makes a snapshot the running configuration: cluster runtime state first (so a route never names
/// a cluster the data path does not know yet), then the snapshot, then the listeners. Returns the
/// listeners that could not be started.
fn publish(
    shared: &Shared,
    manager: &listener::Manager,
    rt: &tokio::runtime::Handle,
    snap: snapshot::ConfigSnapshot,
) -> Vec<(arcstr::ArcStr, String)> {
    {
        let _guard = rt.enter();
        shared.clusters.sync(&snap);
    }
    // Envoy lists every counter from the start, at zero (registered once per new resource).
    let prev = shared.snapshot.load();
    if !Arc::ptr_eq(&prev.clusters, &snap.clusters) {
        for (name, c) in snap.clusters.iter() {
            if !prev.clusters.get(name).is_some_and(|p| Arc::ptr_eq(p, c)) {
                shared.stats.cluster(name);
            }
        }
    }
    for l in snap
        .listeners
        .iter()
        .filter(|l| !prev.listeners.iter().any(|p| Arc::ptr_eq(p, l)))
    {
        for chain in l.config.chains.iter().chain(l.config.default_chain.iter()) {
            match &chain.kind {
                config::ChainKind::Http(h) => drop(shared.stats.http(&h.stat_prefix)),
                config::ChainKind::Tcp(t) => drop(shared.stats.tcp(&t.stat_prefix)),
            }
        }
    }
    let listeners = snap.listeners.clone();
    // The SDS client follows the secrets the configuration names.
    let names = secret_names(&snap);
    shared.secret_names.send_if_modified(|cur| {
        let changed = *cur != names;
        *cur = names;
        changed
    });
    let mut snap = snap;
    snap.index();
    shared.snapshot.publish(snap);
    manager.reconcile(&listeners)
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
        drain_time: opts.drain_time,
        secrets: Arc::new(tls::Secrets::default()),
        tunnel: std::sync::OnceLock::new(),
        secret_names: watch::Sender::new(Default::default()),
        apps: std::sync::OnceLock::new(),
        tunnels: Default::default(),
    });
    for (name, m) in loaded.static_secrets {
        shared.secrets.set(&name, Some(m));
    }

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
    {
        let weak = Arc::downgrade(&shared);
        let lookup: tls::tunnel::Lookup = Arc::new(move |cluster: &str, socket: &str| {
            let shared = weak.upgrade()?;
            let c = shared.clusters.get(cluster)?;
            match socket.parse::<usize>() {
                Ok(i) => c.config.tls_matches.get(i)?.1.clone(),
                Err(_) => c.config.tls.clone(),
            }
        });
        let weak = Arc::downgrade(&shared);
        let internal: tls::tunnel::InternalConnect =
            Arc::new(move |cluster: &str, listener: &str, id: &str| {
                let gone = || std::io::Error::other("proxy is stopping");
                let shared = weak.upgrade().ok_or_else(gone)?;
                let apps = shared.apps().ok_or_else(gone)?;
                let c = shared
                    .clusters
                    .get(cluster)
                    .ok_or_else(|| std::io::Error::other(format!("cluster '{cluster}' is gone")))?;
                let endpoints = c.endpoints();
                let ep = endpoints
                    .iter()
                    .filter_map(|e| e.internal.as_ref())
                    .find(|e| e.listener == listener && e.endpoint_id == id)
                    .ok_or_else(|| std::io::Error::other(format!("endpoint '{id}' is gone")))?;
                let passed = internal::Passed::for_endpoint(&c.config, ep);
                internal::connect(&apps, listener, passed)
            });
        let tunnel =
            tls::tunnel::Tunnel::start(data_rt.handle(), shared.secrets.clone(), lookup, internal)
                .context("starting the upstream TLS tunnel")?;
        let _ = shared.tunnel.set(tunnel);
    }

    let mut snap = loaded.snapshot;
    let mut store = loaded.ads.as_ref().map(|_| xds::store::Store::new(&snap));
    if let Some(store) = &mut store {
        // From the start the snapshot says xDS is not yet initialized (`/ready`).
        snap = store.snapshot();
    }

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
    // CONNECT reaches the router, which terminates it where a route says so (http/connect.rs)
    // and refuses it otherwise.
    h2_opts.allow_connect_method_proxying = true;
    h2.server_options = Some(h2_opts);
    let apps = Arc::new(Apps {
        shared: shared.clone(),
        h1,
        h2: Arc::new(h2),
    });
    let _ = shared.apps.set(Arc::downgrade(&apps));

    let (shutdown, _shutdown_rx) = watch::channel(false);
    let manager = Arc::new(listener::Manager::new(
        apps.clone(),
        data_rt.handle().clone(),
    ));
    let failures = publish(&shared, &manager, data_rt.handle(), snap);
    if let Some((name, why)) = failures.into_iter().next() {
        anyhow::bail!("listener '{name}': {why}");
    }
    let bound = manager.bound();
    if let (Some(settings), Some(store)) = (loaded.ads, store) {
        let (shared2, manager2, rt) = (shared.clone(), manager.clone(), data_rt.handle().clone());
        let publish: xds::ads::Publish =
            Arc::new(move |snap| publish(&shared2, &manager2, &rt, snap));
        let counters = xds::ads::UpdateCounters::register(&shared.stats);
        admin_rt.spawn(
            xds::ads::AdsClient::new(settings, store, publish)
                .with_counters(counters)
                .run(),
        );
    }
    if let Some((cluster, node)) = loaded.sds {
        admin_rt.spawn(xds::sds::run(
            cluster,
            node,
            shared.secrets.clone(),
            shared.secret_names.subscribe(),
        ));
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
            manager: Some(manager.clone()),
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
        manager,
        admin: admin_addr,
        shared,
        shutdown,
        quit: quit_rx,
        _quit_tx: quit_tx,
        data_rt: Some(data_rt),
        admin_rt: Some(admin_rt),
    })
}
