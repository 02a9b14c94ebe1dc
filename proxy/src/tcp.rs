// SPDX-License-Identifier: Apache-2.0
//! `envoy.filters.network.tcp_proxy`: pick a cluster (weighted), an endpoint, connect, and copy bytes.

use crate::Shared;
use crate::config::TcpProxy;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

/// Where upstream connections leave from when the listener has `original_src` (TPROXY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSource {
    /// the downstream's address (port 0 unless `bind_port`)
    pub addr: SocketAddr,
    /// SO_MARK (0 = none)
    pub mark: u32,
}

/// What the tcp_proxy knows of its downstream connection.
#[derive(Debug, Clone)]
pub struct Conn {
    /// our local address (the original destination after capture)
    pub local: SocketAddr,
    /// the downstream peer
    pub remote: SocketAddr,
    /// where an ORIGINAL_DST cluster connects
    pub original_dst: Option<SocketAddr>,
    /// `original_src` (TPROXY)
    pub upstream_src: Option<UpstreamSource>,
    /// the downstream's verified SPIFFE identity (mTLS), shared with internal upstreams
    pub peer_principal: Option<arcstr::ArcStr>,
}

/// An upstream byte stream of any kind (TCP, TLS, an internal listener's pipe).
pub trait Upstream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Upstream for T {}

/// Proxies one downstream connection.
pub async fn proxy<D>(shared: &Arc<Shared>, cfg: Arc<TcpProxy>, mut downstream: D, conn: Conn)
where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    shared.stats.tcp(&cfg.stat_prefix).cx_total.inc();
    let name = if cfg.clusters.len() == 1 {
        cfg.clusters[0].0.clone()
    } else {
        let mut v = rand::random::<u64>() % cfg.total_weight.max(1);
        let mut chosen = cfg.clusters[0].0.clone();
        for (n, w) in &cfg.clusters {
            if v < *w {
                chosen = n.clone();
                break;
            }
            v -= w;
        }
        chosen
    };
    let tcp_stats = shared.stats.tcp(&cfg.stat_prefix);
    let Some(cluster) = shared.clusters.get(&name) else {
        tracing::debug!(cluster = %name, "tcp_proxy: cluster not found; closing");
        tcp_stats.no_route.inc();
        return;
    };
    let stats = shared.stats.cluster(&name);
    stats
        .bytes_counted
        .store(true, std::sync::atomic::Ordering::Relaxed);
    // Circuit breaker: max_connections (Envoy closes the downstream connection).
    let Some(_slot) = cluster.tcp_slot() else {
        stats.cx_overflow.inc();
        tracing::debug!(cluster = %name, "tcp_proxy: max_connections reached; closing");
        return;
    };
    let Some(picked) = cluster.pick(None, &[], 1, conn.original_dst) else {
        stats.none_healthy.inc();
        tracing::debug!(cluster = %name, "tcp_proxy: no healthy upstream; closing");
        return;
    };
    let tunnel = cfg.tunneling.as_ref().map(|t| {
        let headers: Vec<_> = t
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), v.render(conn.local, conn.remote)))
            .collect();
        (t.hostname.render(conn.local, conn.remote), headers)
    });
    let connected = match &tunnel {
        None => connect_upstream(shared, &cluster, &picked, &conn).await,
        // HTTP/2 connections carrying CONNECT streams are pooled per endpoint, as Envoy's
        // cluster connection pool does.
        Some((authority, headers)) => {
            crate::tunnel::open(shared, &cluster, &picked, &conn, authority, headers)
                .await
                .map(|s| Box::new(s) as Box<dyn Upstream>)
        }
    };
    let mut upstream = match connected {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(cluster = %name, upstream = %picked.addr, "tcp_proxy: connect: {e}");
            stats.cx_connect_fail.inc();
            cluster.record(&picked, crate::cluster::outlier::Outcome::ConnectFailed);
            return;
        }
    };
    // A connection counts as a success for outlier detection.
    cluster.record(&picked, crate::cluster::outlier::Outcome::Status(200));
    stats.rq_total.inc();
    if tunnel.is_none() {
        stats.cx_total.inc();
    }
    // Keep the active-request count for least-request while the connection lives.
    let _picked = picked;
    let counters = ByteCounters {
        downstream: Some(tcp_stats.clone()),
        upstream: stats,
    };
    if let Ok(Ended::Idle) =
        copy_with_idle_timeout(&mut downstream, &mut upstream, cfg.idle_timeout, &counters).await
    {
        tcp_stats.idle_timeout.inc();
    }
}

