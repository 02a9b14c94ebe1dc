// SPDX-License-Identifier: Apache-2.0
//! pilot-agent's status server (`:15020`): `/healthz/ready`, merged `/stats/prometheus` (also
//! `/metrics`), `POST /quitquitquit`, `POST /drain`, `/app-health/<container>/{livez,readyz,
//! startupz}` and `/app-lifecycle/<container>/{prestopz,poststartz}`.
//!
//! Kubelet reaches `/healthz/ready` through the proxy's 15021 health listener (Istio's bootstrap
//! routes it to the `agent` cluster, this server).

pub mod client;
pub mod metrics;
pub mod probe;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::lifecycle::Lifecycle;
use client::Call;

/// ISTIO_PROMETHEUS_ANNOTATIONS: where the app's own metrics are.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct PrometheusScrape {
    #[serde(default)]
    pub scrape: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub port: String,
    /// `prometheus.istio.io/scrape-targets`: several endpoints (port, path).
    #[serde(default)]
    pub targets: Vec<ScrapeTarget>,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ScrapeTarget {
    #[serde(default)]
    pub port: String,
    #[serde(default)]
    pub path: String,
}

/// A status server configuration problem (reported at start).
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("ISTIO_PROMETHEUS_ANNOTATIONS is not valid JSON: {0}")]
    Annotations(String),
    #[error(
        "invalid prometheus scrape configuration: application port {0} is the agent's status port (recursive scrape); check the pod's prometheus.io/port"
    )]
    RecursiveScrape(u16),
    #[error("ISTIO_PROMETHEUS_ANNOTATIONS: port '{0}' is not a number")]
    Port(String),
    #[error(transparent)]
    Probers(#[from] probe::ProberError),
    #[error("status server: binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything the status server needs, with pilot-agent's defaults in [`StatusConfig::new`].
#[derive(Debug, Clone)]
pub struct StatusConfig {
    /// where to listen (`:15020`)
    pub listen: SocketAddr,
    /// the proxy's admin (`localhost:15000`): readiness stats
    pub proxy_admin: SocketAddr,
    /// the proxy's Prometheus endpoint (`localhost:15090`)
    pub proxy_prometheus: SocketAddr,
    /// ISTIO_KUBE_APP_PROBERS (raw JSON; empty = none)
    pub app_probers: String,
    /// ISTIO_PROMETHEUS_ANNOTATIONS (raw JSON; None = unset)
    pub prometheus_annotations: Option<String>,
    /// the pod IP app probes go to (None: localhost)
    pub pod_ip: Option<IpAddr>,
    /// the source address of app probes (127.0.0.6)
    pub probe_source: Option<IpAddr>,
    /// the app's metrics host (localhost)
    pub app_host: IpAddr,
    /// whether a proxy runs (false: readiness has no proxy check, metrics no proxy part)
    pub with_proxy: bool,
}

impl StatusConfig {
    /// pilot-agent's defaults: status on 0.0.0.0:15020, admin 127.0.0.1:15000, Prometheus
    /// 127.0.0.1:15090, probes from 127.0.0.6.
    pub fn new() -> Self {
        let lo = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        StatusConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 15020)),
            proxy_admin: SocketAddr::new(lo, 15000),
            proxy_prometheus: SocketAddr::new(lo, 15090),
            app_probers: String::new(),
            prometheus_annotations: None,
            pod_ip: None,
            probe_source: Some(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 6))),
            app_host: lo,
            with_proxy: true,
        }
    }
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Called by `POST /drain` (native-sidecar preStop): drain the proxy without exiting.
pub type DrainHook = Arc<dyn Fn() + Send + Sync>;

/// pilot-agent's readiness: the proxy has applied its first CDS and LDS (latched), and its server
/// is LIVE with workers started (latched once seen).
#[derive(Debug)]
pub struct Readiness {
    admin: SocketAddr,
    first_update: AtomicBool,
    once_ready: AtomicBool,
    started: Instant,
    startup_seconds: AtomicU64,
}

