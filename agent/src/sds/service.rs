// SPDX-License-Identifier: Apache-2.0
//! The SDS gRPC service: per-stream subscription state, resource building, SotW and delta.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{ROOT_RESOURCE, SecretReceiver, Stats, WorkloadSecret};

/// `type_url` of SDS resources.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// How often subscribed `file-cert:`/`file-root:` resources are re-read (mtime and content).
const FILE_POLL: Duration = Duration::from_millis(500);

static VERSION: AtomicU64 = AtomicU64::new(0);

fn next_version() -> String {
    let n = VERSION.fetch_add(1, Ordering::Relaxed) + 1;
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!("{secs}/{n}")
}

fn next_nonce() -> String {
    format!("{:032x}", rand::random::<u128>())
}

pub(super) struct SdsService {
    secrets: SecretReceiver,
    stats: Arc<Stats>,
    stop: watch::Receiver<bool>,
}

impl SdsService {
    pub(super) fn new(
        secrets: SecretReceiver,
        stats: Arc<Stats>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            secrets,
            stats,
            stop,
        }
    }

    pub(super) fn into_server(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20)
    }
}

/// One resource as it would be sent now: the encoded `Secret` and its content version.
struct Built {
    any: Any,
    version: String,
}

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

fn tls_secret(name: &str, chain: &[u8], key: &[u8]) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain),
            private_key: inline(key),
            ..Default::default()
        })),
    }
}

fn root_secret(name: &str, roots: &[u8]) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(roots),
                ..Default::default()
            },
        )),
    }
}

/// A resource name that refers to files (pilot-agent `SdsCertificateConfigFromResourceName`).
enum FileResource {
    Cert { chain: PathBuf, key: PathBuf },
    Root { bundle: PathBuf },
}

fn file_resource(name: &str) -> Option<FileResource> {
    if let Some(rest) = name.strip_prefix("file-cert:") {
        let mut parts = rest.split('~');
        let (Some(chain), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        return Some(FileResource::Cert {
            chain: chain.into(),
            key: key.into(),
        });
    }
    if let Some(rest) = name.strip_prefix("file-root:") {
        if rest.contains('~') {
            return None;
        }
        return Some(FileResource::Root {
            bundle: rest.into(),
        });
    }
    None
}

/// Builds what `name` resolves to now; `None` while it is not available.
fn build(name: &str, current: Option<&WorkloadSecret>) -> Option<Built> {
    let secret = if let Some(file) = file_resource(name) {
        match file {
            FileResource::Cert { chain, key } => {
                let chain_pem = read_nonempty(&chain)?;
                let key_pem = read_nonempty(&key)?;
                tls_secret(name, &chain_pem, &key_pem)
            }
            FileResource::Root { bundle } => root_secret(name, &read_nonempty(&bundle)?),
        }
    } else if name.starts_with("file-cert:") || name.starts_with("file-root:") {
        tracing::warn!(resource = name, "malformed file resource name; not served");
        return None;
    } else {
        let s = current?;
        if name == ROOT_RESOURCE {
            root_secret(name, &s.root_cert_pem)
        } else {
            tls_secret(name, &s.cert_chain_pem, &s.private_key_pem)
        }
    };
    let value = secret.encode_to_vec();
    let version = format!("{:016x}", xxhash_rust::xxh64::xxh64(&value, 0));
    Some(Built {
        any: Any {
            type_url: SECRET_TYPE_URL.to_owned(),
            value,
        },
        version,
    })
}

fn read_nonempty(path: &std::path::Path) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) if !b.is_empty() => Some(b),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "file secret not readable yet");
            None
        }
    }
}

/// Per-stream subscription state shared by SotW and delta.
#[derive(Default)]
struct StreamState {
    subscribed: BTreeSet<String>,
    /// Content version last sent (or reported by the client at delta reconnect) per name.
    sent: HashMap<String, String>,
    last_nonce: Option<String>,
}

impl StreamState {
    fn has_files(&self) -> bool {
        self.subscribed.iter().any(|n| file_resource(n).is_some())
    }

    /// The subscribed resources whose current content differs from what the client has.
    fn changed(&self, current: Option<&WorkloadSecret>) -> BTreeMap<String, Built> {
        let mut out = BTreeMap::new();
        for name in &self.subscribed {
            if let Some(b) = build(name, current)
                && self.sent.get(name) != Some(&b.version)
            {
                out.insert(name.clone(), b);
            }
        }
        out
    }
}

/// What a request from the client means for the stream.
enum Incoming {
    /// Stale nonce, NACK, or an ACK: nothing to (re)send because of it.
    Nothing,
    /// Subscriptions may have changed: send whatever the client lacks.
    Resync,
}

