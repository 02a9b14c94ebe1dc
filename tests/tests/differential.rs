// SPDX-License-Identifier: Apache-2.0
//! Differential tests: every `tests/scenarios/NAME.yaml` run on Envoy (A) and on the proxy
//! selected by `PINGSAIL_DIFF_B` (B; `envoy` until pingsail is wired), compared field by field.
//! Adding a scenario = one YAML file + one `scenario!(NAME);` line.

macro_rules! scenario {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if let Err(e) = pingsail_tests::scenario::run_named(stringify!($name)).await {
                panic!("{e:#}");
            }
        }
    };
}

scenario!(basic_routing);
scenario!(weighted_split);
scenario!(local_replies);
scenario!(virtual_hosts);
scenario!(http_connection_manager);
scenario!(route_matching);
scenario!(route_actions);
scenario!(redirects_and_direct_responses);
scenario!(header_mutations);
scenario!(cors);
scenario!(clusters);
scenario!(tcp_proxy);
scenario!(rbac);
scenario!(path_bypass);
scenario!(fault_injection);
scenario!(fault_percentages);
scenario!(circuit_breaking);
scenario!(outlier_detection);
scenario!(timeouts_retries);
scenario!(connection_pool);
scenario!(outlier_statistical);
scenario!(hash_with_ejection);

/// The harness must not pass vacuously: on real Envoy vs Envoy, comparing a random header by
/// value and asserting a wrong upstream must both be reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_detects_mismatches() {
    use pingsail_tests::proxy::ProxyUnderTest;
    use pingsail_tests::scenario::{Scenario, scenario_path};

    let mut sc = Scenario::load(&scenario_path("basic_routing")).unwrap();
    sc.compare.upstream_headers.push("x-request-id".into());
    let regex = sc.requests.iter_mut().find(|r| r.name == "regex").unwrap();
    regex.expect.upstream = Some("reviews-v3".into());
    let envoy = ProxyUnderTest::Envoy;
    let found = sc.run("detect", envoy, envoy).await.unwrap();

    let random_ids = found
        .iter()
        .filter(|m| m.field == "upstream header x-request-id")
        .count();
    let upstream_bound = sc
        .requests
        .iter()
        .filter(|r| r.compare.is_none())
        .filter(|r| r.expect.upstream.as_deref().is_some_and(|u| u != "local"))
        .count();
    assert_eq!(random_ids, upstream_bound, "{found:#?}");
    let wrong = found
        .iter()
        .find(|m| m.field == "expect.upstream = reviews-v3")
        .unwrap();
    assert_eq!(
        (wrong.a.as_str(), wrong.b.as_str()),
        ("reviews-v2", "reviews-v2")
    );
    assert_eq!(found.len(), random_ids + 1, "{found:#?}");
}
