// SPDX-License-Identifier: Apache-2.0
//! The agent's xDS proxy (pilot-agent `pkg/istio-agent/xds_proxy.go`, `xds_proxy_delta.go`): an
//! ADS server on a Unix socket (`./etc/istio/proxy/XDS`) that the proxy's bootstrap points its
//! `xds-grpc` cluster at, relaying every stream to istiod over TLS.
//!
//! As pilot-agent does:
//!
//! - every downstream stream (state of the world or delta) gets its own upstream connection and
//!   stream to istiod (a new downstream stream must not consume what an older one left pending,
//!   and may land on another istiod);
//! - upstream: TLS trusting the configured root bundle (server name: the discovery address' host
//!   unless overridden), the workload certificate as client certificate when the agent has one,
//!   `authorization: Bearer <token>` from the token file when configured, `ClusterID` and any
//!   `XDS_HEADER_*` headers; HTTP/2 keepalive 30 s / 10 s;
//! - requests and responses are relayed unchanged (ACKs and NACKs included); responses of types
//!   the proxy cannot use (neither `envoy.*` nor workload addresses) are not forwarded;
//! - with DNS capture on, the first LDS request of a stream is followed by the agent's own NDS
//!   subscription (`istio.networking.nds.v1.NameTable`); NDS responses are consumed here (the
//!   table goes to the DNS proxy), ACKed or NACKed upstream by the agent, never forwarded;
//! - when the upstream stream ends or fails, the downstream stream is ended with the same status
//!   (an end without error as a plain end): the proxy reconnects with its own backoff and replays
//!   its whole subscription state on a fresh upstream stream. pilot-agent does this on purpose
//!   ("we must propagate upstream termination to Envoy"), since only the client knows what it
//!   holds; a replay by the agent on a silently reconnected upstream could not restore the
//!   delta versions or nonces the proxy is waiting on. A failed dial ends the downstream stream
//!   with `UNAVAILABLE` the same way.

mod upstream;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::nds::{NAME_TABLE_TYPE_URL, NameTable, NameTableSender};
use crate::sds::SecretReceiver;

pub use upstream::UpstreamError;

/// pilot-agent's socket, relative to its working directory (`/`).
pub const DEFAULT_SOCKET_PATH: &str = "./etc/istio/proxy/XDS";
/// ProxyConfig `discoveryAddress` default.
pub const DEFAULT_DISCOVERY_ADDRESS: &str = "istiod.istio-system.svc:15012";
/// The root bundle pilot-agent trusts for istiod by default (the `istio-ca-root-cert` mount).
pub const DEFAULT_ROOT_CERT_PATH: &str = "./var/run/secrets/istio/root-cert.pem";
/// The projected service-account token (audience `istio-ca`).
pub const DEFAULT_TOKEN_PATH: &str = "./var/run/secrets/tokens/istio-token";

const LISTENER_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const WORKLOAD_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";

