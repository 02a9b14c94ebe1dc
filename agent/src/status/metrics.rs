// SPDX-License-Identifier: Apache-2.0
//! Merging Prometheus expositions into one: the agent's own `istio_agent_*` metrics, the proxy's
//! `/stats/prometheus` and the app's metrics (ISTIO_PROMETHEUS_ANNOTATIONS). The answer's format is
//! the app's (text 0.0.4 or OpenMetrics), as pilot-agent negotiates it; unlike pilot-agent's byte
//! concatenation, families are merged by name so the result stays one valid exposition: one HELP and
//! TYPE per family, a family's samples together, a repeated series kept once (first source wins),
//! and a single `# EOF` at the end of OpenMetrics.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

/// The Prometheus text format, as pilot-agent answers it.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// OpenMetrics 1.0.0.
pub const OPENMETRICS_1: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// OpenMetrics 0.0.1.
pub const OPENMETRICS_0: &str = "application/openmetrics-text; version=0.0.1; charset=utf-8";

/// The exposition format of a scraped body, from its `Content-Type` (pilot-agent's negotiation:
/// OpenMetrics 1.0.0, OpenMetrics 0.0.1 or unversioned, anything else is text).
pub fn negotiate(content_type: &str) -> &'static str {
    let mut parts = content_type.split(';').map(str::trim);
    let media = parts.next().unwrap_or("").to_ascii_lowercase();
    if media != "application/openmetrics-text" {
        return TEXT;
    }
    let version = parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("version"))
        .map(|(_, v)| v.trim().trim_matches('"').to_owned());
    match version.as_deref() {
        Some("1.0.0") => OPENMETRICS_1,
        Some("0.0.1") | None | Some("") => OPENMETRICS_0,
        _ => TEXT,
    }
}

fn is_om(format: &str) -> bool {
    format.starts_with("application/openmetrics-text")
}

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    /// the label set as written, without braces
    labels: String,
    /// value and optional timestamp / exemplar, as written
    rest: String,
}

#[derive(Debug, Clone, Default)]
struct Family {
    name: String,
    help: Option<String>,
    kind: Option<String>,
    unit: Option<String>,
    om: bool,
    samples: Vec<Sample>,
}

const SUFFIXES: &[&str] = &[
    "_total", "_created", "_bucket", "_count", "_sum", "_gcount", "_gsum", "_info",
];

fn belongs(family: &str, sample: &str) -> bool {
    sample == family
        || sample
            .strip_prefix(family)
            .is_some_and(|rest| SUFFIXES.contains(&rest))
}

/// Splits `name{labels} rest` (labels may contain quoted `}`).
fn split_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let after = &line[name_end..];
    let (labels, rest) = if let Some(inner) = after.strip_prefix('{') {
        let mut in_quote = false;
        let mut escaped = false;
        let mut end = None;
        for (i, c) in inner.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quote => escaped = true,
                '"' => in_quote = !in_quote,
                '}' if !in_quote => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end?;
        (inner[..end].trim(), inner[end + 1..].trim())
    } else {
        ("", after.trim())
    };
    if rest.is_empty() {
        return None;
    }
    Some(Sample {
        name: name.to_owned(),
        labels: labels.trim_end_matches(',').to_owned(),
        rest: rest.to_owned(),
    })
}

