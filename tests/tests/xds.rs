// SPDX-License-Identifier: Apache-2.0
//! Dynamic configuration over ADS, against the fake istiod. Every protocol behaviour is checked on the
//! real Envoy first (so the fake server is known to speak real xDS) and then on pingsail, with the same
//! resources and the same assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use anyhow::{Context as _, Result, bail};
use pingsail_tests::client::{self, Request};
use pingsail_tests::echo::EchoServer as Echo;
use pingsail_tests::envoy::Envoy;
use pingsail_tests::istiod::{self, CLUSTER, ENDPOINT, FakeIstiod, LISTENER, ROUTE};
use pingsail_tests::net::random_loopback_ip;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Envoy,
    Pingsail,
}

enum Proxy {
    Envoy(Envoy),
    Pingsail(pingsail_proxy::testing::Running),
}

impl Proxy {
    async fn start(side: Side, bootstrap: &str) -> Result<Self> {
        Ok(match side {
            Side::Envoy => Proxy::Envoy(Envoy::start(bootstrap).await?),
            Side::Pingsail => {
                let p = pingsail_proxy::testing::start(bootstrap).await?;
                p.wait_initialized(T).await?;
                Proxy::Pingsail(p)
            }
        })
    }

    fn diagnostics(&self) -> String {
        match self {
            Proxy::Envoy(e) => e.stderr(),
            Proxy::Pingsail(_) => String::new(),
        }
    }

    async fn config_dump(&self) -> Result<serde_json::Value> {
        let text = match self {
            Proxy::Envoy(e) => client::send(
                e.admin(),
                &Request::get("/config_dump").header("host", "admin"),
            )
            .await?
            .body_text(),
            Proxy::Pingsail(p) => p.config_dump(false),
        };
        Ok(serde_json::from_str(&text)?)
    }
}

struct Mesh {
    ip: Ipv4Addr,
    istiod: FakeIstiod,
    echoes: Vec<Echo>,
}

fn cluster_yaml(names: &[&str]) -> String {
    let mut s = String::new();
    for n in names {
        s.push_str(&format!(
            r#"
- name: {n}
  type: EDS
  connect_timeout: 1s
  eds_cluster_config:
    service_name: {n}
    eds_config: {{ ads: {{}}, initial_fetch_timeout: 0s, resource_api_version: V3 }}
"#
        ));
    }
    s
}

fn cla_yaml(name: &str, eps: &[(SocketAddr, u32)]) -> String {
    let mut s = format!("- cluster_name: {name}\n  endpoints:\n  - lb_endpoints:\n");
    for (a, w) in eps {
        s.push_str(&format!(
            "    - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}\n      load_balancing_weight: {w}\n",
            a.ip(),
            a.port()
        ));
    }
    s
}

fn listener_yaml(name: &str, ip: Ipv4Addr, port: u16, route: &str, stat_prefix: &str) -> String {
    format!(
        r#"
- name: {name}
  address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: {stat_prefix}
        rds:
          route_config_name: {route}
          config_source: {{ ads: {{}}, initial_fetch_timeout: 0s, resource_api_version: V3 }}
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    )
}

/// A route table: `/` to weighted clusters, plus a `x-tag` response header so a test can tell
/// versions apart.
fn route_yaml(name: &str, clusters: &[(&str, u32)], tag: &str) -> String {
    let mut wc = String::new();
    for (c, w) in clusters {
        wc.push_str(&format!("              - {{ name: {c}, weight: {w} }}\n"));
    }
    format!(
        r#"
- name: {name}
  virtual_hosts:
  - name: all
    domains: ["*"]
    response_headers_to_add: [ {{ header: {{ key: x-tag, value: "{tag}" }} }} ]
    routes:
    - match: {{ prefix: / }}
      route:
        weighted_clusters:
          clusters:
{wc}"#
    )
}

impl Mesh {
    async fn new(delta: bool) -> Result<Self> {
        let _ = delta;
        let istiod = FakeIstiod::start_tcp().await?;
        let echoes = vec![
            Echo::start("a1").await?,
            Echo::start("a2").await?,
            Echo::start("b1").await?,
        ];
        let ip = random_loopback_ip();
        let m = Mesh { ip, istiod, echoes };
        m.istiod.set_yaml(CLUSTER, &cluster_yaml(&["a"]))?;
        m.istiod
            .set_yaml(ENDPOINT, &cla_yaml("a", &[(m.echoes[0].addr(), 1)]))?;
        m.istiod
            .set_yaml(LISTENER, &listener_yaml("http", ip, 18080, "r1", "http"))?;
        m.istiod
            .set_yaml(ROUTE, &route_yaml("r1", &[("a", 1)], "v1"))?;
        Ok(m)
    }

