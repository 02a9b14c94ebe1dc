// SPDX-License-Identifier: Apache-2.0
//! Per-request dynamic metadata (Envoy's `StreamInfo::dynamicMetadata()`: filter name → struct) and
//! the `envoy.type.matcher.v3.MetadataMatcher` / `ValueMatcher` that read it.

use crate::matcher::StringMatcher;
use std::collections::BTreeMap;

/// A `google.protobuf.Value`.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null_value`
    Null,
    /// `bool_value`
    Bool(bool),
    /// `number_value`
    Number(f64),
    /// `string_value`
    String(String),
    /// `list_value`
    List(Vec<Value>),
    /// `struct_value`
    Struct(Struct),
}

/// A `google.protobuf.Struct`.
pub type Struct = BTreeMap<String, Value>;

/// Dynamic metadata of one request or connection: one struct per filter namespace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DynamicMetadata(BTreeMap<String, Struct>);

impl DynamicMetadata {
    /// Sets `key` in the `filter` namespace (Envoy merges top-level keys per filter).
    pub fn set(&mut self, filter: &str, key: &str, value: Value) {
        self.0
            .entry(filter.to_owned())
            .or_default()
            .insert(key.to_owned(), value);
    }

    /// The struct of a filter namespace.
    pub fn filter(&self, filter: &str) -> Option<&Struct> {
        self.0.get(filter)
    }

    /// The value at `path` under `filter` (Envoy's `Metadata::metadataValue`): `None` when a key is
    /// missing or an intermediate value is not a struct.
    pub fn lookup<S: AsRef<str>>(&self, filter: &str, path: &[S]) -> Option<&Value> {
        let (first, rest) = path.split_first()?;
        let mut v = self.0.get(filter)?.get(first.as_ref())?;
        for key in rest {
            match v {
                Value::Struct(s) => v = s.get(key.as_ref())?,
                _ => return None,
            }
        }
        Some(v)
    }

    /// Nothing recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A compiled `ValueMatcher`.
#[derive(Debug, Clone)]
pub enum ValueMatcher {
    /// `null_match`
    Null,
    /// `double_match` with `exact`
    DoubleExact(f64),
    /// `double_match` with `range` (`start <= v < end`)
    DoubleRange(f64, f64),
    /// `string_match`
    String(StringMatcher),
    /// `bool_match`
    Bool(bool),
    /// `present_match`
    Present(bool),
    /// `list_match.one_of`
    ListOneOf(Box<ValueMatcher>),
    /// `or_match`
    Or(Vec<ValueMatcher>),
}

impl ValueMatcher {
    /// Does `value` (absent = Envoy's unset `Value`) match?
    pub fn matches(&self, value: Option<&Value>) -> bool {
        match (self, value) {
            (ValueMatcher::Present(p), v) => *p && v.is_some(),
            (ValueMatcher::Or(ms), v) => ms.iter().any(|m| m.matches(v)),
            (_, None) => false,
            (ValueMatcher::Null, Some(v)) => matches!(v, Value::Null),
            (ValueMatcher::DoubleExact(x), Some(Value::Number(n))) => n == x,
            (ValueMatcher::DoubleRange(s, e), Some(Value::Number(n))) => n >= s && n < e,
            (ValueMatcher::String(m), Some(Value::String(s))) => m.matches(s),
            (ValueMatcher::Bool(b), Some(Value::Bool(v))) => b == v,
            (ValueMatcher::ListOneOf(m), Some(Value::List(items))) => {
                items.iter().any(|i| m.matches(Some(i)))
            }
            _ => false,
        }
    }
}

/// A compiled `MetadataMatcher`.
#[derive(Debug, Clone)]
pub struct MetadataMatcher {
    /// `filter`
    pub filter: String,
    /// `path[].key`
    pub path: Vec<String>,
    /// `value`
    pub value: ValueMatcher,
    /// `invert`
    pub invert: bool,
}

impl MetadataMatcher {
    /// Does `md` satisfy this matcher?
    pub fn matches(&self, md: &DynamicMetadata) -> bool {
        self.value.matches(md.lookup(&self.filter, &self.path)) != self.invert
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matcher::StringMatch;

    #[test]
    fn lookup_and_match() {
        let mut md = DynamicMetadata::default();
        let mut payload = Struct::new();
        payload.insert("iss".into(), Value::String("https://issuer".into()));
        payload.insert(
            "groups".into(),
            Value::List(vec![Value::String("a".into()), Value::String("b".into())]),
        );
        md.set(
            "envoy.filters.http.jwt_authn",
            "payload",
            Value::Struct(payload),
        );
        let exact =
            |s: &str| ValueMatcher::String(StringMatcher::new(StringMatch::Exact(s.into()), false));
        let m = MetadataMatcher {
            filter: "envoy.filters.http.jwt_authn".into(),
            path: vec!["payload".into(), "iss".into()],
            value: ValueMatcher::Or(vec![
                exact("https://issuer"),
                ValueMatcher::ListOneOf(Box::new(exact("https://issuer"))),
            ]),
            invert: false,
        };
        assert!(m.matches(&md));
        let m = MetadataMatcher {
            path: vec!["payload".into(), "groups".into()],
            value: ValueMatcher::ListOneOf(Box::new(exact("b"))),
            ..m
        };
        assert!(m.matches(&md));
        let missing = MetadataMatcher {
            path: vec!["payload".into(), "nope".into()],
            ..m.clone()
        };
        assert!(!missing.matches(&md));
        assert!(
            MetadataMatcher {
                invert: true,
                ..missing
            }
            .matches(&md)
        );
        // A path through a non-struct value finds nothing.
        assert_eq!(
            md.lookup("envoy.filters.http.jwt_authn", &["payload", "iss", "x"]),
            None
        );
        assert!(!ValueMatcher::Present(false).matches(None));
        assert!(ValueMatcher::Present(true).matches(Some(&Value::Null)));
    }
}
