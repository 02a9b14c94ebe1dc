// SPDX-License-Identifier: Apache-2.0
//! `pod-app`: application stand-ins for the pod tests (run inside network namespaces).
//!
//! * `http NAME ADDR...` — HTTP/1.1 server (keep-alive): every request gets 200 with headers
//!   `x-served-by: NAME`, `x-peer: <peer>`, `x-local: <local>` and body `NAME <method> <target>`.
//! * `echo NAME ADDR...` — client-first TCP: reads one line, answers `NAME got=<line> peer=<peer>`.
//! * `send ADDR TEXT` — connects, sends `TEXT\n`, prints the line it gets back (exit 1 on failure).
//! * `tls ADDR SNI CERT KEY CA SAN ALPN TEXT` — an Istio-style mTLS client: handshakes offering the
//!   comma-separated `ALPN` list with the PEM `CERT`/`KEY` (`-` for none), verifies the server's
//!   chain against `CA` and its URI SAN against `SAN`, sends `TEXT` (`\r`/`\n` escapes decoded),
//!   prints `alpn=<negotiated|->` and then everything it reads until the peer closes (exit 1 when
//!   the handshake fails).
//!
//! Listeners print `listening <addr>` once per address when bound (the readiness signal).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some(mode @ ("http" | "echo")) if args.len() >= 3 => {
            listen(mode == "http", &args[1], &args[2..])
        }
        Some("send") if args.len() == 3 => send(&args[1], &args[2]),
        Some("tls") if args.len() == 9 => tls(&args[1..]),
        _ => Err("usage: pod-app http|echo NAME ADDR... | send ADDR TEXT \
             | tls ADDR SNI CERT KEY CA SAN ALPN TEXT"
            .into()),
    };
    if let Err(e) = r {
        eprintln!("pod-app: {e}");
        std::process::exit(1);
    }
}

fn canon(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn listen(http: bool, name: &str, addrs: &[String]) -> Result<(), String> {
    let mut handles = Vec::new();
    for a in addrs {
        let addr: SocketAddr = a.parse().map_err(|e| format!("{a}: {e}"))?;
        let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
        println!("listening {}", l.local_addr().map_err(|e| e.to_string())?);
        let name = name.to_string();
        handles.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || {
                    let _ = if http {
                        serve_http(&name, s)
                    } else {
                        serve_echo(&name, s)
                    };
                });
            }
        }));
    }
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn serve_echo(name: &str, s: TcpStream) -> std::io::Result<()> {
    let peer = canon(s.peer_addr()?);
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut s = s;
    writeln!(s, "{name} got={} peer={peer}", line.trim_end())
}

fn serve_http(name: &str, s: TcpStream) -> std::io::Result<()> {
    let peer = canon(s.peer_addr()?);
    let local = canon(s.local_addr()?);
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    loop {
        let mut request_line = String::new();
        if r.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        let mut parts = request_line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let text = format!("{name} {method} {target}\n");
        write!(
            w,
            "HTTP/1.1 200 OK\r\nx-served-by: {name}\r\nx-peer: {peer}\r\nx-local: {local}\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        )?;
    }
}

fn send(addr: &str, text: &str) -> Result<(), String> {
    let dst: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))
        .map_err(|e| format!("{dst}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    writeln!(s, "{text}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("{dst}: {e}"))?;
    if line.is_empty() {
        return Err(format!("{dst}: closed without an answer"));
    }
    println!("{}", line.trim_end());
    Ok(())
}

fn tls(a: &[String]) -> Result<(), String> {
    use pingsail_filters::matcher::{StringMatch, StringMatcher};
    use pingsail_proxy::tls::{Common, Material, Secrets, Source, UpstreamTls, pem_certs, pem_key};
    use std::sync::Arc;
    let (addr, sni, cert, key, ca, san, alpn, text) =
        (&a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7]);
    let read = |p: &str| std::fs::read(p).map_err(|e| format!("{p}: {e}"));
    let cert = if cert == "-" {
        None
    } else {
        Some(Source::Inline(Arc::new(Material::Cert {
            chain: pem_certs(&read(cert)?)?,
            key: Arc::new(pem_key(&read(key)?)?),
        })))
    };
    let common = Common {
        cert,
        ca: Some(Source::Inline(Arc::new(Material::Roots(pem_certs(
            &read(ca)?,
        )?)))),
        san: vec![StringMatcher::new(StringMatch::Exact(san.clone()), false)],
        alpn: alpn
            .split(',')
            .filter(|s| !s.is_empty())
            .map(Into::into)
            .collect(),
        ..Default::default()
    };
    let config = UpstreamTls::new(common, sni.as_str().into())
        .client_config(&Secrets::default())
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(sni.clone()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let dst: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let sock = TcpStream::connect_timeout(&dst, Duration::from_secs(10))
        .map_err(|e| format!("{dst}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| format!("handshake with {dst}: {e}"))?;
    }
    let negotiated = tls
        .conn
        .alpn_protocol()
        .map_or("-".to_string(), |p| String::from_utf8_lossy(p).into_owned());
    println!("alpn={negotiated}");
    let text = text.replace("\\r", "\r").replace("\\n", "\n");
    tls.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    tls.flush().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    // A close without close_notify (the proxy relaying a TCP close) still ends the answer.
    let _ = tls.read_to_end(&mut out);
    print!("{}", String::from_utf8_lossy(&out));
    std::io::stdout().flush().map_err(|e| e.to_string())
}
