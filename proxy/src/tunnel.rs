// SPDX-License-Identifier: Apache-2.0
//! HTTP/2 CONNECT tunnels (Istio's HBONE): origination for tcp_proxy `tunneling_config`, and the
//! byte pump the HTTP router uses when it terminates a CONNECT (proxy/src/http/connect.rs).
//!
//! Origination speaks HTTP/2 itself (the `h2` crate) over the upstream connection the tcp_proxy
//! made (TLS with ALPN h2 for HBONE), sends `CONNECT <hostname>` with `headers_to_add`, waits for a
//! 2xx and then moves bytes as DATA frames; a downstream half-close becomes END_STREAM and the
//! upstream's END_STREAM a half-close of the downstream.

use bytes::Bytes;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Bytes buffered between the tunnel's stream and the tcp_proxy's copy loop.
const PIPE: usize = 64 * 1024;
/// Largest DATA frame payload we send at once.
const CHUNK: usize = 16 * 1024;

fn h2_err(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::other(e)
}

/// Pooled HTTP/2 connections that carry CONNECT streams, by (cluster, endpoint, transport socket).
#[derive(Default)]
pub struct Pool {
    conns: parking_lot::Mutex<HashMap<PoolKey, h2::client::SendRequest<Bytes>>>,
}

type PoolKey = (arcstr::ArcStr, std::net::SocketAddr, usize);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("connections", &self.conns.lock().len())
            .finish()
    }
}

/// A CONNECT stream to `authority` on the picked endpoint: on a pooled HTTP/2 connection when one
/// is open and accepts another stream, else on a new one (counted in `upstream_cx_total`).
pub async fn open(
    shared: &Arc<crate::Shared>,
    cluster: &crate::cluster::ClusterState,
    picked: &crate::cluster::Picked,
    conn: &crate::tcp::Conn,
    authority: &str,
    headers: &[(http::HeaderName, String)],
) -> io::Result<DuplexStream> {
    // Internal endpoints get a connection each (their pipe carries per-connection state).
    let key = picked.internal.is_none().then(|| {
        let socket = picked.tls.as_ref().map_or(usize::MAX, |(i, _)| *i);
        (cluster.config.name.clone(), picked.addr, socket)
    });
    let pooled = key
        .as_ref()
        .and_then(|k| shared.tunnels.conns.lock().get(k).cloned());
    // A pooled connection takes the stream only if it can right now; one that is full (the peer's
    // max_concurrent_streams) or gone is replaced by a new connection.
    let client = match pooled {
        Some(mut c) => {
            let state = std::future::poll_fn(|cx| std::task::Poll::Ready(c.poll_ready(cx))).await;
            match state {
                std::task::Poll::Ready(Ok(())) => Some(c),
                std::task::Poll::Ready(Err(_)) | std::task::Poll::Pending => None,
            }
        }
        None => None,
    };
    let client = match client {
        Some(c) => c,
        None => {
            let io = crate::tcp::connect_upstream(shared, cluster, picked, conn).await?;
            let (client, h2conn) = h2::client::Builder::new()
                .handshake::<_, Bytes>(io)
                .await
                .map_err(h2_err)?;
            tokio::spawn(async move {
                if let Err(e) = h2conn.await {
                    tracing::debug!("CONNECT tunnel connection: {e}");
                }
            });
            shared.stats.cluster(&cluster.config.name).cx_total.inc();
            if let Some(k) = key {
                shared.tunnels.conns.lock().insert(k, client.clone());
            }
            client.ready().await.map_err(h2_err)?
        }
    };
    originate(client, authority, headers).await
}

/// Sends `CONNECT authority` on `client` and, once the upstream answers 2xx, returns a byte
/// stream carried by that CONNECT stream.
async fn originate(
    mut client: h2::client::SendRequest<Bytes>,
    authority: &str,
    headers: &[(http::HeaderName, String)],
) -> io::Result<DuplexStream> {
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{authority}: {e}")))?;
    for (n, v) in headers {
        let v = http::HeaderValue::from_str(v)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        req.headers_mut().append(n.clone(), v);
    }
    let (response, send) = client.send_request(req, false).map_err(h2_err)?;
    let response = response.await.map_err(h2_err)?;
    if !response.status().is_success() {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("CONNECT {authority}: {}", response.status()),
        ));
    }
    let (ours, theirs) = tokio::io::duplex(PIPE);
    tokio::spawn(pump(theirs, send, response.into_body()));
    Ok(ours)
}

/// Moves bytes between `pipe` and an HTTP/2 stream until both directions have ended; a reset or
/// error in either direction closes everything.
async fn pump(pipe: DuplexStream, mut send: h2::SendStream<Bytes>, mut recv: h2::RecvStream) {
    let (mut r, mut w) = tokio::io::split(pipe);
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return send.send_data(Bytes::new(), true).map_err(h2_err);
            }
            let mut chunk = Bytes::copy_from_slice(&buf[..n]);
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let cap = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?
                    .map_err(h2_err)?;
                let part = chunk.split_to(cap.min(chunk.len()));
                send.send_data(part, false).map_err(h2_err)?;
            }
        }
    };
    let down = async {
        while let Some(d) = recv.data().await {
            let d = d.map_err(h2_err)?;
            let _ = recv.flow_control().release_capacity(d.len());
            w.write_all(&d).await?;
        }
        w.shutdown().await
    };
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let failed = tokio::select! {
            r = &mut up, if !up_done => { up_done = true; r.is_err() }
            r = &mut down, if !down_done => { down_done = true; r.is_err() }
        };
        if failed {
            // Dropping the stream resets it; dropping the pipe ends the tcp_proxy's copy.
            return;
        }
    }
}
