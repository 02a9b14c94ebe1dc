// SPDX-License-Identifier: Apache-2.0
//! `transport_socket` → [`crate::tls`] contexts: `envoy.transport_sockets.tls` with
//! `DownstreamTlsContext` / `UpstreamTlsContext`, `raw_buffer`.

// istiod still sends the deprecated `match_subject_alt_names`.
#![allow(deprecated)]

use super::common::*;
use crate::tls::{Common, DownstreamTls, Material, Source, UpstreamTls};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as t;
use std::sync::Arc;

/// What a transport socket asks for.
pub enum Socket<T> {
    /// `raw_buffer` (plaintext)
    Plain,
    /// TLS
    Tls(Arc<T>),
    /// `internal_upstream` (upstream only)
    Internal(Arc<crate::config::InternalUpstream>),
}

fn typed(
    ts: &core::TransportSocket,
    path: &Path,
) -> Result<Option<envoy_types::pb::google::protobuf::Any>> {
    only(ts, path, &["name", "typed_config"], &[])?;
    use core::transport_socket::ConfigType as C;
    match &ts.config_type {
        Some(C::TypedConfig(a)) => Ok(Some(a.clone())),
        None => Ok(None),
    }
}

/// A listener chain's `transport_socket`.
pub fn downstream(ts: &core::TransportSocket, path: &Path) -> Result<Socket<DownstreamTls>> {
    let p = path.field("typed_config");
    let Some(any) = typed(ts, path)? else {
        return match ts.name.as_str() {
            "envoy.transport_sockets.raw_buffer" | "raw_buffer" => Ok(Socket::Plain),
            _ => err(&p, ErrorKind::Required),
        };
    };
    match type_name(&any.type_url) {
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" => Ok(Socket::Plain),
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext" => {
            let c: t::DownstreamTlsContext = unpack(&any, &p)?;
            only(
                &c,
                &p,
                &["common_tls_context", "require_client_certificate"],
                &[
                    ("require_sni", "mTLS issue"),
                    ("session_ticket_keys", "mTLS issue"),
                    ("session_ticket_keys_sds_secret_config", "mTLS issue"),
                    ("disable_stateless_session_resumption", "mTLS issue"),
                    ("session_timeout", "mTLS issue"),
                    ("ocsp_staple_policy", "mTLS issue"),
                    ("full_scan_certs_on_sni_mismatch", "mTLS issue"),
                ],
            )?;
            let Some(common_ctx) = &c.common_tls_context else {
                return err(&p.field("common_tls_context"), ErrorKind::Required);
            };
            let common = common(common_ctx, &p.field("common_tls_context"))?;
            if common.cert.is_none() {
                return invalid(
                    &p.field("common_tls_context"),
                    "a server context needs a certificate",
                );
            }
            let require = c
                .require_client_certificate
                .as_ref()
                .is_some_and(|b| b.value);
            Ok(Socket::Tls(Arc::new(DownstreamTls::new(common, require))))
        }
        other => err(&p, ErrorKind::UnknownType(other.to_string())),
    }
}

/// A cluster's `transport_socket`.
pub fn upstream(ts: &core::TransportSocket, path: &Path) -> Result<Socket<UpstreamTls>> {
    let p = path.field("typed_config");
    let Some(any) = typed(ts, path)? else {
        return match ts.name.as_str() {
            "envoy.transport_sockets.raw_buffer" | "raw_buffer" => Ok(Socket::Plain),
            _ => err(&p, ErrorKind::Required),
        };
    };
    match type_name(&any.type_url) {
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" => Ok(Socket::Plain),
        "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport" => {
            use envoy_types::pb::envoy::extensions::transport_sockets::internal_upstream::v3 as iu;
            let c: iu::InternalUpstreamTransport = unpack(&any, &p)?;
            only(&c, &p, &["passthrough_metadata", "transport_socket"], &[])?;
            if let Some(inner) = &c.transport_socket
                && !matches!(
                    upstream(inner, &p.field("transport_socket"))?,
                    Socket::Plain
                )
            {
                return err(&p.field("transport_socket"), ErrorKind::NotSupported);
            }
            let mut passthrough = Vec::new();
            for (i, m) in c.passthrough_metadata.iter().enumerate() {
                let mp = p.at("passthrough_metadata", i);
                only(m, &mp, &["kind", "name"], &[])?;
                use envoy_types::pb::envoy::r#type::metadata::v3::metadata_kind::Kind as K;
                let host = match m.kind.as_ref().and_then(|k| k.kind.as_ref()) {
                    Some(K::Host(_)) => true,
                    Some(K::Cluster(_)) => false,
                    Some(_) => return err(&mp.field("kind"), ErrorKind::NotSupported),
                    None => return err(&mp.field("kind"), ErrorKind::Required),
                };
                passthrough.push((m.name.clone(), host));
            }
            Ok(Socket::Internal(Arc::new(
                crate::config::InternalUpstream { passthrough },
            )))
        }
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext" => {
            let c: t::UpstreamTlsContext = unpack(&any, &p)?;
            only(
                &c,
                &p,
                &["common_tls_context", "sni"],
                &[
                    ("allow_renegotiation", "mTLS issue"),
                    ("max_session_keys", "mTLS issue"),
                    ("auto_host_sni", "mTLS issue"),
                    ("auto_sni_san_validation", "mTLS issue"),
                    ("enforce_rsa_key_usage", "mTLS issue"),
                ],
            )?;
            let common = match &c.common_tls_context {
                Some(ctx) => common(ctx, &p.field("common_tls_context"))?,
                None => Common::default(),
            };
            Ok(Socket::Tls(Arc::new(UpstreamTls::new(
                common,
                c.sni.as_str().into(),
            ))))
        }
        other => err(&p, ErrorKind::UnknownType(other.to_string())),
    }
}

