// SPDX-License-Identifier: Apache-2.0
//! TLS transport sockets: Envoy's `DownstreamTlsContext` and `UpstreamTlsContext` on rustls (ring).
//!
//! Certificates and trust roots come from SDS (`default`, `ROOTCA` from the agent), from
//! `static_resources.secrets`, or inline/files. Every handshake uses the material current at that
//! moment, so a rotation applies to new connections without touching open ones.
//!
//! Downstream: our accept loop terminates TLS after filter-chain selection (the chain's context,
//! ALPN list and SAN checks) and hands the decrypted stream to Pingora as a stream of its own
//! ([`stream::TlsDownstream`]). Upstream: Pingora's connector cannot verify SPIFFE SANs or offer
//! Istio's ALPN lists, so mesh TLS is originated by an in-process CONNECT tunnel
//! ([`tunnel`]) that Pingora reaches over a Unix socket; Pingora pools the tunnel connections, so
//! one TLS connection serves many requests (HTTP/1.1 keep-alive, h2 multiplexing).

pub mod stream;
pub mod tunnel;

use arc_swap::ArcSwapOption;
use arcstr::ArcStr;
use parking_lot::Mutex;
use pingsail_filters::matcher::StringMatcher;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;

/// Certificate material.
#[derive(Debug)]
pub enum Material {
    /// a certificate chain (leaf first) with its key
    Cert {
        /// chain
        chain: Vec<CertificateDer<'static>>,
        /// key
        key: Arc<PrivateKeyDer<'static>>,
    },
    /// trusted roots
    Roots(Vec<CertificateDer<'static>>),
}

/// Where a context's certificate or trust roots come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// a named secret (SDS, or `static_resources.secrets`)
    Named(ArcStr),
    /// inline or file, loaded at translation time
    Inline(Arc<Material>),
}

/// The TLS settings shared by both directions (`CommonTlsContext`).
#[derive(Debug, Clone, Default)]
pub struct Common {
    /// `tls_certificates` / `tls_certificate_sds_secret_configs[0]`
    pub cert: Option<Source>,
    /// `validation_context` trusted CA / `validation_context_sds_secret_config` /
    /// combined validation context
    pub ca: Option<Source>,
    /// `match_subject_alt_names` / `match_typed_subject_alt_names` (URI and DNS SANs)
    pub san: Vec<StringMatcher>,
    /// `alpn_protocols`
    pub alpn: Vec<ArcStr>,
    /// `tls_params.tls_minimum_protocol_version` is 1.3
    pub tls13_only: bool,
    /// `tls_params.tls_maximum_protocol_version` is 1.2
    pub tls12_only: bool,
}

/// `DownstreamTlsContext`.
#[derive(Debug)]
pub struct DownstreamTls {
    /// common settings
    pub common: Common,
    /// `require_client_certificate`
    pub require_client_cert: bool,
    cache: ArcSwapOption<(u64, Arc<rustls::ServerConfig>)>,
    /// the same without ALPN: BoringSSL (Envoy) completes a handshake without ALPN when the
    /// client's protocols and ours do not overlap; rustls would refuse it
    cache_no_alpn: ArcSwapOption<(u64, Arc<rustls::ServerConfig>)>,
}

/// `UpstreamTlsContext`.
#[derive(Debug)]
pub struct UpstreamTls {
    /// common settings
    pub common: Common,
    /// `sni`
    pub sni: ArcStr,
    cache: ArcSwapOption<(u64, Arc<rustls::ClientConfig>)>,
}

impl DownstreamTls {
    /// A context.
    pub fn new(common: Common, require_client_cert: bool) -> Self {
        DownstreamTls {
            common,
            require_client_cert,
            cache: ArcSwapOption::empty(),
            cache_no_alpn: ArcSwapOption::empty(),
        }
    }
}

impl UpstreamTls {
    /// A context.
    pub fn new(common: Common, sni: ArcStr) -> Self {
        UpstreamTls {
            common,
            sni,
            cache: ArcSwapOption::empty(),
        }
    }
}

