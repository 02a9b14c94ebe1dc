// SPDX-License-Identifier: Apache-2.0
//! The SDS server's protocol over its real Unix socket, driven by a gRPC client built from
//! envoy-types: SotW subscribe/ACK/NACK/push, unknown names, file resources, and delta.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Node, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use pingsail_agent::sds::{
    SECRET_TYPE_URL, SecretSender, Server, Stats, WorkloadSecret, secret_channel,
};
use pingsail_agent::testing::TestPki;
use prost::Message;
use support::{connect_sds as connect, eventually, within};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";

fn workload(pki: &TestPki) -> WorkloadSecret {
    pki.workload_secret(ID, Duration::from_secs(3600)).unwrap()
}

fn req(names: &[&str], nonce: &str, nack: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: nonce.is_empty().then(|| Node {
            id: "sidecar~127.0.0.1~t.default~default.svc.cluster.local".into(),
            ..Default::default()
        }),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: nonce.into(),
        error_detail: nack.map(|m| envoy_types::pb::google::rpc::Status {
            code: 3,
            message: m.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn decode(resp: &DiscoveryResponse) -> Vec<Secret> {
    assert_eq!(resp.type_url, SECRET_TYPE_URL);
    resp.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE_URL);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> Vec<u8> {
    match ds.as_ref().and_then(|d| d.specifier.clone()) {
        Some(Specifier::InlineBytes(b)) => b,
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

fn publish(tx: &SecretSender, s: &WorkloadSecret) {
    tx.send_replace(Some(Arc::new(s.clone())));
}

async fn counter_reaches(stats: &Stats, which: fn(&Stats) -> u64, n: u64, what: &str) {
    eventually(Duration::from_secs(10), what, || {
        let v = which(stats);
        async move { (v >= n).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn sotw_subscribe_ack_push_nack_and_unknown_names() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir
        .path()
        .join("var/run/secrets/workload-spiffe-uds/socket");
    let (tx, rx) = secret_channel();
    let server = Server::start(&sock, rx).await.unwrap();
    let mut client = connect(&sock).await;
    let (req_tx, req_rx) = mpsc::channel(8);
    req_tx
        .send(req(&["default", "ROOTCA"], "", None))
        .await
        .unwrap();
    let mut responses = client
        .stream_secrets(ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();

    // Nothing can be sent before the first certificate: the first response carries both.
    let pki = TestPki::new("cluster.local", false).unwrap();
    let first = workload(&pki);
    counter_reaches(
        server.stats(),
        |s| Stats::get(&s.streams_opened),
        1,
        "the stream",
    )
    .await;
    publish(&tx, &first);
    let r1 = within(
        Duration::from_secs(10),
        "first response",
        responses.message(),
    )
    .await
    .unwrap()
    .unwrap();
    let secrets = decode(&r1);
    assert_eq!(
        secrets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["ROOTCA", "default"]
    );
    for s in &secrets {
        match (&s.name[..], &s.r#type) {
            ("default", Some(secret::Type::TlsCertificate(t))) => {
                assert_eq!(inline(&t.certificate_chain), first.cert_chain_pem.to_vec());
                assert_eq!(inline(&t.private_key), first.private_key_pem.to_vec());
            }
            ("ROOTCA", Some(secret::Type::ValidationContext(v))) => {
                assert_eq!(inline(&v.trusted_ca), pki.root_pem().as_bytes());
            }
            other => panic!("unexpected resource {other:?}"),
        }
    }
    assert!(!r1.version_info.is_empty() && !r1.nonce.is_empty());

    // ACK.
    req_tx
        .send(req(&["default", "ROOTCA"], &r1.nonce, None))
        .await
        .unwrap();
    counter_reaches(server.stats(), |s| Stats::get(&s.acks), 1, "the ACK").await;

    // Rotation with the same root: only `default` is pushed.
    let second = workload(&pki);
    publish(&tx, &second);
    let r2 = within(
        Duration::from_secs(10),
        "rotation push",
        responses.message(),
    )
    .await
    .unwrap()
    .unwrap();
    let secrets = decode(&r2);
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0].name, "default");
    assert_ne!(r2.version_info, r1.version_info);

    // NACK: counted, nothing re-sent; a new subscription in the next request is answered with
    // just that name, as the workload certificate (pilot-agent serves unknown names so).
    req_tx
        .send(req(&["default", "ROOTCA"], &r2.nonce, Some("bad key")))
        .await
        .unwrap();
    counter_reaches(server.stats(), |s| Stats::get(&s.nacks), 1, "the NACK").await;
    assert_eq!(server.stats().last_nack.lock().as_deref(), Some("bad key"));
    req_tx
        .send(req(&["default", "ROOTCA", "other"], &r2.nonce, None))
        .await
        .unwrap();
    let r3 = within(
        Duration::from_secs(10),
        "response for the new name",
        responses.message(),
    )
    .await
    .unwrap()
    .unwrap();
    let secrets = decode(&r3);
    assert_eq!(secrets.len(), 1, "the NACKed `default` must not be re-sent");
    assert_eq!(secrets[0].name, "other");
    let Some(secret::Type::TlsCertificate(t)) = &secrets[0].r#type else {
        panic!("tls_certificate expected")
    };
    assert_eq!(inline(&t.certificate_chain), second.cert_chain_pem.to_vec());
    assert_eq!(Stats::get(&server.stats().responses_sent), 3);

    // A second client (Envoy opens one stream per SDS config source) gets the current state.
    let mut client2 = connect(&sock).await;
    let (req2_tx, req2_rx) = mpsc::channel(8);
    req2_tx.send(req(&["ROOTCA"], "", None)).await.unwrap();
    let mut responses2 = client2
        .stream_secrets(ReceiverStream::new(req2_rx))
        .await
        .unwrap()
        .into_inner();
    let r = within(
        Duration::from_secs(10),
        "second stream",
        responses2.message(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(decode(&r)[0].name, "ROOTCA");

    server.shutdown().await;
    assert!(!sock.exists(), "socket removed on shutdown");
    // Streams end with the server.
    let end = within(Duration::from_secs(10), "stream end", responses.message()).await;
    assert!(matches!(end, Ok(None) | Err(_)));
}

#[tokio::test]
async fn file_resources_are_served_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sds.sock");
    let (_tx, rx) = secret_channel();
    let _server = Server::start(&sock, rx).await.unwrap();
    let pki = TestPki::new("cluster.local", false).unwrap();
    let (chain, key, root) = pki.issue_files(ID, Duration::from_secs(3600)).unwrap();
    let files = dir.path().join("certs");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("cert.pem"), &chain).unwrap();
    std::fs::write(files.join("key.pem"), &key).unwrap();
    std::fs::write(files.join("ca.pem"), &root).unwrap();
    let cert_name = format!(
        "file-cert:{}~{}",
        files.join("cert.pem").display(),
        files.join("key.pem").display()
    );
    let root_name = format!("file-root:{}", files.join("ca.pem").display());

    let mut client = connect(&sock).await;
    let (req_tx, req_rx) = mpsc::channel(8);
    req_tx
        .send(req(&[&cert_name, &root_name], "", None))
        .await
        .unwrap();
    let mut responses = client
        .stream_secrets(ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    // The workload secret is not needed for file resources.
    let r1 = within(Duration::from_secs(10), "file secrets", responses.message())
        .await
        .unwrap()
        .unwrap();
    let secrets = decode(&r1);
    assert_eq!(secrets.len(), 2);
    for s in &secrets {
        match &s.r#type {
            Some(secret::Type::TlsCertificate(t)) => {
                assert_eq!(s.name, cert_name);
                assert_eq!(inline(&t.certificate_chain), chain.as_bytes());
            }
            Some(secret::Type::ValidationContext(v)) => {
                assert_eq!(s.name, root_name);
                assert_eq!(inline(&v.trusted_ca), root.as_bytes());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    req_tx
        .send(req(&[&cert_name, &root_name], &r1.nonce, None))
        .await
        .unwrap();
    // The root file changes: pushed.
    let other = TestPki::new("cluster.local", false).unwrap();
    std::fs::write(files.join("ca.pem"), other.root_pem()).unwrap();
    let r2 = within(
        Duration::from_secs(10),
        "root file reload",
        responses.message(),
    )
    .await
    .unwrap()
    .unwrap();
    let secrets = decode(&r2);
    assert_eq!(secrets.len(), 1);
    let Some(secret::Type::ValidationContext(v)) = &secrets[0].r#type else {
        panic!()
    };
    assert_eq!(inline(&v.trusted_ca), other.root_pem().as_bytes());
}

#[tokio::test]
async fn delta_subscribe_unsubscribe_and_push() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sds.sock");
    let (tx, rx) = secret_channel();
    let pki = TestPki::new("cluster.local", true).unwrap();
    let first = workload(&pki);
    publish(&tx, &first);
    let server = Server::start(&sock, rx).await.unwrap();
    let mut client = connect(&sock).await;
    let (req_tx, req_rx) = mpsc::channel(8);
    req_tx
        .send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut responses = client
        .delta_secrets(ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    let r1 = within(
        Duration::from_secs(10),
        "delta response",
        responses.message(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r1.type_url, SECRET_TYPE_URL);
    let names: Vec<_> = r1.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["ROOTCA", "default"]);
    assert!(r1.resources.iter().all(|r| !r.version.is_empty()));
    let default_v1 = r1.resources[1].version.clone();

    // ACK and drop ROOTCA.
    req_tx
        .send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: r1.nonce.clone(),
            resource_names_unsubscribe: vec!["ROOTCA".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    counter_reaches(server.stats(), |s| Stats::get(&s.acks), 1, "delta ACK").await;
    // A new root and certificate: only `default` is pushed now.
    let pki2 = TestPki::new("cluster.local", false).unwrap();
    publish(&tx, &workload(&pki2));
    let r2 = within(Duration::from_secs(10), "delta push", responses.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r2.resources.len(), 1);
    assert_eq!(r2.resources[0].name, "default");
    assert_ne!(r2.resources[0].version, default_v1);
}
