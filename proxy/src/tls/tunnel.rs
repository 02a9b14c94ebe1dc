// SPDX-License-Identifier: Apache-2.0
//! Upstream TLS origination for the HTTP path: an in-process CONNECT tunnel on a Unix socket.
//!
//! Pingora dials `HttpPeer::new_proxy(<socket>, ip, port, …)` with headers naming the cluster, the
//! transport socket and the HTTP version; we dial TCP, do the TLS handshake with the cluster's
//! `UpstreamTlsContext` (SPIFFE SAN matching, Istio's ALPN lists, the workload certificate current at
//! that moment) and answer `200` — then bytes flow. Pingora pools the tunnel connection like any
//! other, so one TLS connection carries many requests. It runs on the data-plane runtime, so it adds
//! no thread hop. (Pingora's custom L4 connector with a virtual socket would avoid the Unix-socket
//! copy, but Pingora 0.9.1 never reuses a pooled virtual socket — see docs/PINGORA-CHANGES.md.)

use super::{Secrets, UpstreamTls, san_ok};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// CONNECT header: cluster name.
pub const H_CLUSTER: &str = "x-pingsail-cluster";
/// CONNECT header: transport socket index (`transport_socket_matches` position, or `default`).
pub const H_SOCKET: &str = "x-pingsail-socket";
/// CONNECT header: `1` or `2` (the HTTP version Pingora will speak inside).
pub const H_HTTP: &str = "x-pingsail-http";
/// CONNECT header: local address to bind (`upstream_bind_config`).
pub const H_BIND: &str = "x-pingsail-bind";
/// CONNECT header: connect timeout in ms.
pub const H_TIMEOUT: &str = "x-pingsail-connect-timeout-ms";

/// CONNECT header: the internal listener (`envoy_internal_address.server_listener_name`); with
/// it the tunnel connects to that listener instead of dialling TCP.
pub const H_INTERNAL: &str = "x-pingsail-internal-listener";
/// CONNECT header: the internal endpoint's `endpoint_id`.
pub const H_ENDPOINT: &str = "x-pingsail-endpoint-id";

/// Finds the TLS context for (cluster, socket index).
pub type Lookup = Arc<dyn Fn(&str, &str) -> Option<Arc<UpstreamTls>> + Send + Sync>;

/// Opens a connection to (cluster, internal listener, endpoint id).
pub type InternalConnect =
    Arc<dyn Fn(&str, &str, &str) -> std::io::Result<tokio::io::DuplexStream> + Send + Sync>;

/// A running tunnel; the socket is removed on drop.
pub struct Tunnel {
    path: PathBuf,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Tunnel {
    /// Binds a fresh socket under the temp directory and serves on `rt`.
    pub fn start(
        rt: &tokio::runtime::Handle,
        secrets: Arc<Secrets>,
        lookup: Lookup,
        internal: InternalConnect,
    ) -> std::io::Result<Arc<Tunnel>> {
        sweep_stale(&std::env::temp_dir());
        let path = std::env::temp_dir().join(format!(
            "pingsail-tls-{}-{:x}.sock",
            std::process::id(),
            rand::random::<u64>()
        ));
        let listener = {
            let _g = rt.enter();
            UnixListener::bind(&path)?
        };
        // Only this user may ask us to originate TLS with the workload's identity.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        rt.spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    pingora_timeout::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (secrets, lookup, internal) =
                    (secrets.clone(), lookup.clone(), internal.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(s, &secrets, &lookup, &internal).await {
                        tracing::debug!("upstream TLS: {e}");
                    }
                });
            }
        });
        Ok(Arc::new(Tunnel { path }))
    }

    /// The socket path for `HttpPeer::new_proxy`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes tunnel sockets left by proxies that died without cleaning up (SIGKILL): those whose
