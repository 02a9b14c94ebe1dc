// SPDX-License-Identifier: Apache-2.0
//! A gRPC authorization service (`envoy.service.auth.v3.Authorization/Check`) for the ext_authz
//! tests. It decides on the checked request's path (HTTP) or destination port (TCP) and reports
//! what it was sent: an allowed request carries `x-check`, a compact JSON summary of the
//! `CheckRequest` with the values that differ between two runs masked (ports, stream ids, times,
//! request ids, the per-side loopback address).
//!
//! | path contains | answer |
//! | --- | --- |
//! | `/deny` | `PERMISSION_DENIED` with a denied response: 401, headers, body |
//! | `/bare-deny` | `PERMISSION_DENIED`, no HTTP response |
//! | `/grpc-error` | the call fails with `UNAVAILABLE` |
//! | `/error-response` | `UNAVAILABLE` status with an `error_response` (503, header, body) |
//! | `/slow` | OK after 2 s |
//! | `/bad-meta` | OK, dynamic metadata `verdict: bad` |
//! | anything else | OK: sets, appends, removes headers and query parameters, adds response headers |
//!
//! For TCP (no HTTP attributes) it denies a destination port ending in 1 and allows the rest.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderValue, HeaderValueOption, QueryParameter, address,
    header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use serde_json::json;

/// The running service; dropping it does not stop it (it lives as long as the runtime).
pub struct GrpcAuthz {
    addr: SocketAddr,
}

impl GrpcAuthz {
    /// Starts the service on an ephemeral port of 127.0.0.1.
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let svc = AuthorizationServer::new(Service);
                // gRPC is HTTP/2 only.
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(io),
                        hyper_util::service::TowerToHyperService::new(svc),
                    )
                    .await;
                });
            }
        });
        Ok(Self { addr })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

struct Service;

fn header(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    }
}

fn status(code: i32, message: &str) -> Option<rpc::Status> {
    Some(rpc::Status {
        code,
        message: message.into(),
        details: vec![],
    })
}

fn string_struct(pairs: &[(&str, &str)]) -> Struct {
    Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    Value {
                        kind: Some(Kind::StringValue((*v).to_owned())),
                    },
                )
            })
            .collect(),
    }
}

/// A socket address with the port masked and the per-side loopback address (127.x.y.z other
/// than 127.0.0.1) replaced by `side`.
fn mask_address(a: Option<&Address>) -> serde_json::Value {
    let Some(Address {
        address: Some(address::Address::SocketAddress(sa)),
    }) = a
    else {
        return json!(format!("{a:?}"));
    };
    let ip = if sa.address.starts_with("127.") && sa.address != "127.0.0.1" {
        "side"
    } else {
        sa.address.as_str()
    };
    let port = match &sa.port_specifier {
        Some(_) => "*",
        None => "none",
    };
    json!(format!("{ip}:{port}"))
}

/// What can be compared between two PKIs of a URL-encoded PEM certificate: its first 40 and last
/// 32 characters, and whether it decodes to one PEM certificate.
fn certificate_shape(c: &str) -> String {
    if c.is_empty() {
        return String::new();
    }
    let bytes = c.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = c
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            decoded.push(v);
            i += 3;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let pem = String::from_utf8_lossy(&decoded);
    let valid = pem.starts_with("-----BEGIN CERTIFICATE-----\n")
        && pem.ends_with("-----END CERTIFICATE-----\n")
        && pem.lines().all(|l| {
            l.starts_with("-----")
                || l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
        });
    // The PEM armour only: what follows it (the DER length) differs between two certificates of
    // the same shape (ECDSA signatures vary in length), and each run issues new ones.
    let head: String = c.chars().take(32).collect();
    let tail: String = c
        .chars()
        .skip(c.chars().count().saturating_sub(32))
        .collect();
    format!("{head}…{tail} valid_pem={valid}")
}

