// SPDX-License-Identifier: Apache-2.0
//! Injector configuration: the `config` key of `istio-sidecar-injector` (policy, templates,
//! selectors), the `values` key, and the mesh config. Built-in defaults equal the files under
//! `conf/injector/` (Istio's chart output, with our image).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::gotmpl::{Template, TemplateError};
use crate::inject::Settings;
use crate::meshcfg;

pub const DEFAULT_CONFIG: &str = include_str!("../../conf/injector/chart/files/config.yaml");
pub const DEFAULT_VALUES: &str = include_str!("../../conf/injector/chart/files/values.json");
pub const DEFAULT_MESH: &str = include_str!("../../conf/injector/chart/files/mesh.yaml");
pub const SIDECAR_TEMPLATE: &str = include_str!("../../conf/injector/chart/files/sidecar.yaml");
pub const GATEWAY_TEMPLATE: &str = include_str!("../../conf/injector/chart/files/gateway.yaml");
pub const GRPC_AGENT_TEMPLATE: &str =
    include_str!("../../conf/injector/chart/files/grpc-agent.yaml");
pub const GRPC_SIMPLE_TEMPLATE: &str =
    include_str!("../../conf/injector/chart/files/grpc-simple.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("injection config: {0}")]
    Config(String),
    #[error("injection values: {0}")]
    Values(String),
    #[error(transparent)]
    Mesh(#[from] meshcfg::MeshError),
    #[error("injection template {name:?}: {err}")]
    Template { name: String, err: TemplateError },
    #[error("reading {path}: {err}")]
    Io { path: String, err: std::io::Error },
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let v = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => v.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => v.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => v.is_some(),
                    "DoesNotExist" => v.is_none(),
                    _ => false,
                }
            })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    default_templates: Option<Vec<String>>,
    #[serde(default)]
    templates: Option<BTreeMap<String, String>>,
    #[serde(default)]
    aliases: Option<HashMap<String, Vec<String>>>,
    #[serde(default)]
    never_inject_selector: Option<Vec<LabelSelector>>,
    #[serde(default)]
    always_inject_selector: Option<Vec<LabelSelector>>,
    #[serde(default)]
    injected_annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default)]
pub struct InjectConfig {
    pub policy: String,
    pub default_templates: Vec<String>,
    pub raw_templates: BTreeMap<String, String>,
    pub templates: HashMap<String, Template>,
    pub aliases: HashMap<String, Vec<String>>,
    pub never_inject_selector: Vec<LabelSelector>,
    pub always_inject_selector: Vec<LabelSelector>,
    pub injected_annotations: BTreeMap<String, String>,
}

