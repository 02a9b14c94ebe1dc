// SPDX-License-Identifier: Apache-2.0
//! The proxy's bootstrap as pilot-agent writes it (`pkg/bootstrap`): the node (id, cluster,
//! locality, metadata built from the environment and the downward-API files), the runtime layer,
//! stats tags and matcher, admin on localhost, ADS over the agent's Unix socket (`xds-grpc`), the
//! static clusters `prometheus_stats`, `agent`, `sds-grpc`, `xds-grpc` (+ tracing / metrics
//! service / access-log service clusters) and the static listeners for Prometheus (15090) and
//! health (15021). Built as a `serde_json::Value` in code, structurally equal to Istio's
//! bootstrap goldens for the same inputs (tests/bootstrap_golden.rs).

mod metadata;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::config::ProxyConfig;

pub use metadata::{STRING_BOOL_META, normalise_pod_ports, parse_go_bool};

/// Everything the bootstrap depends on (pilot-agent `MetadataOptions` + `bootstrap.Config`).
#[derive(Clone, Debug)]
pub struct BootstrapInput {
    pub node_id: String,
    /// The process environment, in order (ISTIO_META_*, ISTIO_METAJSON_*, POD_NAME, …).
    pub env: Vec<(String, String)>,
    pub proxy_config: ProxyConfig,
    pub instance_ips: Vec<String>,
    pub pilot_san: Vec<String>,
    pub outlier_log_path: String,
    pub labels_file: PathBuf,
    pub annotations_file: PathBuf,
    pub envoy_status_port: u16,
    pub envoy_prometheus_port: u16,
    pub sts_port: u16,
    pub exit_on_zero_active_connections: bool,
    /// PEER_METADATA_DISCOVERY when set; otherwise follows ENABLE_HBONE.
    pub metadata_discovery: Option<bool>,
    pub workload_identity_socket_file: String,
    /// ISTIO_VERSION when the environment names none.
    pub istio_version: String,
    /// COMPLIANCE_POLICY (`fips-140-2` adds a runtime flag).
    pub compliance_policy: String,
    /// Application log format JSON (`--log_as_json`).
    pub log_as_json: bool,
}

