// SPDX-License-Identifier: Apache-2.0
//! The CA client against the fake istiod CA over real TLS sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pingsail_agent::ca::pem::{
    CertError, certs_from_pem, leaf_info, spki_of_private_key, validate_issued_chain,
};
use pingsail_agent::ca::{
    Backoff, CaClient, CaClientConfig, CaError, CertManager, FetchError, KeySpec, RotationConfig,
    fetch_once,
};
use pingsail_agent::sds::{WorkloadSecret, secret_channel};
use pingsail_agent::testing::{FAKE_CA_SERVER_NAME, FakeCa, TestPki};
use support::{eventually, within};

const ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";

fn client_for(ca: &FakeCa, dir: &Path, token: Option<&str>) -> CaClient {
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, ca.root_pem()).unwrap();
    let mut cfg = CaClientConfig::new(ca.addr().to_string(), root);
    cfg.server_name = Some(FAKE_CA_SERVER_NAME.into());
    cfg.cluster_id = "Kubernetes".into();
    if let Some(t) = token {
        let path = dir.join("istio-token");
        std::fs::write(&path, t).unwrap();
        cfg.token_path = Some(path);
    }
    CaClient::new(cfg)
}

fn rotation(key: KeySpec, ttl: Duration) -> RotationConfig {
    RotationConfig {
        identity: ID.into(),
        key,
        ttl,
        grace_ratio: 0.5,
        grace_jitter: 0.0,
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            multiplier: 2.0,
            randomization: 0.1,
        },
    }
}

fn leaf_of(s: &WorkloadSecret) -> pingsail_agent::ca::pem::LeafInfo {
    let ders = certs_from_pem(&s.cert_chain_pem, "chain").unwrap();
    leaf_info(&ders[0]).unwrap()
}

#[tokio::test]
async fn issues_a_validated_chain_with_istio_headers() {
    let ca = FakeCa::start(ID, true).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&ca, dir.path(), Some("token-abc\n"));
    let secret = fetch_once(
        &client,
        &rotation(KeySpec::EcdsaP256, Duration::from_secs(3600)),
    )
    .await
    .unwrap();

    // What istiod would have seen.
    let req = ca.last_request().unwrap();
    assert_eq!(req.authorization.as_deref(), Some("Bearer token-abc"));
    assert_eq!(req.cluster_id.as_deref(), Some("Kubernetes"));
    assert_eq!(req.validity_duration, 3600);
    assert_eq!(req.csr_sans, vec![ID.to_string()]);
    assert_eq!(req.cert_signer.as_deref(), Some(""));

    // `default` carries the whole answer (leaf, intermediate, root); `ROOTCA` the root.
    let chain = certs_from_pem(&secret.cert_chain_pem, "chain").unwrap();
    assert_eq!(chain.len(), 3);
    let root = certs_from_pem(&secret.root_cert_pem, "root").unwrap();
    assert_eq!(
        root,
        certs_from_pem(ca.root_pem().as_bytes(), "ca").unwrap()
    );
    let leaf = leaf_of(&secret);
    assert_eq!(leaf.uri_sans, vec![ID.to_string()]);
    assert_eq!(
        leaf.spki,
        spki_of_private_key(&secret.private_key_pem, "key").unwrap()
    );
    let life = leaf.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(
        life > Duration::from_secs(3500) && life <= Duration::from_secs(3600),
        "{life:?}"
    );
}

#[tokio::test]
async fn rsa_2048_keys_work_end_to_end() {
    let ca = FakeCa::start(ID, false).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&ca, dir.path(), Some("t"));
    let secret = fetch_once(
        &client,
        &rotation(KeySpec::Rsa { bits: 2048 }, Duration::from_secs(600)),
    )
    .await
    .unwrap();
    let pem = std::str::from_utf8(&secret.private_key_pem).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem:.40}");
    assert_eq!(
        certs_from_pem(&secret.cert_chain_pem, "chain")
            .unwrap()
            .len(),
        2
    );
    // An RSA SPKI is much larger than a P-256 one.
    assert!(leaf_of(&secret).spki.len() > 250);
}