/// The byte counters a copy loop feeds: Envoy's tcp_proxy `downstream_cx_{rx,tx}_bytes_total` and
/// the cluster's `upstream_cx_{rx,tx}_bytes_total`.
pub(crate) struct ByteCounters {
    /// tcp_proxy counters (none for a terminated CONNECT)
    pub downstream: Option<Arc<crate::stats::TcpStats>>,
    /// the cluster's
    pub upstream: Arc<crate::stats::ClusterStats>,
}

impl ByteCounters {
    /// `n` bytes read from the downstream (`true`) or the upstream.
    pub fn moved(&self, from_downstream: bool, n: usize) {
        let n = n as u64;
        if from_downstream {
            if let Some(d) = &self.downstream {
                d.rx_bytes.add(n);
            }
            self.upstream.cx_tx_bytes.add(n);
        } else {
            if let Some(d) = &self.downstream {
                d.tx_bytes.add(n);
            }
            self.upstream.cx_rx_bytes.add(n);
        }
    }
}

/// How a copy loop ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// both sides closed
    Closed,
    /// nothing moved for the idle timeout
    Idle,
}

/// Connects to the picked endpoint: an internal listener, TLS, or plain TCP (from the downstream's
/// address under `original_src`), within the cluster's connect timeout.
pub async fn connect_upstream(
    shared: &Arc<Shared>,
    cluster: &crate::cluster::ClusterState,
    picked: &crate::cluster::Picked,
    conn: &Conn,
) -> std::io::Result<Box<dyn Upstream>> {
    if let Some(ep) = &picked.internal {
        let Some(apps) = shared.apps() else {
            return Err(std::io::Error::other("proxy is stopping"));
        };
        let mut passed = crate::internal::Passed::for_endpoint(&cluster.config, ep);
        passed.peer_principal = conn.peer_principal.clone();
        return Ok(Box::new(crate::internal::connect(
            &apps,
            &ep.listener,
            passed,
        )?));
    }
    if let Some((_, tls)) = &picked.tls {
        let s = crate::tls::tunnel::connect_tls(
            tls,
            &shared.secrets,
            picked.addr,
            cluster.config.bind_source,
            cluster.config.connect_timeout,
            None,
        )
        .await?;
        return Ok(Box::new(s));
    }
    let connect = async {
        match conn.upstream_src {
            Some(src) if src.addr.is_ipv4() == picked.addr.is_ipv4() => {
                connect_transparent(picked.addr, src).await
            }
            _ => connect(picked.addr, cluster.config.bind_source).await,
        }
    };
    let s = pingora_timeout::timeout(cluster.config.connect_timeout, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))??;
    let _ = s.set_nodelay(true);
    Ok(Box::new(s))
}

/// Connects, from `source` when the cluster has `upstream_bind_config` (Istio's 127.0.0.6).
async fn connect(addr: SocketAddr, source: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(src) = source else {
        return TcpStream::connect(addr).await;
    };
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(src, 0))?;
    sock.connect(addr).await
}

