// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)]

use super::*;

fn echo_obs(upstream: &str, path: &str, rid: &str) -> Observation {
    Observation {
        error: None,
        status: Some(200),
        response_headers: vec![("x-upstream".into(), upstream.into())],
        body: format!("{{\"rid\":\"{rid}\"}}"),
        upstream: Some(upstream.into()),
        echo: Some(EchoRecord {
            upstream: upstream.into(),
            method: "GET".into(),
            path: path.into(),
            headers: vec![
                ("host".into(), "reviews".into()),
                ("x-request-id".into(), rid.into()),
            ],
            body: String::new(),
        }),
        elapsed_ms: 0,
    }
}

fn full_spec() -> CompareSpec {
    CompareSpec {
        status: true,
        upstream: true,
        upstream_method: true,
        upstream_path: true,
        upstream_body: true,
        upstream_headers: vec!["host".into()],
        upstream_headers_present: vec!["x-request-id".into()],
        response_headers: vec!["x-upstream".into()],
        body: true,
        ..CompareSpec::default()
    }
}

#[test]
fn equal_observations_with_random_ids_match() {
    let a = echo_obs("v1", "/a", "1111");
    let b = echo_obs("v1", "/a", "2222");
    assert_eq!(compare(&full_spec(), &a, &b), vec![]);
}

#[test]
fn detects_each_kind_of_difference() {
    let a = echo_obs("v1", "/a", "1");
    let mut b = echo_obs("v2", "/b", "2");
    if let Some(e) = b.echo.as_mut() {
        e.headers.retain(|(k, _)| k != "x-request-id");
    }
    let diffs = compare(&full_spec(), &a, &b);
    let fields: Vec<&str> = diffs.iter().map(|d| d.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "upstream",
            "upstream_path",
            "upstream header x-request-id",
            "response header x-upstream"
        ]
    );
    assert_eq!(diffs[2].a, "present");
    assert_eq!(diffs[2].b, "absent");
}

#[test]
fn local_reply_status_and_body_are_compared() {
    let a = Observation {
        status: Some(503),
        body: "no healthy upstream".into(),
        ..Observation::default()
    };
    let b = Observation {
        status: Some(502),
        body: "upstream connect error".into(),
        ..Observation::default()
    };
    let diffs = compare(&full_spec(), &a, &b);
    assert_eq!(diffs.len(), 2);
    assert_eq!(diffs[0], Diff::new("status", "503", "502"));
    assert_eq!(diffs[1].field, "body");
    // Transport failure against a response is one `transport` diff.
    let c = Observation::from_error("closed");
    assert_eq!(compare(&full_spec(), &a, &c)[0].field, "transport");
}

#[test]
fn distributions_within_and_outside_tolerance() {
    let a = BTreeMap::from([("v1".to_owned(), 360), ("v2".to_owned(), 40)]);
    let close = BTreeMap::from([("v1".to_owned(), 352), ("v2".to_owned(), 48)]);
    let far = BTreeMap::from([("v1".to_owned(), 200), ("v2".to_owned(), 200)]);
    let only_v1 = BTreeMap::from([("v1".to_owned(), 400)]);
    assert!(compare_distributions(&a, &close, None).is_empty());
    assert_eq!(compare_distributions(&a, &far, None).len(), 2);
    assert_eq!(compare_distributions(&a, &only_v1, None).len(), 2);
    assert_eq!(compare_distributions(&a, &close, Some(0.01)).len(), 2);
    let want = BTreeMap::from([("v1".to_owned(), 0.9), ("v2".to_owned(), 0.1)]);
    assert!(check_expected_distribution(&a, &want, None).is_empty());
    assert_eq!(check_expected_distribution(&far, &want, None).len(), 2);
}

#[test]
fn table_lists_every_mismatch() {
    let rows = vec![
        Mismatch {
            scenario: "s".into(),
            request: "r1".into(),
            field: "status".into(),
            a: "200".into(),
            b: "404".into(),
        },
        Mismatch {
            scenario: "s".into(),
            request: "r2".into(),
            field: "body".into(),
            a: "x".repeat(100),
            b: String::new(),
        },
    ];
    let t = render_table(&rows, "envoy", "pingsail");
    assert!(t.contains("| s        | r1      | status"), "{t}");
    assert!(t.contains("A (envoy)") && t.contains("B (pingsail)"));
    assert!(t.contains("…"));
    assert!(t.contains(&format!("A: \"{}\"", "x".repeat(100))));
}