#[tokio::test]
async fn a_leaf_for_another_identity_is_refused() {
    let ca = FakeCa::start("spiffe://cluster.local/ns/default/sa/intruder", false)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&ca, dir.path(), Some("t"));
    let err = fetch_once(
        &client,
        &rotation(KeySpec::EcdsaP256, Duration::from_secs(600)),
    )
    .await
    .unwrap_err();
    match err {
        FetchError::Chain(CertError::SanMismatch { expected, found }) => {
            assert_eq!(expected, ID);
            assert_eq!(
                found,
                vec!["spiffe://cluster.local/ns/default/sa/intruder".to_string()]
            );
        }
        other => panic!("expected a SAN mismatch, got {other}"),
    }
    assert_eq!(ca.issued(), 1, "the CA did answer; the agent refused it");
}

#[tokio::test]
async fn without_a_token_the_ca_refuses() {
    let ca = FakeCa::start(ID, false).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&ca, dir.path(), None);
    let err = fetch_once(
        &client,
        &rotation(KeySpec::EcdsaP256, Duration::from_secs(600)),
    )
    .await
    .unwrap_err();
    match err {
        FetchError::Ca(CaError::Rpc { status, .. }) => {
            assert_eq!(status.code(), tonic::Code::Unauthenticated)
        }
        other => panic!("expected Unauthenticated, got {other}"),
    }
    assert!(ca.last_request().unwrap().authorization.is_none());
}

#[tokio::test]
async fn a_ca_serving_cert_from_another_root_is_not_trusted() {
    let ca = FakeCa::start(ID, false).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&ca, dir.path(), Some("t"));
    // Mount an unrelated root instead of the CA's.
    let other = TestPki::new("cluster.local", false).unwrap();
    std::fs::write(dir.path().join("root-cert.pem"), other.root_pem()).unwrap();
    let err = fetch_once(
        &client,
        &rotation(KeySpec::EcdsaP256, Duration::from_secs(600)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::Ca(CaError::Rpc { .. })), "{err}");
    assert_eq!(
        ca.requests(),
        0,
        "no request may pass an untrusted TLS handshake"
    );
}

#[tokio::test]
async fn a_chain_that_does_not_verify_to_its_root_is_refused() {
    let a = TestPki::new("cluster.local", false).unwrap();
    let b = TestPki::new("cluster.local", false).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = a.issue_leaf(&key, ID, Duration::from_secs(600)).unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let good = validate_issued_chain(
        &[leaf.clone(), a.root_pem().into()],
        ID,
        &spki,
        SystemTime::now(),
    );
    assert!(good.is_ok(), "{:?}", good.err());
    let bad = validate_issued_chain(
        &[leaf.clone(), b.root_pem().into()],
        ID,
        &spki,
        SystemTime::now(),
    )
    .unwrap_err();
    assert!(matches!(bad, CertError::Untrusted(_)), "{bad}");
    // Not valid yet by our clock (a CA clock running ahead): accepted, as pilot-agent does.
    let early = SystemTime::now() - Duration::from_secs(3600);
    let skewed = validate_issued_chain(&[leaf.clone(), a.root_pem().into()], ID, &spki, early);
    assert!(skewed.is_ok(), "{:?}", skewed.err());
    // Expired by the time it is checked.
    let later = SystemTime::now() + Duration::from_secs(3600);
    let expired =
        validate_issued_chain(&[leaf.clone(), a.root_pem().into()], ID, &spki, later).unwrap_err();
    assert!(
        matches!(expired, CertError::NotValidNow { .. }),
        "{expired}"
    );
    // A leaf for someone else's key.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other_spki = rcgen::PublicKeyData::subject_public_key_info(&other);
    let mismatch = validate_issued_chain(
        &[leaf.clone(), a.root_pem().into()],
        ID,
        &other_spki,
        SystemTime::now(),
    )
    .unwrap_err();
    assert!(matches!(mismatch, CertError::KeyMismatch), "{mismatch}");
    // istiod's answer always has at least leaf and root.
    let short = validate_issued_chain(&[leaf], ID, &spki, SystemTime::now()).unwrap_err();
    assert!(matches!(short, CertError::ChainTooShort(1)), "{short}");
}

