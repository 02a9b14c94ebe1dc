// SPDX-License-Identifier: Apache-2.0
//! Our own accept loop (DESIGN.md §4): accept, sniff (HTTP/1 vs h2 preface vs opaque), pick the filter
//! chain, and hand the connection to the HTTP proxy or tcp_proxy.

use crate::Apps;
use crate::config::{ChainKind, Codec, FilterChain, Listener, Predicate};
use crate::http::ConnFacts;
use crate::snapshot::ListenerEntry;
use crate::sniff::{self, Inspected, Look};
use arc_swap::ArcSwap;
use arcstr::ArcStr;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{GetProxyDigest, Stream};
use pingora_http::ResponseHeader;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What sniffing found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sniffed {
    /// HTTP/1.x request line
    Http1,
    /// HTTP/2 prior knowledge
    H2c,
    /// TLS ClientHello
    Tls,
    /// anything else, or nothing before the timeout
    #[default]
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

/// Peeks until `decide` has an answer, EOF, the buffer limit, or the caller's timeout. Bytes are never
/// consumed. Waiting for more bytes backs off (1 → 16 ms) while the peer sends nothing new, since a
/// socket with unread data stays readable.
async fn peek_until<T: Default>(
    tcp: &TcpStream,
    limit: usize,
    mut decide: impl FnMut(&[u8], bool) -> Option<T>,
) -> T {
    let mut buf = vec![0u8; 1024.min(limit)];
    let mut seen = 0;
    let mut backoff = Duration::from_millis(1);
    loop {
        let n = tcp.peek(&mut buf).await.unwrap_or(0);
        let eof = n == 0 || (n == buf.len() && buf.len() >= limit);
        if let Some(t) = decide(&buf[..n], eof) {
            return t;
        }
        if eof {
            return T::default();
        }
        if n == buf.len() {
            buf.resize((buf.len() * 4).min(limit), 0);
            continue;
        }
        if n > seen {
            seen = n;
            backoff = Duration::from_millis(1);
        } else {
            backoff = (backoff * 2).min(Duration::from_millis(16));
        }
        if tcp.readable().await.is_err() {
            return T::default();
        }
        pingora_timeout::sleep(backoff).await;
    }
}

/// Runs the listener's `tls_inspector` and `http_inspector` (those not disabled for `dst_port`).
/// `None`: the listener filters timed out and the listener does not continue on timeout.
async fn inspect(tcp: &TcpStream, l: &Listener, dst_port: u16) -> Option<Inspected> {
    let tls_on = l
        .tls_inspector
        .as_ref()
        .is_some_and(|d| Predicate::enabled(Some(d), dst_port));
    let http_on = l
        .http_inspector
        .as_ref()
        .is_some_and(|d| Predicate::enabled(Some(d), dst_port));
    if !tls_on && !http_on {
        return Some(Inspected::default());
    }
    let partial = parking_lot::Mutex::new(Inspected::default());
    let work = peek_until(tcp, sniff::MAX_CLIENT_HELLO, |b, eof| {
        let mut out = partial.lock();
        if tls_on {
            match sniff::client_hello(b) {
                Look::More if !eof => return None,
                Look::Done(Some(ch)) => {
                    out.tls = true;
                    out.server_name = ch.server_name;
                    out.alpn = ch.alpn;
                    return Some(Some(out.clone()));
                }
                _ => {}
            }
        }
        if http_on {
            match sniff::http_protocol(b) {
                Look::More if !eof => return None,
                Look::Done(Some(p)) => out.alpn = vec![p.to_string()],
                _ => {}
            }
        }
        Some(Some(out.clone()))
    });
    match l.sniff_timeout {
        None => work.await,
        Some(t) => match pingora_timeout::timeout(t, work).await {
            Ok(r) => r,
            Err(_) if l.continue_on_timeout => Some(partial.lock().clone()),
            Err(_) => None,
        },
    }
}

/// The HTTP connection manager's own codec detection (AUTO): the h2 preface means h2c.
async fn sniff_codec(tcp: &TcpStream, timeout: Option<Duration>) -> Sniffed {
    let work = peek_until(tcp, H2_PREFACE.len(), |b, eof| match classify(b) {
        Some(s) => Some(s),
        None if eof => Some(Sniffed::Opaque),
        None => None,
    });
    match timeout {
        Some(t) => pingora_timeout::timeout(t, work)
            .await
            .unwrap_or(Sniffed::Opaque),
        None => work.await,
    }
}

/// What filter-chain matching looks at.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo<'a> {
    /// destination (the original destination when restored by `original_dst`)
    pub dst: SocketAddr,
    /// source
    pub src: SocketAddr,
    /// the directly connected peer (same as `src` without PROXY protocol)
    pub direct_src: SocketAddr,
    /// SNI from the ClientHello
    pub server_name: Option<&'a str>,
    /// `tls` or `raw_buffer`
    pub transport: &'a str,
    /// ALPN from the ClientHello, or what http_inspector detected
    pub alpn: &'a [String],
}

