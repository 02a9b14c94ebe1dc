// SPDX-License-Identifier: Apache-2.0
//! The real sidecar dump's HBONE listeners (`istioctl-authz/sidecar-listeners-configdump.json`):
//! `connect_originate` (internal listener: Istio's `set_dst_address`, tcp_proxy tunnelling over
//! HTTP/2 CONNECT), `connect_terminate` (15008: TLS 1.3, ALPN h2, client certificate required;
//! CONNECT termination to `main_internal` with Istio's `connect_authority`) and `main_internal`
//! (internal listener: the inbound chain for port 80 with the dump's RBAC, ext_authz and
//! telemetry filters), loaded verbatim except for 15008's address (a random loopback IP).
//!
//! * pingsail → pingsail: a client sidecar sends an app's bytes through the dump's
//!   `connect_originate` to a server sidecar's `connect_terminate` → `main_internal` →
//!   `inbound|80||` → the app; the CONNECT authority selects main_internal's port-80 chain, and
//!   the client's SPIFFE identity reaches main_internal's RBAC (`filter_state`
//!   `io.istio.peer_principal`) across the internal connection.
//! * Envoy → pingsail: Envoy 1.40 (stock `tcp_proxy.tunneling_config`) as the HBONE client of the
//!   same server.
//!
//! The clusters the listeners name are built as istiod builds them (`main_internal`,
//! `connect_originate`) or point at test servers (`inbound|80||`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use pingsail_agent::sds::ServerHandle;
use pingsail_agent::testing::TestPki;
use pingsail_tests::echo::EchoServer;
use pingsail_tests::envoy::Envoy;
use pingsail_tests::net::{TempDir, closed_port, random_loopback_ip};
use pingsail_tests::sidecar::{bootstrap, sds_cluster, sds_config, sds_server as sds};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DUMP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/istio/configdumps/istioctl-authz/sidecar-listeners-configdump.json"
);
const SLEEP_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const HTTPBIN_ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";
/// The service address the tunnel names (it exists only as the CONNECT authority).
const POD: &str = "10.244.0.9";
const T: Duration = Duration::from_secs(20);

fn listener(name: &str) -> Value {
    let text = std::fs::read_to_string(DUMP)
        .unwrap_or_else(|e| panic!("{DUMP}: {e} (the shared reference corpus must be present)"));
    let dump: Value = serde_json::from_str(&text).unwrap();
    for c in dump["configs"].as_array().unwrap() {
        for l in c["dynamic_listeners"].as_array().into_iter().flatten() {
            let mut li = l["active_state"]["listener"].clone();
            if li["name"] == name {
                li.as_object_mut().unwrap().remove("@type");
                return li;
            }
        }
    }
    panic!("listener {name} not in the dump")
}

fn static_cluster(name: &str, a: SocketAddr) -> Value {
    json!({ "name": name, "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": { "cluster_name": name, "endpoints": [ { "lb_endpoints": [ { "endpoint": { "address": { "socket_address": { "address": a.ip().to_string(), "port_value": a.port() } } } } ] } ] } })
}

/// The client side of HBONE as istiod configures it: an upstream TLS context with the workload
/// certificate, ALPN h2 and the server's SPIFFE identity.
fn hbone_tls(san: &str) -> Value {
    json!({ "name": "tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "tls_params": { "tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3" },
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [ { "name": "default", "sds_config": sds_config() } ],
            "combined_validation_context": {
                "default_validation_context": { "match_typed_subject_alt_names": [ { "san_type": "URI", "matcher": { "exact": san } } ] },
                "validation_context_sds_secret_config": { "name": "ROOTCA", "sds_config": sds_config() } } } } })
}

fn h2_connect_options() -> Value {
    json!({ "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": { "http2_protocol_options": { "allow_connect": true } } } })
}

fn internal_upstream(passthrough: Value) -> Value {
    json!({ "name": "internal_upstream", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
        "passthrough_metadata": passthrough,
        "transport_socket": { "name": "raw_buffer", "typed_config": { "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" } } } })
}