    fn listener(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 18080))
    }

    fn bootstrap(&self, delta: bool) -> String {
        let admin = SocketAddr::from((self.ip, 15000));
        istiod::bootstrap(
            &self.istiod,
            admin,
            delta,
            "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local",
        )
    }

    async fn get(&self) -> Result<client::Response> {
        client::send(self.listener(), &Request::get("/").header("host", "svc")).await
    }

    /// Sends until `pred` holds for a response (config propagation is asynchronous; the ACK is the
    /// readiness signal, but Envoy applies some updates just after ACKing).
    async fn until(&self, what: &str, pred: impl Fn(&client::Response) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + T;
        let mut last = String::new();
        while tokio::time::Instant::now() < deadline {
            match self.get().await {
                Ok(r) if pred(&r) => return Ok(()),
                Ok(r) => last = format!("{} {:?}", r.status, r.header("x-upstream")),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("{what}: never happened (last: {last})")
    }
}

async fn ack_all(m: &Mesh) -> Result<()> {
    for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        m.istiod.wait_acked(t, T).await?;
    }
    Ok(())
}

/// Both proxies: subscribe, ACK every type, and serve through the dynamic listener.
async fn basic(side: Side, delta: bool) -> Result<()> {
    let m = Mesh::new(delta).await?;
    let p = Proxy::start(side, &m.bootstrap(delta)).await?;
    ack_all(&m).await.with_context(|| p.diagnostics())?;
    let r = m.get().await?;
    assert_eq!(r.status, 200, "{side:?}: {}", r.body_text());
    assert_eq!(r.header("x-upstream"), Some("a1"));
    assert_eq!(r.header("x-tag"), Some("v1"));
    let seen = m.istiod.seen();
    assert!(
        seen.iter().all(|s| s.error.is_none()),
        "{side:?} NACKed: {seen:#?}"
    );
    assert!(seen.iter().all(|s| s.delta == delta));
    // set_node_on_first_message_only: the node rides on the first request of the stream only.
    assert!(seen[0].has_node, "{side:?}: first request without node");
    assert_eq!(
        seen[0].node_id,
        "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local"
    );
    assert!(
        seen[1..].iter().all(|s| !s.has_node),
        "{side:?}: node repeated"
    );
    // Envoy's order: clusters first; endpoints requested before the clusters are ACKed; listeners
    // once clusters are warm; routes requested before the listeners are ACKed.
    let pos = |pred: &dyn Fn(&istiod::Seen) -> bool| seen.iter().position(pred).unwrap();
    assert_eq!(seen[0].type_url, CLUSTER, "{side:?}: {seen:#?}");
    let eds_req = pos(&|s| s.type_url == ENDPOINT && !s.is_reply());
    let cds_ack = pos(&|s| s.type_url == CLUSTER && s.is_reply());
    let lds_req = pos(&|s| s.type_url == LISTENER && !s.is_reply());
    let eds_ack = pos(&|s| s.type_url == ENDPOINT && s.is_reply());
    let rds_req = pos(&|s| s.type_url == ROUTE && !s.is_reply());
    let lds_ack = pos(&|s| s.type_url == LISTENER && s.is_reply());
    assert!(eds_req < cds_ack, "{side:?}: EDS after CDS ACK: {seen:#?}");
    assert!(eds_req < lds_req, "{side:?}: LDS before EDS: {seen:#?}");
    let _ = eds_ack;
    assert!(rds_req < lds_ack, "{side:?}: RDS after LDS ACK: {seen:#?}");
    let eds = &seen[eds_req];
    assert_eq!(eds.names, vec!["a".to_string()]);
    assert_eq!(seen[rds_req].names, vec!["r1".to_string()]);
    if !delta {
        // SotW ACKs carry the accepted version.
        let ack = &seen[cds_ack];
        assert!(ack.version_info.starts_with('v'), "{ack:?}");
    }
    Ok(())
}

#[tokio::test]
async fn delta_envoy_acks_fake_istiod() -> Result<()> {
    basic(Side::Envoy, true).await
}

#[tokio::test]
async fn delta_pingsail() -> Result<()> {
    basic(Side::Pingsail, true).await
}

#[tokio::test]
async fn sotw_envoy_acks_fake_istiod() -> Result<()> {
    basic(Side::Envoy, false).await
}

#[tokio::test]
async fn sotw_pingsail() -> Result<()> {
    basic(Side::Pingsail, false).await
}

