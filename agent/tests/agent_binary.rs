// SPDX-License-Identifier: Apache-2.0
//! `pingsail-agent sds` as a process, configured only by pilot-agent's environment variables and
//! its working directory, serving SDS on Istio's socket path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use pingsail_agent::ca::pem::{certs_from_pem, leaf_info, spki_of_private_key};
use pingsail_agent::sds::SECRET_TYPE_URL;
use pingsail_agent::testing::{FakeCa, TestPki};
use prost::Message;
use support::{connect_sds, eventually, within};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";

fn spawn_agent(cwd: &Path, env: &[(&str, String)]) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pingsail-agent"));
    cmd.arg("sds")
        .current_dir(cwd)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Subscribes `default` and `ROOTCA` on the agent's socket under `cwd`; returns
/// (chain, key, root) as served.
async fn fetch_over_sds(cwd: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let sock = cwd.join("var/run/secrets/workload-spiffe-uds/socket");
    eventually(Duration::from_secs(30), "the agent's SDS socket", || {
        let exists = sock.exists();
        async move { exists.then_some(()) }
    })
    .await;
    let mut client = connect_sds(&sock).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        resource_names: vec!["default".into(), "ROOTCA".into()],
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (mut chain, mut key, mut root) = (None, None, None);
    while chain.is_none() || root.is_none() {
        let resp = within(Duration::from_secs(60), "SDS response", stream.message())
            .await
            .unwrap()
            .unwrap();
        for any in resp.resources {
            let s = Secret::decode(any.value.as_slice()).unwrap();
            let bytes = |d: Option<envoy_types::pb::envoy::config::core::v3::DataSource>| match d
                .and_then(|d| d.specifier)
            {
                Some(Specifier::InlineBytes(b)) => b,
                other => panic!("inline bytes expected, got {other:?}"),
            };
            match s.r#type {
                Some(secret::Type::TlsCertificate(t)) => {
                    chain = Some(bytes(t.certificate_chain));
                    key = Some(bytes(t.private_key));
                }
                Some(secret::Type::ValidationContext(v)) => root = Some(bytes(v.trusted_ca)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    (chain.unwrap(), key.unwrap(), root.unwrap())
}

#[tokio::test]
async fn sds_subcommand_gets_an_rsa_certificate_from_the_ca_like_pilot_agent() {
    let ca = FakeCa::start(ID, false).await.unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let istio = cwd.path().join("var/run/secrets/istio");
    let tokens = cwd.path().join("var/run/secrets/tokens");
    std::fs::create_dir_all(&istio).unwrap();
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::write(istio.join("root-cert.pem"), ca.root_pem()).unwrap();
    std::fs::write(tokens.join("istio-token"), "projected-token").unwrap();
    // The injected container's variables; no ECC_SIGNATURE_ALGORITHM: RSA 2048 as pilot-agent.
    let _agent = spawn_agent(
        cwd.path(),
        &[
            ("CA_ADDR", ca.addr().to_string()),
            ("PILOT_CERT_PROVIDER", "istiod".into()),
            ("POD_NAMESPACE", "default".into()),
            ("SERVICE_ACCOUNT", "sleep".into()),
            ("ISTIO_META_CLUSTER_ID", "Kubernetes".into()),
            ("TRUST_DOMAIN", "cluster.local".into()),
            ("SECRET_TTL", "12h".into()),
            ("OUTPUT_CERTS", "./out".into()),
        ],
    );
    let (chain, key, root) = fetch_over_sds(cwd.path()).await;
    let ders = certs_from_pem(&chain, "chain").unwrap();
    let leaf = leaf_info(&ders[0]).unwrap();
    assert_eq!(leaf.uri_sans, vec![ID.to_string()]);
    assert_eq!(leaf.spki, spki_of_private_key(&key, "key").unwrap());
    assert!(leaf.spki.len() > 250, "RSA key expected by default");
    assert_eq!(root, ca.root_pem().as_bytes());
    let req = ca.last_request().unwrap();
    assert_eq!(req.authorization.as_deref(), Some("Bearer projected-token"));
    assert_eq!(req.cluster_id.as_deref(), Some("Kubernetes"));
    assert_eq!(req.validity_duration, 12 * 3600);
    // OUTPUT_CERTS: the same files, owner-only outside Kubernetes.
    let out = cwd.path().join("out");
    let written = eventually(Duration::from_secs(10), "OUTPUT_CERTS files", || {
        let files =
            ["key.pem", "cert-chain.pem", "root-cert.pem"].map(|f| std::fs::read(out.join(f)).ok());
        async move {
            match files {
                [Some(k), Some(c), Some(r)] => Some((k, c, r)),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(written, (key, chain, root));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn sds_subcommand_serves_file_mounted_certificates() {
    let cwd = tempfile::tempdir().unwrap();
    let certs = cwd.path().join("etc/certs");
    std::fs::create_dir_all(&certs).unwrap();
    let pki = TestPki::new("cluster.local", true).unwrap();
    let (chain, key, root) = pki.issue_files(ID, Duration::from_secs(3600)).unwrap();
    std::fs::write(certs.join("cert-chain.pem"), &chain).unwrap();
    std::fs::write(certs.join("key.pem"), &key).unwrap();
    std::fs::write(certs.join("root-cert.pem"), &root).unwrap();
    // No CA address: it must not be needed.
    let _agent = spawn_agent(cwd.path(), &[("FILE_MOUNTED_CERTS", "true".into())]);
    let served = fetch_over_sds(cwd.path()).await;
    assert_eq!(
        served,
        (chain.into_bytes(), key.into_bytes(), root.into_bytes())
    );
}

#[tokio::test]
async fn sds_subcommand_refuses_an_incomplete_environment() {
    let cwd = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pingsail-agent"))
        .arg("sds")
        .current_dir(cwd.path())
        .env_clear()
        .env("SERVICE_ACCOUNT", "sleep")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("POD_NAMESPACE"), "{err}");
}
