// SPDX-License-Identifier: Apache-2.0
//! The admin listener (Envoy's `admin.address`, 15000 in Istio): `/ready`, `/config_dump`, `/clusters`,
//! `/stats`, `/stats/prometheus`, `/logging`, `/quitquitquit`. It runs on its own runtime, away from the
//! data plane.

use crate::Shared;
use crate::xds::json::dynamic_to_json;
use envoy_types::pb::envoy::admin::v3 as admin;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::google::protobuf::{Any, Timestamp};
use prost::{Message, Name};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Changes log levels at runtime (`/logging`); provided by the binary's tracing setup.
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the admin server needs.
pub struct Admin {
    /// proxy state
    pub shared: Arc<Shared>,
    /// `/quitquitquit` trigger
    pub quit: Arc<tokio::sync::watch::Sender<bool>>,
    /// `/logging`
    pub log_control: Option<LogControl>,
    /// the listeners (`/drain_listeners`)
    pub manager: Option<Arc<crate::listener::Manager>>,
}

/// Serves admin requests until the process ends.
pub async fn serve(admin: Arc<Admin>, socket: TcpListener) {
    loop {
        let stream = match socket.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("admin accept failed: {e}");
                pingora_timeout::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _ = handle(&admin, stream).await;
        });
    }
}

async fn handle(admin: &Admin, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (method, target) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or("GET").to_string(),
                    req.path.unwrap_or("/").to_string(),
                );
            }
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => continue,
            _ => {
                respond(&mut stream, 400, "text/plain", b"bad request\n").await?;
                return Ok(());
            }
        }
    };
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let (status, ctype, body) = route(admin, &method, path, query);
    respond(&mut stream, status, ctype, body.as_bytes()).await?;
    if path == "/quitquitquit" && method == "POST" {
        admin.quit.send_replace(true);
    }
    Ok(())
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\ncache-control: no-cache, max-age=0\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

fn route(admin: &Admin, method: &str, path: &str, query: &str) -> (u16, &'static str, String) {
    let mutating = matches!(
        path,
        "/quitquitquit" | "/logging" | "/drain_listeners" | "/healthcheck/fail" | "/healthcheck/ok"
    );
    if mutating && method != "POST" && !(path == "/logging" && query.is_empty()) {
        return (405, "text/plain", "This endpoint requires POST\n".into());
    }
    match path {
        "/ready" => {
            if *admin.quit.borrow() {
                (503, "text/plain", "DRAINING\n".into())
            } else if admin
                .shared
                .snapshot
                .load()
                .xds
                .as_ref()
                .is_some_and(|x| !x.initialized)
            {
                (503, "text/plain", "INITIALIZING\n".into())
            } else {
                (200, "text/plain", "LIVE\n".into())
            }
        }
        "/config_dump" => (
            200,
            "application/json",
            config_dump(&admin.shared, query.split('&').any(|q| q == "include_eds")),
        ),
        "/clusters" => (200, "text/plain", clusters(&admin.shared)),
        "/stats" => {
            let mut s = String::new();
            // `filter=REGEX` keeps the stats whose name the regex finds a match in.
            let filter = query
                .split('&')
                .find_map(|q| q.strip_prefix("filter="))
                .map(percent_decode);
            let filter = match filter.map(|f| regex::Regex::new(&f)) {
                Some(Ok(r)) => Some(r),
                Some(Err(e)) => return (400, "text/plain", format!("Invalid regex: {e}\n")),
                None => None,
            };
            for (k, v) in all_stats(&admin.shared) {
                if filter.as_ref().is_some_and(|r| !r.is_match(&k)) {
                    continue;
                }
                let _ = writeln!(s, "{k}: {v}");
            }
            (200, "text/plain", s)
        }
        "/stats/prometheus" => (200, "text/plain; version=0.0.4", prometheus(&admin.shared)),
        "/logging" => logging(admin, query),
        "/quitquitquit" => (200, "text/plain", "OK\n".into()),
        "/drain_listeners" => drain_listeners(admin, query),
        "/server_info" => {
            let v = serde_json::json!({
                "version": concat!("pingsail/", env!("CARGO_PKG_VERSION")),
                "state": if *admin.quit.borrow() { "DRAINING" } else { "LIVE" },
            });
            (200, "application/json", v.to_string())
        }
        _ => (404, "text/plain", "invalid path. admin commands are: /clusters /config_dump /logging /quitquitquit /ready /server_info /stats /stats/prometheus\n".into()),
    }
}

