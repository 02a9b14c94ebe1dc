// SPDX-License-Identifier: Apache-2.0
//! Test support (feature `testing`): a fake istiod CA and a small PKI.
//!
//! [`FakeCa`] serves `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS on an
//! ephemeral loopback port and signs CSRs the way istiod's CA does: it requires a bearer token,
//! takes the identity from the caller (here: a configured identity, standing in for the token's
//! service account), ignores the CSR's own SANs, honours `validity_duration`, backdates
//! `not_before` by two minutes for clock skew, and answers `[leaf, intermediates..., root]`. It
//! can be switched down (connections are dropped), told to answer a gRPC error, to issue short
//! lifetimes, or to issue for a different identity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::codegen::{BoxFuture, Service};
use tonic::{Request, Response, Status};

use crate::ca::proto::{
    CREATE_CERTIFICATE_PATH, IstioCertificateRequest, IstioCertificateResponse,
};

/// Boxed error for test helpers.
pub type TestError = Box<dyn std::error::Error + Send + Sync>;

/// istiod's clock-skew backdating of `not_before`.
pub const CLOCK_SKEW: Duration = Duration::from_secs(120);
/// istiod's default maximum workload certificate lifetime (90 days).
pub const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// A root CA (O=<trust domain>, as istiod's self-signed root) with an optional intermediate.
pub struct TestPki {
    root_pem: String,
    root_issuer: Issuer<'static, KeyPair>,
    intermediate: Option<(String, Issuer<'static, KeyPair>)>,
}

fn ca_params(org: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(3650);
    p.serial_number = Some(random_serial());
    p
}

fn random_serial() -> SerialNumber {
    let mut b = rand::random::<[u8; 16]>();
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::from_slice(&b)
}

impl TestPki {
    /// A new root for `trust_domain`; with `intermediate`, leaves are signed by an intermediate.
    pub fn new(trust_domain: &str, intermediate: bool) -> Result<Self, TestError> {
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params(trust_domain);
        let root_pem = root_params.self_signed(&root_key)?.pem();
        let root_issuer = Issuer::new(root_params, root_key);
        let intermediate = if intermediate {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let params = ca_params(&format!("{trust_domain} intermediate"));
            let pem = params.signed_by(&key, &root_issuer)?.pem();
            Some((pem, Issuer::new(params, key)))
        } else {
            None
        };
        Ok(Self {
            root_pem,
            root_issuer,
            intermediate,
        })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    fn leaf_issuer(&self) -> &Issuer<'static, KeyPair> {
        self.intermediate
            .as_ref()
            .map(|(_, i)| i)
            .unwrap_or(&self.root_issuer)
    }

    /// The chain answered for a leaf: `[leaf, intermediate?, root]`.
    fn chain(&self, leaf_pem: String) -> Vec<String> {
        let mut chain = vec![leaf_pem];
        if let Some((pem, _)) = &self.intermediate {
            chain.push(pem.clone());
        }
        chain.push(self.root_pem.clone());
        chain
    }

