// SPDX-License-Identifier: Apache-2.0
//! Two real Envoys doing Istio-style mutual TLS with certificates the agent obtained from the fake
//! CA and served over SDS: client sidecar (UpstreamTlsContext, exact SPIFFE SAN match) -> server
//! sidecar (DownstreamTlsContext, client certificate required, trust domain prefix) -> echo.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pingsail_agent::ca::{Backoff, CaClient, CaClientConfig, KeySpec, RotationConfig, fetch_once};
use pingsail_agent::sds::{Server, ServerHandle, WorkloadSecret, secret_channel};
use pingsail_agent::testing::{FAKE_CA_SERVER_NAME, FakeCa};
use support::{
    Envoy, bootstrap_with, echo_roundtrip, echo_server, istio_tls_context, static_cluster,
    tcp_listener,
};

const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

async fn issue(ca: &FakeCa, dir: &Path, id: &str) -> WorkloadSecret {
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, ca.root_pem()).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "t").unwrap();
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
    fetch_once(&CaClient::new(cfg), &rotation).await.unwrap()
}

async fn sds_for(
    dir: &Path,
    name: &str,
    secret: WorkloadSecret,
) -> (ServerHandle, std::path::PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let (tx, rx) = secret_channel();
    tx.send_replace(Some(Arc::new(secret)));
    // The sender may go: the server keeps serving the last secret.
    drop(tx);
    (Server::start(&sock, rx).await.unwrap(), sock)
}

fn tls_socket(kind: &str, context: &str, extra: &str) -> String {
    format!(
        r#"{{"name": "envoy.transport_sockets.tls", "typed_config": {{
          "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}", {extra}
          "common_tls_context": {context}}}}}"#
    )
}

/// Server sidecar in front of an echo; returns it and its inbound port.
async fn server_sidecar(sock: &Path, echo_port: u16) -> (Envoy, u16) {
    let ctx = istio_tls_context(
        r#"{"prefix": "spiffe://cluster.local/"}"#,
        &["istio-peer-exchange", "istio"],
    );
    let ts = tls_socket(
        "DownstreamTlsContext",
        &ctx,
        r#""require_client_certificate": true,"#,
    );
    let envoy = Envoy::start(&bootstrap_with(
        sock,
        &[static_cluster("app", echo_port, None)],
        &[tcp_listener("inbound", "app", Some(&ts))],
    ))
    .await;
    let port = envoy.listener_port("inbound").await;
    (envoy, port)
}

/// Client sidecar: plaintext in, mTLS out to `server_port` expecting `expected_san`.
async fn client_sidecar(sock: &Path, server_port: u16, expected_san: &str) -> (Envoy, u16) {
    let ctx = istio_tls_context(
        &format!(r#"{{"exact": "{expected_san}"}}"#),
        &["istio-peer-exchange", "istio"],
    );
    let ts = tls_socket(
        "UpstreamTlsContext",
        &ctx,
        r#""sni": "outbound_.8080_._.server.default.svc.cluster.local","#,
    );
    let envoy = Envoy::start(&bootstrap_with(
        sock,
        &[static_cluster(
            "outbound|8080||server.default.svc.cluster.local",
            server_port,
            Some(&ts),
        )],
        &[tcp_listener(
            "outbound",
            "outbound|8080||server.default.svc.cluster.local",
            None,
        )],
    ))
    .await;
    let port = envoy.listener_port("outbound").await;
    (envoy, port)
}

async fn ssl_stat(envoy: &Envoy, name: &str) -> u64 {
    let stats = envoy
        .admin_get(&format!("/stats?filter={name}"))
        .await
        .unwrap_or_default();
    stats
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| k.ends_with(name))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn envoy_sidecars_do_mtls_with_agent_issued_certificates() {
    let ca = FakeCa::start(SERVER_ID, true).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server_secret = issue(&ca, dir.path(), SERVER_ID).await;
    let client_secret = issue(&ca, dir.path(), CLIENT_ID).await;
    let (_s1, server_sock) = sds_for(dir.path(), "server", server_secret).await;
    let (_s2, client_sock) = sds_for(dir.path(), "client", client_secret).await;
    let (echo_port, accepted) = echo_server().await;
    let (server, server_port) = server_sidecar(&server_sock, echo_port).await;

    // The right identity: bytes go through both sidecars over mTLS.
    let (client, client_port) = client_sidecar(&client_sock, server_port, SERVER_ID).await;
    let got = support::eventually(
        Duration::from_secs(30),
        "an echo through the mTLS pair",
        || async {
            let got = echo_roundtrip(client_port, b"ping over mtls").await;
            (got == b"ping over mtls").then_some(got)
        },
    )
    .await;
    assert_eq!(got, b"ping over mtls");
    assert!(
        ssl_stat(&server, "ssl.handshake").await >= 1,
        "the server sidecar terminated TLS"
    );
    assert!(accepted.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    drop(client);

    // The client expecting another identity refuses the server's certificate.
    let (wrong, wrong_port) = client_sidecar(
        &client_sock,
        server_port,
        "spiffe://cluster.local/ns/default/sa/other",
    )
    .await;
    // Until its secrets arrive the cluster is warming and connections close without a handshake;
    // either way nothing may pass, and the SAN check must eventually be what refuses.
    refused_until(&wrong, wrong_port, "ssl.fail_verify_san").await;
    drop(wrong);

    // A client whose certificate comes from another CA is refused by the server.
    let other_ca = FakeCa::start(CLIENT_ID, false).await.unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let foreign = issue(&other_ca, other_dir.path(), CLIENT_ID).await;
    // It still trusts the real root, so only the server side can refuse.
    let mixed = WorkloadSecret {
        root_cert_pem: ca.root_pem().to_owned().into(),
        ..foreign
    };
    let (_s3, foreign_sock) = sds_for(other_dir.path(), "foreign", mixed).await;
    let (_foreign_client, foreign_port) =
        client_sidecar(&foreign_sock, server_port, SERVER_ID).await;
    refused_until(&server, foreign_port, "ssl.fail_verify_error").await;
}

/// Connections through `port` keep failing until `envoy`'s stat `stat` counts a refusal. (The
/// echo may still see connections: tcp_proxy connects upstream before the downstream handshake
/// ends; what matters is that no byte crosses.)
async fn refused_until(envoy: &Envoy, port: u16, stat: &str) {
    support::eventually(Duration::from_secs(30), stat, || async {
        let got = echo_roundtrip(port, b"should not pass").await;
        assert!(
            got.is_empty(),
            "bytes passed a connection that must be refused: {got:?}"
        );
        (ssl_stat(envoy, stat).await >= 1).then_some(())
    })
    .await;
}
