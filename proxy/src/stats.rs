// SPDX-License-Identifier: Apache-2.0
//! Counters with Envoy's names, owned by the proxy instance (no globals). Runtime state: kept across
//! configuration swaps by stat prefix / cluster name.

use arcstr::ArcStr;
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// +1
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// +n
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// current value
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// `http.<stat_prefix>.*`
#[derive(Debug, Default)]
pub struct HttpStats {
    /// downstream_rq_total
    pub rq_total: Counter,
    /// downstream_rq_1xx..5xx
    pub rq_class: [Counter; 5],
    /// no_route
    pub no_route: Counter,
    /// no_cluster
    pub no_cluster: Counter,
    /// `fault.*`: present once a fault filter served a request on this prefix
    pub fault: FaultStats,
}

/// `http.<stat_prefix>.fault.*`
#[derive(Debug, Default)]
pub struct FaultStats {
    /// a fault filter is configured (the stats are shown)
    pub enabled: std::sync::atomic::AtomicBool,
    /// delays_injected
    pub delays_injected: Counter,
    /// aborts_injected
    pub aborts_injected: Counter,
    /// faults_overflow
    pub faults_overflow: Counter,
    /// response_rl_injected
    pub response_rl_injected: Counter,
    /// active_faults (gauge)
    pub active_faults: Gauge,
}

/// A gauge that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// +1
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// -1
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// current value
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// `cluster.<name>.*`
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// upstream_rq_total
    pub rq_total: Counter,
    /// upstream_rq_1xx..5xx
    pub rq_class: [Counter; 5],
    /// upstream_cx_connect_fail
    pub cx_connect_fail: Counter,
    /// upstream_rq_retry
    pub rq_retry: Counter,
    /// upstream_rq_timeout
    pub rq_timeout: Counter,
    /// upstream_cx_none_healthy
    pub none_healthy: Counter,
    /// upstream_rq_pending_overflow
    pub rq_pending_overflow: Counter,
    /// upstream_rq_active_overflow
    pub rq_active_overflow: Counter,
    /// upstream_cx_overflow
    pub cx_overflow: Counter,
    /// upstream_rq_retry_overflow
    pub rq_retry_overflow: Counter,
    /// upstream_rq_retry_limit_exceeded
    pub rq_retry_limit_exceeded: Counter,
    /// upstream_rq_retry_success
    pub rq_retry_success: Counter,
    /// upstream_rq_retry_backoff_ratelimited
    pub rq_retry_backoff_ratelimited: Counter,
    /// upstream_rq_per_try_timeout
    pub rq_per_try_timeout: Counter,
    /// upstream_rq_per_try_idle_timeout
    pub rq_per_try_idle_timeout: Counter,
    /// upstream_cx_total (connections established: tcp_proxy, CONNECT, new HTTP connections)
    pub cx_total: Counter,
    /// upstream_cx_rx_bytes_total (tcp_proxy and CONNECT connections only)
    pub cx_rx_bytes: Counter,
    /// upstream_cx_tx_bytes_total (tcp_proxy and CONNECT connections only)
    pub cx_tx_bytes: Counter,
    /// bytes are counted for this cluster (it carried a tcp_proxy or CONNECT connection)
    pub bytes_counted: std::sync::atomic::AtomicBool,
}

/// `tcp.<stat_prefix>.*`
#[derive(Debug, Default)]
pub struct TcpStats {
    /// downstream_cx_total
    pub cx_total: Counter,
    /// upstream_flush_total (connections closed)
    pub cx_closed: Counter,
    /// downstream_cx_rx_bytes_total
    pub rx_bytes: Counter,
    /// downstream_cx_tx_bytes_total
    pub tx_bytes: Counter,
    /// idle_timeout
    pub idle_timeout: Counter,
    /// downstream_cx_no_route (the cluster does not exist)
    pub no_route: Counter,
}

/// `listener.<stat_prefix>.*` (Envoy's per-listener connection stats).
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// downstream_cx_total
    pub cx_total: Counter,
    /// downstream_cx_destroy
    pub cx_destroy: Counter,
    /// downstream_cx_active (gauge)
    pub cx_active: Gauge,
}