/// `POST /drain_listeners[?inboundonly][&graceful][&skip_exit]`, Envoy's semantics (see
/// [`crate::listener::Manager::drain_listeners`]).
fn drain_listeners(admin: &Admin, query: &str) -> (u16, &'static str, String) {
    let mut inbound_only = false;
    let mut graceful = false;
    let mut skip_exit = false;
    for kv in query.split('&').filter(|q| !q.is_empty()) {
        match kv.split_once('=').map_or(kv, |(k, _)| k) {
            "inboundonly" => inbound_only = true,
            "graceful" => graceful = true,
            "skip_exit" => skip_exit = true,
            other => {
                return (
                    400,
                    "text/plain",
                    format!(
                        "drain_listeners: unknown parameter '{other}' (inboundonly, graceful, skip_exit)\n"
                    ),
                );
            }
        }
    }
    if skip_exit && !graceful {
        return (
            400,
            "text/plain",
            "drain_listeners: skip_exit requires graceful\n".into(),
        );
    }
    if let Some(m) = &admin.manager {
        let n = m.drain_listeners(inbound_only, graceful, skip_exit, admin.shared.drain_time);
        tracing::info!(
            inbound_only,
            graceful,
            skip_exit,
            listeners = n,
            "draining listeners"
        );
    }
    (200, "text/plain", "OK\n".into())
}

fn logging(admin: &Admin, query: &str) -> (u16, &'static str, String) {
    if query.is_empty() {
        return (200, "text/plain", "active loggers: use POST /logging?level=<trace|debug|info|warning|error|critical|off>\n".into());
    }
    let Some(control) = &admin.log_control else {
        return (
            400,
            "text/plain",
            "log levels are not controllable in this process\n".into(),
        );
    };
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let level = match v {
            "trace" | "debug" | "info" | "error" | "off" => v,
            "warning" | "warn" => "warn",
            "critical" => "error",
            _ => {
                return (
                    400,
                    "text/plain",
                    format!("error: unknown logger level '{v}'\n"),
                );
            }
        };
        let directive = if k == "level" || k == "paths" {
            level.to_string()
        } else {
            format!("{k}={level}")
        };
        if let Err(e) = control(&directive) {
            return (400, "text/plain", format!("error: {e}\n"));
        }
    }
    (200, "text/plain", "OK\n".into())
}

