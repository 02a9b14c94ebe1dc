// SPDX-License-Identifier: Apache-2.0
//! HTTP/2 CONNECT tunnels (Istio's HBONE): origination for tcp_proxy `tunneling_config`, and the
//! byte pump the HTTP router uses when it terminates a CONNECT (proxy/src/http/connect.rs).
//!
//! Origination speaks HTTP/2 itself (the `h2` crate) over the upstream connection the tcp_proxy
//! made (TLS with ALPN h2 for HBONE), sends `CONNECT <hostname>` with `headers_to_add`, waits for a
//! 2xx and then moves bytes as DATA frames; a downstream half-close becomes END_STREAM and the
//! upstream's END_STREAM a half-close of the downstream.

use crate::tcp::Upstream;
use bytes::Bytes;
use std::io;
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

/// Opens an HTTP/2 connection over `io`, sends `CONNECT authority` and, once the upstream answers
/// 2xx, returns a byte stream carried by that CONNECT stream.
pub async fn originate(
    io: Box<dyn Upstream>,
    authority: &str,
    headers: &[(http::HeaderName, String)],
) -> io::Result<DuplexStream> {
    let (client, conn) = h2::client::Builder::new()
        .handshake::<_, Bytes>(io)
        .await
        .map_err(h2_err)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("CONNECT tunnel connection: {e}");
        }
    });
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
    let mut client = client.ready().await.map_err(h2_err)?;
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
