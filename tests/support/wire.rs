// SPDX-License-Identifier: Apache-2.0
//! Buffered HTTP/1.1 framing shared by the echo upstream and the raw client.
//!
//! Test support, not data path: this is the one place that uses `tokio::time::timeout`
//! (banned on the data path by clippy.toml in favour of `pingora_timeout`).

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Largest request/response head we accept before calling it garbage.
const MAX_HEAD: usize = 1 << 20;
/// Largest number of headers parsed in one head.
const MAX_HEADERS: usize = 256;

/// Runs `fut` with a deadline; the error names `what` so a hung test says where it hung.
#[allow(clippy::disallowed_methods)] // test support, not the data path
pub(crate) async fn with_timeout<F: Future>(d: Duration, what: &str, fut: F) -> Result<F::Output> {
    tokio::time::timeout(d, fut)
        .await
        .map_err(|_| anyhow!("timed out after {d:?} waiting for {what}"))
}

/// A parsed request line plus headers (names lowercased, order kept).
#[derive(Debug, Clone)]
pub(crate) struct RequestHead {
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) minor_version: u8,
    pub(crate) headers: Vec<(String, String)>,
}

/// A parsed status line plus headers (names lowercased, order kept).
#[derive(Debug, Clone)]
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    pub(crate) reason: String,
    pub(crate) minor_version: u8,
    pub(crate) headers: Vec<(String, String)>,
}

/// Finds all values of `name` (already lowercase) in an ordered header list.
pub(crate) fn header_values<'a>(
    headers: &'a [(String, String)],
    name: &str,
) -> impl Iterator<Item = &'a str> {
    headers
        .iter()
        .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub(crate) fn is_chunked(headers: &[(String, String)]) -> bool {
    header_values(headers, "transfer-encoding").any(|v| {
        v.rsplit(',')
            .next()
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
    })
}

pub(crate) fn content_length(headers: &[(String, String)]) -> Result<Option<usize>> {
    match header_values(headers, "content-length").next() {
        None => Ok(None),
        Some(v) => Ok(Some(
            v.trim()
                .parse()
                .with_context(|| format!("bad content-length {v:?}"))?,
        )),
    }
}

fn own_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// A TCP stream with a read buffer. Every read is bounded by `timeout` when one is set.
pub(crate) struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
    timeout: Option<Duration>,
    /// When set, every byte read from the socket is also appended here.
    transcript: Option<Vec<u8>>,
}

impl Wire {
    pub(crate) fn new(stream: TcpStream, timeout: Option<Duration>) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(4096),
            timeout,
            transcript: None,
        }
    }

    pub(crate) fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    pub(crate) fn start_transcript(&mut self) {
        self.transcript = Some(self.buf.clone());
    }

    pub(crate) fn take_transcript(&mut self) -> Vec<u8> {
        self.transcript.take().unwrap_or_default()
    }

    /// Echoes raw bytes (after an upgrade) until the peer closes; buffered bytes go first.
    pub(crate) async fn echo_raw(&mut self) -> Result<()> {
        use tokio::io::AsyncReadExt;
        if !self.buf.is_empty() {
            let pending = std::mem::take(&mut self.buf);
            self.write_all(&pending).await?;
        }
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            self.write_all(&chunk[..n]).await?;
        }
    }

    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let fut = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match self.timeout {
            Some(d) => with_timeout(d, "write", fut).await??,
            None => fut.await?,
        }
        Ok(())
    }

    /// Reads more bytes into the buffer; returns how many (0 = peer closed).
    async fn fill(&mut self) -> Result<usize> {
        let before = self.buf.len();
        self.buf.reserve(16 * 1024);
        let n = match self.timeout {
            Some(d) => with_timeout(d, "a read", self.stream.read_buf(&mut self.buf)).await??,
            None => self.stream.read_buf(&mut self.buf).await?,
        };
        if let Some(t) = self.transcript.as_mut() {
            t.extend_from_slice(&self.buf[before..]);
        }
        Ok(n)
    }

    /// Reads a request head. `Ok(None)` means the peer closed cleanly between requests.
    pub(crate) async fn read_request_head(&mut self) -> Result<Option<RequestHead>> {
        loop {
            if let Some(head) = self.parse_request_head()? {
                return Ok(Some(head));
            }
            self.check_head_size()?;
            if self.fill().await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("connection closed in the middle of a request head");
            }
        }
    }

    // Sync, so the header storage never lives across an await (keeps futures small).
    fn parse_request_head(&mut self) -> Result<Option<RequestHead>> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut storage);
        let httparse::Status::Complete(n) = req.parse(&self.buf)? else {
            return Ok(None);
        };
        let head = RequestHead {
            method: req.method.unwrap_or_default().to_owned(),
            target: req.path.unwrap_or_default().to_owned(),
            minor_version: req.version.unwrap_or(1),
            headers: own_headers(req.headers),
        };
        self.buf.drain(..n);
        Ok(Some(head))
    }

    /// Reads a response head. `Ok(None)` means the peer closed before sending any byte.
    pub(crate) async fn read_response_head(&mut self) -> Result<Option<ResponseHead>> {
        loop {
            if let Some(head) = self.parse_response_head()? {
                return Ok(Some(head));
            }
            self.check_head_size()?;
            if self.fill().await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("connection closed in the middle of a response head");
            }
        }
    }

    fn parse_response_head(&mut self) -> Result<Option<ResponseHead>> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut storage);
        let httparse::Status::Complete(n) = resp.parse(&self.buf)? else {
            return Ok(None);
        };
        let head = ResponseHead {
            status: resp.code.unwrap_or_default(),
            reason: resp.reason.unwrap_or_default().to_owned(),
            minor_version: resp.version.unwrap_or(1),
            headers: own_headers(resp.headers),
        };
        self.buf.drain(..n);
        Ok(Some(head))
    }

    fn check_head_size(&self) -> Result<()> {
        if self.buf.len() > MAX_HEAD {
            bail!("head larger than {MAX_HEAD} bytes");
        }
        Ok(())
    }

    pub(crate) async fn read_exact(&mut self, n: usize) -> Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                bail!(
                    "connection closed after {} of {n} body bytes",
                    self.buf.len()
                );
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn read_line(&mut self) -> Result<Vec<u8>> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.drain(..pos + 2).take(pos).collect();
                return Ok(line);
            }
            self.check_head_size()?;
            if self.fill().await? == 0 {
                bail!("connection closed in the middle of a chunked body");
            }
        }
    }

    /// Decodes a chunked body (trailers are read and dropped).
    pub(crate) async fn read_chunked(&mut self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line().await?;
            let line = String::from_utf8_lossy(&line);
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("bad chunk size line {line:?}"))?;
            if size == 0 {
                while !self.read_line().await?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.read_exact(size).await?);
            if !self.read_line().await?.is_empty() {
                bail!("chunk of {size} bytes not followed by CRLF");
            }
        }
    }

    /// Reads until the peer closes.
    pub(crate) async fn read_to_close(&mut self) -> Result<Vec<u8>> {
        while self.fill().await? != 0 {}
        Ok(std::mem::take(&mut self.buf))
    }
}
