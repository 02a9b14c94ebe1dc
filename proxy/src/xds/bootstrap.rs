// SPDX-License-Identifier: Apache-2.0
//! Loading an Envoy v3 bootstrap (YAML or JSON) and translating its static resources.

use super::json::{DecodeError, from_json, parse_text};
use super::translate::{self, ErrorKind, Path, TranslateError};
use crate::snapshot::{ClusterEntry, ConfigSnapshot, ListenerEntry};
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

/// Why a bootstrap was refused; `Display` is the one-line message the CLI prints.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// reading the file
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// not a valid Bootstrap message
    #[error("invalid bootstrap: {0}")]
    Decode(DecodeError),
    /// valid proto, but something we do not honour
    #[error("invalid bootstrap: {0}")]
    Translate(TranslateError),
}

// Manual conversions: the inner error is the message, not a separate cause to print twice.
impl From<DecodeError> for BootstrapError {
    fn from(e: DecodeError) -> Self {
        BootstrapError::Decode(e)
    }
}

impl From<TranslateError> for BootstrapError {
    fn from(e: TranslateError) -> Self {
        BootstrapError::Translate(e)
    }
}

/// A loaded, validated bootstrap.
#[derive(Debug)]
pub struct Loaded {
    /// the initial snapshot (version 1)
    pub snapshot: ConfigSnapshot,
    /// admin listener address, if configured
    pub admin: Option<SocketAddr>,
    /// `dynamic_resources`, if configured
    pub ads: Option<crate::xds::ads::AdsSettings>,
    /// `static_resources.secrets`
    pub static_secrets: Vec<(String, Arc<crate::tls::Material>)>,
    /// the `sds-grpc` cluster (the agent's SDS socket), if the bootstrap has one
    pub sds: Option<(
        Arc<crate::config::Cluster>,
        envoy_types::pb::envoy::config::core::v3::Node,
    )>,
}

/// Reads and validates a bootstrap file.
pub fn load_file(path: &str) -> Result<Loaded, BootstrapError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| BootstrapError::Io(path.to_string(), e))?;
    load_text(&text)
}

/// Validates bootstrap text (YAML or JSON).
pub fn load_text(text: &str) -> Result<Loaded, BootstrapError> {
    // Keep the schemas alive for the whole load (translation consults them for every message).
    let _schemas = crate::xds::pool::pool();
    let value = parse_text(text)?;
    let bootstrap: Bootstrap = from_json(&value)?;
    load(bootstrap)
}

const XDS: &str = "xDS issue";

