// SPDX-License-Identifier: Apache-2.0
//! Istio's bootstrap goldens (`pkg/bootstrap/testdata`): for each golden, its `.proxycfg`
//! (ProxyConfig in proto text format) and the per-case inputs of Istio's `TestGolden` go through
//! our generator; the result must equal the golden as a JSON value after the normalisation
//! Istio's test itself applies (`correctForEnvDifference`). Unsupported goldens are listed in
//! docs/COMPATIBILITY.md ("Agent") and asserted to be exactly the skipped set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use pingsail_agent::bootstrap::{BootstrapInput, generate};
use pingsail_agent::config::ProxyConfig;
use serde_json::{Map, Value};

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/istio/bootstrap/pkg-bootstrap-testdata"
);

/// Goldens we do not reproduce (also listed in docs/COMPATIBILITY.md).
const UNSUPPORTED: &[&str] = &["legacy_stats_tags_regex", "secure_metrics"];

// --- a parser for the proto text format subset the .proxycfg files use ---

struct TextProto<'a> {
    s: &'a [u8],
    i: usize,
}

impl TextProto<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() {
            match self.s[self.i] {
                b' ' | b'\t' | b'\n' | b'\r' | b',' | b';' => self.i += 1,
                b'#' => {
                    while self.i < self.s.len() && self.s[self.i] != b'\n' {
                        self.i += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn ident(&mut self) -> String {
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric()
                || matches!(self.s[self.i], b'_' | b'.' | b'-' | b'+'))
        {
            self.i += 1;
        }
        String::from_utf8(self.s[start..self.i].to_vec()).unwrap()
    }

    fn message(&mut self, end: Option<u8>) -> Map<String, Value> {
        let mut m: Map<String, Value> = Map::new();
        loop {
            self.skip_ws();
            if self.i >= self.s.len() {
                assert!(end.is_none(), "unterminated message");
                return m;
            }
            if Some(self.s[self.i]) == end {
                self.i += 1;
                return m;
            }
            let name = self.ident();
            assert!(!name.is_empty(), "field name expected at byte {}", self.i);
            self.skip_ws();
            if self.s[self.i] == b':' {
                self.i += 1;
                self.skip_ws();
            }
            let v = self.value();
            match m.get_mut(&name) {
                Some(Value::Array(a)) => a.push(v),
                Some(old) => *old = Value::Array(vec![old.clone(), v]),
                None => {
                    m.insert(name, v);
                }
            }
        }
    }

    fn value(&mut self) -> Value {
        match self.s[self.i] {
            b'{' | b'<' => {
                let end = if self.s[self.i] == b'{' { b'}' } else { b'>' };
                self.i += 1;
                Value::Object(self.message(Some(end)))
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_ws();
                    if self.s[self.i] == b']' {
                        self.i += 1;
                        return Value::Array(items);
                    }
                    items.push(self.value());
                }
            }
            b'"' | b'\'' => {
                let q = self.s[self.i];
                self.i += 1;
                let mut out = Vec::new();
                while self.s[self.i] != q {
                    if self.s[self.i] == b'\\' {
                        self.i += 1;
                        out.push(match self.s[self.i] {
                            b'n' => b'\n',
                            b't' => b'\t',
                            c => c,
                        });
                    } else {
                        out.push(self.s[self.i]);
                    }
                    self.i += 1;
                }
                self.i += 1;
                Value::String(String::from_utf8(out).unwrap())
            }
            _ => {
                let tok = self.ident();
                match tok.as_str() {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    t => t
                        .parse::<i64>()
                        .map(Value::from)
                        .or_else(|_| t.parse::<f64>().map(Value::from))
                        .unwrap_or_else(|_| Value::String(t.to_owned())),
                }
            }
        }
    }
}

fn parse_text_proto(text: &str) -> Value {
    Value::Object(
        TextProto {
            s: text.as_bytes(),
            i: 0,
        }
        .message(None),
    )
}

// --- Istio's TestGolden cases ---

#[derive(Default)]
struct Case {
    env: Vec<(&'static str, &'static str)>,
    annotations: Vec<(&'static str, &'static str)>,
    check_locality: bool,
    compliance_policy: &'static str,
}

const UPSTREAM_SUFFIXES: &str = "upstream_rq_1xx,upstream_rq_2xx,upstream_rq_3xx,upstream_rq_4xx,upstream_rq_5xx,upstream_rq_time,upstream_cx_tx_bytes_total,upstream_cx_rx_bytes_total,upstream_cx_total";
const DOWNSTREAM_SUFFIXES: &str = "downstream_rq_1xx,downstream_rq_2xx,downstream_rq_3xx,downstream_rq_4xx,downstream_rq_5xx,downstream_rq_time,downstream_cx_tx_bytes_total,downstream_cx_rx_bytes_total,downstream_cx_total";

fn cases() -> BTreeMap<&'static str, Case> {
    let running_env = vec![
        ("ISTIO_META_ISTIO_PROXY_SHA", "istio-proxy:sha"),
        ("ISTIO_META_INTERCEPTION_MODE", "REDIRECT"),
        ("ISTIO_META_ISTIO_VERSION", "release-3.1"),
        ("ISTIO_META_POD_NAME", "svc-0-0-0-6944fb884d-4pgx8"),
        ("POD_NAME", "svc-0-0-0-6944fb884d-4pgx8"),
        ("POD_NAMESPACE", "test"),
        ("INSTANCE_IP", "10.10.10.1"),
        (
            "ISTIO_METAJSON_LABELS",
            r#"{"version": "v1alpha1", "app": "test", "istio-locality":"regionA.zoneB.sub_zoneC"}"#,
        ),
    ];
    let insecure = vec![("istio.io/insecurepath", r#"{"paths":["/metrics","/live"]}"#)];
    let suffixes: &'static str = Box::leak(
        format!("suffix1,suffix2,{UPSTREAM_SUFFIXES},{DOWNSTREAM_SUFFIXES}").into_boxed_str(),
    );
    let mut m = BTreeMap::new();
    for plain in [
        "xdsproxy",
        "auth",
        "authsds",
        "default",
        "explicit_internal_address",
        "tracing_lightstep",
        "tracing_zipkin",
        "tracing_datadog",
        "metrics_no_statsd",
        "tracing_none",
        "all",
        "tracing_tls",
        "tracing_tls_custom_sni",
        "global_downstream_max_connections_runtime",
        "global_downstream_connection_settings",
        "stats_compression",
    ] {
        m.insert(plain, Case::default());
    }
    m.insert(
        "ambient",
        Case {
            env: vec![("ISTIO_META_ENABLE_HBONE", "true")],
            ..Case::default()
        },
    );
    for r in ["running", "runningsds"] {
        m.insert(
            r,
            Case {
                env: running_env.clone(),
                annotations: insecure.clone(),
                check_locality: true,
                ..Case::default()
            },
        );
    }
    m.insert(
        "stats_inclusion",
        Case {
            annotations: vec![
                ("sidecar.istio.io/statsInclusionPrefixes", "prefix1,prefix2,http.{pod_ip}_"),
                ("sidecar.istio.io/statsInclusionSuffixes", suffixes),
                (
                    "sidecar.istio.io/statsInclusionRegexps",
                    r"http.[0-9]*\.[0-9]*\.[0-9]*\.[0-9]*_8080.downstream_rq_time",
                ),
                ("sidecar.istio.io/extraStatTags", "dlp_status,dlp_error"),
                (
                    "sidecar.istio.io/statsHistogramBuckets",
                    r#"{"istio":[1,5,10,50,100,500,1000,5000,10000],"envoy":[1,5,10,25,50,100,250,500,1000,2500,5000,10000]}"#,
                ),
            ],
            ..Case::default()
        },
    );
    m.insert(
        "lrs",
        Case {
            compliance_policy: "fips-140-2",
            env: vec![(
                "ISTIO_META_LOAD_STATS_CONFIG_JSON",
                r#"{"api_type": "GRPC", "transport_api_version": "V3"}"#,
            )],
            ..Case::default()
        },
    );
    for (name, anno) in [
        (
            "stats_flush_interval",
            vec![("sidecar.istio.io/statsFlushInterval", "10s")],
        ),
        (
            "stats_eviction_interval",
            vec![("sidecar.istio.io/statsEvictionInterval", "10s")],
        ),
        (
            "invalid_stats_eviction_interval",
            vec![("sidecar.istio.io/statsEvictionInterval", "11s")],
        ),
        (
            "stats_interval",
            vec![
                ("sidecar.istio.io/statsFlushInterval", "10s"),
                ("sidecar.istio.io/statsEvictionInterval", "20s"),
            ],
        ),
    ] {
        m.insert(
            name,
            Case {
                annotations: anno,
                ..Case::default()
            },
        );
    }
    for (name, v) in [
        ("global_downstream_max_connections_meta", "10000"),
        ("global_downstream_max_connections_both", "20000"),
        ("global_downstream_connection_settings_with_meta", "10000"),
    ] {
        m.insert(
            name,
            Case {
                env: vec![("ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS", v)],
                ..Case::default()
            },
        );
    }
    m
}

/// Go's `%q` for the annotation file (the strings used here need only `"` and `\` escaped).
fn go_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn run_case(base: &str, case: &Case) -> (Value, Value) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap().to_owned();
    let text = std::fs::read_to_string(format!("{DIR}/{base}.proxycfg")).unwrap();
    let mut pc = ProxyConfig::from_value(parse_text_proto(&text), base).unwrap();
    // Istio's loadProxyConfig: configPath under the test's temp dir, the template path as
    // customConfigFile (normalised to its base name by the test), statusPort 15020.
    pc.set("configPath", format!("{out}/bootstrap/{base}").into());
    pc.set("customConfigFile", "envoy_bootstrap.json".into());
    if pc.int("statusPort").unwrap_or(0) == 0 {
        pc.set("statusPort", 15020.into());
    }
    if let Some((_, v)) = case
        .env
        .iter()
        .find(|(k, _)| *k == "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS")
    {
        let mut md = Map::new();
        md.insert(
            "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS".into(),
            (*v).into(),
        );
        pc.set("proxyMetadata", Value::Object(md));
    }
    // createEnv: ISTIO_METAJSON_LABELS={} always, ISTIO_METAJSON_ANNOTATIONS when annotated.
    let mut env: Vec<(String, String)> = vec![("ISTIO_METAJSON_LABELS".into(), "{}".into())];
    if !case.annotations.is_empty() {
        let a: BTreeMap<&str, &str> = case.annotations.iter().copied().collect();
        env.push((
            "ISTIO_METAJSON_ANNOTATIONS".into(),
            serde_json::to_string(&a).unwrap(),
        ));
    }
    env.extend(
        case.env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let anno_file = tmp.path().join("annotations");
    let anno_text: String = case
        .annotations
        .iter()
        .map(|(k, v)| format!("{k}={}\n", go_quote(v)))
        .collect();
    std::fs::write(&anno_file, anno_text).unwrap();

    let input = BootstrapInput {
        node_id: "sidecar~1.2.3.4~foo~bar".into(),
        env,
        proxy_config: pc,
        instance_ips: ["10.3.3.3", "10.4.4.4", "10.5.5.5", "10.6.6.6", "10.4.4.4"]
            .map(String::from)
            .to_vec(),
        pilot_san: vec![
            "spiffe://cluster.local/ns/istio-system/sa/istio-pilot-service-account".into(),
        ],
        outlier_log_path: "/dev/stdout".into(),
        labels_file: tmp.path().join("no-labels-file"),
        annotations_file: anno_file,
        envoy_status_port: 15021,
        envoy_prometheus_port: 15090,
        workload_identity_socket_file: "test.sock".into(),
        istio_version: "binary-1.0".into(),
        compliance_policy: case.compliance_policy.into(),
        ..BootstrapInput::default()
    };
    let b = generate(&input).unwrap_or_else(|e| panic!("{base}: {e}"));
    // The Lightstep token file is written next to the bootstrap.
    for (p, content) in &b.files {
        assert!(
            p.starts_with(format!("{out}/bootstrap/{base}")),
            "{}",
            p.display()
        );
        assert!(!content.is_empty());
    }
    // correctForEnvDifference.
    let mut text = serde_json::to_string(&b.json).unwrap();
    text = regex_lite_replace_token_path(&text);
    text = text.replace(&out, "/tmp");
    // `("path": ".*/XDS")` → `/tmp/XDS`.
    text = text.replace(&format!("/tmp/bootstrap/{base}/XDS"), "/tmp/XDS");
    let mut got: Value = serde_json::from_str(&text).unwrap();
    if !case.check_locality {
        for k in ["zone", "region"] {
            if let Some(l) = got["node"]["locality"].as_object_mut()
                && l.contains_key(k)
            {
                l.insert(k.into(), "".into());
            }
        }
    }
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{DIR}/{base}_golden.json")).unwrap(),
    )
    .unwrap();
    (got, golden)
}