    /// Signs a workload leaf for `identity` (a URI SAN, critical with the empty subject) over
    /// `public_key`, valid from now - [`CLOCK_SKEW`] to now + `ttl`.
    pub fn issue_leaf(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &str,
        ttl: Duration,
    ) -> Result<String, TestError> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(identity.to_owned().try_into()?)];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::try_from(CLOCK_SKEW)?;
        p.not_after = now + time::Duration::try_from(ttl)?;
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        Ok(p.signed_by(public_key, self.leaf_issuer())?.pem())
    }

    /// A fresh P-256 key and its chain for `identity`, as files would hold them:
    /// `(cert-chain.pem, key.pem, root-cert.pem)`.
    pub fn issue_files(
        &self,
        identity: &str,
        ttl: Duration,
    ) -> Result<(String, String, String), TestError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = self.issue_leaf(&key, identity, ttl)?;
        let chain = self.chain(leaf);
        let root = chain.last().cloned().unwrap_or_default();
        Ok((chain.concat(), key.serialize_pem(), root))
    }

    /// A ready [`crate::sds::WorkloadSecret`] for `identity` (fresh P-256 key), to publish on an
    /// SDS server in tests.
    pub fn workload_secret(
        &self,
        identity: &str,
        ttl: Duration,
    ) -> Result<crate::sds::WorkloadSecret, TestError> {
        let (chain, key, root) = self.issue_files(identity, ttl)?;
        Ok(crate::sds::WorkloadSecret::from_pem(chain, key, root)?)
    }

    /// The TLS side of istiod's 15012 for tests of the xDS proxy: a serving certificate for
    /// [`FAKE_CA_SERVER_NAME`], `localhost` and `127.0.0.1` signed by the root, ALPN `h2`,
    /// client certificates optional and, when presented, verified against the root.
    pub fn istiod_tls(&self) -> Result<Arc<rustls::ServerConfig>, TestError> {
        let (certs, key) =
            self.serving_identity(&[FAKE_CA_SERVER_NAME, "localhost", "127.0.0.1"])?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for der in crate::ca::pem::certs_from_pem(self.root_pem.as_bytes(), "test root")? {
            roots.add(der)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(tls))
    }

    /// A serving certificate for the CA's own TLS endpoint, signed by the root (istiod's 15012
    /// certificate is signed by the mesh root too).
    fn serving_identity(
        &self,
        names: &[&str],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TestError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        p.distinguished_name = DistinguishedName::new();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(365);
        p.serial_number = Some(random_serial());
        let cert = p.signed_by(&key, &self.root_issuer)?;
        let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?;
        Ok((vec![cert.der().clone()], key_der))
    }
}

/// What the fake CA saw in one request.
#[derive(Clone, Debug, Default)]
pub struct RecordedRequest {
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
    pub validity_duration: i64,
    pub cert_signer: Option<String>,
    pub csr_sans: Vec<String>,
}

/// Fake CA behaviour knobs; change them at any time through [`FakeCa`].
#[derive(Default)]
struct Control {
    down: AtomicBool,
    fail_status: Mutex<Option<tonic::Code>>,
    ttl_override: Mutex<Option<Duration>>,
    identity: Mutex<String>,
    requests: AtomicU64,
    issued: AtomicU64,
    connections: AtomicU64,
    last: Mutex<Option<RecordedRequest>>,
}

struct CaState {
    pki: TestPki,
    ctl: Control,
}

/// A running fake istiod CA; stops when dropped.
pub struct FakeCa {
    addr: SocketAddr,
    state: Arc<CaState>,
    task: tokio::task::JoinHandle<()>,
}

/// The TLS name the fake CA's serving certificate carries (besides `localhost` and `127.0.0.1`).
pub const FAKE_CA_SERVER_NAME: &str = "istiod.istio-system.svc";

impl FakeCa {
    /// Starts a CA for `identity` (what it puts in every leaf) on 127.0.0.1:0, trust domain
    /// `cluster.local`, leaves signed by an intermediate when `intermediate`.
    pub async fn start(identity: &str, intermediate: bool) -> Result<Self, TestError> {
        let pki = TestPki::new("cluster.local", intermediate)?;
        let (certs, key) =
            pki.serving_identity(&[FAKE_CA_SERVER_NAME, "localhost", "127.0.0.1"])?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let ctl = Control::default();
        *ctl.identity.lock() = identity.to_owned();
        let state = Arc::new(CaState { pki, ctl });
        let svc = CaService {
            state: state.clone(),
        };
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        st.ctl.connections.fetch_add(1, Ordering::Relaxed);
                        if st.ctl.down.load(Ordering::Relaxed) {
                            drop(tcp);
                            continue;
                        }
                        let acceptor = acceptor.clone();
                        let svc = svc.clone();
                        conns.spawn(async move {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                crate::h2serve::serve_h2(tls, svc).await;
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Self { addr, state, task })
    }

    /// `127.0.0.1:<port>`, for `CA_ADDR`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The root certificate (PEM): mount it as the CA root and expect it in `ROOTCA`.
    pub fn root_pem(&self) -> &str {
        self.state.pki.root_pem()
    }

    pub fn pki(&self) -> &TestPki {
        &self.state.pki
    }

    /// Down: new connections are closed at once (existing ones are not touched).
    pub fn set_down(&self, down: bool) {
        self.state.ctl.down.store(down, Ordering::Relaxed);
    }

    /// Answer every request with this gRPC status instead of a certificate.
    pub fn fail_with(&self, code: Option<tonic::Code>) {
        *self.state.ctl.fail_status.lock() = code;
    }

    /// Issue this lifetime whatever the request asks.
    pub fn set_ttl_override(&self, ttl: Option<Duration>) {
        *self.state.ctl.ttl_override.lock() = ttl;
    }

    /// The identity put in issued leaves.
    pub fn set_identity(&self, identity: &str) {
        *self.state.ctl.identity.lock() = identity.to_owned();
    }

    /// Requests that reached the service (down connections excluded).
    pub fn requests(&self) -> u64 {
        self.state.ctl.requests.load(Ordering::Relaxed)
    }

    /// Certificates issued.
    pub fn issued(&self) -> u64 {
        self.state.ctl.issued.load(Ordering::Relaxed)
    }

    /// TCP connections accepted, including those dropped while down.
    pub fn connections(&self) -> u64 {
        self.state.ctl.connections.load(Ordering::Relaxed)
    }

    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.state.ctl.last.lock().clone()
    }
}

