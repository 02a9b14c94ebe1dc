// SPDX-License-Identifier: Apache-2.0
//! Our own accept loop (DESIGN.md §4): accept, sniff (HTTP/1 vs h2 preface vs opaque), pick the filter
//! chain, and hand the connection to the HTTP proxy or tcp_proxy.

use crate::Apps;
use crate::config::{ChainKind, Codec, FilterChain, Listener};
use crate::http::ConnFacts;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{GetProxyDigest, Stream};
use pingora_http::ResponseHeader;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What sniffing found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// HTTP/1.x request line
    Http1,
    /// HTTP/2 prior knowledge
    H2c,
    /// TLS ClientHello
    Tls,
    /// anything else, or nothing before the timeout
    Opaque,
}

/// Classifies the first bytes of a connection. `None` = need more bytes.
pub fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        return Some(Sniffed::Tls);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Sniffed::H2c)
        } else {
            None
        };
    }
    // An HTTP/1 request line starts with a token method followed by a space.
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() && method_len < 16 {
        return None;
    }
    if method_len > 0 && buf.get(method_len) == Some(&b' ') {
        return Some(Sniffed::Http1);
    }
    Some(Sniffed::Opaque)
}

async fn sniff(tcp: &TcpStream, timeout: Option<Duration>) -> Sniffed {
    let mut buf = [0u8; 32];
    let fut = async {
        loop {
            match tcp.peek(&mut buf).await {
                Ok(0) | Err(_) => return Sniffed::Opaque,
                Ok(n) => {
                    if let Some(s) = classify(&buf[..n]) {
                        return s;
                    }
                    if n == buf.len() {
                        return Sniffed::Opaque;
                    }
                    // More bytes are needed; wait for readability without busy-looping.
                    if tcp.readable().await.is_err() {
                        return Sniffed::Opaque;
                    }
                    tokio::task::yield_now().await;
                }
            }
        }
    };
    match timeout {
        Some(t) => pingora_timeout::timeout(t, fut)
            .await
            .unwrap_or(Sniffed::Opaque),
        None => fut.await,
    }
}

/// Envoy's filter chain match for the criteria we support: most specific destination port first, then
/// transport protocol, then application protocol.
pub fn select_chain<'a>(
    l: &'a Listener,
    dst_port: u16,
    transport: &str,
    alpn: Option<&str>,
) -> Option<&'a Arc<FilterChain>> {
    let port_ok = |c: &FilterChain| c.matcher.destination_port.is_none_or(|p| p == dst_port);
    let transport_ok = |c: &FilterChain| {
        c.matcher
            .transport_protocol
            .as_deref()
            .is_none_or(|t| t == transport)
    };
    let alpn_ok = |c: &FilterChain| {
        c.matcher.application_protocols.is_empty()
            || alpn.is_some_and(|a| c.matcher.application_protocols.iter().any(|x| x == a))
    };
    let score = |c: &FilterChain| {
        (c.matcher.destination_port.is_some() as u8) * 4
            + (c.matcher.transport_protocol.is_some() as u8) * 2
            + (!c.matcher.application_protocols.is_empty() as u8)
    };
    l.chains
        .iter()
        .filter(|c| port_ok(c) && transport_ok(c) && alpn_ok(c))
        .max_by_key(|c| score(c))
        .or(l.default_chain.as_ref())
}

/// Binds a listener socket (SO_REUSEADDR, as Envoy does).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts connections for `listener` until `shutdown` flips.
pub async fn serve(
    apps: Arc<Apps>,
    listener: Arc<Listener>,
    socket: TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            r = socket.accept() => r,
            _ = stop.changed() => return,
        };
        let (tcp, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(listener = %listener.name, "accept failed: {e}");
                // Back off on resource exhaustion (EMFILE) instead of spinning.
                pingora_timeout::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let apps = apps.clone();
        let listener = listener.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            handle(apps, listener, tcp, remote, shutdown).await;
        });
    }
}

