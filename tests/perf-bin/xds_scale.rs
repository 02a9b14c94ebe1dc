// SPDX-License-Identifier: Apache-2.0
//! xDS scale benchmark (issue 3, item 7): pushes N clusters × M endpoints and N routes over delta ADS
//! from the in-process fake istiod to a proxy running as its own process (Envoy or
//! `target/release/pingsail-proxy`), and prints one JSON line with:
//!
//! - `push_to_ack_ms`: from the moment the fake istiod built the push's first (CDS) response until the proxy ACKed the last CDS, EDS and
//!   RDS response that carried it (per type and the maximum);
//! - `push_to_serving_ms`: until a request routed to the last new cluster answers 200 (`first`), and
//!   until every one of a sample of new clusters (every `--sample`-th) has answered 200 (`sample`);
//! - `eds_ack_ms`: ACK latency of `--eds-changes` one-endpoint EDS changes (a pod goes away: one
//!   cluster's assignment loses one endpoint), from the moment the fake istiod built the response to
//!   the ACK arriving, and from the `set` call (which includes the fake's own work);
//! - RSS (`VmRSS`, `VmHWM` from `/proc/PID/status`) before the push, after it and after the EDS
//!   changes, plus the proxy's CPU time spent on the push.
//!
//! What is pushed (Istio-shaped, names like istiod's): one listener `0.0.0.0_80` (HCM, RDS `80`)
//! which is present before the push; N EDS clusters `outbound|80||svc-NNNN.scale.svc.cluster.local`
//! (connect_timeout 10 s, ROUND_ROBIN; with `--circuit-breakers` also Istio's circuit-breaker
//! thresholds, which pingsail does not support yet and NACKs), each with a
//! ClusterLoadAssignment of M endpoints in one locality; one RouteConfiguration `80` with N+1 virtual
//! hosts (one per service, domains `svc-NNNN.scale.svc.cluster.local` and `svc-NNNN`, one route each:
//! prefix `/` → the service's cluster with Istio's default retry policy, `timeout: 0s` and
//! `max_stream_duration: 0s`). Every cluster's M endpoints are `--upstreams` echo servers on
//! 127.0.0.1 (distinct ports), in a per-cluster rotated order.
//!
//! Usage: `xds-scale --proxy envoy|pingsail [--bin PATH] [--clusters 1000] [--endpoints 10]
//! [--upstreams 10] [--eds-changes 20] [--settle-ms 1000] [--sample 10] [--sotw]
//! [--circuit-breakers]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context as _, Result, anyhow, bail};
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, Locality, SocketAddress, address,
    config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, retry_policy, route,
    route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use pingsail_tests::client::{self, Request};
use pingsail_tests::echo::EchoServer;
use pingsail_tests::envoy::envoy_binary;
use pingsail_tests::istiod::{self, CLUSTER, ENDPOINT, FakeIstiod, LISTENER, ROUTE, Seen, Sent};
use pingsail_tests::net::{TempDir, random_loopback_ip};
use prost::Message;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(120);
const LISTEN_PORT: u16 = 18080;
const ADMIN_PORT: u16 = 15000;

struct Args {
    proxy: String,
    bin: Option<PathBuf>,
    clusters: usize,
    endpoints: usize,
    upstreams: usize,
    eds_changes: usize,
    settle: Duration,
    sample: usize,
    delta: bool,
    circuit_breakers: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        proxy: String::new(),
        bin: None,
        clusters: 1000,
        endpoints: 10,
        upstreams: 10,
        eds_changes: 20,
        settle: Duration::from_millis(1000),
        sample: 10,
        delta: true,
        circuit_breakers: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--proxy" => a.proxy = val()?,
            "--bin" => a.bin = Some(PathBuf::from(val()?)),
            "--clusters" => a.clusters = val()?.parse()?,
            "--endpoints" => a.endpoints = val()?.parse()?,
            "--upstreams" => a.upstreams = val()?.parse()?,
            "--eds-changes" => a.eds_changes = val()?.parse()?,
            "--settle-ms" => a.settle = Duration::from_millis(val()?.parse()?),
            "--sample" => a.sample = val()?.parse()?,
            "--sotw" => a.delta = false,
            "--circuit-breakers" => a.circuit_breakers = true,
            other => bail!("unknown argument {other:?} (see the doc comment of xds_scale.rs)"),
        }
    }
    if a.proxy != "envoy" && a.proxy != "pingsail" {
        bail!("--proxy envoy|pingsail is required");
    }
    if a.clusters == 0 || a.endpoints == 0 || a.upstreams == 0 || a.sample == 0 {
        bail!("--clusters, --endpoints, --upstreams and --sample must be > 0");
    }
    Ok(a)
}

