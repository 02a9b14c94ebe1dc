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
    _output: Option<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    let output = cfg.output_dir.clone().map(|dir| {
        AbortOnDrop(tokio::spawn(write_outputs(
            dir,
            cfg.output_mode,
            rx.clone(),
        )))
    });
    Ok(Identity {
        server,
        provider,
        secrets: rx,
        _output: output,
    })
}

/// OUTPUT_CERTS (pilot-agent `OutputKeyCertToDir`): each file rewritten atomically when its
/// content changes.
async fn write_outputs(dir: std::path::PathBuf, mode: u32, mut rx: sds::SecretReceiver) {
    loop {
        let current = rx.borrow_and_update().clone();
        if let Some(s) = current {
            for (name, data) in [
                ("key.pem", &s.private_key_pem),
                ("cert-chain.pem", &s.cert_chain_pem),
                ("root-cert.pem", &s.root_cert_pem),
            ] {
                if let Err(e) = write_if_changed(&dir, name, data, mode) {
                    tracing::error!(dir = %dir.display(), file = name, error = %e, "OUTPUT_CERTS write failed");
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn write_if_changed(dir: &Path, name: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    if std::fs::read(&path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
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
