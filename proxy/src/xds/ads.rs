// SPDX-License-Identifier: Apache-2.0
//! The ADS client: one aggregated stream (delta or state-of-the-world) to the control plane named by
//! the bootstrap's `dynamic_resources.ads_config`, over TCP or a Unix socket (`pipe`).
//!
//! The order of subscriptions is Envoy's: clusters first; the endpoints of new clusters are requested
//! before the clusters are ACKed; listeners once clusters are warm; the routes of new listeners before
//! the listeners are ACKed. Every response is ACKed with its nonce, or NACKed with `error_detail` naming
//! the resource and field, while the last good configuration keeps serving.

use super::store::{self, Resource, Store, Update};
use super::translate::{self, ErrorKind, Path, TranslateError};
use crate::config::Cluster;
use crate::snapshot::ConfigSnapshot;
use arcstr::ArcStr;
use envoy_types::pb::envoy::config::bootstrap::v3::bootstrap::DynamicResources;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// `ads_config.api_type`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsApi {
    /// `DELTA_GRPC` (Istio sidecars)
    Delta,
    /// `GRPC` (state of the world)
    StateOfTheWorld,
}

/// Where the control plane is.
#[derive(Debug, Clone)]
pub enum Target {
    /// a TCP endpoint of the gRPC cluster
    Tcp(SocketAddr),
    /// a `pipe` endpoint (pilot-agent's `./etc/istio/proxy/XDS`)
    Unix(PathBuf),
}

/// `dynamic_resources` before the static clusters are known.
#[derive(Debug)]
pub struct PartialAds {
    /// `ads_config.grpc_services[0].envoy_grpc.cluster_name`
    pub cluster_name: String,
    api: AdsApi,
    set_node_on_first_message_only: bool,
    lds: Option<Option<Duration>>,
    cds: Option<Option<Duration>>,
}

impl PartialAds {
    /// Completes the settings with the gRPC cluster and the node.
    pub fn finish(self, cluster: Arc<Cluster>, node: Node) -> AdsSettings {
        AdsSettings {
            api: self.api,
            cluster,
            node,
            set_node_on_first_message_only: self.set_node_on_first_message_only,
            lds: self.lds,
            cds: self.cds,
        }
    }
}

/// Everything the ADS client needs from the bootstrap.
#[derive(Debug, Clone)]
pub struct AdsSettings {
    /// delta or state of the world
    pub api: AdsApi,
    /// the static cluster the stream goes to
    pub cluster: Arc<Cluster>,
    /// the bootstrap's node (user agent filled in by us)
    pub node: Node,
    /// `set_node_on_first_message_only`
    pub set_node_on_first_message_only: bool,
    /// `lds_config` present → `Some(initial_fetch_timeout)`
    pub lds: Option<Option<Duration>>,
    /// `cds_config` present → `Some(initial_fetch_timeout)`
    pub cds: Option<Option<Duration>>,
}

impl AdsSettings {
    /// The address to dial: the cluster's first pipe, else its first endpoint.
    pub fn target(&self) -> Option<Target> {
        if let Some(p) = self.cluster.pipes.first() {
            return Some(Target::Unix(PathBuf::from(p.as_str())));
        }
        self.cluster
            .endpoints
            .iter()
            .find_map(|e| e.addr)
            .map(Target::Tcp)
    }
}

const XDS: &str = "xDS issue";

