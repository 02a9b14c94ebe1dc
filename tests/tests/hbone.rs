// SPDX-License-Identifier: Apache-2.0
//! HBONE (HTTP/2 CONNECT over mutual TLS) between two sidecars built only from stock Envoy
//! extensions, run in every pairing of Envoy 1.40 and pingsail with the same bootstraps:
//!
//! ```text
//! app client → C :18080 tcp_proxy → cluster internal_outbound (envoy_internal_address
//!   internal_outbound; endpoint metadata envoy.filters.listener.original_dst.local = <S>:<port>;
//!   internal_upstream passes it) → internal listener internal_outbound (original_dst listener
//!   filter) → tcp_proxy tunneling_config (CONNECT %DOWNSTREAM_LOCAL_ADDRESS%, baggage header) →
//!   cluster original_dst (ORIGINAL_DST, upstream_port_override 15008, HTTP/2, TLS ALPN h2)
//! → S :15008 (TLS 1.3, client certificate required) HCM: set_filter_state
//!   original_dst.local_ip = %REQ(:AUTHORITY)%, route connect_matcher → CONNECT terminated to
//!   cluster internal_inbound (envoy_internal_address main_internal) → internal listener
//!   main_internal (original_dst listener filter; chain for destination_port 8080 only) →
//!   tcp_proxy → the app
//! ```
//!
//! The shapes are istio/proxy's test data (`testdata/listener/internal_outbound.yaml.tmpl`,
//! `terminate_connect.yaml.tmpl`, `testdata/cluster/internal_*.yaml.tmpl`, `original_dst.yaml.tmpl`)
//! and the waypoint dump's `connect_terminate`. Observed: the bytes and half-closes through the
//! tunnel, a refused server identity, and an authority with no chain behind 15008.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use pingsail_agent::testing::TestPki;
use pingsail_tests::envoy::Envoy;
use pingsail_tests::net::{TempDir, random_loopback_ip};
use pingsail_tests::sidecar::{bootstrap, sds_cluster, sds_config, sds_server as sds};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
/// The port main_internal has a chain for (the tunnel's authority port).
const APP_PORT: u16 = 8080;
const T: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Envoy,
    Pingsail,
}

