// SPDX-License-Identifier: Apache-2.0
//! Header mutations (`request_headers_to_add` / `_to_remove` and their response twins) with Envoy's
//! `append_action` semantics and level order.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `HeaderValueOption.append_action` (and the deprecated `append` mapped onto it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    /// Append to existing values, or add (default).
    AppendIfExistsOrAdd,
    /// Add only if absent.
    AddIfAbsent,
    /// Replace all values, or add.
    OverwriteIfExistsOrAdd,
    /// Replace only if present.
    OverwriteIfExists,
}

/// A header collection that mutations can be applied to (the proxy wraps Pingora's header types).
pub trait HeaderMut {
    /// Removes all values.
    fn remove(&mut self, name: &HeaderName);
    /// Is the header present?
    fn contains(&self, name: &HeaderName) -> bool;
    /// Replaces all values.
    fn insert(&mut self, name: &HeaderName, value: &HeaderValue);
    /// Adds a value.
    fn append(&mut self, name: &HeaderName, value: &HeaderValue);
}

impl HeaderMut for HeaderMap {
    fn remove(&mut self, name: &HeaderName) {
        HeaderMap::remove(self, name);
    }
    fn contains(&self, name: &HeaderName) -> bool {
        self.contains_key(name)
    }
    fn insert(&mut self, name: &HeaderName, value: &HeaderValue) {
        HeaderMap::insert(self, name.clone(), value.clone());
    }
    fn append(&mut self, name: &HeaderName, value: &HeaderValue) {
        HeaderMap::append(self, name.clone(), value.clone());
    }
}

/// One header to add.
#[derive(Debug, Clone)]
pub struct HeaderAdd {
    /// Lower-case name.
    pub name: HeaderName,
    /// Literal value (formatter commands are refused by translation).
    pub value: HeaderValue,
    /// What to do when the header exists.
    pub action: AppendAction,
    /// `keep_empty_value`: without it an empty value is not added.
    pub keep_empty: bool,
}

/// The mutations of one level (route, virtual host, route configuration, weighted cluster).
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    /// Removed first.
    pub remove: Vec<HeaderName>,
    /// Then added, in order.
    pub add: Vec<HeaderAdd>,
}

impl HeaderOps {
    /// True when there is nothing to do (the common case: lets callers skip work).
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    /// Applies removals, then additions, as Envoy's header parser evaluates one level.
    pub fn apply(&self, headers: &mut impl HeaderMut) {
        for name in &self.remove {
            headers.remove(name);
        }
        for h in &self.add {
            if h.value.is_empty() && !h.keep_empty {
                continue;
            }
            match h.action {
                AppendAction::AppendIfExistsOrAdd => headers.append(&h.name, &h.value),
                AppendAction::AddIfAbsent => {
                    if !headers.contains(&h.name) {
                        headers.insert(&h.name, &h.value);
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => headers.insert(&h.name, &h.value),
                AppendAction::OverwriteIfExists => {
                    if headers.contains(&h.name) {
                        headers.insert(&h.name, &h.value);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(name: &'static str, value: &'static str, action: AppendAction) -> HeaderAdd {
        HeaderAdd {
            name: HeaderName::from_static(name),
            value: HeaderValue::from_static(value),
            action,
            keep_empty: false,
        }
    }

    #[test]
    fn actions() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("client"));
        let ops = HeaderOps {
            remove: vec![],
            add: vec![
                add("x-a", "route", AppendAction::AppendIfExistsOrAdd),
                add("x-b", "b", AppendAction::OverwriteIfExists),
                add("x-c", "c", AppendAction::AddIfAbsent),
                add("x-c", "c2", AppendAction::AddIfAbsent),
                add("x-e", "", AppendAction::AppendIfExistsOrAdd),
            ],
        };
        ops.apply(&mut h);
        let a: Vec<_> = h
            .get_all("x-a")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(a, ["client", "route"]);
        assert!(h.get("x-b").is_none());
        assert_eq!(h.get("x-c").unwrap(), "c");
        assert!(h.get("x-e").is_none());
    }
}
