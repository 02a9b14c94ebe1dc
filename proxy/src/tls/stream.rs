// SPDX-License-Identifier: Apache-2.0
//! A TLS-terminated downstream connection as a Pingora stream: our accept loop does the handshake
//! (with the chain's context), Pingora's HTTP server then reads plaintext from it.

use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A server-side TLS stream with the connection's facts.
pub type TlsDownstream = Downstream<TlsStream<TcpStream>>;

/// A downstream connection we accepted ourselves (TLS-terminated, or an internal listener's
/// in-memory pipe) as a Pingora stream carrying the connection's facts.
pub struct Downstream<S> {
    inner: S,
    /// bytes already read (protocol detection) and served before the stream's own
    prefix: Vec<u8>,
    fd: i32,
    proxy_digest: Option<Arc<ProxyDigest>>,
    socket_digest: Arc<SocketDigest>,
    /// when the connection was handed to HTTP (its age bounds `max_connection_duration`)
    established: std::time::SystemTime,
}

impl<S> std::fmt::Debug for Downstream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downstream").field("fd", &self.fd).finish()
    }
}

impl TlsDownstream {
    /// Wraps a completed handshake; `digest` carries the per-connection facts.
    pub fn new(inner: TlsStream<TcpStream>, digest: ProxyDigest) -> Self {
        Self::with_prefix(inner, digest, Vec::new())
    }

    /// Like [`TlsDownstream::new`], with bytes already read from the stream put back in front.
    pub fn with_prefix(inner: TlsStream<TcpStream>, digest: ProxyDigest, prefix: Vec<u8>) -> Self {
        let fd = inner.get_ref().0.as_raw_fd();
        Downstream::from_parts(inner, fd, digest, prefix)
    }
}

impl<S> Downstream<S> {
    /// Any stream; `fd` identifies it to Pingora (-1 when there is no socket).
    pub fn from_parts(inner: S, fd: i32, digest: ProxyDigest, prefix: Vec<u8>) -> Self {
        Downstream {
            inner,
            prefix,
            fd,
            proxy_digest: Some(Arc::new(digest)),
            socket_digest: Arc::new(SocketDigest::from_raw_fd(fd)),
            established: std::time::SystemTime::now(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> AsyncRead for Downstream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> AsyncWrite for Downstream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Shutdown for Downstream<S> {
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::shutdown(&mut self.inner).await;
    }
}

impl<S> UniqueID for Downstream<S> {
    fn id(&self) -> UniqueIDType {
        self.fd
    }
}

// TLS facts reach the filters through the proxy digest (ConnFacts); Pingora's own TLS digest is
// OpenSSL/rustls-connector specific and not needed.
impl<S> Ssl for Downstream<S> {}

impl<S> GetTimingDigest for Downstream<S> {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        vec![Some(TimingDigest {
            established_ts: self.established,
            ..Default::default()
        })]
    }
}

impl<S> GetProxyDigest for Downstream<S> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.proxy_digest.clone()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.proxy_digest = Some(Arc::new(digest));
    }
}

impl<S> GetSocketDigest for Downstream<S> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        Some(self.socket_digest.clone())
    }
}

#[async_trait]
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Peek for Downstream<S> {}
