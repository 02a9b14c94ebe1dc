// SPDX-License-Identifier: Apache-2.0
//! Envoy-compatible command line: the flags pilot-agent passes. Flags that mean something to us are
//! honoured; the rest are accepted and logged at debug level.

use clap::Parser;

/// `pingsail-proxy` command line (a subset of Envoy's, same spellings).
#[derive(Debug, Parser)]
#[command(
    name = "pingsail-proxy",
    version,
    about = "Envoy-compatible sidecar proxy on Pingora"
)]
pub struct Cli {
    /// Bootstrap file (YAML or JSON), as Envoy's `-c`.
    #[arg(short = 'c', long = "config-path")]
    pub config_path: Option<String>,
    /// Inline bootstrap YAML/JSON (Envoy's `--config-yaml`); used when no -c is given.
    #[arg(long = "config-yaml")]
    pub config_yaml: Option<String>,
    /// Worker threads.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Drain time in seconds.
    #[arg(long = "drain-time-s")]
    pub drain_time_s: Option<u64>,
    /// Drain strategy (gradual|immediate).
    #[arg(long = "drain-strategy")]
    pub drain_strategy: Option<String>,
    /// Parent shutdown time (hot restart; ignored).
    #[arg(long = "parent-shutdown-time-s")]
    pub parent_shutdown_time_s: Option<u64>,
    /// v4|v6 (used for bootstrap local address; ignored).
    #[arg(long = "local-address-ip-version")]
    pub local_address_ip_version: Option<String>,
    /// Log level: trace|debug|info|warning|warn|error|critical|off.
    #[arg(short = 'l', long = "log-level")]
    pub log_level: Option<String>,
    /// Component log levels `comp:level,comp:level` (mapped onto our targets where they exist).
    #[arg(long = "component-log-level")]
    pub component_log_level: Option<String>,
    /// Log format (ignored; we use our own).
    #[arg(long = "log-format")]
    pub log_format: Option<String>,
    /// Hot restart is never used.
    #[arg(long = "disable-hot-restart")]
    pub disable_hot_restart: bool,
    /// Hot-restart base id (ignored).
    #[arg(long = "base-id")]
    pub base_id: Option<u64>,
    /// Dynamic base id (ignored).
    #[arg(long = "use-dynamic-base-id")]
    pub use_dynamic_base_id: bool,
    /// Access-log flush interval (pilot-agent passes it; no effect: our access log lines are
    /// written as they happen).
    #[arg(long = "file-flush-interval-msec")]
    pub file_flush_interval_msec: Option<u64>,
    /// Access-log flush size (no effect, as above).
    #[arg(long = "file-flush-min-size-kb")]
    pub file_flush_min_size_kb: Option<u64>,
    /// Node cluster (overrides bootstrap node.cluster).
    #[arg(long = "service-cluster")]
    pub service_cluster: Option<String>,
    /// Node id (overrides bootstrap node.id).
    #[arg(long = "service-node")]
    pub service_node: Option<String>,
    /// Allow unknown fields (never: we refuse what we cannot honour).
    #[arg(long = "allow-unknown-static-fields")]
    pub allow_unknown_static_fields: bool,
    /// Validate the configuration and exit (Envoy's `--mode validate`).
    #[arg(long = "mode")]
    pub mode: Option<String>,
}

/// Maps an Envoy log level to a tracing filter directive.
/// The startup log filter for `level`. Pingora reports every failed attempt of a request (a retried
/// 503, a refused connection) as a warning of its own; Envoy logs those at debug. Below debug,
/// Pingora's own crates log errors only, so a retry policy doing its job stays quiet.
pub fn startup_filter(level: &str) -> String {
    match level {
        "trace" | "debug" | "off" => level.to_string(),
        _ => format!("{level},pingora_proxy=error,pingora_core=error"),
    }
}

pub fn tracing_level(level: &str) -> Result<&'static str, String> {
    Ok(match level {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warning" | "warn" => "warn",
        "error" | "critical" => "error",
        "off" => "off",
        other => return Err(format!("unknown log level '{other}'")),
    })
}