/// How a request relates to what this stream sent (pilot-agent `xds.ShouldRespond` order).
#[derive(Debug, PartialEq, Eq)]
enum RequestKind {
    /// A NACK of a response (of this stream or, after a reconnect, of an earlier one).
    Nack,
    /// First request of a subscription (no nonce), or a reconnect: the client carries a nonce
    /// from a previous stream while this one has sent nothing yet.
    Initial,
    /// ACK of the latest response.
    Ack,
    /// Answers a response that has since been superseded: ignored.
    Stale,
}

fn classify(stats: &Stats, state: &StreamState, nonce: &str, error: Option<String>) -> RequestKind {
    if let Some(msg) = error {
        stats.nacks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(nonce, error = %msg, "SDS update rejected by the proxy (NACK)");
        *stats.last_nack.lock() = Some(msg);
        return RequestKind::Nack;
    }
    if nonce.is_empty() {
        return RequestKind::Initial;
    }
    match state.last_nonce.as_deref() {
        None => RequestKind::Initial,
        Some(last) if last == nonce => {
            stats.acks.fetch_add(1, Ordering::Relaxed);
            RequestKind::Ack
        }
        Some(_) => {
            tracing::debug!(nonce, "SDS request with a stale nonce ignored");
            RequestKind::Stale
        }
    }
}

fn sotw_request(
    stats: &Stats,
    state: &mut StreamState,
    req: DiscoveryRequest,
) -> Result<Incoming, Status> {
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
        return Err(Status::invalid_argument(format!(
            "SDS serves only {SECRET_TYPE_URL}, not {}",
            req.type_url
        )));
    }
    let nack = req.error_detail.as_ref().map(|e| e.message.clone());
    if matches!(
        classify(stats, state, &req.response_nonce, nack),
        RequestKind::Nack | RequestKind::Stale
    ) {
        return Ok(Incoming::Nothing);
    }
    let names: BTreeSet<String> = req.resource_names.into_iter().collect();
    state.sent.retain(|n, _| names.contains(n));
    state.subscribed = names;
    Ok(Incoming::Resync)
}

fn delta_request(
    stats: &Stats,
    state: &mut StreamState,
    req: DeltaDiscoveryRequest,
) -> Result<Incoming, Status> {
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
        return Err(Status::invalid_argument(format!(
            "SDS serves only {SECRET_TYPE_URL}, not {}",
            req.type_url
        )));
    }
    let nack = req.error_detail.as_ref().map(|e| e.message.clone());
    let ack = classify(stats, state, &req.response_nonce, nack);
    // Subscription changes are honoured even on a stale nonce (they are incremental).
    for (name, version) in req.initial_resource_versions {
        state.sent.insert(name, version);
    }
    for name in req.resource_names_unsubscribe {
        state.subscribed.remove(&name);
        state.sent.remove(&name);
    }
    let mut new_names = false;
    for name in req.resource_names_subscribe {
        new_names |= state.subscribed.insert(name);
    }
    if matches!(ack, RequestKind::Initial | RequestKind::Ack) || new_names {
        Ok(Incoming::Resync)
    } else {
        Ok(Incoming::Nothing)
    }
}

fn sotw_response(state: &mut StreamState, changed: BTreeMap<String, Built>) -> DiscoveryResponse {
    let nonce = next_nonce();
    state.last_nonce = Some(nonce.clone());
    let mut resources = Vec::with_capacity(changed.len());
    for (name, b) in changed {
        state.sent.insert(name, b.version);
        resources.push(b.any);
    }
    DiscoveryResponse {
        version_info: next_version(),
        resources,
        type_url: SECRET_TYPE_URL.to_owned(),
        nonce,
        ..Default::default()
    }
}

fn delta_response(
    state: &mut StreamState,
    changed: BTreeMap<String, Built>,
) -> DeltaDiscoveryResponse {
    let nonce = next_nonce();
    state.last_nonce = Some(nonce.clone());
    let mut resources = Vec::with_capacity(changed.len());
    for (name, b) in changed {
        state.sent.insert(name.clone(), b.version.clone());
        resources.push(Resource {
            name,
            version: b.version,
            resource: Some(b.any),
            ..Default::default()
        });
    }
    DeltaDiscoveryResponse {
        system_version_info: next_version(),
        resources,
        type_url: SECRET_TYPE_URL.to_owned(),
        nonce,
        ..Default::default()
    }
}

/// The protocol-specific half of a stream.
trait Flavor: Send + 'static {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    fn on_request(
        stats: &Stats,
        state: &mut StreamState,
        req: Self::Req,
    ) -> Result<Incoming, Status>;
    fn respond(state: &mut StreamState, changed: BTreeMap<String, Built>) -> Self::Resp;
}