impl Default for BootstrapInput {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            env: Vec::new(),
            proxy_config: ProxyConfig::mesh_default(),
            instance_ips: Vec::new(),
            pilot_san: Vec::new(),
            outlier_log_path: String::new(),
            labels_file: PathBuf::from("./etc/istio/pod/labels"),
            annotations_file: PathBuf::from("./etc/istio/pod/annotations"),
            envoy_status_port: 15021,
            envoy_prometheus_port: 15090,
            sts_port: 0,
            exit_on_zero_active_connections: false,
            metadata_discovery: None,
            workload_identity_socket_file: "socket".into(),
            istio_version: env!("CARGO_PKG_VERSION").into(),
            compliance_policy: String::new(),
            log_as_json: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{field}: {detail}")]
    Invalid { field: String, detail: String },
    #[error("{field} is not supported by pingsail-agent: {detail}")]
    Unsupported { field: String, detail: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(field: &str, detail: impl Into<String>) -> BootstrapError {
    BootstrapError::Invalid {
        field: field.into(),
        detail: detail.into(),
    }
}

/// A generated bootstrap and the side files it references (the Lightstep token file).
#[derive(Clone, Debug)]
pub struct Bootstrap {
    pub json: Value,
    /// `(path, content)`; paths relative to the proxy's working directory unless absolute.
    pub files: Vec<(PathBuf, String)>,
}

impl Bootstrap {
    /// Writes the side files (under `base` when relative) and the bootstrap to `path`.
    pub fn write(&self, base: &Path, path: &Path) -> Result<(), BootstrapError> {
        let w = |p: &Path, data: &[u8]| -> Result<(), BootstrapError> {
            let full = base.join(p);
            let err = |source| BootstrapError::Write {
                path: full.clone(),
                source,
            };
            if let Some(dir) = full.parent() {
                std::fs::create_dir_all(dir).map_err(err)?;
            }
            let tmp = full.with_extension("tmp");
            std::fs::write(&tmp, data).map_err(err)?;
            std::fs::rename(&tmp, &full).map_err(err)
        };
        for (p, content) in &self.files {
            w(p, content.as_bytes())?;
        }
        let text = serde_json::to_vec_pretty(&self.json).unwrap_or_default();
        w(path, &text)
    }
}

const REQUIRED_PREFIXES: &[&str] = &[
    "cluster_manager",
    "listener_manager",
    "server",
    "cluster.xds-grpc",
    "wasm",
];
const RBAC_SUFFIXES: &[&str] = &[
    "rbac.allowed",
    "rbac.denied",
    "shadow_allowed",
    "shadow_denied",
];
const REQUIRED_REGEX: &str = r"vhost\..*\.route\..*";

/// Generates the bootstrap.
pub fn generate(input: &BootstrapInput) -> Result<Bootstrap, BootstrapError> {
    let node = metadata::node_metadata(input)?;
    let pc = &input.proxy_config;
    let meta = &node.metadata;
    let mut files = Vec::new();

    let all_v6 = !input.instance_ips.is_empty()
        && input
            .instance_ips
            .iter()
            .all(|ip| ip.parse::<IpAddr>().is_ok_and(|a| a.is_ipv6()));
    let (localhost, wildcard, dns_family) = if all_v6 {
        ("::1", "::", "V6_ONLY")
    } else {
        ("127.0.0.1", "0.0.0.0", "V4_ONLY")
    };

    let xds_type = "DELTA_GRPC";
    let metadata_discovery = input.node_id.starts_with("waypoint~")
        || meta.get("METADATA_DISCOVERY").and_then(Value::as_str) == Some("true");

    let admin_port = pc.proxy_admin_port();
    let status_port = pc.status_port();
    let config_path = pc.config_path().to_owned();

    // Stats.
    let annotations = node.annotations.clone();
    let anno = |k: &str| annotations.get(k).map(String::as_str).unwrap_or("");
    let ips = metadata::dedup(&input.instance_ips);
    let matcher = pc.0.get("proxyStatsMatcher");
    let pc_list = |f: &str| -> Option<Vec<String>> {
        matcher
            .and_then(|m| m.get(f))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
    };
    let parse_option = |anno_v: &str, required: &[&str], from_pc: Option<Vec<String>>| {
        let mut list: Vec<String> = if !anno_v.is_empty() {
            anno_v.split(',').map(str::to_owned).collect()
        } else {
            from_pc.unwrap_or_default()
        };
        list.extend(required.iter().map(|s| (*s).to_owned()));
        let mut out = Vec::new();
        for p in list {
            if p.contains("{pod_ip}") {
                out.extend(ips.iter().map(|ip| p.replace("{pod_ip}", ip)));
            } else {
                out.push(p);
            }
        }
        out
    };
    let mut suffixes_required: Vec<&str> = RBAC_SUFFIXES.to_vec();
    if input.exit_on_zero_active_connections {
        suffixes_required.push("downstream_cx_active");
    }
    let prefixes = parse_option(
        anno("sidecar.istio.io/statsInclusionPrefixes"),
        REQUIRED_PREFIXES,
        pc_list("inclusionPrefixes"),
    );
    let suffixes = parse_option(
        anno("sidecar.istio.io/statsInclusionSuffixes"),
        &suffixes_required,
        pc_list("inclusionSuffixes"),
    );
    let regexps = parse_option(
        anno("sidecar.istio.io/statsInclusionRegexps"),
        &[REQUIRED_REGEX],
        pc_list("inclusionRegexps"),
    );
    let mut extra_tags: Vec<String> = Vec::new();
    let pc_tags =
        pc.0.get("extraStatTags")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
    for t in pc_tags
        .iter()
        .filter_map(Value::as_str)
        .chain(anno("sidecar.istio.io/extraStatTags").split(','))
    {
        if !t.is_empty() && !extra_tags.iter().any(|e| e == t) {
            extra_tags.push(t.to_owned());
        }
    }

    let mut patterns = vec![json!({"prefix": "reporter="})];
    if metadata_discovery {
        patterns.push(json!({"prefix": "workload_discovery"}));
    }
    patterns.extend(prefixes.iter().map(|p| json!({ "prefix": p })));
    patterns.extend(suffixes.iter().map(|s| json!({ "suffix": s })));
    patterns.extend(regexps.iter().map(|r| json!({"safe_regex": {"regex": r}})));
    patterns.push(json!({"prefix": "component"}));
    patterns.push(json!({"prefix": "istio"}));

    let mut stats_tags: Vec<Value> = [
        ("cluster_name", r"^cluster(\.(.+);)"),
        (
            "http_conn_manager_prefix",
            r"^http\.(((?:[_.[:digit:]\w]*|[_\[\]aAbBcCdDeEfF[:digit:]\w\:]*));\.)",
        ),
        ("thread_name", r"^server(\.(.+))\.watchdog"),
        ("tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
        ("response_code", r"_rq(_(\d{3}))$"),
        ("response_code_class", r"_rq(_(\dxx))$"),
        (
            "http_conn_manager_listener_prefix",
            r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
        ),
        (
            "listener_address",
            r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
        ),
        (
            "mongo_prefix",
            r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$",
        ),
    ]
    .iter()
    .map(|(n, r)| json!({"tag_name": n, "regex": r}))
    .collect();
    for t in &extra_tags {
        stats_tags.push(json!({"regex": format!(r"({t}=\.=(.*?);\.;)"), "tag_name": t}));
    }
    stats_tags.extend(
        [
            ("cache", r"(cache\.(.+?)\.)"),
            ("component", r"(component\.(.+?)\.)"),
            ("tag", r"(tag\.(.+?);\.)"),
            ("wasm_filter", r"(wasm_filter\.(.+?)\.)"),
            ("authz_enforce_result", r"rbac(\.(allowed|denied))"),
            ("authz_dry_run_action", r"(\.istio_dry_run_(allow|deny)_)"),
            ("authz_dry_run_result", r"(\.shadow_(allowed|denied))"),
        ]
        .iter()
        .map(|(n, r)| json!({"tag_name": n, "regex": r})),
    );
    let mut stats_config = Map::new();
    stats_config.insert("use_all_default_tags".into(), false.into());
    stats_config.insert("stats_tags".into(), stats_tags.into());
    if let Some(b) = annotations.get("sidecar.istio.io/statsHistogramBuckets") {
        match serde_json::from_str::<BTreeMap<String, Vec<f64>>>(b) {
            Ok(m) if !m.is_empty() => {
                let buckets: Vec<Value> = m
                    .iter()
                    .map(|(prefix, v)| {
                        json!({"match": {"prefix": prefix}, "buckets": v.iter().map(|f| number(*f)).collect::<Vec<_>>()})
                    })
                    .collect();
                stats_config.insert("histogram_bucket_settings".into(), buckets.into());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(value = %b, error = %e, "statsHistogramBuckets ignored"),
        }
    }
    stats_config.insert(
        "stats_matcher".into(),
        json!({"inclusion_list": {"patterns": patterns}}),
    );

    // Runtime flags.
    let mut runtime = Map::new();
    runtime.insert("re2.max_program_size.error_level".into(), "32768".into());
    runtime.insert(
        "envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst".into(),
        true.into(),
    );
    runtime.insert(
        "envoy.reloadable_features.http_reject_path_with_fragment".into(),
        false.into(),
    );
    runtime.insert(
        "envoy.reloadable_features.fixed_heap_use_allocated".into(),
        true.into(),
    );
    runtime.insert(
        "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update".into(),
        false.into(),
    );
    if input.compliance_policy == "fips-140-2" {
        runtime.insert(
            "envoy.reloadable_features.google_grpc_disable_tls_13".into(),
            true.into(),
        );
    }
    let runtime_values = pc.string_map("runtimeValues");
    for (k, v) in &runtime_values {
        match v.as_str() {
            "" => {
                runtime.remove(k);
            }
            "true" => {
                runtime.insert(k.clone(), true.into());
            }
            "false" => {
                runtime.insert(k.clone(), false.into());
            }
            _ => {
                runtime.insert(k.clone(), v.clone().into());
            }
        }
    }

    // Global downstream connection limit: ProxyConfig connectionSettings, then proxyMetadata
    // ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS, then the runtime flag.
    let mut max_conns: i64 = i64::from(i32::MAX);
    let from_settings =
        pc.0.get("connectionSettings")
            .and_then(|c| c.get("globalDownstreamConnectionLimit"))
            .and_then(Value::as_i64)
            .filter(|v| *v > 0);
    let from_meta = pc
        .string_map("proxyMetadata")
        .into_iter()
        .find(|(k, _)| k == "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS")
        .and_then(|(_, v)| v.parse::<i64>().ok());
    let from_runtime = runtime_values
        .iter()
        .find(|(k, _)| k == "overload.global_downstream_max_connections")
        .and_then(|(_, v)| v.parse::<i64>().ok());
    if let Some(v) = from_settings.or(from_meta).or(from_runtime) {
        max_conns = v;
    }

    // Clusters.
    let static_cluster = |name: &str, timeout: &str, address: Value| -> Map<String, Value> {
        let Value::Object(m) = json!({
            "name": name,
            "alt_stat_name": format!("{name};"),
            "type": "STATIC",
            "connect_timeout": timeout,
            "lb_policy": "ROUND_ROBIN",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]
            }
        }) else {
            return Map::new();
        };
        m
    };
    let tcp = |host: &str, port: u16| json!({"socket_address": {"protocol": "TCP", "address": host, "port_value": port}});
    let h2_options = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}
        }
    });
    let mut clusters: Vec<Value> = Vec::new();
    clusters.push(Value::Object(static_cluster(
        "prometheus_stats",
        "0.250s",
        tcp(localhost, admin_port),
    )));
    clusters.push(Value::Object(static_cluster(
        "agent",
        "0.250s",
        tcp(localhost, status_port),
    )));
    let mut sds = static_cluster(
        "sds-grpc",
        "1s",
        json!({"pipe": {"path": format!("./var/run/secrets/workload-spiffe-uds/{}", input.workload_identity_socket_file)}}),
    );
    sds.insert(
        "typed_extension_protocol_options".into(),
        h2_options.clone(),
    );
    clusters.push(Value::Object(sds));
    let mut xds = static_cluster(
        "xds-grpc",
        "1s",
        json!({"pipe": {"path": format!("{config_path}/XDS")}}),
    );
    let threshold = |p: &str| json!({"priority": p, "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000});
    xds.insert(
        "circuit_breakers".into(),
        json!({"thresholds": [threshold("DEFAULT"), threshold("HIGH")]}),
    );
    xds.insert(
        "upstream_connection_options".into(),
        json!({"tcp_keepalive": {"keepalive_time": 300}}),
    );
    xds.insert("max_requests_per_connection".into(), 1.into());
    xds.insert(
        "typed_extension_protocol_options".into(),
        h2_options.clone(),
    );
    clusters.push(Value::Object(xds));

    let host_ip = input
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "HOST_IP")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let socket_address = |field: &str, addr: &str| -> Result<Value, BootstrapError> {
        let (host, port) = split_host_port(addr)
            .ok_or_else(|| invalid(field, format!("unable to parse address {addr:?}")))?;
        let host = if host == "$(HOST_IP)" && !host_ip.is_empty() {
            host_ip.as_str()
        } else {
            host
        };
        let port: u64 = port
            .parse()
            .map_err(|_| invalid(field, format!("bad port in address {addr:?}")))?;
        Ok(json!({"address": host, "port_value": port}))
    };
    let dns_cluster = |name: &str, addr: Value| -> Map<String, Value> {
        let Value::Object(m) = json!({
            "name": name,
            "alt_stat_name": format!("{name};"),
            "type": "STRICT_DNS",
            "respect_dns_ttl": true,
            "dns_lookup_family": dns_family,
            "connect_timeout": "1s",
            "lb_policy": "ROUND_ROBIN",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": addr}}}]}]
            }
        }) else {
            return Map::new();
        };
        m
    };

    let cluster_name = metadata::service_cluster(pc, &node);
    let mut tracing_block: Option<Value> = None;
    if let Some(tr) = pc.0.get("tracing").and_then(Value::as_object) {
        let tls = tr.get("tlsSettings");
        let mut add_tracer =
            |name: &str, addr: &str, h2: bool, refresh: bool| -> Result<(), BootstrapError> {
                let mut c = dns_cluster(name, socket_address("tracing", addr)?);
                if refresh {
                    c.insert("dns_refresh_rate".into(), "30s".into());
                }
                if h2 {
                    c.insert(
                        "typed_extension_protocol_options".into(),
                        h2_options.clone(),
                    );
                }
                if let Some(ts) = tls.and_then(|t| transport_socket(t, meta, h2)) {
                    c.insert("transport_socket".into(), ts);
                }
                clusters.push(Value::Object(c));
                Ok(())
            };
        if let Some(z) = tr.get("zipkin") {
            let addr = z.get("address").and_then(Value::as_str).unwrap_or("");
            add_tracer("zipkin", addr, false, true)?;
            tracing_block = Some(
                json!({"http": {"name": "envoy.tracers.zipkin", "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                    "collector_cluster": "zipkin",
                    "collector_endpoint": "/api/v2/spans",
                    "collector_endpoint_version": "HTTP_JSON",
                    "trace_id_128bit": true,
                    "shared_span_context": false
                }}}),
            );
        } else if let Some(l) = tr.get("lightstep") {
            let addr = l.get("address").and_then(Value::as_str).unwrap_or("");
            let token = l.get("accessToken").and_then(Value::as_str).unwrap_or("");
            let token_file = format!("{config_path}/lightstep_access_token.txt");
            files.push((PathBuf::from(&token_file), token.to_owned()));
            add_tracer("lightstep", addr, true, false)?;
            tracing_block = Some(
                json!({"http": {"name": "envoy.tracers.lightstep", "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.trace.v3.LightstepConfig",
                    "collector_cluster": "lightstep",
                    "access_token_file": token_file
                }}}),
            );
        } else if let Some(d) = tr.get("datadog") {
            let addr = d.get("address").and_then(Value::as_str).unwrap_or("");
            add_tracer("datadog_agent", addr, false, false)?;
            tracing_block = Some(
                json!({"http": {"name": "envoy.tracers.datadog", "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.trace.v3.DatadogConfig",
                    "collector_cluster": "datadog_agent",
                    "service_name": cluster_name
                }}}),
            );
        } else if tr.contains_key("stackdriver") || tr.contains_key("openCensusAgent") {
            return Err(BootstrapError::Unsupported {
                field: "ProxyConfig tracing".into(),
                detail: "only zipkin, lightstep and datadog tracers are generated".into(),
            });
        }
    }
    let mut service_cluster = |field: &str, name: &str| -> Result<bool, BootstrapError> {
        let Some(svc) = pc.0.get(field) else {
            return Ok(false);
        };
        let Some(addr) = svc
            .get("address")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
        else {
            return Ok(false);
        };
        let mut c = dns_cluster(name, socket_address(field, addr)?);
        if let Some(ts) = svc
            .get("tlsSettings")
            .and_then(|t| transport_socket(t, meta, true))
        {
            c.insert("transport_socket".into(), ts);
        }
        if let Some(ka) = svc.get("tcpKeepalive").and_then(keepalive) {
            c.insert("upstream_connection_options".into(), ka);
        }
        c.insert(
            "typed_extension_protocol_options".into(),
            h2_options.clone(),
        );
        clusters.push(Value::Object(c));
        Ok(true)
    };
    let metrics_service = service_cluster("envoyMetricsService", "envoy_metrics_service")?;
    service_cluster("envoyAccessLogService", "envoy_accesslog_service")?;

    // Listeners.
    let localhost_only = pc
        .string_map("proxyMetadata")
        .iter()
        .any(|(k, v)| k == "METRICS_LOCALHOST_ACCESS_ONLY" && v == "true");
    let prom_host = if localhost_only { localhost } else { wildcard };
    let router = json!({"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}});
    let mut prom_filters = Vec::new();
    if pc.0.get("statsCompression").and_then(Value::as_bool) != Some(false) {
        for (algo, ty) in [
            (
                "brotli",
                "envoy.extensions.compression.brotli.compressor.v3.Brotli",
            ),
            (
                "zstd",
                "envoy.extensions.compression.zstd.compressor.v3.Zstd",
            ),
            (
                "gzip",
                "envoy.extensions.compression.gzip.compressor.v3.Gzip",
            ),
        ] {
            prom_filters.push(json!({
                "name": format!("envoy.filters.http.compressor.{algo}"),
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor",
                    "compressor_library": {"name": format!("stats_{algo}"), "typed_config": {"@type": format!("type.googleapis.com/{ty}")}},
                    "response_direction_config": {"common_config": {"content_type": [
                        "text/plain", "application/vnd.google.protobuf", "application/openmetrics-text", "application/openmetrics-protobuf"
                    ]}}
                }
            }));
        }
    }
    prom_filters.push(router.clone());
    let http_listener = |name: String,
                         host: &str,
                         port: u16,
                         stat_prefix: &str,
                         prefix: &str,
                         cluster: &str,
                         filters: Vec<Value>| {
        json!({
            "name": name,
            "address": tcp(host, port),
            "ignore_global_conn_limit": true,
            "bypass_overload_manager": true,
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "codec_type": "AUTO",
                    "stat_prefix": stat_prefix,
                    "route_config": {"virtual_hosts": [{
                        "name": "backend",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": prefix}, "route": {"cluster": cluster}}]
                    }]},
                    "http_filters": filters
                }
            }]}]
        })
    };
    let prom_port = input.envoy_prometheus_port;
    let health_port = input.envoy_status_port;
    let listeners = vec![
        http_listener(
            format!("{prom_host}_{prom_port}"),
            prom_host,
            prom_port,
            "stats",
            "/stats/prometheus",
            "prometheus_stats",
            prom_filters,
        ),
        http_listener(
            format!("{wildcard}_{health_port}"),
            wildcard,
            health_port,
            "agent",
            "/healthz/ready",
            "agent",
            vec![router],
        ),
    ];

    // Assemble.
    let mut locality = Map::new();
    for (k, v) in [
        ("region", &node.locality.0),
        ("zone", &node.locality.1),
        ("sub_zone", &node.locality.2),
    ] {
        if !v.is_empty() {
            locality.insert(k.into(), v.clone().into());
        }
    }
    let log_format = if input.log_as_json {
        json!({"json_format": {"time": "%Y-%m-%dT%T.%fZ", "level": "%l", "scope": "envoy %n", "msg": "%j", "caller": "%g:%#", "thread": "%t"}})
    } else {
        json!({"text_format": "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t"})
    };
    let mut extensions = Vec::new();
    if metadata_discovery {
        extensions.push(json!({"name": "metadata_discovery", "typed_config": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/istio.workload.BootstrapExtension",
            "value": {"config_source": {"ads": {}}}
        }}));
    }
    extensions.push(json!({"name": "envoy.bootstrap.internal_listener", "typed_config": {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
        "value": {"buffer_size_kb": 64}
    }}));

    let mut b = Map::new();
    b.insert(
        "application_log_config".into(),
        json!({ "log_format": log_format }),
    );
    b.insert(
        "node".into(),
        json!({"id": input.node_id, "cluster": cluster_name, "locality": locality, "metadata": Value::Object(node.metadata.clone())}),
    );
    b.insert(
        "layered_runtime".into(),
        json!({"layers": [{"name": "global config", "static_layer": runtime}, {"name": "admin", "admin_layer": {}}]}),
    );
    b.insert("bootstrap_extensions".into(), extensions.into());
    let flush = stats_intervals(&annotations);
    if let Some(f) = &flush.0 {
        b.insert("stats_flush_interval".into(), f.clone().into());
    }
    if let Some(e) = &flush.1 {
        b.insert("stats_eviction_interval".into(), e.clone().into());
    }
    b.insert("stats_config".into(), Value::Object(stats_config));
    b.insert("admin".into(), json!({
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": "/dev/null"
        }}],
        "profile_path": "/var/lib/istio/data/envoy.prof",
        "address": {"socket_address": {"address": localhost, "port_value": admin_port}}
    }));
    let ads = json!({"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"});
    b.insert(
        "dynamic_resources".into(),
        json!({
            "lds_config": ads.clone(),
            "cds_config": ads,
            "ads_config": {
                "api_type": xds_type,
                "set_node_on_first_message_only": true,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]
            }
        }),
    );
    b.insert(
        "static_resources".into(),
        json!({"clusters": clusters, "listeners": listeners}),
    );
    b.insert("overload_manager".into(), json!({"resource_monitors": [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
            "max_active_downstream_connections": max_conns
        }
    }]}));
    if let Some(t) = tracing_block {
        b.insert("tracing".into(), t);
    }
    let statsd = pc.str("statsdUdpAddress").filter(|s| !s.is_empty());
    if metrics_service || statsd.is_some() {
        let mut sinks = Vec::new();
        if metrics_service {
            sinks.push(
                json!({"name": "envoy.stat_sinks.metrics_service", "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.metrics.v3.MetricsServiceConfig",
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "envoy_metrics_service"}}
                }}),
            );
        }
        if let Some(addr) = statsd {
            sinks.push(json!({"name": "envoy.stat_sinks.statsd", "typed_config": {
                "@type": "type.googleapis.com/envoy.config.metrics.v3.StatsdSink",
                "address": {"socket_address": socket_address("statsdUdpAddress", addr)?}
            }}));
        }
        b.insert("stats_sinks".into(), sinks.into());
    }
    let lrs = node
        .raw
        .get("LOAD_STATS_CONFIG_JSON")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    if !input.outlier_log_path.is_empty() || lrs.is_some() {
        let mut cm = Map::new();
        if !input.outlier_log_path.is_empty() {
            cm.insert(
                "outlier_detection".into(),
                json!({"event_log_path": input.outlier_log_path}),
            );
        }
        if let Some(l) = lrs {
            let v: Value = serde_json::from_str(l)
                .map_err(|e| invalid("ISTIO_META_LOAD_STATS_CONFIG_JSON", e.to_string()))?;
            cm.insert("load_stats_config".into(), v);
        }
        cm.insert("enable_deferred_cluster_creation".into(), true.into());
        b.insert("cluster_manager".into(), Value::Object(cm));
    }
    b.insert(
        "deferred_stat_options".into(),
        json!({"enable_deferred_creation_stats": true}),
    );
    Ok(Bootstrap {
        json: Value::Object(b),
        files,
    })
}

