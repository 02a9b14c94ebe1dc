// SPDX-License-Identifier: Apache-2.0
//! File-mounted certificates (pilot-agent's FILE_MOUNTED_CERTS and the auto-detected
//! `./var/run/secrets/workload-spiffe-credentials`): `cert-chain.pem`, `key.pem` and
//! `root-cert.pem` are read from disk instead of asking a CA, and reloaded when they change.
//!
//! Change detection polls the three files' metadata (mtime, size, inode, following symlinks, so
//! Kubernetes' atomic `..data` symlink swaps are seen) every `poll` interval — no inotify
//! dependency, a few `stat`s per second. A change is debounced (FILE_DEBOUNCE_DURATION, 100 ms)
//! before the files are read, so a writer that replaces key and chain one after the other is
//! read once both are in place; a set that does not validate (key not matching the leaf,
//! unparsable PEM) is refused and the previous secret stays served, as pilot-agent keeps serving
//! the last good pair.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::pem::{self, CertError};
use crate::sds::{SecretSender, WorkloadSecret};

pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const KEY_FILE: &str = "key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Where the three files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileCertPaths {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    pub root_cert: PathBuf,
}

impl FileCertPaths {
    /// `cert-chain.pem`, `key.pem`, `root-cert.pem` in `dir`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self {
            cert_chain: dir.join(CERT_CHAIN_FILE),
            key: dir.join(KEY_FILE),
            root_cert: dir.join(ROOT_CERT_FILE),
        }
    }

    /// Whether all three exist (pilot-agent `CheckWorkloadCertificate`).
    pub fn all_exist(&self) -> bool {
        [&self.cert_chain, &self.key, &self.root_cert]
            .iter()
            .all(|p| p.is_file())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cert(#[from] CertError),
}

fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and checks the three files: the chain and root parse, the key matches the leaf.
pub fn load(paths: &FileCertPaths) -> Result<WorkloadSecret, FileError> {
    let chain = read(&paths.cert_chain)?;
    let key = read(&paths.key)?;
    let root = read(&paths.root_cert)?;
    let chain_what = paths.cert_chain.display().to_string();
    let ders = pem::certs_from_pem(&chain, &chain_what)?;
    pem::certs_from_pem(&root, &paths.root_cert.display().to_string())?;
    let spki = pem::spki_of_private_key(&key, &paths.key.display().to_string())?;
    let leaf = pem::leaf_info(&ders[0])?;
    if leaf.spki != spki {
        return Err(CertError::KeyMismatch.into());
    }
    Ok(WorkloadSecret {
        cert_chain_pem: chain.into(),
        private_key_pem: key.into(),
        root_cert_pem: root.into(),
        not_after: leaf.not_after,
        created: SystemTime::now(),
    })
}

/// What identifies a file's version without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    mtime: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).ok()?;
    Some(Stamp {
        mtime: md.modified().ok(),
        len: md.len(),
        ino: md.ino(),
    })
}

fn stamps(paths: &FileCertPaths) -> [Option<Stamp>; 3] {
    [
        stamp(&paths.cert_chain),
        stamp(&paths.key),
        stamp(&paths.root_cert),
    ]
}

/// Counters of the watcher's activity.
#[derive(Debug, Default)]
pub struct WatcherStatus {
    pub loads: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
    pub last_error: parking_lot::Mutex<Option<String>>,
}

/// Publishes the files' secret and republishes on change; stops when dropped.
pub struct FileWatcher {
    status: Arc<WatcherStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl FileWatcher {
    pub fn spawn(
        paths: FileCertPaths,
        poll: Duration,
        debounce: Duration,
        out: SecretSender,
    ) -> Self {
        let status = Arc::new(WatcherStatus::default());
        let task = tokio::spawn(watch_loop(paths, poll, debounce, out, status.clone()));
        Self { status, task }
    }

    pub fn status(&self) -> &Arc<WatcherStatus> {
        &self.status
    }
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn watch_loop(
    paths: FileCertPaths,
    poll: Duration,
    debounce: Duration,
    out: SecretSender,
    status: Arc<WatcherStatus>,
) {
    use std::sync::atomic::Ordering;
    let mut seen = None;
    loop {
        let now = stamps(&paths);
        if seen != Some(now) {
            if seen.is_some() {
                tokio::time::sleep(debounce).await;
            }
            // Stamp again after the debounce: what is read below is at least this new.
            let settled = stamps(&paths);
            let p = paths.clone();
            let loaded = tokio::task::spawn_blocking(move || load(&p)).await;
            match loaded {
                Ok(Ok(secret)) => {
                    let changed = out.borrow().as_deref().is_none_or(|old| {
                        old.cert_chain_pem != secret.cert_chain_pem
                            || old.private_key_pem != secret.private_key_pem
                            || old.root_cert_pem != secret.root_cert_pem
                    });
                    if changed {
                        tracing::info!(chain = %paths.cert_chain.display(), not_after = ?secret.not_after, "loaded file-mounted certificate");
                        status.loads.fetch_add(1, Ordering::Relaxed);
                        out.send_replace(Some(Arc::new(secret)));
                    }
                }
                Ok(Err(e)) => {
                    status.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "file-mounted certificate not (re)loaded; keeping the previous one");
                    *status.last_error.lock() = Some(e.to_string());
                }
                Err(e) => tracing::error!(error = %e, "file certificate loader task failed"),
            }
            seen = Some(settled);
        }
        tokio::time::sleep(poll).await;
    }
}
