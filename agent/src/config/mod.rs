// SPDX-License-Identifier: Apache-2.0
//! `pingsail-agent proxy sidecar|router`: pilot-agent's command line and environment, parsed and
//! checked once at start into [`AgentConfig`], the struct every part of the agent (bootstrap,
//! supervisor, status server, xDS proxy, DNS) takes its settings from.
//!
//! Environment read here (the injected `istio-proxy` container's, see the injection goldens):
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `POD_NAME`, `POD_NAMESPACE` | node id `<type>~<ip>~<pod>.<ns>~<domain>` | empty |
//! | `INSTANCE_IP` | first node IP (must be an IP when set) | host addresses |
//! | `SERVICE_ACCOUNT`, `TRUST_DOMAIN`, `CA_ADDR`, `PILOT_CERT_PROVIDER`, … | workload identity ([`crate::ca::config`]) | |
//! | `PROXY_CONFIG` | ProxyConfig YAML/JSON over the mesh file's `defaultConfig` | |
//! | `ISTIO_META_*`, `ISTIO_METAJSON_*` | node metadata ([`crate::bootstrap`]) | |
//! | `ISTIO_KUBE_APP_PROBERS` | JSON object of rewritten app probes | none |
//! | `ISTIO_PROMETHEUS_ANNOTATIONS` | JSON object `{scrape,path,port}` of the app's metrics | none |
//! | `EXIT_ON_ZERO_ACTIVE_CONNECTIONS` | bool | false |
//! | `MINIMUM_DRAIN_DURATION` | Go duration | 5s |
//! | `ISTIO_CPU_LIMIT` | integer; concurrency when ProxyConfig sets none | 0 |
//! | `ENVOY_STATUS_PORT`, `ENVOY_PROMETHEUS_PORT` | proxy's health / metrics listener ports | 15021, 15090 |
//! | `WORKLOAD_IDENTITY_SOCKET_FILE` | SDS socket file name | `socket` |
//! | `ISTIO_BOOTSTRAP_OVERRIDE` | file passed to the proxy as `--config-yaml` | none |
//! | `HOST_IP`, `GOMEMLIMIT`, `ISTIO_META_*` not listed | accepted (metadata or unused) | |

mod proxy_config;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

pub use proxy_config::{
    ProxyConfig, ProxyConfigError, format_proto_duration, parse_proto_duration,
};

use crate::ca::config::{parse_bool, parse_duration};

/// `proxy <type>`: the node type (first part of the node id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeType {
    Sidecar,
    Router,
}

impl NodeType {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeType::Sidecar => "sidecar",
            NodeType::Router => "router",
        }
    }
}

