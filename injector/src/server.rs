// SPDX-License-Identifier: Apache-2.0
//! The HTTPS webhook: `POST /inject` (and `/inject/<k>/<v>...`), `/healthz`, `/readyz`, `/metrics`.
//! TLS certificate and key are read from files and re-read when they change; so are the injection
//! config files.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::admission::{self, Outcome};
use crate::config::{self, Sources};
use crate::inject::Settings;
use crate::metrics::Metrics;

/// Largest AdmissionReview accepted (Kubernetes' own request limit is 3 MiB; Istio allows 6 MiB).
pub const MAX_BODY: usize = 6 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCert { path: String },
    #[error("{path}: bad private key: {err}")]
    Key { path: String, err: String },
}

/// Loads a certificate chain and key from PEM files.
pub fn load_certified_key(cert: &str, key: &str) -> Result<CertifiedKey, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|err| TlsError::Read {
        path: cert.into(),
        err,
    })?;
    let key_pem = std::fs::read(key).map_err(|err| TlsError::Read {
        path: key.into(),
        err,
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCert { path: cert.into() });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key {
        path: key.into(),
        err: e.to_string(),
    })?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| TlsError::Key {
            path: key.into(),
            err: e.to_string(),
        })?;
    Ok(CertifiedKey::new(certs, signing))
}

/// Serves whatever certificate was loaded last.
#[derive(Debug)]
pub struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Where the server gets its inputs, and how it behaves on injection errors.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub tls_cert: String,
    pub tls_key: String,
    pub sources: Sources,
    /// Files the sources were read from (re-read on change): (config, values, mesh).
    pub source_files: (Option<String>, Option<String>, Option<String>),
    pub allow_on_error: bool,
    pub reload_interval: Duration,
}

pub struct State {
    pub settings: ArcSwap<Settings>,
    pub metrics: Metrics,
    pub allow_on_error: bool,
}

pub struct Running {
    pub addr: SocketAddr,
    pub state: Arc<State>,
}

/// What we compare to notice a change: the file's bytes (mtimes can repeat within a clock tick,
/// and Kubernetes swaps Secret volumes through symlinks).
fn fingerprint(p: &str) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

/// Binds and starts serving; returns once the socket is listening.
pub async fn start(
    listen: SocketAddr,
    opts: ServeOptions,
    settings: Settings,
) -> anyhow::Result<Running> {
    // Fingerprints of what is loaded now, taken before anything can change the files.
    let seen = (fingerprint(&opts.tls_cert), fingerprint(&opts.tls_key));
    let cfg_seen: Vec<Option<Vec<u8>>> =
        config_files(&opts).iter().map(|f| fingerprint(f)).collect();
    let cert = load_certified_key(&opts.tls_cert, &opts.tls_key)?;
    let resolver = Arc::new(ReloadingCert {
        current: ArcSwap::from_pointee(cert),
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State {
        settings: ArcSwap::from_pointee(settings),
        metrics: Metrics::default(),
        allow_on_error: opts.allow_on_error,
    });
    tokio::spawn(watch(opts, seen, cfg_seen, resolver, state.clone()));
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let st = st.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let svc = service_fn(move |req| handle(st.clone(), req));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
                    tracing::debug!(%peer, error = %e, "connection ended with error");
                }
            });
        }
    });
    Ok(Running { addr, state })
}