/// Named secrets as they arrive (SDS, static): each handshake reads the current value.
#[derive(Debug, Default)]
pub struct Secrets {
    by_name: Mutex<HashMap<ArcStr, watch::Sender<Option<Arc<Material>>>>>,
    /// bumped on every change, so cached TLS configurations know they are stale
    generation: std::sync::atomic::AtomicU64,
}

impl Secrets {
    /// Sets (or clears) a secret.
    pub fn set(&self, name: &str, value: Option<Arc<Material>>) {
        let mut map = self.by_name.lock();
        let tx = map
            .entry(name.into())
            .or_insert_with(|| watch::Sender::new(None));
        tx.send_replace(value);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The current value of a secret.
    pub fn get(&self, name: &str) -> Option<Arc<Material>> {
        self.by_name
            .lock()
            .get(name)
            .and_then(|t| t.borrow().clone())
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn resolve(&self, s: &Source) -> Option<Arc<Material>> {
        match s {
            Source::Inline(m) => Some(m.clone()),
            Source::Named(n) => self.get(n),
        }
    }
}

/// Why a TLS configuration cannot be built now.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// a secret has not arrived
    #[error("secret '{0}' is not available yet")]
    Missing(String),
    /// a secret has the wrong shape
    #[error("secret '{0}' is not a {1}")]
    Shape(String, &'static str),
    /// rustls refused the material
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// the verifier could not be built
    #[error("trust roots: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

static TLS13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
static TLS12: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];

fn versions(c: &Common) -> &'static [&'static rustls::SupportedProtocolVersion] {
    if c.tls13_only {
        &TLS13
    } else if c.tls12_only {
        &TLS12
    } else {
        rustls::ALL_VERSIONS
    }
}

fn name_of(s: &Source) -> String {
    match s {
        Source::Named(n) => n.to_string(),
        Source::Inline(_) => "(inline)".into(),
    }
}

fn cert_of(
    secrets: &Secrets,
    s: &Source,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    match secrets.resolve(s).as_deref() {
        Some(Material::Cert { chain, key }) => Ok((chain.clone(), key.clone_key())),
        Some(_) => Err(TlsError::Shape(name_of(s), "certificate")),
        None => Err(TlsError::Missing(name_of(s))),
    }
}

fn roots_of(secrets: &Secrets, s: &Source) -> Result<rustls::RootCertStore, TlsError> {
    match secrets.resolve(s).as_deref() {
        Some(Material::Roots(roots)) => {
            let mut store = rustls::RootCertStore::empty();
            for r in roots {
                store
                    .add(r.clone())
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
            }
            Ok(store)
        }
        // Istio's `default` carries the root at the end of the chain; a cert secret is not roots.
        Some(_) => Err(TlsError::Shape(name_of(s), "validation context")),
        None => Err(TlsError::Missing(name_of(s))),
    }
}

impl DownstreamTls {
    /// The server configuration for a handshake now (cached until a secret changes), for a client
    /// offering `offered` ALPN protocols.
    pub fn server_config(
        &self,
        secrets: &Secrets,
        offered: &[String],
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let overlap = self.common.alpn.is_empty()
            || offered.is_empty()
            || offered
                .iter()
                .any(|o| self.common.alpn.iter().any(|a| a == o));
        let cache = if overlap {
            &self.cache
        } else {
            &self.cache_no_alpn
        };
        let generation = secrets.generation();
        if let Some(c) = cache.load().as_ref()
            && c.0 == generation
        {
            return Ok(c.1.clone());
        }
        let Some(cert) = &self.common.cert else {
            return Err(TlsError::Missing("tls_certificates".into()));
        };
        let (chain, key) = cert_of(secrets, cert)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(&self.common))?;
        let builder = match &self.common.ca {
            Some(ca) => {
                let roots = roots_of(secrets, ca)?;
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                );
                // Envoy asks for a certificate whenever there is a validation context; it refuses a
                // client without one if required, or if SANs must be matched (checked after the
                // handshake).
                let v = if self.require_client_cert {
                    v
                } else {
                    v.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(
                    v.build().map_err(|e| TlsError::Verifier(e.to_string()))?,
                )
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key)?;
        if overlap {
            config.alpn_protocols = self
                .common
                .alpn
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect();
        }
        let config = Arc::new(config);
        cache.store(Some(Arc::new((generation, config.clone()))));
        Ok(config)
    }
}

impl UpstreamTls {
    /// The client configuration for a handshake now, offering `alpn` (cached until a secret
    /// changes; ALPN is set per connection by the caller).
    pub fn client_config(&self, secrets: &Secrets) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let generation = secrets.generation();
        if let Some(c) = self.cache.load().as_ref()
            && c.0 == generation
        {
            return Ok(c.1.clone());
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(&self.common))?;
        let builder = match &self.common.ca {
            Some(ca) => {
                let roots = Arc::new(roots_of(secrets, ca)?);
                let inner =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                        .build()
                        .map_err(|e| TlsError::Verifier(e.to_string()))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(SanVerifier {
                        inner,
                        check_hostname: self.common.san.is_empty(),
                    }))
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerifier(provider()))),
        };
        let mut config = match &self.common.cert {
            Some(cert) => {
                let (chain, key) = cert_of(secrets, cert)?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self
            .common
            .alpn
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect();
        let config = Arc::new(config);
        self.cache
            .store(Some(Arc::new((generation, config.clone()))));
        Ok(config)
    }
}

