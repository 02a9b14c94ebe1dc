// SPDX-License-Identifier: Apache-2.0
//! Every listener, cluster, route configuration and ClusterLoadAssignment of Istio's reference
//! config dumps either loads or is refused with a field path naming a later issue; the outcome is
//! the golden `docs/COMPATIBILITY-istio-configdumps.md` (regenerate with `PINGSAIL_REGEN=1`).

use pingsail_tests::configdump::{
    Outcome, check, configdumps_dir, golden_path, read_corpus, render,
};

#[test]
fn istio_configdumps_load_or_name_a_later_issue() {
    let dir = configdumps_dir();
    assert!(
        dir.is_dir(),
        "reference config dumps not found at {}: check out the shared reference corpus \
         (../shared/reference/istio/configdumps next to the repository); CI must have it",
        dir.display()
    );
    let dumps = read_corpus(&dir).unwrap();
    let outcomes: Vec<Vec<Outcome>> = dumps
        .iter()
        .map(|d| d.resources.iter().map(check).collect())
        .collect();
    let resources: usize = outcomes.iter().map(Vec::len).sum();
    assert!(resources > 0, "no resources found under {}", dir.display());

    let doc = render(&dumps, &outcomes);
    let golden = golden_path();
    let regen = std::env::var("PINGSAIL_REGEN").is_ok_and(|v| v == "1");
    if regen {
        std::fs::write(&golden, &doc).unwrap();
    }

    let mut failures = Vec::new();
    for (d, os) in dumps.iter().zip(&outcomes) {
        for (r, o) in d.resources.iter().zip(os) {
            if let Outcome::Unexpected(m) = o {
                failures.push(format!(
                    "{} {} {} '{}': {m}",
                    d.file,
                    r.origin,
                    r.kind.label(),
                    r.name
                ));
            }
        }
    }
    if !regen {
        match std::fs::read_to_string(&golden) {
            Ok(committed) if committed == doc => {}
            Ok(committed) => {
                let line = committed
                    .lines()
                    .zip(doc.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or_else(|| committed.lines().count().min(doc.lines().count()));
                failures.push(format!(
                    "{} is out of date (first difference at line {}: committed {:?}, now {:?}); \
                     rerun with PINGSAIL_REGEN=1 and review the diff",
                    golden.display(),
                    line + 1,
                    committed.lines().nth(line).unwrap_or("<end>"),
                    doc.lines().nth(line).unwrap_or("<end>"),
                ));
            }
            Err(e) => failures.push(format!(
                "{}: {e}; run with PINGSAIL_REGEN=1 to create it",
                golden.display()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The classification must not pass vacuously: a decode error and an invalid value are
/// unexpected, a deferred field names its issue with a path inside the resource.
#[test]
fn classification_is_strict() {
    use pingsail_tests::configdump::parse_dump;
    let listener = |extra: &str| {
        format!(
            r#"{{"configs": [{{"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
              "dynamic_listeners": [{{"name": "l", "active_state": {{"listener": {{
                "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
                "name": "l", {extra}
                "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 1}}}},
                "filter_chains": [{{"filters": [{{"name": "envoy.filters.network.tcp_proxy",
                  "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "x", "cluster": "c"}}}}]}}]}}}}}}]}}]}}"#
        )
    };
    let outcome = |extra: &str| {
        let d = parse_dump("inline.json".into(), &listener(extra));
        assert_eq!(d.resources.len(), 1, "{d:?}");
        check(&d.resources[0])
    };
    assert_eq!(outcome(""), Outcome::Loads);
    assert_eq!(
        outcome(r#""per_connection_buffer_limit_bytes": 1024,"#),
        Outcome::Later {
            path: "per_connection_buffer_limit_bytes".into(),
            reason: "not supported yet (resilience issue)".into()
        }
    );
    assert!(
        matches!(outcome(r#""bogus": 1,"#), Outcome::Unexpected(m) if m.starts_with("decode error"))
    );
    assert!(matches!(
        outcome(r#""listener_filters_timeout": "-1s","#),
        Outcome::Unexpected(m) if m.starts_with("refused as invalid")
    ));
}