/// main_internal as in the dump, with its first RBAC filter's ALLOW policies replaced by `policies`
/// (`None`: verbatim — the dump's policy also demands a JWT issuer, so it allows nothing here).
fn main_internal(policies: Option<Value>) -> Value {
    let mut l = listener("main_internal");
    if let Some(p) = policies {
        let filters = l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
            .as_array_mut()
            .unwrap();
        assert_eq!(filters[0]["name"], "envoy.filters.http.rbac");
        filters[0]["typed_config"]["rules"]["policies"] = p;
    }
    l
}

/// Logs (see [`log`]), a temp dir and a mesh PKI.
fn setup() -> (TempDir, TestPki) {
    log();
    (
        TempDir::new("pingsail-dump-hbone").unwrap(),
        TestPki::new("cluster.local", true).unwrap(),
    )
}

/// An RBAC policy allowing only the client's (sleep's) identity.
fn allow_sleep() -> Value {
    allow_peer(json!({ "exact": SLEEP_ID }))
}

fn allow_peer(principal: Value) -> Value {
    json!({ "test": { "permissions": [ { "any": true } ],
        "principals": [ { "filter_state": { "key": "io.istio.peer_principal", "string_match": principal } } ] } })
}

struct ServerPod {
    ip: Ipv4Addr,
    _proxy: pingsail_proxy::testing::Running,
    app: EchoServer,
    _sds: ServerHandle,
}

/// The server sidecar: the dump's connect_terminate (on `<ip>:15008`) and main_internal.
async fn server(dir: &Path, pki: &TestPki, policies: Option<Value>) -> ServerPod {
    let ip = random_loopback_ip();
    let (handle, sock) = sds(dir, "server", pki, HTTPBIN_ID).await;
    let app = EchoServer::start("httpbin").await.unwrap();
    let mut terminate = listener("connect_terminate");
    terminate["address"]["socket_address"]["address"] = json!(ip.to_string());
    let clusters = vec![
        sds_cluster(&sock),
        // istiod's main_internal cluster: the internal listener of the same name.
        json!({ "name": "main_internal", "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": { "cluster_name": "main_internal", "endpoints": [ { "lb_endpoints": [ {
                "endpoint": { "address": { "envoy_internal_address": { "server_listener_name": "main_internal" } } } } ] } ] },
            "transport_socket": internal_upstream(json!([])) }),
        static_cluster("inbound|80||", app.addr()),
        static_cluster(
            "outbound|9191||sample-ext-authz-grpc",
            SocketAddr::from(([127, 0, 0, 1], closed_port().unwrap())),
        ),
    ];
    let proxy = pingsail_proxy::testing::start(&bootstrap(
        ip,
        vec![terminate, main_internal(policies)],
        clusters,
    ))
    .await
    .unwrap();
    ServerPod {
        ip,
        _proxy: proxy,
        app,
        _sds: handle,
    }
}