/// Validates `dynamic_resources`.
pub fn dynamic_resources(d: &DynamicResources, path: &Path) -> Result<PartialAds, TranslateError> {
    translate::only_pub(
        d,
        path,
        &["lds_config", "cds_config", "ads_config"],
        &[
            ("lds_resources_locator", XDS),
            ("cds_resources_locator", XDS),
            ("default_config_source", XDS),
        ],
    )?;
    let lds = match &d.lds_config {
        Some(cs) => Some(translate::config_source(cs, &path.field("lds_config"))?),
        None => None,
    };
    let cds = match &d.cds_config {
        Some(cs) => Some(translate::config_source(cs, &path.field("cds_config"))?),
        None => None,
    };
    let p = path.field("ads_config");
    let Some(ads) = &d.ads_config else {
        return Err(TranslateError {
            path: p,
            kind: ErrorKind::Required,
        });
    };
    translate::only_pub(
        ads,
        &p,
        &[
            "api_type",
            "transport_api_version",
            "grpc_services",
            "set_node_on_first_message_only",
        ],
        &[],
    )?;
    use envoy_types::pb::envoy::config::core::v3::api_config_source::ApiType;
    let api = match ApiType::try_from(ads.api_type) {
        Ok(ApiType::DeltaGrpc) => AdsApi::Delta,
        Ok(ApiType::Grpc) => AdsApi::StateOfTheWorld,
        _ => {
            return Err(TranslateError {
                path: p.field("api_type"),
                kind: ErrorKind::Invalid("ADS needs api_type GRPC or DELTA_GRPC".into()),
            });
        }
    };
    let Some(gs) = ads.grpc_services.first() else {
        return Err(TranslateError {
            path: p.field("grpc_services"),
            kind: ErrorKind::Required,
        });
    };
    let gp = p.at("grpc_services", 0);
    translate::only_pub(gs, &gp, &["envoy_grpc"], &[])?;
    use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    let cluster_name = match &gs.target_specifier {
        Some(TargetSpecifier::EnvoyGrpc(e)) => {
            translate::only_pub(e, &gp.field("envoy_grpc"), &["cluster_name"], &[])?;
            e.cluster_name.clone()
        }
        _ => {
            return Err(TranslateError {
                path: gp.field("google_grpc"),
                kind: ErrorKind::NotSupported,
            });
        }
    };
    Ok(PartialAds {
        cluster_name,
        api,
        set_node_on_first_message_only: ads.set_node_on_first_message_only,
        lds,
        cds,
    })
}

/// Publishes a snapshot to the data plane; returns listeners that could not be started.
pub type Publish = Arc<dyn Fn(ConfigSnapshot) -> Vec<(ArcStr, String)> + Send + Sync>;

/// `cluster_manager.cds.update_*` and `listener_manager.lds.update_*`, which pilot-agent's readiness
/// probe reads.
#[derive(Debug, Clone)]
pub struct UpdateCounters {
    cds_success: Arc<crate::stats::Counter>,
    cds_rejected: Arc<crate::stats::Counter>,
    lds_success: Arc<crate::stats::Counter>,
    lds_rejected: Arc<crate::stats::Counter>,
}

impl UpdateCounters {
    /// Registers the four counters (listed from the start, at zero, as Envoy does).
    pub fn register(stats: &crate::stats::Stats) -> Self {
        UpdateCounters {
            cds_success: stats.counter("cluster_manager.cds.update_success"),
            cds_rejected: stats.counter("cluster_manager.cds.update_rejected"),
            lds_success: stats.counter("listener_manager.lds.update_success"),
            lds_rejected: stats.counter("listener_manager.lds.update_rejected"),
        }
    }

    fn record(&self, type_url: &str, ok: bool) {
        let c = match (type_url, ok) {
            (store::CLUSTER, true) => &self.cds_success,
            (store::CLUSTER, false) => &self.cds_rejected,
            (store::LISTENER, true) => &self.lds_success,
            (store::LISTENER, false) => &self.lds_rejected,
            _ => return,
        };
        c.inc();
    }
}

/// The client and its store.
pub struct AdsClient {
    settings: AdsSettings,
    store: Store,
    publish: Publish,
    counters: Option<UpdateCounters>,
    /// this stream is a reconnect of one that had received clusters
    resumed: bool,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("connecting: {0}")]
    Connect(String),
    #[error("stream: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("the control plane closed the stream")]
    Closed,
}

/// Per-type state of one stream.
#[derive(Default)]
struct TypeState {
    /// names subscribed (non-wildcard types)
    names: BTreeSet<ArcStr>,
    /// a request for this type was sent on this stream
    started: bool,
    /// a response of this type arrived on this stream
    received: bool,
    /// last nonce (state of the world)
    nonce: String,
}

impl AdsClient {
    /// A client that will publish through `publish`.
    pub fn new(settings: AdsSettings, store: Store, publish: Publish) -> Self {
        AdsClient {
            settings,
            store,
            publish,
            counters: None,
            resumed: false,
        }
    }

    /// Counts CDS and LDS updates accepted and rejected.
    pub fn with_counters(mut self, counters: UpdateCounters) -> Self {
        self.counters = Some(counters);
        self
    }