/// Validates a decoded bootstrap.
pub fn load(b: Bootstrap) -> Result<Loaded, BootstrapError> {
    let root = Path::default();
    translate::only_pub(
        &b,
        &root,
        &[
            "node",
            "static_resources",
            "admin",
            "stats_config",
            "layered_runtime",
            "overload_manager",
            "stats_flush_interval",
            "dynamic_resources",
            // Telemetry and logging only; validated below and accepted without effect (COMPATIBILITY.md).
            "tracing",
            "stats_sinks",
            "stats_eviction_interval",
            "deferred_stat_options",
            "application_log_config",
            "cluster_manager",
            "bootstrap_extensions",
        ],
        &[],
    )?;
    #[allow(deprecated)] // istiod's bootstrap still sets the bootstrap-level tracer
    let tracing = &b.tracing;
    if let Some(t) = tracing {
        translate::telemetry::bootstrap_tracing(t, &root.field("tracing"))?;
    }
    for (i, s) in b.stats_sinks.iter().enumerate() {
        translate::telemetry::stats_sink(s, &root.at("stats_sinks", i))?;
    }
    if let Some(cm) = &b.cluster_manager {
        let p = root.field("cluster_manager");
        // outlier event logs, deferred cluster creation and load reporting (LRS) to istiod do not
        // change how traffic is routed.
        translate::only_pub(
            cm,
            &p,
            &[
                "outlier_detection",
                "enable_deferred_cluster_creation",
                "load_stats_config",
            ],
            &[("local_cluster_name", XDS), ("upstream_bind_config", XDS)],
        )?;
    }
    for (i, e) in b.bootstrap_extensions.iter().enumerate() {
        let p = root.at("bootstrap_extensions", i);
        let url = e
            .typed_config
            .as_ref()
            .map(translate::typed_struct_inner_type)
            .unwrap_or_default();
        // The internal-listener runtime (its listeners are refused one by one) and Istio's workload
        // metadata discovery (peer metadata for telemetry).
        if !matches!(
            url.as_str(),
            "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
                | "istio.workload.BootstrapExtension"
        ) {
            return Err(TranslateError {
                path: p.field("typed_config"),
                kind: ErrorKind::UnknownType(url),
            }
            .into());
        }
    }
    let admin = match &b.admin {
        Some(a) => {
            let p = root.field("admin");
            translate::only_pub(a, &p, &["address", "access_log", "profile_path"], &[])?;
            match &a.address {
                Some(addr) => Some(crate::xds::translate::socket_addr_pub(
                    addr,
                    &p.field("address"),
                )?),
                None => None,
            }
        }
        None => None,
    };
    let ads_cfg = match &b.dynamic_resources {
        Some(d) => Some(crate::xds::ads::dynamic_resources(
            d,
            &root.field("dynamic_resources"),
        )?),
        None => None,
    };
    let mut listeners = Vec::new();
    let mut clusters = HashMap::new();
    let mut static_secrets = Vec::new();
    let now = SystemTime::now();
    if let Some(sr) = &b.static_resources {
        let p = root.field("static_resources");
        translate::only_pub(sr, &p, &["listeners", "clusters", "secrets"], &[])?;
        for (i, s) in sr.secrets.iter().enumerate() {
            let sp = p.at("secrets", i);
            if s.name.is_empty() {
                return Err(TranslateError {
                    path: sp.field("name"),
                    kind: ErrorKind::Required,
                }
                .into());
            }
            let m = translate::tls::secret(s, &sp)?;
            static_secrets.push((s.name.clone(), Arc::new(m)));
        }
        let mut names = std::collections::HashSet::new();
        for (i, l) in sr.listeners.iter().enumerate() {
            let lp = p.at("listeners", i);
            let config = translate::translate_listener(l, &lp)?;
            if !names.insert(config.name.clone()) {
                return Err(TranslateError {
                    path: lp.field("name"),
                    kind: ErrorKind::Invalid(format!("duplicate listener name '{}'", config.name)),
                }
                .into());
            }
            listeners.push(Arc::new(ListenerEntry {
                config: Arc::new(config),
                proto: Arc::new(l.clone()),
                version: "".into(),
                updated: now,
                dynamic: false,
            }));
        }
        for (i, c) in sr.clusters.iter().enumerate() {
            let cp = p.at("clusters", i);
            let control_plane =
                c.name == "sds-grpc" || ads_cfg.as_ref().is_some_and(|a| a.cluster_name == c.name);
            let config = if control_plane {
                translate::translate_control_plane_cluster(c, &cp)?
            } else {
                translate::translate_cluster(c, &cp)?
            };
            let name = config.name.clone();
            if clusters.contains_key(&name) {
                return Err(TranslateError {
                    path: cp.field("name"),
                    kind: ErrorKind::Invalid(format!("duplicate cluster name '{name}'")),
                }
                .into());
            }
            clusters.insert(
                name,
                Arc::new(ClusterEntry {
                    config: Arc::new(config),
                    proto: Arc::new(c.clone()),
                    version: "".into(),
                    updated: now,
                    dynamic: false,
                }),
            );
        }
    }
    validate_cluster_references(&listeners, &clusters)?;
    let sds = clusters
        .get("sds-grpc")
        .map(|c| (c.config.clone(), b.node.clone().unwrap_or_default()));
    let ads = match ads_cfg {
        Some(partial) => {
            let cluster = clusters
                .get(partial.cluster_name.as_str())
                .map(|c| c.config.clone())
                .ok_or_else(|| TranslateError {
                    path: root
                        .field("dynamic_resources")
                        .field("ads_config")
                        .at("grpc_services", 0),
                    kind: ErrorKind::Invalid(format!(
                        "unknown gRPC cluster '{}': it must be a static cluster",
                        partial.cluster_name
                    )),
                })?;
            Some(partial.finish(cluster, b.node.clone().unwrap_or_default()))
        }
        None => None,
    };
    Ok(Loaded {
        snapshot: ConfigSnapshot {
            version: 1,
            bootstrap: Arc::new(b),
            listeners,
            clusters: Arc::new(clusters),
            ..Default::default()
        },
        admin,
        ads,
        static_secrets,
        sds,
    })
}

/// Envoy refuses an inline route configuration that names an unknown cluster unless
/// `validate_clusters: false`.
fn validate_cluster_references(
    listeners: &[Arc<ListenerEntry>],
    clusters: &HashMap<arcstr::ArcStr, Arc<ClusterEntry>>,
) -> Result<(), TranslateError> {
    use crate::config::ChainKind;
    use pingsail_filters::route::{Action, ClusterSpecifier};
    for (li, l) in listeners.iter().enumerate() {
        for chain in l.config.chains.iter().chain(l.config.default_chain.iter()) {
            match &chain.kind {
                ChainKind::Http(h) if h.validate_clusters => {
                    for vh in &h.routes.vhosts {
                        for r in &vh.routes {
                            let Action::Forward(a) = &r.action else {
                                continue;
                            };
                            let names: Vec<&str> = match &a.cluster {
                                ClusterSpecifier::Cluster(c) => vec![c.as_str()],
                                ClusterSpecifier::Weighted(w) => {
                                    w.clusters.iter().map(|c| c.name.as_str()).collect()
                                }
                                ClusterSpecifier::Header(_) => vec![],
                            };
                            if let Some(missing) =
                                names.into_iter().find(|n| !clusters.contains_key(*n))
                            {
                                return Err(TranslateError {
                                    path: Path::root("static_resources").at("listeners", li),
                                    kind: ErrorKind::Invalid(format!(
                                        "route: unknown cluster '{missing}'"
                                    )),
                                });
                            }
                        }
                    }
                }
                ChainKind::Tcp(t) => {
                    // tcp_proxy clusters may appear later (Envoy does not validate them at load).
                    let _ = t;
                }
                ChainKind::Http(_) => {}
            }
        }
    }
    Ok(())
}
