// SPDX-License-Identifier: Apache-2.0
//! Dialing istiod as pilot-agent does (`buildUpstreamClientDialOpts`): TLS trusting the mounted
//! root, the workload certificate as client certificate when there is one, the bearer token and
//! the `ClusterID` / `XDS_HEADER_*` headers on the stream.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::metadata::{AsciiMetadataValue, MetadataKey, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::XdsProxyConfig;
use crate::sds::SecretReceiver;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("discovery address {address:?} is invalid: {detail}")]
    BadAddress { address: String, detail: String },
    #[error("header {name:?} is not a valid gRPC ASCII header")]
    BadHeader { name: String },
    #[error("reading istiod's root certificate {path}: {source}")]
    ReadRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the token file {path}: {source}")]
    ReadToken {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup for istiod: {0}")]
    Tls(String),
    #[error("connecting to istiod at {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("opening the xDS stream to istiod at {address}: {status}")]
    Stream {
        address: String,
        status: Box<tonic::Status>,
    },
}

pub(super) struct Upstream {
    cfg: Arc<XdsProxyConfig>,
    server_name: String,
    headers: Vec<(MetadataKey<tonic::metadata::Ascii>, AsciiMetadataValue)>,
    secrets: Option<SecretReceiver>,
}

impl Upstream {
    pub(super) fn new(
        cfg: &XdsProxyConfig,
        secrets: Option<SecretReceiver>,
    ) -> Result<Self, UpstreamError> {
        let address = &cfg.discovery_address;
        let bad = |detail: &str| UpstreamError::BadAddress {
            address: address.clone(),
            detail: detail.to_owned(),
        };
        let host = host_of(address).ok_or_else(|| bad("expected host:port"))?;
        let server_name = cfg.server_name.clone().unwrap_or(host);
        let mut headers = vec![header("ClusterID", &cfg.cluster_id)?];
        for (k, v) in &cfg.extra_headers {
            headers.push(header(k, v)?);
        }
        Endpoint::from_shared(format!("http://{address}")).map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            cfg: Arc::new(cfg.clone()),
            server_name,
            headers,
            secrets,
        })
    }

    pub(super) fn address(&self) -> &str {
        &self.cfg.discovery_address
    }

    fn endpoint(&self) -> Result<Endpoint, UpstreamError> {
        let address = &self.cfg.discovery_address;
        let scheme = if self.cfg.root_cert_path.is_some() {
            "https"
        } else {
            "http"
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| UpstreamError::BadAddress {
                address: address.clone(),
                detail: e.to_string(),
            })?
            .connect_timeout(self.cfg.connect_timeout)
            .http2_keep_alive_interval(self.cfg.keepalive_interval)
            .keep_alive_timeout(self.cfg.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if let Some(root_path) = &self.cfg.root_cert_path {
            // Re-read at every dial: the root may be rotated under us.
            let root = std::fs::read(root_path).map_err(|source| UpstreamError::ReadRoot {
                path: root_path.clone(),
                source,
            })?;
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name(self.server_name.clone());
            let secret = self.secrets.as_ref().and_then(|s| s.borrow().clone());
            if let Some(secret) = secret {
                tls = tls.identity(Identity::from_pem(
                    secret.cert_chain_pem.clone(),
                    secret.private_key_pem.clone(),
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        }
        Ok(endpoint)
    }

    /// A fresh connection (one per downstream stream, as pilot-agent dials).
    pub(super) async fn connect(&self) -> Result<Channel, UpstreamError> {
        self.endpoint()?
            .connect()
            .await
            .map_err(|e| UpstreamError::Connect {
                address: self.cfg.discovery_address.clone(),
                detail: error_chain(&e),
            })
    }

    fn decorate(&self, md: &mut MetadataMap) -> Result<(), UpstreamError> {
        for (k, v) in &self.headers {
            md.append(k.clone(), v.clone());
        }
        if let Some(path) = &self.cfg.token_path {
            let token =
                std::fs::read_to_string(path).map_err(|source| UpstreamError::ReadToken {
                    path: path.clone(),
                    source,
                })?;
            let token = token.trim();
            if !token.is_empty() {
                let (k, v) = header("authorization", &format!("Bearer {token}"))?;
                md.insert(k, v);
            }
        }
        Ok(())
    }

    /// Opens the bidirectional stream at `path` carrying `requests`.
    pub(super) async fn open<Req, Resp, S>(
        &self,
        channel: Channel,
        requests: S,
        path: &'static str,
    ) -> Result<tonic::Streaming<Resp>, UpstreamError>
    where
        Req: prost::Message + Send + 'static,
        Resp: prost::Message + Default + Send + 'static,
        S: Stream<Item = Req> + Send + 'static,
    {
        let mut req = tonic::Request::new(requests);
        self.decorate(req.metadata_mut())?;
        let failed = |status: tonic::Status| UpstreamError::Stream {
            address: self.cfg.discovery_address.clone(),
            status: Box::new(status),
        };
        let mut grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        grpc.ready()
            .await
            .map_err(|e| failed(tonic::Status::unavailable(e.to_string())))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let resp = grpc
            .streaming(req, http::uri::PathAndQuery::from_static(path), codec)
            .await
            .map_err(failed)?;
        Ok(resp.into_inner())
    }
}

fn header(
    name: &str,
    value: &str,
) -> Result<(MetadataKey<tonic::metadata::Ascii>, AsciiMetadataValue), UpstreamError> {
    let bad = || UpstreamError::BadHeader {
        name: name.to_owned(),
    };
    let key = MetadataKey::from_str(&name.to_ascii_lowercase()).map_err(|_| bad())?;
    let val = AsciiMetadataValue::try_from(value).map_err(|_| bad())?;
    Ok((key, val))
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(address: &str) -> Option<String> {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h.to_owned());
    }
    let (host, port) = address.rsplit_once(':')?;
    (!host.is_empty() && port.parse::<u16>().is_ok()).then(|| host.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn headers_token_and_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("istio-token");
        std::fs::write(&token, "tok-9\n").unwrap();
        let mut cfg = XdsProxyConfig::new("/x", "istiod.istio-system.svc:15012");
        cfg.token_path = Some(token);
        cfg.extra_headers = vec![("X-Foo".into(), "bar".into())];
        let up = Upstream::new(&cfg, None).unwrap();
        assert_eq!(up.server_name, "istiod.istio-system.svc");
        let mut md = MetadataMap::new();
        up.decorate(&mut md).unwrap();
        assert_eq!(md.get("clusterid").unwrap(), "Kubernetes");
        assert_eq!(md.get("authorization").unwrap(), "Bearer tok-9");
        assert_eq!(md.get("x-foo").unwrap(), "bar");
    }

    #[test]
    fn rejects_bad_addresses_and_headers() {
        let cfg = XdsProxyConfig::new("/x", "istiod-without-port");
        assert!(matches!(
            Upstream::new(&cfg, None),
            Err(UpstreamError::BadAddress { .. })
        ));
        let mut cfg = XdsProxyConfig::new("/x", "istiod:15012");
        cfg.extra_headers = vec![("bad header".into(), "v".into())];
        assert!(matches!(
            Upstream::new(&cfg, None),
            Err(UpstreamError::BadHeader { .. })
        ));
    }
}