/// How to reach and authenticate to istiod.
#[derive(Clone, Debug)]
pub struct XdsProxyConfig {
    /// The Unix socket the proxy connects to.
    pub socket_path: PathBuf,
    /// istiod's `host:port` (ProxyConfig `discoveryAddress`).
    pub discovery_address: String,
    /// PEM roots trusted for istiod's serving certificate; `None` dials in plaintext
    /// (ProxyConfig `controlPlaneAuthPolicy: NONE`).
    pub root_cert_path: Option<PathBuf>,
    /// TLS name to verify (ISTIOD_SAN); default: the host of `discovery_address`.
    pub server_name: Option<String>,
    /// The token file sent as `authorization: Bearer …` on every stream (re-read each time);
    /// `None` or an empty file sends none.
    pub token_path: Option<PathBuf>,
    /// `ClusterID` header (ISTIO_META_CLUSTER_ID).
    pub cluster_id: String,
    /// Extra headers on every upstream stream (XDS_HEADER_<name>=<value>).
    pub extra_headers: Vec<(String, String)>,
    /// Dial timeout (pilot-agent: 5 s).
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive ping interval and timeout to istiod.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl XdsProxyConfig {
    /// pilot-agent's defaults for everything but the socket path and the discovery address.
    pub fn new(socket_path: impl Into<PathBuf>, discovery_address: impl Into<String>) -> Self {
        Self {
            socket_path: socket_path.into(),
            discovery_address: discovery_address.into(),
            root_cert_path: Some(PathBuf::from(DEFAULT_ROOT_CERT_PATH)),
            server_name: None,
            token_path: None,
            cluster_id: "Kubernetes".to_owned(),
            extra_headers: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XdsProxyError {
    #[error("xDS socket: {0}")]
    Socket(#[from] crate::h2serve::UdsError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// Counters of the proxy's activity (tests, and the status server's `istio_agent_*` metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// downstream streams accepted
    pub streams: AtomicU64,
    /// upstream streams established
    pub upstream_connects: AtomicU64,
    /// upstream dials or stream starts that failed
    pub upstream_failures: AtomicU64,
    /// upstream streams that ended or failed after being established
    pub upstream_terminations: AtomicU64,
    /// requests relayed to istiod (the agent's own NDS requests and replies included)
    pub requests: AtomicU64,
    /// responses received from istiod
    pub responses: AtomicU64,
    /// downstream NACKs relayed
    pub nacks: AtomicU64,
    /// name tables received and accepted
    pub name_tables: AtomicU64,
    /// name tables rejected (NACKed)
    pub name_table_rejects: AtomicU64,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Shared {
    upstream: upstream::Upstream,
    names: Option<NameTableSender>,
    stats: Arc<Stats>,
    stop: watch::Receiver<bool>,
}

/// The xDS proxy.
pub struct XdsProxy;

impl XdsProxy {
    /// Listens on `cfg.socket_path` (a stale socket is removed, the directory created, the socket
    /// made 0666 as pilot-agent does) and relays to istiod. `secrets` provides the client
    /// certificate (the current one is used at each dial; `None` or no secret yet: token only).
    /// `names`, when given, turns on the NDS subscription and receives every accepted table.
    pub async fn start(
        cfg: XdsProxyConfig,
        secrets: Option<SecretReceiver>,
        names: Option<NameTableSender>,
    ) -> Result<XdsProxyHandle, XdsProxyError> {
        let upstream = upstream::Upstream::new(&cfg, secrets)?;
        let path = cfg.socket_path.clone();
        let listener = crate::h2serve::bind_uds(&path, "xDS")?;
        let stats = Arc::new(Stats::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            upstream,
            names,
            stats: stats.clone(),
            stop: stop_rx.clone(),
        });
        let svc = AggregatedDiscoveryServiceServer::new(Ads { shared })
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let server =
            crate::h2serve::UdsServer::spawn(path.clone(), listener, svc, "xDS proxy", stop_tx);
        tracing::info!(path = %path.display(), upstream = %cfg.discovery_address, "xDS proxy listening");
        Ok(XdsProxyHandle { server, stats })
    }
}

/// A running xDS proxy; stops (ending every stream) when shut down or dropped.
pub struct XdsProxyHandle {
    server: crate::h2serve::UdsServer,
    stats: Arc<Stats>,
}

impl XdsProxyHandle {
    pub fn path(&self) -> &Path {
        self.server.path()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Stops accepting, ends the streams, waits for the server task and removes the socket.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// The two ADS variants, for one relay implementation.
trait Flavor: Send + Sync + 'static {
    type Req: prost::Message + Default + Send + 'static;
    type Resp: prost::Message + Default + Send + 'static;
    const PATH: &'static str;
    const NAME: &'static str;
    fn req_type(r: &Self::Req) -> &str;
    fn is_nack(r: &Self::Req) -> bool;
    fn resp_type(r: &Self::Resp) -> &str;
    fn subscribe(type_url: &str) -> Self::Req;
    fn first_resource(r: &Self::Resp) -> Option<&Any>;
    fn reply(r: &Self::Resp, error: Option<String>) -> Self::Req;
}

fn error_status(message: String) -> envoy_types::pb::google::rpc::Status {
    envoy_types::pb::google::rpc::Status {
        code: tonic::Code::Internal as i32,
        message,
        details: Vec::new(),
    }
}

struct Sotw;

impl Flavor for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const PATH: &'static str =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
    const NAME: &'static str = "sotw";
    fn req_type(r: &DiscoveryRequest) -> &str {
        &r.type_url
    }
    fn is_nack(r: &DiscoveryRequest) -> bool {
        r.error_detail.is_some()
    }
    fn resp_type(r: &DiscoveryResponse) -> &str {
        &r.type_url
    }
    fn subscribe(type_url: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.to_owned(),
            ..Default::default()
        }
    }
    fn first_resource(r: &DiscoveryResponse) -> Option<&Any> {
        r.resources.first()
    }
    fn reply(r: &DiscoveryResponse, error: Option<String>) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: r.version_info.clone(),
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: error.map(error_status),
            ..Default::default()
        }
    }
}

struct Delta;

impl Flavor for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const PATH: &'static str =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
    const NAME: &'static str = "delta";
    fn req_type(r: &DeltaDiscoveryRequest) -> &str {
        &r.type_url
    }
    fn is_nack(r: &DeltaDiscoveryRequest) -> bool {
        r.error_detail.is_some()
    }
    fn resp_type(r: &DeltaDiscoveryResponse) -> &str {
        &r.type_url
    }
    fn subscribe(type_url: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            ..Default::default()
        }
    }
    fn first_resource(r: &DeltaDiscoveryResponse) -> Option<&Any> {
        r.resources.first().and_then(|r| r.resource.as_ref())
    }
    fn reply(r: &DeltaDiscoveryResponse, error: Option<String>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: error.map(error_status),
            ..Default::default()
        }
    }
}

