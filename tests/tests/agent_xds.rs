// SPDX-License-Identifier: Apache-2.0
//! The agent's xDS proxy between a proxy and the fake istiod behind TLS, with pingsail-proxy and
//! with the real Envoy as the client: config reaches the proxy through the agent's Unix socket,
//! the agent authenticates (bearer token, `ClusterID`, workload certificate), ACKs and NACKs
//! reach istiod unchanged, the agent's NDS subscription is answered and kept from the proxy and
//! the name table reaches the DNS proxy, and after istiod restarts the proxy gets config again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use envoy_types::pb::google::protobuf::Any;
use pingsail_agent::dns::{DnsConfig, DnsServer};
use pingsail_agent::nds::{NameInfo, NameTable, NameTableReceiver, name_table_channel};
use pingsail_agent::sds::{SecretSender, secret_channel};
use pingsail_agent::testing::{FAKE_CA_SERVER_NAME, TestPki};
use pingsail_agent::xdsproxy::{Stats, XdsProxy, XdsProxyConfig, XdsProxyHandle};
use pingsail_tests::client::{self, Request};
use pingsail_tests::echo::EchoServer as Echo;
use pingsail_tests::envoy::Envoy;
use pingsail_tests::istiod::{self, CLUSTER, ENDPOINT, FakeIstiod, LISTENER, NAME_TABLE, ROUTE};
use pingsail_tests::net::{TempDir, random_loopback_ip};
use prost::Message as _;

const T: Duration = Duration::from_secs(20);
const NODE: &str = "sidecar~10.0.0.1~pod.ns1~ns1.svc.cluster.local";
const TOKEN: &str = "projected-token-123";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Envoy,
    Pingsail,
}

enum Proxy {
    Envoy(Envoy),
    Pingsail(#[allow(dead_code)] pingsail_proxy::testing::Running),
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
}

fn cluster_yaml(name: &str) -> String {
    format!(
        r#"
- name: {name}
  type: EDS
  connect_timeout: 1s
  eds_cluster_config: {{ eds_config: {{ ads: {{}}, resource_api_version: V3 }} }}
"#
    )
}

fn cla_yaml(name: &str, ep: SocketAddr) -> String {
    format!(
        r#"
- cluster_name: {name}
  endpoints:
  - lb_endpoints:
    - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}
"#,
        ip = ep.ip(),
        port = ep.port()
    )
}

fn listener_yaml(ip: Ipv4Addr, port: u16, route: &str) -> String {
    format!(
        r#"
- name: http
  address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: http
        rds: {{ route_config_name: {route}, config_source: {{ ads: {{}}, resource_api_version: V3 }} }}
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    )
}

fn route_yaml(name: &str, cluster: &str, tag: &str) -> String {
    format!(
        r#"
- name: {name}
  virtual_hosts:
  - name: all
    domains: ["*"]
    response_headers_to_add: [ {{ header: {{ key: x-tag, value: "{tag}" }} }} ]
    routes:
    - match: {{ prefix: / }}
      route: {{ cluster: {cluster} }}
"#
    )
}

fn name_table_any(ip: &str) -> Any {
    let mut nt = NameTable::default();
    nt.table.insert(
        "reviews.ns1.svc.cluster.local".into(),
        NameInfo {
            ips: vec![ip.into()],
            registry: "Kubernetes".into(),
            shortname: "reviews".into(),
            namespace: "ns1".into(),
            alt_hosts: vec![],
        },
    );
    Any {
        type_url: NAME_TABLE.into(),
        value: nt.encode_to_vec(),
    }
}

/// Fake istiod behind TLS, the agent's xDS proxy in front of it, resources for one route.
struct Setup {
    pki: TestPki,
    istiod: Option<FakeIstiod>,
    agent: XdsProxyHandle,
    names: NameTableReceiver,
    _secrets: SecretSender,
    echo: Echo,
    ip: Ipv4Addr,
    _dir: TempDir,
}

