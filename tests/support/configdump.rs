// SPDX-License-Identifier: Apache-2.0
//! Istio `/config_dump` corpus: every listener, cluster, route configuration and
//! ClusterLoadAssignment of the reference dumps, each turned into a bootstrap of its own and loaded
//! with [`load_text`], and the outcome rendered as the golden
//! `docs/COMPATIBILITY-istio-configdumps.md`.
//!
//! How each resource becomes a bootstrap (the resource itself stays verbatim apart from its `@type`):
//! - listener: `static_resources.listeners[0]`, plus an empty STATIC cluster for every cluster name
//!   its inline route configurations name (Envoy validates those names; the clusters live in other
//!   resources of the dump);
//! - cluster: `static_resources.clusters[0]`;
//! - route configuration: the `route_config` of an HTTP connection manager (router filter only) in a
//!   listener on 127.0.0.1:0, with `validate_clusters: false`;
//! - ClusterLoadAssignment: the `load_assignment` of an EDS cluster named after it.

use pingsail_proxy::xds::bootstrap::{BootstrapError, load_text};
use pingsail_proxy::xds::translate::ErrorKind;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where the reference dumps live (`../shared` next to the repository).
pub fn configdumps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/istio/configdumps")
}

/// The golden document, `docs/COMPATIBILITY-istio-configdumps.md`.
pub fn golden_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/COMPATIBILITY-istio-configdumps.md")
}