/// Integral floats as integers (Go's JSON writes `1`, not `1.0`).
fn number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        #[allow(clippy::cast_possible_truncation)]
        let i = f as i64;
        Value::from(i)
    } else {
        Value::from(f)
    }
}

/// `sidecar.istio.io/statsFlushInterval` and `statsEvictionInterval` (eviction must be a
/// multiple of the flush interval, else ignored, as Istio).
fn stats_intervals(annotations: &BTreeMap<String, String>) -> (Option<String>, Option<String>) {
    let mut flush = std::time::Duration::from_secs(5);
    let mut flush_out = None;
    if let Some(v) = annotations.get("sidecar.istio.io/statsFlushInterval") {
        match crate::ca::config::parse_duration("statsFlushInterval", v) {
            Ok(d) => {
                flush = d;
                flush_out = Some(go_duration_string(d));
            }
            Err(e) => tracing::warn!(error = %e, "stats flush interval ignored"),
        }
    }
    let mut evict_out = None;
    if let Some(v) = annotations.get("sidecar.istio.io/statsEvictionInterval") {
        match crate::ca::config::parse_duration("statsEvictionInterval", v) {
            Ok(d) if !flush.is_zero() && d.as_nanos() % flush.as_nanos() == 0 => {
                evict_out = Some(format!("{}s", d.as_secs()));
            }
            Ok(_) => {
                tracing::warn!("StatsEvictionInterval must be a multiple of the StatsFlushInterval")
            }
            Err(e) => tracing::warn!(error = %e, "stats eviction interval ignored"),
        }
    }
    (flush_out, evict_out)
}

