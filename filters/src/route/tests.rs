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
        authz: PerFilterAuthz::default(),
        fault: None,
        attempt_count_in_request: false,
        attempt_count_in_response: false,
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
        cluster_not_found_status: 503,
        websocket: None,
        connect: None,
        connect_authority: None,
        idle_timeout: None,
    };
    let m = PathMatch::Prefix("/api".into());
    // Envoy 1.40 substitutes the prefix literally: "/" + "/x".
    assert_eq!(a.rewrite_path(&m, "/api/x").as_deref(), Some("//x"));
    assert_eq!(a.rewrite_path(&m, "/apixyz").as_deref(), Some("/xyz"));
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

#[test]
fn grpc_content_type() {
    assert!(is_grpc_content_type("application/grpc"));
    assert!(is_grpc_content_type("application/grpc+proto"));
    assert!(is_grpc_content_type("application/grpc;charset=utf-8"));
    assert!(!is_grpc_content_type("application/grpc-web"));
    assert!(!is_grpc_content_type("application/json"));
    assert_eq!(http_to_grpc_status(404), 12);
    assert_eq!(http_to_grpc_status(503), 14);
    assert_eq!(http_to_grpc_status(200), 2);
}

#[test]
fn redirect_ports_and_queries() {
    let r = |scheme: Option<&str>, path: RedirectPath| Redirect {
        scheme: scheme.map(str::to_owned),
        host: None,
        port: None,
        path,
        status: 301,
        strip_query: false,
    };
    let m = PathMatch::Prefix("/".into());
    let https = r(Some("https"), RedirectPath::Keep);
    assert_eq!(https.location("http", "h:80", "/a", &m), "https://h/a");
    assert_eq!(https.location("http", "h:443", "/a", &m), "https://h:443/a");
    assert_eq!(
        https.location("http", "h:9080", "/a", &m),
        "https://h:9080/a"
    );
    let http = r(Some("http"), RedirectPath::Keep);
    assert_eq!(http.location("http", "h:80", "/a", &m), "http://h:80/a");
    let q = r(None, RedirectPath::Replace("/new?x=1".into()));
    assert_eq!(q.location("http", "h", "/a?k=v", &m), "http://h/new?x=1");
    assert_eq!(q.location("http", "h", "/a", &m), "http://h/new?x=1");
    let p = r(None, RedirectPath::Replace("/new".into()));
    assert_eq!(p.location("http", "h", "/a?k=v", &m), "http://h/new?k=v");
}