impl InjectConfig {
    /// Parses the `config` document. Templates not given fall back to the built-in ones (as the
    /// chart always renders them).
    pub fn parse(yaml: &str) -> Result<InjectConfig, ConfigError> {
        let raw: RawConfig = if yaml.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml::from_str(yaml).map_err(|e| ConfigError::Config(e.to_string()))?
        };
        let mut cfg = InjectConfig {
            policy: raw.policy.unwrap_or_else(|| "enabled".into()),
            default_templates: raw
                .default_templates
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| vec!["sidecar".into()]),
            raw_templates: raw.templates.unwrap_or_default(),
            templates: HashMap::new(),
            aliases: raw.aliases.unwrap_or_default(),
            never_inject_selector: raw.never_inject_selector.unwrap_or_default(),
            always_inject_selector: raw.always_inject_selector.unwrap_or_default(),
            injected_annotations: raw.injected_annotations.unwrap_or_default(),
        };
        for (name, t) in [
            ("sidecar", SIDECAR_TEMPLATE),
            ("gateway", GATEWAY_TEMPLATE),
            ("grpc-agent", GRPC_AGENT_TEMPLATE),
            ("grpc-simple", GRPC_SIMPLE_TEMPLATE),
        ] {
            cfg.raw_templates
                .entry(name.to_string())
                .or_insert_with(|| format!("{}\n", t.trim()));
        }
        cfg.compile()?;
        Ok(cfg)
    }

    /// Adds what the chart renders from values into the config: `sidecarInjectorWebhook.templates`
    /// (override built-ins), `defaultTemplates`, selectors and injected annotations.
    pub fn apply_values(&mut self, values: &Value) -> Result<(), ConfigError> {
        let Some(sw) = values.get("sidecarInjectorWebhook") else {
            return Ok(());
        };
        if let Some(Value::Object(t)) = sw.get("templates") {
            for (k, v) in t {
                if let Some(s) = v.as_str() {
                    self.raw_templates.insert(k.clone(), s.to_string());
                }
            }
        }
        if let Some(Value::Array(d)) = sw.get("defaultTemplates")
            && !d.is_empty()
        {
            self.default_templates = d
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect();
        }
        for (key, slot) in [
            ("neverInjectSelector", &mut self.never_inject_selector),
            ("alwaysInjectSelector", &mut self.always_inject_selector),
        ] {
            if let Some(v @ Value::Array(a)) = sw.get(key)
                && !a.is_empty()
            {
                *slot = serde_json::from_value(v.clone())
                    .map_err(|e| ConfigError::Values(format!("{key}: {e}")))?;
            }
        }
        if let Some(Value::Object(a)) = sw.get("injectedAnnotations") {
            for (k, v) in a {
                if let Some(s) = v.as_str() {
                    self.injected_annotations.insert(k.clone(), s.to_string());
                }
            }
        }
        self.compile()
    }

    fn compile(&mut self) -> Result<(), ConfigError> {
        self.templates.clear();
        for (name, src) in &self.raw_templates {
            let t = Template::parse(name, src).map_err(|err| ConfigError::Template {
                name: name.clone(),
                err,
            })?;
            self.templates.insert(name.clone(), t);
        }
        Ok(())
    }
}

/// Inputs for building [`Settings`]; `None` = built-in default.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub config: Option<String>,
    pub values: Option<String>,
    pub mesh: Option<String>,
    pub revision: String,
    pub native_sidecars: Option<bool>,
    pub compliance_policy: String,
    pub openshift: bool,
}

pub fn parse_values(src: &str) -> Result<Value, ConfigError> {
    let v: Value = serde_yaml::from_str(src).map_err(|e| ConfigError::Values(e.to_string()))?;
    if !v.is_object() {
        return Err(ConfigError::Values("expected a mapping".into()));
    }
    Ok(v)
}

/// `ENABLE_NATIVE_SIDECARS` (values `pilot.env`, as istiod's env): "false" disables; anything
/// else (true, auto, unset) enables — we assume nodes run Kubernetes >= 1.33, see COMPATIBILITY.md.
fn native_from_values(values: &Value) -> bool {
    !matches!(
        values.pointer("/pilot/env/ENABLE_NATIVE_SIDECARS"),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false")
    ) && values.pointer("/pilot/env/ENABLE_NATIVE_SIDECARS") != Some(&Value::Bool(false))
}

pub fn build_settings(src: &Sources) -> Result<Settings, ConfigError> {
    let values = parse_values(src.values.as_deref().unwrap_or(DEFAULT_VALUES))?;
    let mut cfg = InjectConfig::parse(src.config.as_deref().unwrap_or(DEFAULT_CONFIG))?;
    cfg.apply_values(&values)?;
    let mesh = meshcfg::apply_mesh_config(src.mesh.as_deref().unwrap_or(DEFAULT_MESH))?;
    let native = src
        .native_sidecars
        .unwrap_or_else(|| native_from_values(&values));
    Ok(Settings {
        config: Arc::new(cfg),
        values: Arc::new(values),
        mesh: Arc::new(mesh),
        revision: src.revision.clone(),
        native_sidecars: native,
        compliance_policy: src.compliance_policy.clone(),
        openshift: src.openshift,
    })
}

pub fn read_file(path: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|err| ConfigError::Io {
        path: path.to_string(),
        err,
    })
}