/// Go's `time.Duration.String` for the values annotations carry.
fn go_duration_string(d: std::time::Duration) -> String {
    let total = d.as_secs();
    let frac = d.subsec_nanos();
    if total < 60 {
        if frac == 0 {
            return format!("{total}s");
        }
        if total == 0 && frac.is_multiple_of(1_000_000) {
            return format!("{}ms", frac / 1_000_000);
        }
        let s = format!("{total}.{frac:09}");
        return format!("{}s", s.trim_end_matches('0'));
    }
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        format!("{}s", format!("{s}.{frac:09}").trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}")
    } else {
        format!("{m}m{secs}")
    }
}

fn split_host_port(addr: &str) -> Option<(&str, &str)> {
    if let Some(rest) = addr.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        return Some((h, p));
    }
    let (h, p) = addr.rsplit_once(':')?;
    if h.contains(':') {
        return None;
    }
    Some((h, p))
}

fn keepalive(v: &Value) -> Option<Value> {
    let mut ka = Map::new();
    if let Some(p) = v.get("probes").and_then(Value::as_u64).filter(|p| *p > 0) {
        ka.insert("keepalive_probes".into(), p.into());
    }
    for (f, out) in [
        ("time", "keepalive_time"),
        ("interval", "keepalive_interval"),
    ] {
        if let Some(d) = v
            .get(f)
            .and_then(Value::as_str)
            .and_then(crate::config::parse_proto_duration)
            .filter(|d| d.as_secs() > 0)
        {
            ka.insert(out.into(), d.as_secs().into());
        }
    }
    Some(json!({ "tcp_keepalive": ka }))
}

