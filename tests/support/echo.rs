// SPDX-License-Identifier: Apache-2.0
//! In-process HTTP/1.1 echo upstream.
//!
//! Answers every request with `200` and a JSON body describing the request as it arrived:
//! `{"upstream": NAME, "method", "path" (raw request target), "headers": [[k, v], ...]
//! (in order, lowercase names), "body": string}` plus the response header `x-upstream: NAME`.
//!
//! Control headers (read from the request):
//! - `x-echo-status: N` answers with status N (no body for 1xx/204/304);
//! - `x-echo-delay-ms: N` waits N ms before answering;
//! - `x-echo-close: 1` closes the connection (FIN) without answering;
//! - `x-echo-header: k=v` adds a response header (may be repeated);
//! - `x-echo-body-size: N` replaces the JSON body with N bytes of `x`;
//! - `x-echo-force-body: 1` sends the body (with `content-length`) even for 1xx/204/304, which
//!   is a protocol violation a proxy must reject;
//! - `x-echo-trickle-ms: N` sends the head at once, then the body one byte every N ms.
//!
//! Keep-alive is the HTTP/1.1 default; request bodies may be Content-Length or chunked.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::wire::{RequestHead, Wire, content_length, header_values, is_chunked};

/// What the echo upstream saw, as carried in its JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoRecord {
    pub upstream: String,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl EchoRecord {
    /// All values of header `name` in arrival order, joined with `", "`; `None` if absent.
    pub fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = header_values(&self.headers, name).collect();
        (!values.is_empty()).then(|| values.join(", "))
    }
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    requests: AtomicU64,
    /// Every request received (for checks on traffic nobody answers to, e.g. mirrors).
    log: tokio::sync::Mutex<Vec<EchoRecord>>,
}

/// A running echo upstream; stops (with all its connections) on drop.
pub struct EchoServer {
    name: String,
    addr: SocketAddr,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(name: &str) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding echo upstream")?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(accept_loop(listener, Arc::from(name), stats.clone()));
        Ok(Self {
            name: name.to_owned(),
            addr,
            stats,
            task,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::SeqCst)
    }

    /// Requests whose head and body were fully read so far (including `x-echo-close` ones).
    /// Every request received so far, in arrival order.
    pub async fn received(&self) -> Vec<EchoRecord> {
        self.stats.log.lock().await.clone()
    }

    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, name: Arc<str>, stats: Arc<Stats>) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // e.g. EMFILE: back off a little instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        stats.connections.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        conns.spawn(serve(stream, name.clone(), stats.clone()));
        while conns.try_join_next().is_some() {}
    }
}

async fn serve(stream: TcpStream, name: Arc<str>, stats: Arc<Stats>) {
    // Errors just end the connection, like a real server would.
    let _ = serve_inner(stream, &name, &stats).await;
}

fn first<'a>(head: &'a RequestHead, name: &'a str) -> Option<&'a str> {
    header_values(&head.headers, name).next().map(str::trim)
}

fn wants_close(head: &RequestHead) -> bool {
    let conn = first(head, "connection").map(str::to_ascii_lowercase);
    match head.minor_version {
        0 => conn.as_deref() != Some("keep-alive"),
        _ => conn.is_some_and(|c| c.split(',').any(|t| t.trim() == "close")),
    }
}

async fn serve_inner(stream: TcpStream, name: &str, stats: &Stats) -> Result<()> {
    // No read timeout: idle keep-alive connections wait for the proxy; drop aborts us.
    let mut wire = Wire::new(stream, None);
    while let Some(head) = wire.read_request_head().await? {
        if first(&head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            wire.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let body = if is_chunked(&head.headers) {
            wire.read_chunked().await?
        } else {
            match content_length(&head.headers)? {
                Some(n) => wire.read_exact(n).await?,
                None => Vec::new(),
            }
        };
        stats.log.lock().await.push(EchoRecord {
            upstream: name.to_owned(),
            method: head.method.clone(),
            path: head.target.clone(),
            headers: head.headers.clone(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        stats.requests.fetch_add(1, Ordering::SeqCst);

        if first(&head, "x-echo-close") == Some("1") {
            return Ok(());
        }
        if first(&head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
            // Accept the upgrade, then echo raw bytes until the peer closes.
            let reply = format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nx-upstream: {name}\r\n\r\n"
            );
            wire.write_all(reply.as_bytes()).await?;
            return wire.echo_raw().await;
        }
        if let Some(ms) = first(&head, "x-echo-delay-ms").and_then(|v| v.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let close = wants_close(&head);
        let response = build_response(name, &head, &body, close)?;
        match first(&head, "x-echo-trickle-ms").and_then(|v| v.parse().ok()) {
            Some(ms) => {
                let split = response
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map_or(response.len(), |i| i + 4);
                wire.write_all(&response[..split]).await?;
                for byte in &response[split..] {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    wire.write_all(std::slice::from_ref(byte)).await?;
                }
            }
            None => wire.write_all(&response).await?,
        }
        if close {
            return Ok(());
        }
    }
    Ok(())
}

fn build_response(name: &str, head: &RequestHead, body: &[u8], close: bool) -> Result<Vec<u8>> {
    let status: u16 = first(head, "x-echo-status")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let payload = match first(head, "x-echo-body-size").and_then(|v| v.parse().ok()) {
        Some(n) => vec![b'x'; n],
        None => serde_json::to_vec(&EchoRecord {
            upstream: name.to_owned(),
            method: head.method.clone(),
            path: head.target.clone(),
            headers: head.headers.clone(),
            body: String::from_utf8_lossy(body).into_owned(),
        })?,
    };
    let bodyless = ((100..200).contains(&status) || status == 204 || status == 304)
        && first(head, "x-echo-force-body") != Some("1");
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    out.push_str("content-type: application/json\r\n");
    out.push_str(&format!("x-upstream: {name}\r\n"));
    for extra in header_values(&head.headers, "x-echo-header") {
        if let Some((k, v)) = extra.split_once('=') {
            out.push_str(&format!("{}: {}\r\n", k.trim(), v.trim()));
        }
    }
    if close {
        out.push_str("connection: close\r\n");
    }
    if !bodyless {
        out.push_str(&format!("content-length: {}\r\n", payload.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !bodyless && head.method != "HEAD" {
        out.extend_from_slice(&payload);
    }
    Ok(out)
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Other",
    }
}

#[cfg(test)]
mod tests;
