// SPDX-License-Identifier: Apache-2.0
//! The app's Kubernetes probes, rewritten by the injector to `/app-health/<container>/{livez,readyz,
//! startupz}` (and `/app-lifecycle/<container>/{prestopz,poststartz}`) on the status port and
//! described by ISTIO_KUBE_APP_PROBERS. The agent runs them against the app the way kubelet would:
//! HTTP GET (scheme, host, path, headers, timeout; redirects count as success), TCP connect, gRPC
//! health check; from 127.0.0.6 so the pod's inbound capture leaves them alone.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use super::client::{Call, within};

/// `ISTIO_KUBE_APP_PROBERS` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProberError {
    #[error("ISTIO_KUBE_APP_PROBERS is not valid JSON: {0}")]
    Json(String),
    #[error(
        "ISTIO_KUBE_APP_PROBERS: invalid path '{0}': must be /app-health/<container>/(livez|readyz|startupz) or /app-lifecycle/<container>/(prestopz|poststartz)"
    )]
    Path(String),
    #[error("ISTIO_KUBE_APP_PROBERS['{0}']: exactly one of httpGet, tcpSocket or grpc is required")]
    Kind(String),
    #[error("ISTIO_KUBE_APP_PROBERS['{path}']: the port must be a number, got {port}")]
    Port { path: String, port: String },
}