type Chains<'a> = Vec<&'a Arc<FilterChain>>;

/// Keeps the candidates whose prefix list holds the longest prefix containing `ip`; without any,
/// those with an empty list (Envoy's longest-prefix trie, no backtracking).
fn by_prefix<'a>(
    cands: Chains<'a>,
    ip: std::net::IpAddr,
    ranges: impl Fn(&FilterChain) -> &[crate::config::Cidr],
) -> Chains<'a> {
    let best = cands
        .iter()
        .filter_map(|c| {
            ranges(c)
                .iter()
                .filter(|r| r.contains(ip))
                .map(|r| r.len)
                .max()
        })
        .max();
    match best {
        Some(len) => cands
            .into_iter()
            .filter(|c| ranges(c).iter().any(|r| r.len == len && r.contains(ip)))
            .collect(),
        None => cands.into_iter().filter(|c| ranges(c).is_empty()).collect(),
    }
}

/// The candidates `specific` selects, or if none, those `generic` selects.
fn narrow<'a>(
    cands: Chains<'a>,
    specific: impl Fn(&FilterChain) -> bool,
    generic: impl Fn(&FilterChain) -> bool,
) -> Chains<'a> {
    let exact: Chains<'a> = cands.iter().copied().filter(|f| specific(f)).collect();
    if exact.is_empty() {
        cands.into_iter().filter(|f| generic(f)).collect()
    } else {
        exact
    }
}

/// Envoy's filter chain match: destination port, destination IP, server name, transport protocol,
/// application protocols, direct source IP, source type, source IP, source port — at each level the
/// most specific entry that matches, else the entry without that criterion, never backtracking;
/// nothing left → the default chain.
pub fn select_chain<'a>(l: &'a Listener, c: &ConnInfo<'_>) -> Option<&'a Arc<FilterChain>> {
    use crate::config::SourceType;
    let mut cands: Chains<'a> = l.chains.iter().collect();
    let port = c.dst.port();
    cands = narrow(
        cands,
        |f| f.matcher.destination_port == Some(port),
        |f| f.matcher.destination_port.is_none(),
    );
    cands = by_prefix(cands, c.dst.ip(), |f| &f.matcher.prefix_ranges);
    let no_names = |f: &FilterChain| f.matcher.server_names.is_empty();
    cands = match c.server_name {
        Some(sni) => {
            // exact, then *.b.c for a.b.c, then *.c
            let mut chosen = None;
            let mut wanted = sni.to_string();
            let mut rest = sni;
            loop {
                let hit: Chains<'a> = cands
                    .iter()
                    .copied()
                    .filter(|f| f.matcher.server_names.iter().any(|n| *n == wanted))
                    .collect();
                if !hit.is_empty() {
                    chosen = Some(hit);
                    break;
                }
                let Some((_, tail)) = rest.split_once('.') else {
                    break;
                };
                wanted = format!("*.{tail}");
                rest = tail;
            }
            chosen.unwrap_or_else(|| cands.into_iter().filter(|f| no_names(f)).collect())
        }
        None => cands.into_iter().filter(|f| no_names(f)).collect(),
    };
    cands = narrow(
        cands,
        |f| f.matcher.transport_protocol.as_deref() == Some(c.transport),
        |f| f.matcher.transport_protocol.is_none(),
    );
    let by_alpn = c.alpn.iter().find_map(|a| {
        let hit: Chains<'a> = cands
            .iter()
            .copied()
            .filter(|f| f.matcher.application_protocols.iter().any(|x| x == a))
            .collect();
        (!hit.is_empty()).then_some(hit)
    });
    cands = by_alpn.unwrap_or_else(|| {
        cands
            .into_iter()
            .filter(|f| f.matcher.application_protocols.is_empty())
            .collect()
    });
    cands = by_prefix(cands, c.direct_src.ip(), |f| {
        &f.matcher.direct_source_prefix_ranges
    });
    let kind = if c.src.ip().is_loopback() || c.src.ip() == c.dst.ip() {
        SourceType::Local
    } else {
        SourceType::External
    };
    cands = narrow(
        cands,
        |f| f.matcher.source_type == kind,
        |f| f.matcher.source_type == SourceType::Any,
    );
    cands = by_prefix(cands, c.src.ip(), |f| &f.matcher.source_prefix_ranges);
    cands = narrow(
        cands,
        |f| f.matcher.source_ports.contains(&c.src.port()),
        |f| f.matcher.source_ports.is_empty(),
    );
    cands.first().copied().or(l.default_chain.as_ref())
}