fn stat_value(body: &str, name: &str) -> Option<u64> {
    body.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// `%`-encodes a query value.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Readiness {
    pub fn new(admin: SocketAddr) -> Self {
        Readiness {
            admin,
            first_update: AtomicBool::new(false),
            once_ready: AtomicBool::new(false),
            started: Instant::now(),
            startup_seconds: AtomicU64::new(0),
        }
    }

    async fn stats(&self, filter: &str) -> Result<String, String> {
        let target = format!("/stats?usedonly&filter={}", encode(filter));
        let r = Call::get(self.admin, target)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!("proxy admin answered {}", r.status));
        }
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// `Ok` when ready; otherwise why not.
    pub async fn check(&self) -> Result<(), String> {
        if !self.first_update.load(Ordering::Relaxed) {
            let s = self
                .stats(r"^(cluster_manager\.cds|listener_manager\.lds)\.(update_success|update_rejected)$")
                .await?;
            let cds = stat_value(&s, "cluster_manager.cds.update_success").unwrap_or(0);
            let lds = stat_value(&s, "listener_manager.lds.update_success").unwrap_or(0);
            if cds == 0 || lds == 0 {
                return Err(format!(
                    "config not received from XDS server (is Istiod running?): cds updates: {cds} successful, {} rejected; lds updates: {lds} successful, {} rejected",
                    stat_value(&s, "cluster_manager.cds.update_rejected").unwrap_or(0),
                    stat_value(&s, "listener_manager.lds.update_rejected").unwrap_or(0),
                ));
            }
            self.first_update.store(true, Ordering::Relaxed);
        }
        if !self.once_ready.load(Ordering::Relaxed) {
            let s = self
                .stats(r"^(server\.state|listener_manager\.workers_started)")
                .await?;
            let state = stat_value(&s, "server.state")
                .ok_or_else(|| format!("server.state is not yet updated: {s}"))?;
            let workers = stat_value(&s, "listener_manager.workers_started").ok_or_else(|| {
                format!("listener_manager.workers_started is not yet updated: {s}")
            })?;
            if state != 0 {
                let name = match state {
                    1 => "DRAINING",
                    2 => "PRE_INITIALIZING",
                    3 => "INITIALIZING",
                    _ => "UNKNOWN",
                };
                return Err(format!("server is not live, current state is: {name}"));
            }
            if workers != 1 {
                return Err("workers have not yet started".into());
            }
            if !self.once_ready.swap(true, Ordering::Relaxed) {
                let secs = self.started.elapsed().as_secs_f64();
                self.startup_seconds
                    .store(secs.to_bits(), Ordering::Relaxed);
                tracing::info!("readiness succeeded in {secs:.3}s");
            }
        }
        Ok(())
    }
}

/// The agent's own metrics (pilot-agent's `istio_agent_*`).
#[derive(Debug, Default)]
struct AgentMetrics {
    scrapes: AtomicU64,
    envoy_errors: AtomicU64,
    app_errors: AtomicU64,
}

/// A running status server.
pub struct StatusServer {
    cfg: StatusConfig,
    probers: probe::AppProbers,
    scrape: Option<Vec<(u16, String)>>,
    readiness: Option<Readiness>,
    lifecycle: Lifecycle,
    drain: Option<DrainHook>,
    metrics: AgentMetrics,
    last_ready: AtomicBool,
    port: u16,
}