/// An int-or-string port as Kubernetes writes it; only numbers are usable here.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortValue {
    Int(i64),
    Str(String),
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpHeader {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    #[serde(default)]
    pub path: String,
    pub port: PortValue,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub scheme: String,
    #[serde(default)]
    pub http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TcpSocket {
    pub port: PortValue,
    #[serde(default)]
    pub host: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Grpc {
    pub port: i64,
    #[serde(default)]
    pub service: Option<String>,
}

/// One probe as the injector describes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Prober {
    pub http_get: Option<HttpGet>,
    pub tcp_socket: Option<TcpSocket>,
    pub grpc: Option<Grpc>,
    #[serde(default)]
    pub timeout_seconds: i64,
}

/// A validated probe.
#[derive(Debug, Clone)]
enum Kind {
    Http {
        https: bool,
        port: u16,
        path: String,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    },
    Tcp {
        port: u16,
    },
    Grpc {
        port: u16,
        service: String,
    },
}

#[derive(Debug, Clone)]
struct Probe {
    kind: Kind,
    timeout: Duration,
}

/// Every app probe by its status-port path.
#[derive(Debug, Clone, Default)]
pub struct AppProbers {
    probes: BTreeMap<String, Probe>,
    /// Where the app listens: the pod IP, as kubelet probes it (or `localhost` with
    /// REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION).
    destination: Option<IpAddr>,
    /// The source address the probes come from (127.0.0.6 / ::6).
    source: Option<IpAddr>,
}

fn valid_path(p: &str) -> bool {
    let mut it = p.split('/');
    let (Some(""), Some(kind), Some(container), Some(what), None) =
        (it.next(), it.next(), it.next(), it.next(), it.next())
    else {
        return false;
    };
    !container.is_empty()
        && matches!(
            (kind, what),
            ("app-health", "livez" | "readyz" | "startupz")
                | ("app-lifecycle", "prestopz" | "poststartz")
        )
}

fn port(path: &str, p: &PortValue) -> Result<u16, ProberError> {
    match p {
        PortValue::Int(n) => u16::try_from(*n).map_err(|_| ProberError::Port {
            path: path.into(),
            port: n.to_string(),
        }),
        PortValue::Str(s) => Err(ProberError::Port {
            path: path.into(),
            port: format!("'{s}'"),
        }),
    }
}

impl AppProbers {
    /// Parses ISTIO_KUBE_APP_PROBERS (empty: no probes). `destination` is the pod IP (None:
    /// localhost); `source` the address probes are sent from.
    pub fn parse(
        json: &str,
        destination: Option<IpAddr>,
        source: Option<IpAddr>,
    ) -> Result<Self, ProberError> {
        let mut out = AppProbers {
            probes: BTreeMap::new(),
            destination,
            source,
        };
        if json.trim().is_empty() {
            return Ok(out);
        }
        let raw: BTreeMap<String, Prober> =
            serde_json::from_str(json).map_err(|e| ProberError::Json(e.to_string()))?;
        for (path, p) in raw {
            if !valid_path(&path) {
                return Err(ProberError::Path(path));
            }
            let n = usize::from(p.http_get.is_some())
                + usize::from(p.tcp_socket.is_some())
                + usize::from(p.grpc.is_some());
            if n != 1 {
                return Err(ProberError::Kind(path));
            }
            // Kubernetes' default probe timeout is 1 s; the injector leaves it out when default.
            let timeout = Duration::from_secs(u64::try_from(p.timeout_seconds).unwrap_or(0).max(1));
            let kind = if let Some(h) = &p.http_get {
                let mut headers = Vec::new();
                for hd in &h.http_headers {
                    if let (Ok(k), Ok(v)) = (
                        http::HeaderName::from_bytes(hd.name.as_bytes()),
                        http::HeaderValue::from_str(&hd.value),
                    ) {
                        headers.push((k, v));
                    }
                }
                let path_part = if h.path.starts_with('/') {
                    h.path.clone()
                } else {
                    format!("/{}", h.path)
                };
                Kind::Http {
                    https: h.scheme.eq_ignore_ascii_case("https"),
                    port: port(&path, &h.port)?,
                    path: path_part,
                    headers,
                }
            } else if let Some(t) = &p.tcp_socket {
                Kind::Tcp {
                    port: port(&path, &t.port)?,
                }
            } else if let Some(g) = &p.grpc {
                Kind::Grpc {
                    port: u16::try_from(g.port).map_err(|_| ProberError::Port {
                        path: path.clone(),
                        port: g.port.to_string(),
                    })?,
                    service: g.service.clone().unwrap_or_default(),
                }
            } else {
                return Err(ProberError::Kind(path));
            };
            out.probes.insert(path, Probe { kind, timeout });
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// Whether `path` is an app probe path this agent serves.
    pub fn contains(&self, path: &str) -> bool {
        self.probes.contains_key(path)
    }

    fn dest(&self, port: u16) -> SocketAddr {
        SocketAddr::new(
            self.destination
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            port,
        )
    }

    /// Runs the probe at `path` for a kubelet request with `headers` (forwarded to HTTP probes;
    /// `host` is the request's Host with the status port replaced by the app's). Returns the
    /// status to answer and a body; `None` when no probe has this path.
    pub async fn run(
        &self,
        path: &str,
        host: Option<&str>,
        status_port: u16,
        headers: &http::HeaderMap,
    ) -> Option<(u16, bytes::Bytes)> {
        let probe = self.probes.get(path)?;
        Some(match &probe.kind {
            Kind::Http {
                https,
                port,
                path: app_path,
                headers: probe_headers,
            } => {
                let mut call = Call::get(self.dest(*port), app_path.clone());
                call.https = *https;
                call.timeout = Some(probe.timeout);
                call.local = self.source;
                call.max_body = 10 << 10;
                // The Host kubelet sent, with the status port swapped for the app's.
                call.host = host.map(|h| match h.rsplit_once(':') {
                    Some((name, p)) if p.parse::<u16>().ok() == Some(status_port) => {
                        format!("{name}:{port}")
                    }
                    _ => h.to_owned(),
                });
                for (k, v) in headers {
                    if k == http::header::HOST
                        || k == http::header::CONNECTION
                        || k == http::header::CONTENT_LENGTH
                        || k == http::header::TRANSFER_ENCODING
                    {
                        continue;
                    }
                    call.headers.push((k.clone(), v.clone()));
                }
                for (k, v) in probe_headers {
                    if k == http::header::HOST {
                        call.host = v.to_str().ok().map(str::to_owned);
                    } else {
                        call.headers.retain(|(n, _)| n != k);
                        call.headers.push((k.clone(), v.clone()));
                    }
                }
                match call.send().await {
                    // Kubelet counts a redirect as success; the status cannot be passed on
                    // without its Location, so it becomes 200.
                    Ok(r) if (300..400).contains(&r.status) => (200, bytes::Bytes::new()),
                    Ok(r) => (r.status, r.body),
                    Err(e) => {
                        tracing::warn!(probe = path, "app probe failed: {e}");
                        (500, bytes::Bytes::new())
                    }
                }
            }
            Kind::Tcp { port } => {
                let addr = self.dest(*port);
                match within(
                    Some(probe.timeout),
                    super::client::connect(addr, self.source),
                )
                .await
                {
                    Ok(Ok(_)) => (200, bytes::Bytes::new()),
                    Ok(Err(e)) => {
                        tracing::warn!(probe = path, "app probe failed: {e}");
                        (500, bytes::Bytes::new())
                    }
                    Err(_) => (500, bytes::Bytes::new()),
                }
            }
            Kind::Grpc { port, service } => {
                let ua = headers
                    .get(http::header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let addr = self.dest(*port);
                let res = within(
                    Some(probe.timeout),
                    grpc_health(addr, self.source, service, ua.as_deref()),
                )
                .await;
                match res {
                    Ok(Ok(true)) => (200, bytes::Bytes::new()),
                    Ok(Ok(false)) => (500, bytes::Bytes::new()),
                    Ok(Err(e)) => {
                        tracing::warn!(probe = path, "gRPC app probe failed: {e}");
                        (500, bytes::Bytes::new())
                    }
                    Err(_) => {
                        tracing::warn!(probe = path, "gRPC app probe timed out");
                        (500, bytes::Bytes::new())
                    }
                }
            }
        })
    }
}

/// `grpc.health.v1.Health/Check` over h2c: true when the answer is SERVING.
async fn grpc_health(
    addr: SocketAddr,
    source: Option<IpAddr>,
    service: &str,
    user_agent: Option<&str>,
) -> Result<bool, String> {
    use http_body_util::BodyExt;
    let tcp = super::client::connect(addr, source)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    // HealthCheckRequest { string service = 1; } in a gRPC frame.
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header(
            http::header::USER_AGENT,
            user_agent.unwrap_or("pingsail-agent"),
        )
        .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(format!("HTTP status {}", parts.status));
    }
    let collected = body.collect().await.map_err(|e| e.to_string())?;
    let trailers = collected.trailers().cloned();
    let grpc_status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if grpc_status != "0" {
        return Err(match grpc_status.as_str() {
            "12" => {
                "server does not implement the grpc health protocol (grpc.health.v1.Health)".into()
            }
            "" => "no grpc-status".into(),
            s => format!("grpc-status {s}"),
        });
    }
    let data = collected.to_bytes();
    // HealthCheckResponse { ServingStatus status = 1; } — SERVING is 1.
    let msg = data.get(5..).unwrap_or_default();
    let mut i = 0;
    let mut status = 0u64;
    while i < msg.len() {
        let tag = msg[i];
        i += 1;
        let mut v = 0u64;
        let mut shift = 0;
        while i < msg.len() {
            let b = msg[i];
            i += 1;
            v |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        if tag == 0x08 {
            status = v;
        } else if tag & 0x07 == 2 {
            i += v as usize;
        }
    }
    Ok(status == 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parses_injected_probers_and_rejects_bad_ones() {
        let p = AppProbers::parse(
            r#"{"/app-health/hello/livez":{"httpGet":{"port":80}},"/app-health/hello/readyz":{"httpGet":{"port":3333,"scheme":"HTTPS"}},"/app-lifecycle/hello/poststartz":{"tcpSocket":{"port":93}}}"#,
            None,
            None,
        )
        .unwrap();
        assert!(p.contains("/app-health/hello/livez"));
        assert!(p.contains("/app-lifecycle/hello/poststartz"));
        assert!(!p.contains("/app-health/world/livez"));
        let e = AppProbers::parse(r#"{"/bad/x/livez":{"httpGet":{"port":80}}}"#, None, None)
            .unwrap_err();
        assert!(e.to_string().contains("invalid path '/bad/x/livez'"), "{e}");
        let e = AppProbers::parse(
            r#"{"/app-health/a/livez":{"httpGet":{"port":"http"}}}"#,
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("port must be a number"), "{e}");
        let e = AppProbers::parse(r#"{"/app-health/a/livez":{}}"#, None, None).unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");
    }
}