/// process id no longer exists.
fn sweep_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("pingsail-tls-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

async fn read_head(s: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Err(std::io::Error::other("bad CONNECT request"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

/// The ALPN list for one connection: Istio's lists when the context speaks Istio's protocol
/// (what the `istio.alpn` filter makes Envoy offer), else the context's own, with `h2` for HTTP/2.
pub fn alpn_for(ctx: &UpstreamTls, http2: Option<bool>) -> Vec<Vec<u8>> {
    let istio = ctx.common.alpn.iter().any(|a| a == "istio");
    let list: Vec<&str> = match (istio, http2) {
        (true, Some(true)) => vec!["istio-h2", "istio", "h2"],
        (true, Some(false)) => vec!["istio-http/1.1", "istio", "http/1.1"],
        (false, Some(true)) if ctx.common.alpn.is_empty() => vec!["h2"],
        _ => ctx.common.alpn.iter().map(|a| a.as_str()).collect(),
    };
    list.into_iter().map(|a| a.as_bytes().to_vec()).collect()
}

/// Connects and does the TLS handshake with `ctx`; checks the SAN matchers.
pub async fn connect_tls(
    ctx: &UpstreamTls,
    secrets: &Secrets,
    addr: SocketAddr,
    bind: Option<std::net::IpAddr>,
    timeout: Duration,
    http2: Option<bool>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let base = ctx
        .client_config(secrets)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut config = (*base).clone();
    config.alpn_protocols = alpn_for(ctx, http2);
    let connect = async {
        let tcp = match bind {
            None => TcpStream::connect(addr).await?,
            Some(src) => {
                let sock = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                sock.bind(SocketAddr::new(src, 0))?;
                sock.connect(addr).await?
            }
        };
        let _ = tcp.set_nodelay(true);
        let name = if ctx.sni.is_empty() {
            rustls::pki_types::ServerName::IpAddress(addr.ip().into())
        } else {
            rustls::pki_types::ServerName::try_from(ctx.sni.to_string())
                .map_err(|e| std::io::Error::other(format!("bad SNI {}: {e}", ctx.sni)))?
        };
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
        if !san_ok(&ctx.common.san, leaf) {
            return Err(std::io::Error::other(
                "upstream certificate does not match the expected subject alt names",
            ));
        }
        Ok(tls)
    };
    pingora_timeout::timeout(timeout, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS connect timeout"))?
}

async fn serve(
    mut s: UnixStream,
    secrets: &Secrets,
    lookup: &Lookup,
    internal: &InternalConnect,
) -> std::io::Result<()> {
    let head = read_head(&mut s).await?;
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&head)
        .map_err(|e| std::io::Error::other(format!("CONNECT: {e}")))?;
    let target = req.path.unwrap_or("");
    let addr: SocketAddr = target
        .parse()
        .or_else(|_| {
            // IPv6 targets arrive as `[ip]:port` or `ip:port`.
            let (h, p) = target.rsplit_once(':').ok_or(())?;
            let ip: std::net::IpAddr = h
                .trim_matches(|c| c == '[' || c == ']')
                .parse()
                .map_err(|_| ())?;
            Ok::<_, ()>(SocketAddr::new(ip, p.parse().map_err(|_| ())?))
        })
        .map_err(|_| std::io::Error::other(format!("CONNECT target {target}")))?;
    let get = |n: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(n))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let (cluster, socket) = (get(H_CLUSTER).unwrap_or(""), get(H_SOCKET).unwrap_or(""));
    if let Some(listener) = get(H_INTERNAL) {
        return match internal(cluster, listener, get(H_ENDPOINT).unwrap_or("")) {
            Ok(pipe) => established(s, pipe).await,
            Err(e) => refuse(s, e).await,
        };
    }
    let http2 = get(H_HTTP).map(|v| v == "2");
    let bind = get(H_BIND).and_then(|b| b.parse().ok());
    let timeout = get(H_TIMEOUT)
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(5), Duration::from_millis);
    let Some(ctx) = lookup(cluster, socket) else {
        let e = format!("no TLS context for cluster '{cluster}' socket '{socket}'");
        return refuse(s, std::io::Error::other(e)).await;
    };
    match connect_tls(&ctx, secrets, addr, bind, timeout, http2).await {
        Ok(tls) => established(s, tls).await,
        Err(e) => refuse(s, e).await,
    }
}

/// Answers the CONNECT with 503 and reports `e`.
async fn refuse(mut s: UnixStream, e: std::io::Error) -> std::io::Result<()> {
    s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
        .await?;
    Err(e)
}

/// Answers the CONNECT with 200 and moves bytes until both sides are done.
async fn established<U>(mut s: UnixStream, mut upstream: U) -> std::io::Result<()>
where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await?;
    let _ = tokio::io::copy_bidirectional(&mut s, &mut upstream).await;
    Ok(())
}
