// SPDX-License-Identifier: Apache-2.0
//! `netns-probe`: the small programs the network-namespace tests run inside pods.
//!
//! * `server NAME ADDR...` — on each connection, writes one line
//!   `NAME local=<local> peer=<peer>` and closes.
//! * `sidecar NAME ADDR... [--forward]` — a stand-in for the sidecar's 15001/15006 listeners: reads
//!   the connection's original destination with `pingsail_proxy::orig_dst::original_dst` and writes
//!   `NAME orig=<addr|none> peer=<peer>`; with `--forward` it then connects to that original
//!   destination itself (from 127.0.0.6 / ::6 when it is a local address, as Envoy's inbound
//!   passthrough does) and appends ` -> <the upstream's line>`. `--transparent` sets
//!   IP_TRANSPARENT on its listeners (TPROXY mode; needs CAP_NET_ADMIN).
//! * `client ADDR [--bind IP]` — connects, prints the line it receives, exits 0 (1 on failure).
//! * `udp-server NAME ADDR...` — answers each datagram with `NAME local=<local> peer=<peer>`.
//! * `udp-client ADDR` — sends one datagram from a connected socket, prints the answer.
//! * `wait ADDR MILLIS` — retries connecting until ADDR accepts (exit 0) or MILLIS pass (exit 1):
//!   readiness for programs that announce none.
//!
//! Listeners print `listening <addr>` once per address on stdout when bound (the readiness signal).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("server") => listen(&args[1], &args[2..], Mode::default()),
        Some("sidecar") => {
            let has = |f: &str| args.iter().any(|a| a == f);
            let (forward, transparent) = (has("--forward"), has("--transparent"));
            let addrs: Vec<String> = args[2..]
                .iter()
                .filter(|a| !a.starts_with("--"))
                .cloned()
                .collect();
            let mode = Mode {
                sidecar: true,
                forward,
                transparent,
            };
            listen(&args[1], &addrs, mode)
        }
        Some("client") => client(&args[1..]),
        Some("wait") => wait(&args[1..]),
        Some("udp-server") => udp_server(&args[1], &args[2..]),
        Some("udp-client") => udp_client(&args[1..]),
        _ => Err(
            "usage: netns-probe server|sidecar NAME ADDR... [--forward] [--transparent] \
             | client ADDR [--bind IP] | wait ADDR MILLIS"
                .into(),
        ),
    };
    if let Err(e) = r {
        eprintln!("netns-probe: {e}");
        std::process::exit(1);
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Mode {
    sidecar: bool,
    forward: bool,
    transparent: bool,
}

/// A listener; with `transparent`, IP_TRANSPARENT is set before binding (TPROXY).
fn bind(addr: SocketAddr, transparent: bool) -> std::io::Result<TcpListener> {
    if !transparent {
        return TcpListener::bind(addr);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let sock = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::IpTransparent, &true)?;
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        let l = sock.listen(128)?.into_std()?;
        l.set_nonblocking(false)?;
        Ok(l)
    })
}

fn listen(name: &str, addrs: &[String], mode: Mode) -> Result<(), String> {
    let mut handles = Vec::new();
    for a in addrs {
        let addr: SocketAddr = a.parse().map_err(|e| format!("{a}: {e}"))?;
        let l = bind(addr, mode.transparent).map_err(|e| format!("bind {addr}: {e}"))?;
        println!("listening {}", l.local_addr().map_err(|e| e.to_string())?);
        let name = name.to_string();
        handles.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || {
                    let _ = serve(&name, s, mode.sidecar, mode.forward);
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

/// IPv4-mapped IPv6 addresses (a dual-stack listener's IPv4 peers) shown as IPv4.
fn canon(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn serve(name: &str, mut s: TcpStream, sidecar: bool, forward: bool) -> std::io::Result<()> {
    let peer = canon(s.peer_addr()?);
    if !sidecar {
        return writeln!(s, "{name} local={} peer={peer}", canon(s.local_addr()?));
    }
    let orig = pingsail_proxy::orig_dst::original_dst(&s)?;
    let shown = orig.map_or_else(|| "none".to_string(), |o| o.to_string());
    let mut line = format!("{name} orig={shown} peer={peer}");
    if let (true, Some(dst)) = (forward, orig) {
        line.push_str(" -> ");
        line.push_str(&match fetch(dst, passthrough_source(&s, dst)) {
            Ok(l) => l,
            Err(e) => format!("error {e}"),
        });
    }
    writeln!(s, "{line}")
}

/// Inbound passthrough: a destination on this host is reached from 127.0.0.6 (::6), which the
/// capture rules leave alone.
fn passthrough_source(s: &TcpStream, dst: SocketAddr) -> Option<IpAddr> {
    let local = s.local_addr().ok()?;
    let local_ip = match local.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    (local_ip == dst.ip()).then(|| match dst.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)),
    })
}

fn connect(dst: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let s = match bind {
        None => TcpStream::connect_timeout(&dst, IO_TIMEOUT)?,
        Some(ip) => {
            // std cannot bind before connecting; tokio's TcpSocket can.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let sock = match dst {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                sock.bind(SocketAddr::new(ip, 0))?;
                let s = sock.connect(dst).await?;
                s.into_std()
            })?
        }
    };
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn fetch(dst: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<String> {
    let s = connect(dst, bind)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

fn client(args: &[String]) -> Result<(), String> {
    let dst: SocketAddr = args
        .first()
        .ok_or("client: ADDR missing")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let bind = match args.iter().position(|a| a == "--bind") {
        Some(i) => Some(
            args.get(i + 1)
                .ok_or("--bind: IP missing")?
                .parse::<IpAddr>()
                .map_err(|e| format!("--bind: {e}"))?,
        ),
        None => None,
    };
    let line = fetch(dst, bind).map_err(|e| format!("{dst}: {e}"))?;
    println!("{line}");
    Ok(())
}

fn wait(args: &[String]) -> Result<(), String> {
    let dst: SocketAddr = args
        .first()
        .ok_or("wait: ADDR missing")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let millis: u64 = args
        .get(1)
        .ok_or("wait: MILLIS missing")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_millis(millis);
    let mut backoff = Duration::from_millis(5);
    loop {
        match TcpStream::connect_timeout(&dst, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(format!("{dst} not accepting after {millis} ms: {e}"));
            }
            Err(_) => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
        }
    }
}

fn udp_server(name: &str, addrs: &[String]) -> Result<(), String> {
    let mut handles = Vec::new();
    for a in addrs {
        let addr: SocketAddr = a.parse().map_err(|e| format!("{a}: {e}"))?;
        let s = std::net::UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
        let local = s.local_addr().map_err(|e| e.to_string())?;
        println!("listening udp {local}");
        let name = name.to_string();
        handles.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((_, peer)) = s.recv_from(&mut buf) {
                let line = format!("{name} local={} peer={}", canon(local), canon(peer));
                let _ = s.send_to(line.as_bytes(), peer);
            }
        }));
    }
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn udp_client(args: &[String]) -> Result<(), String> {
    let dst: SocketAddr = args
        .first()
        .ok_or("udp-client: ADDR missing")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let any: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(|e| format!("{e}"))?;
    let s = std::net::UdpSocket::bind(any).map_err(|e| e.to_string())?;
    s.connect(dst).map_err(|e| format!("{dst}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.send(b"q").map_err(|e| format!("{dst}: {e}"))?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).map_err(|e| format!("{dst}: {e}"))?;
    println!("{}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}
