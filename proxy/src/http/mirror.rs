// SPDX-License-Identifier: Apache-2.0
//! Request mirroring (`request_mirror_policies`): a fire-and-forget copy of the request, with the
//! authority suffixed `-shadow` as Envoy does, sent to the mirror cluster; its response is read and
//! discarded, and nothing about it affects the primary request.

use crate::cluster::ClusterState;
use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Upper bound for one shadow exchange: a mirror must never hold resources for long.
const SHADOW_DEADLINE: Duration = Duration::from_secs(30);

/// The request body feed of a running mirror; dropping it ends the body.
pub struct MirrorBody {
    tx: mpsc::UnboundedSender<Bytes>,
}

impl MirrorBody {
    /// Forwards a chunk of the downstream body (a cheap clone of the same buffer).
    pub fn send(&self, chunk: &Bytes) {
        let _ = self.tx.send(chunk.clone());
    }
}

/// `host[:port]` → `host-shadow[:port]`.
pub fn shadow_authority(authority: &str) -> String {
    let (host, port) = pingsail_filters::route::split_host_port(authority);
    match port {
        Some(p) => format!("{host}-shadow:{p}"),
        None => format!("{host}-shadow"),
    }
}

/// Starts a mirror of `req` to `cluster`. Returns the body feed when the request has a body.
pub fn spawn(
    connector: Arc<Connector>,
    cluster: Arc<ClusterState>,
    mut req: RequestHeader,
    has_body: bool,
) -> Option<MirrorBody> {
    let authority = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let shadow = shadow_authority(&authority);
    let _ = req.insert_header(http::header::HOST, shadow);
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let body = has_body.then_some(MirrorBody { tx });
    tokio::spawn(async move {
        let exchange = async move {
            let picked = cluster.pick(None, &[], 1, None)?;
            let mut peer = HttpPeer::new(picked.addr, false, String::new());
            peer.options.connection_timeout = Some(cluster.config.connect_timeout);
            if cluster.config.http2 {
                peer.options.set_http_version(2, 2);
            }
            let (mut session, _reused) = connector.get_http_session(&peer).await.ok()?;
            session.write_request_header(Box::new(req)).await.ok()?;
            if has_body {
                while let Some(chunk) = rx.recv().await {
                    session.write_request_body(chunk, false).await.ok()?;
                }
            }
            session.finish_request_body().await.ok()?;
            session.read_response_header().await.ok()?;
            while let Ok(Some(_)) = session.read_response_body().await {}
            connector.release_http_session(session, &peer, None).await;
            Some(())
        };
        let _ = pingora_timeout::timeout(SHADOW_DEADLINE, exchange).await;
    });
    body
}

#[cfg(test)]
mod tests {
    #[test]
    fn shadow_host() {
        assert_eq!(
            super::shadow_authority("reviews:9080"),
            "reviews-shadow:9080"
        );
        assert_eq!(super::shadow_authority("reviews"), "reviews-shadow");
        assert_eq!(super::shadow_authority("[::1]:80"), "[::1]-shadow:80");
    }
}