/// Whether istiod's response is for the proxy (pilot-agent `IsEnvoyType` or workload addresses).
fn forwardable(type_url: &str) -> bool {
    type_url.starts_with("type.googleapis.com/envoy.") || type_url == WORKLOAD_TYPE_URL
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct Ads {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(start_relay::<Sotw>(
            self.shared.clone(),
            req.into_inner(),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(start_relay::<Delta>(
            self.shared.clone(),
            req.into_inner(),
        )))
    }
}

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(0);

fn start_relay<F: Flavor>(
    shared: Arc<Shared>,
    downstream: Streaming<F::Req>,
) -> BoxStream<F::Resp> {
    // pilot-agent buffers one response between istiod and the proxy.
    let (down_tx, down_rx) = mpsc::channel(1);
    Stats::inc(&shared.stats.streams);
    tokio::spawn(async move {
        let id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed) + 1;
        let mut stop = shared.stop.clone();
        let end = tokio::select! {
            end = relay::<F>(&shared, id, downstream, &down_tx) => end,
            _ = crate::h2serve::stopped(&mut stop) => Some(Status::unavailable("the agent's xDS proxy is stopping")),
        };
        if let Some(status) = end {
            let _ = down_tx.send(Err(status)).await;
        }
    });
    Box::pin(ReceiverStream::new(down_rx))
}

