// SPDX-License-Identifier: Apache-2.0
//! What a request produced on one proxy, and how two of those are compared.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Deserialize;

use crate::client::Response;
use crate::echo::EchoRecord;

/// Shown for a field that has no value on one side.
pub const ABSENT: &str = "<absent>";
/// Shown for upstream-side fields when the response did not come from an upstream.
pub const NO_UPSTREAM: &str = "<local reply>";

/// One response (or transport failure) as seen by the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// Transport failure class (`closed`, `timeout`, `connect`, …); `None` when a response came.
    pub error: Option<String>,
    pub status: Option<u16>,
    pub response_headers: Vec<(String, String)>,
    pub body: String,
    /// The echo upstream that answered (`x-upstream`), if any.
    pub upstream: Option<String>,
    /// The request as the echo upstream saw it (its JSON body), if the body parsed.
    pub echo: Option<EchoRecord>,
    /// Wall time from sending to the complete response (a timing class, never compared exactly).
    pub elapsed_ms: u64,
}

impl Observation {
    pub fn from_response(resp: &Response) -> Self {
        Self {
            error: None,
            status: Some(resp.status),
            response_headers: resp.headers.clone(),
            body: resp.body_text(),
            upstream: resp.header("x-upstream").map(str::to_owned),
            echo: serde_json::from_slice(&resp.body).ok(),
            elapsed_ms: 0,
        }
    }

    pub fn from_error(class: &str) -> Self {
        Self {
            error: Some(class.to_owned()),
            ..Self::default()
        }
    }

    /// The key used for distributions: the upstream name, else `local:<status>`, else
    /// `error:<class>`.
    pub fn outcome_key(&self) -> String {
        match (&self.error, &self.upstream, self.status) {
            (Some(e), _, _) => format!("error:{e}"),
            (None, Some(u), _) => u.clone(),
            (None, None, Some(s)) => format!("local:{s}"),
            (None, None, None) => "unknown".to_owned(),
        }
    }

    fn response_header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .response_headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            // HTTP/1.1 connections are persistent by default: an explicit `connection: keep-alive`
            // (Pingora writes it, Envoy does not) means the same as none. `close` still counts.
            // Listed in docs/COMPATIBILITY.md.
            .filter(|(k, v)| {
                !(k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("keep-alive"))
            })
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    fn echo_field(&self, f: impl Fn(&EchoRecord) -> String) -> String {
        self.echo.as_ref().map_or_else(|| NO_UPSTREAM.to_owned(), f)
    }
}

/// Which fields must be equal between A and B. Scenario-level, overridable per request.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompareSpec {
    pub status: bool,
    /// The answering upstream (`x-upstream`), or local reply.
    pub upstream: bool,
    pub upstream_method: bool,
    /// The raw request target the upstream received.
    pub upstream_path: bool,
    pub upstream_body: bool,
    /// Request headers at the upstream whose values must match (all values, joined).
    pub upstream_headers: Vec<String>,
    /// Request headers at the upstream that must be present on both or absent on both.
    pub upstream_headers_present: Vec<String>,
    /// Response headers whose values must match.
    pub response_headers: Vec<String>,
    /// Response headers that must be present on both or absent on both.
    pub response_headers_present: Vec<String>,
    /// The response body, unless both responses carry an echo record (those hold random ids).
    pub body: bool,
    /// With `body`: compare only the body lines containing this text (e.g. `health_flags` of an
    /// admin `/clusters` page), sorted (Envoy lists clusters in hash-map order).
    pub body_lines: Option<String>,
    /// For `repeat` requests: the allowed absolute difference of each outcome's share
    /// (e.g. 0.05). Default: 4 sigma of the difference of two binomial proportions.
    pub distribution_tolerance: Option<f64>,
}

/// One field that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub field: String,
    pub a: String,
    pub b: String,
}

impl Diff {
    fn new(field: impl Into<String>, a: impl Into<String>, b: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            a: a.into(),
            b: b.into(),
        }
    }
}

