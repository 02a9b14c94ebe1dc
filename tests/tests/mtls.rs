// SPDX-License-Identifier: Apache-2.0
//! Istio-shaped mutual TLS between sidecars, in every pairing of Envoy and pingsail: certificates
//! from a test PKI served by the agent's SDS server (`default` + `ROOTCA` on a Unix socket, the
//! bootstrap's `sds-grpc` cluster), SPIFFE SAN checks both ways, HTTP/1.1 and TCP; refused
//! identities; TLS connection reuse counted on the server side.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use anyhow::{Context as _, Result, bail};
use pingsail_agent::sds::{Server, ServerHandle, WorkloadSecret, secret_channel};
use pingsail_agent::testing::TestPki;
use pingsail_tests::client::{self, Request};
use pingsail_tests::echo::EchoServer;
use pingsail_tests::envoy::Envoy;
use pingsail_tests::net::{TempDir, random_loopback_ip};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const T: Duration = Duration::from_secs(20);

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
            Side::Pingsail => Proxy::Pingsail(pingsail_proxy::testing::start(bootstrap).await?),
        })
    }

    async fn stat(&self, suffix: &str) -> u64 {
        let Proxy::Envoy(e) = self else {
            return 0;
        };
        let Ok(r) = client::send(e.admin(), &Request::get("/stats").header("host", "a")).await
        else {
            return 0;
        };
        r.body_text()
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(k, _)| k.ends_with(suffix))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    }
}

async fn sds(dir: &Path, name: &str, secret: WorkloadSecret) -> (ServerHandle, std::path::PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let (tx, rx) = secret_channel();
    tx.send_replace(Some(Arc::new(secret)));
    drop(tx);
    (Server::start(&sock, rx).await.unwrap(), sock)
}

const SDS: &str = r#"{ api_config_source: { api_type: GRPC, grpc_services: [ { envoy_grpc: { cluster_name: sds-grpc } } ], set_node_on_first_message_only: true, transport_api_version: V3 }, initial_fetch_timeout: 0s, resource_api_version: V3 }"#;

fn common_tls(indent: usize, san: &str, alpn: &[&str]) -> String {
    let i0 = " ".repeat(indent);
    let i1 = " ".repeat(indent + 2);
    let i2 = " ".repeat(indent + 4);
    format!(
        r#"
{i0}common_tls_context:
{i1}tls_params: {{ tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3 }}
{i1}alpn_protocols: {alpn:?}
{i1}tls_certificate_sds_secret_configs: [ {{ name: default, sds_config: {SDS} }} ]
{i1}combined_validation_context:
{i2}default_validation_context: {{ match_subject_alt_names: [ {san} ] }}
{i2}validation_context_sds_secret_config: {{ name: ROOTCA, sds_config: {SDS} }}"#
    )
}

fn sds_cluster(sock: &Path) -> String {
    format!(
        r#"
  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ pipe: {{ path: "{}" }} }} }} }} ] }} ]"#,
        sock.display()
    )
}

fn static_cluster(name: &str, a: SocketAddr, extra: &str) -> String {
    format!(
        r#"
  - name: "{name}"
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: "{name}"
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }} }} ] }} ]{extra}"#,
        a.ip(),
        a.port()
    )
}

fn hcm(cluster: &str) -> String {
    format!(
        r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [ {{ match: {{ prefix: / }}, route: {{ cluster: "{cluster}" }} }} ]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"#
    )
}

fn hcm_tagged(cluster: &str, tag: &str) -> String {
    hcm(cluster).replace(
        "              domains: [\"*\"]",
        &format!(
            "              domains: [\"*\"]\n              response_headers_to_add: [ {{ header: {{ key: x-chain, value: {tag} }} }} ]"
        ),
    )
}

fn tcp(cluster: &str) -> String {
    format!(
        r#"
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: "{cluster}""#
    )
}

fn admin(ip: Ipv4Addr) -> String {
    format!(
        "admin: {{ address: {{ socket_address: {{ address: {ip}, port_value: 15000 }} }} }}\nnode: {{ id: sidecar~{ip}~pod.default~default.svc.cluster.local, cluster: test }}"
    )
}

/// The server sidecar: HTTP on :18443 and TCP on :18444, both requiring a client certificate from
/// the mesh (SAN prefix `spiffe://cluster.local/`), to the local echo servers.
/// istiod's CUSTOM shape on the server's HTTP chain: an RBAC shadow policy selects the requests
/// carrying `x-check-authz`, and only those are checked by the gRPC authorization service (which
/// echoes the `CheckRequest` it received, `tests/support/authz_grpc.rs`).
const EXT_AUTHZ_FILTERS: &str = r#"          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              shadow_rules:
                action: DENY
                policies:
                  istio-ext-authz-check:
                    permissions: [ { header: { name: x-check-authz, present_match: true } } ]
                    principals: [ { any: true } ]
              shadow_rules_stat_prefix: istio_ext_authz_
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              include_peer_certificate: true
              grpc_service:
                envoy_grpc: { cluster_name: ext-authz, authority: ext-authz.local }
                timeout: 2s
              filter_enabled_metadata:
                filter: envoy.filters.http.rbac
                path: [ { key: istio_ext_authz_shadow_effective_policy_id } ]
                value: { string_match: { prefix: istio-ext-authz } }
