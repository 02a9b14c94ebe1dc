// SPDX-License-Identifier: Apache-2.0
//! `pingsail-agent standalone`: a small mesh on loopback with no Kubernetes and no istiod.
//!
//! `conf/standalone/mesh.yaml` names the workloads. For each one the agent
//! - issues its SPIFFE identity (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`) from a development CA
//!   ([`crate::ca::dev::DevCa`]) and serves it over SDS on the workload's own socket
//!   (`<run dir>/<workload>/var/run/secrets/workload-spiffe-uds/socket`), reissuing at half life;
//! - starts the built-in demo app when the workload has one ([`app`]);
//! - starts a pingsail-proxy sidecar on the workload's bootstrap with the workload's run directory
//!   as working directory, so the bootstrap's relative SDS socket path is the workload's own.
//!
//! Once every sidecar's admin `/ready` says LIVE it prints `mesh ready` and what to try, and runs
//! until SIGINT/SIGTERM or until a sidecar dies (then it stops the others and exits non-zero).

pub mod app;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::{Child, Command};

use crate::ca::dev::DevCa;
use crate::sds::{self, SecretSender, Server, ServerHandle};

/// How long a workload certificate of the standalone mesh lives (reissued at half of it).
const CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long the sidecars get to become ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// `mesh.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mesh {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    pub workloads: Vec<Workload>,
    /// Commands to print once the mesh is ready.
    #[serde(default)]
    pub r#try: Vec<String>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

/// One workload: its identity, its sidecar's bootstrap and admin address, its app.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub service_account: String,
    /// The sidecar's bootstrap, relative to mesh.yaml.
    pub bootstrap: PathBuf,
    /// The sidecar's admin address (readiness is read there).
    pub admin: SocketAddr,
    #[serde(default)]
    pub app: Option<App>,
}

fn default_namespace() -> String {
    "default".into()
}

/// The built-in demo app of a workload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    pub listen: SocketAddr,
    pub says: String,
}