impl Drop for FakeCa {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct CaService {
    state: Arc<CaState>,
}

impl<B> Service<http::Request<B>> for CaService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CREATE_CERTIFICATE_PATH {
            let path = req.uri().path().to_owned();
            return Box::pin(async move { Ok(Status::unimplemented(path).into_http()) });
        }
        let handler = Sign {
            state: self.state.clone(),
        };
        Box::pin(async move {
            let codec =
                tonic_prost::ProstCodec::<IstioCertificateResponse, IstioCertificateRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.unary(handler, req).await)
        })
    }
}

struct Sign {
    state: Arc<CaState>,
}

impl tonic::server::UnaryService<IstioCertificateRequest> for Sign {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<Response<IstioCertificateResponse>, Status>;

    fn call(&mut self, request: Request<IstioCertificateRequest>) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move { sign(&state, request) })
    }
}

fn sign(
    state: &CaState,
    request: Request<IstioCertificateRequest>,
) -> Result<Response<IstioCertificateResponse>, Status> {
    let ctl = &state.ctl;
    ctl.requests.fetch_add(1, Ordering::Relaxed);
    let md = request.metadata();
    let header = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let authorization = header("authorization");
    let cluster_id = header("clusterid");
    let body = request.get_ref();
    let cert_signer = body.metadata.as_ref().and_then(|m| {
        m.fields
            .get(crate::ca::proto::CERT_SIGNER_KEY)
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
    });
    let csr = CertificateSigningRequestParams::from_pem(&body.csr)
        .map_err(|e| Status::invalid_argument(format!("CSR parse error: {e}")))?;
    let csr_sans = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_owned()),
            _ => None,
        })
        .collect();
    *ctl.last.lock() = Some(RecordedRequest {
        authorization: authorization.clone(),
        cluster_id,
        validity_duration: body.validity_duration,
        cert_signer,
        csr_sans,
    });
    if let Some(code) = *ctl.fail_status.lock() {
        return Err(Status::new(code, "fake CA told to fail"));
    }
    match authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
    {
        Some(token) if !token.trim().is_empty() => {}
        _ => {
            return Err(Status::unauthenticated(
                "request authenticate failure: no bearer token",
            ));
        }
    }
    let requested = u64::try_from(body.validity_duration).unwrap_or(0);
    let ttl = match *ctl.ttl_override.lock() {
        Some(ttl) => ttl,
        None if requested == 0 => Duration::from_secs(24 * 3600),
        None => Duration::from_secs(requested),
    };
    if ttl > MAX_TTL {
        return Err(Status::invalid_argument(format!(
            "requested TTL {ttl:?} is greater than the max allowed TTL {MAX_TTL:?}"
        )));
    }
    let identity = ctl.identity.lock().clone();
    let leaf = state
        .pki
        .issue_leaf(&csr.public_key, &identity, ttl)
        .map_err(|e| Status::internal(format!("signing: {e}")))?;
    ctl.issued.fetch_add(1, Ordering::Relaxed);
    Ok(Response::new(IstioCertificateResponse {
        cert_chain: state.pki.chain(leaf),
    }))
}