fn ts(t: SystemTime) -> Option<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    Some(Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// `/config_dump` in Envoy's shape (what `istioctl proxy-config` parses); EDS only with
/// `?include_eds`, as Envoy does.
pub fn config_dump(shared: &Shared, include_eds: bool) -> String {
    let schemas = crate::xds::pool::pool();
    let snap = shared.snapshot.load();
    let now = ts(SystemTime::now());
    let bootstrap = admin::BootstrapConfigDump {
        bootstrap: Some((*snap.bootstrap).clone()),
        last_updated: now,
    };
    let mut clusters = admin::ClustersConfigDump::default();
    let mut names: Vec<_> = snap.clusters.keys().collect();
    names.sort();
    let xds = snap.xds.clone().unwrap_or_default();
    let error_state = |type_url: &'static str, name: &str| {
        xds.errors
            .get(&(type_url, arcstr::ArcStr::from(name)))
            .map(|f| admin::UpdateFailureState {
                failed_configuration: f.resource.clone(),
                last_update_attempt: ts(f.at),
                details: f.details.clone(),
                version_info: f.version.to_string(),
            })
    };
    use crate::xds::store::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
    clusters.version_info = xds
        .versions
        .get(CLUSTER)
        .map(|v| v.to_string())
        .unwrap_or_default();
    for n in names {
        let e = &snap.clusters[n];
        if e.dynamic {
            clusters
                .dynamic_active_clusters
                .push(admin::clusters_config_dump::DynamicCluster {
                    version_info: e.version.to_string(),
                    cluster: Some(any(&*e.proto)),
                    last_updated: ts(e.updated),
                    error_state: error_state(CLUSTER, n),
                    client_status: 0,
                });
        } else {
            clusters
                .static_clusters
                .push(admin::clusters_config_dump::StaticCluster {
                    cluster: Some(any(&*e.proto)),
                    last_updated: ts(e.updated),
                });
        }
    }
    for e in &xds.warming_clusters {
        clusters
            .dynamic_warming_clusters
            .push(admin::clusters_config_dump::DynamicCluster {
                version_info: e.version.to_string(),
                cluster: Some(any(&*e.proto)),
                last_updated: ts(e.updated),
                error_state: error_state(CLUSTER, &e.config.name),
                client_status: 0,
            });
    }
    let mut listeners = admin::ListenersConfigDump {
        version_info: xds
            .versions
            .get(LISTENER)
            .map(|v| v.to_string())
            .unwrap_or_default(),
        ..Default::default()
    };
    let mut routes = admin::RoutesConfigDump::default();
    {
        use admin::listeners_config_dump::{DynamicListener, DynamicListenerState};
        let state = |e: &crate::snapshot::ListenerEntry| DynamicListenerState {
            version_info: e.version.to_string(),
            listener: Some(any(&*e.proto)),
            last_updated: ts(e.updated),
        };
        let mut dynamic: std::collections::BTreeMap<String, DynamicListener> = Default::default();
        for e in snap.listeners.iter().filter(|e| e.dynamic) {
            let d = dynamic.entry(e.config.name.to_string()).or_default();
            d.active_state = Some(state(e));
        }
        for e in &xds.warming_listeners {
            let d = dynamic.entry(e.config.name.to_string()).or_default();
            d.warming_state = Some(state(e));
        }
        for ((t, name), _) in xds.errors.iter().filter(|((t, _), _)| *t == LISTENER) {
            let _ = t;
            dynamic.entry(name.to_string()).or_default();
        }
        for (name, mut d) in dynamic {
            d.error_state = error_state(LISTENER, &name);
            d.name = name;
            listeners.dynamic_listeners.push(d);
        }
    }
    let mut route_names: Vec<_> = snap.routes.keys().collect();
    route_names.sort();
    for n in route_names {
        let r = &snap.routes[n];
        routes
            .dynamic_route_configs
            .push(admin::routes_config_dump::DynamicRouteConfig {
                version_info: r.version.to_string(),
                route_config: Some(any(&*r.proto)),
                last_updated: ts(r.updated),
                error_state: error_state(ROUTE, n),
                client_status: 0,
            });
    }
    let mut endpoints = admin::EndpointsConfigDump::default();
    if include_eds {
        let mut names: Vec<_> = snap.endpoints.keys().collect();
        names.sort();
        for n in names {
            let e = &snap.endpoints[n];
            endpoints.dynamic_endpoint_configs.push(
                admin::endpoints_config_dump::DynamicEndpointConfig {
                    version_info: e.version.to_string(),
                    endpoint_config: Some(any(&*e.proto)),
                    last_updated: ts(e.updated),
                    error_state: error_state(ENDPOINT, n),
                    client_status: 0,
                },
            );
        }
    }
    let mut secrets = admin::SecretsConfigDump::default();
    let mut secret_names: Vec<_> = xds.secrets.keys().collect();
    secret_names.sort();
    for n in secret_names {
        let (secret, version, at) = &xds.secrets[n];
        secrets
            .dynamic_active_secrets
            .push(admin::secrets_config_dump::DynamicSecret {
                name: n.to_string(),
                version_info: version.to_string(),
                last_updated: ts(*at),
                secret: Some(any(&redacted(secret))),
                error_state: None,
                client_status: 0,
            });
    }
    for e in snap.listeners.iter().filter(|e| !e.dynamic) {
        listeners
            .static_listeners
            .push(admin::listeners_config_dump::StaticListener {
                listener: Some(any(&*e.proto)),
                last_updated: ts(e.updated),
            });
        for fc in e
            .proto
            .filter_chains
            .iter()
            .chain(e.proto.default_filter_chain.iter())
        {
            for f in &fc.filters {
                use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
                let Some(ConfigType::TypedConfig(a)) = &f.config_type else {
                    continue;
                };
                if a.type_url != HttpConnectionManager::type_url() {
                    continue;
                }
                if let Ok(h) = HttpConnectionManager::decode(a.value.as_slice())
                    && let Some(RouteSpecifier::RouteConfig(rc)) = h.route_specifier
                {
                    routes.static_route_configs.push(
                        admin::routes_config_dump::StaticRouteConfig {
                            route_config: Some(any(&rc)),
                            last_updated: ts(e.updated),
                        },
                    );
                }
            }
        }
    }
    let dump = admin::ConfigDump {
        configs: vec![
            any(&bootstrap),
            any(&clusters),
            any(&listeners),
            any(&admin::ScopedRoutesConfigDump::default()),
            any(&routes),
            any(&secrets),
        ]
        .into_iter()
        .chain(include_eds.then(|| any(&endpoints)))
        .collect(),
    };
    let Some(desc) = schemas.get_message_by_name(&admin::ConfigDump::full_name()) else {
        return "{}".into();
    };
    match prost_reflect::DynamicMessage::decode(desc, dump.encode_to_vec().as_slice()) {
        Ok(d) => serde_json::to_string_pretty(&dynamic_to_json(&d)).unwrap_or_default(),
        Err(e) => format!("{{\"error\": \"{e}\"}}"),
    }
}

