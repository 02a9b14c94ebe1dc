// SPDX-License-Identifier: Apache-2.0
//! A Go `text/template` engine covering what Istio's injection templates use: actions with trim
//! markers, comments, variables (`:=`, `=`), pipelines, parenthesised sub-pipelines with field
//! chains, `if`/`else if`/`else`, `range` (lists and maps, one or two variables, `else`, `break`,
//! `continue`), `with`, `define`/`template`/`block`, and the sprig and Istio functions those
//! templates call (see [`funcs`]).
//!
//! Reading the real template lets operators customise injection through the ConfigMap exactly as
//! with istiod.

mod exec;
pub mod funcs;
mod lex;
mod parse;

use std::collections::HashMap;
use std::sync::Arc;

pub use exec::render;
pub use parse::Node;

use crate::value::V;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum TemplateError {
    #[error("template {name}: line {line}: {msg}")]
    Parse {
        name: String,
        line: usize,
        msg: String,
    },
    #[error("template {name}: executing: {msg}")]
    Exec { name: String, msg: String },
}

/// A parsed template plus the named templates it defines.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub root: Arc<Vec<Node>>,
    pub defines: Arc<HashMap<String, Vec<Node>>>,
}

impl Template {
    pub fn parse(name: &str, src: &str) -> Result<Template, TemplateError> {
        let toks = lex::lex(src).map_err(|(line, msg)| TemplateError::Parse {
            name: name.to_string(),
            line,
            msg,
        })?;
        let (root, defines) = parse::parse(toks).map_err(|(line, msg)| TemplateError::Parse {
            name: name.to_string(),
            line,
            msg,
        })?;
        Ok(Template {
            name: name.to_string(),
            root: Arc::new(root),
            defines: Arc::new(defines),
        })
    }

    pub fn execute(&self, data: &V) -> Result<String, TemplateError> {
        render(self, data).map_err(|msg| TemplateError::Exec {
            name: self.name.clone(),
            msg,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::value::MapKind;
    use std::collections::BTreeMap;

    fn run(src: &str, data: V) -> String {
        Template::parse("t", src).unwrap().execute(&data).unwrap()
    }

    fn map(items: &[(&str, V)], kind: MapKind) -> V {
        V::map(
            items
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            kind,
        )
    }

    #[test]
    fn trims_and_pipelines() {
        let d = map(&[("Name", V::str("x"))], MapKind::Any);
        assert_eq!(run("a  {{- .Name | quote -}}  b", d.clone()), "a\"x\"b");
        assert_eq!(
            run("{{ if eq .Name \"x\" }}yes{{ else }}no{{ end }}", d.clone()),
            "yes"
        );
        assert_eq!(run("{{ .Missing }}", d.clone()), "<no value>");
        assert_eq!(run("{{ .Missing | default \"d\" }}", d), "d");
    }

    #[test]
    fn variables_range_and_define() {
        let d = map(
            &[(
                "L",
                V::list(vec![V::str("a"), V::str("b"), V::str("istio-proxy")]),
            )],
            MapKind::Any,
        );
        let src = r#"{{- define "x" }}[{{ . }}]{{ end -}}
{{- $c := list }}{{ range $i, $n := .L }}{{ if ne $n "istio-proxy" }}{{ $c = append $c $n }}{{ end }}{{ end -}}
{{ $c | join "," }}{{ template "x" (index $c 0) }}{{ len $c }}"#;
        assert_eq!(run(src, d), "a,b[a]2");
    }

    #[test]
    fn struct_fields_and_methods() {
        let pc = map(
            &[("holdApplicationUntilProxyStarts", V::Bool(true))],
            MapKind::Struct,
        );
        let d = map(&[("ProxyConfig", pc)], MapKind::Struct);
        assert_eq!(
            run(
                "{{ .ProxyConfig.HoldApplicationUntilProxyStarts.GetValue }}",
                d.clone()
            ),
            "true"
        );
        assert_eq!(
            run("{{ .ProxyConfig.Tracing.GetValue }}", d.clone()),
            "false"
        );
        assert_eq!(
            run("{{ (.ProxyConfig).HoldApplicationUntilProxyStarts }}", d),
            "true"
        );
    }
}
