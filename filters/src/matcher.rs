// SPDX-License-Identifier: Apache-2.0
//! String and header matchers with Envoy's semantics (`envoy.type.matcher.v3.StringMatcher`,
//! `envoy.config.route.v3.HeaderMatcher`, `QueryParameterMatcher`).

use regex::Regex;

/// A compiled `StringMatcher`.
#[derive(Debug, Clone)]
pub enum StringMatch {
    /// `exact`
    Exact(String),
    /// `prefix`
    Prefix(String),
    /// `suffix`
    Suffix(String),
    /// `contains`
    Contains(String),
    /// `safe_regex`: the whole value must match (Envoy anchors RE2 full matches).
    Regex(Regex),
}

/// A `StringMatcher` with its `ignore_case` flag; for `ignore_case` the pattern is stored lower-cased.
#[derive(Debug, Clone)]
pub struct StringMatcher {
    /// What to match.
    pub kind: StringMatch,
    /// Compare ASCII case-insensitively (not applicable to regexes, as in Envoy).
    pub ignore_case: bool,
}

impl StringMatcher {
    /// Builds a matcher; with `ignore_case` the literal pattern is lower-cased once here.
    pub fn new(kind: StringMatch, ignore_case: bool) -> Self {
        let kind = match (kind, ignore_case) {
            (StringMatch::Exact(s), true) => StringMatch::Exact(s.to_ascii_lowercase()),
            (StringMatch::Prefix(s), true) => StringMatch::Prefix(s.to_ascii_lowercase()),
            (StringMatch::Suffix(s), true) => StringMatch::Suffix(s.to_ascii_lowercase()),
            (StringMatch::Contains(s), true) => StringMatch::Contains(s.to_ascii_lowercase()),
            (k, _) => k,
        };
        StringMatcher { kind, ignore_case }
    }

    /// Does `value` match?
    pub fn matches(&self, value: &str) -> bool {
        match &self.kind {
            StringMatch::Regex(re) => full_match(re, value),
            StringMatch::Exact(p) if self.ignore_case => value.eq_ignore_ascii_case(p),
            StringMatch::Exact(p) => value == p,
            StringMatch::Prefix(p) if self.ignore_case => {
                value.len() >= p.len()
                    && value.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(p) if self.ignore_case => {
                value.len() >= p.len()
                    && value.as_bytes()[value.len() - p.len()..].eq_ignore_ascii_case(p.as_bytes())
            }
            StringMatch::Suffix(p) => value.ends_with(p.as_str()),
            StringMatch::Contains(p) if self.ignore_case => {
                value.to_ascii_lowercase().contains(p.as_str())
            }
            StringMatch::Contains(p) => value.contains(p.as_str()),
        }
    }
}

/// RE2 `FullMatch` semantics: `re` must come from [`compile_full`], which anchors it.
pub fn full_match(re: &Regex, value: &str) -> bool {
    re.is_match(value)
}

/// Compiles a regex so that it can only match the whole input, as RE2's `FullMatch` does.
pub fn compile_full(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

/// How a header (or query parameter) value is tested.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    /// `present_match: true` (or a bare name for query parameters).
    Present,
    /// `range_match`: `start <= v < end` for a value that parses as i64.
    Range {
        /// inclusive
        start: i64,
        /// exclusive
        end: i64,
    },
    /// Any `StringMatcher` shape (including the deprecated `exact_match` etc. fields).
    String(StringMatcher),
}

/// A compiled `HeaderMatcher`.
#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    /// Lower-cased header name (`:authority`, `:path`, `:method` and `:scheme` are pseudo-headers).
    pub name: http::HeaderName,
    /// Pseudo-header selector, when `name` starts with ':'.
    pub pseudo: Option<Pseudo>,
    /// The test.
    pub value: ValueMatch,
    /// `invert_match`.
    pub invert: bool,
    /// `treat_missing_header_as_empty`.
    pub missing_as_empty: bool,
}

/// The pseudo-headers Envoy lets a `HeaderMatcher` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pseudo {
    /// `:authority`
    Authority,
    /// `:path`
    Path,
    /// `:method`
    Method,
    /// `:scheme`
    Scheme,
}

/// What a matcher can see of a request.
pub trait HeaderSource {
    /// All values of a regular header, joined with ","; `None` if absent (used for hashing).
    fn header(&self, name: &http::HeaderName) -> Option<std::borrow::Cow<'_, str>>;
    /// Calls `test` on each value of a regular header until one passes: `Some(true)` if one did,
    /// `Some(false)` if none did, `None` if the header is absent. Envoy 1.40 matches a header
    /// with several values when any single value matches (values are not joined).
    fn any_value(
        &self,
        name: &http::HeaderName,
        test: &mut dyn FnMut(&str) -> bool,
    ) -> Option<bool> {
        self.header(name).map(|v| test(&v))
    }
    /// The value of a pseudo-header.
    fn pseudo(&self, p: Pseudo) -> Option<&str>;
}

