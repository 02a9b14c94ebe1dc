// SPDX-License-Identifier: Apache-2.0
//! Workload key generation and the CSR sent to the CA (pilot-agent `pkiutil.GenCSR`): an empty
//! subject and one URI SAN, the SPIFFE identity.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::PrivatePkcs8KeyDer;

/// Which key the agent generates (pilot-agent: `ECC_SIGNATURE_ALGORITHM`, `ECC_CURVE`,
/// `WORKLOAD_RSA_KEY_SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySpec {
    /// RSA with this modulus size (>= 2048), signed SHA-256 PKCS#1 v1.5.
    Rsa { bits: usize },
    /// ECDSA on P-256, SHA-256.
    EcdsaP256,
    /// ECDSA on P-384, SHA-384.
    EcdsaP384,
}

/// Istio's minimum RSA key size (`pkiutil.MinimumRsaKeySize`).
pub const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("RSA key size {0} is below the minimum {MIN_RSA_BITS}")]
    RsaTooSmall(usize),
    #[error("generating the {spec:?} key: {detail}")]
    Generate { spec: KeySpec, detail: String },
    #[error("identity {id:?} is not a valid URI SAN: {detail}")]
    BadIdentity { id: String, detail: String },
    #[error("building the CSR: {0}")]
    Csr(String),
}

/// A fresh private key and a CSR for it.
pub struct KeyAndCsr {
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub private_key_pem: String,
    pub csr_pem: String,
    /// DER SubjectPublicKeyInfo, to match against the issued leaf.
    pub spki: Vec<u8>,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("private_key_pem", &"[redacted]")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

/// Generates a key of `spec` and a CSR carrying `identity` as its only SAN (a URI).
pub fn generate(spec: KeySpec, identity: &str) -> Result<KeyAndCsr, KeyError> {
    let key = generate_key(spec)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity
        .to_owned()
        .try_into()
        .map_err(|e: rcgen::Error| KeyError::BadIdentity {
            id: identity.to_owned(),
            detail: e.to_string(),
        })?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| KeyError::Csr(e.to_string()))?;
    let csr_pem = csr.pem().map_err(|e| KeyError::Csr(e.to_string()))?;
    Ok(KeyAndCsr {
        private_key_pem: key.serialize_pem(),
        csr_pem,
        spki: rcgen::PublicKeyData::subject_public_key_info(&key),
    })
}

fn generate_key(spec: KeySpec) -> Result<KeyPair, KeyError> {
    let fail = |detail: String| KeyError::Generate { spec, detail };
    match spec {
        KeySpec::EcdsaP256 => {
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))
        }
        KeySpec::EcdsaP384 => {
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| fail(e.to_string()))
        }
        KeySpec::Rsa { bits } => {
            if bits < MIN_RSA_BITS {
                return Err(KeyError::RsaTooSmall(bits));
            }
            use rsa::pkcs8::EncodePrivateKey;
            let rsa = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits)
                .map_err(|e| fail(e.to_string()))?;
            let der = rsa.to_pkcs8_der().map_err(|e| fail(e.to_string()))?;
            let pkcs8 = PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
            KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)
                .map_err(|e| fail(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn ecdsa_csr_carries_only_the_spiffe_uri() {
        let id = "spiffe://cluster.local/ns/default/sa/sleep";
        let k = generate(KeySpec::EcdsaP256, id).unwrap();
        assert!(k.private_key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&k.csr_pem).unwrap();
        assert_eq!(parsed.params.subject_alt_names.len(), 1);
        match &parsed.params.subject_alt_names[0] {
            SanType::URI(u) => assert_eq!(u.as_str(), id),
            other => panic!("unexpected SAN {other:?}"),
        }
        assert_eq!(
            crate::ca::pem::spki_of_private_key(k.private_key_pem.as_bytes(), "k").unwrap(),
            k.spki
        );
    }

    #[test]
    fn small_rsa_is_refused() {
        assert!(matches!(
            generate(KeySpec::Rsa { bits: 1024 }, "spiffe://a/ns/b/sa/c"),
            Err(KeyError::RsaTooSmall(1024))
        ));
    }
}