fn common(c: &t::CommonTlsContext, path: &Path) -> Result<Common> {
    only(
        c,
        path,
        &[
            "tls_params",
            "tls_certificates",
            "tls_certificate_sds_secret_configs",
            "validation_context",
            "validation_context_sds_secret_config",
            "combined_validation_context",
            "alpn_protocols",
        ],
        &[],
    )?;
    let mut out = Common::default();
    if let Some(params) = &c.tls_params {
        let p = path.field("tls_params");
        only(
            params,
            &p,
            &[
                "tls_minimum_protocol_version",
                "tls_maximum_protocol_version",
                "cipher_suites",
                "ecdh_curves",
            ],
            &[],
        )?;
        use t::tls_parameters::TlsProtocol as V;
        let min = V::try_from(params.tls_minimum_protocol_version).unwrap_or(V::TlsAuto);
        let max = V::try_from(params.tls_maximum_protocol_version).unwrap_or(V::TlsAuto);
        if matches!(min, V::TlSv10 | V::TlSv11) || matches!(max, V::TlSv10 | V::TlSv11) {
            return err(&p, ErrorKind::NotSupported);
        }
        out.tls13_only = min == V::TlSv13;
        out.tls12_only = max == V::TlSv12;
        // cipher_suites / ecdh_curves: rustls negotiates only AEAD suites and modern curves (all of
        // istiod's list is among them); accepted as a restriction we already meet.
    }
    if c.tls_certificates.len() + c.tls_certificate_sds_secret_configs.len() > 1 {
        return err(path, ErrorKind::NotSupported);
    }
    if let Some(cert) = c.tls_certificates.first() {
        out.cert = Some(Source::Inline(Arc::new(tls_certificate(
            cert,
            &path.at("tls_certificates", 0),
        )?)));
    }
    if let Some(sds) = c.tls_certificate_sds_secret_configs.first() {
        out.cert = Some(sds_source(
            sds,
            &path.at("tls_certificate_sds_secret_configs", 0),
        )?);
    }
    use t::common_tls_context::ValidationContextType as VC;
    match &c.validation_context_type {
        Some(VC::ValidationContext(v)) => {
            let p = path.field("validation_context");
            let (ca, san) = validation(v, &p)?;
            out.ca = ca.map(|m| Source::Inline(Arc::new(m)));
            out.san = san;
        }
        Some(VC::ValidationContextSdsSecretConfig(s)) => {
            out.ca = Some(sds_source(
                s,
                &path.field("validation_context_sds_secret_config"),
            )?);
        }
        Some(VC::CombinedValidationContext(cv)) => {
            let p = path.field("combined_validation_context");
            only(
                cv,
                &p,
                &[
                    "default_validation_context",
                    "validation_context_sds_secret_config",
                ],
                &[],
            )?;
            if let Some(d) = &cv.default_validation_context {
                let (ca, san) = validation(d, &p.field("default_validation_context"))?;
                out.ca = ca.map(|m| Source::Inline(Arc::new(m)));
                out.san = san;
            }
            if let Some(s) = &cv.validation_context_sds_secret_config {
                out.ca = Some(sds_source(
                    s,
                    &p.field("validation_context_sds_secret_config"),
                )?);
            }
        }
        Some(_) => return err(path, ErrorKind::NotSupported),
        None => {}
    }
    out.alpn = c.alpn_protocols.iter().map(|a| a.as_str().into()).collect();
    Ok(out)
}