impl HeaderMatcher {
    /// Does the request satisfy this matcher?
    pub fn matches(&self, req: &impl HeaderSource) -> bool {
        let mut test = |v: &str| match &self.value {
            ValueMatch::Present => true,
            ValueMatch::Range { start, end } => {
                v.parse::<i64>().is_ok_and(|n| n >= *start && n < *end)
            }
            ValueMatch::String(m) => m.matches(v),
        };
        let hit = match self.pseudo {
            Some(p) => req.pseudo(p).map(&mut test),
            None => req.any_value(&self.name, &mut test),
        };
        let hit = match hit {
            Some(h) => h,
            None if self.missing_as_empty => test(""),
            // Envoy: an absent header never matches, even with invert_match (unless it is
            // `present_match: false`, which is expressed as Present with invert).
            None => return matches!(self.value, ValueMatch::Present) && self.invert,
        };
        hit != self.invert
    }
}

/// A compiled `QueryParameterMatcher`.
#[derive(Debug, Clone)]
pub struct QueryMatcher {
    /// Parameter name (exact, case-sensitive).
    pub name: String,
    /// `present_match` or `string_match`.
    pub value: ValueMatch,
}

impl QueryMatcher {
    /// Tests the raw query string (without '?'). Envoy uses the first occurrence of a parameter.
    pub fn matches(&self, query: Option<&str>) -> bool {
        let found = query.and_then(|q| {
            q.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == self.name).then_some(v)
            })
        });
        match (&self.value, found) {
            (_, None) => false,
            (ValueMatch::Present, Some(_)) => true,
            (ValueMatch::String(m), Some(v)) => m.matches(v),
            (ValueMatch::Range { .. }, Some(_)) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_matchers() {
        let m = StringMatcher::new(StringMatch::Prefix("/API".into()), true);
        assert!(m.matches("/api/x"));
        assert!(!m.matches("/ap"));
        let m = StringMatcher::new(StringMatch::Regex(compile_full("/v[0-9]+").unwrap()), false);
        assert!(m.matches("/v12"));
        assert!(!m.matches("/v12/x"));
        let m = StringMatcher::new(StringMatch::Suffix(".JS".into()), true);
        assert!(m.matches("a.js"));
    }

    struct Multi(http::HeaderMap);

    impl HeaderSource for Multi {
        fn header(&self, name: &http::HeaderName) -> Option<std::borrow::Cow<'_, str>> {
            let v: Vec<&str> = self
                .0
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            (!v.is_empty()).then(|| std::borrow::Cow::Owned(v.join(",")))
        }
        fn any_value(
            &self,
            name: &http::HeaderName,
            test: &mut dyn FnMut(&str) -> bool,
        ) -> Option<bool> {
            let mut it = self.0.get_all(name).iter().peekable();
            it.peek()?;
            Some(it.any(|v| test(v.to_str().unwrap())))
        }
        fn pseudo(&self, _: Pseudo) -> Option<&str> {
            None
        }
    }

    fn exact(name: &'static str, value: &str, invert: bool) -> HeaderMatcher {
        HeaderMatcher {
            name: http::HeaderName::from_static(name),
            pseudo: None,
            value: ValueMatch::String(StringMatcher::new(StringMatch::Exact(value.into()), false)),
            invert,
            missing_as_empty: false,
        }
    }

    #[test]
    fn several_values_match_one_by_one() {
        let mut h = http::HeaderMap::new();
        h.append("x-m", "a".parse().unwrap());
        h.append("x-m", "b".parse().unwrap());
        let req = Multi(h);
        assert!(exact("x-m", "a", false).matches(&req));
        assert!(exact("x-m", "b", false).matches(&req));
        assert!(!exact("x-m", "a,b", false).matches(&req));
        assert!(!exact("x-m", "b", true).matches(&req));
        assert!(exact("x-m", "c", true).matches(&req));
        // Absent: never matches, inverted or not; unless treated as empty.
        assert!(!exact("x-absent", "c", true).matches(&req));
        let mut m = exact("x-absent", "", false);
        m.missing_as_empty = true;
        assert!(m.matches(&req));
    }

    #[test]
    fn query_first_occurrence() {
        let q = QueryMatcher {
            name: "a".into(),
            value: ValueMatch::String(StringMatcher::new(StringMatch::Exact("1".into()), false)),
        };
        assert!(q.matches(Some("b=2&a=1&a=3")));
        assert!(!q.matches(Some("a=3&a=1")));
        assert!(!q.matches(None));
    }
}
