// SPDX-License-Identifier: Apache-2.0
//! The SDS client: a state-of-the-world `StreamSecrets` stream to the agent (`sds-grpc`, a Unix
//! socket in Istio) for the secrets the current configuration names (`default`, `ROOTCA`, …). Each
//! secret that arrives replaces the material new handshakes use; a secret that fails to parse is
//! NACKed and the previous one stays.

use super::ads;
use crate::config::Cluster;
use crate::tls::Secrets;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Runs forever: follows `names`, keeps `secrets` current, reconnects with backoff.
pub async fn run(
    cluster: Arc<Cluster>,
    node: Node,
    secrets: Arc<Secrets>,
    mut names: watch::Receiver<BTreeSet<String>>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if names.borrow().is_empty() && names.changed().await.is_err() {
            return;
        }
        match ads::connect_cluster(&cluster).await {
            Ok(ch) => {
                if let Err(e) = stream(ch, &node, &secrets, &mut names).await {
                    tracing::warn!("SDS: {e}; reconnecting");
                } else {
                    backoff = Duration::from_millis(500);
                }
            }
            Err(e) => tracing::warn!("SDS: {e}"),
        }
        let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 + 1);
        pingora_timeout::sleep(Duration::from_millis(jitter.max(50))).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn stream(
    ch: tonic::transport::Channel,
    node: &Node,
    secrets: &Secrets,
    names: &mut watch::Receiver<BTreeSet<String>>,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
    let mut current: BTreeSet<String> = names.borrow_and_update().clone();
    let mut version = String::new();
    let mut nonce = String::new();
    let _ = tx.send(DiscoveryRequest {
        node: Some(node.clone()),
        resource_names: current.iter().cloned().collect(),
        type_url: SECRET.into(),
        ..Default::default()
    });
    let mut client = SecretDiscoveryServiceClient::new(ch);
    let mut inbound = client
        .stream_secrets(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    loop {
        tokio::select! {
            m = inbound.message() => {
                let Some(resp) = m? else {
                    return Err(tonic::Status::unavailable("the SDS server closed the stream"));
                };
                let mut errors = Vec::new();
                for any in &resp.resources {
                    match Secret::decode(any.value.as_slice()) {
                        Ok(s) => {
                            let path = super::translate::Path::root(&s.name);
                            match super::translate::tls::secret(&s, &path) {
                                Ok(m) => secrets.set(&s.name, Some(Arc::new(m))),
                                Err(e) => errors.push(format!("secret '{}': {e}", s.name)),
                            }
                        }
                        Err(e) => errors.push(format!("malformed secret: {e}")),
                    }
                }
                nonce = resp.nonce.clone();
                if errors.is_empty() {
                    version = resp.version_info.clone();
                }
                let _ = tx.send(DiscoveryRequest {
                    version_info: version.clone(),
                    resource_names: current.iter().cloned().collect(),
                    type_url: SECRET.into(),
                    response_nonce: nonce.clone(),
                    error_detail: (!errors.is_empty()).then(|| Status {
                        code: 13,
                        message: errors.join("; "),
                        details: Vec::new(),
                    }),
                    ..Default::default()
                });
            }
            c = names.changed() => {
                if c.is_err() {
                    return Ok(());
                }
                let next = names.borrow_and_update().clone();
                if next != current {
                    current = next;
                    let _ = tx.send(DiscoveryRequest {
                        version_info: version.clone(),
                        resource_names: current.iter().cloned().collect(),
                        type_url: SECRET.into(),
                        response_nonce: nonce.clone(),
                        ..Default::default()
                    });
                }
            }
        }
    }
}
