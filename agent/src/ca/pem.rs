// SPDX-License-Identifier: Apache-2.0
//! PEM/X.509 helpers shared by the CA client and the file-mounted mode: parsing certificate
//! bundles, matching a private key to a leaf, validating an issued chain.

use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate, key or chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{what}: no PEM CERTIFICATE block found")]
    NoCertificate { what: String },
    #[error("{what}: invalid PEM: {detail}")]
    BadPem { what: String, detail: String },
    #[error("{what}: certificate #{index} is not valid X.509: {detail}")]
    BadCertificate {
        what: String,
        index: usize,
        detail: String,
    },
    #[error("{what}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM expected): {detail}")]
    BadKey { what: String, detail: String },
    #[error("certificate chain has {0} certificate(s); istiod answers leaf, [intermediates,] root")]
    ChainTooShort(usize),
    #[error("leaf certificate URI SANs {found:?} do not include the requested identity {expected}")]
    SanMismatch {
        expected: String,
        found: Vec<String>,
    },
    #[error("leaf certificate public key does not match the private key")]
    KeyMismatch,
    #[error("certificate chain does not verify to its root: {0}")]
    Untrusted(String),
    #[error(
        "leaf certificate is not valid now (not before {not_before:?}, not after {not_after:?})"
    )]
    NotValidNow {
        not_before: SystemTime,
        not_after: SystemTime,
    },
}

/// All certificates of a PEM bundle, in order (DER). `what` names the source in errors.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut out = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        let der = item.map_err(|e| CertError::BadPem {
            what: what.to_owned(),
            detail: e.to_string(),
        })?;
        out.push(der);
    }
    if out.is_empty() {
        return Err(CertError::NoCertificate {
            what: what.to_owned(),
        });
    }
    for (index, der) in out.iter().enumerate() {
        X509Certificate::from_der(der).map_err(|e| CertError::BadCertificate {
            what: what.to_owned(),
            index,
            detail: e.to_string(),
        })?;
    }
    Ok(out)
}

/// The DER SubjectPublicKeyInfo of a PEM private key (any of PKCS#8, PKCS#1, SEC1).
pub fn spki_of_private_key(pem: &[u8], what: &str) -> Result<Vec<u8>, CertError> {
    let bad = |detail: String| CertError::BadKey {
        what: what.to_owned(),
        detail,
    };
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| bad(e.to_string()))?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad(e.to_string()))?;
    let spki = signing
        .public_key()
        .ok_or_else(|| bad("key type cannot export its public key".to_owned()))?;
    Ok(spki.as_ref().to_vec())
}

/// Facts about a parsed leaf certificate.
#[derive(Clone, Debug)]
pub struct LeafInfo {
    pub uri_sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub spki: Vec<u8>,
}

/// Reads the URI SANs, validity window and public key of a certificate.
pub fn leaf_info(der: &CertificateDer<'_>) -> Result<LeafInfo, CertError> {
    let bad = |detail: String| CertError::BadCertificate {
        what: "leaf".to_owned(),
        index: 0,
        detail,
    };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    let mut uri_sans = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?
    {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uri_sans.push((*uri).to_owned());
            }
        }
    }
    let to_system = |secs: i64| {
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    Ok(LeafInfo {
        uri_sans,
        not_before: to_system(cert.validity().not_before.timestamp()),
        not_after: to_system(cert.validity().not_after.timestamp()),
        spki: cert.tbs_certificate.subject_pki.raw.to_vec(),
    })
}

/// A chain that passed [`validate_issued_chain`].
#[derive(Clone, Debug)]
pub struct ValidatedChain {
    /// The whole answer (leaf, intermediates, root), PEM, as pilot-agent serves it in SDS
    /// `default` (its `concatCerts` of the CA's `cert_chain`).
    pub chain_pem: String,
    /// The root (the last certificate of the answer), PEM, as served in SDS `ROOTCA`.
    pub root_pem: String,
    pub leaf: LeafInfo,
}

/// Checks what the CA answered for our CSR: at least leaf and root, the leaf carries
/// `expected_id` as a URI SAN and our public key, has not expired at `now`, and the chain
/// verifies (signatures, CA constraints, validity) up to the last certificate of the answer.
pub fn validate_issued_chain(
    answer: &[String],
    expected_id: &str,
    key_spki: &[u8],
    now: SystemTime,
) -> Result<ValidatedChain, CertError> {
    let mut ders = Vec::new();
    for (i, pem) in answer.iter().enumerate() {
        ders.extend(certs_from_pem(pem.as_bytes(), &format!("cert_chain[{i}]"))?);
    }
    if ders.len() < 2 {
        return Err(CertError::ChainTooShort(ders.len()));
    }
    let leaf_der = &ders[0];
    let leaf = leaf_info(leaf_der)?;
    if !leaf.uri_sans.iter().any(|s| s == expected_id) {
        return Err(CertError::SanMismatch {
            expected: expected_id.to_owned(),
            found: leaf.uri_sans,
        });
    }
    if leaf.spki != key_spki {
        return Err(CertError::KeyMismatch);
    }
    // A CA whose clock runs ahead issues leaves that are not valid yet by our clock; pilot-agent
    // does not check validity at all, so only expiry is enforced: the chain is verified at the
    // later of now and the leaf's not_before.
    if leaf.not_before > now {
        tracing::warn!(not_before = ?leaf.not_before, "CA issued a certificate that is not valid yet (clock skew?)");
    }
    verify_to_root(&ders, now.max(leaf.not_before))?;
    let mut chain_pem = String::new();
    for der in &ders {
        chain_pem.push_str(&to_pem(der));
    }
    let root_pem = ders.last().map(to_pem).unwrap_or_default();
    Ok(ValidatedChain {
        chain_pem,
        root_pem,
        leaf,
    })
}

/// Verifies `ders[0]` through `ders[1..n-1]` to the anchor `ders[n-1]` at `now`.
fn verify_to_root(ders: &[CertificateDer<'static>], now: SystemTime) -> Result<(), CertError> {
    let (Some(leaf), Some(root)) = (ders.first(), ders.last()) else {
        return Err(CertError::ChainTooShort(ders.len()));
    };
    let anchor = webpki::anchor_from_trusted_cert(root)
        .map_err(|e| CertError::Untrusted(format!("root: {e}")))?
        .to_owned();
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| CertError::Untrusted(format!("leaf: {e}")))?;
    let intermediates = &ders[1..ders.len() - 1];
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        intermediates,
        UnixTime::since_unix_epoch(secs),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| match e {
        webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
            match leaf_info(leaf) {
                Ok(info) => CertError::NotValidNow {
                    not_before: info.not_before,
                    not_after: info.not_after,
                },
                Err(err) => err,
            }
        }
        other => CertError::Untrusted(other.to_string()),
    })
}

/// PEM-encodes one certificate (64-column base64, trailing newline).
pub fn to_pem(der: &CertificateDer<'_>) -> String {
    let b64 = base64_encode(der.as_ref());
    let mut out = String::with_capacity(b64.len() + 70);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn garbage_is_refused_with_the_source_named() {
        let err = certs_from_pem(b"not a pem", "root-cert.pem").unwrap_err();
        assert!(err.to_string().contains("root-cert.pem"), "{err}");
        let err = spki_of_private_key(b"nope", "key.pem").unwrap_err();
        assert!(err.to_string().contains("key.pem"), "{err}");
    }
}
