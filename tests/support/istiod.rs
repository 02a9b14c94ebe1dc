// SPDX-License-Identifier: Apache-2.0
//! A fake istiod for tests: an ADS server (delta and state-of-the-world) over TCP or a Unix socket that
//! serves Envoy resources from YAML, pushes updates, records every request (ACKs, NACKs,
//! subscriptions) and can drop its streams.
//!
//! Push semantics follow istiod: state-of-the-world responses carry every resource of the type the
//! client asked for (all of them for listeners and clusters); delta responses carry what changed since
//! the client last got it, plus `removed_resources`.

use anyhow::{Context as _, Result, bail};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;

use tonic::{Request, Response, Status, Streaming};

pub use pingsail_proxy::xds::store::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};
/// istiod's name table (NDS), which the agent's xDS proxy subscribes to for its DNS proxy.
pub const NAME_TABLE: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";

/// One request a client sent.
#[derive(Debug, Clone)]
pub struct Seen {
    /// which stream (counts from 1 per server)
    pub stream: u64,
    /// a delta request
    pub delta: bool,
    /// type URL
    pub type_url: String,
    /// `version_info` (state of the world)
    pub version_info: String,
    /// `response_nonce`
    pub nonce: String,
    /// `resource_names` (SotW) or `resource_names_subscribe` (delta)
    pub names: Vec<String>,
    /// delta `resource_names_unsubscribe`
    pub unsubscribe: Vec<String>,
    /// delta `initial_resource_versions`
    pub initial_versions: HashMap<String, String>,
    /// the NACK's message
    pub error: Option<String>,
    /// the request carried the node
    pub has_node: bool,
    /// the node's id when present
    pub node_id: String,
    /// when the server received it
    pub at: std::time::Instant,
}

impl Seen {
    /// An ACK or NACK (answers a response) rather than a fresh subscription.
    pub fn is_reply(&self) -> bool {
        !self.nonce.is_empty()
    }
}

/// One response the server sent.
#[derive(Debug, Clone)]
pub struct Sent {
    /// which stream
    pub stream: u64,
    /// type URL
    pub type_url: String,
    /// nonce
    pub nonce: String,
    /// names of the resources carried
    pub names: Vec<String>,
    /// delta removals
    pub removed: Vec<String>,
    /// when the server built it (just before handing it to the stream)
    pub at: std::time::Instant,
}

#[derive(Default)]
struct Log {
    seen: Vec<Seen>,
    sent: Vec<Sent>,
}

#[derive(Default)]
struct Resources {
    /// type URL → name → (version, resource)
    by_type: BTreeMap<String, BTreeMap<String, (String, Any)>>,
    version: u64,
}

struct Inner {
    resources: Mutex<Resources>,
    log: Mutex<Log>,
    changed: watch::Sender<u64>,
    pushed: broadcast::Sender<()>,
    drop_streams: broadcast::Sender<()>,
    streams: std::sync::atomic::AtomicU64,
    nonce: std::sync::atomic::AtomicU64,
    /// when each type was last changed by the test (`set`): ACK waits look at what came after
    last_set: Mutex<HashMap<String, std::time::Instant>>,
    /// the request headers of every stream, in stream order
    headers: Mutex<Vec<BTreeMap<String, String>>>,
    /// per accepted TLS connection: whether the client presented a certificate
    client_certs: Mutex<Vec<bool>>,
}

impl Inner {
    fn note_seen(&self, s: Seen) {
        self.log.lock().seen.push(s);
        self.changed.send_modify(|v| *v += 1);
    }

    fn note_sent(&self, s: Sent) {
        self.log.lock().sent.push(s);
        self.changed.send_modify(|v| *v += 1);
    }

    fn next_nonce(&self) -> String {
        let n = self
            .nonce
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("n{}", n + 1)
    }

    fn version(&self) -> String {
        format!("v{}", self.resources.lock().version)
    }

    fn of_type(&self, type_url: &str) -> BTreeMap<String, (String, Any)> {
        self.resources
            .lock()
            .by_type
            .get(type_url)
            .cloned()
            .unwrap_or_default()
    }
}