/// Plain-HTTP monitoring listener: `/metrics`, `/healthz`, `/readyz`.
pub async fn start_monitoring(listen: SocketAddr, state: Arc<State>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let st = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(st.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn config_files(opts: &ServeOptions) -> Vec<String> {
    [
        opts.source_files.0.clone(),
        opts.source_files.1.clone(),
        opts.source_files.2.clone(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Polls the certificate and config files and swaps in new versions when they change.
async fn watch(
    opts: ServeOptions,
    mut tls_seen: (Option<Vec<u8>>, Option<Vec<u8>>),
    mut cfg_seen: Vec<Option<Vec<u8>>>,
    resolver: Arc<ReloadingCert>,
    state: Arc<State>,
) {
    let files: Vec<String> = [
        opts.source_files.0.clone(),
        opts.source_files.1.clone(),
        opts.source_files.2.clone(),
    ]
    .into_iter()
    .flatten()
    .collect();
    loop {
        tokio::time::sleep(opts.reload_interval).await;
        let now = (fingerprint(&opts.tls_cert), fingerprint(&opts.tls_key));
        if now != tls_seen {
            match load_certified_key(&opts.tls_cert, &opts.tls_key) {
                Ok(ck) => {
                    resolver.current.store(Arc::new(ck));
                    tls_seen = now;
                    tracing::info!("reloaded TLS certificate");
                }
                // A half-written pair: keep serving the old one and retry next tick.
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate reload failed; keeping the previous one")
                }
            }
        }
        let now_cfg: Vec<Option<Vec<u8>>> = files.iter().map(|f| fingerprint(f)).collect();
        if now_cfg != cfg_seen {
            let read = |p: &Option<String>| p.as_ref().map(|p| config::read_file(p)).transpose();
            let rebuilt = (|| -> Result<Settings, config::ConfigError> {
                let mut src = opts.sources.clone();
                src.config = read(&opts.source_files.0)?.or(src.config);
                src.values = read(&opts.source_files.1)?.or(src.values);
                src.mesh = read(&opts.source_files.2)?.or(src.mesh);
                config::build_settings(&src)
            })();
            match rebuilt {
                Ok(s) => {
                    state.settings.store(Arc::new(s));
                    cfg_seen = now_cfg;
                    tracing::info!("reloaded injection configuration");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "injection configuration reload failed; keeping the previous one")
                }
            }
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => text(StatusCode::OK, "ready\n"),
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, state.metrics.render());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::POST, p) if p == "/inject" || p.starts_with("/inject/") => {
            inject(&state, req, p.to_string()).await
        }
        (_, "/inject") => text(StatusCode::METHOD_NOT_ALLOWED, "only POST is supported\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(resp)
}

async fn inject(state: &State, req: Request<Incoming>, path: String) -> Response<Full<Bytes>> {
    let t0 = Instant::now();
    state.metrics.requests.inc();
    let ct = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            state.metrics.bad_requests.inc();
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            tracing::warn!(path, error = %e, "could not read request body");
            return if too_big {
                text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body larger than {MAX_BODY} bytes\n"),
                )
            } else {
                text(
                    StatusCode::BAD_REQUEST,
                    format!("could not read body: {e}\n"),
                )
            };
        }
    };
    if body.is_empty() {
        state.metrics.bad_requests.inc();
        return text(StatusCode::BAD_REQUEST, "no body found\n");
    }
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime != "application/json" {
        state.metrics.bad_requests.inc();
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid Content-Type, want `application/json`\n",
        );
    }
    let settings = state.settings.load_full();
    let result = admission::review(&settings, &body, &path, state.allow_on_error);
    let elapsed = t0.elapsed();
    state.metrics.latency.observe(elapsed.as_secs_f64());
    match result {
        Ok(r) => {
            match &r.outcome {
                Outcome::Injected => {
                    state.metrics.injected.inc();
                    tracing::info!(pod = %r.pod_name, path, micros = elapsed.as_micros() as u64, "injected");
                }
                Outcome::Skipped(why) => {
                    state.metrics.skipped.inc();
                    tracing::info!(pod = %r.pod_name, reason = %why, "skipping injection");
                }
                Outcome::Failed { message, allowed } => {
                    state.metrics.failed.inc();
                    if !allowed {
                        state.metrics.denied.inc();
                    }
                    tracing::error!(pod = %r.pod_name, allowed, error = %message, "injection failed");
                }
            }
            let mut resp = Response::new(Full::new(Bytes::from(r.body)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => {
            state.metrics.bad_requests.inc();
            tracing::warn!(path, error = %e, "bad AdmissionReview");
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}
