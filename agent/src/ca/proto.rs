// SPDX-License-Identifier: Apache-2.0
//! istiod's certificate service, `istio.v1.auth.IstioCertificateService` (istio/api
//! `security/v1alpha1/ca.proto`). The two messages are tiny, so they are declared here with prost's
//! derive instead of generated (no protoc needed); field numbers follow the proto.

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested certificate lifetime, in seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Optional metadata; the agent sets `CertSigner` (possibly empty), as pilot-agent does.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM-encoded certificates: leaf first, then intermediates, the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The fully-qualified gRPC service name.
pub const SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";
/// The HTTP/2 path of `CreateCertificate`.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The metadata key pilot-agent uses for the cert signer (`security.CertSigner`).
pub const CERT_SIGNER_KEY: &str = "CertSigner";