/// Parses one exposition into families in order of appearance. Unparseable lines are dropped.
fn parse(body: &str, om: bool) -> Vec<Family> {
    let mut out: Vec<Family> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut current: Option<usize> = None;
    let family = |out: &mut Vec<Family>, index: &mut HashMap<String, usize>, name: &str| -> usize {
        *index.entry(name.to_owned()).or_insert_with(|| {
            out.push(Family {
                name: name.to_owned(),
                om,
                ..Default::default()
            });
            out.len() - 1
        })
    };
    for line in body.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim_start();
            if comment == "EOF" && om {
                break;
            }
            let mut it = comment.splitn(3, ' ');
            let (Some(word), Some(name)) = (it.next(), it.next()) else {
                continue;
            };
            let text = it.next().unwrap_or("").to_owned();
            let slot = match word {
                "HELP" | "TYPE" | "UNIT" => family(&mut out, &mut index, name),
                _ => continue,
            };
            current = Some(slot);
            let f = &mut out[slot];
            match word {
                "HELP" => {
                    f.help.get_or_insert(text);
                }
                "TYPE" => {
                    f.kind.get_or_insert(text.trim().to_owned());
                }
                _ => {
                    f.unit.get_or_insert(text.trim().to_owned());
                }
            }
            continue;
        }
        let Some(sample) = split_sample(line) else {
            continue;
        };
        let slot = match current {
            Some(c) if belongs(&out[c].name, &sample.name) => c,
            _ => {
                let known = SUFFIXES
                    .iter()
                    .filter_map(|s| sample.name.strip_suffix(s))
                    .chain(std::iter::once(sample.name.as_str()))
                    .find_map(|n| index.get(n).copied());
                match known {
                    Some(k) => k,
                    None => family(&mut out, &mut index, &sample.name.clone()),
                }
            }
        };
        current = Some(slot);
        out[slot].samples.push(sample);
    }
    out
}

/// Merges expositions (`(body, format)`, earlier sources win) into one body of `format`.
pub fn merge(sources: &[(&str, &str)], format: &str) -> String {
    let om_out = is_om(format);
    let mut merged: Vec<Family> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for (body, fmt) in sources {
        for f in parse(body, is_om(fmt)) {
            let f = if om_out { to_om(f) } else { to_text(f) };
            let slot = match by_name.get(&f.name) {
                Some(&i) => {
                    if merged[i].kind != f.kind && f.kind.is_some() && merged[i].kind.is_some() {
                        tracing::debug!(
                            family = f.name,
                            "metric family with two types; dropping the later one"
                        );
                        continue;
                    }
                    i
                }
                None => {
                    by_name.insert(f.name.clone(), merged.len());
                    merged.push(Family {
                        samples: Vec::new(),
                        ..f.clone()
                    });
                    merged.len() - 1
                }
            };
            let target = &mut merged[slot];
            target.help = target.help.take().or(f.help);
            target.kind = target.kind.take().or(f.kind);
            for s in f.samples {
                if seen.insert((s.name.clone(), canonical_labels(&s.labels))) {
                    target.samples.push(s);
                }
            }
        }
    }
    render(&merged, om_out)
}

