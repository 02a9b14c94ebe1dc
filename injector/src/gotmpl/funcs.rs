// SPDX-License-Identifier: Apache-2.0
//! Template functions: Go's builtins, the sprig functions Istio's templates use, and Istio's own
//! injection functions (`annotation`, `isset`, `excludeInboundPort`, `protoToJSON`, ...).
//! Semantics follow the Go implementations (notably Istio's `indent`, which leaves the first line
//! alone, unlike sprig's).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::value::{MapKind, V};

type R = Result<V, String>;

fn arg(args: &[V], i: usize) -> V {
    args.get(i).cloned().unwrap_or(V::Nil)
}

fn s(v: &V) -> String {
    match v {
        V::Nil => String::new(),
        other => other.to_go_string(),
    }
}

fn int(v: &V) -> Result<i64, String> {
    match v {
        V::Int(i) => Ok(*i),
        V::Float(f) => Ok(*f as i64),
        V::Str(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("expected a number, got {s:?}")),
        V::Bool(b) => Ok(i64::from(*b)),
        V::Nil => Ok(0),
        other => Err(format!("expected a number, got {}", other.to_go_string())),
    }
}

pub fn call(name: &str, a: Vec<V>) -> R {
    Ok(match name {
        // Go builtins.
        "not" => V::Bool(!arg(&a, 0).truthy()),
        "eq" => {
            let first = arg(&a, 0);
            V::Bool(a.iter().skip(1).any(|x| go_eq(&first, x)))
        }
        "ne" => V::Bool(!go_eq(&arg(&a, 0), &arg(&a, 1))),
        "lt" | "le" | "gt" | "ge" => {
            let o = compare(&arg(&a, 0), &arg(&a, 1))?;
            V::Bool(match name {
                "lt" => o.is_lt(),
                "le" => o.is_le(),
                "gt" => o.is_gt(),
                _ => o.is_ge(),
            })
        }
        "len" => V::Int(match arg(&a, 0) {
            V::Str(s) => s.len() as i64,
            V::List(l) => l.len() as i64,
            V::Map(m, _) => m.len() as i64,
            V::Nil => 0,
            other => return Err(format!("len of {}", other.to_go_string())),
        }),
        "index" => {
            let mut cur = arg(&a, 0);
            for k in a.iter().skip(1) {
                cur = match (&cur, k) {
                    (V::Map(m, kind), key) => {
                        let key = s(key);
                        match m.get(&key) {
                            Some(x) => x.clone(),
                            None if *kind == MapKind::Any => V::Nil,
                            None => V::str(""),
                        }
                    }
                    (V::List(l), i) => {
                        let i = int(i)?;
                        l.get(usize::try_from(i).map_err(|_| "index out of range")?)
                            .cloned()
                            .ok_or_else(|| format!("index out of range: {i}"))?
                    }
                    (V::Nil, _) => V::Nil,
                    (V::Str(st), _) if st.is_empty() => V::str(""),
                    (other, _) => {
                        return Err(format!("can't index item of type {}", other.to_go_string()));
                    }
                };
            }
            cur
        }
        "print" => V::Str(a.iter().map(s).collect::<Vec<_>>().concat()),
        "println" => V::Str(a.iter().map(s).collect::<Vec<_>>().join(" ") + "\n"),
        "printf" => V::Str(printf(&s(&arg(&a, 0)), &a[1.min(a.len())..])),
        // sprig.
        "quote" => V::Str(
            a.iter()
                .filter(|v| !matches!(v, V::Nil))
                .map(|v| go_quote(&s(v)))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        "squote" => V::Str(
            a.iter()
                .filter(|v| !matches!(v, V::Nil))
                .map(|v| format!("'{}'", s(v)))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        "default" => {
            let given = arg(&a, 1);
            if a.len() < 2 || given.is_empty() {
                arg(&a, 0)
            } else {
                given
            }
        }
        "empty" => V::Bool(arg(&a, 0).is_empty()),
        "coalesce" => a.iter().find(|v| !v.is_empty()).cloned().unwrap_or(V::Nil),
        "ternary" => {
            if arg(&a, 2).truthy() {
                arg(&a, 0)
            } else {
                arg(&a, 1)
            }
        }
        "trim" => V::Str(s(&arg(&a, 0)).trim().to_string()),
        "trimAll" => {
            let cut: Vec<char> = s(&arg(&a, 0)).chars().collect();
            V::Str(
                s(&arg(&a, 1))
                    .trim_matches(|c| cut.contains(&c))
                    .to_string(),
            )
        }
        "trimSuffix" => {
            let suf = s(&arg(&a, 0));
            let st = s(&arg(&a, 1));
            V::Str(st.strip_suffix(suf.as_str()).unwrap_or(&st).to_string())
        }
        "trimPrefix" => {
            let pre = s(&arg(&a, 0));
            let st = s(&arg(&a, 1));
            V::Str(st.strip_prefix(pre.as_str()).unwrap_or(&st).to_string())
        }
        "trunc" => {
            let n = int(&arg(&a, 0))?;
            let st = s(&arg(&a, 1));
            let len = st.len() as i64;
            V::Str(if n < 0 {
                let start = usize::try_from((len + n).max(0)).unwrap_or(0);
                st.get(start..).unwrap_or_default().to_string()
            } else if n < len {
                st.get(..usize::try_from(n).unwrap_or(0))
                    .unwrap_or_default()
                    .to_string()
            } else {
                st
            })
        }
        "contains" => V::Bool(s(&arg(&a, 1)).contains(&s(&arg(&a, 0)))),
        "hasPrefix" => V::Bool(s(&arg(&a, 1)).starts_with(&s(&arg(&a, 0)))),
        "hasSuffix" => V::Bool(s(&arg(&a, 1)).ends_with(&s(&arg(&a, 0)))),
        "lower" | "toLower" => V::Str(s(&arg(&a, 0)).to_lowercase()),
        "upper" | "toUpper" => V::Str(s(&arg(&a, 0)).to_uppercase()),
        "replace" => V::Str(s(&arg(&a, 2)).replace(&s(&arg(&a, 0)), &s(&arg(&a, 1)))),
        "toString" => V::Str(s(&arg(&a, 0))),
        "int" | "int64" => V::Int(int(&arg(&a, 0))?),
        "join" => {
            let sep = s(&arg(&a, 0));
            let parts: Vec<String> = match arg(&a, 1) {
                V::List(l) => l.iter().filter(|v| !matches!(v, V::Nil)).map(s).collect(),
                V::Nil => Vec::new(),
                other => vec![s(&other)],
            };
            V::Str(parts.join(&sep))
        }
        "split" | "splitList" => {
            let sep = s(&arg(&a, 0));
            V::list(s(&arg(&a, 1)).split(sep.as_str()).map(V::str).collect())
        }
        "list" => V::list(a),
        "append" | "push" => {
            let mut l = match arg(&a, 0) {
                V::List(l) => Arc::unwrap_or_clone(l),
                V::Nil => Vec::new(),
                other => return Err(format!("cannot append to {}", other.to_go_string())),
            };
            l.push(arg(&a, 1));
            V::list(l)
        }
        "first" => match arg(&a, 0) {
            V::List(l) => l.first().cloned().unwrap_or(V::Nil),
            _ => V::Nil,
        },
        "dict" => {
            let mut m = BTreeMap::new();
            for pair in a.chunks(2) {
                m.insert(s(&pair[0]), pair.get(1).cloned().unwrap_or(V::str("")));
            }
            V::map(m, MapKind::Any)
        }
        "hasKey" => V::Bool(arg(&a, 0).get(&s(&arg(&a, 1))).is_some()),
        "keys" => match arg(&a, 0) {
            V::Map(m, _) => V::list(m.keys().map(V::str).collect()),
            _ => V::list(Vec::new()),
        },
        "nindent" => {
            let n = usize::try_from(int(&arg(&a, 0))?).unwrap_or(0);
            V::Str(format!("\n{}", indent_all(n, &s(&arg(&a, 1)))))
        }
        "toJson" | "toJSON" | "toRawJson" => V::Str(to_json_string(&arg(&a, 0))),
        // Istio's functions.
        "indent" => {
            let n = usize::try_from(int(&arg(&a, 0))?).unwrap_or(0);
            let src = s(&arg(&a, 1));
            let pad = " ".repeat(n);
            let lines: Vec<String> = src
                .split('\n')
                .enumerate()
                .map(|(i, l)| {
                    if i > 0 {
                        format!("{pad}{l}")
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            V::Str(lines.join("\n"))
        }
        "toYaml" => V::Str(to_yaml(&arg(&a, 0))),
        "fromJSON" => {
            let src = s(&arg(&a, 0));
            match serde_json::from_str::<serde_json::Value>(&src) {
                Ok(j) => V::from_json(&j, MapKind::Any),
                Err(_) => V::str("{}"),
            }
        }
        "isset" => {
            V::Bool(matches!(arg(&a, 0), V::Map(ref m, _) if m.contains_key(&s(&arg(&a, 1)))))
        }
        "annotation" => {
            let meta = arg(&a, 0);
            let key = s(&arg(&a, 1));
            match meta.get("annotations").and_then(|m| m.get(&key)) {
                Some(v) => V::Str(s(v)),
                None => V::Str(arg(&a, 2).to_go_string()),
            }
        }
        "valueOrDefault" => {
            let v = arg(&a, 0);
            if matches!(&v, V::Nil) || matches!(&v, V::Str(x) if x.is_empty()) {
                arg(&a, 1)
            } else {
                v
            }
        }
        "excludeInboundPort" => V::Str(exclude_inbound_port(&arg(&a, 0), &s(&arg(&a, 1)))),
        "appendMultusNetwork" => V::Str(append_multus_network(&s(&arg(&a, 0)), &s(&arg(&a, 1)))),
        "structToJSON" => V::Str(match arg(&a, 0) {
            V::Nil => "{}".to_string(),
            v => crate::gojson::struct_to_json(&v),
        }),
        "protoToJSON" => V::Str(crate::meshcfg::proxy_config_to_json(&arg(&a, 0))),
        "directory" => {
            let p = s(&arg(&a, 0));
            V::Str(match p.rfind('/') {
                Some(i) => p[..=i].to_string(),
                None => String::new(),
            })
        }
        "env" => {
            let key = s(&arg(&a, 0));
            match std::env::var(&key) {
                Ok(v) if !v.is_empty() => V::Str(v),
                _ => arg(&a, 1),
            }
        }
        "omitNil" => omit_nil(&arg(&a, 0)).unwrap_or(V::Nil),
        "strdict" => {
            let mut m = BTreeMap::new();
            for pair in a.chunks(2) {
                m.insert(s(&pair[0]), V::Str(pair.get(1).map(s).unwrap_or_default()));
            }
            V::map(m, MapKind::StrMap)
        }
        "omit" => {
            let keys: Vec<String> = a.iter().skip(1).map(s).collect();
            match arg(&a, 0) {
                V::Map(m, k) => V::map(
                    m.iter()
                        .filter(|(x, _)| !keys.contains(x))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    k,
                ),
                _ => V::map(BTreeMap::new(), MapKind::StrMap),
            }
        }
        "mergeMaps" => merge_maps(&a),
        "toJsonMap" => V::Str(to_json_string(&merge_maps(&a))),
        "kubevirtInterfaces" | "excludeInterfaces" => V::Str(s(&arg(&a, 0))),
        "formatDuration" => V::Str(s(&arg(&a, 0))),
        "otelResourceAttributes" => V::Str(otel_resource_attributes(
            &arg(&a, 0),
            &arg(&a, 1),
            &arg(&a, 2),
            &s(&arg(&a, 3)),
            &arg(&a, 4),
        )),
        "includeInboundPorts" | "applicationPorts" => {
            let skip_proxy = name == "applicationPorts";
            let mut parts = Vec::new();
            if let V::List(cs) = arg(&a, 0) {
                for c in cs.iter() {
                    if skip_proxy && c.get("name").map(s).as_deref() == Some("istio-proxy") {
                        continue;
                    }
                    if let Some(V::List(ports)) = c.get("ports") {
                        for p in ports.iter() {
                            let proto = p.get("protocol").map(s).unwrap_or_default();
                            if proto == "UDP" || proto == "SCTP" {
                                continue;
                            }
                            parts.push(p.get("containerPort").map(s).unwrap_or_default());
                        }
                    }
                }
            }
            V::Str(parts.join(","))
        }
        other => return Err(format!("function {other:?} not defined")),
    })
}

fn merge_maps(a: &[V]) -> V {
    let mut out = BTreeMap::new();
    for m in a {
        if let V::Map(m, _) = m {
            for (k, v) in m.iter() {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    V::map(out, MapKind::StrMap)
}

/// Go template `eq`: equal when the values are equal; nil and an absent struct field compare equal
/// to any zero value (our model does not keep Go's static types).
pub fn go_eq(a: &V, b: &V) -> bool {
    match (a, b) {
        (V::Int(x), V::Float(y)) | (V::Float(y), V::Int(x)) => (*x as f64) == *y,
        (V::Nil, other) | (other, V::Nil) => other.is_empty(),
        (V::Str(x), other) | (other, V::Str(x)) if x.is_empty() && !matches!(other, V::Str(_)) => {
            other.is_empty()
        }
        _ => a == b,
    }
}

fn compare(a: &V, b: &V) -> Result<std::cmp::Ordering, String> {
    match (a, b) {
        (V::Str(x), V::Str(y)) => Ok(x.cmp(y)),
        _ => {
            let x = num(a)?;
            let y = num(b)?;
            x.partial_cmp(&y).ok_or_else(|| "incomparable".to_string())
        }
    }
}

fn num(v: &V) -> Result<f64, String> {
    match v {
        V::Int(i) => Ok(*i as f64),
        V::Float(f) => Ok(*f),
        V::Nil => Ok(0.0),
        V::Str(s) if s.is_empty() => Ok(0.0),
        other => Err(format!(
            "incompatible types for comparison: {}",
            other.to_go_string()
        )),
    }
}

/// `strconv.Quote`.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn printf(fmt: &str, args: &[V]) -> String {
    let mut out = String::new();
    let mut it = fmt.chars().peekable();
    let mut ai = 0;
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(verb) = it.next() else {
            out.push_str("%!(NOVERB)");
            break;
        };
        if verb == '%' {
            out.push('%');
            continue;
        }
        let Some(v) = args.get(ai) else {
            out.push_str(&format!("%!{verb}(MISSING)"));
            continue;
        };
        ai += 1;
        match verb {
            'q' => out.push_str(&go_quote(&v.to_go_string())),
            't' => out.push_str(&match v {
                V::Bool(b) => b.to_string(),
                other => format!("%!t({})", other.to_go_string()),
            }),
            'd' => out.push_str(&match v {
                V::Int(i) => i.to_string(),
                V::Float(f) => format!("%!d(float64={f})"),
                other => format!("%!d({})", other.to_go_string()),
            }),
            _ => out.push_str(&match v {
                V::Nil if verb == 's' => "%!s(<nil>)".to_string(),
                other => other.to_go_string(),
            }),
        }
    }
    out
}

fn indent_all(n: usize, src: &str) -> String {
    let pad = " ".repeat(n);
    src.split('\n')
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn to_json_string(v: &V) -> String {
    serde_json::to_string(&v.to_json()).unwrap_or_else(|_| "{}".into())
}

/// `sigs.k8s.io/yaml.Marshal`: JSON then YAML with sorted keys.
pub fn to_yaml(v: &V) -> String {
    let j = v.to_json();
    match j {
        serde_json::Value::Null => "null\n".to_string(),
        other => serde_yaml::to_string(&crate::gojson::sorted(&other)).unwrap_or_default(),
    }
}

fn omit_nil(v: &V) -> Option<V> {
    match v {
        V::Nil => None,
        V::Map(m, k) => {
            let out: BTreeMap<String, V> = m
                .iter()
                .filter_map(|(key, x)| omit_nil(x).map(|x| (key.clone(), x)))
                .collect();
            if out.is_empty() && !m.is_empty() {
                None
            } else {
                Some(V::map(out, *k))
            }
        }
        V::List(l) => {
            let out: Vec<V> = l.iter().filter_map(omit_nil).collect();
            if out.is_empty() && !l.is_empty() {
                None
            } else {
                Some(V::list(out))
            }
        }
        other => Some(other.clone()),
    }
}

fn exclude_inbound_port(port: &V, excluded: &str) -> String {
    let port_str = port.to_go_string().trim().to_string();
    if port_str.is_empty() || port_str == "0" {
        return excluded.to_string();
    }
    let mut out = Vec::new();
    for p in excluded.split(',') {
        if p == port_str {
            return excluded.to_string();
        }
        let p = p.trim();
        if !p.is_empty() {
            out.push(p.to_string());
        }
    }
    out.push(port_str);
    out.join(",")
}

fn append_multus_network(existing: &str, net: &str) -> String {
    if existing.is_empty() {
        return net.to_string();
    }
    if let Some(i) = existing.rfind(']') {
        let Ok(networks) =
            serde_json::from_str::<Vec<serde_json::Map<String, serde_json::Value>>>(existing)
        else {
            return existing.to_string();
        };
        let (ns, name) = match net.split_once('/') {
            Some((ns, name)) => (ns, name),
            None => ("", net),
        };
        for n in &networks {
            if n.get("name").and_then(|x| x.as_str()) == Some(name)
                && n.get("namespace").and_then(|x| x.as_str()).unwrap_or("") == ns
            {
                return existing.to_string();
            }
        }
        let add = if ns.is_empty() {
            format!(", {{\"name\": \"{name}\"}}")
        } else {
            format!(", {{\"name\": \"{name}\", \"namespace\": \"{ns}\"}}")
        };
        return format!("{}{}{}", &existing[..i], add, &existing[i..]);
    }
    if existing.split(',').any(|n| n.trim() == net) {
        return existing.to_string();
    }
    format!("{existing}, {net}")
}

fn otel_resource_attributes(
    mesh: &V,
    annotations: &V,
    labels: &V,
    namespace: &str,
    containers: &V,
) -> String {
    let enabled = match mesh.get("extensionProviders") {
        Some(V::List(eps)) => eps.iter().any(|ep| {
            ep.get("opentelemetry")
                .and_then(|o| o.get("serviceAttributeEnrichment"))
                .map(|x| x.to_go_string() == "OTEL_SEMANTIC_CONVENTIONS")
                .unwrap_or(false)
        }),
        _ => false,
    };
    if !enabled {
        return String::new();
    }
    let get = |m: &V, k: &str| m.get(k).map(|x| x.to_go_string()).filter(|x| !x.is_empty());
    let containers = match containers {
        V::List(l) => l.to_vec(),
        _ => Vec::new(),
    };
    let mut attrs = Vec::new();
    if let Some(v) = get(annotations, "resource.opentelemetry.io/service.namespace") {
        attrs.push(format!("service.namespace={v}"));
    } else if !namespace.is_empty() {
        attrs.push(format!("service.namespace={namespace}"));
    }
    if let Some(v) = get(annotations, "resource.opentelemetry.io/service.version") {
        attrs.push(format!("service.version={v}"));
    } else if let Some(v) = get(labels, "app.kubernetes.io/version") {
        attrs.push(format!("service.version={v}"));
    } else if containers.len() == 1 {
        let image = containers[0]
            .get("image")
            .map(|x| x.to_go_string())
            .unwrap_or_default();
        let (mut img, mut digest) = (image.as_str(), "");
        if let Some(i) = img.find('@') {
            digest = &image[i + 1..];
            img = &image[..i];
        }
        let slash = img.rfind('/').map(|x| x as i64).unwrap_or(-1);
        let colon = img.rfind(':').map(|x| x as i64).unwrap_or(-1);
        let tag = if colon > slash {
            &img[usize::try_from(colon).unwrap_or(0) + 1..]
        } else {
            ""
        };
        if !tag.is_empty() && !digest.is_empty() {
            attrs.push(format!("service.version={tag}@{digest}"));
        } else if !digest.is_empty() {
            attrs.push(format!("service.version={digest}"));
        } else if !tag.is_empty() {
            attrs.push(format!("service.version={tag}"));
        }
    }
    if let Some(v) = get(annotations, "resource.opentelemetry.io/service.instance.id") {
        attrs.push(format!("service.instance.id={v}"));
    } else if let Some(c) = containers.first() {
        let name = c.get("name").map(|x| x.to_go_string()).unwrap_or_default();
        attrs.push(format!(
            "service.instance.id={namespace}.$(POD_NAME).{name}"
        ));
    }
    attrs.join(",")
}