impl StatusServer {
    /// Validates the configuration (probers, annotations) and binds the port.
    pub async fn bind(
        cfg: StatusConfig,
        lifecycle: Lifecycle,
        drain: Option<DrainHook>,
    ) -> Result<(Arc<Self>, TcpListener), StatusError> {
        let probers = probe::AppProbers::parse(&cfg.app_probers, cfg.pod_ip, cfg.probe_source)?;
        let scrape = match &cfg.prometheus_annotations {
            None => None,
            Some(json) => {
                let p: PrometheusScrape = serde_json::from_str(json)
                    .map_err(|e| StatusError::Annotations(e.to_string()))?;
                if p.scrape == "false" {
                    None
                } else {
                    let mut targets: Vec<(String, String)> = p
                        .targets
                        .iter()
                        .map(|t| (t.port.clone(), t.path.clone()))
                        .collect();
                    if targets.is_empty() {
                        targets.push((p.port.clone(), p.path.clone()));
                    }
                    let mut out = Vec::new();
                    for (port, path) in targets {
                        let port = if port.is_empty() { "80".into() } else { port };
                        let path = if path.is_empty() {
                            "/metrics".into()
                        } else {
                            path
                        };
                        let n: u16 = port.parse().map_err(|_| StatusError::Port(port.clone()))?;
                        if n == cfg.listen.port() {
                            return Err(StatusError::RecursiveScrape(n));
                        }
                        out.push((n, path));
                    }
                    Some(out)
                }
            }
        };
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| StatusError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let port = listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(cfg.listen.port());
        let readiness = cfg.with_proxy.then(|| Readiness::new(cfg.proxy_admin));
        Ok((
            Arc::new(StatusServer {
                cfg,
                probers,
                scrape,
                readiness,
                lifecycle,
                drain,
                metrics: AgentMetrics::default(),
                last_ready: AtomicBool::new(false),
                port,
            }),
            listener,
        ))
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until the lifecycle says Stopping.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let mut phase = self.lifecycle.subscribe();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = phase.wait_for(|p| matches!(p, crate::lifecycle::Phase::Stopping { .. })) => return,
            };
            let (tcp, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("status server accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                // `/quitquitquit` stops the lifecycle once its answer is written (the process may
                // exit right after).
                let quit = Arc::new(AtomicBool::new(false));
                let (me2, quit2) = (me.clone(), quit.clone());
                let svc = hyper::service::service_fn(move |req| {
                    let (me, quit) = (me2.clone(), quit2.clone());
                    async move { Ok::<_, Infallible>(me.handle(req, remote, &quit).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
                if quit.load(Ordering::SeqCst) {
                    me.lifecycle.stop(0);
                }
            });
        }
    }

    async fn handle(
        &self,
        req: http::Request<Incoming>,
        remote: SocketAddr,
        quit: &AtomicBool,
    ) -> http::Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let local_only = |f: &dyn Fn() -> http::Response<Full<Bytes>>| {
            if !remote.ip().is_loopback() {
                return reply(403, "Only requests from localhost are allowed\n");
            }
            if req.method() != http::Method::POST {
                return reply(405, "Method Not Allowed\n");
            }
            f()
        };
        match path.as_str() {
            "/healthz/ready" => self.ready().await,
            "/stats/prometheus" | "/metrics" => self.stats(&req).await,
            "/quitquitquit" => local_only(&|| {
                tracing::info!("/quitquitquit called; stopping the proxy and the agent");
                quit.store(true, Ordering::SeqCst);
                let mut r = reply(200, "OK");
                r.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                r
            }),
            "/drain" => local_only(&|| {
                tracing::info!("/drain called; draining the proxy");
                if let Some(d) = &self.drain {
                    d();
                }
                reply(200, "OK")
            }),
            p if p.starts_with("/app-health/") || p.starts_with("/app-lifecycle/") => {
                let host = req
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok());
                match self.probers.run(p, host, self.port, req.headers()).await {
                    Some((status, body)) => {
                        let mut r = http::Response::new(Full::new(body));
                        *r.status_mut() =
                            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
                        r
                    }
                    None => {
                        tracing::error!("prober does not exist: {p}");
                        reply(400, &format!("app prober config does not exists for {p}"))
                    }
                }
            }
            _ => reply(404, "404 page not found\n"),
        }
    }