/// Envoy never shows private keys in a dump.
fn redacted(
    s: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret,
) -> envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type;
    let mut s = s.clone();
    if let Some(Type::TlsCertificate(c)) = &mut s.r#type
        && let Some(k) = &mut c.private_key
    {
        k.specifier = Some(Specifier::InlineString("[redacted]".into()));
    }
    s
}

/// The registry's counters plus the gauges and counters kept in cluster runtime state (circuit
/// breakers, outlier detection), sorted by name.
fn all_stats(shared: &Shared) -> Vec<(String, u64)> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = shared.stats.counters();
    // Server state as Envoy reports it (admin.v3.ServerInfo.State: LIVE 0, INITIALIZING 3); workers
    // start once the initial xDS fetch is done. pilot-agent's readiness reads these.
    let initialized = shared
        .snapshot
        .load()
        .xds
        .as_ref()
        .is_none_or(|x| x.initialized);
    out.push(("server.state".into(), if initialized { 0 } else { 3 }));
    out.push((
        "listener_manager.workers_started".into(),
        u64::from(initialized),
    ));
    for (n, c) in shared.clusters.all().iter() {
        let t = &c.config.breakers;
        let b = &c.breakers;
        let rq = b.requests.load(Relaxed);
        let pending = b.pending.load(Relaxed);
        let retries = b.retries.load(Relaxed);
        let cb = format!("cluster.{n}.circuit_breakers.default");
        // A breaker is open while its resource is in use up to the limit.
        let open = |n: u64, max: u64| u64::from(n > 0 && n >= max);
        out.push((format!("{cb}.rq_open"), open(rq, t.max_requests)));
        out.push((
            format!("{cb}.rq_pending_open"),
            open(pending, t.max_pending_requests),
        ));
        out.push((
            format!("{cb}.rq_retry_open"),
            open(retries, c.max_retries()),
        ));
        out.push((format!("{cb}.cx_open"), open(rq, t.max_connections)));
        out.push((format!("{cb}.cx_pool_open"), 0));
        if t.track_remaining {
            out.push((
                format!("{cb}.remaining_rq"),
                t.max_requests.saturating_sub(rq),
            ));
            out.push((
                format!("{cb}.remaining_pending"),
                t.max_pending_requests.saturating_sub(pending),
            ));
            out.push((
                format!("{cb}.remaining_retries"),
                c.max_retries().saturating_sub(retries),
            ));
            out.push((
                format!("{cb}.remaining_cx"),
                t.max_connections.saturating_sub(rq),
            ));
            out.push((format!("{cb}.remaining_cx_pools"), u64::from(u32::MAX)));
        }
        if c.config.outlier.is_some() {
            let d = &c.detector;
            let od = format!("cluster.{n}.outlier_detection");
            out.push((
                format!("{od}.ejections_active"),
                d.ejections_active.load(Relaxed),
            ));
            out.push((
                format!("{od}.ejections_enforced_total"),
                d.enforced_total.load(Relaxed),
            ));
            out.push((format!("{od}.ejections_overflow"), d.overflow.load(Relaxed)));
            // Envoy's full set, including detectors pingsail does not run (always 0) and the
            // legacy aliases.
            let kinds = crate::cluster::outlier::KIND_NAMES;
            let get = |arr: &[std::sync::atomic::AtomicU64; 5], k: &str| {
                kinds
                    .iter()
                    .position(|x| *x == k)
                    .map_or(0, |i| arr[i].load(Relaxed))
            };
            for k in [
                "consecutive_5xx",
                "consecutive_gateway_failure",
                "consecutive_local_origin_failure",
                "degradation",
                "failure_percentage",
                "local_origin_failure_percentage",
                "local_origin_success_rate",
                "success_rate",
            ] {
                out.push((format!("{od}.ejections_detected_{k}"), get(&d.detected, k)));
                if k != "degradation" {
                    out.push((format!("{od}.ejections_enforced_{k}"), get(&d.enforced, k)));
                }
            }
            out.push((
                format!("{od}.ejections_consecutive_5xx"),
                get(&d.detected, "consecutive_5xx"),
            ));
            out.push((
                format!("{od}.ejections_success_rate"),
                get(&d.detected, "success_rate"),
            ));
            // Legacy: consecutive 5xx and success-rate detections, enforced or not.
            out.push((
                format!("{od}.ejections_total"),
                get(&d.detected, "consecutive_5xx") + get(&d.detected, "success_rate"),
            ));
        }
    }
    out.sort();
    out
}