fn struct_json(s: &Struct) -> serde_json::Value {
    fn value(v: &Value) -> serde_json::Value {
        match &v.kind {
            Some(Kind::StringValue(s)) => json!(s),
            Some(Kind::NumberValue(n)) => json!(n),
            Some(Kind::BoolValue(b)) => json!(b),
            Some(Kind::StructValue(s)) => struct_json(s),
            Some(Kind::ListValue(l)) => l.values.iter().map(value).collect(),
            Some(Kind::NullValue(_)) | None => serde_json::Value::Null,
        }
    }
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The compact summary sent back in `x-check`.
fn summary(req: &CheckRequest) -> String {
    let Some(a) = &req.attributes else {
        return "no attributes".into();
    };
    let peer = |p: &Option<envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer>| {
        p.as_ref().map_or(serde_json::Value::Null, |p| {
            json!({
                "address": mask_address(p.address.as_ref()),
                "service": p.service,
                "labels": p.labels.iter().collect::<BTreeMap<_, _>>(),
                "principal": p.principal,
                "certificate": certificate_shape(&p.certificate),
            })
        })
    };
    let http = a.request.as_ref().and_then(|r| r.http.as_ref()).map(|h| {
        let headers: BTreeMap<&String, &str> = h
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k,
                    if k == "x-request-id" {
                        "<masked>"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        let header_map: Vec<(String, String)> = h
            .header_map
            .as_ref()
            .map(|m| {
                m.headers
                    .iter()
                    .map(|hv| {
                        (
                            hv.key.clone(),
                            String::from_utf8_lossy(&hv.raw_value).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "id": if h.id.is_empty() { "" } else { "<present>" },
            "method": h.method,
            "headers": headers,
            "header_map": header_map,
            "path": h.path,
            "host": h.host,
            "scheme": h.scheme,
            "query": h.query,
            "fragment": h.fragment,
            "size": h.size,
            "protocol": h.protocol,
            "body": h.body,
            "raw_body": String::from_utf8_lossy(&h.raw_body),
        })
    });
    json!({
        "source": peer(&a.source),
        "destination": peer(&a.destination),
        "time": a.request.as_ref().map(|r| r.time.is_some()),
        "http": http,
        "context_extensions": a.context_extensions.iter().collect::<BTreeMap<_, _>>(),
        "metadata_context": a.metadata_context.as_ref().map(|m| {
            m.filter_metadata
                .iter()
                .map(|(k, v)| (k.clone(), struct_json(v)))
                .collect::<BTreeMap<_, _>>()
        }),
        "route_metadata_context": a.route_metadata_context.is_some(),
        "tls_session": a.tls_session.as_ref().map(|t| t.sni.clone()),
    })
    .to_string()
}

fn ok_response(req: &CheckRequest, path: &str) -> CheckResponse {
    use HeaderAppendAction as A;
    let mut headers = vec![
        header("x-authz-user", "alice", A::OverwriteIfExistsOrAdd),
        header("x-authz-append", "added", A::AppendIfExistsOrAdd),
        header("x-existing", "replaced", A::OverwriteIfExistsOrAdd),
        header("x-only-if-absent", "authz", A::AddIfAbsent),
        header("x-only-if-present", "authz", A::OverwriteIfExists),
    ];
    #[allow(deprecated)]
    headers.push(HeaderValueOption {
        append: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
        ..header("x-authz-append2", "added", A::AppendIfExistsOrAdd)
    });
    headers.push(header("x-check", &summary(req), A::OverwriteIfExistsOrAdd));
    let verdict = if path.contains("/bad-meta") {
        "bad"
    } else {
        "good"
    };
    CheckResponse {
        status: status(0, ""),
        dynamic_metadata: Some(string_struct(&[("verdict", verdict), ("user", "alice")])),
        http_response: Some(check_response::HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove: vec!["x-remove-me".into()],
            response_headers_to_add: vec![header(
                "x-authz-response",
                "added",
                A::AppendIfExistsOrAdd,
            )],
            query_parameters_to_set: vec![QueryParameter {
                key: "added".into(),
                value: "1".into(),
            }],
            query_parameters_to_remove: vec!["drop".into()],
            ..Default::default()
        })),
    }
}

fn denied(status_code: i32, headers: Vec<HeaderValueOption>, body: &str) -> DeniedHttpResponse {
    DeniedHttpResponse {
        status: Some(HttpStatus { code: status_code }),
        headers,
        body: body.into(),
    }
}

#[tonic::async_trait]
impl Authorization for Service {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let req = request.into_inner();
        let attrs = req.attributes.as_ref();
        let http = attrs
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let Some(http) = http else {
            // TCP: decide on the destination port.
            let port = attrs
                .and_then(|a| a.destination.as_ref())
                .and_then(|d| d.address.as_ref())
                .and_then(|a| match &a.address {
                    Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
                        Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => Some(p),
                        _ => None,
                    },
                    _ => None,
                })
                .unwrap_or(0);
            let code = if port % 10 == 1 { 7 } else { 0 };
            return Ok(tonic::Response::new(CheckResponse {
                status: status(code, ""),
                ..Default::default()
            }));
        };
        let path = http.path.clone();
        use HeaderAppendAction as A;
        let response = if path.contains("/bare-deny") {
            CheckResponse {
                status: status(7, "denied"),
                ..Default::default()
            }
        } else if path.contains("/deny") {
            CheckResponse {
                status: status(7, "denied"),
                dynamic_metadata: Some(string_struct(&[("verdict", "denied")])),
                http_response: Some(check_response::HttpResponse::DeniedResponse(denied(
                    401,
                    vec![
                        header("x-authz-reason", "nope", A::OverwriteIfExistsOrAdd),
                        header("www-authenticate", "Custom", A::OverwriteIfExistsOrAdd),
                        header("content-type", "text/plain", A::OverwriteIfExistsOrAdd),
                    ],
                    "denied by grpc authz",
                ))),
            }
        } else if path.contains("/grpc-error") {
            return Err(tonic::Status::unavailable("authz is down"));
        } else if path.contains("/error-response") {
            CheckResponse {
                status: status(14, "unavailable"),
                http_response: Some(check_response::HttpResponse::ErrorResponse(denied(
                    503,
                    vec![header(
                        "x-authz-reason",
                        "broken",
                        A::OverwriteIfExistsOrAdd,
                    )],
                    "authz error",
                ))),
                ..Default::default()
            }
        } else {
            if path.contains("/slow") {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            ok_response(&req, &path)
        };
        Ok(tonic::Response::new(response))
    }
}