    async fn ready(&self) -> http::Response<Full<Bytes>> {
        let result = match &self.readiness {
            Some(r) => r.check().await,
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                if !self.last_ready.swap(true, Ordering::Relaxed) {
                    tracing::info!("proxy is ready");
                }
                reply(200, "")
            }
            Err(e) => {
                self.last_ready.store(false, Ordering::Relaxed);
                tracing::warn!("proxy is NOT ready: {e}");
                reply(503, "")
            }
        }
    }

    async fn stats(&self, req: &http::Request<Incoming>) -> http::Response<Full<Bytes>> {
        self.metrics.scrapes.fetch_add(1, Ordering::Relaxed);
        // Prometheus' headers are passed on; its scrape timeout bounds our scrapes.
        let pass: Vec<(http::HeaderName, http::HeaderValue)> = [
            "accept",
            "user-agent",
            "x-prometheus-scrape-timeout-seconds",
        ]
        .iter()
        .filter_map(|h| {
            let v = req.headers().get(*h)?.clone();
            Some((http::HeaderName::from_static(h), v))
        })
        .collect();
        let timeout = req
            .headers()
            .get("x-prometheus-scrape-timeout-seconds")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v > 0.0)
            .map(Duration::from_secs_f64)
            .or(Some(Duration::from_secs(10)));
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let fetch = |addr: SocketAddr, target: String| {
            let mut c = Call::get(addr, target);
            c.headers = pass.clone();
            c.timeout = timeout;
            async move {
                match c.send().await {
                    Ok(r) if r.status == 200 => {
                        let ct = r
                            .headers
                            .get(http::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        Ok((String::from_utf8_lossy(&r.body).into_owned(), ct))
                    }
                    Ok(r) => Err(format!("status code {}", r.status)),
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        let envoy_fut = async {
            if !self.cfg.with_proxy {
                return None;
            }
            match fetch(
                self.cfg.proxy_prometheus,
                format!("/stats/prometheus{query}"),
            )
            .await
            {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::error!("failed scraping envoy metrics: {e}");
                    self.metrics.envoy_errors.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        };
        let app_fut = async {
            let mut out = Vec::new();
            for (port, path) in self.scrape.iter().flatten() {
                match fetch(SocketAddr::new(self.cfg.app_host, *port), path.clone()).await {
                    Ok(b) => out.push(b),
                    Err(e) => {
                        tracing::error!("failed scraping application metrics: {e}");
                        self.metrics.app_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            out
        };
        let (envoy, apps) = tokio::join!(envoy_fut, app_fut);
        // The answer takes the app's format; targets that disagree make it text.
        let mut format = None;
        for (_, ct) in &apps {
            let f = metrics::negotiate(ct);
            format = match format {
                None => Some(f),
                Some(prev) if prev == f => Some(f),
                Some(_) => Some(metrics::TEXT),
            };
        }
        let format = format.unwrap_or(metrics::TEXT);
        let agent = self.agent_metrics();
        let mut sources: Vec<(&str, &str)> = vec![(agent.as_str(), metrics::TEXT)];
        if let Some((body, ct)) = &envoy {
            sources.push((body.as_str(), metrics::negotiate(ct)));
        }
        for (body, ct) in &apps {
            sources.push((body.as_str(), metrics::negotiate(ct)));
        }
        let body = metrics::merge(&sources, format);
        let mut r = http::Response::new(Full::new(Bytes::from(body)));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(format),
        );
        r
    }

    fn agent_metrics(&self) -> String {
        let m = &self.metrics;
        let mut s = String::new();
        s.push_str("# HELP istio_agent_scrapes_total The total number of scrapes.\n# TYPE istio_agent_scrapes_total counter\n");
        s.push_str(&format!(
            "istio_agent_scrapes_total {}\n",
            m.scrapes.load(Ordering::Relaxed)
        ));
        s.push_str("# HELP istio_agent_scrape_failures_total The total number of failed scrapes.\n# TYPE istio_agent_scrape_failures_total counter\n");
        for (t, v) in [
            ("agent", 0),
            ("application", m.app_errors.load(Ordering::Relaxed)),
            ("envoy", m.envoy_errors.load(Ordering::Relaxed)),
        ] {
            s.push_str(&format!(
                "istio_agent_scrape_failures_total{{type=\"{t}\"}} {v}\n"
            ));
        }
        if let Some(r) = &self.readiness
            && r.once_ready.load(Ordering::Relaxed)
        {
            let secs = f64::from_bits(r.startup_seconds.load(Ordering::Relaxed));
            s.push_str("# HELP istio_agent_startup_duration_seconds The time from the process starting to being marked ready.\n# TYPE istio_agent_startup_duration_seconds gauge\n");
            s.push_str(&format!("istio_agent_startup_duration_seconds {secs}\n"));
        }
        s.push_str(&process_metrics());
        s
    }
}

/// `istio_agent_process_*` from /proc/self (Prometheus' process collector's names).
fn process_metrics() -> String {
    let mut s = String::new();
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return s;
    };
    // Fields after the parenthesised command name.
    let Some((_, after)) = stat.rsplit_once(')') else {
        return s;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // field 14 utime, 15 stime (1-based incl. pid, comm); here index = field - 3.
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as f64;
    let cpu = (num(11) + num(12)) / ticks;
    let vsize = num(20);
    let rss = num(21) * page;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("btime ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0);
    let start = boot + num(19) / ticks;
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft as f64)
        .unwrap_or(0.0);
    for (name, kind, help, v) in [
        (
            "cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            cpu,
        ),
        (
            "max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max_fds,
        ),
        (
            "open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds as f64,
        ),
        (
            "resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss,
        ),
        (
            "start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            start,
        ),
        (
            "virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            vsize,
        ),
    ] {
        s.push_str(&format!(
            "# HELP istio_agent_process_{name} {help}\n# TYPE istio_agent_process_{name} {kind}\nistio_agent_process_{name} {v}\n"
        ));
    }
    s
}

fn reply(status: u16, body: &str) -> http::Response<Full<Bytes>> {
    let mut r = http::Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if !body.is_empty() {
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    r
}