/// Connects from the downstream's own address (original_src): IP_TRANSPARENT lets the socket bind
/// a non-local address, SO_MARK routes the replies back to this host (istiod's mark 1337, which
/// the agent's TPROXY rules route locally). Needs CAP_NET_ADMIN.
async fn connect_transparent(addr: SocketAddr, src: UpstreamSource) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{setsockopt, sockopt};
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    setsockopt(&sock, sockopt::IpTransparent, &true).map_err(std::io::Error::from)?;
    if src.mark != 0 {
        setsockopt(&sock, sockopt::Mark, &src.mark).map_err(std::io::Error::from)?;
    }
    if src.addr.port() != 0 {
        sock.set_reuseaddr(true)?;
    }
    sock.bind(src.addr)?;
    sock.connect(addr).await
}

/// Pingora's custom L4 connector for HTTP upstreams of an `original_src` listener: each upstream
/// connection leaves from the downstream's address (see [`connect_transparent`]).
#[derive(Debug)]
pub struct TransparentConnect {
    /// where connections leave from
    pub src: UpstreamSource,
    /// the cluster's `connect_timeout`
    pub timeout: std::time::Duration,
}

#[async_trait::async_trait]
impl pingora_core::connectors::L4Connect for TransparentConnect {
    async fn connect(
        &self,
        addr: &pingora_core::protocols::l4::socket::SocketAddr,
    ) -> pingora_error::Result<pingora_core::protocols::l4::stream::Stream> {
        use pingora_error::{Error, ErrorType};
        let Some(inet) = addr.as_inet() else {
            return Err(Error::explain(
                ErrorType::ConnectError,
                "original_src: the upstream is not an IP address",
            ));
        };
        match pingora_timeout::timeout(self.timeout, connect_transparent(*inet, self.src)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s.into())
            }
            Ok(Err(e)) => Err(Error::because(
                ErrorType::ConnectError,
                format!("original_src: connecting to {inet} from {}", self.src.addr),
                e,
            )),
            Err(_) => Err(Error::explain(
                ErrorType::ConnectTimedout,
                format!("original_src: connecting to {inet}"),
            )),
        }
    }
}

/// Initial copy buffer: most mesh TCP exchanges are small; the buffer grows once a read fills it.
const INITIAL_BUF: usize = 4 * 1024;
/// Largest copy buffer per direction.
const MAX_BUF: usize = 64 * 1024;

/// Copies both ways until both sides have closed, or nothing moved in either direction for
/// `idle` (tcp_proxy `idle_timeout`, Envoy's default 1 h). A half-close is propagated with shutdown.
pub(crate) async fn copy_with_idle_timeout<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Option<std::time::Duration>,
    counters: &ByteCounters,
) -> std::io::Result<Ended>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut buf_a, mut buf_b) = (vec![0u8; INITIAL_BUF], vec![0u8; INITIAL_BUF]);
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        let step = async {
            tokio::select! {
                r = ar.read(&mut buf_a), if a_open => (true, r),
                r = br.read(&mut buf_b), if b_open => (false, r),
            }
        };
        let (from_a, r) = match idle {
            Some(t) => match pingora_timeout::timeout(t, step).await {
                Ok(x) => x,
                Err(_) => return Ok(Ended::Idle),
            },
            None => step.await,
        };
        let n = r?;
        counters.moved(from_a, n);
        if from_a {
            forward(&mut buf_a, n, &mut bw, &mut a_open).await?;
        } else {
            forward(&mut buf_b, n, &mut aw, &mut b_open).await?;
        }
    }
    Ok(Ended::Closed)
}

/// Writes what was read (or half-closes on EOF) and grows the buffer after a full read.
async fn forward<W: tokio::io::AsyncWrite + Unpin>(
    buf: &mut Vec<u8>,
    n: usize,
    w: &mut W,
    open: &mut bool,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    if n == 0 {
        *open = false;
        let _ = w.shutdown().await;
        return Ok(());
    }
    w.write_all(&buf[..n]).await?;
    if n == buf.len() && buf.len() < MAX_BUF {
        buf.resize(buf.len() * 2, 0);
    }
    Ok(())
}