/// The subject alternative names of a certificate: URIs and DNS names.
pub fn sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, c)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(ext)) = c.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

/// A certificate's subject in RFC 2253 form (what Envoy's XFCC `Subject=` carries).
pub fn subject_rfc2253(der: &[u8]) -> String {
    use x509_parser::prelude::*;
    let Ok((_, c)) = X509Certificate::from_der(der) else {
        return String::new();
    };
    let s = c.subject().to_string();
    if s.is_empty() {
        return s;
    }
    let mut parts: Vec<&str> = s.split(", ").collect();
    parts.reverse();
    parts.join(",")
}

impl DownstreamTls {
    /// The URI SAN of our own certificate now (XFCC `By=`).
    pub fn local_uri(&self, secrets: &Secrets) -> Option<String> {
        let cert = self.common.cert.as_ref()?;
        match secrets.resolve(cert).as_deref()? {
            Material::Cert { chain, .. } => {
                sans(chain.first()?).into_iter().find(|s| s.contains("://"))
            }
            Material::Roots(_) => None,
        }
    }
}

/// Envoy's SAN check: with matchers, some SAN of the peer's leaf must match one of them.
pub fn san_ok(matchers: &[StringMatcher], leaf: Option<&CertificateDer<'_>>) -> bool {
    if matchers.is_empty() {
        return true;
    }
    let Some(leaf) = leaf else {
        return false;
    };
    sans(leaf)
        .iter()
        .any(|s| matchers.iter().any(|m| m.matches(s)))
}

/// The SPIFFE identity (first URI SAN) of a peer certificate.
pub fn spiffe_id(leaf: &CertificateDer<'_>) -> Option<String> {
    sans(leaf).into_iter().find(|s| s.starts_with("spiffe://"))
}

/// Chain validation against the mesh roots; the name check is Envoy's SAN matching (done after the
/// handshake) instead of a hostname check when SAN matchers are configured.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_hostname: bool,
}

impl rustls::client::danger::ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => Ok(v),
            // SPIFFE certificates carry no DNS name: the SAN matchers decide instead.
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_hostname => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Envoy without a validation context accepts any server certificate.
#[derive(Debug)]
struct NoVerifier(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerifier {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Parses PEM certificates.
pub fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM certificate: {e}"))
}

/// Parses a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn pem_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("bad PEM private key: {e}"))
}
