// SPDX-License-Identifier: Apache-2.0
//! CONNECT termination: a route with `upgrade_configs: [{upgrade_type: CONNECT, connect_config:
//! {}}]` answers `200` and carries the stream's payload as raw TCP to its cluster (a TCP
//! endpoint, TLS, or an internal listener such as Istio's `main_internal`).
//!
//! Istio's `connect_authority` (enabled on the route) hands the `:authority` to the internal
//! listener behind, whose `set_dst_address` makes it the connection's local address; the
//! downstream's verified identity travels along (`istio_authn`).

use super::{ConnFacts, RequestCtx, Router};
use crate::cluster::ClusterState;
use bytes::Bytes;
use pingora_error::{ErrorType, OrErr as _, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use pingsail_filters::route::RouteAction;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest chunk read from the upstream per DATA frame.
const CHUNK: usize = 16 * 1024;

impl Router {
    /// Terminates the CONNECT on `session` towards `cluster`; `Ok(true)`: the response is done.
    pub(super) async fn connect_terminate(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        facts: &Arc<ConnFacts>,
        cluster: Arc<ClusterState>,
        action: &RouteAction,
    ) -> Result<bool> {
        let stats = self.shared.stats.cluster(&cluster.config.name);
        let Some(_slot) = cluster.tcp_slot() else {
            stats.cx_overflow.inc();
            return self.fail(session, ctx, super::Failure::Overflow).await;
        };
        let Some(picked) = cluster.pick(None, &[], 1, facts.original_dst) else {
            stats.none_healthy.inc();
            return self
                .fail(session, ctx, super::Failure::NoHealthyUpstream)
                .await;
        };
        let conn = crate::tcp::Conn {
            local: facts.local,
            remote: facts.remote,
            original_dst: facts.original_dst,
            upstream_src: facts.upstream_src,
            peer_principal: facts.peer_principal.clone(),
        };
        let connected = if let Some(ep) = picked.internal.as_ref() {
            // The internal listener learns the authority (connect_authority) and the peer.
            let mut passed = crate::internal::Passed::for_endpoint(&cluster.config, ep);
            passed.peer_principal = facts.peer_principal.clone();
            let req = session.req_header();
            if facts.hcm.connect_authority
                && let Some((true, port)) = action.connect_authority
            {
                passed.authority = Some((super::authority(req).to_string(), port));
            }
            if let Some(fs) = &facts.hcm.set_filter_state {
                let value = |h: &str| match h {
                    ":authority" => Some(super::authority(req)),
                    h => req.headers.get(h).and_then(|v| v.to_str().ok()),
                };
                let render = |t: &crate::config::Template| {
                    t.render_req(
                        facts.local,
                        facts.remote,
                        facts.peer_principal.as_deref(),
                        value,
                    )
                    .parse::<std::net::SocketAddr>()
                    .ok()
                };
                passed.local = fs.local.as_ref().and_then(render);
                passed.remote = fs.remote.as_ref().and_then(render);
            }
            match self.shared.apps() {
                Some(apps) => crate::internal::connect(&apps, &ep.listener, passed)
                    .map(|s| Box::new(s) as Box<dyn crate::tcp::Upstream>),
                None => Err(std::io::Error::other("proxy is stopping")),
            }
        } else {
            crate::tcp::connect_upstream(&self.shared, &cluster, &picked, &conn).await
        };
        let upstream = match connected {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(cluster = %cluster.config.name, "CONNECT: upstream: {e}");
                stats.cx_connect_fail.inc();
                cluster.record(&picked, crate::cluster::outlier::Outcome::ConnectFailed);
                return self
                    .fail(session, ctx, super::Failure::ConnectFailure)
                    .await;
            }
        };
        cluster.record(&picked, crate::cluster::outlier::Outcome::Status(200));
        stats.rq_total.inc();
        stats.cx_total.inc();
        stats
            .bytes_counted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let counters = crate::tcp::ByteCounters {
            downstream: None,
            upstream: stats.clone(),
        };
        let mut resp = ResponseHeader::build(200, None)?;
        resp.insert_header(http::header::SERVER, facts.hcm.server_name.clone())?;
        session
            .as_downstream_mut()
            .write_response_header(Box::new(resp))
            .await?;
        ctx.status = 200;
        if let Err(e) = pipe(session, upstream, &counters).await {
            tracing::debug!(cluster = %cluster.config.name, "CONNECT stream ended: {e}");
            // The client sees the stream reset.
            return Err(e);
        }
        Ok(true)
    }
}

/// Moves bytes between the CONNECT stream and the upstream until both directions have ended.
async fn pipe(
    session: &mut Session,
    upstream: Box<dyn crate::tcp::Upstream>,
    counters: &crate::tcp::ByteCounters,
) -> Result<()> {
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let mut buf = vec![0u8; CHUNK];
    let (mut down_open, mut up_open) = (true, true);
    while down_open || up_open {
        tokio::select! {
            body = session.as_downstream_mut().read_request_body(), if down_open => match body? {
                Some(b) => {
                    counters.moved(true, b.len());
                    uw.write_all(&b).await.or_err(ErrorType::WriteError, "CONNECT upstream")?
                }
                None => {
                    down_open = false;
                    let _ = uw.shutdown().await;
                }
            },
            n = ur.read(&mut buf), if up_open => {
                let n = n.or_err(ErrorType::ReadError, "CONNECT upstream")?;
                counters.moved(false, n);
                let down = session.as_downstream_mut();
                if n == 0 {
                    up_open = false;
                    down.write_response_body(Bytes::new(), true).await?;
                } else {
                    down.write_response_body(Bytes::copy_from_slice(&buf[..n]), false).await?;
                }
            }
        }
    }
    Ok(())
}
