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