fn push_if_differs(out: &mut Vec<Diff>, field: &str, a: String, b: String) {
    if a != b {
        out.push(Diff::new(field, a, b));
    }
}

fn present(v: Option<String>) -> String {
    if v.is_some() { "present" } else { "absent" }.to_owned()
}

fn or_absent(v: Option<String>) -> String {
    v.unwrap_or_else(|| ABSENT.to_owned())
}

/// Compares two single observations field by field, as `spec` asks.
pub fn compare(spec: &CompareSpec, a: &Observation, b: &Observation) -> Vec<Diff> {
    let mut out = Vec::new();
    if a.error.is_some() || b.error.is_some() {
        let show = |o: &Observation| match &o.error {
            Some(e) => format!("transport error: {e}"),
            None => format!("response {}", o.status.unwrap_or_default()),
        };
        push_if_differs(&mut out, "transport", show(a), show(b));
        return out;
    }
    let status = |o: &Observation| o.status.map(|s| s.to_string()).unwrap_or_default();
    if spec.status {
        push_if_differs(&mut out, "status", status(a), status(b));
    }
    let upstream = |o: &Observation| o.upstream.clone().unwrap_or_else(|| NO_UPSTREAM.into());
    if spec.upstream {
        push_if_differs(&mut out, "upstream", upstream(a), upstream(b));
    }
    if spec.upstream_method {
        let f = |o: &Observation| o.echo_field(|e| e.method.clone());
        push_if_differs(&mut out, "upstream_method", f(a), f(b));
    }
    if spec.upstream_path {
        let f = |o: &Observation| o.echo_field(|e| e.path.clone());
        push_if_differs(&mut out, "upstream_path", f(a), f(b));
    }
    if spec.upstream_body {
        let f = |o: &Observation| o.echo_field(|e| e.body.clone());
        push_if_differs(&mut out, "upstream_body", f(a), f(b));
    }
    for name in &spec.upstream_headers {
        let f = |o: &Observation| o.echo_field(|e| or_absent(e.header(name)));
        push_if_differs(&mut out, &format!("upstream header {name}"), f(a), f(b));
    }
    for name in &spec.upstream_headers_present {
        let f = |o: &Observation| o.echo_field(|e| present(e.header(name)));
        push_if_differs(&mut out, &format!("upstream header {name}"), f(a), f(b));
    }
    for name in &spec.response_headers {
        let f = |o: &Observation| or_absent(o.response_header(name));
        push_if_differs(&mut out, &format!("response header {name}"), f(a), f(b));
    }
    for name in &spec.response_headers_present {
        let f = |o: &Observation| present(o.response_header(name));
        push_if_differs(&mut out, &format!("response header {name}"), f(a), f(b));
    }
    if spec.body && !(a.echo.is_some() && b.echo.is_some()) {
        let lines = |body: &str| match &spec.body_lines {
            Some(pat) => {
                let mut v: Vec<&str> = body.lines().filter(|l| l.contains(pat.as_str())).collect();
                v.sort_unstable();
                v.join("\n")
            }
            None => body.to_owned(),
        };
        push_if_differs(&mut out, "body", lines(&a.body), lines(&b.body));
    }
    out
}

/// Counts of [`Observation::outcome_key`] over a repeated request.
pub fn distribution(observations: &[Observation]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for o in observations {
        *counts.entry(o.outcome_key()).or_insert(0) += 1;
    }
    counts
}

fn share(count: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { count as f64 / n as f64 }
}

fn show_share(count: u64, n: u64) -> String {
    format!("{count}/{n} ({:.1}%)", 100.0 * share(count, n))
}