/// Holds one `downstream_cx_active` for the life of a connection.
#[derive(Debug)]
pub struct ActiveConnection(Arc<ListenerStats>);

impl ActiveConnection {
    /// Counts a new connection on `stats`.
    pub fn new(stats: Arc<ListenerStats>) -> Self {
        stats.cx_total.inc();
        stats.cx_active.inc();
        ActiveConnection(stats)
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.cx_active.dec();
        self.0.cx_destroy.inc();
    }
}

/// Whether an Envoy stat of this name is a gauge (shown as `# TYPE … gauge` in Prometheus output).
pub fn is_gauge(name: &str) -> bool {
    name.ends_with("_active")
        || name.ends_with(".active_faults")
        || name.ends_with("_open")
        || name.contains(".remaining_")
        || matches!(name, "server.state" | "listener_manager.workers_started")
}

/// Registry. Lookups take a read lock at connection/config time only; request paths hold `Arc`s.
#[derive(Debug, Default)]
pub struct Stats {
    http: RwLock<BTreeMap<ArcStr, Arc<HttpStats>>>,
    cluster: RwLock<BTreeMap<ArcStr, Arc<ClusterStats>>>,
    tcp: RwLock<BTreeMap<ArcStr, Arc<TcpStats>>>,
    listener: RwLock<BTreeMap<ArcStr, Arc<ListenerStats>>>,
    /// Counters of filters with configurable names (RBAC …), by full name.
    named: RwLock<BTreeMap<ArcStr, Arc<Counter>>>,
}

fn get_or_insert<T: Default>(map: &RwLock<BTreeMap<ArcStr, Arc<T>>>, key: &ArcStr) -> Arc<T> {
    if let Some(v) = map.read().get(key) {
        return v.clone();
    }
    map.write().entry(key.clone()).or_default().clone()
}

/// Index of a status class counter (1xx → 0 … 5xx → 4).
pub fn class_index(status: u16) -> Option<usize> {
    matches!(status, 100..=599).then(|| usize::from(status / 100 - 1))
}

impl Stats {
    /// HCM counters for a stat prefix.
    pub fn http(&self, prefix: &ArcStr) -> Arc<HttpStats> {
        get_or_insert(&self.http, prefix)
    }
    /// Cluster counters.
    pub fn cluster(&self, name: &ArcStr) -> Arc<ClusterStats> {
        get_or_insert(&self.cluster, name)
    }
    /// tcp_proxy counters.
    pub fn tcp(&self, prefix: &ArcStr) -> Arc<TcpStats> {
        get_or_insert(&self.tcp, prefix)
    }

    /// Connection stats of a listener (`listener.<prefix>.*`).
    pub fn listener(&self, prefix: &ArcStr) -> Arc<ListenerStats> {
        get_or_insert(&self.listener, prefix)
    }

    /// A counter by its full Envoy name (resolve once, keep the `Arc`).
    pub fn counter(&self, name: &str) -> Arc<Counter> {
        get_or_insert(&self.named, &ArcStr::from(name))
    }