/// Which xDS resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `envoy.config.listener.v3.Listener`
    Listener,
    /// `envoy.config.cluster.v3.Cluster`
    Cluster,
    /// `envoy.config.route.v3.RouteConfiguration`
    RouteConfiguration,
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment`
    ClusterLoadAssignment,
}

impl Kind {
    /// Short name used in the document.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Listener => "listener",
            Kind::Cluster => "cluster",
            Kind::RouteConfiguration => "route config",
            Kind::ClusterLoadAssignment => "endpoints",
        }
    }
}

/// One resource of a dump, wrapped into a bootstrap.
#[derive(Clone, Debug)]
pub struct Resource {
    /// the resource kind
    pub kind: Kind,
    /// `static`, `dynamic active`, `dynamic warming`, …
    pub origin: String,
    /// resource name (a ClusterLoadAssignment's `cluster_name`)
    pub name: String,
    /// the bootstrap (JSON) holding it
    pub bootstrap: Value,
    /// field path of the resource inside the bootstrap
    pub prefix: &'static str,
}

/// One file of the corpus.
#[derive(Clone, Debug)]
pub struct DumpFile {
    /// path relative to [`configdumps_dir`], `/`-separated
    pub file: String,
    /// resources found, in dump order
    pub resources: Vec<Resource>,
    /// config dump sections this test does not cover (secrets, ECDS, bootstrap…)
    pub not_covered: Vec<String>,
    /// why the whole file is not a config dump, if it is not one
    pub skipped: Option<String>,
}

/// What happened when a resource was loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `load_text` accepted it.
    Loads,
    /// Refused with a field path and a reason naming a later issue (`not supported yet (… issue)`).
    Later {
        /// path relative to the resource
        path: String,
        /// the reason, e.g. `not supported yet (mTLS issue)`
        reason: String,
    },
    /// Refused with a field path as `not supported` / unknown extension / deferred without an issue.
    Uncovered {
        /// path relative to the resource
        path: String,
        /// the reason
        reason: String,
    },
    /// Anything else: decode errors (our JSON mapping is wrong), invalid/required refusals of a
    /// resource Envoy accepted, errors without a path inside the resource, panics.
    Unexpected(String),
}

const LISTENER_PREFIX: &str = "static_resources.listeners[0]";
const CLUSTER_PREFIX: &str = "static_resources.clusters[0]";
const ROUTE_PREFIX: &str =
    "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config";
const CLA_PREFIX: &str = "static_resources.clusters[0].load_assignment";

/// Reads every `*.json` file under `dir` (sorted by relative path).
pub fn read_corpus(dir: &Path) -> anyhow::Result<Vec<DumpFile>> {
    let mut files = Vec::new();
    collect_json(dir, &mut files)?;
    let mut out = Vec::new();
    for f in files {
        let rel = f
            .strip_prefix(dir)?
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        let text = std::fs::read_to_string(&f)?;
        out.push(parse_dump(rel, &text));
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

fn collect_json(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            collect_json(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "json") {
            out.push(p);
        }
    }
    Ok(())
}

/// Splits one dump file into resources.
pub fn parse_dump(file: String, text: &str) -> DumpFile {
    let mut d = DumpFile {
        file,
        resources: Vec::new(),
        not_covered: Vec::new(),
        skipped: None,
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            d.skipped = Some(format!("not valid JSON ({e})"));
            return d;
        }
    };
    let Some(configs) = value.get("configs").and_then(Value::as_array) else {
        d.skipped = Some(skip_reason(&value));
        return d;
    };
    for c in configs {
        let ty = c.get("@type").and_then(Value::as_str).unwrap_or("");
        let short = ty.rsplit('.').next().unwrap_or(ty);
        match short {
            "ListenersConfigDump" => listeners(c, &mut d.resources),
            "ClustersConfigDump" => clusters(c, &mut d.resources),
            "RoutesConfigDump" => routes(c, &mut d.resources),
            "EndpointsConfigDump" => endpoints(c, &mut d.resources),
            other => {
                let other = if other.is_empty() {
                    "(no @type)"
                } else {
                    other
                };
                if !d.not_covered.iter().any(|n| n == other) {
                    d.not_covered.push(other.to_string());
                }
            }
        }
    }
    d
}

fn skip_reason(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return "not an Envoy admin config dump (no top-level `configs`): an istioctl rendering"
            .into();
    };
    if obj.contains_key("bootstrap") {
        return "a bare BootstrapConfigDump (not covered: bootstrap)".into();
    }
    // pilot's `none_lds_*.json`: Go structs of v2 listeners (`Address`, `PortSpecifier`, `Kind`).
    let go_struct = obj
        .values()
        .any(|l| l.get("address").and_then(|a| a.get("Address")).is_some());
    if go_struct {
        return "not proto3 JSON: Go-struct rendering of xDS v2 listeners \
                (`Address`, `PortSpecifier`, `Kind` fields)"
            .into();
    }
    "not an Envoy admin config dump (no top-level `configs`): an istioctl rendering".into()
}

/// The resource without its `@type` (the bootstrap fields are typed already).
fn strip_type(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("@type");
    }
    v
}

fn name_of(v: &Value, field: &str) -> String {
    v.get(field)
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
        .to_string()
}

/// Istio's bootstrap listeners (15090, 15021) have no name: show their address instead.
fn listener_name(l: &Value) -> String {
    if let Some(n) = l.get("name").and_then(Value::as_str) {
        return n.to_string();
    }
    let sa = l.get("address").and_then(|a| a.get("socket_address"));
    let host = sa.and_then(|s| s.get("address")).and_then(Value::as_str);
    let port = sa.and_then(|s| s.get("port_value")).and_then(Value::as_u64);
    match (host, port) {
        (Some(h), Some(p)) => format!("(unnamed) {h}:{p}"),
        _ => "(unnamed)".into(),
    }
}

fn entries<'a>(section: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> + 'a {
    section
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn listeners(section: &Value, out: &mut Vec<Resource>) {
    for e in entries(section, "static_listeners") {
        if let Some(l) = e.get("listener") {
            out.push(listener_resource("static", l));
        }
    }
    for e in entries(section, "dynamic_listeners") {
        for (state, origin) in [
            ("active_state", "dynamic active"),
            ("warming_state", "dynamic warming"),
            ("draining_state", "dynamic draining"),
        ] {
            if let Some(l) = e.get(state).and_then(|s| s.get("listener")) {
                out.push(listener_resource(origin, l));
            }
        }
    }
}

fn listener_resource(origin: &str, l: &Value) -> Resource {
    let listener = strip_type(l);
    let mut names = BTreeSet::new();
    referenced_clusters(&listener, false, &mut names);
    let clusters: Vec<Value> = names
        .into_iter()
        .map(|n| json!({"name": n, "type": "STATIC"}))
        .collect();
    let mut sr = json!({"listeners": [listener]});
    if !clusters.is_empty() {
        sr["clusters"] = Value::Array(clusters);
    }
    Resource {
        kind: Kind::Listener,
        origin: origin.into(),
        name: listener_name(l),
        bootstrap: json!({"static_resources": sr}),
        prefix: LISTENER_PREFIX,
    }
}

/// Cluster names used by routes of inline `route_config`s (`cluster`, `weighted_clusters`).
fn referenced_clusters(v: &Value, in_routes: bool, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                let inner = in_routes || k == "route_config";
                if inner {
                    if k == "cluster"
                        && let Some(s) = child.as_str()
                    {
                        out.insert(s.to_string());
                    }
                    if k == "weighted_clusters" {
                        for c in entries(child, "clusters") {
                            if let Some(s) = c.get("name").and_then(Value::as_str) {
                                out.insert(s.to_string());
                            }
                        }
                    }
                }
                referenced_clusters(child, inner, out);
            }
        }
        Value::Array(a) => a
            .iter()
            .for_each(|c| referenced_clusters(c, in_routes, out)),
        _ => {}
    }
}

fn clusters(section: &Value, out: &mut Vec<Resource>) {
    for (key, origin) in [
        ("static_clusters", "static"),
        ("dynamic_active_clusters", "dynamic active"),
        ("dynamic_warming_clusters", "dynamic warming"),
    ] {
        for e in entries(section, key) {
            if let Some(c) = e.get("cluster") {
                out.push(Resource {
                    kind: Kind::Cluster,
                    origin: origin.into(),
                    name: name_of(c, "name"),
                    bootstrap: json!({"static_resources": {"clusters": [strip_type(c)]}}),
                    prefix: CLUSTER_PREFIX,
                });
            }
        }
    }
}

fn routes(section: &Value, out: &mut Vec<Resource>) {
    for (key, origin) in [
        ("static_route_configs", "static"),
        ("dynamic_route_configs", "dynamic"),
    ] {
        for e in entries(section, key) {
            if let Some(rc) = e.get("route_config") {
                let mut route_config = strip_type(rc);
                if let Some(o) = route_config.as_object_mut() {
                    o.insert("validate_clusters".into(), Value::Bool(false));
                }
                let hcm = json!({
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "configdump",
                    "route_config": route_config,
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                        }
                    }]
                });
                let listener = json!({
                    "name": "configdump_route_config",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": hcm
                    }]}]
                });
                out.push(Resource {
                    kind: Kind::RouteConfiguration,
                    origin: origin.into(),
                    name: name_of(rc, "name"),
                    bootstrap: json!({"static_resources": {"listeners": [listener]}}),
                    prefix: ROUTE_PREFIX,
                });
            }
        }
    }
}

fn endpoints(section: &Value, out: &mut Vec<Resource>) {
    for (key, origin) in [
        ("static_endpoint_configs", "static"),
        ("dynamic_endpoint_configs", "dynamic"),
    ] {
        for e in entries(section, key) {
            if let Some(cla) = e.get("endpoint_config") {
                let name = name_of(cla, "cluster_name");
                let cluster = json!({
                    "name": name,
                    "type": "EDS",
                    "load_assignment": strip_type(cla),
                });
                out.push(Resource {
                    kind: Kind::ClusterLoadAssignment,
                    origin: origin.into(),
                    name,
                    bootstrap: json!({"static_resources": {"clusters": [cluster]}}),
                    prefix: CLA_PREFIX,
                });
            }
        }
    }
}

/// Loads the resource's bootstrap and classifies the result. Never panics.
pub fn check(r: &Resource) -> Outcome {
    let text = r.bootstrap.to_string();
    let result = std::panic::catch_unwind(|| load_text(&text));
    let err = match result {
        Ok(Ok(_)) => return Outcome::Loads,
        Ok(Err(e)) => e,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Outcome::Unexpected(format!("panic: {msg}"));
        }
    };
    let BootstrapError::Translate(t) = &err else {
        return Outcome::Unexpected(format!("decode error: {err}"));
    };
    let full = t.path.to_string();
    let Some(path) = relative(&full, r.prefix) else {
        return Outcome::Unexpected(format!("path outside the resource: {err}"));
    };
    let reason = t.kind.to_string();
    match &t.kind {
        ErrorKind::NotYet(issue) if issue.ends_with(" issue") => Outcome::Later { path, reason },
        ErrorKind::NotYet(_) | ErrorKind::NotSupported | ErrorKind::UnknownType(_) => {
            Outcome::Uncovered { path, reason }
        }
        ErrorKind::Invalid(_) | ErrorKind::Required => {
            Outcome::Unexpected(format!("refused as invalid: {err}"))
        }
    }
}

/// `full` relative to `prefix`: `(resource)` for the resource itself, `None` when outside it.
fn relative(full: &str, prefix: &str) -> Option<String> {
    if full == prefix {
        return Some("(resource)".into());
    }
    let rest = full.strip_prefix(prefix)?;
    if let Some(r) = rest.strip_prefix('.') {
        Some(r.to_string())
    } else if rest.starts_with('[') {
        Some(rest.to_string())
    } else {
        None
    }
}

/// A path with indices replaced by `[*]`, for grouping.
pub fn pattern(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push_str("[*]");
            }
            ']' => in_index = false,
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn outcome_cell(o: &Outcome) -> String {
    match o {
        Outcome::Loads => "loads".into(),
        Outcome::Later { path, reason } | Outcome::Uncovered { path, reason } => {
            format!("refused at `{}`: {}", cell(path), cell(reason))
        }
        Outcome::Unexpected(m) => format!("**unexpected**: {}", cell(m)),
    }
}

/// Renders the golden document from the corpus and each resource's outcome (same order).
pub fn render(dumps: &[DumpFile], outcomes: &[Vec<Outcome>]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Istio config dumps: what pingsail loads\n");
    let _ = writeln!(
        s,
        "Generated by `tests/tests/istio_configdumps.rs`; do not edit. Regenerate with\n\
         `PINGSAIL_REGEN=1 cargo test -p pingsail-tests --test istio_configdumps`.\n"
    );
    let _ = writeln!(
        s,
        "Every listener, cluster, route configuration and ClusterLoadAssignment in\n\
         `../shared/reference/istio/configdumps/` is loaded alone, verbatim (only its `@type` is\n\
         dropped), as the `static_resources` of a bootstrap:\n\n\
         - a listener as `listeners[0]`, plus an empty STATIC cluster for each cluster name its inline\n  \
         route configurations use;\n\
         - a cluster as `clusters[0]`;\n\
         - a route configuration as the `route_config` of an HTTP connection manager (router only) on\n  \
         127.0.0.1:0, with `validate_clusters: false`;\n\
         - a ClusterLoadAssignment as the `load_assignment` of an EDS cluster of the same name.\n\n\
         Loading validates only; nothing is bound. A refusal shows the first refused field, as a path\n\
         inside the resource. Every refusal must name a later issue (`not supported yet (… issue)`);\n\
         the others (`not supported`, unknown extension types, deferred without an issue) are listed\n\
         apart below. A decode error, an `invalid`/`required` refusal or a panic fails the test.\n"
    );

    // Summary.
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut later: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut uncovered: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut total = 0;
    for o in outcomes.iter().flatten() {
        total += 1;
        match o {
            Outcome::Loads => *counts.entry("loads").or_default() += 1,
            Outcome::Later { path, reason } => {
                *counts.entry("refused, names a later issue").or_default() += 1;
                *later.entry((pattern(path), reason.clone())).or_default() += 1;
            }
            Outcome::Uncovered { path, reason } => {
                *counts.entry("refused, no issue named").or_default() += 1;
                *uncovered
                    .entry((pattern(path), reason.clone()))
                    .or_default() += 1;
            }
            Outcome::Unexpected(_) => *counts.entry("unexpected").or_default() += 1,
        }
    }
    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(s, "| outcome | resources |\n| --- | --- |");
    for label in [
        "loads",
        "refused, names a later issue",
        "refused, no issue named",
        "unexpected",
    ] {
        if let Some(n) = counts.get(label) {
            let _ = writeln!(s, "| {label} | {n} |");
        }
    }
    let _ = writeln!(s, "| total | {total} |\n");
    for (title, groups) in [
        ("Refusals naming a later issue", &later),
        ("Refusals naming no issue", &uncovered),
    ] {
        if groups.is_empty() {
            continue;
        }
        let _ = writeln!(s, "### {title}\n");
        let _ = writeln!(
            s,
            "| field (in the resource) | reason | resources |\n| --- | --- | --- |"
        );
        let mut rows: Vec<_> = groups.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        for ((p, r), n) in rows {
            let _ = writeln!(s, "| `{}` | {} | {n} |", cell(p), cell(r));
        }
        let _ = writeln!(s);
    }

    // Per file.
    let _ = writeln!(s, "## Per dump file\n");
    for (d, os) in dumps.iter().zip(outcomes) {
        let _ = writeln!(s, "### `{}`\n", d.file);
        if let Some(why) = &d.skipped {
            let _ = writeln!(s, "Skipped: {why}.\n");
            continue;
        }
        if !d.not_covered.is_empty() {
            let _ = writeln!(
                s,
                "Not covered here: {}.\n",
                d.not_covered
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if d.resources.is_empty() {
            let _ = writeln!(
                s,
                "No listeners, clusters, route configurations or endpoints.\n"
            );
            continue;
        }
        let _ = writeln!(s, "| kind | name | outcome |\n| --- | --- | --- |");
        for (r, o) in d.resources.iter().zip(os) {
            let _ = writeln!(
                s,
                "| {} ({}) | `{}` | {} |",
                r.kind.label(),
                r.origin,
                cell(&r.name),
                outcome_cell(o)
            );
        }
        let _ = writeln!(s);
    }
    s
}
