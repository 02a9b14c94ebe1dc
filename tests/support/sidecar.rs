// SPDX-License-Identifier: Apache-2.0
//! Istio-shaped sidecar bootstraps as JSON for tests that run Envoy and pingsail on the same
//! configuration: the agent's SDS server with test-PKI certificates (`default` + `ROOTCA` on a Unix
//! socket), the `sds-grpc` cluster, SDS config sources and a bootstrap with internal listeners
//! enabled.

use pingsail_agent::sds::{Server, ServerHandle, secret_channel};
use pingsail_agent::testing::TestPki;
use serde_json::{Value, json};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// An SDS server on `<dir>/<name>.sock` serving a fresh workload certificate for `id`.
pub async fn sds_server(
    dir: &Path,
    name: &str,
    pki: &TestPki,
    id: &str,
) -> (ServerHandle, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let (tx, rx) = secret_channel();
    let secret = pki
        .workload_secret(id, Duration::from_secs(3600))
        .unwrap_or_else(|e| panic!("issuing {id}: {e}"));
    tx.send_replace(Some(Arc::new(secret)));
    drop(tx);
    let server = Server::start(&sock, rx)
        .await
        .unwrap_or_else(|e| panic!("SDS server on {}: {e}", sock.display()));
    (server, sock)
}

/// The SDS config source Istio puts in every TLS context (cluster `sds-grpc`).
pub fn sds_config() -> Value {
    json!({ "api_config_source": { "api_type": "GRPC", "grpc_services": [ { "envoy_grpc": { "cluster_name": "sds-grpc" } } ],
            "set_node_on_first_message_only": true, "transport_api_version": "V3" },
            "initial_fetch_timeout": "0s", "resource_api_version": "V3" })
}

/// The `sds-grpc` cluster: HTTP/2 to the agent's Unix socket.
pub fn sds_cluster(sock: &Path) -> Value {
    json!({ "name": "sds-grpc", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": { "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": { "http2_protocol_options": {} } } },
        "load_assignment": { "cluster_name": "sds-grpc", "endpoints": [ { "lb_endpoints": [ { "endpoint": { "address": { "pipe": { "path": sock.display().to_string() } } } } ] } ] } })
}

/// A bootstrap with its admin on `<ip>:15000`, internal listeners enabled and these resources.
pub fn bootstrap(ip: Ipv4Addr, listeners: Vec<Value>, clusters: Vec<Value>) -> String {
    json!({
        "admin": { "address": { "socket_address": { "address": ip.to_string(), "port_value": 15000 } } },
        "node": { "id": format!("sidecar~{ip}~pod.default~default.svc.cluster.local"), "cluster": "test" },
        "bootstrap_extensions": [ { "name": "envoy.bootstrap.internal_listener", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener" } } ],
        "static_resources": { "listeners": listeners, "clusters": clusters }
    })
    .to_string()
}