    /// All counters as (name, value), sorted by name, in Envoy's naming.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (p, s) in self.http.read().iter() {
            out.push((format!("http.{p}.downstream_rq_total"), s.rq_total.get()));
            for (i, c) in s.rq_class.iter().enumerate() {
                out.push((format!("http.{p}.downstream_rq_{}xx", i + 1), c.get()));
            }
            out.push((format!("http.{p}.no_route"), s.no_route.get()));
            out.push((format!("http.{p}.no_cluster"), s.no_cluster.get()));
            if s.fault.enabled.load(Ordering::Relaxed) {
                let f = &s.fault;
                out.push((
                    format!("http.{p}.fault.aborts_injected"),
                    f.aborts_injected.get(),
                ));
                out.push((
                    format!("http.{p}.fault.delays_injected"),
                    f.delays_injected.get(),
                ));
                out.push((
                    format!("http.{p}.fault.faults_overflow"),
                    f.faults_overflow.get(),
                ));
                out.push((
                    format!("http.{p}.fault.active_faults"),
                    f.active_faults.get(),
                ));
                out.push((
                    format!("http.{p}.fault.response_rl_injected"),
                    f.response_rl_injected.get(),
                ));
            }
        }
        for (n, s) in self.cluster.read().iter() {
            out.push((format!("cluster.{n}.upstream_rq_total"), s.rq_total.get()));
            for (i, c) in s.rq_class.iter().enumerate() {
                out.push((format!("cluster.{n}.upstream_rq_{}xx", i + 1), c.get()));
            }
            out.push((
                format!("cluster.{n}.upstream_cx_connect_fail"),
                s.cx_connect_fail.get(),
            ));
            out.push((format!("cluster.{n}.upstream_cx_total"), s.cx_total.get()));
            // HTTP upstream bytes are not counted: no line rather than a wrong zero.
            if s.bytes_counted.load(std::sync::atomic::Ordering::Relaxed) {
                out.push((
                    format!("cluster.{n}.upstream_cx_rx_bytes_total"),
                    s.cx_rx_bytes.get(),
                ));
                out.push((
                    format!("cluster.{n}.upstream_cx_tx_bytes_total"),
                    s.cx_tx_bytes.get(),
                ));
            }
            out.push((format!("cluster.{n}.upstream_rq_retry"), s.rq_retry.get()));
            out.push((
                format!("cluster.{n}.upstream_rq_timeout"),
                s.rq_timeout.get(),
            ));
            out.push((
                format!("cluster.{n}.upstream_cx_none_healthy"),
                s.none_healthy.get(),
            ));
            out.push((
                format!("cluster.{n}.upstream_rq_pending_overflow"),
                s.rq_pending_overflow.get(),
            ));
            out.push((
                format!("cluster.{n}.upstream_rq_active_overflow"),
                s.rq_active_overflow.get(),
            ));
            out.push((
                format!("cluster.{n}.upstream_cx_overflow"),
                s.cx_overflow.get(),
            ));
            out.push((
                format!("cluster.{n}.upstream_rq_retry_overflow"),
                s.rq_retry_overflow.get(),
            ));
            out.push((
                format!("cluster.{n}.upstream_rq_retry_limit_exceeded"),
                s.rq_retry_limit_exceeded.get(),
            ));
            out.push((
                format!("cluster.{n}.upstream_rq_retry_success"),
                s.rq_retry_success.get(),
            ));
            // Every retry waits a jittered exponential back-off, unless a reset header gave one.
            let ratelimited = s.rq_retry_backoff_ratelimited.get();
            out.push((
                format!("cluster.{n}.upstream_rq_retry_backoff_exponential"),
                s.rq_retry.get().saturating_sub(ratelimited),
            ));
            out.push((
                format!("cluster.{n}.upstream_rq_retry_backoff_ratelimited"),
                ratelimited,
            ));
            out.push((
                format!("cluster.{n}.upstream_rq_per_try_timeout"),
                s.rq_per_try_timeout.get(),
            ));
            out.push((
                format!("cluster.{n}.upstream_rq_per_try_idle_timeout"),
                s.rq_per_try_idle_timeout.get(),
            ));
        }
        for (p, s) in self.tcp.read().iter() {
            out.push((format!("tcp.{p}.downstream_cx_total"), s.cx_total.get()));
            out.push((
                format!("tcp.{p}.downstream_cx_rx_bytes_total"),
                s.rx_bytes.get(),
            ));
            out.push((
                format!("tcp.{p}.downstream_cx_tx_bytes_total"),
                s.tx_bytes.get(),
            ));
            out.push((format!("tcp.{p}.idle_timeout"), s.idle_timeout.get()));
            out.push((format!("tcp.{p}.downstream_cx_no_route"), s.no_route.get()));
        }
        for (p, s) in self.listener.read().iter() {
            out.push((
                format!("listener.{p}.downstream_cx_total"),
                s.cx_total.get(),
            ));
            out.push((
                format!("listener.{p}.downstream_cx_destroy"),
                s.cx_destroy.get(),
            ));
            out.push((
                format!("listener.{p}.downstream_cx_active"),
                s.cx_active.get(),
            ));
        }
        for (n, c) in self.named.read().iter() {
            out.push((n.to_string(), c.get()));
        }
        out.sort();
        out
    }
}