/// pilot-agent's `proxy` flags (cobra persistent flags of `pilot-agent proxy`), plus ours.
#[derive(Clone, Debug, clap::Args)]
pub struct ProxyArgs {
    /// sidecar or router.
    #[arg(value_enum, default_value = "sidecar")]
    pub node_type: NodeType,
    /// DNS domain suffix; default `${POD_NAMESPACE}.svc.cluster.local`.
    #[arg(long, default_value = "")]
    pub domain: String,
    /// Mesh configuration file (its `defaultConfig` is the base ProxyConfig).
    #[arg(long = "meshConfig", default_value = "./etc/istio/config/mesh")]
    pub mesh_config: PathBuf,
    /// STS port (0: none). Recorded in the node metadata; no STS server is run.
    #[arg(long = "stsPort", default_value_t = 0)]
    pub sts_port: u16,
    #[arg(long = "tokenManagerPlugin", default_value = "")]
    pub token_manager_plugin: String,
    /// Deprecated: service cluster when ProxyConfig names none.
    #[arg(long = "serviceCluster", default_value = "istio-proxy")]
    pub service_cluster: String,
    /// Proxy log level (`-l`); may carry `component:level` items.
    #[arg(long = "proxyLogLevel", default_value = "warning")]
    pub proxy_log_level: String,
    #[arg(long = "proxyComponentLogLevel", default_value = "")]
    pub proxy_component_log_level: String,
    /// Legacy override of ProxyConfig concurrency (0: unset).
    #[arg(long, default_value_t = 0)]
    pub concurrency: i64,
    /// Go-template bootstrap: not supported (the bootstrap is built in code); must be empty.
    #[arg(long = "templateFile", default_value = "")]
    pub template_file: String,
    #[arg(long = "outlierLogPath", default_value = "")]
    pub outlier_log_path: String,
    /// pprof on the status port (accepted; no profiler).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub profiling: bool,
    /// The agent's own log levels, `scope:level,...` (istio log flags).
    #[arg(long = "log_output_level", default_value = "default:info")]
    pub log_output_level: String,
    #[arg(long = "log_as_json", default_value_t = false)]
    pub log_as_json: bool,
    /// The proxy binary to supervise (default: pingsail-proxy next to the agent, else PATH;
    /// ProxyConfig binaryPath when it exists).
    #[arg(long = "proxy-binary")]
    pub proxy_binary: Option<PathBuf>,
    /// Directory `./` paths are relative to (default: the working directory).
    #[arg(long = "base-dir")]
    pub base_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?}: {detail}")]
    Invalid {
        var: String,
        value: String,
        detail: String,
    },
    #[error(transparent)]
    ProxyConfig(#[from] ProxyConfigError),
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("--{flag}: {detail}")]
    Flag { flag: &'static str, detail: String },
}

fn invalid(var: &str, value: &str, detail: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var: var.into(),
        value: value.into(),
        detail: detail.into(),
    }
}

impl From<crate::ca::ConfigError> for ConfigError {
    fn from(e: crate::ca::ConfigError) -> Self {
        match e {
            crate::ca::ConfigError::Invalid { var, value, detail } => invalid(var, &value, detail),
            other => invalid("environment", "", other.to_string()),
        }
    }
}

/// Listening ports of the agent and the proxy.
#[derive(Clone, Debug)]
pub struct Ports {
    /// Agent status server (ProxyConfig statusPort, 15020).
    pub status: u16,
    /// Proxy admin (ProxyConfig proxyAdminPort, 15000), on localhost.
    pub proxy_admin: u16,
    /// Proxy health listener (ENVOY_STATUS_PORT, 15021).
    pub envoy_status: u16,
    /// Proxy Prometheus listener (ENVOY_PROMETHEUS_PORT, 15090).
    pub envoy_prometheus: u16,
    /// STS (0: off).
    pub sts: u16,
}

/// Files and sockets, all resolved under `base`.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The directory `./` paths are relative to.
    pub base: PathBuf,
    /// ProxyConfig configPath (`./etc/istio/proxy`).
    pub config_dir: PathBuf,
    /// Where the bootstrap is written (`<config_dir>/envoy-rev.json`).
    pub bootstrap: PathBuf,
    /// The proxy's ADS Unix socket, served by the xDS proxy (`<config_dir>/XDS`).
    pub xds_socket: PathBuf,
    /// Downward-API pod labels (`./etc/istio/pod/labels`).
    pub pod_labels: PathBuf,
    /// Downward-API pod annotations (`./etc/istio/pod/annotations`).
    pub pod_annotations: PathBuf,
    /// SDS socket file name under `./var/run/secrets/workload-spiffe-uds/`.
    pub workload_identity_socket_file: String,
    /// ISTIO_BOOTSTRAP_OVERRIDE.
    pub bootstrap_override: Option<PathBuf>,
}

/// Drain settings (one deadline for the pod).
#[derive(Clone, Debug)]
pub struct Drain {
    /// ProxyConfig drainDuration → proxy `--drain-time-s` (45s).
    pub drain_duration: Duration,
    /// ProxyConfig terminationDrainDuration: SIGTERM → exit after this (5s).
    pub termination_drain_duration: Duration,
    /// EXIT_ON_ZERO_ACTIVE_CONNECTIONS.
    pub exit_on_zero_active_connections: bool,
    /// MINIMUM_DRAIN_DURATION (5s).
    pub minimum_drain_duration: Duration,
}

