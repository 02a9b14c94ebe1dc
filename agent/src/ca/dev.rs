// SPDX-License-Identifier: Apache-2.0
//! A development CA: a self-signed mesh root (O=<trust domain>, like istiod's self-signed root),
//! optionally an intermediate, issuing SPIFFE workload certificates the way istiod's CA shapes
//! them (URI SAN only, empty subject, server+client auth, `not_before` backdated for clock skew).
//!
//! The standalone mesh (`pingsail-agent standalone`) issues its workloads' identities from it;
//! the test support's fake istiod CA signs CSRs with it.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// What can go wrong issuing from the development CA.
#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    #[error("dev CA: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("dev CA: lifetime out of range: {0}")]
    Lifetime(#[from] time::error::ConversionRange),
    #[error("dev CA: key: {0}")]
    Key(#[from] rustls_pki_types::pem::Error),
    #[error("dev CA: issued certificate: {0}")]
    Cert(#[from] crate::ca::pem::CertError),
}

/// istiod's clock-skew backdating of `not_before`.
pub const CLOCK_SKEW: Duration = Duration::from_secs(120);
/// istiod's default maximum workload certificate lifetime (90 days).
pub const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// A root CA (O=<trust domain>, as istiod's self-signed root) with an optional intermediate.
pub struct DevCa {
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

impl DevCa {
    /// A new root for `trust_domain`; with `intermediate`, leaves are signed by an intermediate.
    pub fn new(trust_domain: &str, intermediate: bool) -> Result<Self, DevCaError> {
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
    pub fn chain(&self, leaf_pem: String) -> Vec<String> {
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
    ) -> Result<String, DevCaError> {
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
    ) -> Result<(String, String, String), DevCaError> {
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
    ) -> Result<crate::sds::WorkloadSecret, DevCaError> {
        let (chain, key, root) = self.issue_files(identity, ttl)?;
        Ok(crate::sds::WorkloadSecret::from_pem(chain, key, root)?)
    }

    /// A serving certificate for the CA's own TLS endpoint, signed by the root (istiod's 15012
    /// certificate is signed by the mesh root too).
    pub fn serving_identity(
        &self,
        names: &[&str],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), DevCaError> {
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

    /// The TLS side of istiod's 15012 for tests of the xDS proxy: a serving certificate for
    /// [`crate::testing::FAKE_CA_SERVER_NAME`], `localhost` and `127.0.0.1` signed by the root,
    /// ALPN `h2`, client certificates optional and, when presented, verified against the root.
    #[cfg(feature = "testing")]
    pub fn istiod_tls(
        &self,
    ) -> Result<std::sync::Arc<rustls::ServerConfig>, crate::testing::TestError> {
        use std::sync::Arc;
        let (certs, key) = self.serving_identity(&[
            crate::testing::FAKE_CA_SERVER_NAME,
            "localhost",
            "127.0.0.1",
        ])?;
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
}