enum Proxy {
    Envoy(#[allow(dead_code)] Envoy),
    Pingsail(#[allow(dead_code)] pingsail_proxy::testing::Running),
}

async fn start(side: Side, bootstrap: &str) -> Proxy {
    match side {
        Side::Envoy => Proxy::Envoy(Envoy::start(bootstrap).await.unwrap()),
        Side::Pingsail => Proxy::Pingsail(pingsail_proxy::testing::start(bootstrap).await.unwrap()),
    }
}

fn common_tls(san: &str) -> Value {
    json!({
        "tls_params": { "tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3" },
        "alpn_protocols": ["h2"],
        "tls_certificate_sds_secret_configs": [ { "name": "default", "sds_config": sds_config() } ],
        "combined_validation_context": {
            "default_validation_context": { "match_typed_subject_alt_names": [ { "san_type": "URI", "matcher": { "exact": san } } ] },
            "validation_context_sds_secret_config": { "name": "ROOTCA", "sds_config": sds_config() } } })
}

fn raw_buffer() -> Value {
    json!({ "name": "raw_buffer", "typed_config": { "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" } })
}

fn original_dst_filter() -> Value {
    json!([ { "name": "envoy.filters.listener.original_dst", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst" } } ])
}

fn tcp_proxy(stat_prefix: &str, cluster: &str, extra: Value) -> Value {
    let mut t = json!({ "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": stat_prefix, "cluster": cluster });
    if let (Some(t), Some(e)) = (t.as_object_mut(), extra.as_object()) {
        t.extend(e.clone());
    }
    json!({ "name": "envoy.filters.network.tcp_proxy", "typed_config": t })
}

fn internal_cluster(name: &str, listener: &str, metadata: Value, passthrough: Value) -> Value {
    let mut endpoint = json!({ "endpoint": { "address": { "envoy_internal_address": { "server_listener_name": listener } } } });
    if !metadata.is_null() {
        endpoint["metadata"] = json!({ "filter_metadata": metadata });
    }
    json!({ "name": name, "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": { "cluster_name": name, "endpoints": [ { "lb_endpoints": [ endpoint ] } ] },
        "transport_socket": { "name": "envoy.transport_sockets.internal_upstream", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            "passthrough_metadata": passthrough, "transport_socket": raw_buffer() } } })
}

/// The client sidecar: the app's connections to :18080 are tunnelled to `dst` (the server's
/// address and app port) through the server's 15008, expecting `server_san`.
fn client_bootstrap(ip: Ipv4Addr, sock: &Path, dst: SocketAddr, server_san: &str) -> String {
    let app_out = json!({ "name": "app_out",
        "address": { "socket_address": { "address": ip.to_string(), "port_value": 18080 } },
        "filter_chains": [ { "filters": [ tcp_proxy("outbound", "internal_outbound", json!({})) ] } ] });
    let internal_outbound = json!({ "name": "internal_outbound", "internal_listener": {},
        "listener_filters": original_dst_filter(),
        "filter_chains": [ { "filters": [ tcp_proxy("tunnel", "original_dst", json!({
            "tunneling_config": { "hostname": "%DOWNSTREAM_LOCAL_ADDRESS%",
                "headers_to_add": [ { "header": { "key": "baggage", "value": "k8s.namespace.name=default,service.name=client" } } ] } })) ] } ] });
    let clusters = vec![
        sds_cluster(sock),
        internal_cluster(
            "internal_outbound",
            "internal_outbound",
            json!({ "envoy.filters.listener.original_dst": { "local": dst.to_string() } }),
            json!([ { "name": "envoy.filters.listener.original_dst", "kind": { "host": {} } } ]),
        ),
        json!({ "name": "original_dst", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "2s", "cleanup_interval": "1s",
            "original_dst_lb_config": { "upstream_port_override": 15008 },
            "typed_extension_protocol_options": { "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": { "allow_connect": true } } } },
            "transport_socket": { "name": "tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": common_tls(server_san) } } }),
    ];
    bootstrap(ip, vec![app_out, internal_outbound], clusters)
}

/// The server sidecar: 15008 terminates CONNECT into main_internal, which has a chain for
/// `APP_PORT` only, to `app`.
fn server_bootstrap(ip: Ipv4Addr, sock: &Path, app: SocketAddr) -> String {
    let terminate = json!({ "name": "terminate_connect",
        "address": { "socket_address": { "address": ip.to_string(), "port_value": 15008 } },
        "filter_chains": [ {
            "filters": [ { "name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "terminate_connect",
                "route_config": { "name": "local_route", "virtual_hosts": [ { "name": "local_service", "domains": ["*"],
                    "routes": [ { "match": { "connect_matcher": {} },
                        "route": { "cluster": "internal_inbound", "upgrade_configs": [ { "upgrade_type": "CONNECT", "connect_config": {} } ] } } ] } ] },
                "http_filters": [
                    { "name": "connect_authority", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
                        "on_request_headers": [
                            { "object_key": "envoy.filters.listener.original_dst.local_ip",
                              "format_string": { "text_format_source": { "inline_string": "%REQ(:AUTHORITY)%" } },
                              "shared_with_upstream": "ONCE" },
                            { "object_key": "io.istio.peer_principal", "factory_key": "envoy.string",
                              "format_string": { "text_format_source": { "inline_string": "%DOWNSTREAM_PEER_URI_SAN%" } },
                              "shared_with_upstream": "ONCE" } ] } },
                    { "name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } } ],
                "http2_protocol_options": { "allow_connect": true },
                "upgrade_configs": [ { "upgrade_type": "CONNECT" } ] } } ],
            "transport_socket": { "name": "tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": common_tls(CLIENT_ID) } } } ] });
    let main_internal = json!({ "name": "main_internal", "internal_listener": {},
        "listener_filters": original_dst_filter(),
        "filter_chains": [ { "filter_chain_match": { "destination_port": APP_PORT },
            "filters": [ tcp_proxy("inbound", "app", json!({})) ] } ] });
    let clusters = vec![
        sds_cluster(sock),
        internal_cluster("internal_inbound", "main_internal", Value::Null, json!([])),
        json!({ "name": "app", "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": { "cluster_name": "app", "endpoints": [ { "lb_endpoints": [ { "endpoint": { "address": {
                "socket_address": { "address": app.ip().to_string(), "port_value": app.port() } } } } ] } ] } }),
    ];
    bootstrap(ip, vec![terminate, main_internal], clusters)
}

/// An app that answers every connection with `app:` followed by the bytes it received, once the
/// client has half-closed, and then closes. Counts connections.
async fn app() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let mut reply = b"app:".to_vec();
                    reply.extend_from_slice(&got);
                    let _ = s.write_all(&reply).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, count)
}