/// Log levels handed to the proxy and used by the agent.
#[derive(Clone, Debug)]
pub struct Logging {
    pub proxy_log_level: String,
    pub proxy_component_log_level: String,
    pub log_output_level: String,
    pub log_as_json: bool,
}

/// Everything `proxy sidecar|router` needs, parsed and validated.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_type: NodeType,
    /// `<type>~<ip>~<pod>.<ns>~<domain>`.
    pub node_id: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub domain: String,
    /// INSTANCE_IP first, then the host's other addresses.
    pub ip_addresses: Vec<String>,
    pub service_account: String,
    pub trust_domain: String,
    /// The effective ProxyConfig (mesh defaults ← mesh file ← annotation ← PROXY_CONFIG ← flags).
    pub proxy_config: ProxyConfig,
    /// ProxyConfig discoveryAddress (istiod, `host:port`).
    pub discovery_address: String,
    /// CA_ADDR (default: discoveryAddress).
    pub ca_addr: String,
    pub ports: Ports,
    pub paths: Paths,
    pub drain: Drain,
    pub logging: Logging,
    /// Proxy worker threads (0: proxy default).
    pub concurrency: i64,
    pub outlier_log_path: String,
    /// ISTIO_KUBE_APP_PROBERS (rewritten app probes keyed by status-port path).
    pub app_probers: Option<serde_json::Map<String, Value>>,
    /// ISTIO_PROMETHEUS_ANNOTATIONS (`scrape`, `path`, `port` of the app's metrics).
    pub prometheus_annotations: Option<serde_json::Map<String, Value>>,
    /// ISTIO_META_DNS_CAPTURE.
    pub dns_capture: bool,
    /// DNS_PROXY_ADDR (`localhost:15053`).
    pub dns_proxy_addr: String,
    /// `--proxy-binary` as given.
    pub proxy_binary: Option<PathBuf>,
    /// The process environment as read (for metadata and identity).
    pub env: BTreeMap<String, String>,
}

impl AgentConfig {
    /// Parses flags + environment. `host_ips` are the host's addresses (after INSTANCE_IP).
    pub fn load(
        args: &ProxyArgs,
        env: &BTreeMap<String, String>,
        cwd: &Path,
        host_ips: &[IpAddr],
    ) -> Result<Self, ConfigError> {
        let get = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let base = args.base_dir.clone().unwrap_or_else(|| cwd.to_path_buf());
        if !args.template_file.is_empty() {
            return Err(ConfigError::Flag {
                flag: "templateFile",
                detail: "Go-template bootstraps are not supported; the bootstrap is generated"
                    .into(),
            });
        }
        let pod_name = get("POD_NAME").unwrap_or("").to_owned();
        let pod_namespace = get("POD_NAMESPACE").unwrap_or("").to_owned();
        let domain = if args.domain.is_empty() {
            format!("{pod_namespace}.svc.cluster.local")
        } else {
            args.domain.clone()
        };

        let mut ip_addresses = Vec::new();
        if let Some(ip) = get("INSTANCE_IP") {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| invalid("INSTANCE_IP", ip, "expected an IP address"))?;
            ip_addresses.push(ip.to_string());
        }
        let mut others: Vec<String> = host_ips.iter().map(IpAddr::to_string).collect();
        if others.is_empty() {
            others = vec!["127.0.0.1".into(), "::1".into()];
        }
        for ip in others {
            if !ip_addresses.contains(&ip) {
                ip_addresses.push(ip);
            }
        }
        let first_ip = ip_addresses.first().cloned().unwrap_or_default();
        let node_id = format!(
            "{}~{first_ip}~{pod_name}.{pod_namespace}~{domain}",
            args.node_type.as_str()
        );