    /// Runs forever: connect, stream, reconnect with jittered exponential backoff (0.5 s → 30 s).
    pub async fn run(mut self) {
        self.settings.node.user_agent_name = "pingsail".into();
        self.settings.node.user_agent_version_type = Some(
            envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            ),
        );
        let started = Instant::now();
        let mut backoff = Duration::from_millis(500);
        loop {
            let began = Instant::now();
            self.resumed = self.store.version(store::CLUSTER).is_some();
            let end = match self.connect().await {
                Ok(ch) => match self.settings.api {
                    AdsApi::Delta => self.run_delta(ch, started).await,
                    AdsApi::StateOfTheWorld => self.run_sotw(ch, started).await,
                },
                Err(e) => Err(e),
            };
            if let Err(e) = end {
                tracing::warn!("ADS: {e}; reconnecting");
            }
            if began.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(500);
            }
            let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 + 1);
            pingora_timeout::sleep(Duration::from_millis(jitter.max(50))).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn connect(&self) -> Result<Channel, StreamEnd> {
        connect_cluster(&self.settings.cluster)
            .await
            .map_err(StreamEnd::Connect)
    }

    /// Applies a response and publishes; returns the NACK message, if any.
    fn apply(&mut self, update: Update) -> Option<String> {
        let type_url = update.type_url;
        let result = self.store.apply(update);
        let mut errors: Vec<String> = result.err().into_iter().collect();
        errors.extend(self.publish_now());
        if let Some(c) = &self.counters {
            c.record(type_url, errors.is_empty());
        }
        (!errors.is_empty()).then(|| errors.join("; "))
    }

    /// Publishes the store's snapshot; listeners that fail to start are taken out and reported.
    fn publish_now(&mut self) -> Vec<String> {
        let failed = (self.publish)(self.store.snapshot());
        let mut out = Vec::new();
        if !failed.is_empty() {
            for (name, why) in failed {
                out.push(format!("listener '{name}': {why}"));
                self.store.reject_listener(&name, why);
            }
            let _ = (self.publish)(self.store.snapshot());
        }
        out
    }

    fn initial_timeout_passed(&self, started: Instant, cfg: Option<Option<Duration>>) -> bool {
        matches!(cfg, Some(Some(t)) if started.elapsed() >= t)
    }

    fn node_for(&self, first: &mut bool) -> Option<Node> {
        let send = *first || !self.settings.set_node_on_first_message_only;
        *first = false;
        send.then(|| self.settings.node.clone())
    }

    async fn run_delta(&mut self, ch: Channel, started: Instant) -> Result<(), StreamEnd> {
        let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
        let mut types: HashMap<&'static str, TypeState> = HashMap::new();
        let mut first = true;
        let cds = self.settings.cds.is_some();
        // Clusters first; without CDS, listeners at once.
        let initial = if cds { store::CLUSTER } else { store::LISTENER };
        self.delta_subscribe(&tx, &mut types, &mut first, initial);
        let mut client =
            AggregatedDiscoveryServiceClient::new(ch).max_decoding_message_size(256 * 1024 * 1024);
        let mut inbound = client
            .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        loop {
            // On a reconnect, the types we already use are resubscribed with what we hold.
            self.delta_follow(&tx, &mut types, &mut first, started);
            if let Some(resp) = self.next(&mut inbound).await? {
                self.on_delta(resp, &tx, &mut types, &mut first, started);
            }
        }
    }

    /// The next response; `None` after time-based work (a warming deadline promoted something, or
    /// the initial-fetch tick), so the caller re-evaluates its subscriptions.
    async fn next<T>(&mut self, inbound: &mut tonic::Streaming<T>) -> Result<Option<T>, StreamEnd> {
        let deadline = self.store.next_deadline();
        tokio::select! {
            m = inbound.message() => match m? {
                Some(resp) => Ok(Some(resp)),
                None => Err(StreamEnd::Closed),
            },
            _ = sleep_until(deadline) => {
                if self.store.promote(Instant::now()) {
                    self.publish_now();
                }
                Ok(None)
            }
            _ = pingora_timeout::sleep(Duration::from_millis(250)), if !self.store.is_initialized() => Ok(None),
        }
    }

    fn on_delta(
        &mut self,
        resp: DeltaDiscoveryResponse,
        tx: &mpsc::UnboundedSender<DeltaDiscoveryRequest>,
        types: &mut HashMap<&'static str, TypeState>,
        first: &mut bool,
        started: Instant,
    ) {
        let Some(type_url) = store::known_type(&resp.type_url) else {
            let _ = tx.send(DeltaDiscoveryRequest {
                node: self.node_for(first),
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce,
                error_detail: Some(nack(format!("unsupported type URL '{}'", resp.type_url))),
                ..Default::default()
            });
            return;
        };
        types.entry(type_url).or_default().received = true;
        let update = Update {
            type_url,
            version: resp.system_version_info,
            resources: resp
                .resources
                .into_iter()
                .filter_map(|r| {
                    Some(Resource {
                        name: r.name,
                        version: r.version,
                        any: r.resource?,
                    })
                })
                .collect(),
            removed: resp.removed_resources,
            state_of_the_world: false,
        };
        let error = self.apply(update);
        if let Some(e) = &error {
            tracing::warn!(type_url, "NACK: {e}");
        }
        // Envoy asks for what the update needs before ACKing it.
        self.delta_follow(tx, types, first, started);
        let _ = tx.send(DeltaDiscoveryRequest {
            node: self.node_for(first),
            type_url: type_url.into(),
            response_nonce: resp.nonce,
            error_detail: error.map(nack),
            ..Default::default()
        });
        self.delta_follow(tx, types, first, started);
    }

    /// Sends the subscriptions the current configuration calls for.
    fn delta_follow(
        &mut self,
        tx: &mpsc::UnboundedSender<DeltaDiscoveryRequest>,
        types: &mut HashMap<&'static str, TypeState>,
        first: &mut bool,
        started: Instant,
    ) {
        for t in [store::ENDPOINT, store::ROUTE] {
            let want = self.store.wanted(t);
            let state = types.entry(t).or_default();
            if want == state.names && (state.started || want.is_empty()) {
                continue;
            }
            let sub: Vec<String> = want
                .difference(&state.names)
                .map(|s| s.to_string())
                .collect();
            let unsub: Vec<String> = state
                .names
                .difference(&want)
                .map(|s| s.to_string())
                .collect();
            let initial = if state.started {
                HashMap::new()
            } else {
                self.store.resource_versions(t)
            };
            state.names = want;
            state.started = true;
            let _ = tx.send(DeltaDiscoveryRequest {
                node: self.node_for(first),
                type_url: t.into(),
                resource_names_subscribe: sub,
                resource_names_unsubscribe: unsub,
                initial_resource_versions: initial,
                ..Default::default()
            });
        }
        if self.lds_due(types, started) {
            self.delta_subscribe(tx, types, first, store::LISTENER);
        }
        self.check_initialized(types, started);
    }

    fn lds_due(&self, types: &HashMap<&'static str, TypeState>, started: Instant) -> bool {
        if self.settings.lds.is_none() || types.get(store::LISTENER).is_some_and(|t| t.started) {
            return false;
        }
        // A reconnect resubscribes everything at once, as Envoy does: the clusters are already warm.
        if self.settings.cds.is_none() || self.resumed {
            return true;
        }
        let cds_done = types.get(store::CLUSTER).is_some_and(|t| t.received)
            || self.initial_timeout_passed(started, self.settings.cds);
        cds_done
            && (!self.store.clusters_warming()
                || self.initial_timeout_passed(started, self.settings.cds))
    }

    fn check_initialized(&mut self, types: &HashMap<&'static str, TypeState>, started: Instant) {
        let lds_done = self.settings.lds.is_none()
            || types.get(store::LISTENER).is_some_and(|t| t.received)
            || self.initial_timeout_passed(started, self.settings.lds);
        let cds_done = self.settings.cds.is_none()
            || types.get(store::CLUSTER).is_some_and(|t| t.received)
            || self.initial_timeout_passed(started, self.settings.cds);
        if lds_done && cds_done && !self.store.listeners_warming() && !self.store.is_initialized() {
            self.store.set_initialized();
            self.publish_now();
        }
    }

    fn delta_subscribe(
        &mut self,
        tx: &mpsc::UnboundedSender<DeltaDiscoveryRequest>,
        types: &mut HashMap<&'static str, TypeState>,
        first: &mut bool,
        type_url: &'static str,
    ) {
        let state = types.entry(type_url).or_default();
        state.started = true;
        let _ = tx.send(DeltaDiscoveryRequest {
            node: self.node_for(first),
            type_url: type_url.into(),
            initial_resource_versions: self.store.resource_versions(type_url),
            ..Default::default()
        });
    }

    async fn run_sotw(&mut self, ch: Channel, started: Instant) -> Result<(), StreamEnd> {
        let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
        let mut types: HashMap<&'static str, TypeState> = HashMap::new();
        let mut first = true;
        let initial = if self.settings.cds.is_some() {
            store::CLUSTER
        } else {
            store::LISTENER
        };
        self.sotw_request(&tx, &mut types, &mut first, initial, None);
        let mut client =
            AggregatedDiscoveryServiceClient::new(ch).max_decoding_message_size(256 * 1024 * 1024);
        let mut inbound = client
            .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        loop {
            self.sotw_follow(&tx, &mut types, &mut first, started);
            if let Some(resp) = self.next(&mut inbound).await? {
                self.on_sotw(resp, &tx, &mut types, &mut first, started);
            }
        }
    }

    fn on_sotw(
        &mut self,
        resp: DiscoveryResponse,
        tx: &mpsc::UnboundedSender<DiscoveryRequest>,
        types: &mut HashMap<&'static str, TypeState>,
        first: &mut bool,
        started: Instant,
    ) {
        let Some(type_url) = store::known_type(&resp.type_url) else {
            let _ = tx.send(DiscoveryRequest {
                node: self.node_for(first),
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce,
                error_detail: Some(nack(format!("unsupported type URL '{}'", resp.type_url))),
                ..Default::default()
            });
            return;
        };
        {
            let st = types.entry(type_url).or_default();
            st.received = true;
            st.nonce = resp.nonce.clone();
        }
        let update = Update {
            type_url,
            version: resp.version_info,
            resources: resp
                .resources
                .into_iter()
                .map(|any| Resource {
                    name: String::new(),
                    version: String::new(),
                    any,
                })
                .collect(),
            removed: Vec::new(),
            state_of_the_world: true,
        };
        let error = self.apply(update);
        if let Some(e) = &error {
            tracing::warn!(type_url, "NACK: {e}");
        }
        self.sotw_follow(tx, types, first, started);
        self.sotw_request(tx, types, first, type_url, error);
        self.sotw_follow(tx, types, first, started);
    }

    fn sotw_follow(
        &mut self,
        tx: &mpsc::UnboundedSender<DiscoveryRequest>,
        types: &mut HashMap<&'static str, TypeState>,
        first: &mut bool,
        started: Instant,
    ) {
        for t in [store::ENDPOINT, store::ROUTE] {
            let want = self.store.wanted(t);
            let state = types.entry(t).or_default();
            if want == state.names && (state.started || want.is_empty()) {
                continue;
            }
            state.names = want;
            self.sotw_request(tx, types, first, t, None);
        }
        if self.lds_due(types, started) {
            self.sotw_request(tx, types, first, store::LISTENER, None);
        }
        self.check_initialized(types, started);
    }

    /// A state-of-the-world request for `type_url`: the current names, the last accepted version and
    /// the last nonce (an ACK, a NACK with `error`, or a subscription change).
    fn sotw_request(
        &mut self,
        tx: &mpsc::UnboundedSender<DiscoveryRequest>,
        types: &mut HashMap<&'static str, TypeState>,
        first: &mut bool,
        type_url: &'static str,
        error: Option<String>,
    ) {
        let node = self.node_for(first);
        let state = types.entry(type_url).or_default();
        state.started = true;
        let _ = tx.send(DiscoveryRequest {
            version_info: self
                .store
                .version(type_url)
                .map(|v| v.to_string())
                .unwrap_or_default(),
            node,
            resource_names: state.names.iter().map(|s| s.to_string()).collect(),
            type_url: type_url.into(),
            response_nonce: state.nonce.clone(),
            error_detail: error.map(nack),
            ..Default::default()
        });
    }
}

/// A gRPC channel to a control-plane cluster: its first pipe (Unix socket), else its first endpoint.
pub async fn connect_cluster(cluster: &Cluster) -> Result<Channel, String> {
    let timeout = cluster.connect_timeout;
    let err = |e: tonic::transport::Error| format!("connecting to '{}': {e:?}", cluster.name);
    if let Some(p) = cluster.pipes.first() {
        let path = PathBuf::from(p.as_str());
        return Endpoint::from_static("http://localhost")
            .connect_timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .map_err(err);
    }
    let Some(addr) = cluster.endpoints.iter().find_map(|e| e.addr) else {
        return Err(format!("cluster '{}' has no endpoint", cluster.name));
    };
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(err)?
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(err)
}

/// Envoy NACKs with gRPC status INTERNAL (13).
fn nack(message: String) -> Status {
    Status {
        code: 13,
        message,
        details: Vec::new(),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => {
            pingora_timeout::sleep(d.saturating_duration_since(Instant::now())).await;
        }
        None => std::future::pending().await,
    }
}