/// Wildcard types: everything of the type is sent (listeners, clusters and istiod's name table).
fn wildcard(type_url: &str) -> bool {
    type_url == LISTENER || type_url == CLUSTER || type_url == NAME_TABLE
}

/// The fake control plane. Dropping it stops the server.
pub struct FakeIstiod {
    inner: Arc<Inner>,
    addr: Option<SocketAddr>,
    uds: Option<PathBuf>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The name a resource is keyed by.
pub fn resource_name(type_url: &str, any: &Any) -> Result<String> {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
    use prost::Message;
    let b = any.value.as_slice();
    Ok(match type_url {
        LISTENER => Listener::decode(b)?.name,
        CLUSTER => Cluster::decode(b)?.name,
        ROUTE => RouteConfiguration::decode(b)?.name,
        ENDPOINT => ClusterLoadAssignment::decode(b)?.cluster_name,
        SECRET => Secret::decode(b)?.name,
        other => bail!("unknown type {other}"),
    })
}

/// Parses a YAML list of resources of one type into `Any`s (through pingsail's own proto JSON
/// decoder, which follows the canonical proto3 JSON mapping).
pub fn resources_from_yaml(type_url: &str, yaml: &str) -> Result<Vec<Any>> {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
    use pingsail_proxy::xds::json::{from_json, parse_text};
    use prost::Message;
    let _schemas = pingsail_proxy::xds::pool::pool();
    let value = parse_text(yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let items = value
        .as_array()
        .context("resources YAML must be a list")?
        .clone();
    let mut out = Vec::new();
    for item in items {
        let bytes = match type_url {
            LISTENER => from_json::<Listener>(&item).map(|m| m.encode_to_vec()),
            CLUSTER => from_json::<Cluster>(&item).map(|m| m.encode_to_vec()),
            ROUTE => from_json::<RouteConfiguration>(&item).map(|m| m.encode_to_vec()),
            ENDPOINT => from_json::<ClusterLoadAssignment>(&item).map(|m| m.encode_to_vec()),
            SECRET => from_json::<Secret>(&item).map(|m| m.encode_to_vec()),
            other => bail!("unknown type {other}"),
        }
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        out.push(Any {
            type_url: type_url.into(),
            value: bytes,
        });
    }
    Ok(out)
}

impl FakeIstiod {
    /// Starts on an ephemeral TCP port on 127.0.0.1.
    pub async fn start_tcp() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (me, svc, mut stop_rx) = Self::new(Some(addr), None);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    a = listener.accept() => match a {
                        Ok((io, _)) => serve_conn(io, svc.clone()),
                        Err(_) => return,
                    },
                    _ = &mut stop_rx => return,
                }
            }
        });
        Ok(me)
    }

    /// Starts behind TLS (istiod's 15012) on an ephemeral port of 127.0.0.1.
    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> Result<Self> {
        Self::start_tls_at("127.0.0.1:0".parse()?, tls).await
    }

    /// Starts behind TLS on `addr` (a restarted istiod on the address of a stopped one: the
    /// bind is retried while the old listener is being released).
    pub async fn start_tls_at(addr: SocketAddr, tls: Arc<rustls::ServerConfig>) -> Result<Self> {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 200 && e.kind() == std::io::ErrorKind::AddrInUse => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("binding {addr}")),
            }
        };
        let addr = listener.local_addr()?;
        let (me, svc, mut stop_rx) = Self::new(Some(addr), None);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let inner = me.inner.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    a = listener.accept() => match a {
                        Ok((io, _)) => {
                            let (acceptor, svc, inner) = (acceptor.clone(), svc.clone(), inner.clone());
                            tokio::spawn(async move {
                                if let Ok(tls) = acceptor.accept(io).await {
                                    let cert = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                                    inner.client_certs.lock().push(cert);
                                    serve_conn(tls, svc);
                                }
                            });
                        }
                        Err(_) => return,
                    },
                    _ = &mut stop_rx => return,
                }
            }
        });
        Ok(me)
    }

    /// The request headers (gRPC metadata, lower-case names) of every stream so far.
    pub fn stream_headers(&self) -> Vec<BTreeMap<String, String>> {
        self.inner.headers.lock().clone()
    }

    /// Per accepted TLS connection: whether the client presented a (verified) certificate.
    pub fn tls_client_certs(&self) -> Vec<bool> {
        self.inner.client_certs.lock().clone()
    }

    /// Starts on a Unix socket at `path` (like pilot-agent's `./etc/istio/proxy/XDS`).
    pub async fn start_uds(path: &Path) -> Result<Self> {
        let listener = tokio::net::UnixListener::bind(path)?;
        let (me, svc, mut stop_rx) = Self::new(None, Some(path.to_path_buf()));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    a = listener.accept() => match a {
                        Ok((io, _)) => serve_conn(io, svc.clone()),
                        Err(_) => return,
                    },
                    _ = &mut stop_rx => return,
                }
            }
        });
        Ok(me)
    }

    fn new(
        addr: Option<SocketAddr>,
        uds: Option<PathBuf>,
    ) -> (
        Self,
        AggregatedDiscoveryServiceServer<Ads>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        let inner = Arc::new(Inner {
            resources: Mutex::new(Resources::default()),
            log: Mutex::new(Log::default()),
            changed: watch::Sender::new(0),
            pushed: broadcast::channel(64).0,
            drop_streams: broadcast::channel(4).0,
            streams: Default::default(),
            nonce: Default::default(),
            last_set: Mutex::new(HashMap::new()),
            headers: Mutex::new(Vec::new()),
            client_certs: Mutex::new(Vec::new()),
        });
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let svc = AggregatedDiscoveryServiceServer::new(Ads {
            inner: inner.clone(),
        })
        .max_decoding_message_size(256 * 1024 * 1024)
        .max_encoding_message_size(256 * 1024 * 1024);
        (
            FakeIstiod {
                inner,
                addr,
                uds,
                _stop: stop,
            },
            svc,
            stop_rx,
        )
    }

    /// The TCP address (for a bootstrap's `xds-grpc` cluster).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The Unix socket path.
    pub fn uds(&self) -> Option<&Path> {
        self.uds.as_deref()
    }

    /// Replaces every resource of `type_url` with `resources` (a resource whose bytes did not change
    /// keeps its version) and pushes to every stream.
    pub fn set(&self, type_url: &str, resources: Vec<Any>) -> Result<()> {
        self.inner
            .last_set
            .lock()
            .insert(type_url.to_string(), std::time::Instant::now());
        {
            let mut r = self.inner.resources.lock();
            r.version += 1;
            let version = format!("v{}", r.version);
            let old = r.by_type.remove(type_url).unwrap_or_default();
            let mut next = BTreeMap::new();
            for any in resources {
                let name = resource_name(type_url, &any)?;
                let v = match old.get(&name) {
                    Some((v, prev)) if *prev == any => v.clone(),
                    _ => version.clone(),
                };
                next.insert(name, (v, any));
            }
            r.by_type.insert(type_url.to_string(), next);
        }
        let _ = self.inner.pushed.send(());
        Ok(())
    }

    /// [`FakeIstiod::set`] from YAML.
    pub fn set_yaml(&self, type_url: &str, yaml: &str) -> Result<()> {
        self.set(type_url, resources_from_yaml(type_url, yaml)?)
    }

    /// Sets a resource of a type not known to proto decoding (e.g. a garbage `Any`) among the others.
    pub fn set_raw(&self, type_url: &str, name: &str, any: Any) {
        let mut r = self.inner.resources.lock();
        r.version += 1;
        let version = format!("v{}", r.version);
        r.by_type
            .entry(type_url.to_string())
            .or_default()
            .insert(name.to_string(), (version, any));
        drop(r);
        let _ = self.inner.pushed.send(());
    }

    /// Ends every open stream (clients must reconnect).
    pub fn drop_streams(&self) {
        let _ = self.inner.drop_streams.send(());
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.log.lock().seen.clone()
    }

    /// Every response sent so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.inner.log.lock().sent.clone()
    }

    /// Waits until `pred` holds over (requests seen, responses sent); fails after `timeout` with the
    /// log.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Seen], &[Sent]) -> bool,
    ) -> Result<()> {
        let mut rx = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let log = self.inner.log.lock();
                if pred(&log.seen, &log.sent) {
                    return Ok(());
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                let log = self.inner.log.lock();
                bail!(
                    "timed out waiting for {what}\nseen: {:#?}\nsent: {:#?}",
                    log.seen,
                    log.sent
                );
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(left) => {}
            }
        }
    }

    /// Waits until every response sent of `type_url` on the newest stream was ACKed (no NACK) and
    /// at least one was sent.
    pub async fn wait_acked(&self, type_url: &str, timeout: Duration) -> Result<()> {
        let t = type_url.to_string();
        // Only responses sent after the test's last change of this type count.
        let since = self.inner.last_set.lock().get(type_url).copied();
        self.wait_for(&format!("ACK of {type_url}"), timeout, move |seen, sent| {
            let fresh = |s: &&Sent| s.type_url == t && since.is_none_or(|at| s.at >= at);
            let Some(stream) = sent.iter().filter(fresh).map(|s| s.stream).max() else {
                return false;
            };
            let ours: Vec<_> = sent
                .iter()
                .filter(fresh)
                .filter(|s| s.stream == stream)
                .collect();
            let Some(last) = ours.last() else {
                return false;
            };
            seen.iter().any(|r| {
                r.stream == stream && r.type_url == t && r.nonce == last.nonce && r.error.is_none()
            })
        })
        .await
    }
}