fn clusters(shared: &Shared) -> String {
    let mut s = String::new();
    let all = shared.clusters.all();
    let mut names: Vec<_> = all.keys().collect();
    names.sort();
    for n in names {
        let c = &all[n];
        let _ = writeln!(s, "{n}::observability_name::{n}");
        let t = &c.config.breakers;
        let _ = writeln!(
            s,
            "{n}::default_priority::max_connections::{}",
            t.max_connections
        );
        let _ = writeln!(
            s,
            "{n}::default_priority::max_pending_requests::{}",
            t.max_pending_requests
        );
        let _ = writeln!(s, "{n}::default_priority::max_requests::{}", t.max_requests);
        let _ = writeln!(s, "{n}::default_priority::max_retries::{}", c.max_retries());
        let _ = writeln!(s, "{n}::added_via_api::false");
        let ejected = c.host_ejected();
        for (i, e) in c.endpoints().iter().enumerate() {
            let Some(addr) = e.addr else { continue };
            if ejected.get(i).copied().unwrap_or(false) {
                let _ = writeln!(s, "{n}::{addr}::health_flags::/failed_outlier_check");
            } else {
                let _ = writeln!(s, "{n}::{addr}::health_flags::healthy");
            }
            let _ = writeln!(s, "{n}::{addr}::weight::{}", e.weight);
            let _ = writeln!(
                s,
                "{n}::{addr}::hostname::{}",
                e.hostname.as_deref().unwrap_or("")
            );
        }
    }
    s
}

/// Envoy's Prometheus naming with its default tag extraction for the stats we have.
fn prometheus(shared: &Shared) -> String {
    type Series = (&'static str, Vec<(String, u64)>);
    let mut by_metric: std::collections::BTreeMap<String, Series> = Default::default();
    for (name, value) in all_stats(shared) {
        let (metric, labels) = match name.split_once('.') {
            Some(("cluster", rest)) => match rest.rsplit_once('.') {
                Some((c, stat)) => (
                    format!("envoy_cluster_{stat}"),
                    format!("envoy_cluster_name=\"{c}\""),
                ),
                None => continue,
            },
            Some(("http", rest)) => match rest.rsplit_once('.') {
                Some((p, stat)) => (
                    format!("envoy_http_{stat}"),
                    format!("envoy_http_conn_manager_prefix=\"{p}\""),
                ),
                None => continue,
            },
            Some(("listener", rest)) => match rest.rsplit_once('.') {
                Some((a, stat)) => (
                    format!("envoy_listener_{stat}"),
                    format!("envoy_listener_address=\"{a}\""),
                ),
                None => continue,
            },
            Some(("tcp", rest)) => match rest.rsplit_once('.') {
                Some((p, stat)) => (
                    format!("envoy_tcp_{stat}"),
                    format!("envoy_tcp_prefix=\"{p}\""),
                ),
                None => continue,
            },
            _ => (format!("envoy_{name}"), String::new()),
        };
        let metric = metric.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_");
        let kind = if crate::stats::is_gauge(&name) {
            "gauge"
        } else {
            "counter"
        };
        let e = by_metric.entry(metric).or_insert((kind, Vec::new()));
        e.1.push((labels, value));
    }
    let mut s = String::new();
    for (metric, (kind, series)) in by_metric {
        let _ = writeln!(s, "# TYPE {metric} {kind}");
        for (labels, value) in series {
            let _ = writeln!(s, "{metric}{{{labels}}} {value}");
        }
    }
    s
}

/// Decodes `%XX` escapes (and `+` as space) in a query value.
fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
