// SPDX-License-Identifier: Apache-2.0
//! The DNS proxy pilot-agent runs on `localhost:15053` when ISTIO_META_DNS_CAPTURE is set
//! (`pkg/dns/client/dns.go`, `proxy.go`); the capture rules send the pod's DNS traffic here.
//!
//! - UDP and TCP on each listen address (default: 127.0.0.1 and/or ::1 by the families of the
//!   resolv.conf nameservers, as pilot-agent binds `localhost`);
//! - names from istiod's name table ([`crate::nds`], through the xDS proxy) are answered here
//!   ([`table`] has the names and the answer rules), A/AAAA records in random order;
//! - everything else is forwarded as is to the resolv.conf nameservers in order (same protocol
//!   as the query, 5 s per server), the first reply relayed; none: SERVFAIL;
//! - before the first name table: SERVFAIL (pilot-agent's default, `respond_before_sync` off);
//! - replies are cut to the client's size (EDNS0 or 512 bytes over UDP), TC set.
//!
//! The wire format is handled by the small [`wire`] module (only headers, questions and
//! A/AAAA/CNAME answers are built; forwarded messages are relayed byte for byte) rather than a
//! DNS library, to keep the agent's dependency tree small.

pub mod table;
pub mod wire;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use rand::seq::SliceRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

use crate::nds::NameTableReceiver;
use table::{LookupTable, TableContext};
use wire::{RCODE_FORMERR, RCODE_NOERROR, RCODE_SERVFAIL};

/// pilot-agent's DNS port (`DefaultDNSProxyAddr = localhost:15053`).
pub const DEFAULT_PORT: u16 = 15053;

/// The DNS proxy's settings.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Where to listen (UDP and TCP each); empty: pilot-agent's `localhost:15053` choice.
    pub listen: Vec<SocketAddr>,
    /// The pod's resolver configuration (nameservers, search domains).
    pub resolv_conf: PathBuf,
    /// The nameservers' port (53; tests use another).
    pub upstream_port: u16,
    /// The proxy's namespace (POD_NAMESPACE).
    pub proxy_namespace: String,
    /// The proxy's domain (`--domain`, e.g. `ns.svc.cluster.local`).
    pub proxy_domain: String,
    /// Per upstream nameserver.
    pub upstream_timeout: Duration,
    /// Forward queries before the first name table instead of answering SERVFAIL.
    pub respond_before_sync: bool,
}

impl DnsConfig {
    pub fn new(proxy_namespace: impl Into<String>, proxy_domain: impl Into<String>) -> Self {
        Self {
            listen: Vec::new(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            upstream_port: 53,
            proxy_namespace: proxy_namespace.into(),
            proxy_domain: proxy_domain.into(),
            upstream_timeout: Duration::from_secs(5),
            respond_before_sync: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("reading resolver configuration {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binding the DNS proxy on {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// resolv.conf as the DNS proxy uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
}

impl ResolvConf {
    /// `nameserver`, `search` and `domain` lines (the last of `search`/`domain` wins);
    /// unparsable nameservers are skipped with a warning.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("nameserver") => {
                    if let Some(ns) = fields.next() {
                        let ip = ns.split('%').next().unwrap_or(ns);
                        match ip.parse() {
                            Ok(ip) => out.nameservers.push(ip),
                            Err(_) => tracing::warn!(nameserver = ns, "resolv.conf: not an IP"),
                        }
                    }
                }
                Some("search") => out.search = fields.map(str::to_owned).collect(),
                Some("domain") => out.search = fields.take(1).map(str::to_owned).collect(),
                _ => {}
            }
        }
        out
    }