        let annotations_path = base.join("etc/istio/pod/annotations");
        let annotations = read_downward_api(&annotations_path).unwrap_or_default();
        let proxy_config = construct_proxy_config(
            &base.join(&args.mesh_config),
            annotations.get("proxy.istio.io/config").map(String::as_str),
            get("PROXY_CONFIG"),
            args,
            get("ISTIO_CPU_LIMIT"),
        )?;

        let port_env = |var: &str, default: u16| -> Result<u16, ConfigError> {
            match get(var) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| invalid(var, v, "expected a port number")),
            }
        };
        let ports = Ports {
            status: proxy_config.status_port(),
            proxy_admin: proxy_config.proxy_admin_port(),
            envoy_status: port_env("ENVOY_STATUS_PORT", 15021)?,
            envoy_prometheus: port_env("ENVOY_PROMETHEUS_PORT", 15090)?,
            sts: args.sts_port,
        };
        let config_dir = base.join(proxy_config.config_path().trim_start_matches("./"));
        let paths = Paths {
            bootstrap: config_dir.join("envoy-rev.json"),
            xds_socket: config_dir.join("XDS"),
            config_dir,
            pod_labels: base.join("etc/istio/pod/labels"),
            pod_annotations: annotations_path,
            workload_identity_socket_file: get("WORKLOAD_IDENTITY_SOCKET_FILE")
                .unwrap_or("socket")
                .to_owned(),
            bootstrap_override: get("ISTIO_BOOTSTRAP_OVERRIDE").map(|p| base.join(p)),
            base,
        };
        let bool_env = |var: &'static str| -> Result<bool, ConfigError> {
            Ok(match get(var) {
                Some(v) => parse_bool(var, v)?,
                None => false,
            })
        };
        let drain = Drain {
            drain_duration: proxy_config.drain_duration(),
            termination_drain_duration: proxy_config.termination_drain_duration(),
            exit_on_zero_active_connections: bool_env("EXIT_ON_ZERO_ACTIVE_CONNECTIONS")?,
            minimum_drain_duration: match get("MINIMUM_DRAIN_DURATION") {
                Some(v) => parse_duration("MINIMUM_DRAIN_DURATION", v)?,
                None => Duration::from_secs(5),
            },
        };
        let json_object =
            |var: &str| -> Result<Option<serde_json::Map<String, Value>>, ConfigError> {
                match get(var) {
                    None => Ok(None),
                    Some(v) => match serde_json::from_str::<Value>(v) {
                        Ok(Value::Object(m)) => Ok(Some(m)),
                        Ok(_) => Err(invalid(var, v, "expected a JSON object")),
                        Err(e) => Err(invalid(var, v, format!("not valid JSON: {e}"))),
                    },
                }
            };
        let app_probers = json_object("ISTIO_KUBE_APP_PROBERS")?;
        let prometheus_annotations = json_object("ISTIO_PROMETHEUS_ANNOTATIONS")?;
        check_metadata_env(env)?;
        let dns_capture = bool_env("ISTIO_META_DNS_CAPTURE")?;
        let discovery_address = proxy_config.discovery_address().to_owned();
        let ca_addr = get("CA_ADDR").unwrap_or(&discovery_address).to_owned();
        Ok(Self {
            node_type: args.node_type,
            node_id,
            pod_name,
            pod_namespace,
            domain,
            ip_addresses,
            service_account: get("SERVICE_ACCOUNT").unwrap_or("").to_owned(),
            trust_domain: get("TRUST_DOMAIN").unwrap_or("cluster.local").to_owned(),
            concurrency: proxy_config.concurrency().unwrap_or(0),
            discovery_address,
            ca_addr,
            ports,
            paths,
            drain,
            logging: Logging {
                proxy_log_level: args.proxy_log_level.clone(),
                proxy_component_log_level: args.proxy_component_log_level.clone(),
                log_output_level: args.log_output_level.clone(),
                log_as_json: args.log_as_json,
            },
            outlier_log_path: args.outlier_log_path.clone(),
            app_probers,
            prometheus_annotations,
            dns_capture,
            dns_proxy_addr: get("DNS_PROXY_ADDR")
                .unwrap_or("localhost:15053")
                .to_owned(),
            proxy_binary: args.proxy_binary.clone(),
            proxy_config,
            env: env.clone(),
        })
    }

    /// The bootstrap's inputs for this agent (`version`: ISTIO_VERSION when the env sets none).
    pub fn bootstrap_input(&self) -> crate::bootstrap::BootstrapInput {
        let pilot_san = if self.proxy_config.control_plane_mtls() {
            let host = self
                .discovery_address
                .rsplit_once(':')
                .map_or(self.discovery_address.as_str(), |(h, _)| h);
            let host = if host == "localhost" {
                "istiod.istio-system.svc"
            } else {
                host
            };
            vec![host.to_owned()]
        } else {
            Vec::new()
        };
        crate::bootstrap::BootstrapInput {
            node_id: self.node_id.clone(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            proxy_config: self.proxy_config.clone(),
            instance_ips: self.ip_addresses.clone(),
            pilot_san,
            outlier_log_path: self.outlier_log_path.clone(),
            labels_file: self.paths.pod_labels.clone(),
            annotations_file: self.paths.pod_annotations.clone(),
            envoy_status_port: self.ports.envoy_status,
            envoy_prometheus_port: self.ports.envoy_prometheus,
            sts_port: self.ports.sts,
            exit_on_zero_active_connections: self.drain.exit_on_zero_active_connections,
            workload_identity_socket_file: self.paths.workload_identity_socket_file.clone(),
            metadata_discovery: self
                .env
                .get("PEER_METADATA_DISCOVERY")
                .and_then(|v| crate::bootstrap::parse_go_bool(v)),
            compliance_policy: self
                .env
                .get("COMPLIANCE_POLICY")
                .cloned()
                .unwrap_or_default(),
            log_as_json: self.logging.log_as_json,
            ..crate::bootstrap::BootstrapInput::default()
        }
    }
}