#[tokio::test]
async fn ca_down_is_retried_with_backoff_until_it_answers() {
    let ca = FakeCa::start(ID, false).await.unwrap();
    ca.set_down(true);
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&ca, dir.path(), Some("t"));
    let (tx, mut rx) = secret_channel();
    let mgr = CertManager::spawn(
        client,
        rotation(KeySpec::EcdsaP256, Duration::from_secs(3600)),
        tx,
    );
    let status = mgr.status().clone();
    eventually(Duration::from_secs(20), "three failed attempts", || {
        let n = status.failures();
        async move { (n >= 3).then_some(()) }
    })
    .await;
    assert!(
        rx.borrow().is_none(),
        "nothing may be published while the CA is down"
    );
    assert!(ca.connections() >= 3, "each retry reconnects");
    assert_eq!(ca.issued(), 0);
    assert!(
        status.last_error().unwrap().contains("create certificate"),
        "{:?}",
        status.last_error()
    );

    // A gRPC-level failure (istiod overloaded) is retried too.
    ca.set_down(false);
    ca.fail_with(Some(tonic::Code::Unavailable));
    let before = status.failures();
    eventually(Duration::from_secs(20), "a failed gRPC attempt", || {
        let n = status.failures();
        async move { (n > before).then_some(()) }
    })
    .await;
    ca.fail_with(None);
    within(
        Duration::from_secs(20),
        "a published secret",
        rx.wait_for(Option::is_some),
    )
    .await
    .unwrap();
    let secret = rx.borrow().clone().unwrap();
    assert_eq!(leaf_of(&secret).uri_sans, vec![ID.to_string()]);
    assert_eq!(status.issued(), 1);
}

#[tokio::test]
async fn rotation_happens_at_half_the_lifetime() {
    let ca = FakeCa::start(ID, false).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&ca, dir.path(), Some("t"));
    let (tx, mut rx) = secret_channel();
    let ttl = Duration::from_secs(2);
    let _mgr = CertManager::spawn(client, rotation(KeySpec::EcdsaP256, ttl), tx);
    within(
        Duration::from_secs(20),
        "a published secret",
        rx.wait_for(Option::is_some),
    )
    .await
    .unwrap();
    let first: Arc<WorkloadSecret> = rx.borrow_and_update().clone().unwrap();
    within(Duration::from_secs(20), "a rotated secret", rx.changed())
        .await
        .unwrap();
    let rotated_at = SystemTime::now();
    let second = rx.borrow().clone().unwrap();
    assert_ne!(first.cert_chain_pem, second.cert_chain_pem);
    assert_ne!(
        first.private_key_pem, second.private_key_pem,
        "rotation uses a fresh key"
    );
    // Rotation starts when half of the lifetime (obtained -> not_after, whole seconds in X.509)
    // is left; the new certificate follows within a CA round trip.
    let lifetime = first.not_after.duration_since(first.created).unwrap();
    let due = first.not_after - lifetime / 2;
    let late = rotated_at
        .duration_since(due)
        .unwrap_or_else(|e| panic!("rotated {:?} early", e.duration()));
    assert!(
        late < Duration::from_millis(500),
        "rotated {late:?} after half-life"
    );
    assert!(leaf_of(&second).not_after > leaf_of(&first).not_after);
    assert!(ca.issued() >= 2);
}