/// Relays one downstream stream; returns the status to end the downstream stream with (`None`:
/// a plain end, or the proxy is gone).
async fn relay<F: Flavor>(
    shared: &Shared,
    id: u64,
    mut downstream: Streaming<F::Req>,
    down_tx: &mpsc::Sender<Result<F::Resp, Status>>,
) -> Option<Status> {
    let stats = shared.stats.clone();
    let (up_tx, up_rx) = mpsc::unbounded_channel::<F::Req>();
    // Downstream → upstream: started at once, so the proxy's requests queue while we dial.
    let (down_end_tx, mut down_end) = oneshot::channel::<Option<Status>>();
    let nds = shared.names.is_some();
    let fwd = up_tx.clone();
    let reader = tokio::spawn(async move {
        let mut initial_sent = false;
        let end = loop {
            match downstream.message().await {
                Ok(Some(req)) => {
                    let lds = F::req_type(&req) == LISTENER_TYPE_URL;
                    if F::is_nack(&req) {
                        Stats::inc(&stats.nacks);
                    }
                    if fwd.send(req).is_err() {
                        break None;
                    }
                    if lds && !initial_sent {
                        initial_sent = true;
                        if nds {
                            let _ = fwd.send(F::subscribe(NAME_TABLE_TYPE_URL));
                        }
                    }
                }
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        };
        let _ = down_end_tx.send(end);
    });
    let _reader = AbortOnDrop(reader);
    let counted = CountRequests {
        inner: UnboundedReceiverStream::new(up_rx),
        stats: shared.stats.clone(),
    };

    let connect = async {
        let channel = shared.upstream.connect().await?;
        shared
            .upstream
            .open::<F::Req, F::Resp, _>(channel, counted, F::PATH)
            .await
    };
    let mut upstream = tokio::select! {
        up = connect => match up {
            Ok(up) => up,
            Err(e) => {
                Stats::inc(&shared.stats.upstream_failures);
                tracing::warn!(id, kind = F::NAME, error = %e, "xDS proxy: cannot reach istiod");
                return Some(Status::unavailable(e.to_string()));
            }
        },
        _ = &mut down_end => return None,
        _ = down_tx.closed() => return None,
    };
    Stats::inc(&shared.stats.upstream_connects);
    tracing::info!(id, kind = F::NAME, upstream = %shared.upstream.address(), "xDS proxy: connected to istiod");

    loop {
        tokio::select! {
            m = upstream.message() => match m {
                Ok(Some(resp)) => {
                    Stats::inc(&shared.stats.responses);
                    let type_url = F::resp_type(&resp);
                    if type_url == NAME_TABLE_TYPE_URL && let Some(names) = &shared.names {
                        // Internal type: consumed here, a singleton; an empty response needs no reply.
                        if let Some(any) = F::first_resource(&resp) {
                            let error = accept_name_table(&shared.stats, names, any);
                            let _ = up_tx.send(F::reply(&resp, error));
                        }
                        continue;
                    }
                    if !forwardable(type_url) {
                        tracing::warn!(id, type_url, "xDS proxy: not forwarding a type the proxy cannot use");
                        continue;
                    }
                    if down_tx.send(Ok(resp)).await.is_err() {
                        return None;
                    }
                }
                Ok(None) => {
                    Stats::inc(&shared.stats.upstream_terminations);
                    tracing::info!(id, kind = F::NAME, "xDS proxy: istiod ended the stream");
                    return None;
                }
                Err(status) => {
                    Stats::inc(&shared.stats.upstream_terminations);
                    tracing::warn!(id, kind = F::NAME, %status, "xDS proxy: upstream stream failed");
                    return Some(status);
                }
            },
            end = &mut down_end => {
                if let Ok(Some(status)) = end {
                    tracing::debug!(id, %status, "xDS proxy: downstream stream failed");
                }
                return None;
            }
            _ = down_tx.closed() => return None,
        }
    }
}

fn accept_name_table(stats: &Stats, names: &NameTableSender, any: &Any) -> Option<String> {
    match NameTable::decode(any.value.as_slice()) {
        Ok(table) => {
            tracing::debug!(hosts = table.table.len(), "xDS proxy: name table updated");
            names.send_replace(Some(Arc::new(table)));
            Stats::inc(&stats.name_tables);
            None
        }
        Err(e) => {
            Stats::inc(&stats.name_table_rejects);
            Some(format!("decoding the name table: {e}"))
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The upstream request stream, counting what goes to istiod.
struct CountRequests<T> {
    inner: UnboundedReceiverStream<T>,
    stats: Arc<Stats>,
}

impl<T> Stream for CountRequests<T> {
    type Item = T;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        if let std::task::Poll::Ready(Some(_)) = &polled {
            Stats::inc(&self.stats.requests);
        }
        polled
    }
}