impl Setup {
    async fn new(with_cert: bool) -> Result<Self> {
        let pki = TestPki::new("cluster.local", false).map_err(|e| anyhow::anyhow!("{e}"))?;
        let istiod =
            FakeIstiod::start_tls(pki.istiod_tls().map_err(|e| anyhow::anyhow!("{e}"))?).await?;
        let dir = TempDir::new("pingsail-agent-xds")?;
        let root = dir.path().join("root-cert.pem");
        std::fs::write(&root, pki.root_pem())?;
        let token = dir.path().join("istio-token");
        std::fs::write(&token, format!("{TOKEN}\n"))?;
        let mut cfg = XdsProxyConfig::new(
            dir.path().join("etc/istio/proxy/XDS"),
            istiod.addr().unwrap().to_string(),
        );
        cfg.root_cert_path = Some(root);
        cfg.server_name = Some(FAKE_CA_SERVER_NAME.into());
        cfg.token_path = Some(token);
        let (secrets_tx, secrets_rx) = secret_channel();
        if with_cert {
            let secret = pki
                .workload_secret(
                    "spiffe://cluster.local/ns/ns1/sa/default",
                    Duration::from_secs(3600),
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            secrets_tx.send_replace(Some(Arc::new(secret)));
        }
        let (names_tx, names) = name_table_channel();
        let agent = XdsProxy::start(cfg, Some(secrets_rx), Some(names_tx)).await?;
        let echo = Echo::start("a1").await?;
        let s = Self {
            pki,
            istiod: Some(istiod),
            agent,
            names,
            _secrets: secrets_tx,
            echo,
            ip: random_loopback_ip(),
            _dir: dir,
        };
        s.configure(s.istiod(), "v1")?;
        Ok(s)
    }

    fn istiod(&self) -> &FakeIstiod {
        self.istiod.as_ref().unwrap()
    }

    fn configure(&self, istiod: &FakeIstiod, tag: &str) -> Result<()> {
        istiod.set_yaml(CLUSTER, &cluster_yaml("a"))?;
        istiod.set_yaml(ENDPOINT, &cla_yaml("a", self.echo.addr()))?;
        istiod.set_yaml(LISTENER, &listener_yaml(self.ip, 18080, "r1"))?;
        istiod.set_yaml(ROUTE, &route_yaml("r1", "a", tag))?;
        istiod.set_raw(NAME_TABLE, "", name_table_any("10.9.0.1"));
        Ok(())
    }

    /// Istio's bootstrap shape: `xds-grpc` is a `pipe` to the agent's socket.
    fn bootstrap(&self, delta: bool) -> String {
        let admin = SocketAddr::from((self.ip, 15000));
        let direct = istiod::bootstrap(self.istiod(), admin, delta, NODE);
        let a = self.istiod().addr().unwrap();
        let tcp = format!(
            "socket_address: {{ address: {}, port_value: {} }}",
            a.ip(),
            a.port()
        );
        assert!(direct.contains(&tcp));
        direct.replace(
            &tcp,
            &format!(
                "pipe: {{ path: {:?} }}",
                self.agent.path().display().to_string()
            ),
        )
    }

    async fn until_tag(&self, tag: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + T;
        let mut last = String::new();
        while tokio::time::Instant::now() < deadline {
            let r = client::send(
                SocketAddr::from((self.ip, 18080)),
                &Request::get("/").header("host", "svc"),
            )
            .await;
            match r {
                Ok(r) if r.status == 200 && r.header("x-tag") == Some(tag) => {
                    assert_eq!(r.header("x-upstream"), Some("a1"));
                    return Ok(());
                }
                Ok(r) => last = format!("{} {:?}", r.status, r.header("x-tag")),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("x-tag {tag} never served (last: {last})")
    }
}

async fn ack_all(istiod: &FakeIstiod) -> Result<()> {
    for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE, NAME_TABLE] {
        istiod
            .wait_acked(t, T)
            .await
            .with_context(|| format!("ACK of {t}"))?;
    }
    Ok(())
}

async fn relay(side: Side, delta: bool, with_cert: bool) -> Result<()> {
    let s = Setup::new(with_cert).await?;
    let p = Proxy::start(side, &s.bootstrap(delta)).await?;
    ack_all(s.istiod()).await.with_context(|| p.diagnostics())?;
    s.until_tag("v1").await.with_context(|| p.diagnostics())?;

    // Authentication as pilot-agent: token and ClusterID on the stream, the workload certificate
    // on the TLS connection when the agent has one.
    let headers = s.istiod().stream_headers();
    assert!(!headers.is_empty());
    for h in &headers {
        assert_eq!(
            h.get("authorization").map(String::as_str),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        assert_eq!(h.get("clusterid").map(String::as_str), Some("Kubernetes"));
    }
    let certs = s.istiod().tls_client_certs();
    assert!(!certs.is_empty());
    assert!(
        certs.iter().all(|c| *c == with_cert),
        "client certificates: {certs:?}"
    );

    // The proxy's own requests went through unchanged (node on the first one only), the agent
    // subscribed to NDS after the first LDS request and ACKed the table itself.
    let seen = s.istiod().seen();
    assert!(seen.iter().all(|r| r.delta == delta));
    assert!(seen[0].has_node && seen[0].node_id == NODE, "{:?}", seen[0]);
    let lds = seen
        .iter()
        .position(|r| r.type_url == LISTENER && !r.is_reply())
        .unwrap();
    let nds = seen
        .iter()
        .position(|r| r.type_url == NAME_TABLE && !r.is_reply())
        .unwrap();
    assert!(
        lds < nds,
        "NDS must follow the first LDS request: {seen:#?}"
    );
    assert_eq!(
        seen.iter()
            .filter(|r| r.type_url == NAME_TABLE && !r.is_reply())
            .count(),
        1
    );
    assert!(seen.iter().all(|r| r.error.is_none()), "{seen:#?}");
    let table = s.names.borrow().clone().expect("name table delivered");
    assert_eq!(
        table.table["reviews.ns1.svc.cluster.local"].ips,
        vec!["10.9.0.1".to_string()]
    );
    assert_eq!(Stats::get(&s.agent.stats().name_tables), 1);

    // A NACK from the proxy reaches istiod with its message; the old config keeps serving.
    let bad_route = r#"
- name: r1
  virtual_hosts:
  - name: all
    domains: ["*"]
    routes:
    - match: { safe_regex: { regex: "([a-z" } }
      route: { cluster: a }
"#;
    s.istiod().set_yaml(ROUTE, bad_route)?;
    s.istiod()
        .wait_for("NACK of routes", T, |seen, sent| {
            let Some(last) = sent.iter().rev().find(|x| x.type_url == ROUTE) else {
                return false;
            };
            seen.iter()
                .any(|x| x.type_url == ROUTE && x.nonce == last.nonce && x.error.is_some())
        })
        .await
        .with_context(|| p.diagnostics())?;
    assert!(Stats::get(&s.agent.stats().nacks) >= 1);
    s.until_tag("v1").await?;
    s.istiod().set_yaml(ROUTE, &route_yaml("r1", "a", "v1b"))?;
    s.until_tag("v1b").await.with_context(|| p.diagnostics())?;

    // istiod restarts (streams dropped, listener closed, a new one on the same address with new
    // config): the agent ends the proxy's stream, the proxy reconnects through the agent.
    let mut s = s;
    let old = s.istiod.take().unwrap();
    let addr = old.addr().unwrap();
    let connects = Stats::get(&s.agent.stats().upstream_connects);
    old.drop_streams();
    drop(old);
    let new = FakeIstiod::start_tls_at(
        addr,
        s.pki.istiod_tls().map_err(|e| anyhow::anyhow!("{e}"))?,
    )
    .await?;
    s.configure(&new, "v2")?;
    s.istiod = Some(new);
    s.until_tag("v2").await.with_context(|| p.diagnostics())?;
    ack_all(s.istiod()).await.with_context(|| p.diagnostics())?;
    assert!(Stats::get(&s.agent.stats().upstream_connects) > connects);
    assert!(Stats::get(&s.agent.stats().upstream_terminations) >= 1);
    // The agent subscribed to NDS again on the new stream.
    assert_eq!(Stats::get(&s.agent.stats().name_tables), 2);
    Ok(())
}

#[tokio::test]
async fn pingsail_sotw_through_agent() -> Result<()> {
    relay(Side::Pingsail, false, true).await
}

#[tokio::test]
async fn pingsail_delta_through_agent() -> Result<()> {
    relay(Side::Pingsail, true, false).await
}

#[tokio::test]
async fn envoy_sotw_through_agent() -> Result<()> {
    relay(Side::Envoy, false, false).await
}

#[tokio::test]
async fn envoy_delta_through_agent() -> Result<()> {
    relay(Side::Envoy, true, true).await
}

/// The name table from istiod reaches the DNS proxy through the xDS proxy: the service name is
/// answered over UDP with the table's address.
#[tokio::test]
async fn name_table_reaches_dns_proxy() -> Result<()> {
    let pki = TestPki::new("cluster.local", false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let istiod =
        FakeIstiod::start_tls(pki.istiod_tls().map_err(|e| anyhow::anyhow!("{e}"))?).await?;
    istiod.set_raw(NAME_TABLE, "", name_table_any("10.9.0.7"));
    let dir = TempDir::new("pingsail-agent-nds")?;
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, pki.root_pem())?;
    let mut cfg = XdsProxyConfig::new(dir.path().join("XDS"), istiod.addr().unwrap().to_string());
    cfg.root_cert_path = Some(root);
    cfg.server_name = Some(FAKE_CA_SERVER_NAME.into());
    let (names_tx, names_rx) = name_table_channel();
    let agent = XdsProxy::start(cfg, None, Some(names_tx)).await?;
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "search ns1.svc.cluster.local svc.cluster.local
",
    )?;
    let mut dns_cfg = DnsConfig::new("ns1", "ns1.svc.cluster.local");
    dns_cfg.listen = vec!["127.0.0.1:0".parse()?];
    dns_cfg.resolv_conf = resolv;
    let dns = DnsServer::start(dns_cfg, names_rx).await?;

    // The proxy: pingsail with only a listener subscription is enough to open the stream.
    let ip = random_loopback_ip();
    let admin = SocketAddr::from((ip, 15000));
    let direct = istiod::bootstrap(&istiod, admin, false, NODE);
    let a = istiod.addr().unwrap();
    let bootstrap = direct.replace(
        &format!(
            "socket_address: {{ address: {}, port_value: {} }}",
            a.ip(),
            a.port()
        ),
        &format!("pipe: {{ path: {:?} }}", agent.path().display().to_string()),
    );
    let _proxy = pingsail_proxy::testing::start(&bootstrap).await?;
    istiod.wait_acked(NAME_TABLE, T).await?;
    dns.wait_ready().await;

    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    // A query for `reviews` (short name, same namespace), type A, RD.
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.push(7);
    q.extend_from_slice(b"reviews");
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    sock.send_to(&q, dns.udp_addrs()[0]).await?;
    let mut buf = [0u8; 512];
    let (n, _) = sock.recv_from(&mut buf).await?;
    let r = &buf[..n];
    assert_eq!(&r[..2], &[0x12, 0x34]);
    assert_eq!(r[3] & 0xF, 0, "rcode");
    assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
    assert_eq!(&r[n - 4..], &[10, 9, 0, 7]);

    // A table that does not decode: the agent NACKs it to istiod and keeps the last good one.
    istiod.set_raw(
        NAME_TABLE,
        "",
        Any {
            type_url: NAME_TABLE.into(),
            value: vec![0x0a, 0xff, 0xff],
        },
    );
    istiod
        .wait_for("NACK of the name table", T, |seen, _| {
            seen.iter().any(|x| {
                x.type_url == NAME_TABLE
                    && x.error
                        .as_deref()
                        .is_some_and(|e| e.contains("decoding the name table"))
            })
        })
        .await?;
    assert_eq!(Stats::get(&agent.stats().name_table_rejects), 1);
    sock.send_to(&q, dns.udp_addrs()[0]).await?;
    let (n, _) = sock.recv_from(&mut buf).await?;
    assert_eq!(&buf[n - 4..n], &[10, 9, 0, 7]);
    Ok(())
}