/// The server half of one gRPC connection (HTTP/2 only, as gRPC is).
fn serve_conn<IO>(io: IO, svc: AggregatedDiscoveryServiceServer<Ads>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(
                hyper_util::rt::TokioIo::new(io),
                hyper_util::service::TowerToHyperService::new(svc),
            )
            .await;
    });
}

/// The ADS service of the fake istiod.
pub struct Ads {
    inner: Arc<Inner>,
}

impl Ads {
    fn note_headers(&self, md: &tonic::metadata::MetadataMap) {
        let mut h = BTreeMap::new();
        for kv in md.iter() {
            if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
                h.insert(
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                );
            }
        }
        self.inner.headers.lock().push(h);
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> std::result::Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.note_headers(req.metadata());
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = self.inner.clone();
        let stream = inner
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut pushed = inner.pushed.subscribe();
        let mut dropped = inner.drop_streams.subscribe();
        tokio::spawn(async move {
            // type → names subscribed (empty = wildcard)
            let mut subs: HashMap<String, BTreeSet<String>> = HashMap::new();
            let mut last_sent: HashMap<String, String> = HashMap::new();
            let send = |type_url: &str,
                        names: &BTreeSet<String>,
                        last_sent: &mut HashMap<String, String>,
                        force: bool|
             -> Option<DiscoveryResponse> {
                let all = inner.of_type(type_url);
                let chosen: Vec<(String, Any)> = all
                    .into_iter()
                    .filter(|(n, _)| wildcard(type_url) || names.contains(n))
                    .map(|(n, (_, a))| (n, a))
                    .collect();
                let version = inner.version();
                let fingerprint = format!(
                    "{:?}",
                    chosen
                        .iter()
                        .map(|(n, a)| (
                            n.clone(),
                            a.value.len(),
                            a.value.iter().map(|b| *b as u64).sum::<u64>()
                        ))
                        .collect::<Vec<_>>()
                );
                if !force && last_sent.get(type_url) == Some(&fingerprint) {
                    return None;
                }
                last_sent.insert(type_url.to_string(), fingerprint);
                let nonce = inner.next_nonce();
                inner.note_sent(Sent {
                    stream,
                    type_url: type_url.into(),
                    nonce: nonce.clone(),
                    names: chosen.iter().map(|(n, _)| n.clone()).collect(),
                    removed: vec![],
                    at: std::time::Instant::now(),
                });
                Some(DiscoveryResponse {
                    version_info: version,
                    resources: chosen.into_iter().map(|(_, a)| a).collect(),
                    type_url: type_url.into(),
                    nonce,
                    ..Default::default()
                })
            };
            loop {
                tokio::select! {
                    m = inbound.message() => {
                        let Ok(Some(r)) = m else { return };
                        inner.note_seen(Seen {
                            stream,
                            delta: false,
                            type_url: r.type_url.clone(),
                            version_info: r.version_info.clone(),
                            nonce: r.response_nonce.clone(),
                            names: r.resource_names.clone(),
                            unsubscribe: vec![],
                            initial_versions: HashMap::new(),
                            error: r.error_detail.as_ref().map(|e| e.message.clone()),
                            has_node: r.node.is_some(),
                            node_id: r.node.as_ref().map(|n| n.id.clone()).unwrap_or_default(),
                            at: std::time::Instant::now(),
                        });
                        let names: BTreeSet<String> = r.resource_names.iter().cloned().collect();
                        let changed = subs.get(&r.type_url) != Some(&names);
                        if r.response_nonce.is_empty() || changed {
                            subs.insert(r.type_url.clone(), names.clone());
                            if let Some(resp) = send(&r.type_url, &names, &mut last_sent, true)
                                && tx.send(Ok(resp)).is_err() { return; }
                        }
                    }
                    p = pushed.recv() => {
                        if p.is_err() { continue; }
                        // Envoy's order: clusters, endpoints, listeners, routes.
                        for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, NAME_TABLE] {
                            if let Some(names) = subs.get(t).cloned()
                                && let Some(resp) = send(t, &names, &mut last_sent, false)
                                && tx.send(Ok(resp)).is_err() { return; }
                        }
                    }
                    _ = dropped.recv() => {
                        let _ = tx.send(Err(Status::unavailable("fake istiod dropped the stream")));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> std::result::Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.note_headers(req.metadata());
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = self.inner.clone();
        let stream = inner
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut pushed = inner.pushed.subscribe();
        let mut dropped = inner.drop_streams.subscribe();
        tokio::spawn(async move {
            // type → subscribed names (None = wildcard); type → name → version the client holds
            let mut subs: HashMap<String, Option<BTreeSet<String>>> = HashMap::new();
            let mut held: HashMap<String, HashMap<String, String>> = HashMap::new();
            let diff = |type_url: &str,
                        subs: &HashMap<String, Option<BTreeSet<String>>>,
                        held: &mut HashMap<String, HashMap<String, String>>,
                        force: bool|
             -> Option<DeltaDiscoveryResponse> {
                let sub = subs.get(type_url)?;
                let all = inner.of_type(type_url);
                let h = held.entry(type_url.to_string()).or_default();
                let mut resources = Vec::new();
                for (name, (version, any)) in &all {
                    let wanted = sub.as_ref().is_none_or(|s| s.contains(name));
                    if wanted && h.get(name) != Some(version) {
                        h.insert(name.clone(), version.clone());
                        resources.push(Resource {
                            name: name.clone(),
                            version: version.clone(),
                            resource: Some(any.clone()),
                            ..Default::default()
                        });
                    }
                }
                let removed: Vec<String> = h
                    .keys()
                    .filter(|n| {
                        !all.contains_key(*n) || sub.as_ref().is_some_and(|s| !s.contains(*n))
                    })
                    .cloned()
                    .collect();
                for n in &removed {
                    h.remove(n);
                }
                if resources.is_empty() && removed.is_empty() && !force {
                    return None;
                }
                let nonce = inner.next_nonce();
                inner.note_sent(Sent {
                    stream,
                    type_url: type_url.into(),
                    nonce: nonce.clone(),
                    names: resources.iter().map(|r| r.name.clone()).collect(),
                    removed: removed.clone(),
                    at: std::time::Instant::now(),
                });
                Some(DeltaDiscoveryResponse {
                    system_version_info: inner.version(),
                    resources,
                    type_url: type_url.into(),
                    removed_resources: removed,
                    nonce,
                    ..Default::default()
                })
            };
            loop {
                tokio::select! {
                    m = inbound.message() => {
                        let Ok(Some(r)) = m else { return };
                        inner.note_seen(Seen {
                            stream,
                            delta: true,
                            type_url: r.type_url.clone(),
                            version_info: String::new(),
                            nonce: r.response_nonce.clone(),
                            names: r.resource_names_subscribe.clone(),
                            unsubscribe: r.resource_names_unsubscribe.clone(),
                            initial_versions: r.initial_resource_versions.clone(),
                            error: r.error_detail.as_ref().map(|e| e.message.clone()),
                            has_node: r.node.is_some(),
                            node_id: r.node.as_ref().map(|n| n.id.clone()).unwrap_or_default(),
                            at: std::time::Instant::now(),
                        });
                        if !r.response_nonce.is_empty()
                            && r.resource_names_subscribe.is_empty()
                            && r.resource_names_unsubscribe.is_empty()
                        {
                            continue; // ACK / NACK
                        }
                        let first = !subs.contains_key(&r.type_url);
                        if first {
                            held.insert(r.type_url.clone(), r.initial_resource_versions.clone());
                            let names: BTreeSet<String> =
                                r.resource_names_subscribe.iter().filter(|n| *n != "*").cloned().collect();
                            let wild = wildcard(&r.type_url)
                                && (r.resource_names_subscribe.is_empty()
                                    || r.resource_names_subscribe.iter().any(|n| n == "*"));
                            subs.insert(r.type_url.clone(), if wild { None } else { Some(names) });
                        } else if let Some(Some(s)) = subs.get_mut(&r.type_url) {
                            s.extend(r.resource_names_subscribe.iter().cloned());
                            for n in &r.resource_names_unsubscribe {
                                s.remove(n);
                            }
                        }
                        // Like istiod, a first subscription is always answered (maybe empty).
                        if let Some(resp) = diff(&r.type_url, &subs, &mut held, first)
                            && tx.send(Ok(resp)).is_err() { return; }
                    }
                    p = pushed.recv() => {
                        if p.is_err() { continue; }
                        for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, NAME_TABLE] {
                            if let Some(resp) = diff(t, &subs, &mut held, false)
                                && tx.send(Ok(resp)).is_err() { return; }
                        }
                    }
                    _ = dropped.recv() => {
                        let _ = tx.send(Err(Status::unavailable("fake istiod dropped the stream")));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

/// A minimal Istio-shaped bootstrap (node, `xds-grpc` cluster, `dynamic_resources` with ADS) for a
/// proxy whose admin listens on `admin`.
pub fn bootstrap(istiod: &FakeIstiod, admin: SocketAddr, delta: bool, node_id: &str) -> String {
    let address = match (istiod.addr(), istiod.uds()) {
        (Some(a), _) => format!(
            "socket_address: {{ address: {}, port_value: {} }}",
            a.ip(),
            a.port()
        ),
        (None, Some(p)) => format!("pipe: {{ path: {:?} }}", p.display().to_string()),
        (None, None) => String::new(),
    };
    let api = if delta { "DELTA_GRPC" } else { "GRPC" };
    format!(
        r#"
node:
  id: {node_id}
  cluster: test.default
  metadata: {{ ISTIO_VERSION: "1.28.0", CLUSTER_ID: Kubernetes }}
admin:
  address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}
dynamic_resources:
  lds_config: {{ ads: {{}}, initial_fetch_timeout: 0s, resource_api_version: V3 }}
  cds_config: {{ ads: {{}}, initial_fetch_timeout: 0s, resource_api_version: V3 }}
  ads_config:
    api_type: {api}
    set_node_on_first_message_only: true
    transport_api_version: V3
    grpc_services: [ {{ envoy_grpc: {{ cluster_name: xds-grpc }} }} ]
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ {address} }} }} }} ] }} ]
"#,
        ip = admin.ip(),
        port = admin.port(),
    )
}