    pub fn read(path: &Path) -> Result<Self, DnsError> {
        let text = std::fs::read_to_string(path).map_err(|source| DnsError::ResolvConf {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::parse(&text))
    }

    /// pilot-agent's addresses for `localhost:<port>`: 127.0.0.1 if any nameserver is IPv4,
    /// ::1 if any is IPv6, 127.0.0.1 when there are none.
    pub fn listen_addresses(&self, port: u16) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        if self.nameservers.is_empty() || self.nameservers.iter().any(IpAddr::is_ipv4) {
            out.push(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
        if self.nameservers.iter().any(IpAddr::is_ipv6) {
            out.push(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
        }
        out
    }
}

/// Counters (tests and the agent's metrics).
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    /// answered from the name table
    pub answered: AtomicU64,
    pub upstream_requests: AtomicU64,
    /// queries answered SERVFAIL because no nameserver answered
    pub upstream_failures: AtomicU64,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
    fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct State {
    table: RwLock<Option<Arc<LookupTable>>>,
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    respond_before_sync: bool,
    stats: Arc<Stats>,
}

/// The DNS proxy.
pub struct DnsServer;

impl DnsServer {
    /// Reads resolv.conf, binds UDP and TCP on every listen address and serves, taking every
    /// name table published on `names`.
    pub async fn start(cfg: DnsConfig, names: NameTableReceiver) -> Result<DnsHandle, DnsError> {
        let resolv = ResolvConf::read(&cfg.resolv_conf)?;
        let listen = if cfg.listen.is_empty() {
            resolv.listen_addresses(DEFAULT_PORT)
        } else {
            cfg.listen.clone()
        };
        let ctx = TableContext::new(&cfg.proxy_namespace, &cfg.proxy_domain, resolv.search);
        let stats = Arc::new(Stats::default());
        let state = Arc::new(State {
            table: RwLock::new(None),
            upstreams: resolv
                .nameservers
                .iter()
                .map(|ip| SocketAddr::new(*ip, cfg.upstream_port))
                .collect(),
            timeout: cfg.upstream_timeout,
            respond_before_sync: cfg.respond_before_sync,
            stats: stats.clone(),
        });
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for addr in &listen {
            let bind = |proto, source| DnsError::Bind {
                proto,
                addr: *addr,
                source,
            };
            udp.push(Arc::new(
                UdpSocket::bind(addr).await.map_err(|e| bind("udp", e))?,
            ));
            tcp.push(TcpListener::bind(addr).await.map_err(|e| bind("tcp", e))?);
        }
        let udp_addrs = udp.iter().filter_map(|s| s.local_addr().ok()).collect();
        let tcp_addrs = tcp.iter().filter_map(|s| s.local_addr().ok()).collect();
        let (ready_tx, ready_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(follow_names(state.clone(), ctx, names, ready_tx));
        for sock in udp {
            tasks.spawn(serve_udp(state.clone(), sock));
        }
        for l in tcp {
            tasks.spawn(serve_tcp(state.clone(), l));
        }
        tracing::info!(?udp_addrs, upstreams = ?state.upstreams, "DNS proxy listening");
        Ok(DnsHandle {
            udp_addrs,
            tcp_addrs,
            stats,
            ready: ready_rx,
            tasks,
        })
    }
}

async fn follow_names(
    state: Arc<State>,
    ctx: TableContext,
    mut names: NameTableReceiver,
    ready: watch::Sender<bool>,
) {
    loop {
        let current = names.borrow_and_update().clone();
        if let Some(nt) = current {
            let table = LookupTable::build(&nt, &ctx);
            tracing::debug!(names = table.len(), "DNS proxy: lookup table updated");
            *state.table.write() = Some(Arc::new(table));
            ready.send_replace(true);
        }
        if names.changed().await.is_err() {
            return;
        }
    }
}

/// A running DNS proxy; stops when shut down or dropped.
pub struct DnsHandle {
    udp_addrs: Vec<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
    stats: Arc<Stats>,
    ready: watch::Receiver<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl DnsHandle {
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp_addrs
    }

    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether a name table has been loaded (pilot-agent's `IsReady`).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until a name table has been loaded.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|r| *r).await;
    }

    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}

async fn serve_udp(state: Arc<State>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; wire::MAX_MSG_SIZE];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier replies surface here; keep serving.
                tracing::debug!(error = %e, "DNS proxy: UDP receive");
                continue;
            }
        };
        let msg = buf[..n].to_vec();
        let (state, sock) = (state.clone(), sock.clone());
        tokio::spawn(async move {
            if let Some(reply) = handle(&state, &msg, false).await
                && let Err(e) = sock.send_to(&reply, peer).await
            {
                tracing::debug!(error = %e, %peer, "DNS proxy: UDP send");
            }
        });
    }
}

async fn serve_tcp(state: Arc<State>, listener: TcpListener) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "DNS proxy: TCP accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_tcp_conn(&state, conn).await {
                tracing::debug!(error = %e, %peer, "DNS proxy: TCP connection");
            }
        });
    }
}

/// Idle limit between queries on one TCP connection.
const TCP_IDLE: Duration = Duration::from_secs(10);

async fn serve_tcp_conn(state: &State, mut conn: TcpStream) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        let first = tokio::select! {
            r = conn.read_exact(&mut len) => r,
            _ = tokio::time::sleep(TCP_IDLE) => return Ok(()),
        };
        match first {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut msg).await?;
        if let Some(reply) = handle(state, &msg, true).await {
            let len = u16::try_from(reply.len()).unwrap_or(u16::MAX);
            let mut out = Vec::with_capacity(reply.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&reply[..usize::from(len)]);
            conn.write_all(&out).await?;
        }
    }
}