/// A counter from the server sidecar's admin `/stats`.
async fn server_stat(ip: Ipv4Addr, name: &str) -> Option<u64> {
    let r = pingsail_tests::client::send(
        SocketAddr::from((ip, 15000)),
        &pingsail_tests::client::Request::get("/stats").header("host", "admin"),
    )
    .await
    .ok()?;
    r.body_text()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Sends `msg`, half-closes, reads until the proxy closes: what came back (empty if nothing).
async fn exchange(client: Ipv4Addr, msg: &[u8]) -> Vec<u8> {
    let Ok(mut s) = tokio::net::TcpStream::connect((client, 18080)).await else {
        return Vec::new();
    };
    if s.write_all(msg).await.is_err() || s.shutdown().await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut buf)).await;
    buf
}

/// What one pairing observed.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    /// bytes and half-close through the tunnel
    echoed: String,
    /// 64 KiB each way (flow control across DATA frames and the internal pipes)
    large_ok: bool,
    /// connections the server's 15008 accepted for the tunnels so far
    tls_connections: Option<u64>,
    /// the client expects another server identity
    wrong_san: String,
    /// the tunnel's authority names a port main_internal has no chain for
    no_chain: String,
    /// connections the app accepted
    app_connections: usize,
}

async fn pairing(client_side: Side, server_side: Side) -> Seen {
    let dir = TempDir::new("pingsail-hbone").unwrap();
    let pki = TestPki::new("cluster.local", true).unwrap();
    let (app_addr, app_count) = app().await;
    let (s_ip, c_ip, c2_ip, c3_ip) = (
        random_loopback_ip(),
        random_loopback_ip(),
        random_loopback_ip(),
        random_loopback_ip(),
    );
    let (_s_sds, s_sock) = sds(dir.path(), "server", &pki, SERVER_ID).await;
    let (_c_sds, c_sock) = sds(dir.path(), "client", &pki, CLIENT_ID).await;
    let _server = start(server_side, &server_bootstrap(s_ip, &s_sock, app_addr)).await;
    let dst = SocketAddr::from((s_ip, APP_PORT));
    let _client = start(
        client_side,
        &client_bootstrap(c_ip, &c_sock, dst, SERVER_ID),
    )
    .await;
    let _wrong = start(
        client_side,
        &client_bootstrap(
            c2_ip,
            &c_sock,
            dst,
            "spiffe://cluster.local/ns/default/sa/other",
        ),
    )
    .await;
    let _no_chain = start(
        client_side,
        &client_bootstrap(
            c3_ip,
            &c_sock,
            SocketAddr::from((s_ip, APP_PORT + 1)),
            SERVER_ID,
        ),
    )
    .await;

    // The first exchange also waits for both sides' secrets.
    let deadline = tokio::time::Instant::now() + T;
    let echoed = loop {
        let r = exchange(c_ip, b"hello through hbone").await;
        if !r.is_empty() || tokio::time::Instant::now() > deadline {
            break String::from_utf8_lossy(&r).into_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let large: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let back = exchange(c_ip, &large).await;
    let large_ok = back.len() == large.len() + 4 && back[4..] == large[..];
    // Both tunnels (and the first attempts while secrets arrived) rode one pooled HTTP/2
    // connection: the server's 15008 listener accepted one connection.
    let tls_connections =
        server_stat(s_ip, &format!("listener.{s_ip}_15008.downstream_cx_total")).await;
    let before = app_count.load(std::sync::atomic::Ordering::SeqCst);
    let wrong_san =
        String::from_utf8_lossy(&exchange(c2_ip, b"to the wrong server").await).into_owned();
    let no_chain = String::from_utf8_lossy(&exchange(c3_ip, b"to port 8081").await).into_owned();
    let after = app_count.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        before, after,
        "{client_side:?}→{server_side:?}: refused tunnels reached the app"
    );
    Seen {
        echoed,
        large_ok,
        tls_connections,
        wrong_san,
        no_chain,
        app_connections: after,
    }
}

async fn check(client_side: Side, server_side: Side) {
    let seen = pairing(client_side, server_side).await;
    assert_eq!(
        seen,
        Seen {
            echoed: "app:hello through hbone".into(),
            large_ok: true,
            tls_connections: Some(1),
            wrong_san: String::new(),
            no_chain: String::new(),
            app_connections: 2,
        },
        "{client_side:?} client → {server_side:?} server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_envoy_to_envoy() {
    check(Side::Envoy, Side::Envoy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_pingsail_to_envoy() {
    check(Side::Pingsail, Side::Envoy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_envoy_to_pingsail() {
    check(Side::Envoy, Side::Pingsail).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_pingsail_to_pingsail() {
    check(Side::Pingsail, Side::Pingsail).await;
}
