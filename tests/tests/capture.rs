// SPDX-License-Identifier: Apache-2.0
//! Listener filters and filter-chain selection on loopback, differentially (the same bootstrap to
//! Envoy and pingsail): TLS passthrough by SNI (`tls_inspector`, outbound `*:443`-style chains) and
//! protocol sniffing with a TCP fallback (`http_inspector` + `PassthroughFilterChain`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use anyhow::Result;
use pingsail_tests::envoy::Envoy;
use pingsail_tests::net::random_loopback_ip;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A server-first upstream: greets every connection with `NAME\n`, then echoes.
async fn banner(name: &'static str) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(format!("{name}\n").as_bytes()).await;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// A TLS 1.2/1.3 ClientHello with SNI and ALPN, as a browser or a sidecar would start.
fn client_hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }
    let mut exts = Vec::new();
    if let Some(sni) = sni {
        let mut b = Vec::new();
        b.extend_from_slice(&((sni.len() + 3) as u16).to_be_bytes());
        b.push(0);
        b.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        b.extend_from_slice(sni.as_bytes());
        ext(&mut exts, 0, &b);
    }
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend_from_slice(p.as_bytes());
        }
        let mut b = (list.len() as u16).to_be_bytes().to_vec();
        b.extend_from_slice(&list);
        ext(&mut exts, 16, &b);
    }
    ext(&mut exts, 10, &[0, 4, 0, 0x1d, 0, 0x17]); // supported_groups: x25519, secp256r1
    ext(&mut exts, 11, &[1, 0]); // ec_point_formats
    ext(&mut exts, 13, &[0, 4, 4, 3, 8, 4]); // signature_algorithms
    ext(&mut exts, 43, &[4, 3, 4, 3, 3]); // supported_versions: 1.3, 1.2
    let mut key = vec![0, 0x24, 0, 0x1d, 0, 0x20];
    key.extend_from_slice(&[9u8; 32]);
    ext(&mut exts, 51, &key); // key_share x25519
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.push(32);
    body.extend_from_slice(&[5u8; 32]);
    body.extend_from_slice(&[0, 6, 0x13, 0x01, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn tcp_chain(matcher: &str, cluster: &str) -> String {
    format!(
        r#"
    - filter_chain_match: {matcher}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {cluster}
          cluster: {cluster}
"#
    )
}

fn cluster(name: &str, a: SocketAddr) -> String {
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }} }} ] }} ]
"#,
        a.ip(),
        a.port()
    )
}

fn bootstrap(ip: Ipv4Addr, a: SocketAddr, b: SocketAddr, c: SocketAddr) -> String {
    let sni_chains = format!(
        "{}{}{}",
        tcp_chain("{ server_names: [a.example.com] }", "A"),
        tcp_chain("{ server_names: ['*.example.com'] }", "B"),
        tcp_chain("{ transport_protocol: tls }", "C"),
    );
    let fallback = tcp_chain("{}", "C").replacen("    - filter_chain_match: {}\n", "", 1);
    format!(
        r#"
admin: {{ address: {{ socket_address: {{ address: {ip}, port_value: 15000 }} }} }}
static_resources:
  listeners:
  - name: sni
    address: {{ socket_address: {{ address: {ip}, port_value: 18443 }} }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
    filter_chains:{sni_chains}
  - name: sniff
    address: {{ socket_address: {{ address: {ip}, port_value: 18080 }} }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
    - name: envoy.filters.listener.http_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }}
    filter_chains:
    - filter_chain_match: {{ transport_protocol: raw_buffer, application_protocols: [http/1.1, h2c] }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: sniffed_http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [ {{ match: {{ prefix: / }}, direct_response: {{ status: 200, body: {{ inline_string: "http chain" }} }} }} ]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
    default_filter_chain:
      name: PassthroughFilterChain
{fallback}
  clusters:{ca}{cb}{cc}
"#,
        ca = cluster("A", a),
        cb = cluster("B", b),
        cc = cluster("C", c),
    )
}

/// Sends `first`, returns the upstream's greeting line ("" if closed).
async fn greet(addr: SocketAddr, first: &[u8]) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(first).await?;
    let mut line = String::new();
    let mut r = BufReader::new(s);
    let _ = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
    Ok(line.trim_end().to_string())
}

async fn observe(envoy: bool) -> Result<Vec<(String, String)>> {
    let (a, b, c) = (banner("A").await?, banner("B").await?, banner("C").await?);
    let ip = random_loopback_ip();
    let boot = bootstrap(ip, a, b, c);
    let _proxy: Box<dyn std::any::Any> = if envoy {
        Box::new(Envoy::start(&boot).await?)
    } else {
        Box::new(pingsail_proxy::testing::start(&boot).await?)
    };
    let sni = SocketAddr::from((ip, 18443));
    let sniff = SocketAddr::from((ip, 18080));
    let mut out = Vec::new();
    for (label, sni_name, alpn) in [
        ("exact", Some("a.example.com"), vec!["h2"]),
        ("wildcard", Some("www.example.com"), vec![]),
        ("deeper wildcard", Some("x.y.example.com"), vec!["http/1.1"]),
        ("other name", Some("other.org"), vec![]),
        ("no sni", None, vec![]),
    ] {
        out.push((
            format!("sni {label}"),
            greet(sni, &client_hello(sni_name, &alpn)).await?,
        ));
    }
    // Not TLS at all on the SNI listener: no chain matches (every chain needs tls).
    out.push(("sni plaintext".into(), greet(sni, b"hello\n").await?));
    // Sniffing: HTTP goes to the HCM chain, anything else to the TCP fallback.
    let mut s = TcpStream::connect(sniff).await?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
    // The response is complete at `http chain` (its content-length is 10).
    let mut got = Vec::new();
    let mut buf = vec![0u8; 512];
    while !String::from_utf8_lossy(&got).ends_with("http chain") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&got).to_string();
    out.push((
        "sniff http".into(),
        format!(
            "{} {}",
            head.lines().next().unwrap_or(""),
            head.contains("http chain")
        ),
    ));
    out.push((
        "sniff opaque".into(),
        greet(sniff, b"\x00\x01binary\n").await?,
    ));
    out.push((
        "sniff tls".into(),
        greet(sniff, &client_hello(Some("a.example.com"), &[])).await?,
    ));
    Ok(out)
}

#[tokio::test]
async fn sni_and_sniffing_match_envoy() -> Result<()> {
    let envoy = observe(true).await?;
    let ours = observe(false).await?;
    // The observations themselves must be meaningful, not just equal.
    let get = |v: &[(String, String)], k: &str| {
        v.iter()
            .find(|(l, _)| l == k)
            .map(|(_, x)| x.clone())
            .unwrap()
    };
    assert_eq!(get(&envoy, "sni exact"), "A");
    assert_eq!(get(&envoy, "sni wildcard"), "B");
    assert_eq!(get(&envoy, "sni other name"), "C");
    assert_eq!(get(&envoy, "sniff opaque"), "C");
    assert_eq!(envoy, ours, "left: Envoy, right: pingsail");
    Ok(())
}
