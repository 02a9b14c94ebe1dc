// SPDX-License-Identifier: Apache-2.0
//! A small HTTP/1.1 client for the agent's local calls: the proxy's admin (readiness stats, drain),
//! the proxy's and the app's metrics, and the app's HTTP probes. One request per connection, as
//! kubelet and pilot-agent's probe transport do.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// Why a local request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS to {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP to {addr}: {detail}")]
    Http { addr: SocketAddr, detail: String },
    #[error("request to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("invalid request: {0}")]
    Request(String),
}

/// Runs `fut` for at most `after` (`None`: no limit).
pub async fn within<T>(
    after: Option<Duration>,
    fut: impl Future<Output = T>,
) -> Result<T, Duration> {
    match after {
        None => Ok(fut.await),
        Some(d) => {
            tokio::select! {
                v = fut => Ok(v),
                _ = tokio::time::sleep(d) => Err(d),
            }
        }
    }
}

/// Connects to `addr`, from `local` (an IP, port chosen by the kernel) when given.
pub async fn connect(
    addr: SocketAddr,
    local: Option<std::net::IpAddr>,
) -> Result<TcpStream, ClientError> {
    let err = |source| ClientError::Connect { addr, source };
    let Some(ip) = local.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) else {
        return TcpStream::connect(addr).await.map_err(err);
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    // The source address is a preference (127.0.0.6, so the pod's capture leaves probes alone):
    // where it cannot be bound, connect from wherever the kernel picks.
    if sock.bind(SocketAddr::new(ip, 0)).is_err() {
        return TcpStream::connect(addr).await.map_err(err);
    }
    sock.connect(addr).await.map_err(err)
}

/// What came back.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// One request.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: http::Method,
    pub addr: SocketAddr,
    /// path and query
    pub target: String,
    /// `Host` (default: the address)
    pub host: Option<String>,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub body: Bytes,
    /// connect + response head + body
    pub timeout: Option<Duration>,
    /// TLS without verification (kubelet's HTTPS probes)
    pub https: bool,
    /// source IP preference
    pub local: Option<std::net::IpAddr>,
    /// largest body kept
    pub max_body: usize,
}

impl Call {
    pub fn get(addr: SocketAddr, target: impl Into<String>) -> Self {
        Call {
            method: http::Method::GET,
            addr,
            target: target.into(),
            host: None,
            headers: Vec::new(),
            body: Bytes::new(),
            timeout: Some(Duration::from_secs(3)),
            https: false,
            local: None,
            max_body: 64 << 20,
        }
    }

    pub fn post(addr: SocketAddr, target: impl Into<String>) -> Self {
        Call {
            method: http::Method::POST,
            ..Call::get(addr, target)
        }
    }

    /// Sends the request and reads the whole (size-limited) response.
    pub async fn send(self) -> Result<Reply, ClientError> {
        let addr = self.addr;
        let timeout = self.timeout;
        match within(timeout, self.exchange()).await {
            Ok(r) => r,
            Err(after) => Err(ClientError::Timeout { addr, after }),
        }
    }

    async fn exchange(self) -> Result<Reply, ClientError> {
        let addr = self.addr;
        let tcp = connect(addr, self.local).await?;
        let _ = tcp.set_nodelay(true);
        let host = self.host.clone().unwrap_or_else(|| addr.to_string());
        let mut req = http::Request::builder()
            .method(self.method.clone())
            .uri(&self.target)
            .header(http::header::HOST, &host);
        let has_ua = self
            .headers
            .iter()
            .any(|(k, _)| k == http::header::USER_AGENT);
        for (k, v) in &self.headers {
            if k != http::header::HOST {
                req = req.header(k, v);
            }
        }
        if !has_ua {
            req = req.header(http::header::USER_AGENT, "pingsail-agent");
        }
        let req = req
            .body(Full::new(self.body.clone()))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let http_err = |e: hyper::Error| ClientError::Http {
            addr,
            detail: e.to_string(),
        };
        let resp = if self.https {
            let tls = tls_connector()
                .map_err(|e| ClientError::Tls {
                    addr,
                    source: std::io::Error::other(e),
                })?
                .connect(server_name(&host), tcp)
                .await
                .map_err(|source| ClientError::Tls { addr, source })?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(http_err)?;
            tokio::spawn(conn);
            send.send_request(req).await.map_err(http_err)?
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(http_err)?;
            tokio::spawn(conn);
            send.send_request(req).await.map_err(http_err)?
        };
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, self.max_body)
            .collect()
            .await
            .map_err(|e| ClientError::Http {
                addr,
                detail: e.to_string(),
            })?
            .to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

fn server_name(host: &str) -> rustls_pki_types::ServerName<'static> {
    let name = host
        .rsplit_once(':')
        .filter(|(h, p)| !h.ends_with(']') || p.parse::<u16>().is_ok())
        .map_or(host, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    rustls_pki_types::ServerName::try_from(name.to_owned())
        .unwrap_or_else(|_| rustls_pki_types::ServerName::from(std::net::Ipv4Addr::LOCALHOST))
}

/// Kubelet does not verify an app's certificate for HTTPS probes; neither do we.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, rustls::Error> {
    #[derive(Debug)]
    struct NoVerify(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
