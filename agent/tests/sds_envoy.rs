// SPDX-License-Identifier: Apache-2.0
//! The real Envoy as the SDS client of the agent: fake istiod CA -> CA client -> SDS server on a
//! Unix socket -> Envoy with an Istio-shaped `sds-grpc` cluster and TLS contexts taking `default`
//! and `ROOTCA` over SDS. Asserted through Envoy's admin `/certs` and `/config_dump`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use pingsail_agent::ca::files::{FileCertPaths, FileWatcher};
use pingsail_agent::ca::pem::certs_from_pem;
use pingsail_agent::ca::{Backoff, CaClient, CaClientConfig, CertManager, KeySpec, RotationConfig};
use pingsail_agent::sds::{Server, Stats, secret_channel};
use pingsail_agent::testing::{FAKE_CA_SERVER_NAME, FakeCa, TestPki};
use support::{Envoy, eventually, sds_bootstrap, sds_certs};

const ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";

/// Hex serial of the first certificate of a PEM chain, as Envoy prints it (no leading zeros).
fn serial_of(pem: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    let der = certs_from_pem(pem, "chain").unwrap().remove(0);
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
    let hex: String = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex.trim_start_matches('0').to_owned()
}

fn norm(serial: &str) -> String {
    serial
        .to_ascii_lowercase()
        .trim_start_matches('0')
        .to_owned()
}

/// The leaf serials Envoy holds with URI SAN `ID`, and its CA serials.
async fn envoy_state(envoy: &Envoy) -> Option<(Vec<String>, Vec<String>)> {
    let certs = envoy.certs().await.ok()?;
    let (leaves, cas) = sds_certs(&certs);
    let mut ours: Vec<String> = leaves
        .into_iter()
        .filter(|(_, uris)| uris.iter().any(|u| u == ID))
        .map(|(s, _)| norm(&s))
        .collect();
    // The listener and the cluster each hold the same secret.
    ours.sort();
    ours.dedup();
    (!ours.is_empty()).then(|| (ours, cas.iter().map(|s| norm(s)).collect()))
}

fn ca_client(ca: &FakeCa, dir: &Path) -> CaClient {
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, ca.root_pem()).unwrap();
    let token = dir.join("istio-token");
    std::fs::write(&token, "token").unwrap();
    let mut cfg = CaClientConfig::new(ca.addr().to_string(), root);
    cfg.server_name = Some(FAKE_CA_SERVER_NAME.into());
    cfg.token_path = Some(token);
    CaClient::new(cfg)
}

async fn ca_to_envoy(api_type: &str, ttl: Duration) {
    let ca = FakeCa::start(ID, true).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir
        .path()
        .join("var/run/secrets/workload-spiffe-uds/socket");
    let (tx, rx) = secret_channel();
    let server = Server::start(&sock, rx.clone()).await.unwrap();
    let rotation = RotationConfig {
        identity: ID.into(),
        key: KeySpec::EcdsaP256,
        ttl,
        grace_ratio: 0.5,
        grace_jitter: 0.0,
        backoff: Backoff::default(),
    };
    let _mgr = CertManager::spawn(ca_client(&ca, dir.path()), rotation, tx);
    let envoy = Envoy::start(&sds_bootstrap(&sock, api_type)).await;

    let (serials, cas) = eventually(
        Duration::from_secs(30),
        "Envoy holding our certificate",
        || envoy_state(&envoy),
    )
    .await;
    let root_serial = serial_of(ca.root_pem().as_bytes());
    assert!(
        cas.contains(&root_serial),
        "ROOTCA from SDS must be Envoy's CA: {cas:?} vs {root_serial}"
    );

    // Envoy's secrets are exactly pilot-agent's shapes.
    let dump = envoy.active_secrets().await.unwrap();
    let secrets = dump;
    let by_name = |n: &str| {
        secrets
            .iter()
            .find(|s| s["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} missing: {secrets:?}"))
    };
    let default = by_name("default");
    assert!(
        default["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"].is_string(),
        "{default}"
    );
    assert_eq!(
        default["secret"]["tls_certificate"]["private_key"]["inline_bytes"], "W3JlZGFjdGVkXQ==",
        "key redacted by Envoy"
    );
    let rootca = by_name("ROOTCA");
    let root_b64 = rootca["secret"]["validation_context"]["trusted_ca"]["inline_bytes"]
        .as_str()
        .unwrap();
    let root_bytes = base64::engine::general_purpose::STANDARD
        .decode(root_b64)
        .unwrap();
    assert_eq!(root_bytes, ca.root_pem().as_bytes());
    let chain_b64 = default["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"]
        .as_str()
        .unwrap();
    let chain = base64::engine::general_purpose::STANDARD
        .decode(chain_b64)
        .unwrap();
    assert_eq!(
        certs_from_pem(&chain, "chain").unwrap().len(),
        3,
        "leaf, intermediate, root"
    );

    // Rotation reaches Envoy: a leaf with a new serial, the one the agent currently publishes.
    let first = serials[0].clone();
    let rotated = eventually(
        Duration::from_secs(30),
        "Envoy holding a rotated certificate",
        || {
            let envoy = &envoy;
            let first = first.clone();
            async move {
                envoy_state(envoy)
                    .await
                    .and_then(|(s, _)| s.into_iter().find(|x| *x != first))
            }
        },
    )
    .await;
    let current = rx.borrow().clone().unwrap();
    let published = serial_of(&current.cert_chain_pem);
    assert!(
        rotated == published || ca.issued() > 2,
        "Envoy has {rotated}, agent publishes {published}"
    );
    assert!(
        Stats::get(&server.stats().acks) >= 2,
        "Envoy ACKed the initial secrets and the rotation"
    );
    assert_eq!(
        Stats::get(&server.stats().nacks),
        0,
        "Envoy rejected an update: {:?}",
        server.stats().last_nack.lock()
    );
}