/// The reply to one query (`None`: drop it).
async fn handle(state: &State, msg: &[u8], tcp: bool) -> Option<Vec<u8>> {
    Stats::inc(&state.stats.requests);
    let q = match wire::parse_query(msg) {
        Ok(q) => q,
        Err(e) => {
            tracing::debug!(error = %e, "DNS proxy: malformed query");
            // A header is enough to say so; less is dropped.
            let id = wire::message_id(msg)?;
            let flags = msg.get(2..4).map(|b| u16::from_be_bytes([b[0], b[1]]))?;
            let q =
                wire::parse_query(&[&id.to_be_bytes()[..], &flags.to_be_bytes(), &[0; 8]].concat())
                    .ok()?;
            return Some(wire::reply(
                &q,
                RCODE_FORMERR,
                false,
                &[],
                wire::MAX_MSG_SIZE,
            ));
        }
    };
    if q.is_response() {
        return None;
    }
    let size = q.max_reply(tcp);
    if q.qdcount == 0 {
        return Some(wire::reply(&q, RCODE_SERVFAIL, false, &[], size));
    }
    let table = state.table.read().clone();
    let Some(table) = table else {
        if state.respond_before_sync {
            return Some(forward(state, &q, msg, tcp, size).await);
        }
        tracing::debug!(name = %q.name, "DNS proxy: query before the name table arrived");
        return Some(wire::reply(&q, RCODE_SERVFAIL, false, &[], size));
    };
    match table.lookup(q.qtype, &q.name) {
        Some(mut answers) => {
            Stats::inc(&state.stats.answered);
            // DNS load balancing over the addresses (the CNAME, if any, stays first).
            let first_addr = usize::from(
                answers
                    .first()
                    .is_some_and(|r| matches!(r.data, wire::RData::Cname(_))),
            );
            answers[first_addr..].shuffle(&mut rand::thread_rng());
            Some(wire::reply(&q, RCODE_NOERROR, true, &answers, size))
        }
        None => Some(forward(state, &q, msg, tcp, size).await),
    }
}

async fn forward(state: &State, q: &wire::Query, msg: &[u8], tcp: bool, size: usize) -> Vec<u8> {
    Stats::inc(&state.stats.upstream_requests);
    for server in &state.upstreams {
        let exchange = async {
            if tcp {
                exchange_tcp(*server, msg).await
            } else {
                exchange_udp(*server, msg, q.id).await
            }
        };
        let result = tokio::select! {
            r = exchange => r,
            _ = tokio::time::sleep(state.timeout) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in time",
            )),
        };
        match result {
            Ok(reply) => match wire::truncate_reply(reply, size) {
                Ok(reply) => return reply,
                Err(e) => {
                    tracing::info!(%server, error = %e, "DNS proxy: malformed upstream reply")
                }
            },
            Err(e) => tracing::info!(%server, error = %e, "DNS proxy: upstream failure"),
        }
    }
    Stats::inc(&state.stats.upstream_failures);
    wire::reply(q, RCODE_SERVFAIL, false, &[], size)
}

async fn exchange_udp(server: SocketAddr, msg: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    // Connected: replies from elsewhere are filtered and ICMP errors reported.
    sock.connect(server).await?;
    sock.send(msg).await?;
    let mut buf = vec![0u8; wire::MAX_MSG_SIZE];
    loop {
        let n = sock.recv(&mut buf).await?;
        if wire::message_id(&buf[..n]) == Some(id) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(server: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect(server).await?;
    let len = u16::try_from(msg.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    conn.write_all(&out).await?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).await?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut reply).await?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn resolv_conf() {
        let r = ResolvConf::parse(
            "# kube\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\nnameserver bogus\n\
             search ns1.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
        );
        assert_eq!(
            r.nameservers,
            vec![
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        assert_eq!(r.search[0], "ns1.svc.cluster.local");
        assert_eq!(r.search.len(), 3);
        assert_eq!(
            r.listen_addresses(15053),
            vec![
                "127.0.0.1:15053".parse().unwrap(),
                "[::1]:15053".parse().unwrap()
            ]
        );
        assert_eq!(
            ResolvConf::parse("domain example.org\n").search,
            vec!["example.org".to_owned()]
        );
        assert_eq!(
            ResolvConf::default().listen_addresses(15053),
            vec!["127.0.0.1:15053".parse().unwrap()]
        );
    }
}