fn sds_secret(name: &str) -> Value {
    json!({"name": name, "sds_config": {
        "api_config_source": {
            "api_type": "GRPC",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
            "set_node_on_first_message_only": true,
            "transport_api_version": "V3"
        },
        "resource_api_version": "V3"
    }})
}

/// pilot-agent `transportSocketConverter` for ClientTLSSettings (tracing / metrics / ALS).
fn transport_socket(tls: &Value, meta: &Map<String, Value>, h2: bool) -> Option<Value> {
    let s = |f: &str| tls.get(f).and_then(Value::as_str).unwrap_or("");
    let m = |f: &str| {
        meta.get(f)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
    };
    let sans: Vec<Value> = tls
        .get("subjectAltNames")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|n| json!({ "exact": n }))
                .collect()
        })
        .unwrap_or_default();
    let mut default_vc = Map::new();
    if !sans.is_empty() {
        default_vc.insert("match_subject_alt_names".into(), sans.into());
    }
    let mut ctx = Map::new();
    let mut combined = Map::new();
    combined.insert(
        "default_validation_context".into(),
        Value::Object(default_vc),
    );
    let alpn: Vec<&str> = match s("mode") {
        "SIMPLE" | "MUTUAL" => {
            let root = m("TLS_CLIENT_ROOT_CERT").unwrap_or(s("caCertificates"));
            if s("mode") == "MUTUAL" {
                let cert = m("TLS_CLIENT_CERT_CHAIN").unwrap_or(s("clientCertificate"));
                let key = m("TLS_CLIENT_KEY").unwrap_or(s("privateKey"));
                if !cert.is_empty() && !key.is_empty() {
                    ctx.insert(
                        "tls_certificate_sds_secret_configs".into(),
                        json!([sds_secret(&format!("file-cert:{cert}~{key}"))]),
                    );
                }
            }
            if !root.is_empty() {
                combined.insert(
                    "validation_context_sds_secret_config".into(),
                    sds_secret(&format!("file-root:{root}")),
                );
            }
            vec!["h2"]
        }
        "ISTIO_MUTUAL" => {
            ctx.insert(
                "tls_certificate_sds_secret_configs".into(),
                json!([sds_secret("default")]),
            );
            combined.insert(
                "validation_context_sds_secret_config".into(),
                sds_secret("ROOTCA"),
            );
            vec!["istio", "h2"]
        }
        _ => return None,
    };
    ctx.insert(
        "combined_validation_context".into(),
        Value::Object(combined),
    );
    if h2 {
        ctx.insert("alpn_protocols".into(), json!(alpn));
    }
    let mut up = Map::new();
    up.insert(
        "@type".into(),
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext".into(),
    );
    up.insert("common_tls_context".into(), Value::Object(ctx));
    if !s("sni").is_empty() {
        up.insert("sni".into(), s("sni").into());
    }
    Some(json!({"name": "envoy.transport_sockets.tls", "typed_config": up}))
}
