// SPDX-License-Identifier: Apache-2.0
//! The DNS proxy over real UDP and TCP sockets: names from a name table answered locally (short
//! names, search-domain CNAMEs, AAAA, auto-allocated ServiceEntry addresses), everything else
//! forwarded to a fake upstream resolver listed in a resolv.conf (after a dead one), truncation
//! over UDP, SERVFAIL before the first table and when no nameserver answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pingsail_agent::dns::{DnsConfig, DnsHandle, DnsServer};
use pingsail_agent::nds::{NameInfo, NameTable, NameTableSender, name_table_channel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const A: u16 = 1;
const CNAME: u16 = 5;
const MX: u16 = 15;
const AAAA: u16 = 28;
/// What the fake upstream answers for every name.
const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.trim_end_matches('.').split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

#[derive(Debug, PartialEq)]
enum Data {
    A(Ipv4Addr),
    Aaaa(std::net::Ipv6Addr),
    Cname(String),
    Other(u16),
}

#[derive(Debug)]
struct Reply {
    id: u16,
    aa: bool,
    tc: bool,
    rcode: u16,
    answers: Vec<(String, u32, Data)>,
}

fn name_at(m: &[u8], mut pos: usize) -> (String, usize) {
    let mut out = String::new();
    let mut end = None;
    loop {
        let len = m[pos];
        if len & 0xC0 == 0xC0 {
            end.get_or_insert(pos + 2);
            pos = (usize::from(len & 0x3F) << 8) | usize::from(m[pos + 1]);
            continue;
        }
        if len == 0 {
            return (out, end.unwrap_or(pos + 1));
        }
        let l = usize::from(len);
        out.push_str(std::str::from_utf8(&m[pos + 1..pos + 1 + l]).unwrap());
        out.push('.');
        pos += 1 + l;
    }
}

fn be16(m: &[u8], p: usize) -> u16 {
    u16::from_be_bytes([m[p], m[p + 1]])
}

fn parse(m: &[u8]) -> Reply {
    let flags = be16(m, 2);
    let (qd, an) = (be16(m, 4), be16(m, 6));
    let mut pos = 12;
    for _ in 0..qd {
        pos = name_at(m, pos).1 + 4;
    }
    let mut answers = Vec::new();
    for _ in 0..an {
        let (name, p) = name_at(m, pos);
        let rtype = be16(m, p);
        let ttl = u32::from_be_bytes([m[p + 4], m[p + 5], m[p + 6], m[p + 7]]);
        let rdlen = usize::from(be16(m, p + 8));
        let rd = &m[p + 10..p + 10 + rdlen];
        let data = match rtype {
            A => Data::A(Ipv4Addr::new(rd[0], rd[1], rd[2], rd[3])),
            AAAA => Data::Aaaa(<[u8; 16]>::try_from(rd).unwrap().into()),
            CNAME => Data::Cname(name_at(m, p + 10).0),
            t => Data::Other(t),
        };
        answers.push((name, ttl, data));
        pos = p + 10 + rdlen;
    }
    Reply {
        id: be16(m, 0),
        aa: flags & 0x0400 != 0,
        tc: flags & 0x0200 != 0,
        rcode: flags & 0xF,
        answers,
    }
}

/// A resolver on `ip`: UDP and TCP on one port, answering every query with [`UPSTREAM_IP`].
struct FakeResolver {
    port: u16,
    queries: Arc<AtomicU64>,
}

fn upstream_answer(q: &[u8]) -> Vec<u8> {
    let mut r = q.to_vec();
    r[2] |= 0x80; // QR
    r[3] |= 0x80; // RA
    r[6..8].copy_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&[0xC0, 12]);
    r.extend_from_slice(&A.to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&300u32.to_be_bytes());
    r.extend_from_slice(&4u16.to_be_bytes());
    r.extend_from_slice(&UPSTREAM_IP.octets());
    r
}

impl FakeResolver {
    async fn start(ip: Ipv4Addr) -> Self {
        // The same port for UDP and TCP: retry until a UDP port is free on TCP too.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind((ip, 0)).await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind((ip, port)).await {
                break (udp, tcp);
            }
        };
        let port = udp.local_addr().unwrap().port();
        let queries = Arc::new(AtomicU64::new(0));
        let q = queries.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
                q.fetch_add(1, Ordering::Relaxed);
                udp.send_to(&upstream_answer(&buf[..n]), peer)
                    .await
                    .unwrap();
            }
        });
        let q = queries.clone();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = tcp.accept().await.unwrap();
                let q = q.clone();
                tokio::spawn(async move {
                    let mut len = [0u8; 2];
                    while c.read_exact(&mut len).await.is_ok() {
                        let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        c.read_exact(&mut m).await.unwrap();
                        q.fetch_add(1, Ordering::Relaxed);
                        let r = upstream_answer(&m);
                        c.write_all(&(r.len() as u16).to_be_bytes()).await.unwrap();
                        c.write_all(&r).await.unwrap();
                    }
                });
            }
        });
        Self { port, queries }
    }
}