async fn handle(
    apps: Arc<Apps>,
    listener: Arc<Listener>,
    tcp: TcpStream,
    remote: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let local = tcp.local_addr().unwrap_or(listener.address);
    let needs_sniff = listener.sniff_http
        || listener
            .chains
            .iter()
            .chain(listener.default_chain.iter())
            .any(|c| matches!(&c.kind, ChainKind::Http(h) if h.codec == Codec::Auto));
    let sniffed = if needs_sniff {
        sniff(&tcp, listener.sniff_timeout).await
    } else {
        Sniffed::Opaque
    };
    let transport = if sniffed == Sniffed::Tls {
        "tls"
    } else {
        "raw_buffer"
    };
    let alpn = if listener.sniff_http {
        match sniffed {
            Sniffed::Http1 => Some("http/1.1"),
            Sniffed::H2c => Some("h2c"),
            _ => None,
        }
    } else {
        None
    };
    let Some(chain) = select_chain(&listener, local.port(), transport, alpn).cloned() else {
        tracing::debug!(listener = %listener.name, %remote, "no matching filter chain; closing");
        return;
    };
    let conn = crate::authz::ConnView {
        remote,
        local,
        sni: "",
        peer_principal: None,
    };
    if !crate::authz::network_allows(&chain.network_rbac, &apps.shared.stats, conn) {
        return;
    }
    match &chain.kind {
        ChainKind::Tcp(t) => crate::tcp::proxy(&apps.shared, t.clone(), tcp, None).await,
        ChainKind::Http(hcm) => {
            let h2 = match hcm.codec {
                Codec::Http2 => true,
                Codec::Http1 => false,
                Codec::Auto => sniffed == Sniffed::H2c,
            };
            let facts = Arc::new(ConnFacts {
                hcm: hcm.clone(),
                stats: apps.shared.stats.http(&hcm.stat_prefix),
                remote,
                local,
                original_dst: None,
                peer_principal: None,
            });
            let mut stream = L4Stream::from(tcp);
            let header = match ResponseHeader::build(200, Some(0)) {
                Ok(h) => Box::new(h),
                Err(_) => return,
            };
            stream.set_proxy_digest(ProxyDigest::new(header, Some(Box::new(facts))));
            let stream: Stream = Box::new(stream);
            let app = if h2 { &apps.h2 } else { &apps.h1 };
            app.process_new(stream, &shutdown).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(
        name: &str,
        port: Option<u16>,
        transport: Option<&str>,
        alpn: &[&str],
    ) -> Arc<FilterChain> {
        use crate::config::{ChainMatch, TcpProxy};
        Arc::new(FilterChain {
            name: name.into(),
            matcher: ChainMatch {
                destination_port: port,
                transport_protocol: transport.map(Into::into),
                application_protocols: alpn.iter().map(|a| (*a).into()).collect(),
            },
            kind: ChainKind::Tcp(Arc::new(TcpProxy {
                stat_prefix: "x".into(),
                clusters: vec![],
                total_weight: 0,
                idle_timeout: None,
                access_logs: vec![],
            })),
            network_rbac: vec![],
        })
    }

    /// Envoy narrows by destination port first, then transport protocol, then application protocol:
    /// a port-specific chain beats an application-protocol match on a port-less chain (seen with
    /// Envoy 1.40 in the differential suite).
    #[test]
    fn chain_match_precedence() {
        let l = Listener {
            name: "l".into(),
            address: "127.0.0.1:1".parse().unwrap(),
            bind_to_port: true,
            use_original_dst: false,
            chains: vec![
                chain("http1", None, None, &["http/1.1"]),
                chain("port", Some(9080), Some("raw_buffer"), &[]),
                chain("tls", None, Some("tls"), &[]),
            ],
            default_chain: Some(chain("default", None, None, &[])),
            sniff_http: true,
            sniff_timeout: None,
        };
        let pick = |port, transport, alpn| {
            select_chain(&l, port, transport, alpn).map(|c| c.name.to_string())
        };
        assert_eq!(
            pick(9080, "raw_buffer", Some("http/1.1")).as_deref(),
            Some("port")
        );
        assert_eq!(
            pick(9081, "raw_buffer", Some("http/1.1")).as_deref(),
            Some("http1")
        );
        assert_eq!(pick(9081, "tls", None).as_deref(), Some("tls"));
        assert_eq!(pick(9081, "raw_buffer", None).as_deref(), Some("default"));
    }

    #[test]
    fn classification() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"POST /"), Some(Sniffed::Http1));
        assert_eq!(classify(b"PRI * HTTP/2.0"), None);
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::H2c));
        assert_eq!(classify(&[0x16, 3, 1]), Some(Sniffed::Tls));
        assert_eq!(classify(b"\x00\x01binary"), Some(Sniffed::Opaque));
    }
}