/// Typed ISTIO_META_* values that must parse (the rest are free-form metadata).
fn check_metadata_env(env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (k, v) in env {
        if let Some(key) = k.strip_prefix("ISTIO_METAJSON_")
            && serde_json::from_str::<serde_json::Map<String, Value>>(v).is_err()
        {
            return Err(invalid(k, v, format!("{key}: expected a JSON object")));
        }
    }
    for var in crate::bootstrap::STRING_BOOL_META {
        let k = format!("ISTIO_META_{var}");
        if let Some(v) = env.get(&k).filter(|v| !v.is_empty()) {
            crate::bootstrap::parse_go_bool(v)
                .ok_or_else(|| invalid(&k, v, "expected a boolean (true/false/1/0)"))?;
        }
    }
    if let Some(v) = env.get("ISTIO_META_POD_PORTS").filter(|v| !v.is_empty()) {
        crate::bootstrap::normalise_pod_ports(v)
            .map_err(|e| invalid("ISTIO_META_POD_PORTS", v, e))?;
    }
    Ok(())
}

/// pilot-agent `ConstructProxyConfig`: defaults ← mesh file `defaultConfig` ← annotation
/// `proxy.istio.io/config` ← PROXY_CONFIG; `--concurrency` / ISTIO_CPU_LIMIT fill concurrency.
fn construct_proxy_config(
    mesh_file: &Path,
    annotation: Option<&str>,
    env: Option<&str>,
    args: &ProxyArgs,
    cpu_limit: Option<&str>,
) -> Result<ProxyConfig, ConfigError> {
    let mut pc = ProxyConfig::mesh_default();
    if mesh_file.exists() {
        let text = std::fs::read_to_string(mesh_file).map_err(|e| ConfigError::File {
            path: mesh_file.to_path_buf(),
            detail: e.to_string(),
        })?;
        let mesh: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_yaml::from_str(&text).map_err(|e| ConfigError::File {
                path: mesh_file.to_path_buf(),
                detail: format!("not valid YAML: {e}"),
            })?
        };
        let default_config = mesh
            .get("defaultConfig")
            .or_else(|| mesh.get("default_config"))
            .cloned();
        if let Some(dc) = default_config {
            let src = format!("{} defaultConfig", mesh_file.display());
            pc.merge(&ProxyConfig::from_value(dc, &src)?);
        }
    }
    if let Some(a) = annotation {
        pc.merge(&ProxyConfig::from_yaml(
            a,
            "annotation proxy.istio.io/config",
        )?);
    }
    if let Some(e) = env {
        pc.merge(&ProxyConfig::from_yaml(e, "PROXY_CONFIG")?);
    }
    if pc.concurrency().is_none()
        && let Some(cpu) = cpu_limit
    {
        let n: i64 = cpu
            .parse()
            .map_err(|_| invalid("ISTIO_CPU_LIMIT", cpu, "expected an integer"))?;
        if n != 0 {
            pc.set("concurrency", n.into());
        }
    }
    if args.concurrency != 0 {
        pc.set("concurrency", args.concurrency.into());
    }
    if pc.str("serviceCluster").is_none_or(str::is_empty)
        && pc.0.get("tracingServiceName").is_none()
    {
        pc.set("serviceCluster", args.service_cluster.clone().into());
    }
    Ok(pc)
}