async fn udp_ask(server: SocketAddr, id: u16, name: &str, qtype: u16) -> (Reply, usize) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&query(id, name, qtype), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = sock.recv_from(&mut buf).await.unwrap();
    (parse(&buf[..n]), n)
}

async fn tcp_ask(server: SocketAddr, id: u16, name: &str, qtype: u16) -> Reply {
    let mut c = TcpStream::connect(server).await.unwrap();
    let q = query(id, name, qtype);
    c.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    c.write_all(&q).await.unwrap();
    let mut len = [0u8; 2];
    c.read_exact(&mut len).await.unwrap();
    let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
    c.read_exact(&mut m).await.unwrap();
    parse(&m)
}

fn info(ips: &[&str], registry: &str, short: &str, ns: &str) -> NameInfo {
    NameInfo {
        ips: ips.iter().map(|s| s.to_string()).collect(),
        registry: registry.into(),
        shortname: short.into(),
        namespace: ns.into(),
        alt_hosts: vec![],
    }
}

fn name_table() -> NameTable {
    let mut nt = NameTable::default();
    nt.table.insert(
        "productpage.ns1.svc.cluster.local".into(),
        info(&["10.0.0.1", "fd00::1"], "Kubernetes", "productpage", "ns1"),
    );
    nt.table.insert(
        "reviews.ns2.svc.cluster.local".into(),
        info(&["10.0.0.2"], "Kubernetes", "reviews", "ns2"),
    );
    // A ServiceEntry host with an auto-allocated (240.240/16) address.
    nt.table.insert(
        "api.external.com".into(),
        info(&["240.240.0.7"], "External", "", ""),
    );
    let many: Vec<String> = (1..=60).map(|i| format!("10.1.0.{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    nt.table.insert(
        "headless.ns1.svc.cluster.local".into(),
        info(&many, "Kubernetes", "headless", "ns1"),
    );
    nt
}

async fn start(resolv: &str, port: u16) -> (DnsHandle, NameTableSender, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resolv.conf");
    std::fs::write(&path, resolv).unwrap();
    let mut cfg = DnsConfig::new("ns1", "ns1.svc.cluster.local");
    cfg.listen = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.resolv_conf = path;
    cfg.upstream_port = port;
    cfg.upstream_timeout = Duration::from_secs(2);
    let (tx, rx) = name_table_channel();
    let dns = DnsServer::start(cfg, rx).await.unwrap();
    (dns, tx, dir)
}

#[tokio::test]
async fn answers_mesh_names_and_forwards_the_rest() {
    let upstream = FakeResolver::start(Ipv4Addr::new(127, 0, 0, 3)).await;
    // The first nameserver has nothing listening: the proxy must go on to the second.
    let (dns, names, _dir) = start(
        "nameserver 127.0.0.2\nnameserver 127.0.0.3\nsearch ns1.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
        upstream.port,
    )
    .await;
    let udp = dns.udp_addrs()[0];
    let tcp = dns.tcp_addrs()[0];

    // Before the first name table: SERVFAIL, nothing forwarded.
    let (r, _) = udp_ask(udp, 1, "productpage.", A).await;
    assert_eq!(r.rcode, 2);
    assert_eq!(upstream.queries.load(Ordering::Relaxed), 0);

    names.send_replace(Some(Arc::new(name_table())));
    dns.wait_ready().await;

    let a = |ip: [u8; 4]| Data::A(Ipv4Addr::from(ip));
    for name in [
        "productpage.ns1.svc.cluster.local.",
        "productpage.ns1.",
        "productpage.ns1.svc.",
        "productpage.",
    ] {
        let (r, _) = udp_ask(udp, 7, name, A).await;
        assert_eq!((r.id, r.rcode, r.aa), (7, 0, true), "{name}");
        assert_eq!(r.answers, vec![(name.to_owned(), 30, a([10, 0, 0, 1]))]);
        let r = tcp_ask(tcp, 8, name, A).await;
        assert_eq!(r.answers, vec![(name.to_owned(), 30, a([10, 0, 0, 1]))]);
    }
    let (r, _) = udp_ask(udp, 9, "productpage.", AAAA).await;
    assert_eq!(
        r.answers,
        vec![(
            "productpage.".to_owned(),
            30,
            Data::Aaaa("fd00::1".parse().unwrap())
        )]
    );
    // The stub resolver's first try for `reviews.ns2`: CNAME and address in one answer.
    let (r, _) = udp_ask(udp, 10, "reviews.ns2.ns1.svc.cluster.local.", A).await;
    assert_eq!(
        r.answers,
        vec![
            (
                "reviews.ns2.ns1.svc.cluster.local.".to_owned(),
                30,
                Data::Cname("reviews.ns2.".into())
            ),
            ("reviews.ns2.".to_owned(), 30, a([10, 0, 0, 2])),
        ]
    );
    // Known name, no IPv6: authoritative empty NOERROR.
    let (r, _) = udp_ask(udp, 11, "reviews.ns2.", AAAA).await;
    assert_eq!((r.rcode, r.aa, r.answers.len()), (0, true, 0));
    // Auto-allocated ServiceEntry address.
    let (r, _) = udp_ask(udp, 12, "api.external.com.", A).await;
    assert_eq!(
        r.answers,
        vec![("api.external.com.".to_owned(), 30, a([240, 240, 0, 7]))]
    );
    assert_eq!(upstream.queries.load(Ordering::Relaxed), 0);

    // Not ours: forwarded over the query's protocol, the upstream reply relayed.
    let (r, _) = udp_ask(udp, 13, "www.example.org.", A).await;
    assert_eq!((r.id, r.rcode, r.aa), (13, 0, false));
    assert_eq!(
        r.answers,
        vec![("www.example.org.".to_owned(), 300, Data::A(UPSTREAM_IP))]
    );
    let r = tcp_ask(tcp, 14, "www.example.org.", A).await;
    assert_eq!(r.answers[0].2, Data::A(UPSTREAM_IP));
    // A type the table does not answer goes upstream too, for a known name.
    let (r, _) = udp_ask(udp, 15, "productpage.", MX).await;
    assert_eq!(r.answers[0].2, Data::A(UPSTREAM_IP));
    assert_eq!(upstream.queries.load(Ordering::Relaxed), 3);

    // 60 addresses do not fit 512 bytes over UDP: truncated; TCP has them all.
    let (r, n) = udp_ask(udp, 16, "headless.", A).await;
    assert!(r.tc && n <= 512, "tc={} len={n}", r.tc);
    assert!(!r.answers.is_empty() && r.answers.len() < 60);
    let r = tcp_ask(tcp, 17, "headless.", A).await;
    assert!(!r.tc);
    let mut ips: Vec<IpAddr> = r
        .answers
        .iter()
        .map(|(_, _, d)| match d {
            Data::A(ip) => IpAddr::V4(*ip),
            other => panic!("{other:?}"),
        })
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 60);

    // A new table replaces the old one.
    let mut nt = name_table();
    nt.table.remove("api.external.com");
    names.send_replace(Some(Arc::new(nt)));
    let mut forwarded = false;
    for _ in 0..100 {
        let (r, _) = udp_ask(udp, 18, "api.external.com.", A).await;
        if r.answers.first().map(|a| &a.2) == Some(&Data::A(UPSTREAM_IP)) {
            forwarded = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(forwarded, "a removed host must be forwarded upstream");
}

#[tokio::test]
async fn servfail_when_no_nameserver_answers() {
    // Nothing listens on 127.0.0.2 at any port: UDP gets ICMP unreachable, TCP is refused.
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let (dns, names, _dir) = start("nameserver 127.0.0.2\n", port).await;
    names.send_replace(Some(Arc::new(name_table())));
    dns.wait_ready().await;
    let (r, _) = udp_ask(dns.udp_addrs()[0], 21, "unknown.example.", A).await;
    assert_eq!((r.id, r.rcode), (21, 2));
    let r = tcp_ask(dns.tcp_addrs()[0], 22, "unknown.example.", A).await;
    assert_eq!((r.id, r.rcode), (22, 2));
    // Mesh names still answer.
    let (r, _) = udp_ask(dns.udp_addrs()[0], 23, "productpage.", A).await;
    assert_eq!(r.rcode, 0);
    assert_eq!(r.answers.len(), 1);
    assert_eq!(
        pingsail_agent::dns::Stats::get(&dns.stats().upstream_failures),
        2
    );
}