#[tokio::test]
async fn envoy_gets_and_rotates_the_workload_certificate_over_sotw_sds() {
    ca_to_envoy("GRPC", Duration::from_secs(4)).await;
}

#[tokio::test]
async fn envoy_gets_and_rotates_the_workload_certificate_over_delta_sds() {
    ca_to_envoy("DELTA_GRPC", Duration::from_secs(4)).await;
}

#[tokio::test]
async fn file_mounted_certificates_reload_into_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("etc/certs");
    std::fs::create_dir_all(&certs).unwrap();
    let paths = FileCertPaths::in_dir(&certs);
    let pki = TestPki::new("cluster.local", false).unwrap();
    let write = |pki: &TestPki| {
        let (chain, key, root) = pki.issue_files(ID, Duration::from_secs(3600)).unwrap();
        // Key first, then chain: the debounce must let both land before reading.
        std::fs::write(&paths.key, &key).unwrap();
        std::fs::write(&paths.cert_chain, &chain).unwrap();
        std::fs::write(&paths.root_cert, &root).unwrap();
        chain
    };
    let chain1 = write(&pki);
    let (tx, rx) = secret_channel();
    let watcher = FileWatcher::spawn(
        paths.clone(),
        Duration::from_millis(50),
        Duration::from_millis(100),
        tx,
    );
    let sock = dir.path().join("sds.sock");
    let _server = Server::start(&sock, rx).await.unwrap();
    let envoy = Envoy::start(&sds_bootstrap(&sock, "GRPC")).await;
    let s1 = serial_of(chain1.as_bytes());
    eventually(
        Duration::from_secs(30),
        "Envoy holding the mounted certificate",
        || {
            let (envoy, s1) = (&envoy, s1.clone());
            async move { envoy_state(envoy).await.filter(|(s, _)| s.contains(&s1)) }
        },
    )
    .await;

    // New files (new root too): Envoy gets both.
    let pki2 = TestPki::new("cluster.local", false).unwrap();
    let chain2 = write(&pki2);
    let (s2, root2) = (
        serial_of(chain2.as_bytes()),
        serial_of(pki2.root_pem().as_bytes()),
    );
    eventually(
        Duration::from_secs(30),
        "Envoy holding the reloaded certificate and root",
        || {
            let (envoy, s1, s2, root2) = (&envoy, s1.clone(), s2.clone(), root2.clone());
            async move {
                envoy_state(envoy)
                    .await
                    .filter(|(s, cas)| s.contains(&s2) && !s.contains(&s1) && cas.contains(&root2))
            }
        },
    )
    .await;

    // A key that does not match the chain is refused; Envoy keeps the last good pair.
    let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(&paths.key, other_key.serialize_pem()).unwrap();
    let status = watcher.status().clone();
    eventually(
        Duration::from_secs(10),
        "the mismatched key to be refused",
        || {
            let n = status.failures.load(std::sync::atomic::Ordering::Relaxed);
            async move { (n >= 1).then_some(()) }
        },
    )
    .await;
    assert!(
        status
            .last_error
            .lock()
            .as_deref()
            .unwrap_or("")
            .contains("does not match")
    );
    let (serials, _) = envoy_state(&envoy).await.unwrap();
    assert_eq!(serials, vec![s2]);
}

#[tokio::test]
async fn envoy_resubscribes_after_the_agent_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir
        .path()
        .join("var/run/secrets/workload-spiffe-uds/socket");
    let pki = TestPki::new("cluster.local", false).unwrap();
    let secret = |pki: &TestPki| {
        let s = pki.workload_secret(ID, Duration::from_secs(3600)).unwrap();
        (serial_of(&s.cert_chain_pem), std::sync::Arc::new(s))
    };
    let (s1, first) = secret(&pki);
    let (tx, rx) = secret_channel();
    tx.send_replace(Some(first));
    let server = Server::start(&sock, rx).await.unwrap();
    let envoy = Envoy::start(&sds_bootstrap(&sock, "GRPC")).await;
    eventually(Duration::from_secs(30), "the first certificate", || {
        let (envoy, s1) = (&envoy, s1.clone());
        async move { envoy_state(envoy).await.filter(|(s, _)| s.contains(&s1)) }
    })
    .await;

    // The agent goes away and comes back with a new certificate on the same socket path.
    server.shutdown().await;
    let (s2, second) = secret(&pki);
    let (tx2, rx2) = secret_channel();
    tx2.send_replace(Some(second));
    let restarted = Server::start(&sock, rx2).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the certificate of the restarted agent",
        || {
            let (envoy, s2) = (&envoy, s2.clone());
            async move {
                envoy_state(envoy)
                    .await
                    .filter(|(s, _)| s == &vec![s2.clone()])
            }
        },
    )
    .await;
    assert!(Stats::get(&restarted.stats().streams_opened) >= 1);
    assert_eq!(Stats::get(&restarted.stats().nacks), 0);
}
