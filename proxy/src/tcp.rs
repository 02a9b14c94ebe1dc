// SPDX-License-Identifier: Apache-2.0
//! `envoy.filters.network.tcp_proxy`: pick a cluster (weighted), an endpoint, connect, and copy bytes.

use crate::Shared;
use crate::config::TcpProxy;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

/// Proxies one downstream connection.
pub async fn proxy(
    shared: &Arc<Shared>,
    cfg: Arc<TcpProxy>,
    mut downstream: TcpStream,
    original_dst: Option<SocketAddr>,
) {
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
    let Some(cluster) = shared.clusters.get(&name) else {
        tracing::debug!(cluster = %name, "tcp_proxy: cluster not found; closing");
        return;
    };
    let stats = shared.stats.cluster(&name);
    let Some(picked) = cluster.pick(None, &[], 1, original_dst) else {
        stats.none_healthy.inc();
        tracing::debug!(cluster = %name, "tcp_proxy: no healthy upstream; closing");
        return;
    };
    let connect = TcpStream::connect(picked.addr);
    let mut upstream = match pingora_timeout::timeout(cluster.config.connect_timeout, connect).await
    {
        Ok(Ok(s)) => s,
        _ => {
            stats.cx_connect_fail.inc();
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    stats.rq_total.inc();
    // Keep the active-request count for least-request while the connection lives.
    let _picked = picked;
    let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
}
