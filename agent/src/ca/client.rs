// SPDX-License-Identifier: Apache-2.0
//! The gRPC client for istiod's `IstioCertificateService/CreateCertificate` over TLS (pilot-agent
//! `caclient/providers/citadel`): trusts the mounted root certificate, sends
//! `authorization: Bearer <token>` read from the token file at every call, `ClusterID`, and any
//! `CA_HEADER_*` headers.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use parking_lot::Mutex;
use tonic::metadata::{AsciiMetadataValue, MetadataKey};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::proto::{
    CERT_SIGNER_KEY, CREATE_CERTIFICATE_PATH, IstioCertificateRequest, IstioCertificateResponse,
};

/// How to reach and authenticate to the CA.
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    /// `host:port` (CA_ADDR).
    pub address: String,
    /// PEM file with the roots trusted for the CA's serving certificate.
    pub root_cert_path: PathBuf,
    /// TLS server name to verify; default: the host part of `address`.
    pub server_name: Option<String>,
    /// The projected service-account token; its content is sent as a bearer token. A missing
    /// path (`None`) sends no `authorization`.
    pub token_path: Option<PathBuf>,
    /// `ClusterID` header value (ISTIO_META_CLUSTER_ID).
    pub cluster_id: String,
    /// Extra headers (CA_HEADER_<name>=<value>).
    pub extra_headers: Vec<(String, String)>,
    /// `metadata.CertSigner` (ISTIO_META_CERT_SIGNER).
    pub cert_signer: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl CaClientConfig {
    /// A config with defaults for everything but the address and the root.
    pub fn new(address: impl Into<String>, root_cert_path: impl Into<PathBuf>) -> Self {
        Self {
            address: address.into(),
            root_cert_path: root_cert_path.into(),
            server_name: None,
            token_path: None,
            cluster_id: String::new(),
            extra_headers: Vec::new(),
            cert_signer: String::new(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading the CA root certificate {path}: {source}")]
    ReadRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the token file {path}: {source}")]
    ReadToken {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA address {address:?} is invalid: {detail}")]
    BadAddress { address: String, detail: String },
    #[error("header {name:?} is not a valid gRPC ASCII header")]
    BadHeader { name: String },
    #[error("TLS setup for the CA: {0}")]
    Tls(String),
    #[error("create certificate at {address}: {status}")]
    Rpc {
        address: String,
        status: Box<tonic::Status>,
    },
    #[error("CA at {address} answered {n} certificate(s); a chain needs at least leaf and root")]
    EmptyChain { address: String, n: usize },
}

/// A client for one CA address. Cheap to clone. The TLS channel is built lazily and rebuilt
/// (re-reading the root file) after any failed call, as pilot-agent reconnects on error.
#[derive(Clone)]
pub struct CaClient {
    cfg: std::sync::Arc<CaClientConfig>,
    channel: std::sync::Arc<Mutex<Option<Channel>>>,
}

impl CaClient {
    pub fn new(cfg: CaClientConfig) -> Self {
        Self {
            cfg: std::sync::Arc::new(cfg),
            channel: std::sync::Arc::new(Mutex::new(None)),
        }
    }

    pub fn config(&self) -> &CaClientConfig {
        &self.cfg
    }

    fn channel(&self) -> Result<Channel, CaError> {
        if let Some(ch) = self.channel.lock().as_ref() {
            return Ok(ch.clone());
        }
        let root = std::fs::read(&self.cfg.root_cert_path).map_err(|source| CaError::ReadRoot {
            path: self.cfg.root_cert_path.clone(),
            source,
        })?;
        let address = &self.cfg.address;
        let bad = |detail: String| CaError::BadAddress {
            address: address.clone(),
            detail,
        };
        let host = match &self.cfg.server_name {
            Some(name) => name.clone(),
            None => host_of(address).ok_or_else(|| bad("expected host:port".to_owned()))?,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root))
            .domain_name(host);
        let endpoint = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| CaError::Tls(e.to_string()))?
            .connect_timeout(self.cfg.connect_timeout)
            .timeout(self.cfg.request_timeout);
        let ch = endpoint.connect_lazy();
        *self.channel.lock() = Some(ch.clone());
        Ok(ch)
    }

    fn request(
        &self,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<tonic::Request<IstioCertificateRequest>, CaError> {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            CERT_SIGNER_KEY.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(
                    self.cfg.cert_signer.clone(),
                )),
            },
        );
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(prost_types::Struct { fields }),
        });
        let md = req.metadata_mut();
        let mut insert = |name: &str, value: &str| -> Result<(), CaError> {
            let bad = || CaError::BadHeader {
                name: name.to_owned(),
            };
            let key = MetadataKey::from_str(&name.to_ascii_lowercase()).map_err(|_| bad())?;
            let val = AsciiMetadataValue::try_from(value).map_err(|_| bad())?;
            md.append(key, val);
            Ok(())
        };
        insert("ClusterID", &self.cfg.cluster_id)?;
        for (k, v) in &self.cfg.extra_headers {
            insert(k, v)?;
        }
        if let Some(path) = &self.cfg.token_path {
            let token = std::fs::read_to_string(path).map_err(|source| CaError::ReadToken {
                path: path.clone(),
                source,
            })?;
            let token = token.trim();
            if !token.is_empty() {
                insert("authorization", &format!("Bearer {token}"))?;
            }
        }
        Ok(req)
    }

    /// Sends one `CreateCertificate` and returns the answered chain (leaf first, root last).
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let result = self.call(csr_pem, ttl).await;
        if result.is_err() {
            // Rebuild the channel (and re-read the root) on the next call.
            *self.channel.lock() = None;
        }
        result
    }

    async fn call(&self, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, CaError> {
        let req = self.request(csr_pem, ttl)?;
        let mut grpc = tonic::client::Grpc::new(self.channel()?);
        let rpc_err = |status: tonic::Status| CaError::Rpc {
            address: self.cfg.address.clone(),
            status: Box::new(status),
        };
        grpc.ready()
            .await
            .map_err(|e| rpc_err(tonic::Status::unavailable(e.to_string())))?;
        let codec =
            tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
        let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE_PATH);
        let resp = grpc.unary(req, path, codec).await.map_err(rpc_err)?;
        let chain = resp.into_inner().cert_chain;
        if chain.len() <= 1 {
            return Err(CaError::EmptyChain {
                address: self.cfg.address.clone(),
                n: chain.len(),
            });
        }
        Ok(chain)
    }
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(address: &str) -> Option<String> {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h.to_owned());
    }
    let (host, _port) = address.rsplit_once(':')?;
    (!host.is_empty()).then(|| host.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn host_parts() {
        assert_eq!(
            host_of("istiod.istio-system.svc:15012").as_deref(),
            Some("istiod.istio-system.svc")
        );
        assert_eq!(host_of("[::1]:15012").as_deref(), Some("::1"));
        assert_eq!(host_of("nohost"), None);
    }

    #[test]
    fn request_carries_istio_headers_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("istio-token");
        std::fs::write(&token, "tok-123\n").unwrap();
        let mut cfg = CaClientConfig::new("istiod:15012", "/nonexistent");
        cfg.token_path = Some(token);
        cfg.cluster_id = "Kubernetes".into();
        cfg.extra_headers = vec![("X-Extra".into(), "v".into())];
        cfg.cert_signer = "signer-a".into();
        let client = CaClient::new(cfg);
        let req = client.request("CSR", Duration::from_secs(3600)).unwrap();
        assert_eq!(req.metadata().get("clusterid").unwrap(), "Kubernetes");
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer tok-123"
        );
        assert_eq!(req.metadata().get("x-extra").unwrap(), "v");
        let body = req.get_ref();
        assert_eq!(body.validity_duration, 3600);
        let signer = &body.metadata.as_ref().unwrap().fields[CERT_SIGNER_KEY];
        assert_eq!(
            signer.kind,
            Some(prost_types::value::Kind::StringValue("signer-a".into()))
        );
    }
}
