// SPDX-License-Identifier: Apache-2.0
//! The data model the template engine works on: a JSON-like tree that also remembers which Go type
//! family each map came from, because Go templates treat a missing key differently for each.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Maps and lists are shared: templates read the same pod and values many times, and a template
/// value is never mutated in place (functions build new ones).
pub type VMap = Arc<BTreeMap<String, V>>;
pub type VList = Arc<Vec<V>>;

/// How a map behaves when a template reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// A Go struct (Pod, ProxyConfig, MeshConfig...): fields are read by their Go name (`.Spec`,
    /// `.Containers`) which maps to the JSON name (`spec`, `containers`); a field that is absent
    /// reads as its zero value (we use the empty string, which is falsy and compares equal to every
    /// zero value).
    Struct,
    /// `map[string]string` (labels, annotations, proxyMetadata): a missing key reads as `""`.
    StrMap,
    /// `map[string]any` (Helm values, `fromJSON`): a missing key reads as nil (`<no value>`).
    Any,
}

#[derive(Clone, Debug, PartialEq)]
pub enum V {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(VList),
    Map(VMap, MapKind),
}

impl V {
    pub fn str(s: impl Into<String>) -> V {
        V::Str(s.into())
    }

    pub fn map(m: BTreeMap<String, V>, kind: MapKind) -> V {
        V::Map(Arc::new(m), kind)
    }

    pub fn list(l: Vec<V>) -> V {
        V::List(Arc::new(l))
    }

    /// Go template truthiness.
    pub fn truthy(&self) -> bool {
        match self {
            V::Nil => false,
            V::Bool(b) => *b,
            V::Int(i) => *i != 0,
            V::Float(f) => *f != 0.0,
            V::Str(s) => !s.is_empty(),
            V::List(l) => !l.is_empty(),
            // A struct is always "true" in Go; a map is true when non-empty.
            V::Map(m, kind) => *kind == MapKind::Struct || !m.is_empty(),
        }
    }

    /// Sprig's `empty`: like falsy, but a struct with no fields counts as empty too.
    pub fn is_empty(&self) -> bool {
        match self {
            V::Map(m, _) => m.is_empty(),
            other => !other.truthy(),
        }
    }

    /// `fmt.Sprint` of the value.
    pub fn to_go_string(&self) -> String {
        match self {
            V::Nil => "<no value>".to_string(),
            V::Bool(b) => b.to_string(),
            V::Int(i) => i.to_string(),
            V::Float(f) => go_float(*f),
            V::Str(s) => s.clone(),
            V::List(l) => {
                let parts: Vec<String> = l.iter().map(V::to_go_string).collect();
                format!("[{}]", parts.join(" "))
            }
            V::Map(m, _) => {
                let parts: Vec<String> = m
                    .iter()
                    .map(|(k, v)| format!("{k}:{}", v.to_go_string()))
                    .collect();
                format!("map[{}]", parts.join(" "))
            }
        }
    }

    pub fn from_json(v: &serde_json::Value, kind: MapKind) -> V {
        match v {
            serde_json::Value::Null => V::Nil,
            serde_json::Value::Bool(b) => V::Bool(*b),
            serde_json::Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    V::Int(i)
                } else {
                    V::Float(n.as_f64().unwrap_or(0.0))
                }
            }
            serde_json::Value::String(s) => V::Str(s.clone()),
            serde_json::Value::Array(a) => {
                V::list(a.iter().map(|x| V::from_json(x, kind)).collect())
            }
            serde_json::Value::Object(o) => V::map(
                o.iter()
                    .map(|(k, x)| (k.clone(), V::from_json(x, kind)))
                    .collect(),
                kind,
            ),
        }
    }

    /// Like [`V::from_json`] for Kubernetes objects: structs everywhere, except the string maps
    /// (`labels`, `annotations`, `nodeSelector`...) which read missing keys as "".
    pub fn from_kube(v: &serde_json::Value) -> V {
        match v {
            serde_json::Value::Object(o) => V::map(
                o.iter()
                    .map(|(k, x)| {
                        let child = if is_string_map_field(k) {
                            V::from_json(x, MapKind::StrMap)
                        } else {
                            V::from_kube(x)
                        };
                        (k.clone(), child)
                    })
                    .collect(),
                MapKind::Struct,
            ),
            serde_json::Value::Array(a) => V::list(a.iter().map(V::from_kube).collect()),
            other => V::from_json(other, MapKind::Struct),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            V::Nil => serde_json::Value::Null,
            V::Bool(b) => serde_json::Value::Bool(*b),
            V::Int(i) => serde_json::Value::from(*i),
            V::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            V::Str(s) => serde_json::Value::String(s.clone()),
            V::List(l) => serde_json::Value::Array(l.iter().map(V::to_json).collect()),
            V::Map(m, _) => {
                serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        match self {
            V::Map(m, _) => m.get(key),
            _ => None,
        }
    }
}

/// Fields of Kubernetes objects whose Go type is `map[string]string`.
pub fn is_string_map_field(k: &str) -> bool {
    matches!(
        k,
        "labels" | "annotations" | "nodeSelector" | "matchLabels" | "data"
    )
}

/// Go's `%v` for a float64 (shortest representation, exponent past 1e21).
pub fn go_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e21 {
        format!("{}", f as i64)
    } else {
        let s = format!("{f}");
        s
    }
}

/// Go exported name → JSON field name (`APIVersion` → `apiVersion`, `Spec` → `spec`).
pub fn go_to_json_name(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let upper_run = chars.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if upper_run == 0 {
        return name.to_string();
    }
    let lower_upto = if upper_run == chars.len() {
        upper_run
    } else if upper_run == 1 {
        1
    } else {
        upper_run - 1
    };
    chars
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i < lower_upto {
                c.to_ascii_lowercase()
            } else {
                *c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_names_map_to_json_names() {
        assert_eq!(go_to_json_name("APIVersion"), "apiVersion");
        assert_eq!(go_to_json_name("Spec"), "spec");
        assert_eq!(go_to_json_name("ServiceAccountName"), "serviceAccountName");
        assert_eq!(go_to_json_name("HTTPGet"), "httpGet");
        assert_eq!(go_to_json_name("ID"), "id");
    }
}