// ---------------------------------------------------------------- resources

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

fn dur(seconds: i64) -> Option<PbDuration> {
    Some(PbDuration { seconds, nanos: 0 })
}

fn ads() -> Option<ConfigSource> {
    Some(ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        initial_fetch_timeout: dur(0),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    })
}

fn host(i: usize) -> String {
    format!("svc-{i:04}.scale.svc.cluster.local")
}

fn cluster_name(i: usize) -> String {
    format!("outbound|80||{}", host(i))
}

/// The service used before the push (index = N, so it never collides with the pushed ones).
fn base(n: usize) -> usize {
    n
}

fn cluster(i: usize, circuit_breakers: bool) -> Any {
    let name = cluster_name(i);
    let max = Some(UInt32Value { value: u32::MAX });
    let c = Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: ads(),
            service_name: name,
        }),
        connect_timeout: dur(10),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        circuit_breakers: circuit_breakers.then(|| CircuitBreakers {
            thresholds: vec![
                envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds {
                    max_connections: max,
                    max_pending_requests: max,
                    max_requests: max,
                    max_retries: max,
                    track_remaining: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
        ..Default::default()
    };
    any(CLUSTER, &c)
}

fn cla(i: usize, upstreams: &[SocketAddr], endpoints: usize) -> Any {
    let lb_endpoints = (0..endpoints)
        .map(|j| {
            let a = upstreams[(i + j) % upstreams.len()];
            LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: a.ip().to_string(),
                            port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                u32::from(a.port()),
                            )),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                load_balancing_weight: Some(UInt32Value { value: 1 }),
                ..Default::default()
            }
        })
        .collect();
    let c = ClusterLoadAssignment {
        cluster_name: cluster_name(i),
        endpoints: vec![LocalityLbEndpoints {
            locality: Some(Locality {
                region: "region-a".into(),
                zone: "zone-a".into(),
                sub_zone: String::new(),
            }),
            lb_endpoints,
            load_balancing_weight: Some(UInt32Value {
                value: endpoints as u32,
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    any(ENDPOINT, &c)
}

fn vhost(i: usize) -> VirtualHost {
    let h = host(i);
    let short = format!("svc-{i:04}");
    let previous_hosts = Any {
        type_url: "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            .into(),
        value: vec![],
    };
    VirtualHost {
        name: format!("{h}:80"),
        domains: vec![h.clone(), short],
        routes: vec![Route {
            name: "default".into(),
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster_name(
                    i,
                ))),
                timeout: dur(0),
                retry_policy: Some(envoy_types::pb::envoy::config::route::v3::RetryPolicy {
                    retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
                        .into(),
                    num_retries: Some(UInt32Value { value: 2 }),
                    retry_host_predicate: vec![retry_policy::RetryHostPredicate {
                        name: "envoy.retry_host_predicates.previous_hosts".into(),
                        config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                            previous_hosts,
                        )),
                    }],
                    host_selection_retry_max_attempts: 5,
                    retriable_status_codes: vec![503],
                    ..Default::default()
                }),
                max_stream_duration: Some(route_action::MaxStreamDuration {
                    max_stream_duration: dur(0),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn route_config(services: impl Iterator<Item = usize>) -> Any {
    let rc = RouteConfiguration {
        name: "80".into(),
        virtual_hosts: services.map(vhost).collect(),
        validate_clusters: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
        ..Default::default()
    };
    any(ROUTE, &rc)
}

fn listener(ip: Ipv4Addr) -> Any {
    let router = Any {
        type_url: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router".into(),
        value: vec![],
    };
    let hcm = HttpConnectionManager {
        stat_prefix: "outbound_0.0.0.0_80".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: ads(),
            route_config_name: "80".into(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(router)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let hcm_any = Any {
        type_url: "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager".into(),
        value: hcm.encode_to_vec(),
    };
    let l = Listener {
        name: "0.0.0.0_80".into(),
        address: Some(envoy_types::pb::envoy::config::core::v3::Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                    LISTEN_PORT,
                ))),
                ..Default::default()
            })),
        }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(hcm_any)),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    any(LISTENER, &l)
}

// ---------------------------------------------------------------- the proxy process

struct Proc {
    child: Child,
    pid: u32,
    dir: TempDir,
}

impl Proc {
    async fn start(args: &Args, bootstrap: &str) -> Result<Self> {
        let bin = match (&args.bin, args.proxy.as_str()) {
            (Some(b), _) => b.clone(),
            (None, "envoy") => envoy_binary()?,
            (None, _) => PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/pingsail-proxy"
            )),
        };
        let dir = TempDir::new("pingsail-xds-scale")?;
        let config = dir.path().join("bootstrap.yaml");
        std::fs::write(&config, bootstrap)?;
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--use-dynamic-base-id",
                "-l",
                "warning",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let pid = child.id().context("child pid")?;
        Ok(Self { child, pid, dir })
    }

    fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        let start = s.len().saturating_sub(4000);
        s[s.floor_char_boundary(start)..].to_string()
    }

    fn alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("proxy exited with {st}:\n{}", self.stderr_tail());
        }
        Ok(())
    }

    /// `VmRSS` and `VmHWM` in KiB.
    fn mem(&self) -> Result<(u64, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let field = |k: &str| -> Result<u64> {
            let line = s
                .lines()
                .find(|l| l.starts_with(k))
                .ok_or_else(|| anyhow!("no {k} in /proc/{}/status", self.pid))?;
            Ok(line
                .split_whitespace()
                .nth(1)
                .context("status field value")?
                .parse()?)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// utime + stime in seconds.
    fn cpu(&self) -> Result<f64> {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        let rest = s.rsplit_once(')').context("stat format")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // fields after ')' start at index 3 (state); utime = field 14, stime = 15 (1-based).
        let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
        Ok(ticks / 100.0)
    }
}

// ---------------------------------------------------------------- measuring

async fn get_status(listener: SocketAddr, host: &str) -> Option<u16> {
    let req = Request::get("/")
        .header("host", host)
        .header("connection", "close");
    client::send(listener, &req).await.ok().map(|r| r.status)
}

/// Polls until a request for `host` answers 200.
async fn until_200(listener: SocketAddr, host: &str, limit: Duration) -> Result<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        if get_status(listener, host).await == Some(200) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("{host} never answered 200 within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// When the ACK of the newest response of `type_url` sent after `from` arrived, once the responses
/// sent after `from` covered `names` and the newest one was ACKed. `Err` on a NACK.
fn acked_at(
    seen: &[Seen],
    sent: &[Sent],
    from: usize,
    type_url: &str,
    names: &BTreeSet<String>,
) -> Option<Result<(Instant, Instant)>> {
    let ours: Vec<&Sent> = sent[from.min(sent.len())..]
        .iter()
        .filter(|s| s.type_url == type_url)
        .collect();
    let carried: BTreeSet<&String> = ours.iter().flat_map(|s| s.names.iter()).collect();
    if !names.iter().all(|n| carried.contains(n)) {
        return None;
    }
    let last = ours.last()?;
    let reply = seen
        .iter()
        .find(|r| r.type_url == type_url && r.nonce == last.nonce)?;
    if let Some(e) = &reply.error {
        return Some(Err(anyhow!("NACK of {type_url}: {e}")));
    }
    Some(Ok((last.at, reply.at)))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn nacks(istiod: &FakeIstiod) -> Vec<String> {
    istiod
        .seen()
        .iter()
        .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.type_url)))
        .collect()
}

