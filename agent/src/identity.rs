// SPDX-License-Identifier: Apache-2.0
//! The workload identity service as pilot-agent runs it: the certificate provider selected by
//! the environment (istiod's CA or mounted files) feeding the SDS server on its Unix socket.

use std::collections::BTreeMap;
use std::path::Path;

use crate::ca::{self, CertConfig, CertSource};
use crate::sds::{self, Server, ServerHandle};

/// A running identity service: stops when dropped.
pub struct Identity {
    pub server: ServerHandle,
    pub provider: ca::Provider,
    pub secrets: sds::SecretReceiver,
}

/// Starts the provider and the SDS server `cfg` describes.
pub async fn start(cfg: &CertConfig) -> Result<Identity, sds::SdsError> {
    let (tx, rx) = sds::secret_channel();
    let server = Server::start(&cfg.sds_socket, rx.clone()).await?;
    let provider = ca::start(cfg, tx);
    match &cfg.source {
        CertSource::Ca { client, rotation } => tracing::info!(
            ca = %client.address, identity = %rotation.identity, key = ?rotation.key, ttl = ?rotation.ttl,
            "workload certificates from the CA"
        ),
        CertSource::Files { paths, .. } => tracing::info!(
            chain = %paths.cert_chain.display(), "workload certificates from mounted files"
        ),
    }
    Ok(Identity {
        server,
        provider,
        secrets: rx,
    })
}

/// `pingsail-agent sds`: reads pilot-agent's environment (paths relative to `base`, the working
/// directory), serves SDS until SIGINT/SIGTERM.
pub async fn run(env: &BTreeMap<String, String>, base: &Path) -> anyhow::Result<()> {
    let cfg = CertConfig::from_env(env, base)?;
    let identity = start(&cfg).await?;
    let mut secrets = identity.secrets.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            changed = secrets.changed() => {
                if changed.is_err() {
                    break;
                }
                if let Some(s) = secrets.borrow_and_update().as_ref() {
                    tracing::info!(not_after = ?s.not_after, "serving a new workload certificate");
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    identity.server.shutdown().await;
    Ok(())
}
