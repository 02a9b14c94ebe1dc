// SPDX-License-Identifier: Apache-2.0
use super::*;
use crate::headers::HeaderOps;

fn vh(name: &str, domains: &[&str]) -> VirtualHost {
    VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|s| s.to_string()).collect(),
        routes: vec![],
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        retry_policy: None,
        cors: None,
    }
}

#[test]
fn domain_precedence() {
    let t = RouteTable::new(
        "t".into(),
        vec![
            vh("any", &["*"]),
            vh("suffix", &["*.example.com"]),
            vh("longer", &["*.foo.example.com"]),
            vh("prefix", &["foo.*"]),
            vh("exact", &["reviews", "reviews:9080"]),
        ],
        HeaderOps::default(),
        HeaderOps::default(),
        false,
    )
    .unwrap();
    let name = |h: &str| t.virtual_host(h).map(|v| v.name.to_string());
    assert_eq!(name("reviews").as_deref(), Some("exact"));
    assert_eq!(name("REVIEWS:9080").as_deref(), Some("exact"));
    assert_eq!(name("a.foo.example.com").as_deref(), Some("longer"));
    assert_eq!(name("a.example.com").as_deref(), Some("suffix"));
    assert_eq!(name("foo.bar").as_deref(), Some("prefix"));
    assert_eq!(name("other").as_deref(), Some("any"));
}

#[test]
fn duplicate_domain_refused() {
    let e = RouteTable::new(
        "t".into(),
        vec![vh("a", &["x"]), vh("b", &["x"])],
        HeaderOps::default(),
        HeaderOps::default(),
        false,
    );
    assert!(matches!(
        e,
        Err(RouteTableError::DuplicateDomain { index: 1, .. })
    ));
}

#[test]
fn prefix_rewrite_slash() {
    let a = RouteAction {
        cluster: ClusterSpecifier::Cluster("c".into()),
        prefix_rewrite: Some("/".into()),
        regex_rewrite: None,
        host_rewrite: None,
        auto_host_rewrite: false,
        timeout: None,
        max_stream_duration: None,
        retry_policy: None,
        hash_policy: vec![],
        mirrors: vec![],
        grpc_timeout: None,
    };
    let m = PathMatch::Prefix("/api".into());
    assert_eq!(a.rewrite_path(&m, "/api/x").as_deref(), Some("/x"));
    assert_eq!(a.rewrite_path(&m, "/api").as_deref(), Some("/"));
}

#[test]
fn weighted_pick() {
    let w = WeightedClusters {
        clusters: vec![
            WeightedCluster {
                name: "a".into(),
                weight: 90,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
                host_rewrite: None,
            },
            WeightedCluster {
                name: "b".into(),
                weight: 10,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
                host_rewrite: None,
            },
        ],
        total: 100,
    };
    let b = (0..1000u64)
        .filter(|r| w.pick(*r).unwrap().name == "b")
        .count();
    assert_eq!(b, 100);
}