fn canonical_labels(labels: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let mut start = 0;
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            ',' if !in_quote => {
                parts.push(labels[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(labels[start..].trim());
    parts.retain(|p| !p.is_empty());
    parts.sort_unstable();
    parts.join(",")
}

/// A family as OpenMetrics allows it without renaming any series: counters keep their type only
/// when their samples already end in `_total`; other text counters and untyped become `unknown`.
fn to_om(mut f: Family) -> Family {
    if f.om {
        return f;
    }
    let kind = f.kind.clone().unwrap_or_else(|| "untyped".into());
    match kind.as_str() {
        "counter" => match f.name.strip_suffix("_total") {
            Some(base) if f.samples.iter().all(|s| s.name == f.name) => {
                f.name = base.to_owned();
            }
            _ => f.kind = Some("unknown".into()),
        },
        "gauge" | "histogram" | "summary" => {}
        _ => f.kind = Some("unknown".into()),
    }
    // Text timestamps are milliseconds; OpenMetrics wants seconds.
    for s in &mut f.samples {
        let mut it = s.rest.split_whitespace();
        if let (Some(v), Some(ts), None) = (it.next(), it.next(), it.next())
            && let Ok(ms) = ts.parse::<i64>()
        {
            s.rest = format!("{v} {}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000));
        }
    }
    f.om = true;
    f
}

/// A family as the text format has it: OpenMetrics counters are named after their `_total`
/// samples, `_created` series and exemplars are dropped, OpenMetrics-only types become gauges.
fn to_text(mut f: Family) -> Family {
    if !f.om {
        return f;
    }
    f.unit = None;
    f.samples.retain(|s| !s.name.ends_with("_created"));
    for s in &mut f.samples {
        if let Some((v, _)) = s.rest.split_once('#') {
            s.rest = v.trim().to_owned();
        }
        let mut it = s.rest.split_whitespace();
        if let (Some(v), Some(ts)) = (it.next(), it.next())
            && let Ok(sec) = ts.parse::<f64>()
        {
            s.rest = format!("{v} {}", (sec * 1000.0) as i64);
        }
    }
    match f.kind.as_deref() {
        Some("counter") => {
            if f.samples
                .iter()
                .all(|s| s.name == format!("{}_total", f.name))
            {
                f.name = format!("{}_total", f.name);
            } else {
                f.kind = Some("untyped".into());
            }
        }
        Some("gauge" | "histogram" | "summary") => {}
        Some("info") => {
            f.name = format!("{}_info", f.name);
            f.kind = Some("gauge".into());
        }
        Some("stateset") => f.kind = Some("gauge".into()),
        Some("gaugehistogram") => f.kind = Some("histogram".into()),
        _ => f.kind = Some("untyped".into()),
    }
    f.om = false;
    f
}

fn render(families: &[Family], om: bool) -> String {
    let mut s = String::new();
    for f in families {
        if f.samples.is_empty() && !om {
            continue;
        }
        if let Some(h) = &f.help {
            let _ = writeln!(s, "# HELP {} {}", f.name, h);
        }
        if let Some(k) = &f.kind {
            let _ = writeln!(s, "# TYPE {} {}", f.name, k);
        }
        if om && let Some(u) = &f.unit {
            let _ = writeln!(s, "# UNIT {} {}", f.name, u);
        }
        for x in &f.samples {
            if x.labels.is_empty() {
                let _ = writeln!(s, "{} {}", x.name, x.rest);
            } else {
                let _ = writeln!(s, "{}{{{}}} {}", x.name, x.labels, x.rest);
            }
        }
    }
    if om {
        s.push_str("# EOF\n");
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn negotiation_follows_pilot_agent() {
        assert_eq!(negotiate("text/plain; version=0.0.4"), TEXT);
        assert_eq!(negotiate(""), TEXT);
        assert_eq!(
            negotiate("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            OPENMETRICS_1
        );
        assert_eq!(negotiate("application/openmetrics-text"), OPENMETRICS_0);
        assert_eq!(negotiate("application/openmetrics-text; version=9"), TEXT);
    }

    #[test]
    fn duplicate_metadata_and_series_are_merged() {
        let a = "# HELP x_total a\n# TYPE x_total counter\nx_total{a=\"1\"} 1\n";
        let b = "# HELP x_total b\n# TYPE x_total counter\nx_total{a=\"1\"} 9\nx_total{a=\"2\"} 2\n# TYPE y gauge\ny 3\n";
        let out = merge(&[(a, TEXT), (b, TEXT)], TEXT);
        assert_eq!(
            out,
            "# HELP x_total a\n# TYPE x_total counter\nx_total{a=\"1\"} 1\nx_total{a=\"2\"} 2\n# TYPE y gauge\ny 3\n"
        );
    }

    #[test]
    fn text_counters_in_openmetrics_keep_their_series_names() {
        let envoy = "# TYPE envoy_cluster_upstream_rq_total counter\nenvoy_cluster_upstream_rq_total{c=\"a\"} 1\n# TYPE envoy_cluster_upstream_rq_retry counter\nenvoy_cluster_upstream_rq_retry{c=\"a\"} 0\n";
        let app = "# TYPE app_requests counter\napp_requests_total 5\napp_requests_created 1.7e9\n# EOF\n";
        let out = merge(&[(envoy, TEXT), (app, OPENMETRICS_1)], OPENMETRICS_1);
        assert!(out.contains("# TYPE envoy_cluster_upstream_rq counter\nenvoy_cluster_upstream_rq_total{c=\"a\"} 1\n"), "{out}");
        assert!(out.contains("# TYPE envoy_cluster_upstream_rq_retry unknown\nenvoy_cluster_upstream_rq_retry{c=\"a\"} 0\n"), "{out}");
        assert!(
            out.ends_with("app_requests_created 1.7e9\n# EOF\n"),
            "{out}"
        );
        assert_eq!(out.matches("# EOF").count(), 1);
    }
}
