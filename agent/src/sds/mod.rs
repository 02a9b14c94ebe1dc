// SPDX-License-Identifier: Apache-2.0
//! The agent's SDS server (`envoy.service.secret.v3.SecretDiscoveryService`) on a Unix socket, as
//! pilot-agent serves it to the proxy (`security/pkg/nodeagent/sds`):
//!
//! - `default`: a `tls_certificate` with the workload chain and key, inline bytes;
//! - `ROOTCA`: a `validation_context` whose `trusted_ca` is the root bundle, inline bytes;
//! - any other name (not `file-cert:`/`file-root:`): the workload certificate under that name, as
//!   pilot-agent's secret cache does for unknown names;
//! - `file-cert:<chain>~<key>` and `file-root:<bundle>`: read from those files (pilot-agent's
//!   file-mounted resource names, used for DestinationRule/Gateway credentials), re-read on
//!   change.
//!
//! Both the state-of-the-world `StreamSecrets` (what Istio's bootstrap and istiod's listeners use:
//! `api_type: GRPC` on cluster `sds-grpc`) and the incremental `DeltaSecrets` are served.
//! Secrets come from a `watch` channel ([`secret_channel`]); every change is pushed to every
//! stream subscribed to an affected name. A name whose secret is not available yet is held back
//! (the client keeps it warming) and sent as soon as it is. ACKs and NACKs are counted; a NACKed
//! version is not re-sent, the next change is.

mod service;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::watch;

pub use service::SECRET_TYPE_URL;

/// The resource name of the workload key and certificate (`security.WorkloadKeyCertResourceName`).
pub const WORKLOAD_RESOURCE: &str = "default";
/// The resource name of the root bundle (`security.RootCertReqResourceName`).
pub const ROOT_RESOURCE: &str = "ROOTCA";
/// Istio's default socket, relative to the agent's working directory
/// (`security.WorkloadIdentityPath` + `DefaultWorkloadIdentitySocketFile`).
pub const DEFAULT_SOCKET_PATH: &str = "./var/run/secrets/workload-spiffe-uds/socket";

/// The workload identity the SDS server hands out.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkloadSecret {
    /// PEM chain served in `default` (pilot-agent serves the CA's whole answer, root included).
    pub cert_chain_pem: Bytes,
    /// PEM private key.
    pub private_key_pem: Bytes,
    /// PEM bundle served in `ROOTCA`.
    pub root_cert_pem: Bytes,
    /// When the leaf expires.
    pub not_after: SystemTime,
    /// When the agent obtained it (rotation is computed from this, as pilot-agent does).
    pub created: SystemTime,
}

impl WorkloadSecret {
    /// A secret from PEM material: the chain and root must parse and the key must match the
    /// leaf; `not_after` is the leaf's, `created` is now.
    pub fn from_pem(
        cert_chain_pem: impl Into<Bytes>,
        private_key_pem: impl Into<Bytes>,
        root_cert_pem: impl Into<Bytes>,
    ) -> Result<Self, crate::ca::pem::CertError> {
        use crate::ca::pem;
        let (chain, key, root) = (
            cert_chain_pem.into(),
            private_key_pem.into(),
            root_cert_pem.into(),
        );
        let ders = pem::certs_from_pem(&chain, "certificate chain")?;
        pem::certs_from_pem(&root, "root certificate")?;
        let spki = pem::spki_of_private_key(&key, "private key")?;
        let leaf = pem::leaf_info(&ders[0])?;
        if leaf.spki != spki {
            return Err(pem::CertError::KeyMismatch);
        }
        Ok(Self {
            cert_chain_pem: chain,
            private_key_pem: key,
            root_cert_pem: root,
            not_after: leaf.not_after,
            created: SystemTime::now(),
        })
    }
}

impl std::fmt::Debug for WorkloadSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSecret")
            .field("cert_chain_pem_len", &self.cert_chain_pem.len())
            .field("private_key_pem", &"[redacted]")
            .field("root_cert_pem_len", &self.root_cert_pem.len())
            .field("not_after", &self.not_after)
            .field("created", &self.created)
            .finish()
    }
}

/// What the SDS server reads: the current secret, `None` until the first one is available.
pub type SecretReceiver = watch::Receiver<Option<Arc<WorkloadSecret>>>;
/// What the CA client or the file watcher writes.
pub type SecretSender = watch::Sender<Option<Arc<WorkloadSecret>>>;

/// A fresh, empty secret channel.
pub fn secret_channel() -> (SecretSender, SecretReceiver) {
    watch::channel(None)
}

#[derive(Debug, thiserror::Error)]
pub enum SdsError {
    #[error(transparent)]
    Socket(#[from] crate::h2serve::UdsError),
}

/// Counters of the server's activity, for tests and debugging.
#[derive(Debug, Default)]
pub struct Stats {
    pub streams_opened: AtomicU64,
    pub responses_sent: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub last_nack: parking_lot::Mutex<Option<String>>,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The SDS server.
pub struct Server;

impl Server {
    /// Listens on `path` (a stale socket file is removed, the parent directory created, the
    /// socket made 0666 as pilot-agent does) and serves `secrets` until the handle is shut down
    /// or dropped.
    pub async fn start(
        path: impl AsRef<Path>,
        secrets: SecretReceiver,
    ) -> Result<ServerHandle, SdsError> {
        let path = path.as_ref().to_path_buf();
        let listener = crate::h2serve::bind_uds(&path, "SDS")?;
        let stats = Arc::new(Stats::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let svc = service::SdsService::new(secrets, stats.clone(), stop_rx).into_server();
        let server = crate::h2serve::UdsServer::spawn(path.clone(), listener, svc, "SDS", stop_tx);
        tracing::info!(path = %path.display(), "SDS server listening");
        Ok(ServerHandle { server, stats })
    }
}

/// A running SDS server; stops when shut down or dropped.
pub struct ServerHandle {
    server: crate::h2serve::UdsServer,
    stats: Arc<Stats>,
}

impl ServerHandle {
    pub fn path(&self) -> &Path {
        self.server.path()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Stops accepting, ends the streams, waits for the server task and removes the socket.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}