/// Kubernetes downward-API file: `key="quoted value"` per line (Go-quoted).
pub fn read_downward_api(path: &Path) -> std::io::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path)?;
    parse_downward_api(&text).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

pub fn parse_downward_api(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        out.insert(
            k.to_owned(),
            go_unquote(v).ok_or_else(|| format!("cannot unquote {v}"))?,
        );
    }
    Ok(out)
}

/// Go `strconv.Unquote` for double-quoted strings (the escapes `%q` produces).
fn go_unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            if c == '"' {
                return None;
            }
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            '\\' => out.push('\\'),
            '"' => out.push('"'),
            '\'' => out.push('\''),
            'a' => out.push('\u{7}'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'v' => out.push('\u{b}'),
            'x' => {
                let h: String = chars.by_ref().take(2).collect();
                out.push(char::from(u8::from_str_radix(&h, 16).ok()?));
            }
            'u' => {
                let h: String = chars.by_ref().take(4).collect();
                out.push(char::from_u32(u32::from_str_radix(&h, 16).ok()?)?);
            }
            'U' => {
                let h: String = chars.by_ref().take(8).collect();
                out.push(char::from_u32(u32::from_str_radix(&h, 16).ok()?)?);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The host's global unicast addresses (pilot-agent `GetPrivateIPs`).
pub fn host_ips() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let ip: IpAddr = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let usable = match ip {
            IpAddr::V4(v4) => {
                !(v4.is_loopback()
                    || v4.is_link_local()
                    || v4.is_unspecified()
                    || v4.is_multicast())
            }
            IpAddr::V6(v6) => {
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || v6.is_unicast_link_local())
            }
        };
        if usable && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ProxyArgs,
    }

    fn load(argv: &[&str], env: &[(&str, &str)], base: &Path) -> Result<AgentConfig, ConfigError> {
        let mut full = vec!["x"];
        full.extend_from_slice(argv);
        let w = Wrap::parse_from(full);
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        AgentConfig::load(&w.args, &env, base, &["10.0.0.9".parse().unwrap()])
    }

    #[test]
    fn defaults_match_pilot_agent() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(
            &["sidecar"],
            &[("POD_NAME", "p"), ("POD_NAMESPACE", "ns")],
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.node_id, "sidecar~10.0.0.9~p.ns~ns.svc.cluster.local");
        assert_eq!(c.ports.status, 15020);
        assert_eq!(c.ports.proxy_admin, 15000);
        assert_eq!(c.ports.envoy_status, 15021);
        assert_eq!(c.ports.envoy_prometheus, 15090);
        assert_eq!(c.drain.drain_duration, Duration::from_secs(45));
        assert_eq!(c.drain.termination_drain_duration, Duration::from_secs(5));
        assert_eq!(c.drain.minimum_drain_duration, Duration::from_secs(5));
        assert!(!c.drain.exit_on_zero_active_connections);
        assert_eq!(c.discovery_address, "istiod.istio-system.svc:15012");
        assert_eq!(c.ca_addr, "istiod.istio-system.svc:15012");
        assert_eq!(c.paths.xds_socket, dir.path().join("etc/istio/proxy/XDS"));
        assert_eq!(
            c.paths.bootstrap,
            dir.path().join("etc/istio/proxy/envoy-rev.json")
        );
        assert_eq!(c.dns_proxy_addr, "localhost:15053");
        assert_eq!(c.concurrency, 0);
    }

    #[test]
    fn proxy_config_layers_mesh_file_annotation_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc/istio/config")).unwrap();
        std::fs::create_dir_all(dir.path().join("etc/istio/pod")).unwrap();
        std::fs::write(
            dir.path().join("etc/istio/config/mesh"),
            "defaultConfig:\n  discoveryAddress: istiod.other:15012\n  drainDuration: 20s\n  statusPort: 15999\n  proxyMetadata:\n    A: mesh\n    B: mesh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/istio/pod/annotations"),
            "proxy.istio.io/config=\"terminationDrainDuration: 30s\\nproxyMetadata:\\n  B: anno\"\n",
        )
        .unwrap();
        let c = load(
            &["router", "--concurrency", "3", "--domain", "d.example"],
            &[
                (
                    "PROXY_CONFIG",
                    "{\"drain_duration\": \"7s\", \"proxyAdminPort\": 15555}",
                ),
                ("ISTIO_CPU_LIMIT", "2"),
                ("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "true"),
                ("MINIMUM_DRAIN_DURATION", "1m"),
                ("CA_ADDR", "ca.example:443"),
                ("INSTANCE_IP", "10.1.2.3"),
                (
                    "ISTIO_PROMETHEUS_ANNOTATIONS",
                    "{\"scrape\":\"true\",\"port\":\"9090\"}",
                ),
            ],
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.node_id, "router~10.1.2.3~.~d.example");
        assert_eq!(c.ip_addresses, ["10.1.2.3", "10.0.0.9"]);
        assert_eq!(c.discovery_address, "istiod.other:15012");
        assert_eq!(c.ca_addr, "ca.example:443");
        assert_eq!(c.drain.drain_duration, Duration::from_secs(7));
        assert_eq!(c.drain.termination_drain_duration, Duration::from_secs(30));
        assert_eq!(c.ports.status, 15999);
        assert_eq!(c.ports.proxy_admin, 15555);
        assert_eq!(c.concurrency, 3, "--concurrency wins over ISTIO_CPU_LIMIT");
        assert!(c.drain.exit_on_zero_active_connections);
        assert_eq!(c.drain.minimum_drain_duration, Duration::from_secs(60));
        assert_eq!(
            c.proxy_config.string_map("proxyMetadata"),
            [
                ("A".to_owned(), "mesh".to_owned()),
                ("B".to_owned(), "anno".to_owned())
            ]
        );
        assert_eq!(c.prometheus_annotations.unwrap()["port"], "9090");
        let c = load(&["sidecar"], &[("ISTIO_CPU_LIMIT", "2")], dir.path()).unwrap();
        assert_eq!(
            c.concurrency, 2,
            "ISTIO_CPU_LIMIT fills an unset concurrency"
        );
    }

    #[test]
    fn downward_api_unquotes_go_strings() {
        let m = parse_downward_api("app=\"x\"\nj=\"{\\\"a\\\":1}\"\nbad\n").unwrap();
        assert_eq!(m["app"], "x");
        assert_eq!(m["j"], "{\"a\":1}");
        assert!(parse_downward_api("k=unquoted").is_err());
    }
}