/// Compares two outcome distributions: each outcome's share may differ by at most `tolerance`
/// (absolute), or by default 4 sigma of the difference of two binomial proportions
/// (pooled estimate, floored at one sample of the smaller run so tiny p never forbids 1 count).
pub fn compare_distributions(
    a: &BTreeMap<String, u64>,
    b: &BTreeMap<String, u64>,
    tolerance: Option<f64>,
) -> Vec<Diff> {
    let na: u64 = a.values().sum();
    let nb: u64 = b.values().sum();
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut out = Vec::new();
    for key in keys {
        let ca = a.get(key).copied().unwrap_or(0);
        let cb = b.get(key).copied().unwrap_or(0);
        let (pa, pb) = (share(ca, na), share(cb, nb));
        let tol = tolerance.unwrap_or_else(|| {
            let pooled = share(ca + cb, na + nb);
            let sigma =
                (pooled * (1.0 - pooled) * (1.0 / na.max(1) as f64 + 1.0 / nb.max(1) as f64))
                    .sqrt();
            (4.0 * sigma).max(1.0 / na.min(nb).max(1) as f64)
        });
        if (pa - pb).abs() > tol {
            out.push(Diff::new(
                format!("distribution[{key}] (tol {:.1}%)", 100.0 * tol),
                show_share(ca, na),
                show_share(cb, nb),
            ));
        }
    }
    out
}

/// Checks one distribution against expected shares (4 sigma of one binomial proportion,
/// or `tolerance`). Returns `(key, actual, expected)` for each violation.
pub fn check_expected_distribution(
    actual: &BTreeMap<String, u64>,
    expected: &BTreeMap<String, f64>,
    tolerance: Option<f64>,
) -> Vec<(String, String, String)> {
    let n: u64 = actual.values().sum();
    let keys: BTreeSet<&String> = actual.keys().chain(expected.keys()).collect();
    let mut out = Vec::new();
    for key in keys {
        let count = actual.get(key).copied().unwrap_or(0);
        let want = expected.get(key).copied().unwrap_or(0.0);
        let tol = tolerance.unwrap_or_else(|| {
            (4.0 * (want * (1.0 - want) / n.max(1) as f64).sqrt()).max(1.0 / n.max(1) as f64)
        });
        if (share(count, n) - want).abs() > tol {
            out.push((
                key.clone(),
                show_share(count, n),
                format!("{:.1}% ±{:.1}%", 100.0 * want, 100.0 * tol),
            ));
        }
    }
    out
}

/// One row of the mismatch table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub scenario: String,
    pub request: String,
    pub field: String,
    pub a: String,
    pub b: String,
}

/// Widest a cell may get before it is cut (full values follow below the table).
const CELL: usize = 60;

fn cell(s: &str) -> String {
    let escaped = s.escape_debug().to_string();
    if escaped.chars().count() > CELL {
        let cut: String = escaped.chars().take(CELL - 1).collect();
        format!("{cut}…")
    } else {
        escaped
    }
}

/// Renders mismatches as an aligned table; cells longer than 60 chars are cut in the table and
/// listed in full underneath.
pub fn render_table(rows: &[Mismatch], a_label: &str, b_label: &str) -> String {
    let header = [
        "scenario".to_owned(),
        "request".to_owned(),
        "field".to_owned(),
        format!("A ({a_label})"),
        format!("B ({b_label})"),
    ];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|m| {
            [
                cell(&m.scenario),
                cell(&m.request),
                cell(&m.field),
                cell(&m.a),
                cell(&m.b),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[String; 5]| {
        let parts: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "| {} |", parts.join(" | "));
    };
    line(&mut out, &header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let _ = writeln!(out, "|-{}-|", rule.join("-|-"));
    for row in &cells {
        line(&mut out, row);
    }
    for m in rows {
        let long = |s: &str| s.escape_debug().to_string().chars().count() > CELL;
        if long(&m.a) || long(&m.b) {
            let _ = writeln!(
                out,
                "\n{} / {} / {}:\n  A: {:?}\n  B: {:?}",
                m.scenario, m.request, m.field, m.a, m.b
            );
        }
    }
    out
}

#[cfg(test)]
mod tests;