/// `"access_token_file": "<dir>/lightstep_access_token.txt"` → `/test-path/...`.
fn regex_lite_replace_token_path(text: &str) -> String {
    let key = "\"access_token_file\":\"";
    let Some(start) = text.find(key) else {
        return text.to_owned();
    };
    let vstart = start + key.len();
    let vend = vstart + text[vstart..].find('"').unwrap();
    let value = &text[vstart..vend];
    let file = Path::new(value).file_name().unwrap().to_str().unwrap();
    format!("{}/test-path/{file}{}", &text[..vstart], &text[vend..])
}

fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => diff(p, q, &format!("{path}/{k}"), out),
                    (Some(p), None) => out.push(format!("only generated {path}/{k}: {p}")),
                    (None, Some(q)) => out.push(format!("only golden {path}/{k}: {q}")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(p, q, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("{path}: generated {a} golden {b}")),
        _ => {}
    }
}

#[test]
fn every_supported_golden_matches_structurally() {
    let cases = cases();
    let mut goldens: Vec<String> = std::fs::read_dir(DIR)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.strip_suffix("_golden.json").map(str::to_owned)
        })
        .collect();
    goldens.sort();
    assert!(goldens.len() >= 30, "{goldens:?}");
    let mut skipped = Vec::new();
    let mut failures = Vec::new();
    for g in &goldens {
        let Some(case) = cases.get(g.as_str()) else {
            skipped.push(g.clone());
            continue;
        };
        let (got, golden) = run_case(g, case);
        let mut d = Vec::new();
        diff(&got, &golden, "", &mut d);
        if !d.is_empty() {
            failures.push(format!("{g}:\n  {}", d.join("\n  ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        skipped, UNSUPPORTED,
        "skipped goldens must be exactly the documented set"
    );
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/COMPATIBILITY.md"
    ))
    .unwrap();
    for u in UNSUPPORTED {
        assert!(
            doc.contains(&format!("`{u}_golden.json`")),
            "{u} must be listed in docs/COMPATIBILITY.md"
        );
    }
}

#[test]
fn text_proto_parser_reads_the_proxycfg_shapes() {
    let v = parse_text_proto(
        "a: \"x\" # c\nd: {seconds: 2}\nr: [{ key: \"k\" value: \"v\" }]\nt: { z: { address: \"h:1\" }, tls: { mode: SIMPLE}}\n",
    );
    assert_eq!(
        v,
        serde_json::json!({"a": "x", "d": {"seconds": 2}, "r": [{"key": "k", "value": "v"}], "t": {"z": {"address": "h:1"}, "tls": {"mode": "SIMPLE"}}})
    );
}