fn validation(
    v: &t::CertificateValidationContext,
    path: &Path,
) -> Result<(
    Option<Material>,
    Vec<pingsail_filters::matcher::StringMatcher>,
)> {
    only(
        v,
        path,
        &[
            "trusted_ca",
            "match_subject_alt_names",
            "match_typed_subject_alt_names",
        ],
        &[],
    )?;
    let ca = match &v.trusted_ca {
        Some(ds) => {
            let pem = data_source(ds, &path.field("trusted_ca"))?;
            Some(Material::Roots(
                crate::tls::pem_certs(&pem).or_else(|e| invalid(&path.field("trusted_ca"), e))?,
            ))
        }
        None => None,
    };
    let mut san = Vec::new();
    for (i, m) in v.match_subject_alt_names.iter().enumerate() {
        san.push(string_matcher(m, &path.at("match_subject_alt_names", i))?);
    }
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let p = path.at("match_typed_subject_alt_names", i);
        only(m, &p, &["san_type", "matcher"], &[])?;
        use t::subject_alt_name_matcher::SanType as S;
        match S::try_from(m.san_type) {
            Ok(S::Uri | S::Dns) => {}
            _ => return err(&p.field("san_type"), ErrorKind::NotSupported),
        }
        let Some(sm) = &m.matcher else {
            return err(&p.field("matcher"), ErrorKind::Required);
        };
        san.push(string_matcher(sm, &p.field("matcher"))?);
    }
    Ok((ca, san))
}

fn tls_certificate(c: &t::TlsCertificate, path: &Path) -> Result<Material> {
    only(c, path, &["certificate_chain", "private_key"], &[])?;
    let (Some(chain), Some(key)) = (&c.certificate_chain, &c.private_key) else {
        return err(path, ErrorKind::Required);
    };
    let chain = data_source(chain, &path.field("certificate_chain"))?;
    let key = data_source(key, &path.field("private_key"))?;
    Ok(Material::Cert {
        chain: crate::tls::pem_certs(&chain)
            .or_else(|e| invalid(&path.field("certificate_chain"), e))?,
        key: Arc::new(
            crate::tls::pem_key(&key).or_else(|e| invalid(&path.field("private_key"), e))?,
        ),
    })
}

/// A `Secret` resource (SDS or `static_resources.secrets`) as TLS material.
pub fn secret(s: &t::Secret, path: &Path) -> Result<Material> {
    use t::secret::Type;
    match &s.r#type {
        Some(Type::TlsCertificate(c)) => tls_certificate(c, &path.field("tls_certificate")),
        Some(Type::ValidationContext(v)) => {
            let (ca, _) = validation(v, &path.field("validation_context"))?;
            ca.ok_or_else(|| TranslateError {
                path: path.field("validation_context").field("trusted_ca"),
                kind: ErrorKind::Required,
            })
        }
        _ => err(path, ErrorKind::NotSupported),
    }
}

fn sds_source(s: &t::SdsSecretConfig, path: &Path) -> Result<Source> {
    only(s, path, &["name", "sds_config"], &[])?;
    if s.name.is_empty() {
        return err(&path.field("name"), ErrorKind::Required);
    }
    if let Some(cs) = &s.sds_config {
        let p = path.field("sds_config");
        only(
            cs,
            &p,
            &[
                "api_config_source",
                "ads",
                "initial_fetch_timeout",
                "resource_api_version",
            ],
            &[],
        )?;
        use core::config_source::ConfigSourceSpecifier as S;
        match &cs.config_source_specifier {
            Some(S::Ads(_)) => {}
            Some(S::ApiConfigSource(api)) => {
                let ap = p.field("api_config_source");
                only(
                    api,
                    &ap,
                    &[
                        "api_type",
                        "grpc_services",
                        "set_node_on_first_message_only",
                        "transport_api_version",
                    ],
                    &[],
                )?;
                use core::api_config_source::ApiType;
                if ApiType::try_from(api.api_type) != Ok(ApiType::Grpc) {
                    return err(&ap.field("api_type"), ErrorKind::NotSupported);
                }
            }
            _ => return err(&p, ErrorKind::NotSupported),
        }
    }
    Ok(Source::Named(s.name.as_str().into()))
}

/// The bytes of a `DataSource` (inline or a file read now).
pub fn data_source(d: &core::DataSource, path: &Path) -> Result<Vec<u8>> {
    only(d, path, &["filename", "inline_bytes", "inline_string"], &[])?;
    use core::data_source::Specifier as S;
    match &d.specifier {
        Some(S::InlineBytes(b)) => Ok(b.clone()),
        Some(S::InlineString(s)) => Ok(s.as_bytes().to_vec()),
        Some(S::Filename(f)) => {
            std::fs::read(f).or_else(|e| invalid(&path.field("filename"), format!("{f}: {e}")))
        }
        _ => err(path, ErrorKind::Required),
    }
}