/// The client sidecar (pingsail): the app's plaintext port 18080 → an outbound cluster whose
/// endpoint is the dump's `connect_originate` with istiod's `tunnel` metadata → CONNECT to the
/// server's 15008 with `destination` as the authority.
async fn pingsail_client(
    dir: &Path,
    pki: &TestPki,
    server: Ipv4Addr,
    destination: &str,
) -> (Ipv4Addr, pingsail_proxy::testing::Running, ServerHandle) {
    let ip = random_loopback_ip();
    let (handle, sock) = sds(dir, "client", pki, SLEEP_ID).await;
    let app_out = json!({ "name": "app_out",
        "address": { "socket_address": { "address": ip.to_string(), "port_value": 18080 } },
        "filter_chains": [ { "filters": [ { "name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "outbound", "cluster": "outbound|8000||httpbin.default.svc.cluster.local" } } ] } ] });
    // istiod's outbound HTTP listener shape: the router picks the same HBONE endpoint.
    let app_http = json!({ "name": "app_http",
        "address": { "socket_address": { "address": ip.to_string(), "port_value": 18081 } },
        "filter_chains": [ { "filters": [ { "name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "outbound_0.0.0.0_8000",
            "route_config": { "name": "8000", "virtual_hosts": [ { "name": "httpbin", "domains": ["*"],
                "routes": [ { "match": { "prefix": "/" }, "route": { "cluster": "outbound|8000||httpbin.default.svc.cluster.local" } } ] } ] },
            "http_filters": [ { "name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } } ] } } ] } ] });
    let clusters = vec![
        sds_cluster(&sock),
        json!({ "name": "outbound|8000||httpbin.default.svc.cluster.local", "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": { "cluster_name": "outbound|8000||httpbin.default.svc.cluster.local", "endpoints": [ { "lb_endpoints": [ {
                "endpoint": { "address": { "envoy_internal_address": { "server_listener_name": "connect_originate", "endpoint_id": destination } } },
                "metadata": { "filter_metadata": { "tunnel": { "destination": destination, "address": format!("{server}:15008") } } } } ] } ] },
            "transport_socket": internal_upstream(json!([ { "kind": { "host": {} }, "name": "tunnel" } ])) }),
        json!({ "name": "connect_originate", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "2s", "cleanup_interval": "60s",
            "original_dst_lb_config": { "upstream_port_override": 15008 },
            "typed_extension_protocol_options": h2_connect_options(),
            "transport_socket": hbone_tls(HTTPBIN_ID) }),
    ];
    let proxy = pingsail_proxy::testing::start(&bootstrap(
        ip,
        vec![app_out, app_http, listener("connect_originate")],
        clusters,
    ))
    .await
    .unwrap();
    (ip, proxy, handle)
}

/// The client sidecar as stock Envoy: tcp_proxy with `tunneling_config` straight to the server's
/// 15008.
async fn envoy_client(
    dir: &Path,
    pki: &TestPki,
    server: Ipv4Addr,
    destination: &str,
) -> (Ipv4Addr, Envoy, ServerHandle) {
    let ip = random_loopback_ip();
    let (handle, sock) = sds(dir, "envoy-client", pki, SLEEP_ID).await;
    let app_out = json!({ "name": "app_out",
        "address": { "socket_address": { "address": ip.to_string(), "port_value": 18080 } },
        "filter_chains": [ { "filters": [ { "name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "outbound", "cluster": "hbone",
            "tunneling_config": { "hostname": destination } } } ] } ] });
    let mut hbone = static_cluster("hbone", SocketAddr::from((server, 15008)));
    hbone["typed_extension_protocol_options"] = h2_connect_options();
    hbone["transport_socket"] = hbone_tls(HTTPBIN_ID);
    let envoy = Envoy::start(&bootstrap(
        ip,
        vec![app_out],
        vec![sds_cluster(&sock), hbone],
    ))
    .await
    .unwrap();
    (ip, envoy, handle)
}

/// `PINGSAIL_TEST_LOG=pingsail_proxy=debug` shows the in-process proxies' logs.
fn log() {
    if let Ok(filter) = std::env::var("PINGSAIL_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init();
    }
}

/// One HTTP/1.1 request over a fresh connection to the client sidecar's app port; `None` when the
/// connection closes without a response.
async fn get(client: Ipv4Addr, path: &str) -> Option<(u16, String, String)> {
    let mut s = tokio::net::TcpStream::connect((client, 18080)).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: httpbin\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let server = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("server: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    Some((status, server, body.to_owned()))
}

/// Retries until the secrets have arrived and the tunnel answers (a fixed request), or `T`.
async fn first_answer(client: Ipv4Addr, path: &str) -> Option<(u16, String, String)> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let r = get(client, path).await;
        if r.is_some() || tokio::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_hbone_listeners_carry_traffic_to_the_inbound_cluster_with_the_peer_identity() {
    let (dir, pki) = setup();
    let destination = format!("{POD}:80");

    // main_internal's RBAC allows only the client's identity, which arrives from 15008's mTLS
    // handshake across the internal connection.
    let srv = server(dir.path(), &pki, Some(allow_sleep())).await;
    let (client, _c, _cs) = pingsail_client(dir.path(), &pki, srv.ip, &destination).await;
    let (status, server_header, _) = first_answer(client, "/through-hbone")
        .await
        .expect("an answer through the tunnel");
    assert_eq!(
        status, 200,
        "the app answered through connect_originate → 15008 → main_internal"
    );
    // main_internal's connection manager (server_name istio-envoy) forwarded it, not 15008's
    // (waypoint-envoy).
    assert_eq!(server_header, "istio-envoy");
    let seen = srv.app.received().await;
    assert!(
        seen.iter().any(|r| r.path == "/through-hbone"),
        "the app behind inbound|80|| got the request: {seen:?}"
    );

    // The same request with a policy for another identity is refused by main_internal's RBAC.
    let other = server(
        dir.path(),
        &pki,
        Some(allow_peer(
            json!({ "safe_regex": { "regex": ".*/ns/test/.*" } }),
        )),
    )
    .await;
    let (client2, _c2, _cs2) = pingsail_client(dir.path(), &pki, other.ip, &destination).await;
    let (status, server_header, body) = first_answer(client2, "/denied").await.expect("an answer");
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(server_header, "istio-envoy");
    assert_eq!(other.app.requests(), 0, "nothing reached the app");

    // The dump's own policy (it also demands a JWT issuer) allows nothing either.
    let verbatim = server(dir.path(), &pki, None).await;
    let (client3, _c3, _cs3) = pingsail_client(dir.path(), &pki, verbatim.ip, &destination).await;
    let (status, _, body) = first_answer(client3, "/verbatim").await.expect("an answer");
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(verbatim.app.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_hbone_carries_http_routed_to_an_internal_endpoint() {
    let (dir, pki) = setup();
    let srv = server(dir.path(), &pki, Some(allow_sleep())).await;
    let (client, _c, _cs) = pingsail_client(dir.path(), &pki, srv.ip, &format!("{POD}:80")).await;
    assert_eq!(first_answer(client, "/ready").await.map(|r| r.0), Some(200));
    // The client's HTTP router sends to the outbound cluster's internal endpoint
    // (connect_originate); requests on one downstream connection share the pooled tunnel.
    let mut conn = pingsail_tests::client::Connection::connect(SocketAddr::from((client, 18081)))
        .await
        .unwrap();
    for path in ["/routed-1", "/routed-2", "/routed-3"] {
        let r = conn
            .send(&pingsail_tests::client::Request::get(path).header("host", "httpbin"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}");
    }
    let seen = srv.app.received().await;
    for path in ["/routed-1", "/routed-2", "/routed-3"] {
        assert!(
            seen.iter().any(|r| r.path == path),
            "{path} reached the app: {seen:?}"
        );
    }
    // One CONNECT for the readiness probe (tcp_proxy), one for the three routed requests: the
    // router pooled its HBONE tunnel.
    let stats = pingsail_tests::client::send(
        SocketAddr::from((srv.ip, 15000)),
        &pingsail_tests::client::Request::get("/stats").header("host", "admin"),
    )
    .await
    .unwrap()
    .body_text();
    let connects = stats
        .lines()
        .find_map(|l| l.strip_prefix("http.connect_terminate.downstream_rq_total: "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(connects, Some(2), "CONNECTs received by 15008:\n{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_hbone_authority_selects_the_internal_chain() {
    let (dir, pki) = setup();
    let srv = server(
        dir.path(),
        &pki,
        Some(allow_peer(json!({ "prefix": "spiffe://" }))),
    )
    .await;
    // main_internal has a chain for port 80 only: a tunnel to port 81 finds none and is closed.
    let (client, _c, _cs) = pingsail_client(dir.path(), &pki, srv.ip, &format!("{POD}:81")).await;
    // Wait for the secrets with a tunnel that does work, then try port 81.
    let (ok_client, _c2, _cs2) =
        pingsail_client(dir.path(), &pki, srv.ip, &format!("{POD}:80")).await;
    assert_eq!(
        first_answer(ok_client, "/ready").await.map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        get(client, "/port-81").await,
        None,
        "no chain for :81 → connection closed"
    );
    let seen = srv.app.received().await;
    assert!(
        seen.iter().all(|r| r.path != "/port-81"),
        "nothing for :81 reached the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_hbone_client_reaches_the_dump_listeners_on_pingsail() {
    let (dir, pki) = setup();
    let srv = server(dir.path(), &pki, Some(allow_sleep())).await;
    let (client, _envoy, _cs) = envoy_client(dir.path(), &pki, srv.ip, &format!("{POD}:80")).await;
    let (status, server_header, _) = first_answer(client, "/from-envoy")
        .await
        .expect("an answer");
    assert_eq!(status, 200);
    assert_eq!(server_header, "istio-envoy");
    assert!(
        srv.app
            .received()
            .await
            .iter()
            .any(|r| r.path == "/from-envoy")
    );
}