/// Updates apply to the next request: routes, endpoints, new clusters; removals are honoured.
async fn updates(side: Side, delta: bool) -> Result<()> {
    let m = Mesh::new(delta).await?;
    let p = Proxy::start(side, &m.bootstrap(delta)).await?;
    ack_all(&m).await.with_context(|| p.diagnostics())?;
    // A new route version.
    m.istiod
        .set_yaml(ROUTE, &route_yaml("r1", &[("a", 1)], "v2"))?;
    m.until("route v2", |r| r.header("x-tag") == Some("v2"))
        .await?;
    // Endpoints replaced.
    m.istiod
        .set_yaml(ENDPOINT, &cla_yaml("a", &[(m.echoes[1].addr(), 1)]))?;
    m.until("endpoint a2", |r| r.header("x-upstream") == Some("a2"))
        .await?;
    // A new cluster with its endpoints, then a route to it.
    m.istiod.set_yaml(CLUSTER, &cluster_yaml(&["a", "b"]))?;
    m.istiod.set_yaml(
        ENDPOINT,
        &format!(
            "{}{}",
            cla_yaml("a", &[(m.echoes[1].addr(), 1)]),
            cla_yaml("b", &[(m.echoes[2].addr(), 1)])
        ),
    )?;
    m.istiod
        .set_yaml(ROUTE, &route_yaml("r1", &[("b", 1)], "v3"))?;
    m.until("cluster b", |r| r.header("x-upstream") == Some("b1"))
        .await?;
    // Cluster a removed (omitted in SotW, removed_resources in delta): b still serves.
    m.istiod.set_yaml(CLUSTER, &cluster_yaml(&["b"]))?;
    m.istiod.wait_acked(CLUSTER, T).await?;
    m.until("still b", |r| r.header("x-upstream") == Some("b1"))
        .await?;
    let dump = p.config_dump().await?;
    let clusters = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["@type"].as_str().unwrap().ends_with("ClustersConfigDump"))
        .unwrap()
        .clone();
    let active: Vec<&str> = clusters["dynamic_active_clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cluster"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(active, vec!["b"], "{side:?}");
    // The listener removed: connections are refused.
    m.istiod.set(LISTENER, vec![])?;
    m.istiod.wait_acked(LISTENER, T).await?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if tokio::net::TcpStream::connect(m.listener()).await.is_err() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{side:?}: listener still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn delta_updates_envoy() -> Result<()> {
    updates(Side::Envoy, true).await
}

#[tokio::test]
async fn delta_updates_pingsail() -> Result<()> {
    updates(Side::Pingsail, true).await
}

#[tokio::test]
async fn sotw_updates_envoy() -> Result<()> {
    updates(Side::Envoy, false).await
}

#[tokio::test]
async fn sotw_updates_pingsail() -> Result<()> {
    updates(Side::Pingsail, false).await
}

/// A bad update is NACKed with the nonce of the rejected response and a message naming the resource;
/// the last good configuration keeps serving.
async fn nack(side: Side, delta: bool) -> Result<()> {
    let m = Mesh::new(delta).await?;
    let p = Proxy::start(side, &m.bootstrap(delta)).await?;
    ack_all(&m).await.with_context(|| p.diagnostics())?;
    let bad_route = r#"
- name: r1
  virtual_hosts:
  - name: all
    domains: ["*"]
    routes:
    - match: { safe_regex: { regex: "([a-z" } }
      route: { cluster: a }
"#;
    m.istiod.set_yaml(ROUTE, bad_route)?;
    m.istiod
        .wait_for("NACK of routes", T, |seen, sent| {
            let Some(last) = sent.iter().rev().find(|s| s.type_url == ROUTE) else {
                return false;
            };
            seen.iter()
                .any(|s| s.type_url == ROUTE && s.nonce == last.nonce && s.error.is_some())
        })
        .await?;
    let seen = m.istiod.seen();
    let nack = seen.iter().rev().find(|s| s.error.is_some()).unwrap();
    let msg = nack.error.clone().unwrap();
    assert!(
        msg.contains("regex") || msg.contains("missing ]"),
        "{side:?}: {msg}"
    );
    if !delta {
        // SotW NACK: version_info is the last accepted version.
        let accepted = seen
            .iter()
            .rfind(|s| s.type_url == ROUTE && s.is_reply() && s.error.is_none())
            .unwrap();
        assert_eq!(nack.version_info, accepted.version_info, "{side:?}");
    }
    let r = m.get().await?;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-tag"),
        Some("v1"),
        "{side:?}: old config must serve"
    );
    // A bad listener: same.
    let bad_listener = listener_yaml("http", m.ip, 18080, "r1", "http")
        .replace(&format!("address: {}", m.ip), "address: not-an-ip");
    m.istiod.set_yaml(LISTENER, &bad_listener)?;
    m.istiod
        .wait_for("NACK of listeners", T, |seen, sent| {
            let Some(last) = sent.iter().rev().find(|s| s.type_url == LISTENER) else {
                return false;
            };
            seen.iter()
                .any(|s| s.type_url == LISTENER && s.nonce == last.nonce && s.error.is_some())
        })
        .await?;
    let seen = m.istiod.seen();
    let msg = seen.iter().rev().find_map(|s| s.error.clone()).unwrap();
    assert!(
        msg.contains("http"),
        "{side:?}: NACK must name the listener: {msg}"
    );
    let r = m.get().await?;
    assert_eq!(r.status, 200);
    if side == Side::Pingsail {
        let dump = p.config_dump().await?;
        let text = dump.to_string();
        assert!(
            text.contains("error_state"),
            "config dump has no error_state"
        );
    }
    Ok(())
}