/// What `standalone` is told on its command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// The directory holding mesh.yaml and the bootstraps.
    pub conf: PathBuf,
    /// The sidecar binary.
    pub proxy_binary: PathBuf,
    /// Where each workload's run directory goes; a fresh temporary directory when `None`.
    pub run_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Mesh {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    DevCa(#[from] crate::ca::dev::DevCaError),
    #[error(transparent)]
    Sds(#[from] sds::SdsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("sidecar of {workload} is not ready after {READY_WITHIN:?} (admin {admin}): {last}")]
    NotReady {
        workload: String,
        admin: SocketAddr,
        last: String,
    },
    #[error("sidecar of {workload} exited: {status}")]
    SidecarExited { workload: String, status: String },
}

impl Mesh {
    /// Reads and checks `<conf>/mesh.yaml`.
    pub fn load(conf: &Path) -> Result<Self, StandaloneError> {
        let path = conf.join("mesh.yaml");
        let text = std::fs::read_to_string(&path).map_err(|source| StandaloneError::Read {
            path: path.clone(),
            source,
        })?;
        let mesh: Mesh = serde_yaml::from_str(&text).map_err(|source| StandaloneError::Mesh {
            path: path.clone(),
            source,
        })?;
        if mesh.workloads.is_empty() {
            return Err(StandaloneError::Invalid(format!(
                "{}: workloads: at least one is needed",
                path.display()
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, w) in mesh.workloads.iter().enumerate() {
            if w.name.is_empty() || w.name.contains(['/', '.']) || !names.insert(&w.name) {
                return Err(StandaloneError::Invalid(format!(
                    "{}: workloads[{i}].name {:?}: must be unique, non-empty, without '/' or '.'",
                    path.display(),
                    w.name
                )));
            }
        }
        Ok(mesh)
    }
}

/// A running workload: dropping it stops its sidecar (kill on drop), app and SDS server.
struct Running {
    name: String,
    identity: String,
    admin: SocketAddr,
    sidecar: Child,
    _sds: ServerHandle,
    _app: Option<AbortOnDrop>,
    _rotation: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the mesh until a signal (exit 0) or a sidecar's death (error).
pub async fn run(opts: Options) -> Result<(), StandaloneError> {
    let mesh = Mesh::load(&opts.conf)?;
    let conf = std::path::absolute(&opts.conf).map_err(|source| StandaloneError::Io {
        what: format!("{}", opts.conf.display()),
        source,
    })?;
    let (run_dir, _cleanup) = match &opts.run_dir {
        Some(d) => (d.clone(), None),
        None => {
            let d =
                std::env::temp_dir().join(format!("pingsail-standalone-{}", std::process::id()));
            (d.clone(), Some(RemoveOnDrop(d)))
        }
    };
    let ca = Arc::new(DevCa::new(&mesh.trust_domain, false)?);

    let mut running = Vec::new();
    for w in &mesh.workloads {
        running.push(start_workload(&mesh, w, &conf, &run_dir, &ca, &opts.proxy_binary).await?);
    }
    for r in &mut running {
        wait_ready(r).await?;
    }

    println!(
        "mesh ready: {} workloads, run directory {}",
        running.len(),
        run_dir.display()
    );
    for r in &running {
        println!(
            "  {:<12} sidecar admin {:<16} identity {}",
            r.name, r.admin, r.identity
        );
    }
    if !mesh.r#try.is_empty() {
        println!("try:");
        for t in &mesh.r#try {
            println!("  {t}");
        }
    }
    println!("Ctrl-C stops the mesh.");

    let result = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        (name, status) = first_exit(&mut running) => Err(StandaloneError::SidecarExited { workload: name, status }),
    };
    for r in &mut running {
        let _ = r.sidecar.start_kill();
        let _ = r.sidecar.wait().await;
    }
    result
}

async fn start_workload(
    mesh: &Mesh,
    w: &Workload,
    conf: &Path,
    run_dir: &Path,
    ca: &Arc<DevCa>,
    proxy: &Path,
) -> Result<Running, StandaloneError> {
    let dir = run_dir.join(&w.name);
    std::fs::create_dir_all(&dir).map_err(|source| StandaloneError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    let identity = format!(
        "spiffe://{}/ns/{}/sa/{}",
        mesh.trust_domain, w.namespace, w.service_account
    );
    let (tx, rx) = sds::secret_channel();
    issue(ca, &identity, &tx)?;
    let sds = Server::start(dir.join(sds::DEFAULT_SOCKET_PATH), rx).await?;
    let rotation = AbortOnDrop(tokio::spawn(rotate(ca.clone(), identity.clone(), tx)));

    let app = match &w.app {
        Some(a) => Some(AbortOnDrop(
            app::bind(a.listen, a.says.clone())
                .await
                .map_err(|source| StandaloneError::Io {
                    what: format!("{}: app on {}", w.name, a.listen),
                    source,
                })?,
        )),
        None => None,
    };

    let bootstrap = conf.join(&w.bootstrap);
    let sidecar = Command::new(proxy)
        .arg("-c")
        .arg(&bootstrap)
        .args(["--concurrency", "1", "-l", "warning"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| StandaloneError::Io {
            what: format!("{}: starting {}", w.name, proxy.display()),
            source,
        })?;
    Ok(Running {
        name: w.name.clone(),
        identity,
        admin: w.admin,
        sidecar,
        _sds: sds,
        _app: app,
        _rotation: rotation,
    })
}

fn issue(ca: &DevCa, identity: &str, tx: &SecretSender) -> Result<(), StandaloneError> {
    let secret = ca.workload_secret(identity, CERT_TTL)?;
    tx.send_replace(Some(Arc::new(secret)));
    Ok(())
}

/// Reissues the workload's certificate at half its lifetime, as pilot-agent rotates.
async fn rotate(ca: Arc<DevCa>, identity: String, tx: SecretSender) {
    loop {
        tokio::time::sleep(CERT_TTL / 2).await;
        if let Err(e) = issue(&ca, &identity, &tx) {
            tracing::error!(%identity, error = %e, "reissuing the workload certificate failed");
        }
    }
}

/// Polls the sidecar's admin `/ready` until it answers `LIVE` (the sidecar's own readiness signal).
async fn wait_ready(r: &mut Running) -> Result<(), StandaloneError> {
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    loop {
        if let Ok(Some(status)) = r.sidecar.try_wait() {
            return Err(StandaloneError::SidecarExited {
                workload: r.name.clone(),
                status: status.to_string(),
            });
        }
        let last = match crate::status::client::Call::get(r.admin, "/ready")
            .send()
            .await
        {
            Ok(reply) if reply.status == 200 && reply.body.starts_with(b"LIVE") => return Ok(()),
            Ok(reply) => format!(
                "{} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body).trim()
            ),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(StandaloneError::NotReady {
                workload: r.name.clone(),
                admin: r.admin,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn first_exit(running: &mut [Running]) -> (String, String) {
    let waits = running.iter_mut().map(|r| {
        Box::pin(async move {
            let status = match r.sidecar.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            (r.name.clone(), status)
        })
    });
    futures_select_all(waits).await
}

/// The first of several futures to finish (a tiny `select_all`).
async fn futures_select_all<F, T>(futs: impl Iterator<Item = std::pin::Pin<Box<F>>>) -> T
where
    F: std::future::Future<Output = T>,
{
    let mut futs: Vec<_> = futs.collect();
    std::future::poll_fn(move |cx| {
        for f in futs.iter_mut() {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_shipped_mesh_loads() {
        let conf = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/standalone"));
        let mesh = Mesh::load(conf).unwrap();
        assert_eq!(mesh.workloads.len(), 3);
        for w in &mesh.workloads {
            assert!(
                conf.join(&w.bootstrap).is_file(),
                "{}",
                w.bootstrap.display()
            );
        }
    }

    #[test]
    fn bad_mesh_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("mesh.yaml"),
            "workloads: [{name: a, serviceAccount: a, bootstrap: a.yaml, admin: nope}]",
        )
        .unwrap();
        let e = Mesh::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("admin"), "{e}");
        std::fs::write(
            dir.path().join("mesh.yaml"),
            "workloads: [{name: a.b, serviceAccount: a, bootstrap: a.yaml, admin: '127.0.0.1:1'}]",
        )
        .unwrap();
        let e = Mesh::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("workloads[0].name"), "{e}");
    }
}
