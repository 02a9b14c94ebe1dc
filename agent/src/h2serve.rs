// SPDX-License-Identifier: Apache-2.0
//! Serving one tonic service on accepted connections with hyper's HTTP/2 server directly (tonic's
//! own `Server` needs its router feature, which brings axum; one service needs no router).

use std::convert::Infallible;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::body::Body;
use tonic::codegen::Service;

/// Serves `svc` over HTTP/2 on `io` until the connection ends.
pub(crate) async fn serve_h2<IO, S>(io: IO, svc: S)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc))
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "gRPC connection ended with an error");
    }
}

/// Why a gRPC Unix socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    #[error("removing the stale socket {path}: {source}")]
    RemoveStale {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("listening on unix socket {path}: {source}")]
    Listen {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Binds `path` as pilot-agent binds its sockets: a stale socket is removed, the directory
/// created, the socket made 0666 (the proxy may run as another user).
pub(crate) fn bind_uds(
    path: &std::path::Path,
    what: &str,
) -> Result<tokio::net::UnixListener, UdsError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(UdsError::RemoveStale {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot create the {what} socket directory");
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| UdsError::Listen {
        path: path.to_path_buf(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)) {
        tracing::warn!(path = %path.display(), error = %e, "cannot make the {what} socket 0666");
    }
    Ok(listener)
}

/// One gRPC service served over HTTP/2 on a bound Unix socket until shut down or dropped.
pub(crate) struct UdsServer {
    path: std::path::PathBuf,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl UdsServer {
    /// Accepts on `listener` and serves `svc` on every connection until `stop` says true (the
    /// service may watch the same channel to end its streams).
    pub(crate) fn spawn<S>(
        path: std::path::PathBuf,
        listener: tokio::net::UnixListener,
        svc: S,
        what: &'static str,
        stop: tokio::sync::watch::Sender<bool>,
    ) -> Self
    where
        S: Service<
                http::Request<hyper::body::Incoming>,
                Response = http::Response<Body>,
                Error = Infallible,
            > + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let mut stop_rx = stop.subscribe();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            conns.spawn(serve_h2(stream, svc.clone()));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "{what} accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    _ = stopped(&mut stop_rx) => break,
                }
            }
            conns.shutdown().await;
        });
        UdsServer {
            path,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Stops accepting, ends the streams, waits for the server task and removes the socket.
    pub(crate) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for UdsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Resolves once the stop channel says true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