"#;

fn server_bootstrap(
    sock: &Path,
    ip: Ipv4Addr,
    http_echo: SocketAddr,
    tcp_echo: SocketAddr,
    authz: SocketAddr,
) -> String {
    let down = |alpn: &[&str]| {
        format!(
            r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true{}"#,
            common_tls(10, r#"{ prefix: "spiffe://cluster.local/" }"#, alpn)
        )
    };
    format!(
        r#"
{admin}
static_resources:
  listeners:
  - name: inbound_http
    address: {{ socket_address: {{ address: {ip}, port_value: 18443 }} }}
    filter_chains:
    - filters:{h}{dh}
  - name: inbound_tcp
    address: {{ socket_address: {{ address: {ip}, port_value: 18444 }} }}
    filter_chains:
    - filters:{t}{dt}
  - name: permissive
    address: {{ socket_address: {{ address: {ip}, port_value: 18446 }} }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
    filter_chains:
    - filter_chain_match: {{ transport_protocol: tls }}
      filters:{ptls}{dh}
    - filter_chain_match: {{ transport_protocol: raw_buffer }}
      filters:{pplain}
  - name: only_client
    address: {{ socket_address: {{ address: {ip}, port_value: 18447 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
          stat_prefix: tcp.
          rules:
            action: ALLOW
            policies:
              client-only:
                permissions: [ {{ any: true }} ]
                principals: [ {{ authenticated: {{ principal_name: {{ exact: "{CLIENT_ID}" }} }} }} ]{t}{dt}
  clusters:{sdsc}{c1}{c2}{c3}
"#,
        admin = admin(ip),
        h = hcm("app_http").replace(
            "          stat_prefix: http",
            "          stat_prefix: http\n          forward_client_cert_details: SANITIZE_SET\n          set_current_client_cert_details: { subject: true, dns: true, uri: true }"
        ).replace("          http_filters:\n", EXT_AUTHZ_FILTERS),
        ptls = hcm_tagged("app_http", "mtls"),
        pplain = hcm_tagged("app_http", "plaintext"),
        dh = down(&["h2", "http/1.1"]),
        t = tcp("app_tcp"),
        dt = down(&["istio-peer-exchange", "h2", "http/1.1"]),
        sdsc = sds_cluster(sock),
        c1 = static_cluster("app_http", http_echo, ""),
        c2 = static_cluster("app_tcp", tcp_echo, ""),
        c3 = static_cluster(
            "ext-authz",
            authz,
            r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }"#
        ),
    )
}

/// The client sidecar: plaintext HTTP on :18080 and TCP on :18081, originating mTLS to the server
/// and expecting `expected_san`.
fn client_bootstrap(
    sock: &Path,
    ip: Ipv4Addr,
    server: Ipv4Addr,
    expected_san: &str,
    h2: bool,
) -> String {
    let h2_opts = if h2 {
        r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }"#
    } else {
        ""
    };
    let up = |sni: &str| {
        format!(
            r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {sni}{}"#,
            common_tls(
                8,
                &format!(r#"{{ exact: "{expected_san}" }}"#),
                &["istio-peer-exchange", "istio"]
            )
        )
    };
    format!(
        r#"
{admin}
static_resources:
  listeners:
  - name: outbound_http
    address: {{ socket_address: {{ address: {ip}, port_value: 18080 }} }}
    filter_chains:
    - filters:{h}
  - name: outbound_tcp
    address: {{ socket_address: {{ address: {ip}, port_value: 18081 }} }}
    filter_chains:
    - filters:{t}
  - name: outbound_permissive
    address: {{ socket_address: {{ address: {ip}, port_value: 18082 }} }}
    filter_chains:
    - filters:{hp}
  - name: outbound_only_client
    address: {{ socket_address: {{ address: {ip}, port_value: 18083 }} }}
    filter_chains:
    - filters:{tc}
  clusters:{sdsc}{c1}{c2}{c3}{c4}
"#,
        admin = admin(ip),
        h = hcm("outbound|80||server"),
        t = tcp("outbound|9000||server"),
        hp = hcm("outbound|8446||server"),
        tc = tcp("outbound|8447||server"),
        c3 = static_cluster(
            "outbound|8446||server",
            SocketAddr::from((server, 18446)),
            &up("outbound_.8446_._.server.default.svc.cluster.local")
        ),
        c4 = static_cluster(
            "outbound|8447||server",
            SocketAddr::from((server, 18447)),
            &up("outbound_.8447_._.server.default.svc.cluster.local")
        ),
        sdsc = sds_cluster(sock),
        c1 = static_cluster(
            "outbound|80||server",
            SocketAddr::from((server, 18443)),
            &format!(
                "{}{h2_opts}",
                up("outbound_.80_._.server.default.svc.cluster.local")
            )
        ),
        c2 = static_cluster(
            "outbound|9000||server",
            SocketAddr::from((server, 18444)),
            &up("outbound_.9000_._.server.default.svc.cluster.local")
        ),
    )
}

/// A gRPC authorization service for the server's HTTP chain.
async fn authz_addr() -> Result<SocketAddr> {
    let a = pingsail_tests::authz_grpc::GrpcAuthz::start().await?;
    Ok(SocketAddr::from(([127, 0, 0, 1], a.port())))
}

async fn tcp_echo() -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(a)
}

async fn tcp_roundtrip(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return vec![];
    };
    if s.write_all(msg).await.is_err() {
        return vec![];
    }
    let mut got = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await {
        Ok(Ok(_)) => got,
        _ => vec![],
    }
}

struct Pair {
    client: Proxy,
    server: Proxy,
    client_ip: Ipv4Addr,
    server_ip: Ipv4Addr,
    pki: TestPki,
    /// pushes a new client secret (rotation)
    client_tx: pingsail_agent::sds::SecretSender,
    _sds: Vec<ServerHandle>,
    _dir: TempDir,
    _echo: EchoServer,
}

async fn pair(
    client_side: Side,
    server_side: Side,
    expected_san: &str,
    foreign_client: bool,
) -> Result<Pair> {
    pair_with(
        client_side,
        server_side,
        expected_san,
        foreign_client,
        false,
    )
    .await
}

async fn pair_with(
    client_side: Side,
    server_side: Side,
    expected_san: &str,
    foreign_client: bool,
    h2: bool,
) -> Result<Pair> {
    pair_as(
        client_side,
        server_side,
        expected_san,
        foreign_client,
        h2,
        CLIENT_ID,
    )
    .await
}

async fn pair_as(
    client_side: Side,
    server_side: Side,
    expected_san: &str,
    foreign_client: bool,
    h2: bool,
    client_id: &str,
) -> Result<Pair> {
    let pki = TestPki::new("cluster.local", true).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = TempDir::new("pingsail-mtls")?;
    let server_secret = pki
        .workload_secret(SERVER_ID, Duration::from_secs(3600))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let client_secret = if foreign_client {
        // A certificate from another CA, while still trusting the real root.
        let other = TestPki::new("cluster.local", false).map_err(|e| anyhow::anyhow!("{e}"))?;
        let s = other
            .workload_secret(client_id, Duration::from_secs(3600))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        WorkloadSecret {
            root_cert_pem: pki.root_pem().to_owned().into(),
            ..s
        }
    } else {
        pki.workload_secret(client_id, Duration::from_secs(3600))
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    let (s1, server_sock) = sds(dir.path(), "server", server_secret).await;
    let client_sock = dir.path().join("client.sock");
    let (client_tx, client_rx) = secret_channel();
    client_tx.send_replace(Some(Arc::new(client_secret)));
    let s2 = Server::start(&client_sock, client_rx).await.unwrap();
    let echo = EchoServer::start("app").await?;
    let tcp = tcp_echo().await?;
    let (server_ip, client_ip) = (random_loopback_ip(), random_loopback_ip());
    let server = Proxy::start(
        server_side,
        &server_bootstrap(
            &server_sock,
            server_ip,
            echo.addr(),
            tcp,
            authz_addr().await?,
        ),
    )
    .await?;
    let client = Proxy::start(
        client_side,
        &client_bootstrap(&client_sock, client_ip, server_ip, expected_san, h2),
    )
    .await?;
    Ok(Pair {
        client,
        server,
        client_ip,
        server_ip,
        pki,
        client_tx,
        _sds: vec![s1, s2],
        _dir: dir,
        _echo: echo,
    })
}

impl Pair {
    async fn http(&self) -> Option<client::Response> {
        client::send(
            SocketAddr::from((self.client_ip, 18080)),
            &Request::get("/x").header("host", "server"),
        )
        .await
        .ok()
    }

    /// Waits until the secrets have arrived and a request passes (or `T`).
    async fn http_ok(&self) -> Option<client::Response> {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Some(r) = self.http().await
                && r.status == 200
            {
                return Some(r);
            }
            if tokio::time::Instant::now() > deadline {
                return self.http().await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn tcp_ok(&self) -> bool {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if tcp_roundtrip(SocketAddr::from((self.client_ip, 18081)), b"ping").await == b"ping" {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn interop(client: Side, server: Side) -> Result<()> {
    let p = pair(client, server, SERVER_ID, false).await?;
    let r = p.http_ok().await;
    assert_eq!(
        r.as_ref().map(|r| r.status),
        Some(200),
        "{client:?} -> {server:?}: {:?}",
        r.map(|r| r.body_text())
    );
    assert!(p.tcp_ok().await, "{client:?} -> {server:?}: TCP over mTLS");
    if server == Side::Envoy {
        // The server really terminated TLS for these.
        assert!(p.server.stat("ssl.handshake").await >= 2);
    }
    Ok(())
}

#[tokio::test]
async fn envoy_client_to_pingsail_server() -> Result<()> {
    interop(Side::Envoy, Side::Pingsail).await
}

#[tokio::test]
async fn pingsail_client_to_envoy_server() -> Result<()> {
    interop(Side::Pingsail, Side::Envoy).await
}

#[tokio::test]
async fn pingsail_to_pingsail() -> Result<()> {
    interop(Side::Pingsail, Side::Pingsail).await
}

#[tokio::test]
async fn envoy_to_envoy_baseline() -> Result<()> {
    interop(Side::Envoy, Side::Envoy).await
}

/// A client expecting another identity refuses the server, on both implementations.
async fn wrong_san(client: Side) -> Result<()> {
    let p = pair(
        client,
        Side::Envoy,
        "spiffe://cluster.local/ns/default/sa/other",
        false,
    )
    .await?;
    // Give SDS time to deliver (a refusal before that proves nothing): the server counts nothing
    // verified, the client gets no 200 and no TCP echo.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..5 {
        let r = p.http().await;
        assert_ne!(
            r.as_ref().map(|r| r.status),
            Some(200),
            "{client:?}: wrong SAN accepted"
        );
        assert!(
            tcp_roundtrip(SocketAddr::from((p.client_ip, 18081)), b"ping")
                .await
                .is_empty(),
            "{client:?}: bytes passed to a server with the wrong identity"
        );
    }
    Ok(())
}

#[tokio::test]
async fn wrong_san_refused_by_envoy_client() -> Result<()> {
    wrong_san(Side::Envoy).await
}

#[tokio::test]
async fn wrong_san_refused_by_pingsail_client() -> Result<()> {
    wrong_san(Side::Pingsail).await
}

/// A client certificate from another CA is refused by the server, on both implementations.
async fn foreign_client(server: Side) -> Result<()> {
    let p = pair(Side::Envoy, server, SERVER_ID, true).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..5 {
        let r = p.http().await;
        assert_ne!(
            r.as_ref().map(|r| r.status),
            Some(200),
            "{server:?}: foreign CA accepted"
        );
    }
    if server == Side::Envoy {
        assert!(
            p.client.stat("ssl.handshake").await == 0
                || p.server.stat("ssl.fail_verify_error").await >= 1
        );
    }
    Ok(())
}

#[tokio::test]
async fn foreign_ca_refused_by_envoy_server() -> Result<()> {
    foreign_client(Side::Envoy).await
}

#[tokio::test]
async fn foreign_ca_refused_by_pingsail_server() -> Result<()> {
    foreign_client(Side::Pingsail).await
}

/// Sequential HTTP/1.1 requests from the pingsail client reuse one mTLS connection: the server
/// (Envoy, whose counters we read) sees one handshake.
#[tokio::test]
async fn pingsail_reuses_mtls_connections() -> Result<()> {
    let p = pair(Side::Pingsail, Side::Envoy, SERVER_ID, false).await?;
    assert_eq!(p.http_ok().await.map(|r| r.status), Some(200));
    let before = p.server.stat("ssl.handshake").await;
    for _ in 0..20 {
        assert_eq!(p.http().await.map(|r| r.status), Some(200));
    }
    let after = p.server.stat("ssl.handshake").await;
    assert_eq!(
        after, before,
        "20 sequential requests opened new TLS connections"
    );
    assert!(before <= 2, "{before} handshakes for the first request");
    Ok(())
}

/// Concurrent requests to an HTTP/2 mTLS upstream share one TLS connection (after the first one
/// opened it): 20 downstream connections at once, no new handshake on the server.
#[tokio::test]
async fn pingsail_h2_multiplexes_over_one_mtls_connection() -> Result<()> {
    let p = pair_with(Side::Pingsail, Side::Envoy, SERVER_ID, false, true).await?;
    assert_eq!(p.http_ok().await.map(|r| r.status), Some(200));
    let before = p.server.stat("ssl.handshake").await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let addr = SocketAddr::from((p.client_ip, 18080));
        tasks.push(tokio::spawn(async move {
            client::send(addr, &Request::get("/c").header("host", "server"))
                .await
                .map(|r| r.status)
                .ok()
        }));
    }
    for t in tasks {
        assert_eq!(t.await?, Some(200));
    }
    assert_eq!(
        p.server.stat("ssl.handshake").await,
        before,
        "concurrent h2 requests opened new TLS connections"
    );
    Ok(())
}

/// A certificate rotation (SDS push) under steady load drops no request: pooled connections keep
/// going, and new handshakes use the new certificate.
#[tokio::test]
async fn rotation_under_load_drops_nothing() -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let p = Arc::new(pair(Side::Pingsail, Side::Pingsail, SERVER_ID, false).await?);
    assert_eq!(p.http_ok().await.map(|r| r.status), Some(200));
    let Proxy::Pingsail(client) = &p.client else {
        unreachable!()
    };
    let old_leaf = client.secret_leaf("default").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (p, stop, ok, failed) = (p.clone(), stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match p.http().await.map(|r| r.status) {
                    Some(200) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = p
        .pki
        .workload_secret(CLIENT_ID, Duration::from_secs(3600))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    p.client_tx.send_replace(Some(Arc::new(fresh)));
    // The proxy's copy changes (the readiness signal for "rotated").
    let deadline = tokio::time::Instant::now() + T;
    while client.secret_leaf("default").as_ref() == Some(&old_leaf) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotation never reached the proxy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during rotation"
    );
    assert!(ok.load(Ordering::Relaxed) > 20);
    // TCP opens a new TLS connection per downstream connection: these handshakes use the new
    // certificate and are accepted.
    for _ in 0..5 {
        assert_eq!(
            tcp_roundtrip(SocketAddr::from((p.client_ip, 18081)), b"ping").await,
            b"ping"
        );
    }
    Ok(())
}

/// PERMISSIVE as istiod compiles it (TLS and plaintext chains side by side, chosen by the
/// tls_inspector) and the server seeing the client's SPIFFE identity (a network RBAC policy that
/// allows only the client's principal): the same observations on Envoy and pingsail servers.
async fn permissive_and_identity(server: Side) -> Result<()> {
    let p = pair(Side::Envoy, server, SERVER_ID, false).await?;
    assert_eq!(p.http_ok().await.map(|r| r.status), Some(200));
    // mTLS from the client sidecar takes the TLS chain…
    let r = client::send(
        SocketAddr::from((p.client_ip, 18082)),
        &Request::get("/").header("host", "server"),
    )
    .await?;
    assert_eq!(r.status, 200, "{server:?}");
    assert_eq!(r.header("x-chain"), Some("mtls"), "{server:?}");
    // …plaintext straight to the same port takes the plaintext chain.
    let r = client::send(
        SocketAddr::from((p.server_ip, 18446)),
        &Request::get("/").header("host", "server"),
    )
    .await?;
    assert_eq!(r.header("x-chain"), Some("plaintext"), "{server:?}");
    // The server authorizes by the client's identity.
    assert_eq!(
        tcp_roundtrip(SocketAddr::from((p.client_ip, 18083)), b"me").await,
        b"me",
        "{server:?}: the client's principal was not recognised"
    );
    // Another identity from the same CA is refused by that policy.
    let other = pair_as(
        Side::Envoy,
        server,
        SERVER_ID,
        false,
        false,
        "spiffe://cluster.local/ns/default/sa/intruder",
    )
    .await?;
    assert_eq!(other.http_ok().await.map(|r| r.status), Some(200));
    for _ in 0..3 {
        assert!(
            tcp_roundtrip(SocketAddr::from((other.client_ip, 18083)), b"me")
                .await
                .is_empty(),
            "{server:?}: another identity passed the principal policy"
        );
    }
    Ok(())
}

#[tokio::test]
async fn permissive_and_identity_envoy_server() -> Result<()> {
    permissive_and_identity(Side::Envoy).await
}

#[tokio::test]
async fn permissive_and_identity_pingsail_server() -> Result<()> {
    permissive_and_identity(Side::Pingsail).await
}

/// What the server app saw in `x-forwarded-client-cert` (Hash masked, it differs per PKI).
async fn xfcc_seen(server: Side) -> Result<(String, Option<String>)> {
    let p = pair(Side::Envoy, server, SERVER_ID, false).await?;
    let r = p.http_ok().await.unwrap();
    assert_eq!(r.status, 200);
    let seen = |r: &client::Response| -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&r.body_text()).ok()?;
        v["headers"].as_array()?.iter().find_map(|h| {
            (h[0] == "x-forwarded-client-cert").then(|| h[1].as_str().unwrap_or("").to_string())
        })
    };
    let xfcc = seen(&r).unwrap_or_default();
    let masked = xfcc
        .split(';')
        .map(|f| {
            if f.starts_with("Hash=") {
                format!("Hash=<{}>", f.len() - 5)
            } else {
                f.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(";");
    // A client-supplied header on plaintext is removed (SANITIZE is the default).
    let r = client::send(
        SocketAddr::from((p.server_ip, 18446)),
        &Request::get("/")
            .header("host", "server")
            .header("x-forwarded-client-cert", "By=evil"),
    )
    .await?;
    Ok((masked, seen(&r)))
}

/// The `CheckRequest` a server sidecar sends for a request that came over mTLS: source and
/// destination principals, the URL-encoded peer certificate (`include_peer_certificate`).
async fn ext_authz_check_seen(server: Side) -> Result<serde_json::Value> {
    let p = pair(Side::Envoy, server, SERVER_ID, false).await?;
    let deadline = tokio::time::Instant::now() + T;
    let r = loop {
        let r = client::send(
            SocketAddr::from((p.client_ip, 18080)),
            &Request::get("/x")
                .header("host", "server")
                .header("x-check-authz", "1"),
        )
        .await;
        match r {
            Ok(r) if r.status == 200 => break r,
            _ if tokio::time::Instant::now() > deadline => bail!("{server:?}: no answer"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let v: serde_json::Value = serde_json::from_str(&r.body_text())?;
    let check = v["headers"]
        .as_array()
        .and_then(|hs| {
            hs.iter()
                .find_map(|h| (h[0] == "x-check").then(|| h[1].as_str().unwrap_or("").to_string()))
        })
        .context("the authorization service was not asked")?;
    Ok(serde_json::from_str(&check)?)
}

#[tokio::test]
async fn ext_authz_grpc_check_over_mtls_equals_envoy() -> Result<()> {
    let envoy = ext_authz_check_seen(Side::Envoy).await?;
    let ours = ext_authz_check_seen(Side::Pingsail).await?;
    assert_eq!(
        envoy["source"]["principal"], CLIENT_ID,
        "Envoy's source principal"
    );
    assert_eq!(
        envoy["destination"]["principal"], SERVER_ID,
        "Envoy's destination"
    );
    assert!(
        envoy["source"]["certificate"]
            .as_str()
            .is_some_and(|c| c.ends_with("valid_pem=true")),
        "Envoy's peer certificate: {}",
        envoy["source"]["certificate"]
    );
    assert_eq!(
        envoy["source"], ours["source"],
        "left: Envoy, right: pingsail"
    );
    assert_eq!(
        envoy["destination"], ours["destination"],
        "left: Envoy, right: pingsail"
    );
    // The request attributes, apart from the XFCC hash (each run has its own PKI).
    let mask = |v: &serde_json::Value| {
        let mut v = v["http"].clone();
        v["headers"]["x-forwarded-client-cert"] = serde_json::Value::Null;
        v
    };
    assert_eq!(mask(&envoy), mask(&ours), "left: Envoy, right: pingsail");
    Ok(())
}

#[tokio::test]
async fn xfcc_equals_envoy() -> Result<()> {
    let envoy = xfcc_seen(Side::Envoy).await?;
    let ours = xfcc_seen(Side::Pingsail).await?;
    assert_eq!(
        envoy.0,
        format!("By={SERVER_ID};Hash=<64>;Subject=\"\";URI={CLIENT_ID}"),
        "Envoy's XFCC"
    );
    assert_eq!(envoy, ours, "left: Envoy, right: pingsail");
    Ok(())
}

/// A client whose certificate has expired is refused by the server, on both implementations.
async fn expired_client(server: Side) -> Result<()> {
    let p = pair(Side::Envoy, server, SERVER_ID, false).await?;
    assert_eq!(p.http_ok().await.map(|r| r.status), Some(200));
    let short = p
        .pki
        .workload_secret(CLIENT_ID, Duration::from_secs(1))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    p.client_tx.send_replace(Some(Arc::new(short)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    // New TLS connections (TCP opens one per downstream connection) now present an expired
    // certificate.
    for _ in 0..3 {
        assert!(
            tcp_roundtrip(SocketAddr::from((p.client_ip, 18081)), b"late")
                .await
                .is_empty(),
            "{server:?}: an expired client certificate was accepted"
        );
    }
    Ok(())
}

#[tokio::test]
async fn expired_client_refused_by_envoy_server() -> Result<()> {
    expired_client(Side::Envoy).await
}

#[tokio::test]
async fn expired_client_refused_by_pingsail_server() -> Result<()> {
    expired_client(Side::Pingsail).await
}

/// HTTP/2 over mTLS from an Envoy client sidecar (which, without istiod's istio.alpn filter,
/// negotiates no ALPN and speaks h2 with prior knowledge) and from a pingsail client (which offers
/// `istio-h2,istio,h2`): every pairing answers.
async fn h2_interop(client: Side, server: Side) -> Result<()> {
    let p = pair_with(client, server, SERVER_ID, false, true).await?;
    let r = p.http_ok().await;
    assert_eq!(
        r.as_ref().map(|r| r.status),
        Some(200),
        "{client:?} -> {server:?} over h2: {:?}",
        r.map(|r| r.body_text())
    );
    Ok(())
}

#[tokio::test]
async fn h2_envoy_client_to_pingsail_server() -> Result<()> {
    h2_interop(Side::Envoy, Side::Pingsail).await
}

#[tokio::test]
async fn h2_pingsail_client_to_envoy_server() -> Result<()> {
    h2_interop(Side::Pingsail, Side::Envoy).await
}

#[tokio::test]
async fn h2_pingsail_to_pingsail() -> Result<()> {
    h2_interop(Side::Pingsail, Side::Pingsail).await
}

/// The whole chain as in a pod: the fake istiod CA signs the agent's CSRs (CreateCertificate over
/// TLS with a bearer token), the agent serves the result over SDS, pingsail (server) and Envoy
/// (client) do mTLS with those certificates.
#[tokio::test]
async fn fake_ca_to_agent_to_pingsail() -> Result<()> {
    use pingsail_agent::ca::{
        Backoff, CaClient, CaClientConfig, KeySpec, RotationConfig, fetch_once,
    };
    use pingsail_agent::testing::{FAKE_CA_SERVER_NAME, FakeCa};
    let ca = FakeCa::start(SERVER_ID, true)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = TempDir::new("pingsail-ca")?;
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, ca.root_pem())?;
    let token = dir.path().join("token");
    std::fs::write(&token, "t")?;
    let issue = |id: &'static str| {
        let (root, token) = (root.clone(), token.clone());
        let ca = &ca;
        async move {
            let mut cfg = CaClientConfig::new(ca.addr().to_string(), root);
            cfg.server_name = Some(FAKE_CA_SERVER_NAME.into());
            cfg.token_path = Some(token);
            ca.set_identity(id);
            let rotation = RotationConfig {
                identity: id.into(),
                key: KeySpec::EcdsaP256,
                ttl: Duration::from_secs(3600),
                grace_ratio: 0.5,
                grace_jitter: 0.0,
                backoff: Backoff::default(),
            };
            fetch_once(&CaClient::new(cfg), &rotation).await
        }
    };
    let server_secret = issue(SERVER_ID).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let client_secret = issue(CLIENT_ID).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(ca.issued() >= 2, "the CA signed both CSRs");
    let (_s1, server_sock) = sds(dir.path(), "server", server_secret).await;
    let (_s2, client_sock) = sds(dir.path(), "client", client_secret).await;
    let echo = EchoServer::start("app").await?;
    let tcp = tcp_echo().await?;
    let (server_ip, client_ip) = (random_loopback_ip(), random_loopback_ip());
    let _server = Proxy::start(
        Side::Pingsail,
        &server_bootstrap(
            &server_sock,
            server_ip,
            echo.addr(),
            tcp,
            authz_addr().await?,
        ),
    )
    .await?;
    let _client = Proxy::start(
        Side::Envoy,
        &client_bootstrap(&client_sock, client_ip, server_ip, SERVER_ID, false),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let r = client::send(
            SocketAddr::from((client_ip, 18080)),
            &Request::get("/").header("host", "server"),
        )
        .await;
        if r.as_ref().is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never served: {:?}",
            r.map(|r| r.status)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        tcp_roundtrip(SocketAddr::from((client_ip, 18081)), b"chain").await,
        b"chain"
    );
    Ok(())
}

/// TLS origination to a service outside the mesh (DestinationRule `SIMPLE` / `MUTUAL` with files):
/// certificates and the CA from files, the server's identity checked by a SAN matcher.
#[tokio::test]
async fn tls_origination_simple_and_mutual_with_files() -> Result<()> {
    let pki = TestPki::new("cluster.local", false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = TempDir::new("pingsail-origination")?;
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (schain, skey, root) = pki
        .issue_files(SERVER_ID, Duration::from_secs(3600))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (cchain, ckey, _) = pki
        .issue_files(CLIENT_ID, Duration::from_secs(3600))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (schain, skey, root) = (
        write("s.pem", &schain),
        write("s.key", &skey),
        write("root.pem", &root),
    );
    let (cchain, ckey) = (write("c.pem", &cchain), write("c.key", &ckey));
    let echo = EchoServer::start("external").await?;
    let (server_ip, client_ip) = (random_loopback_ip(), random_loopback_ip());
    // The "external" server: Envoy terminating TLS; port 18443 plain TLS, 18444 requires a client
    // certificate from the same CA.
    let server_tls = |mutual: bool| {
        let v = if mutual {
            format!(
                "\n            validation_context: {{ trusted_ca: {{ filename: {root} }} }}\n          require_client_certificate: true"
            )
        } else {
            String::new()
        };
        format!(
            r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates: [ {{ certificate_chain: {{ filename: {schain} }}, private_key: {{ filename: {skey} }} }} ]{v}"#
        )
    };
    let server = format!(
        r#"
{admin}
static_resources:
  listeners:
  - name: simple
    address: {{ socket_address: {{ address: {server_ip}, port_value: 18443 }} }}
    filter_chains:
    - filters:{h}{t1}
  - name: mutual
    address: {{ socket_address: {{ address: {server_ip}, port_value: 18444 }} }}
    filter_chains:
    - filters:{h}{t2}
  clusters:{c}
"#,
        admin = admin(server_ip),
        h = hcm("app"),
        t1 = server_tls(false),
        t2 = server_tls(true),
        c = static_cluster("app", echo.addr(), ""),
    );
    let _server = Envoy::start(&server).await?;
    let up = |mutual: bool, san: &str| {
        let cert = if mutual {
            format!(
                "\n          tls_certificates: [ {{ certificate_chain: {{ filename: {cchain} }}, private_key: {{ filename: {ckey} }} }} ]"
            )
        } else {
            String::new()
        };
        format!(
            r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: external.example.com
        common_tls_context:
          validation_context:
            trusted_ca: {{ filename: {root} }}
            match_typed_subject_alt_names: [ {{ san_type: URI, matcher: {{ exact: "{san}" }} }} ]{cert}"#
        )
    };
    let client = format!(
        r#"
{admin}
static_resources:
  listeners:
  - name: out_simple
    address: {{ socket_address: {{ address: {client_ip}, port_value: 18080 }} }}
    filter_chains: [ {{ filters: [ {hs} ] }} ]
  - name: out_mutual
    address: {{ socket_address: {{ address: {client_ip}, port_value: 18081 }} }}
    filter_chains: [ {{ filters: [ {hm} ] }} ]
  - name: out_mutual_without_cert
    address: {{ socket_address: {{ address: {client_ip}, port_value: 18082 }} }}
    filter_chains: [ {{ filters: [ {hn} ] }} ]
  - name: out_wrong_san
    address: {{ socket_address: {{ address: {client_ip}, port_value: 18083 }} }}
    filter_chains: [ {{ filters: [ {hw} ] }} ]
  clusters:{c1}{c2}{c3}{c4}
"#,
        admin = admin(client_ip),
        hs = inline_hcm("simple"),
        hm = inline_hcm("mutual"),
        hn = inline_hcm("nocert"),
        hw = inline_hcm("wrongsan"),
        c1 = static_cluster(
            "simple",
            SocketAddr::from((server_ip, 18443)),
            &up(false, SERVER_ID)
        ),
        c2 = static_cluster(
            "mutual",
            SocketAddr::from((server_ip, 18444)),
            &up(true, SERVER_ID)
        ),
        c3 = static_cluster(
            "nocert",
            SocketAddr::from((server_ip, 18444)),
            &up(false, SERVER_ID)
        ),
        c4 = static_cluster(
            "wrongsan",
            SocketAddr::from((server_ip, 18443)),
            &up(false, CLIENT_ID)
        ),
    );
    let _client = Proxy::start(Side::Pingsail, &client).await?;
    let get = |port: u16| async move {
        client::send(
            SocketAddr::from((client_ip, port)),
            &Request::get("/").header("host", "external.example.com"),
        )
        .await
        .map(|r| r.status)
        .ok()
    };
    assert_eq!(get(18080).await, Some(200), "SIMPLE");
    assert_eq!(get(18081).await, Some(200), "MUTUAL");
    assert_eq!(
        get(18082).await,
        Some(503),
        "MUTUAL server, no client certificate"
    );
    assert_eq!(
        get(18083).await,
        Some(503),
        "server SAN not the expected one"
    );
    Ok(())
}

/// A one-line HCM (flow style) routing everything to `cluster`.
fn inline_hcm(cluster: &str) -> String {
    format!(
        r#"{{ name: envoy.filters.network.http_connection_manager, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: {cluster}, route_config: {{ virtual_hosts: [ {{ name: all, domains: ["*"], routes: [ {{ match: {{ prefix: / }}, route: {{ cluster: {cluster} }} }} ] }} ] }}, http_filters: [ {{ name: envoy.filters.http.router, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }} }} ] }} }}"#
    )
}