struct Sotw;
impl Flavor for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    fn on_request(
        stats: &Stats,
        state: &mut StreamState,
        req: Self::Req,
    ) -> Result<Incoming, Status> {
        sotw_request(stats, state, req)
    }
    fn respond(state: &mut StreamState, changed: BTreeMap<String, Built>) -> Self::Resp {
        sotw_response(state, changed)
    }
}

struct Delta;
impl Flavor for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    fn on_request(
        stats: &Stats,
        state: &mut StreamState,
        req: Self::Req,
    ) -> Result<Incoming, Status> {
        delta_request(stats, state, req)
    }
    fn respond(state: &mut StreamState, changed: BTreeMap<String, Built>) -> Self::Resp {
        delta_response(state, changed)
    }
}

/// Drives one stream until the client goes away, the server stops, or a protocol error.
async fn run_stream<F: Flavor>(
    mut inbound: Streaming<F::Req>,
    out: mpsc::Sender<Result<F::Resp, Status>>,
    mut secrets: SecretReceiver,
    mut stop: watch::Receiver<bool>,
    stats: Arc<Stats>,
) where
    Streaming<F::Req>: tokio_stream::Stream<Item = Result<F::Req, Status>>,
{
    let mut state = StreamState::default();
    let mut producer_gone = false;
    let mut poll = tokio::time::interval(FILE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let resync = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => match F::on_request(&stats, &mut state, req) {
                    Ok(Incoming::Resync) => true,
                    Ok(Incoming::Nothing) => false,
                    Err(status) => {
                        let _ = out.send(Err(status)).await;
                        return;
                    }
                },
                Ok(None) => return,
                Err(status) => {
                    tracing::debug!(%status, "SDS stream closed by the client");
                    return;
                }
            },
            changed = secrets.changed(), if !producer_gone => {
                // A gone producer leaves the last secret in place; keep serving it.
                producer_gone = changed.is_err();
                !producer_gone
            },
            _ = poll.tick(), if state.has_files() => true,
            () = crate::h2serve::stopped(&mut stop) => return,
            () = out.closed() => return,
        };
        if !resync {
            continue;
        }
        let current = secrets.borrow_and_update().clone();
        let changed = state.changed(current.as_deref());
        if changed.is_empty() {
            continue;
        }
        let resp = F::respond(&mut state, changed);
        if out.send(Ok(resp)).await.is_err() {
            return;
        }
        stats.responses_sent.fetch_add(1, Ordering::Relaxed);
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(run_stream::<Sotw>(
            request.into_inner(),
            tx,
            self.secrets.clone(),
            self.stop.clone(),
            self.stats.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(run_stream::<Delta>(
            request.into_inner(),
            tx,
            self.secrets.clone(),
            self.stop.clone(),
            self.stats.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        // As pilot-agent: only streaming is served.
        Err(Status::unimplemented("FetchSecrets not implemented"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn secret() -> WorkloadSecret {
        WorkloadSecret {
            cert_chain_pem: "CHAIN".into(),
            private_key_pem: "KEY".into(),
            root_cert_pem: "ROOT".into(),
            not_after: SystemTime::now(),
            created: SystemTime::now(),
        }
    }

    fn decode(b: &Built) -> Secret {
        Secret::decode(b.any.value.as_slice()).unwrap()
    }

    #[test]
    fn resource_shapes_match_pilot_agent() {
        let s = secret();
        let d = decode(&build("default", Some(&s)).unwrap());
        assert_eq!(d.name, "default");
        let Some(secret::Type::TlsCertificate(t)) = d.r#type else {
            panic!("default must be a tls_certificate")
        };
        assert_eq!(
            t.certificate_chain.unwrap().specifier,
            Some(Specifier::InlineBytes(b"CHAIN".to_vec()))
        );
        assert_eq!(
            t.private_key.unwrap().specifier,
            Some(Specifier::InlineBytes(b"KEY".to_vec()))
        );
        let r = decode(&build("ROOTCA", Some(&s)).unwrap());
        let Some(secret::Type::ValidationContext(v)) = r.r#type else {
            panic!("ROOTCA must be a validation_context")
        };
        assert_eq!(
            v.trusted_ca.unwrap().specifier,
            Some(Specifier::InlineBytes(b"ROOT".to_vec()))
        );
        // Unknown names get the workload certificate under their own name (pilot-agent).
        let u = decode(&build("some-other", Some(&s)).unwrap());
        assert_eq!(u.name, "some-other");
        assert!(matches!(u.r#type, Some(secret::Type::TlsCertificate(_))));
        // Nothing before the first certificate.
        assert!(build("default", None).is_none());
        assert!(build("file-cert:only-one-part", Some(&s)).is_none());
    }

    #[test]
    fn sotw_ack_nack_and_stale_nonces() {
        let stats = Stats::default();
        let mut st = StreamState::default();
        let s = secret();
        let req = |names: &[&str], nonce: &str, nack: bool| DiscoveryRequest {
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: nonce.into(),
            error_detail: nack.then(|| envoy_types::pb::google::rpc::Status {
                message: "bad cert".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            sotw_request(&stats, &mut st, req(&["default"], "", false)).unwrap(),
            Incoming::Resync
        ));
        let changed = st.changed(Some(&s));
        assert_eq!(changed.keys().collect::<Vec<_>>(), ["default"]);
        let resp = sotw_response(&mut st, changed);
        assert_eq!(resp.resources.len(), 1);
        // ACK: nothing new to send.
        sotw_request(&stats, &mut st, req(&["default"], &resp.nonce, false)).unwrap();
        assert!(st.changed(Some(&s)).is_empty());
        assert_eq!(Stats::get(&stats.acks), 1);
        // Adding ROOTCA sends only ROOTCA.
        sotw_request(
            &stats,
            &mut st,
            req(&["default", "ROOTCA"], &resp.nonce, false),
        )
        .unwrap();
        let changed = st.changed(Some(&s));
        assert_eq!(changed.keys().collect::<Vec<_>>(), ["ROOTCA"]);
        let resp2 = sotw_response(&mut st, changed);
        // A stale nonce is ignored, subscriptions included.
        assert!(matches!(
            sotw_request(&stats, &mut st, req(&["x"], &resp.nonce, false)).unwrap(),
            Incoming::Nothing
        ));
        assert!(st.subscribed.contains("ROOTCA"));
        // NACK: counted, not re-sent.
        assert!(matches!(
            sotw_request(
                &stats,
                &mut st,
                req(&["default", "ROOTCA"], &resp2.nonce, true)
            )
            .unwrap(),
            Incoming::Nothing
        ));
        assert_eq!(Stats::get(&stats.nacks), 1);
        assert_eq!(stats.last_nack.lock().as_deref(), Some("bad cert"));
        assert!(st.changed(Some(&s)).is_empty());
        // A rotation changes `default` only.
        let mut rotated = secret();
        rotated.cert_chain_pem = "CHAIN2".into();
        assert_eq!(
            st.changed(Some(&rotated)).keys().collect::<Vec<_>>(),
            ["default"]
        );
        // Wrong type is refused.
        let mut bad = req(&["default"], "", false);
        bad.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(sotw_request(&stats, &mut st, bad).is_err());
    }

    #[test]
    fn a_reconnecting_client_with_an_old_nonce_is_answered() {
        // Envoy re-opens the stream after an agent restart still carrying the last nonce.
        let stats = Stats::default();
        let mut st = StreamState::default();
        let req = DiscoveryRequest {
            resource_names: vec!["default".into()],
            type_url: SECRET_TYPE_URL.into(),
            version_info: "123/4".into(),
            response_nonce: "nonce-from-the-previous-stream".into(),
            ..Default::default()
        };
        assert!(matches!(
            sotw_request(&stats, &mut st, req).unwrap(),
            Incoming::Resync
        ));
        assert_eq!(st.changed(Some(&secret())).len(), 1);
        assert_eq!(Stats::get(&stats.acks), 0);
    }

    #[test]
    fn delta_honours_initial_versions_and_unsubscribe() {
        let stats = Stats::default();
        let mut st = StreamState::default();
        let s = secret();
        let have = build("default", Some(&s)).unwrap().version;
        let req = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
            initial_resource_versions: [("default".to_string(), have)].into_iter().collect(),
            ..Default::default()
        };
        delta_request(&stats, &mut st, req).unwrap();
        let changed = st.changed(Some(&s));
        assert_eq!(changed.keys().collect::<Vec<_>>(), ["ROOTCA"]);
        let resp = delta_response(&mut st, changed);
        assert_eq!(resp.resources[0].name, "ROOTCA");
        assert!(!resp.resources[0].version.is_empty());
        let unsub = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: resp.nonce.clone(),
            resource_names_unsubscribe: vec!["ROOTCA".into()],
            ..Default::default()
        };
        delta_request(&stats, &mut st, unsub).unwrap();
        assert_eq!(Stats::get(&stats.acks), 1);
        assert!(!st.subscribed.contains("ROOTCA"));
    }
}