#[tokio::test]
async fn delta_nack_envoy() -> Result<()> {
    nack(Side::Envoy, true).await
}

#[tokio::test]
async fn delta_nack_pingsail() -> Result<()> {
    nack(Side::Pingsail, true).await
}

#[tokio::test]
async fn sotw_nack_envoy() -> Result<()> {
    nack(Side::Envoy, false).await
}

#[tokio::test]
async fn sotw_nack_pingsail() -> Result<()> {
    nack(Side::Pingsail, false).await
}

/// The stream drops: the proxy reconnects and resubscribes with what it holds, and serves meanwhile.
async fn reconnect(side: Side, delta: bool) -> Result<()> {
    let m = Mesh::new(delta).await?;
    let p = Proxy::start(side, &m.bootstrap(delta)).await?;
    ack_all(&m).await.with_context(|| p.diagnostics())?;
    m.istiod.drop_streams();
    assert_eq!(m.get().await?.status, 200);
    m.istiod
        .wait_for("a second stream", T, |seen, _| {
            seen.iter().any(|s| s.stream == 2)
        })
        .await?;
    for t in [CLUSTER, LISTENER] {
        m.istiod
            .wait_for("resubscription", T, |seen, _| {
                seen.iter().any(|s| s.stream == 2 && s.type_url == t)
            })
            .await?;
    }
    let seen = m.istiod.seen();
    let first2 = seen.iter().find(|s| s.stream == 2).unwrap();
    assert!(
        first2.has_node,
        "{side:?}: the new stream's first request carries the node"
    );
    let cds = seen
        .iter()
        .find(|s| s.stream == 2 && s.type_url == CLUSTER)
        .unwrap();
    if delta {
        assert_eq!(
            cds.initial_versions.keys().collect::<Vec<_>>(),
            vec!["a"],
            "{side:?}: {cds:?}"
        );
    } else {
        assert!(!cds.version_info.is_empty(), "{side:?}: {cds:?}");
    }
    // Updates flow on the new stream.
    m.istiod
        .set_yaml(ROUTE, &route_yaml("r1", &[("a", 1)], "v9"))?;
    m.until("route v9", |r| r.header("x-tag") == Some("v9"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn delta_reconnect_envoy() -> Result<()> {
    reconnect(Side::Envoy, true).await
}

#[tokio::test]
async fn delta_reconnect_pingsail() -> Result<()> {
    reconnect(Side::Pingsail, true).await
}

#[tokio::test]
async fn sotw_reconnect_envoy() -> Result<()> {
    reconnect(Side::Envoy, false).await
}

#[tokio::test]
async fn sotw_reconnect_pingsail() -> Result<()> {
    reconnect(Side::Pingsail, false).await
}

/// Warming: a new listener does not accept until its routes arrive; a new cluster is not used until
/// its endpoints arrive (requests meanwhile get 503 as for an unknown cluster).
async fn warming(side: Side) -> Result<()> {
    let m = Mesh::new(true).await?;
    let p = Proxy::start(side, &m.bootstrap(true)).await?;
    ack_all(&m).await.with_context(|| p.diagnostics())?;
    let second = SocketAddr::from((m.ip, 18081));
    m.istiod.set_yaml(
        LISTENER,
        &format!(
            "{}{}",
            listener_yaml("http", m.ip, 18080, "r1", "http"),
            listener_yaml("http2", m.ip, 18081, "r2", "http2")
        ),
    )?;
    m.istiod.wait_acked(LISTENER, T).await?;
    m.istiod
        .wait_for("RDS r2 requested", T, |seen, _| {
            seen.iter()
                .any(|s| s.type_url == ROUTE && s.names.contains(&"r2".to_string()))
        })
        .await?;
    assert!(
        tokio::net::TcpStream::connect(second).await.is_err(),
        "{side:?}: a warming listener accepted a connection"
    );
    m.istiod.set_yaml(
        ROUTE,
        &format!(
            "{}{}",
            route_yaml("r1", &[("a", 1)], "v1"),
            route_yaml("r2", &[("a", 1)], "r2")
        ),
    )?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Ok(r) = client::send(second, &Request::get("/").header("host", "svc")).await {
            assert_eq!(r.header("x-tag"), Some("r2"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{side:?}: listener never warmed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A cluster without endpoints yet.
    m.istiod.set_yaml(CLUSTER, &cluster_yaml(&["a", "c"]))?;
    m.istiod
        .set_yaml(ROUTE, &route_yaml("r1", &[("c", 1)], "c"))?;
    m.istiod.wait_acked(ROUTE, T).await?;
    m.until("route to warming cluster", |r| {
        r.header("x-tag") == Some("c")
    })
    .await?;
    let r = m.get().await?;
    assert_eq!(r.status, 503, "{side:?}: {}", r.body_text());
    m.istiod.set_yaml(
        ENDPOINT,
        &format!(
            "{}{}",
            cla_yaml("a", &[(m.echoes[0].addr(), 1)]),
            cla_yaml("c", &[(m.echoes[2].addr(), 1)])
        ),
    )?;
    m.until("cluster c warm", |r| r.header("x-upstream") == Some("b1"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn warming_envoy() -> Result<()> {
    warming(Side::Envoy).await
}

#[tokio::test]
async fn warming_pingsail() -> Result<()> {
    warming(Side::Pingsail).await
}

/// Pilot-agent's shape: ADS over a Unix socket (`pipe`).
#[tokio::test]
async fn unix_socket_pingsail() -> Result<()> {
    let dir = pingsail_tests::net::TempDir::new("pingsail-xds")?;
    let sock = dir.path().join("XDS");
    let istiod = FakeIstiod::start_uds(&sock).await?;
    let echo = Echo::start("u").await?;
    let ip = random_loopback_ip();
    istiod.set_yaml(CLUSTER, &cluster_yaml(&["a"]))?;
    istiod.set_yaml(ENDPOINT, &cla_yaml("a", &[(echo.addr(), 1)]))?;
    istiod.set_yaml(LISTENER, &listener_yaml("http", ip, 18080, "r1", "http"))?;
    istiod.set_yaml(ROUTE, &route_yaml("r1", &[("a", 1)], "u"))?;
    let bootstrap = istiod::bootstrap(&istiod, SocketAddr::from((ip, 15000)), true, "n");
    let p = pingsail_proxy::testing::start(&bootstrap).await?;
    p.wait_initialized(T).await?;
    let r = client::send(
        SocketAddr::from((ip, 18080)),
        &Request::get("/").header("host", "svc"),
    )
    .await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream"), Some("u"));
    Ok(())
}

/// Under steady keep-alive load, a stream of updates (route weights, endpoints added and removed,
/// clusters added and removed, the listener's filter chain replaced) fails no request.
async fn churn(side: Side) -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let m = Mesh::new(true).await?;
    m.istiod.set_yaml(CLUSTER, &cluster_yaml(&["a", "b"]))?;
    m.istiod.set_yaml(
        ENDPOINT,
        &format!(
            "{}{}",
            cla_yaml("a", &[(m.echoes[0].addr(), 1)]),
            cla_yaml("b", &[(m.echoes[2].addr(), 1)])
        ),
    )?;
    let p = Proxy::start(side, &m.bootstrap(true)).await?;
    ack_all(&m).await.with_context(|| p.diagnostics())?;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let tags = Arc::new(parking_lot::Mutex::new(
        std::collections::BTreeSet::<String>::new(),
    ));
    let addr = m.listener();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, ok, failures, tags) = (stop.clone(), ok.clone(), failures.clone(), tags.clone());
        workers.push(tokio::spawn(async move {
            let mut conn: Option<client::Connection> = None;
            while !stop.load(Ordering::Relaxed) {
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => match client::Connection::connect(addr).await {
                        Ok(c) => c,
                        Err(e) => {
                            failures.lock().push(format!("connect: {e}"));
                            continue;
                        }
                    },
                };
                match c.send(&Request::get("/").header("host", "svc")).await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if let (Some(t), Some(u)) = (r.header("x-tag"), r.header("x-upstream")) {
                            tags.lock().insert(format!("{t}/{u}"));
                        }
                        if c.is_reusable() && r.header("connection") != Some("close") {
                            conn = Some(c);
                        }
                    }
                    Ok(r) => failures
                        .lock()
                        .push(format!("{} {}", r.status, r.body_text())),
                    Err(e) => failures.lock().push(format!("request: {e}")),
                }
            }
        }));
    }
    for i in 0..30u32 {
        let (wa, wb) = (1 + i % 3, 1 + (i + 1) % 2);
        m.istiod.set_yaml(
            ROUTE,
            &route_yaml("r1", &[("a", wa), ("b", wb)], &format!("t{}", i % 4)),
        )?;
        let a_eps: Vec<(SocketAddr, u32)> = if i % 2 == 0 {
            vec![(m.echoes[0].addr(), 1), (m.echoes[1].addr(), 2)]
        } else {
            vec![(m.echoes[1].addr(), 1)]
        };
        let extra = if i % 3 == 0 {
            vec!["a", "b", "c"]
        } else {
            vec!["a", "b"]
        };
        m.istiod.set_yaml(CLUSTER, &cluster_yaml(&extra))?;
        m.istiod.set_yaml(
            ENDPOINT,
            &format!(
                "{}{}{}",
                cla_yaml("a", &a_eps),
                cla_yaml("b", &[(m.echoes[2].addr(), 1)]),
                cla_yaml("c", &[(m.echoes[2].addr(), 1)])
            ),
        )?;
        let prefix = if i % 5 == 4 { "http_alt" } else { "http" };
        m.istiod
            .set_yaml(LISTENER, &listener_yaml("http", m.ip, 18080, "r1", prefix))?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    let failures = failures.lock().clone();
    let ok = ok.load(Ordering::Relaxed);
    let tags = tags.lock().clone();
    assert!(
        failures.is_empty(),
        "{side:?}: {} failed of {}: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(10)]
    );
    assert!(ok > 200, "{side:?}: only {ok} requests");
    // The updates really applied while the load ran.
    assert!(tags.len() >= 6, "{side:?}: saw only {tags:?}");
    let seen = m.istiod.seen();
    assert!(
        seen.iter().all(|s| s.error.is_none()),
        "{side:?}: NACKs during churn"
    );
    Ok(())
}

#[tokio::test]
async fn churn_under_load_envoy() -> Result<()> {
    churn(Side::Envoy).await
}

#[tokio::test]
async fn churn_under_load_pingsail() -> Result<()> {
    churn(Side::Pingsail).await
}

/// A changed filter chain applies in place: new connections use it, and an open HTTP/1.1 connection
/// on the old chain is drained with `connection: close` on its next response.
async fn chain_drain(side: Side) -> Result<()> {
    let m = Mesh::new(true).await?;
    let p = Proxy::start(side, &m.bootstrap(true)).await?;
    ack_all(&m).await.with_context(|| p.diagnostics())?;
    let mut old = client::Connection::connect(m.listener()).await?;
    let req = Request::get("/").header("host", "svc");
    let r = old.send(&req).await?;
    assert_eq!(r.status, 200);
    assert_ne!(r.header("connection"), Some("close"));
    // Same routes, different chain (stat prefix): the chain is replaced.
    m.istiod.set_yaml(
        LISTENER,
        &listener_yaml("http", m.ip, 18080, "r1", "http_v2"),
    )?;
    m.istiod.wait_acked(LISTENER, T).await?;
    // Envoy applies the listener just after ACKing it: wait for a new connection to see the drain
    // on the old one.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let r = old.send(&req).await?;
        assert_eq!(r.status, 200, "{side:?}");
        if r.header("connection") == Some("close") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{side:?}: old chain never drained"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = m.get().await?;
    assert_eq!(r.status, 200, "{side:?}: new connections use the new chain");
    // An unchanged chain does not drain: push the same listener again with a new route version.
    let mut kept = client::Connection::connect(m.listener()).await?;
    assert_eq!(kept.send(&req).await?.status, 200);
    m.istiod
        .set_yaml(ROUTE, &route_yaml("r1", &[("a", 1)], "v5"))?;
    m.until("route v5", |r| r.header("x-tag") == Some("v5"))
        .await?;
    let r = kept.send(&req).await?;
    assert_eq!(
        r.header("x-tag"),
        Some("v5"),
        "{side:?}: open connections see new routes"
    );
    assert_ne!(
        r.header("connection"),
        Some("close"),
        "{side:?}: route update drained"
    );
    Ok(())
}

#[tokio::test]
async fn chain_drain_envoy() -> Result<()> {
    chain_drain(Side::Envoy).await
}

#[tokio::test]
async fn chain_drain_pingsail() -> Result<()> {
    chain_drain(Side::Pingsail).await
}

/// Istio's real output, served over ADS: every resource the config-dump corpus
/// (docs/COMPATIBILITY-istio-configdumps.md) says loads is ACKed (it does not appear in any NACK),
/// and every refused one is NACKed with its name and the same field path; the proxy never crashes and
/// keeps serving its static listeners.
#[tokio::test]
async fn istio_configdumps_over_ads() -> Result<()> {
    use pingsail_tests::configdump::{Kind, Outcome, check, configdumps_dir, read_corpus};
    fn at<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
        let mut cur = v;
        for seg in path.split('.') {
            let (name, idx) = match seg.split_once('[') {
                Some((n, i)) => (n, Some(i.trim_end_matches(']').parse::<usize>().ok()?)),
                None => (seg, None),
            };
            cur = cur.get(name)?;
            if let Some(i) = idx {
                cur = cur.get(i)?;
            }
        }
        Some(cur)
    }
    let dumps = read_corpus(&configdumps_dir())?;
    let mut checked = 0;
    for d in &dumps {
        let resources: Vec<_> = d
            .resources
            .iter()
            .filter(|r| r.origin.starts_with("dynamic"))
            .collect();
        if resources.is_empty() {
            continue;
        }
        let istiod = FakeIstiod::start_tcp().await?;
        let ip = random_loopback_ip();
        let mut by_type: std::collections::BTreeMap<&str, Vec<serde_json::Value>> =
            Default::default();
        let mut expect = Vec::new();
        for r in &resources {
            let mut v = at(&r.bootstrap, r.prefix)
                .with_context(|| format!("{} {}", d.file, r.prefix))?
                .clone();
            let t = match r.kind {
                Kind::Listener => {
                    // Bind where parallel tests cannot collide; the address is never what is refused.
                    if let Some(sa) = v.pointer_mut("/address/socket_address/address") {
                        *sa = serde_json::Value::String(ip.to_string());
                    }
                    LISTENER
                }
                Kind::Cluster => CLUSTER,
                Kind::RouteConfiguration => ROUTE,
                Kind::ClusterLoadAssignment => ENDPOINT,
            };
            if let Some(o) = v.as_object_mut() {
                o.remove("@type");
            }
            by_type.entry(t).or_default().push(v);
            expect.push((t, r.name.clone(), check(r)));
        }
        // istiod always answers an EDS subscription, with an empty assignment for a service
        // without endpoints; a dump holds only assignments that had endpoints.
        let have: std::collections::BTreeSet<String> = by_type
            .get(ENDPOINT)
            .into_iter()
            .flatten()
            .filter_map(|c| c["cluster_name"].as_str().map(str::to_string))
            .collect();
        let wanted: Vec<String> = by_type
            .get(CLUSTER)
            .into_iter()
            .flatten()
            .filter(|c| c["type"] == "EDS")
            .filter_map(|c| {
                c["eds_cluster_config"]["service_name"]
                    .as_str()
                    .or(c["name"].as_str())
                    .map(str::to_string)
            })
            .filter(|n| !have.contains(n))
            .collect();
        for n in wanted {
            by_type
                .entry(ENDPOINT)
                .or_default()
                .push(serde_json::json!({ "cluster_name": n }));
        }
        for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
            let items = by_type.remove(t).unwrap_or_default();
            istiod.set_yaml(t, &serde_json::to_string(&items)?)?;
        }
        let bootstrap = istiod::bootstrap(&istiod, SocketAddr::from((ip, 15000)), true, "n");
        let p = pingsail_proxy::testing::start(&bootstrap).await?;
        for t in [CLUSTER, LISTENER] {
            istiod
                .wait_for(&format!("{} answered for {t}", d.file), T, |seen, sent| {
                    sent.iter()
                        .filter(|s| s.type_url == t)
                        .all(|s| seen.iter().any(|r| r.type_url == t && r.nonce == s.nonce))
                        && sent.iter().any(|s| s.type_url == t)
                })
                .await?;
        }
        // Routes and endpoints are only requested when something names them.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = istiod.seen();
        for (t, name, outcome) in expect {
            let nacks: Vec<&String> = seen
                .iter()
                .filter(|s| s.type_url == t)
                .filter_map(|s| s.error.as_ref())
                .collect();
            let tag = format!("'{name}': ");
            let mine = nacks.iter().find_map(|m| {
                m.split("; ")
                    .find(|part| part.contains(&tag))
                    .map(|s| s.to_string())
            });
            match (&outcome, &mine) {
                (Outcome::Loads, None) => {}
                (Outcome::Later { path, .. } | Outcome::Uncovered { path, .. }, Some(m)) => {
                    let concrete = m.split(&tag).nth(1).unwrap_or_default();
                    assert!(
                        concrete.starts_with(path.as_str())
                            || (path == "(resource)" && concrete.starts_with(':')),
                        "{} {name}: corpus says refused at {path}, NACK says {m}",
                        d.file
                    );
                }
                (Outcome::Later { .. } | Outcome::Uncovered { .. }, None)
                    if t == ROUTE || t == ENDPOINT =>
                {
                    // Never requested (no listener or cluster that loads names it) — Envoy would
                    // not ask for it either.
                }
                _ => panic!("{} {name}: corpus {outcome:?}, over ADS {mine:?}", d.file),
            }
            checked += 1;
        }
        drop(p);
    }
    assert!(checked > 20, "only {checked} resources checked");
    Ok(())
}

/// Endpoints that stay across an EDS update keep their pooled upstream connections.
async fn pooled_endpoints_survive(side: Side) -> Result<()> {
    let m = Mesh::new(true).await?;
    let p = Proxy::start(side, &m.bootstrap(true)).await?;
    ack_all(&m).await.with_context(|| p.diagnostics())?;
    let mut c = client::Connection::connect(m.listener()).await?;
    let req = Request::get("/").header("host", "svc");
    for _ in 0..3 {
        assert_eq!(c.send(&req).await?.header("x-upstream"), Some("a1"));
    }
    let before = m.echoes[0].connections();
    assert_eq!(before, 1, "{side:?}: keep-alive upstream");
    // a2 joins with a tiny weight; a1 stays.
    m.istiod.set_yaml(
        ENDPOINT,
        &cla_yaml("a", &[(m.echoes[0].addr(), 1000), (m.echoes[1].addr(), 1)]),
    )?;
    m.istiod.wait_acked(ENDPOINT, T).await?;
    let mut to_a1 = 0;
    for _ in 0..20 {
        if c.send(&req).await?.header("x-upstream") == Some("a1") {
            to_a1 += 1;
        }
    }
    assert!(to_a1 > 0);
    assert_eq!(
        m.echoes[0].connections(),
        before,
        "{side:?}: an endpoint that stayed lost its pooled connection"
    );
    Ok(())
}

#[tokio::test]
async fn pooled_endpoints_survive_envoy() -> Result<()> {
    pooled_endpoints_survive(Side::Envoy).await
}

#[tokio::test]
async fn pooled_endpoints_survive_pingsail() -> Result<()> {
    pooled_endpoints_survive(Side::Pingsail).await
}

/// `initial_fetch_timeout` on the RDS config source ends warming: the listener starts and answers
/// 404 (no route configuration) until the routes arrive.
async fn initial_fetch_timeout(side: Side) -> Result<()> {
    let m = Mesh::new(true).await?;
    let p = Proxy::start(side, &m.bootstrap(true)).await?;
    ack_all(&m).await.with_context(|| p.diagnostics())?;
    let l = listener_yaml("late", m.ip, 18082, "never", "late")
        .replace("initial_fetch_timeout: 0s", "initial_fetch_timeout: 0.5s");
    m.istiod.set_yaml(
        LISTENER,
        &format!("{}{l}", listener_yaml("http", m.ip, 18080, "r1", "http")),
    )?;
    m.istiod.wait_acked(LISTENER, T).await?;
    let addr = SocketAddr::from((m.ip, 18082));
    let deadline = tokio::time::Instant::now() + T;
    let r = loop {
        if let Ok(r) = client::send(addr, &Request::get("/").header("host", "svc")).await {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{side:?}: never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(r.status, 404, "{side:?}");
    Ok(())
}

#[tokio::test]
async fn initial_fetch_timeout_envoy() -> Result<()> {
    initial_fetch_timeout(Side::Envoy).await
}

#[tokio::test]
async fn initial_fetch_timeout_pingsail() -> Result<()> {
    initial_fetch_timeout(Side::Pingsail).await
}

/// Outlier-detection state is kept across an EDS update for endpoints that stay: an ejected host
/// stays ejected when another endpoint joins.
async fn outlier_state_survives_eds_update(side: Side) -> Result<()> {
    let m = Mesh::new(true).await?;
    m.istiod.set_yaml(
        CLUSTER,
        &cluster_yaml(&["a"]).replace(
            "  connect_timeout: 1s\n",
            "  connect_timeout: 1s\n  common_lb_config: { healthy_panic_threshold: { value: 0 } }\n  outlier_detection: { consecutive_5xx: 2, interval: 30s, base_ejection_time: 30s, max_ejection_percent: 100 }\n",
        ),
    )?;
    let p = Proxy::start(side, &m.bootstrap(true)).await?;
    ack_all(&m).await.with_context(|| p.diagnostics())?;
    let fail = Request::get("/")
        .header("host", "svc")
        .header("x-echo-status", "503");
    for _ in 0..2 {
        let r = client::send(m.listener(), &fail).await?;
        assert_eq!(r.header("x-upstream"), Some("a1"), "{side:?}");
    }
    // The ejection is applied asynchronously in Envoy.
    m.until("a1 ejected", |r| {
        r.status == 503 && r.body_text() == "no healthy upstream"
    })
    .await?;
    m.istiod.set_yaml(
        ENDPOINT,
        &cla_yaml("a", &[(m.echoes[0].addr(), 1), (m.echoes[1].addr(), 1)]),
    )?;
    m.istiod.wait_acked(ENDPOINT, T).await?;
    m.until("a2 in service", |r| r.header("x-upstream") == Some("a2"))
        .await?;
    for _ in 0..10 {
        let r = m.get().await?;
        assert_eq!(
            r.header("x-upstream"),
            Some("a2"),
            "{side:?}: a1 came back after the EDS update"
        );
    }
    Ok(())
}

#[tokio::test]
async fn outlier_state_survives_eds_update_envoy() -> Result<()> {
    outlier_state_survives_eds_update(Side::Envoy).await
}

#[tokio::test]
async fn outlier_state_survives_eds_update_pingsail() -> Result<()> {
    outlier_state_survives_eds_update(Side::Pingsail).await
}
