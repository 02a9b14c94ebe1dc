// SPDX-License-Identifier: Apache-2.0
//! Status server cases beyond tests/tests/agent_status.rs: HTTPS app probes (kubelet does not
//! verify the app's certificate) and several scrape targets (`prometheus.istio.io/scrape-targets`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use pingsail_agent::lifecycle::Lifecycle;
use pingsail_agent::status::client::Call;
use pingsail_agent::status::{StatusConfig, StatusServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn start(cfg: StatusConfig) -> SocketAddr {
    let (srv, l) = StatusServer::bind(cfg, Lifecycle::new(), None)
        .await
        .unwrap();
    let port = srv.port();
    tokio::spawn(srv.serve(l));
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An HTTPS server with a self-signed certificate for another name, answering `secure`.
async fn https_app() -> u16 {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["not-this-host.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nsecure",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

async fn metrics_app(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn https_probe_skips_certificate_verification() {
    let port = https_app().await;
    let addr = start(StatusConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        with_proxy: false,
        pod_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        app_probers: format!(
            r#"{{"/app-health/web/readyz":{{"httpGet":{{"path":"/","port":{port},"scheme":"HTTPS"}}}}}}"#
        ),
        ..StatusConfig::new()
    })
    .await;
    let r = Call::get(addr, "/app-health/web/readyz")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"secure");
}

#[tokio::test]
async fn every_scrape_target_is_merged() {
    let a = metrics_app("# TYPE a_total counter\na_total 1\n").await;
    let b = metrics_app("# TYPE b gauge\nb 2\n# TYPE a_total counter\na_total 5\n").await;
    let dead = SocketAddr::from(([127, 0, 0, 1], 1));
    let addr = start(StatusConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        proxy_admin: dead,
        proxy_prometheus: dead,
        prometheus_annotations: Some(format!(
            r#"{{"scrape":"true","path":"/metrics","port":"{a}","targets":[{{"port":"{a}","path":"/metrics"}},{{"port":"{b}","path":"/custom"}}]}}"#
        )),
        ..StatusConfig::new()
    })
    .await;
    let r = Call::get(addr, "/stats/prometheus").send().await.unwrap();
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains("# TYPE a_total counter\na_total 1\n"),
        "{text}"
    );
    assert!(
        !text.contains("a_total 5"),
        "the first target's series wins: {text}"
    );
    assert!(text.contains("# TYPE b gauge\nb 2\n"), "{text}");
    assert_eq!(text.matches("# TYPE a_total").count(), 1);
}

#[tokio::test]
async fn bad_probers_and_annotations_are_reported_at_start() {
    for (probers, annotations, want) in [
        (
            r#"{"/healthz/x":{"httpGet":{"port":1}}}"#,
            None,
            "invalid path",
        ),
        ("not json", None, "not valid JSON"),
        (
            "",
            Some("{"),
            "ISTIO_PROMETHEUS_ANNOTATIONS is not valid JSON",
        ),
        (
            "",
            Some(r#"{"port":"http"}"#),
            "port 'http' is not a number",
        ),
    ] {
        let err = StatusServer::bind(
            StatusConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                app_probers: probers.into(),
                prometheus_annotations: annotations.map(Into::into),
                ..StatusConfig::new()
            },
            Lifecycle::new(),
            None,
        )
        .await
        .err()
        .expect("accepted a bad configuration");
        assert!(err.to_string().contains(want), "{err}");
    }
}
