// SPDX-License-Identifier: Apache-2.0
//! Istio's 120 injection goldens, run through both of our paths:
//! * kube-inject: the input file through `kube_inject`, compared document by document;
//! * webhook: each injectable document turned into a Pod the way Istio's test does (`objectToPod`),
//!   sent as an AdmissionReview over HTTPS to a running webhook, the returned JSONPatch applied with
//!   the `json-patch` crate, and the pod compared with the golden's pod.
//!
//! Images: the golden's `registry.istio.io/testing/<name>:latest` is replaced by our
//! `<hub>/<name>:<tag>` (`proxyv2` → our image name) before comparing. Goldens known not to match
//! are listed in docs/COMPATIBILITY.md; this test fails if that list is not exactly the failing set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cases;
mod harness;

use std::collections::{BTreeMap, BTreeSet};

use cases::Case;
use serde_json::Value;

const REF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/istio/injection/pkg-kube-inject-testdata-inject"
);
const COMPAT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/COMPATIBILITY.md");

fn all_cases() -> Vec<Case> {
    let mut cases = cases::explicit_cases();
    let tested: BTreeSet<String> = cases
        .iter()
        .map(|c| {
            if c.want.is_empty() {
                format!("{}.injected", c.input)
            } else {
                c.want.clone()
            }
        })
        .collect();
    let mut files: Vec<String> = std::fs::read_dir(REF)
        .expect("reference goldens")
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    for f in files {
        if f.ends_with(".iop.yaml") || !f.ends_with(".yaml") {
            continue;
        }
        let want = format!("{f}.injected");
        if tested.contains(&want) {
            continue;
        }
        let input: &'static str = Box::leak(f.into_boxed_str());
        cases.push(Case {
            input,
            want,
            ..Default::default()
        });
    }
    cases
}

/// Golden names listed as not matching yet, from the marked table in docs/COMPATIBILITY.md.
fn expected_failures() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(COMPAT).expect("docs/COMPATIBILITY.md");
    let start = doc.find("<!-- injector-golden-failures:start -->");
    let end = doc.find("<!-- injector-golden-failures:end -->");
    let (Some(s), Some(e)) = (start, end) else {
        return BTreeSet::new();
    };
    doc[s..e]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1).map(str::to_string))
        .collect()
}

#[test]
fn istio_injection_goldens() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cases = all_cases();
    let mut failures: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut goldens: BTreeSet<String> = BTreeSet::new();
    for case in &cases {
        let key = if case.want.is_empty() {
            case.input.to_string()
        } else {
            case.want.clone()
        };
        goldens.insert(key.clone());
        let errs = rt.block_on(harness::run_case(case));
        if !errs.is_empty() {
            failures.entry(key).or_default().extend(errs);
        }
    }
    let failing: BTreeSet<String> = failures.keys().cloned().collect();
    let expected = expected_failures();
    let golden_count = goldens.iter().filter(|g| g.ends_with(".injected")).count();
    let passing = goldens
        .iter()
        .filter(|g| g.ends_with(".injected") && !failing.contains(*g))
        .count();
    let mut report = format!(
        "goldens passing: {passing}/{golden_count}; cases: {}\n",
        cases.len()
    );
    for (k, errs) in &failures {
        report.push_str(&format!(
            "FAIL {k}{}\n",
            if expected.contains(k) {
                " (listed)"
            } else {
                ""
            }
        ));
        for e in errs.iter().take(4) {
            report.push_str(&format!("    {e}\n"));
        }
    }
    let unexpected: Vec<&String> = failing.difference(&expected).collect();
    let fixed: Vec<&String> = expected.difference(&failing).collect();
    if std::env::var("GOLDEN_REPORT").is_ok() {
        eprintln!("{report}");
    }
    assert!(
        unexpected.is_empty() && fixed.is_empty(),
        "{report}\nnot listed in docs/COMPATIBILITY.md but failing: {unexpected:?}\nlisted but now passing (remove from the list): {fixed:?}"
    );
    // Sanity: the table covers every golden in the folder.
    let on_disk = std::fs::read_dir(REF).unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".injected")
    });
    assert_eq!(
        on_disk.count(),
        golden_count,
        "every golden file is exercised"
    );
    let _: Option<Value> = None;
}
