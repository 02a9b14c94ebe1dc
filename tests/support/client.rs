// SPDX-License-Identifier: Apache-2.0
//! A raw HTTP/1.1 client that sends exactly what it is told (headers in order, no implicit
//! `host`), optionally over a kept-alive connection, and can send arbitrary bytes.
//! Every read is bounded (default [`DEFAULT_TIMEOUT`]) so a test never hangs.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::net::TcpStream;

use crate::wire::{Wire, content_length, header_values, is_chunked, with_timeout};

/// Bound on connect and on every single read or write.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A request to send. Headers go out exactly in this order and spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    /// When set and no `content-length`/`transfer-encoding` header is given,
    /// a `content-length` header is appended.
    pub body: Option<Vec<u8>>,
}

impl Request {
    pub fn new(method: &str, target: &str) -> Self {
        Self {
            method: method.to_owned(),
            target: target.to_owned(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn get(target: &str) -> Self {
        Self::new("GET", target)
    }

    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    #[must_use]
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// The request exactly as it goes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let framed = self.headers.iter().any(|(k, _)| {
            k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
        });
        if let (Some(body), false) = (&self.body, framed) {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if let Some(body) = &self.body {
            out.extend_from_slice(body);
        }
        out
    }
}

/// A response as received. Header names are lowercased; order is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_values(&self.headers, name).next()
    }

    /// All values of header `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        header_values(&self.headers, name).collect()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What came back after sending raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawReply {
    /// A complete, well-framed response.
    Response(Response),
    /// The peer closed before a complete response; `bytes` is whatever did arrive (maybe nothing).
    Closed { bytes: Vec<u8> },
    /// Bytes that do not parse as a response (or a read timed out); `error` says why.
    Unparseable { bytes: Vec<u8>, error: String },
}

/// One client TCP connection; reusable while the server keeps it alive.
pub struct Connection {
    wire: Wire,
    peer: SocketAddr,
    closed: bool,
}

impl Connection {
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        Self::connect_with_timeout(addr, DEFAULT_TIMEOUT).await
    }

    pub async fn connect_with_timeout(addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let stream = with_timeout(timeout, "connect", TcpStream::connect(addr))
            .await?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            wire: Wire::new(stream, Some(timeout)),
            peer: addr,
            closed: false,
        })
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Changes the bound on every later read/write (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.wire.set_timeout(Some(timeout));
    }

    /// False once the server said `connection: close` or the connection ended.
    pub fn is_reusable(&self) -> bool {
        !self.closed
    }

    /// Sends `req` and reads one final response (interim 1xx responses other than 101 are skipped).
    pub async fn send(&mut self, req: &Request) -> Result<Response> {
        if self.closed {
            bail!("connection to {} is already closed", self.peer);
        }
        self.wire.write_all(&req.to_bytes()).await?;
        self.read_response(req.method.eq_ignore_ascii_case("HEAD"))
            .await
    }

    /// Reads one response; `head_request` suppresses the body as HTTP requires after HEAD.
    pub async fn read_response(&mut self, head_request: bool) -> Result<Response> {
        let result = self.read_response_inner(head_request).await;
        if result.is_err() {
            self.closed = true;
        }
        result
    }

    async fn read_response_inner(&mut self, head_request: bool) -> Result<Response> {
        loop {
            let Some(head) = self.wire.read_response_head().await? else {
                bail!("connection closed before any response byte");
            };
            if (100..200).contains(&head.status) && head.status != 101 {
                continue;
            }
            let close_delimited;
            let body = if head_request
                || (100..200).contains(&head.status)
                || head.status == 204
                || head.status == 304
            {
                close_delimited = false;
                Vec::new()
            } else if is_chunked(&head.headers) {
                close_delimited = false;
                self.wire.read_chunked().await?
            } else if let Some(n) = content_length(&head.headers)? {
                close_delimited = false;
                self.wire.read_exact(n).await?
            } else {
                close_delimited = true;
                self.wire.read_to_close().await?
            };
            let conn = header_values(&head.headers, "connection")
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
                .join(",");
            let keep = match head.minor_version {
                0 => conn.contains("keep-alive"),
                _ => !conn.split(',').any(|t| t.trim() == "close"),
            };
            if close_delimited || !keep {
                self.closed = true;
            }
            return Ok(Response {
                status: head.status,
                reason: head.reason,
                headers: head.headers,
                body,
            });
        }
    }

    /// Sends arbitrary bytes and reports what came back: one response, a close, or garbage.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<RawReply> {
        self.wire.write_all(bytes).await?;
        self.wire.start_transcript();
        let result = self.read_response_inner(false).await;
        let transcript = self.wire.take_transcript();
        Ok(match result {
            Ok(resp) => RawReply::Response(resp),
            Err(e) => {
                self.closed = true;
                let msg = format!("{e:#}");
                if msg.contains("connection closed") || is_reset(&e) {
                    RawReply::Closed { bytes: transcript }
                } else {
                    RawReply::Unparseable {
                        bytes: transcript,
                        error: msg,
                    }
                }
            }
        })
    }
}

fn is_reset(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            )
        })
    })
}

/// One request on a fresh connection.
pub async fn send(addr: SocketAddr, req: &Request) -> Result<Response> {
    Connection::connect(addr).await?.send(req).await
}

/// Raw bytes on a fresh connection.
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Result<RawReply> {
    Connection::connect(addr).await?.send_raw(bytes).await
}
