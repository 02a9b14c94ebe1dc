// SPDX-License-Identifier: Apache-2.0
//! Test support: a self-signed certificate, a running webhook and an HTTPS client for it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use pingsail_injector::config::Sources;
use pingsail_injector::inject::Settings;
use pingsail_injector::server::{self, ServeOptions};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub struct Certs {
    pub dir: tempfile::TempDir,
    pub cert_path: String,
    pub key_path: String,
    pub cert_der: CertificateDer<'static>,
}

pub fn make_certs() -> Certs {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("tls.crt").to_string_lossy().to_string();
    let key_path = dir.path().join("tls.key").to_string_lossy().to_string();
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    Certs {
        dir,
        cert_path,
        key_path,
        cert_der: ck.cert.der().clone(),
    }
}

pub struct Webhook {
    pub addr: SocketAddr,
    pub certs: Certs,
    pub state: Arc<server::State>,
    client: TlsConnector,
}

pub async fn start_webhook(settings: Settings, allow_on_error: bool) -> Webhook {
    let certs = make_certs();
    let opts = ServeOptions {
        tls_cert: certs.cert_path.clone(),
        tls_key: certs.key_path.clone(),
        sources: Sources::default(),
        source_files: (None, None, None),
        allow_on_error,
        reload_interval: Duration::from_millis(100),
    };
    let running = server::start("127.0.0.1:0".parse().unwrap(), opts, settings)
        .await
        .unwrap();
    let client = connector(&certs.cert_der);
    Webhook {
        addr: running.addr,
        certs,
        state: running.state,
        client,
    }
}

pub fn connector(trust: &CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Webhook {
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Reply {
        request_with(&self.client, self.addr, method, path, content_type, body).await
    }

    pub async fn post_json(&self, path: &str, body: Vec<u8>) -> Reply {
        self.request("POST", path, "application/json", body).await
    }
}

pub async fn request_with(
    client: &TlsConnector,
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Reply {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = client
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply {
        status,
        content_type,
        body,
    }
}

/// Decodes standard base64 (test side; the server encodes).
pub fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}