/// Binds a listener socket (SO_REUSEADDR, as Envoy does).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bind_with(addr, false, false)
}

/// [`bind`] with the listener's `transparent` (IP_TRANSPARENT: accept connections TPROXY delivers
/// for any address; needs CAP_NET_ADMIN) and `freebind` (IP_FREEBIND) socket options, set before
/// binding as Envoy does. (Linux applies the IP-level options to IPv6 sockets too.)
pub fn bind_with(
    addr: SocketAddr,
    transparent: bool,
    freebind: bool,
) -> std::io::Result<TcpListener> {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if transparent {
        setsockopt(&socket, sockopt::IpTransparent, &true).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("IP_TRANSPARENT (transparent: true needs CAP_NET_ADMIN): {e}"),
            )
        })?;
    }
    if freebind {
        setsockopt(&socket, sockopt::IpFreebind, &true).map_err(std::io::Error::from)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Runs the listeners of the current snapshot: binds new ones, updates changed ones in place (only
/// the filter chains that changed drain), stops and drains removed ones.
pub struct Manager {
    apps: Arc<Apps>,
    rt: tokio::runtime::Handle,
    running: parking_lot::Mutex<HashMap<ArcStr, Active>>,
}

struct Active {
    entry: Arc<ListenerEntry>,
    current: Arc<ArcSwap<Listener>>,
    stop: Arc<watch::Sender<bool>>,
    bound: Option<SocketAddr>,
    /// Admin `drain_listeners?graceful` started on this listener: chains swapped in later drain too.
    draining: bool,
}

impl Active {
    fn retire(&self) {
        self.stop.send_replace(true);
        let l = self.current.load();
        for c in l.chains.iter().chain(l.default_chain.iter()) {
            c.drain.start();
        }
    }
}

fn chains(l: &Listener) -> impl Iterator<Item = &Arc<FilterChain>> {
    l.chains.iter().chain(l.default_chain.iter())
}

impl Manager {
    /// A manager spawning accept loops on `rt`.
    pub fn new(apps: Arc<Apps>, rt: tokio::runtime::Handle) -> Self {
        Manager {
            apps,
            rt,
            running: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// Makes the running listeners equal `listeners`. Returns those that could not be started.
    pub fn reconcile(&self, listeners: &[Arc<ListenerEntry>]) -> Vec<(ArcStr, String)> {
        let mut running = self.running.lock();
        let wanted: std::collections::HashSet<&ArcStr> =
            listeners.iter().map(|e| &e.config.name).collect();
        running.retain(|name, a| {
            let keep = wanted.contains(name);
            if !keep {
                a.retire();
            }
            keep
        });
        let mut failures = Vec::new();
        for e in listeners {
            let name = &e.config.name;
            if let Some(a) = running.get_mut(name) {
                if Arc::ptr_eq(&a.entry, e) {
                    continue;
                }
                if a.entry.config.address == e.config.address
                    && a.entry.config.bind_to_port == e.config.bind_to_port
                    && a.entry.config.transparent == e.config.transparent
                    && a.entry.config.freebind == e.config.freebind
                {
                    // In place: new connections see the new chains; connections on chains that left
                    // drain.
                    let old = a.current.swap(e.config.clone());
                    for c in chains(&old) {
                        if !chains(&e.config).any(|n| Arc::ptr_eq(n, c)) {
                            c.drain.start();
                        }
                    }
                    if a.draining {
                        for c in chains(&e.config) {
                            c.drain.start_graceful();
                        }
                    }
                    a.entry = e.clone();
                    continue;
                }
                if let Some(a) = running.remove(name) {
                    a.retire();
                }
            }
            let (stop, stop_rx) = watch::channel(false);
            let stop = Arc::new(stop);
            let current = Arc::new(ArcSwap::new(e.config.clone()));
            let mut bound = None;
            if e.config.bind_to_port {
                let addr = e.config.address;
                let sock = {
                    let _guard = self.rt.enter();
                    bind_with(addr, e.config.transparent, e.config.freebind)
                };
                match sock {
                    Ok(sock) => {
                        bound = sock.local_addr().ok();
                        let apps = self.apps.clone();
                        let cur = current.clone();
                        self.rt.spawn(serve(apps, cur, sock, stop_rx));
                    }
                    Err(err) => {
                        failures.push((name.clone(), format!("cannot bind '{addr}': {err}")));
                        continue;
                    }
                }
            }
            running.insert(
                name.clone(),
                Active {
                    entry: e.clone(),
                    current,
                    stop,
                    bound,
                    draining: false,
                },
            );
        }
        failures
    }

    /// Bound addresses by listener name.
    pub fn bound(&self) -> Vec<(String, SocketAddr)> {
        self.running
            .lock()
            .iter()
            .filter_map(|(n, a)| Some((n.to_string(), a.bound?)))
            .collect()
    }

    /// Admin `drain_listeners`: the listeners (only `traffic_direction: INBOUND` ones with
    /// `inbound_only`) stop accepting now; with `graceful`, they first keep accepting for
    /// `drain_time` while every HTTP response carries `connection: close` and h2 connections get
    /// GOAWAY, then stop accepting (unless `skip_exit`). Open connections are never closed here: they
    /// finish, or end when the process exits. Returns how many listeners were drained.
    pub fn drain_listeners(
        &self,
        inbound_only: bool,
        graceful: bool,
        skip_exit: bool,
        drain_time: Duration,
    ) -> usize {
        let mut running = self.running.lock();
        let mut n = 0;
        for a in running.values_mut() {
            let l = a.current.load();
            if inbound_only && !l.inbound {
                continue;
            }
            n += 1;
            if !graceful {
                a.stop.send_replace(true);
                continue;
            }
            if a.draining {
                continue;
            }
            a.draining = true;
            for c in chains(&l) {
                c.drain.start_graceful();
            }
            if !skip_exit {
                let stop = a.stop.clone();
                self.rt.spawn(async move {
                    pingora_timeout::sleep(drain_time).await;
                    stop.send_replace(true);
                });
            }
        }
        n
    }

    /// Stops accepting everywhere and drains every connection.
    pub fn stop_all(&self) {
        for a in self.running.lock().values() {
            a.retire();
        }
    }
}

/// Accepts connections for the listener in `current` until `shutdown` flips.
pub async fn serve(
    apps: Arc<Apps>,
    current: Arc<ArcSwap<Listener>>,
    socket: TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown;
    let stats = {
        let prefix = current.load().stat_prefix.clone();
        apps.shared.stats.listener(&prefix)
    };
    loop {
        let accepted = tokio::select! {
            r = socket.accept() => r,
            _ = stop.changed() => return,
        };
        let (tcp, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(listener = %current.load().name, "accept failed: {e}");
                // Back off on resource exhaustion (EMFILE) instead of spinning.
                pingora_timeout::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let apps = apps.clone();
        let listener = current.load_full();
        let active = crate::stats::ActiveConnection::new(stats.clone());
        tokio::spawn(async move {
            handle(apps, listener, tcp, remote).await;
            drop(active);
        });
    }
}

/// Resolves `drain_time` after the chain is retired: whatever is still open then is closed.
async fn drained(mut drain: watch::Receiver<bool>, drain_time: Duration) {
    if drain.wait_for(|d| *d).await.is_err() {
        // The chain (and its signal) is gone without draining: nothing forces this connection.
        std::future::pending::<()>().await;
    }
    pingora_timeout::sleep(drain_time).await;
}

async fn handle(apps: Arc<Apps>, listener: Arc<Listener>, tcp: TcpStream, remote: SocketAddr) {
    let local = tcp.local_addr().unwrap_or(listener.address);
    let capture = listener.use_original_dst || listener.original_dst_filter;
    // Where the client meant to go: the REDIRECT target recovered from conntrack, else our address.
    let dst = if capture {
        match crate::orig_dst::original_dst(&tcp) {
            Ok(Some(d)) => d,
            _ => local,
        }
    } else {
        local
    };
    let mut listener = listener;
    if listener.use_original_dst
        && dst != local
        && let Some(target) = apps.shared.snapshot.load().listener_for(dst)
        && !Arc::ptr_eq(&target, &listener)
    {
        // virtualOutbound's hand-off: the listener for the original destination takes over.
        listener = target;
    }
    let Some(seen) = inspect(&tcp, &listener, dst.port()).await else {
        tracing::debug!(listener = %listener.name, %remote, "listener filters timed out; closing");
        return;
    };
    let info = ConnInfo {
        dst,
        src: remote,
        direct_src: remote,
        server_name: seen.server_name.as_deref(),
        transport: if seen.tls { "tls" } else { "raw_buffer" },
        alpn: &seen.alpn,
    };
    let Some(chain) = select_chain(&listener, &info).cloned() else {
        tracing::debug!(listener = %listener.name, %remote, "no matching filter chain; closing");
        return;
    };
    // A connection that was not redirected must never be passed through to its own destination:
    // that is us (the loop guard; istiod also adds a blackhole chain for 15001 / 15006). Under
    // TPROXY (a transparent listener) nothing is NATed: the connection's local address is the
    // original destination, and only one addressed to our own port was not intercepted.
    let redirected =
        dst != local || (listener.transparent && local.port() != listener.address.port());
    let original_dst = (capture && redirected).then_some(dst);
    // original_src: upstream connections leave from the downstream's address.
    let upstream_src = listener.original_src.map(|o| crate::tcp::UpstreamSource {
        addr: SocketAddr::new(remote.ip(), if o.bind_port { remote.port() } else { 0 }),
        mark: o.mark,
    });
    let drain = chain.drain.watch();
    let forced = drained(chain.drain.retired(), apps.shared.drain_time);
    if let Some(tls) = &chain.tls {
        let offered = if seen.tls {
            seen.alpn.clone()
        } else {
            // No tls_inspector ran: read the ClientHello's ALPN ourselves.
            peek_until(
                &tcp,
                sniff::MAX_CLIENT_HELLO,
                |b, eof| match sniff::client_hello(b) {
                    Look::More if !eof => None,
                    Look::Done(Some(ch)) => Some(ch.alpn),
                    _ => Some(Vec::new()),
                },
            )
            .await
        };
        let Some(accepted) = accept_tls(&apps, tls, tcp, &listener, &offered).await else {
            return;
        };
        let (alpn, peer_principal) = {
            let conn = accepted.get_ref().1;
            (
                conn.alpn_protocol().map(|a| a.to_vec()),
                conn.peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(crate::tls::spiffe_id)
                    .map(arcstr::ArcStr::from),
            )
        };
        let sni = seen.server_name.as_deref().unwrap_or("");
        if !network_allowed(&apps, &chain, remote, dst, sni, peer_principal.as_deref()).await {
            return;
        }
        match &chain.kind {
            ChainKind::Tcp(t) => {
                let conn = crate::tcp::Conn {
                    local: dst,
                    remote,
                    original_dst,
                    upstream_src,
                    peer_principal,
                };
                tokio::select! {
                    _ = crate::tcp::proxy(&apps.shared, t.clone(), accepted, conn) => {}
                    _ = forced => {}
                }
            }
            ChainKind::Http(hcm) => {
                let mut accepted = accepted;
                let mut prefix = Vec::new();
                let h2 = match (hcm.codec, alpn.as_deref()) {
                    (Codec::Http2, _) => true,
                    (Codec::Http1, _) => false,
                    (Codec::Auto, Some(b"h2")) => true,
                    (Codec::Auto, Some(_)) => false,
                    // No ALPN negotiated (e.g. a client offering only Istio's protocols): the
                    // HTTP/2 preface decides, as Envoy's codec detection does.
                    (Codec::Auto, None) => {
                        let sniffed = pingora_timeout::timeout(
                            listener.sniff_timeout.unwrap_or(Duration::from_secs(15)),
                            read_preface(&mut accepted, &mut prefix),
                        )
                        .await;
                        matches!(sniffed, Ok(Ok(true)))
                    }
                };
                // The peer's certificates are copied only when XFCC depends on them, and ours is
                // parsed only when XFCC is written.
                use crate::config::XfccMode as X;
                // A gRPC ext_authz check carries our identity, and the peer's certificate
                // with `include_peer_certificate`.
                let (authz_cert, authz_local) = crate::authz::grpc_ext_authz_needs(&hcm.authz);
                let peer_certs = (authz_cert
                    || matches!(
                        hcm.xfcc.mode,
                        X::ForwardOnly | X::SanitizeSet | X::AppendForward
                    ))
                .then(|| accepted.get_ref().1.peer_certificates())
                .flatten()
                .map(|c| Arc::new(c.iter().map(|d| d.to_vec()).collect::<Vec<_>>()));
                let local_uri = (authz_local
                    || matches!(hcm.xfcc.mode, X::SanitizeSet | X::AppendForward))
                .then(|| tls.local_uri(&apps.shared.secrets))
                .flatten()
                .map(arcstr::ArcStr::from);
                let Some(digest) = digest(ConnFacts {
                    hcm: hcm.clone(),
                    stats: apps.shared.stats.http(&hcm.stat_prefix),
                    remote,
                    local: dst,
                    original_dst,
                    peer_principal,
                    tls: true,
                    peer_certs,
                    local_uri,
                    upstream_src,
                }) else {
                    return;
                };
                let stream =
                    crate::tls::stream::TlsDownstream::with_prefix(accepted, digest, prefix);
                serve_http(&apps, Box::new(stream), h2, &drain, forced).await;
            }
        }
        return;
    }
    if !network_allowed(&apps, &chain, remote, dst, "", None).await {
        return;
    }
    match &chain.kind {
        ChainKind::Tcp(t) => {
            let conn = crate::tcp::Conn {
                local: dst,
                remote,
                original_dst,
                upstream_src,
                peer_principal: None,
            };
            tokio::select! {
                _ = crate::tcp::proxy(&apps.shared, t.clone(), tcp, conn) => {}
                _ = forced => {}
            }
        }
        ChainKind::Http(hcm) => {
            let h2 = match hcm.codec {
                Codec::Http2 => true,
                Codec::Http1 => false,
                Codec::Auto if seen.alpn.iter().any(|a| a == "h2c") => true,
                Codec::Auto if seen.alpn.iter().any(|a| a.starts_with("http/1")) => false,
                Codec::Auto => sniff_codec(&tcp, listener.sniff_timeout).await == Sniffed::H2c,
            };
            let Some(digest) = digest(ConnFacts {
                hcm: hcm.clone(),
                stats: apps.shared.stats.http(&hcm.stat_prefix),
                remote,
                local: dst,
                original_dst,
                peer_principal: None,
                tls: false,
                peer_certs: None,
                local_uri: None,
                upstream_src,
            }) else {
                return;
            };
            let mut stream = L4Stream::from(tcp);
            stream.set_proxy_digest(digest);
            serve_http(&apps, Box::new(stream), h2, &drain, forced).await;
        }
    }
}

/// Serves a plaintext connection we did not accept from a socket (an internal listener's pipe) on
/// `chain`: tcp_proxy, or the HTTP connection manager with HTTP/2 detected by its preface.
pub(crate) async fn serve_chain<S>(
    apps: &Arc<Apps>,
    listener: &Listener,
    chain: &Arc<FilterChain>,
    mut stream: S,
    fd: i32,
    conn: crate::tcp::Conn,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync + 'static,
{
    let drain = chain.drain.watch();
    let forced = drained(chain.drain.retired(), apps.shared.drain_time);
    match &chain.kind {
        ChainKind::Tcp(t) => {
            tokio::select! {
                _ = crate::tcp::proxy(&apps.shared, t.clone(), stream, conn) => {}
                _ = forced => {}
            }
        }
        ChainKind::Http(hcm) => {
            let mut prefix = Vec::new();
            let h2 = match hcm.codec {
                Codec::Http2 => true,
                Codec::Http1 => false,
                Codec::Auto => {
                    let sniffed = pingora_timeout::timeout(
                        listener.sniff_timeout.unwrap_or(Duration::from_secs(15)),
                        read_preface(&mut stream, &mut prefix),
                    )
                    .await;
                    matches!(sniffed, Ok(Ok(true)))
                }
            };
            let Some(digest) = digest(ConnFacts {
                hcm: hcm.clone(),
                stats: apps.shared.stats.http(&hcm.stat_prefix),
                remote: conn.remote,
                local: conn.local,
                original_dst: conn.original_dst,
                peer_principal: conn.peer_principal,
                tls: false,
                peer_certs: None,
                local_uri: None,
                upstream_src: None,
            }) else {
                return;
            };
            let stream = crate::tls::stream::Downstream::from_parts(stream, fd, digest, prefix);
            serve_http(apps, Box::new(stream), h2, &drain, forced).await;
        }
    }
}

/// The per-connection facts as the proxy digest Pingora hands to the HTTP callbacks.
fn digest(facts: ConnFacts) -> Option<ProxyDigest> {
    let header = ResponseHeader::build(200, Some(0)).ok()?;
    Some(ProxyDigest::new(
        Box::new(header),
        Some(Box::new(Arc::new(facts))),
    ))
}

/// Runs Pingora's HTTP server (h1 or h2) on a connection until it ends or its drain time is up.
pub(crate) async fn serve_http(
    apps: &Apps,
    stream: Stream,
    h2: bool,
    drain: &watch::Receiver<bool>,
    forced: impl std::future::Future<Output = ()>,
) {
    let app = if h2 { &apps.h2 } else { &apps.h1 };
    tokio::select! {
        _ = app.process_new(stream, drain) => {}
        _ = forced => {}
    }
}

/// The chain's network RBAC and ext_authz filters (evaluated once the peer identity is known).
pub(crate) async fn network_allowed(
    apps: &Apps,
    chain: &FilterChain,
    remote: SocketAddr,
    dst: SocketAddr,
    sni: &str,
    peer_principal: Option<&str>,
) -> bool {
    let conn = crate::authz::ConnView {
        remote,
        local: dst,
        sni,
        peer_principal,
    };
    crate::authz::network_allows(&chain.network_authz, &apps.shared, conn).await
}

/// Reads decrypted bytes until they diverge from the HTTP/2 preface (false) or complete it (true);
/// what was read is left in `buf` to be served first.
async fn read_preface<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let mut tmp = [0u8; 64];
    loop {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Ok(false);
        }
        buf.extend_from_slice(&tmp[..n]);
        let m = buf.len().min(H2_PREFACE.len());
        if buf[..m] != H2_PREFACE[..m] {
            return Ok(false);
        }
        if buf.len() >= H2_PREFACE.len() {
            return Ok(true);
        }
    }
}

/// The TLS handshake for a chain with a `DownstreamTlsContext`, with Envoy's checks: a client
/// certificate verified against the trust roots (required if configured, or whenever SANs must be
/// matched) and one of its SANs matching. `None`: refused (already logged).
async fn accept_tls(
    apps: &Apps,
    tls: &crate::tls::DownstreamTls,
    tcp: TcpStream,
    listener: &Listener,
    offered: &[String],
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let config = match tls.server_config(&apps.shared.secrets, offered) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(listener = %listener.name, "TLS not ready: {e}; closing");
            return None;
        }
    };
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let stream = match pingora_timeout::timeout(Duration::from_secs(15), accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(listener = %listener.name, "TLS handshake failed: {e}");
            return None;
        }
        Err(_) => {
            tracing::debug!(listener = %listener.name, "TLS handshake timed out");
            return None;
        }
    };
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first());
    if !crate::tls::san_ok(&tls.common.san, leaf) {
        tracing::debug!(listener = %listener.name, "client certificate SAN not allowed; closing");
        return None;
    }
    Some(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ChainMatch, Cidr, TcpProxy};

    fn chain(name: &str, m: ChainMatch) -> Arc<FilterChain> {
        Arc::new(FilterChain {
            name: name.into(),
            matcher: m,
            kind: ChainKind::Tcp(Arc::new(TcpProxy {
                stat_prefix: "x".into(),
                clusters: vec![],
                total_weight: 0,
                idle_timeout: None,
                access_logs: vec![],
                tunneling: None,
            })),
            drain: Default::default(),
            tls: None,
            network_authz: vec![],
        })
    }

    fn simple(port: Option<u16>, transport: Option<&str>, alpn: &[&str]) -> ChainMatch {
        ChainMatch {
            destination_port: port,
            transport_protocol: transport.map(Into::into),
            application_protocols: alpn.iter().map(|a| (*a).into()).collect(),
            ..Default::default()
        }
    }

    fn listener(chains: Vec<Arc<FilterChain>>, default: bool) -> Listener {
        Listener {
            name: "l".into(),
            address: "127.0.0.1:1".parse().unwrap(),
            bind_to_port: true,
            use_original_dst: false,
            original_dst_filter: false,
            tls_inspector: None,
            http_inspector: None,
            continue_on_timeout: false,
            chains,
            default_chain: default.then(|| chain("default", ChainMatch::default())),
            sniff_timeout: None,
            inbound: false,
            stat_prefix: "l".into(),
            transparent: false,
            freebind: false,
            original_src: None,
            internal: false,
            set_dst_address: false,
        }
    }

    fn pick(
        l: &Listener,
        dst: &str,
        src: &str,
        sni: Option<&str>,
        transport: &str,
        alpn: &[&str],
    ) -> Option<String> {
        let alpn: Vec<String> = alpn.iter().map(|s| s.to_string()).collect();
        let src: SocketAddr = src.parse().unwrap();
        select_chain(
            l,
            &ConnInfo {
                dst: dst.parse().unwrap(),
                src,
                direct_src: src,
                server_name: sni,
                transport,
                alpn: &alpn,
            },
        )
        .map(|c| c.name.to_string())
    }

    /// Envoy narrows by destination port first, then transport protocol, then application protocol:
    /// a port-specific chain beats an application-protocol match on a port-less chain (seen with
    /// Envoy 1.40 in the differential suite).
    #[test]
    fn chain_match_precedence() {
        let l = listener(
            vec![
                chain("http1", simple(None, None, &["http/1.1"])),
                chain("port", simple(Some(9080), Some("raw_buffer"), &[])),
                chain("tls", simple(None, Some("tls"), &[])),
            ],
            true,
        );
        let c = "10.0.0.9:5555";
        let p =
            |port: u16, t, alpn: &[&str]| pick(&l, &format!("10.0.0.1:{port}"), c, None, t, alpn);
        assert_eq!(
            p(9080, "raw_buffer", &["http/1.1"]).as_deref(),
            Some("port")
        );
        assert_eq!(
            p(9081, "raw_buffer", &["http/1.1"]).as_deref(),
            Some("http1")
        );
        assert_eq!(p(9081, "tls", &[]).as_deref(), Some("tls"));
        assert_eq!(p(9081, "raw_buffer", &[]).as_deref(), Some("default"));
        // No backtracking: the port subtree is chosen even when nothing in it matches further.
        assert_eq!(p(9080, "tls", &[]).as_deref(), Some("default"));
    }

    /// The virtualInbound shapes: destination port beats the catch-all prefix; longest prefix wins;
    /// SNI exact beats wildcard beats none; ALPN in the client's order; source type and ports.
    #[test]
    fn chain_match_every_criterion() {
        let cidr = |a: &str, len| Cidr {
            addr: a.parse().unwrap(),
            len,
        };
        let l = listener(
            vec![
                chain(
                    "catchall",
                    ChainMatch {
                        prefix_ranges: vec![cidr("0.0.0.0", 0)],
                        transport_protocol: Some("raw_buffer".into()),
                        ..Default::default()
                    },
                ),
                chain(
                    "catchall-http",
                    ChainMatch {
                        prefix_ranges: vec![cidr("0.0.0.0", 0)],
                        transport_protocol: Some("raw_buffer".into()),
                        application_protocols: vec!["http/1.1".into(), "h2c".into()],
                        ..Default::default()
                    },
                ),
                chain(
                    "net10",
                    ChainMatch {
                        prefix_ranges: vec![cidr("10.1.0.0", 16)],
                        ..Default::default()
                    },
                ),
                chain("p80", simple(Some(80), Some("raw_buffer"), &[])),
                chain(
                    "sni-exact",
                    ChainMatch {
                        destination_port: Some(443),
                        server_names: vec!["api.example.com".into()],
                        ..Default::default()
                    },
                ),
                chain(
                    "sni-wild",
                    ChainMatch {
                        destination_port: Some(443),
                        server_names: vec!["*.example.com".into()],
                        ..Default::default()
                    },
                ),
                chain(
                    "sni-none",
                    ChainMatch {
                        destination_port: Some(443),
                        ..Default::default()
                    },
                ),
                chain(
                    "local-only",
                    ChainMatch {
                        destination_port: Some(7000),
                        source_type: crate::config::SourceType::Local,
                        ..Default::default()
                    },
                ),
                chain(
                    "src-port",
                    ChainMatch {
                        destination_port: Some(7001),
                        source_ports: vec![4000],
                        ..Default::default()
                    },
                ),
            ],
            false,
        );
        let ext = "192.168.1.1:1234";
        let p = |dst: &str, sni, t, alpn: &[&str]| pick(&l, dst, ext, sni, t, alpn);
        assert_eq!(
            p("10.2.0.1:9", None, "raw_buffer", &[]).as_deref(),
            Some("catchall")
        );
        assert_eq!(
            p("10.2.0.1:9", None, "raw_buffer", &["h2c"]).as_deref(),
            Some("catchall-http")
        );
        assert_eq!(
            p("10.1.3.4:9", None, "raw_buffer", &[]).as_deref(),
            Some("net10")
        );
        assert_eq!(
            p("10.2.0.1:80", None, "raw_buffer", &["http/1.1"]).as_deref(),
            Some("p80")
        );
        assert_eq!(p("10.2.0.1:80", None, "tls", &[]), None);
        assert_eq!(
            p("10.2.0.1:443", Some("api.example.com"), "tls", &[]).as_deref(),
            Some("sni-exact")
        );
        assert_eq!(
            p("10.2.0.1:443", Some("www.example.com"), "tls", &[]).as_deref(),
            Some("sni-wild")
        );
        assert_eq!(
            p("10.2.0.1:443", Some("a.b.example.com"), "tls", &[]).as_deref(),
            Some("sni-wild")
        );
        assert_eq!(
            p("10.2.0.1:443", Some("other.org"), "tls", &[]).as_deref(),
            Some("sni-none")
        );
        assert_eq!(p("10.2.0.1:7000", None, "raw_buffer", &[]), None);
        assert_eq!(
            pick(&l, "10.2.0.1:7000", "127.0.0.1:5", None, "raw_buffer", &[]).as_deref(),
            Some("local-only")
        );
        assert_eq!(
            pick(
                &l,
                "10.2.0.1:7001",
                "192.168.1.1:4000",
                None,
                "raw_buffer",
                &[]
            )
            .as_deref(),
            Some("src-port")
        );
        assert_eq!(p("10.2.0.1:7001", None, "raw_buffer", &[]), None);
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