async fn run(args: Args) -> Result<serde_json::Value> {
    let n = args.clusters;
    let mut echoes = Vec::new();
    for k in 0..args.upstreams {
        echoes.push(EchoServer::start(&format!("u{k}")).await?);
    }
    let upstreams: Vec<SocketAddr> = echoes.iter().map(|e| e.addr()).collect();
    let istiod = FakeIstiod::start_tcp().await?;
    let ip = random_loopback_ip();
    let listen = SocketAddr::from((ip, LISTEN_PORT));
    let admin = SocketAddr::from((ip, ADMIN_PORT));

    // Before the push: the listener, one route table with one service, its cluster and endpoints.
    let b = base(n);
    let cb = args.circuit_breakers;
    istiod.set(CLUSTER, vec![cluster(b, cb)])?;
    istiod.set(ENDPOINT, vec![cla(b, &upstreams, args.endpoints)])?;
    istiod.set(LISTENER, vec![listener(ip)])?;
    istiod.set(ROUTE, vec![route_config(std::iter::once(b))])?;

    let bootstrap = istiod::bootstrap(
        &istiod,
        admin,
        args.delta,
        "sidecar~10.0.0.1~bench.scale~scale.svc.cluster.local",
    );
    let mut proc = Proc::start(&args, &bootstrap).await?;
    let started = Instant::now();
    for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        istiod
            .wait_acked(t, WAIT)
            .await
            .with_context(|| proc.stderr_tail())?;
    }
    until_200(listen, &host(b), WAIT).await?;
    let startup_ms = ms(started.elapsed());
    tokio::time::sleep(args.settle).await;
    proc.alive()?;
    let (rss_before, hwm_before) = proc.mem()?;
    let cpu_before = proc.cpu()?;

    // Build the push outside the measured window.
    let all = || (0..n).chain(std::iter::once(b));
    let clusters: Vec<Any> = all().map(|i| cluster(i, cb)).collect();
    let mut clas: Vec<Any> = all().map(|i| cla(i, &upstreams, args.endpoints)).collect();
    let routes = vec![route_config(all())];
    let bytes = |v: &[Any]| v.iter().map(|a| a.value.len()).sum::<usize>();
    let push_bytes = serde_json::json!({
        "cds": bytes(&clusters), "eds": bytes(&clas), "rds": bytes(&routes),
    });
    let cluster_names: BTreeSet<String> = (0..n).map(cluster_name).collect();
    let rds_names: BTreeSet<String> = ["80".to_string()].into();

    // Endpoints first, before the clock starts: nobody is subscribed to them yet, so nothing is sent
    // until the proxy asks for them after CDS (which is when istiod answers too).
    let from = istiod.sent().len();
    istiod.set(ENDPOINT, clas.clone())?;
    let t0 = Instant::now();
    istiod.set(CLUSTER, clusters)?;
    istiod.set(ROUTE, routes)?;
    let set_ms = ms(t0.elapsed());

    let sample: Vec<usize> = (0..n).rev().step_by(args.sample).collect();
    let serving = async {
        let first = until_200(listen, &host(n - 1), WAIT).await?;
        let mut pending: Vec<usize> = sample.clone();
        while !pending.is_empty() {
            let mut left = Vec::new();
            for &i in &pending {
                if get_status(listen, &host(i)).await != Some(200) {
                    left.push(i);
                }
            }
            pending = left;
            if t0.elapsed() > WAIT {
                bail!("{} sampled services never answered 200", pending.len());
            }
        }
        Ok::<_, anyhow::Error>((first, Instant::now()))
    };
    let acks = async {
        istiod
            .wait_for("ACK of the big push", WAIT, |seen, sent| {
                if seen.iter().any(|s| s.error.is_some()) {
                    return true;
                }
                let c = acked_at(seen, sent, from, CLUSTER, &cluster_names);
                let e = acked_at(seen, sent, from, ENDPOINT, &cluster_names);
                let r = acked_at(seen, sent, from, ROUTE, &rds_names);
                matches!((&c, &e, &r), (Some(_), Some(_), Some(_)))
            })
            .await?;
        let (seen, sent) = (istiod.seen(), istiod.sent());
        if let Some(e) = seen.iter().find_map(|s| s.error.clone()) {
            bail!("NACK: {e}");
        }
        let at = |t: &str, names: &BTreeSet<String>| -> Result<Instant> {
            let (_, ack) = acked_at(&seen, &sent, from, t, names).context("ack")??;
            Ok(ack)
        };
        Ok::<_, anyhow::Error>((
            at(CLUSTER, &cluster_names)?,
            at(ENDPOINT, &cluster_names)?,
            at(ROUTE, &rds_names)?,
        ))
    };
    let (serving, acks) = tokio::join!(serving, acks);
    // The clock starts when the fake istiod built the push's first response (the fake's own `set`
    // work, which decodes every resource for its name, is not the proxy's).
    let t_push = istiod
        .sent()
        .get(from..)
        .and_then(|s| s.iter().find(|s| s.type_url == CLUSTER))
        .map(|s| s.at)
        .unwrap_or(t0);
    let ((first, sampled), (ack_cds, ack_eds, ack_rds)) = match (serving, acks) {
        (Ok(s), Ok(a)) => (s, a),
        (Err(e), _) | (_, Err(e)) => {
            let _ = proc.alive();
            return Err(e.context(format!(
                "nacks: {:?}\nproxy stderr tail:\n{}",
                nacks(&istiod),
                proc.stderr_tail()
            )));
        }
    };
    let serving_first_ms = ms(first - t_push);
    let serving_sample_ms = ms(sampled - t_push);
    let (ack_cds, ack_eds, ack_rds) = (
        ms(ack_cds - t_push),
        ms(ack_eds - t_push),
        ms(ack_rds - t_push),
    );
    let cpu_push = proc.cpu()? - cpu_before;
    tokio::time::sleep(args.settle).await;
    proc.alive()?;
    let (rss_after, hwm_after) = proc.mem()?;

    // One-endpoint EDS changes: cluster c loses its last endpoint (a pod goes away).
    let mut eds_server = Vec::new();
    let mut eds_from_set = Vec::new();
    let mut changed = BTreeSet::new();
    for k in 0..args.eds_changes {
        let mut c = (k * 97 + 13) % n;
        while !changed.insert(c) {
            c = (c + 1) % n;
        }
        clas[c] = cla(c, &upstreams, args.endpoints - 1);
        let names: BTreeSet<String> = [cluster_name(c)].into();
        let from = istiod.sent().len();
        let t = Instant::now();
        istiod.set(ENDPOINT, clas.clone())?;
        istiod
            .wait_for("ACK of an EDS change", WAIT, |seen, sent| {
                acked_at(seen, sent, from, ENDPOINT, &names).is_some()
            })
            .await?;
        let (built, ack) =
            acked_at(&istiod.seen(), &istiod.sent(), from, ENDPOINT, &names).context("ack")??;
        eds_server.push(ms(ack - built));
        eds_from_set.push(ms(ack - t));
    }
    // The changed clusters still serve.
    for &c in changed.iter().take(5) {
        until_200(listen, &host(c), Duration::from_secs(5)).await?;
    }
    tokio::time::sleep(args.settle).await;
    proc.alive()?;
    let (rss_end, hwm_end) = proc.mem()?;
    let stderr_tail = proc.stderr_tail();

    Ok(serde_json::json!({
        "proxy": args.proxy,
        "api": if args.delta { "DELTA_GRPC" } else { "GRPC" },
        "clusters": n,
        "endpoints": n * args.endpoints,
        "virtual_hosts": n,
        "upstream_sockets": args.upstreams,
        "push_bytes": push_bytes,
        "startup_ms": startup_ms,
        "set_ms": set_ms,
        "set_to_push_ms": ms(t_push - t0),
        "push_to_ack_ms": { "cds": ack_cds, "eds": ack_eds, "rds": ack_rds,
                            "all": ack_cds.max(ack_eds).max(ack_rds) },
        "push_to_serving_ms": { "first": serving_first_ms, "sample": serving_sample_ms,
                                "sample_size": sample.len() },
        "push_cpu_s": (cpu_push * 1000.0).round() / 1000.0,
        "eds_ack_ms": { "median": median(&eds_server), "median_from_set": median(&eds_from_set),
                        "max": eds_server.iter().cloned().fold(0.0, f64::max),
                        "all": eds_server },
        "rss_kib": { "before": rss_before, "after": rss_after, "end": rss_end },
        "hwm_kib": { "before": hwm_before, "after": hwm_after, "end": hwm_end },
        "nacks": nacks(&istiod),
        "stderr_lines": stderr_tail.lines().count(),
    }))
}

/// `--pool-rss`: the resident memory of pingsail's descriptor pool (which the proxy keeps while its
/// ADS stream is open), measured in this process: `VmRSS` before building it, with it, after dropping
/// it.
fn pool_rss() -> Result<serde_json::Value> {
    let rss = || -> Result<u64> {
        let s = std::fs::read_to_string("/proc/self/status")?;
        let line = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("VmRSS")?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("VmRSS value")?
            .parse()?)
    };
    let before = rss()?;
    let pool = pingsail_proxy::xds::pool::pool();
    let with = rss()?;
    let messages = pool.all_messages().count();
    drop(pool);
    let after = rss()?;
    Ok(serde_json::json!({
        "pool_messages": messages,
        "rss_kib": { "before": before, "with_pool": with, "after_drop": after },
        "pool_kib": with.saturating_sub(before),
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--pool-rss") {
        println!("{}", pool_rss()?);
        return Ok(());
    }
    let args = parse_args()?;
    let v = run(args).await?;
    println!("{v}");
    Ok(())
}
