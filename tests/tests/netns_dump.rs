// SPDX-License-Identifier: Apache-2.0
//! The real sidecar listener dump (`istioctl-authz/sidecar-listeners-configdump.json`: an httpbin
//! pod, PERMISSIVE mTLS, an ALLOW AuthorizationPolicy) served by pingsail-proxy (UID 1337) in
//! network-namespace pods with `pingsail-agent iptables` capture:
//!
//! * outbound: the app's connections to the dump's ClusterIPs are redirected to the dump's own
//!   `virtualOutbound` (15001) and handed off to the dump's per-service listeners
//!   (`10.96.0.10_53`, `10.108.65.203_443`, …), whose clusters (named as in the dump, supplied by
//!   the test) point at apps in a server pod; everything else takes `PassthroughCluster`;
//! * inbound: connections to the pod reach the dump's `virtualInbound` (15006) and its chains —
//!   as istiod sent them (the ALLOW policy refuses plaintext and unauthenticated peers), with
//!   authorization filters removed (so traffic reaches `inbound|80||` and
//!   `InboundPassthroughClusterIpv4`), and reshaped the way istiod compiles the other
//!   PeerAuthentication modes (STRICT, DISABLE, a port-level override) — with an Istio-style mTLS
//!   client (SDS-served test PKI certificates, istio ALPN) and a plaintext client.
//!
//! The dump's HCM `ext_authz` filter (gRPC, for istiod's CUSTOM action) stays: it is consulted only
//! for requests its RBAC shadow policy selects, which these requests are not (its cluster
//! `outbound|9191||sample-ext-authz-grpc` is supplied and never called).
//! Needs root (skips with a message otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pingsail_agent::sds::{Server, ServerHandle, secret_channel};
use pingsail_agent::testing::TestPki;
use pingsail_tests::net::TempDir;
use pingsail_tests::netns::{Net, Pod, Proc, cargo_bin};
use serde_json::{Value, json};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

const APP: &str = env!("CARGO_BIN_EXE_pod-app");
const PROBE: &str = env!("CARGO_BIN_EXE_netns-probe");
const DUMP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/istio/configdumps/istioctl-authz/sidecar-listeners-configdump.json"
);
const SLEEP_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const HTTPBIN_ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

/// The dump's active dynamic listeners by name (each without its `@type`).
fn dump_listeners() -> Vec<Value> {
    let text = std::fs::read_to_string(DUMP)
        .unwrap_or_else(|e| panic!("{DUMP}: {e} (the shared reference corpus must be present)"));
    let dump: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for c in dump["configs"].as_array().unwrap() {
        for l in c["dynamic_listeners"].as_array().into_iter().flatten() {
            let mut li = l["active_state"]["listener"].clone();
            if let Some(o) = li.as_object_mut() {
                o.remove("@type");
                out.push(li);
            }
        }
    }
    out
}

fn listener(name: &str) -> Value {
    dump_listeners()
        .into_iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("listener {name} not in the dump"))
}

/// Drops HTTP filters named `names` from every HCM of `l`, and network filters named `names`.
fn without_filters(mut l: Value, names: &[&str]) -> Value {
    for fc in l["filter_chains"].as_array_mut().unwrap() {
        let filters = fc["filters"].as_array_mut().unwrap();
        filters.retain(|f| !names.contains(&f["name"].as_str().unwrap_or("")));
        for f in filters {
            // (get_mut: indexing a Value mutably would insert the key)
            if let Some(hf) = f
                .get_mut("typed_config")
                .and_then(|t| t.get_mut("http_filters"))
                .and_then(Value::as_array_mut)
            {
                hf.retain(|h| !names.contains(&h["name"].as_str().unwrap_or("")));
            }
        }
    }
    l
}

/// Keeps the filter chains for which `keep(chain)` holds.
fn chains_where(mut l: Value, keep: impl Fn(&Value) -> bool) -> Value {
    l["filter_chains"].as_array_mut().unwrap().retain(keep);
    l
}

fn transport(fc: &Value) -> &str {
    fc["filter_chain_match"]["transport_protocol"]
        .as_str()
        .unwrap_or("")
}

fn port(fc: &Value) -> Option<u64> {
    fc["filter_chain_match"]["destination_port"].as_u64()
}

/// The dump's `virtualInbound`, verbatim.
fn virtual_inbound() -> Value {
    listener("virtualInbound")
}

/// … and minus authorization altogether (RBAC), so traffic reaches the inbound clusters.
fn virtual_inbound_open() -> Value {
    without_filters(
        virtual_inbound(),
        &["envoy.filters.http.rbac", "envoy.filters.network.rbac"],
    )
}

fn static_cluster(name: &str, ip: Ipv4Addr, port: u16) -> Value {
    json!({
        "name": name, "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": { "cluster_name": name, "endpoints": [ { "lb_endpoints": [
            { "endpoint": { "address": { "socket_address": { "address": ip.to_string(), "port_value": port } } } }
        ] } ] }
    })
}

fn orig_dst_cluster(name: &str, bind: Option<&str>) -> Value {
    let mut c = json!({
        "name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s"
    });
    if let Some(b) = bind {
        c["upstream_bind_config"] = json!({ "source_address": { "address": b, "port_value": 0 } });
    }
    c
}

fn blackhole() -> Value {
    json!({ "name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "1s" })
}

fn sds_cluster(sock: &std::path::Path) -> Value {
    json!({
        "name": "sds-grpc", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": { "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": { "http2_protocol_options": {} } } },
        "load_assignment": { "cluster_name": "sds-grpc", "endpoints": [ { "lb_endpoints": [
            { "endpoint": { "address": { "pipe": { "path": sock.display().to_string() } } } }
        ] } ] }
    })
}

fn bootstrap(listeners: Vec<Value>, clusters: Vec<Value>) -> String {
    json!({
        "node": { "id": "sidecar~10.77.0.2~httpbin.default~default.svc.cluster.local", "cluster": "httpbin.default" },
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 15000 } } },
        "static_resources": { "listeners": listeners, "clusters": clusters }
    })
    .to_string()
}

fn capture(pod: &Pod) {
    pod.apply_iptables(&[
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-g",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
        "--enable-ipv6=false",
    ])
    .unwrap();
}

struct Sidecar {
    _proc: Proc,
    _dir: TempDir,
}

/// Starts pingsail-proxy as UID 1337 in `pod` and waits for its admin `/ready`.
fn sidecar(pod: &Pod, bootstrap: &str) -> Sidecar {
    let dir = TempDir::new("pingsail-dump").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("bootstrap.json");
    std::fs::write(&path, bootstrap).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let bin = cargo_bin("pingsail-proxy", "pingsail-proxy").unwrap();
    let mut cmd = pod.cmd_as(1337, 1337, bin);
    cmd.arg("-c")
        .arg(&path)
        .args(["--concurrency", "1", "-l", "warning"]);
    let proc = pod.spawn(cmd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = pod.cmd("curl");
        c.args(["-sf", "--max-time", "1", "http://127.0.0.1:15000/ready"]);
        if c.output().is_ok_and(|o| o.status.success()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sidecar in {} never ready",
            pod.ns
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Sidecar {
        _proc: proc,
        _dir: dir,
    }
}

/// One counter from the sidecar's `/stats` (0 when absent).
fn stat(pod: &Pod, name: &str) -> u64 {
    let stats = pod
        .exec("curl", &["-s", "http://127.0.0.1:15000/stats"])
        .unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn run(pod: &Pod, program: &str, args: &[&str]) -> Result<String, String> {
    let out = pod.cmd(program).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{text} {}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn spawn_ready(pod: &Pod, program: &str, args: &[&str], listeners: usize) -> Proc {
    let mut cmd = pod.cmd(program);
    cmd.args(args);
    let mut p = pod.spawn(cmd).unwrap();
    for _ in 0..listeners {
        p.wait_for("listening").unwrap();
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Outbound: 15001 → per-service listeners.

/// The dump's per-service TCP listeners exercised here: (ClusterIP, port, the cluster its
/// tcp_proxy names, the server-pod port the test points that cluster at).
const SERVICES: &[(&str, u16, &str, u16)] = &[
    (
        "10.96.0.10",
        53,
        "outbound|53||kube-dns.kube-system.svc.cluster.local",
        10053,
    ),
    (
        "10.96.0.1",
        443,
        "outbound|443||kubernetes.default.svc.cluster.local",
        10443,
    ),
    (
        "10.108.65.203",
        443,
        "outbound|443||istiod.istio-system.svc.cluster.local",
        11443,
    ),
    (
        "10.108.65.203",
        15012,
        "outbound|15012||istiod.istio-system.svc.cluster.local",
        15012,
    ),
];

#[test]
fn dump_virtual_outbound_hands_off_to_its_per_service_listeners() {
    let Some(net) = Net::new("dump-outbound") else {
        return;
    };
    let client = net.pod("client").unwrap();
    let server = net.pod("server").unwrap();
    let ports: Vec<String> = SERVICES
        .iter()
        .map(|s| format!("0.0.0.0:{}", s.3))
        .chain(std::iter::once("0.0.0.0:7777".to_string()))
        .collect();
    let mut args = vec!["server", "svc"];
    args.extend(ports.iter().map(String::as_str));
    let _apps = spawn_ready(&server, PROBE, &args, ports.len());

    // The dump's virtualOutbound and every per-service listener that is plain tcp_proxy (the
    // HTTP ones use RDS, which a static bootstrap cannot serve; netns_mesh.rs covers that path).
    let mut listeners = vec![listener("virtualOutbound")];
    let mut clusters = vec![orig_dst_cluster("PassthroughCluster", None), blackhole()];
    for l in dump_listeners() {
        if l["bind_to_port"] != json!(false) {
            continue;
        }
        let chains = l["filter_chains"].as_array().unwrap();
        let tcp: Vec<&str> = chains
            .iter()
            .flat_map(|fc| fc["filters"].as_array().unwrap())
            .filter_map(|f| f["typed_config"]["cluster"].as_str())
            .collect();
        let all_tcp = chains.iter().all(|fc| {
            fc["filters"].as_array().unwrap().iter().all(|f| {
                f["typed_config"]["http_filters"].is_null() && f["typed_config"]["rds"].is_null()
            })
        });
        if !all_tcp {
            continue;
        }
        for c in tcp {
            // Clusters not exercised point at a closed port.
            let p = SERVICES.iter().find(|s| s.2 == c).map_or(1, |s| s.3);
            clusters.push(static_cluster(c, server.ip4, p));
        }
        listeners.push(l);
    }
    assert!(
        listeners.len() >= 9,
        "expected the dump's TCP service listeners"
    );
    capture(&client);
    let _sidecar = sidecar(&client, &bootstrap(listeners, clusters));

    for (vip, port, cluster, target) in SERVICES {
        let line = run(&client, PROBE, &["client", &format!("{vip}:{port}")]).unwrap();
        // The listener for exactly <ClusterIP>_<port> took it, and its cluster reached the app.
        assert!(
            line.starts_with(&format!(
                "svc local={}:{target} peer={}:",
                server.ip4, client.ip4
            )),
            "{vip}:{port}: {line}"
        );
        assert_eq!(
            stat(&client, &format!("tcp.{cluster}.downstream_cx_total")),
            1,
            "{vip}:{port}"
        );
    }
    // No listener for the server pod's :7777: the dump's catch-all chain, PassthroughCluster.
    let line = run(&client, PROBE, &["client", &format!("{}:7777", server.ip4)]).unwrap();
    assert!(
        line.starts_with(&format!("svc local={}:7777", server.ip4)),
        "{line}"
    );
    assert_eq!(
        stat(&client, "tcp.PassthroughCluster.downstream_cx_total"),
        1
    );
    // A direct connection to 15001 takes the dump's blackhole chain: no answer, no self-loop.
    let r = run(&client, PROBE, &["client", "127.0.0.1:15001"]);
    assert!(
        r.as_deref().is_ok_and(str::is_empty) || r.is_err(),
        "a direct connection to 15001 got an answer: {r:?}"
    );
    assert_eq!(stat(&client, "tcp.BlackHoleCluster.downstream_cx_total"), 1);
    assert_eq!(
        stat(&client, "tcp.PassthroughCluster.downstream_cx_total"),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// Inbound: 15006 and the PeerAuthentication shapes.

struct Inbound {
    client: Pod,
    server: Pod,
    /// PEM files of the sleep identity (mesh client) and of a foreign CA's client
    certs: TempDir,
    _sidecar: Sidecar,
    _apps: Vec<Proc>,
    _sds: ServerHandle,
    _rt: tokio::runtime::Runtime,
    _net: Net,
}

impl Inbound {
    /// The server pod (httpbin) with capture and `virtual_inbound` as its 15006; apps on :80
    /// (HTTP), :7070 (HTTP) and :9000 (TCP echo); a client pod without a sidecar.
    fn start(test: &str, virtual_inbound: Value) -> Option<Inbound> {
        let net = Net::new(test)?;
        let client = net.pod("client").unwrap();
        let server = net.pod("server").unwrap();
        let apps = vec![
            spawn_ready(&server, APP, &["http", "app80", "0.0.0.0:80"], 1),
            spawn_ready(&server, APP, &["http", "app7070", "0.0.0.0:7070"], 1),
            spawn_ready(&server, APP, &["echo", "tcp9000", "0.0.0.0:9000"], 1),
        ];
        let pki = TestPki::new("cluster.local", true).unwrap();
        let certs = TempDir::new("pingsail-dump-certs").unwrap();
        std::fs::set_permissions(certs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (chain, key, root) = pki
            .issue_files(SLEEP_ID, Duration::from_secs(3600))
            .unwrap();
        std::fs::write(certs.path().join("sleep.pem"), chain).unwrap();
        std::fs::write(certs.path().join("sleep.key"), key).unwrap();
        std::fs::write(certs.path().join("root.pem"), &root).unwrap();
        let other = TestPki::new("cluster.local", false).unwrap();
        let (chain, key, _) = other
            .issue_files(SLEEP_ID, Duration::from_secs(3600))
            .unwrap();
        std::fs::write(certs.path().join("foreign.pem"), chain).unwrap();
        std::fs::write(certs.path().join("foreign.key"), key).unwrap();

        // The agent's SDS server with httpbin's identity, on a socket UID 1337 may use.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sock = certs.path().join("sds.sock");
        let (tx, rx) = secret_channel();
        tx.send_replace(Some(Arc::new(
            pki.workload_secret(HTTPBIN_ID, Duration::from_secs(3600))
                .unwrap(),
        )));
        let sds = rt.block_on(Server::start(&sock, rx)).unwrap();
        drop(tx);
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();

        let clusters = vec![
            orig_dst_cluster("inbound|80||", Some("127.0.0.6")),
            orig_dst_cluster("InboundPassthroughClusterIpv4", Some("127.0.0.6")),
            // The ext_authz service (CUSTOM policies); nothing listens there.
            static_cluster(
                "outbound|9191||sample-ext-authz-grpc",
                Ipv4Addr::LOCALHOST,
                9191,
            ),
            blackhole(),
            sds_cluster(&sock),
        ];
        capture(&server);
        let sidecar = sidecar(&server, &bootstrap(vec![virtual_inbound], clusters));
        Some(Inbound {
            client,
            server,
            certs,
            _sidecar: sidecar,
            _apps: apps,
            _sds: sds,
            _rt: rt,
            _net: net,
        })
    }

    /// Plaintext HTTP GET from the client pod: (status line and headers + body, lower-cased) or
    /// the error when the connection failed.
    fn http(&self, port: u16, path: &str) -> Result<String, String> {
        let url = format!("http://{}:{port}{path}", self.server.ip4);
        run(&self.client, "curl", &["-s", "-i", "--max-time", "5", &url]).map(|s| s.to_lowercase())
    }

    /// One line to the TCP echo app through :9000 in plaintext.
    fn tcp(&self) -> Result<String, String> {
        run(
            &self.client,
            APP,
            &["send", &format!("{}:9000", self.server.ip4), "ping"],
        )
    }

    /// An Istio-style mTLS connection (identity `who`: "sleep", "foreign" or "-" for no
    /// certificate) offering `alpn`, sending `text`. Retries while the sidecar's SDS secrets may
    /// still be on their way (only for the first successful handshake of a test).
    fn mtls(&self, port: u16, who: &str, alpn: &str, text: &str) -> Result<String, String> {
        let d = self.certs.path();
        let (cert, key) = if who == "-" {
            ("-".to_string(), "-".to_string())
        } else {
            (
                d.join(format!("{who}.pem")).display().to_string(),
                d.join(format!("{who}.key")).display().to_string(),
            )
        };
        let root = d.join("root.pem").display().to_string();
        let sni = format!("outbound_.{port}_._.httpbin.default.svc.cluster.local");
        run(
            &self.client,
            APP,
            &[
                "tls",
                &format!("{}:{port}", self.server.ip4),
                &sni,
                &cert,
                &key,
                &root,
                HTTPBIN_ID,
                alpn,
                text,
            ],
        )
    }

    /// Waits until the sidecar serves TLS (its SDS secrets arrived) for the sleep identity.
    fn wait_tls(&self, port: u16, alpn: &str, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.mtls(port, "sleep", alpn, text) {
                Ok(s) => return s,
                Err(e) if Instant::now() > deadline => panic!("no TLS on :{port}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

const GET: &str = "GET /info HTTP/1.1\\r\\nhost: httpbin\\r\\nconnection: close\\r\\n\\r\\n";

fn refused(r: &Result<String, String>) -> bool {
    match r {
        Err(_) => true,
        Ok(s) => s.is_empty() || s == "alpn=-" || !s.contains("200"),
    }
}

#[test]
fn dump_virtual_inbound_as_istiod_sent_it_enforces_the_allow_policy() {
    let Some(p) = Inbound::start("dump-inbound-authz", virtual_inbound()) else {
        return;
    };
    // Port 80's plaintext chain (PERMISSIVE) with the dump's ALLOW policy: no peer identity, no
    // JWT claims → 403 from RBAC, and the app never sees it.
    let out = p.http(80, "/info").unwrap();
    assert!(out.starts_with("http/1.1 403"), "{out}");
    assert!(out.contains("rbac: access denied"), "{out}");
    assert!(stat(&p.server, "http.inbound_0.0.0.0_80.rbac.denied") >= 1);
    // The sniffed-HTTP catch-all chain has the same policy.
    let out = p.http(7070, "/x").unwrap();
    assert!(out.starts_with("http/1.1 403"), "{out}");
    // The TCP catch-all's network RBAC has an empty ALLOW rule set: every connection is refused.
    let r = p.tcp();
    assert!(
        r.is_err(),
        "TCP passed the dump's deny-all network RBAC: {r:?}"
    );
    // mTLS as the sleep identity on port 80's TLS chain: the handshake succeeds (istiod's ALPN),
    // the policy still wants JWT claims → 403.
    let out = p.wait_tls(80, "istio-http/1.1", GET);
    assert!(out.contains("HTTP/1.1 403"), "{out}");
    assert!(out.contains("RBAC: access denied"), "{out}");
    assert_eq!(stat(&p.server, "cluster.inbound|80||.upstream_rq_total"), 0);
}

#[test]
fn dump_virtual_inbound_permissive_reaches_the_inbound_clusters() {
    let Some(p) = Inbound::start("dump-inbound-perm", virtual_inbound_open()) else {
        return;
    };
    // Plaintext HTTP to :80: the `0.0.0.0_80` raw_buffer chain, cluster inbound|80||, from 127.0.0.6.
    let out = p.http(80, "/a").unwrap();
    assert!(out.starts_with("http/1.1 200"), "{out}");
    assert!(out.contains("app80 get /a"), "{out}");
    assert!(out.contains("x-peer: 127.0.0.6:"), "{out}");
    assert_eq!(stat(&p.server, "cluster.inbound|80||.upstream_rq_total"), 1);
    // Plaintext HTTP to a port without its own chain: the sniffed catch-all HTTP chain,
    // InboundPassthroughClusterIpv4.
    let out = p.http(7070, "/b").unwrap();
    assert!(out.contains("app7070 get /b"), "{out}");
    assert!(out.contains("x-peer: 127.0.0.6:"), "{out}");
    assert_eq!(
        stat(
            &p.server,
            "cluster.InboundPassthroughClusterIpv4.upstream_rq_total"
        ),
        1
    );
    // Plaintext TCP: the raw_buffer catch-all chain (tcp_proxy to InboundPassthroughClusterIpv4).
    let line = p.tcp().unwrap();
    assert!(
        line.starts_with("tcp9000 got=ping peer=127.0.0.6:"),
        "{line}"
    );
    assert_eq!(
        stat(
            &p.server,
            "tcp.InboundPassthroughClusterIpv4.downstream_cx_total"
        ),
        1
    );
    // mTLS HTTP on :80 (ALPN istio-http/1.1): port 80's TLS chain → inbound|80||.
    let out = p.wait_tls(80, "istio-http/1.1", GET);
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert!(out.contains("app80 GET /info"), "{out}");
    assert_eq!(stat(&p.server, "cluster.inbound|80||.upstream_rq_total"), 2);
    // mTLS HTTP elsewhere: the TLS catch-all HTTP chain (istio-h2 / istio-http/1.1 ALPN).
    let out = p.mtls(7070, "sleep", "istio-http/1.1", GET).unwrap();
    assert!(out.contains("app7070 GET /info"), "{out}");
    // mTLS TCP (ALPN istio-peer-exchange): the TLS catch-all TCP chain.
    let out = p
        .mtls(9000, "sleep", "istio-peer-exchange,istio", "ping\\n")
        .unwrap();
    assert!(out.contains("tcp9000 got=ping peer=127.0.0.6:"), "{out}");
    assert_eq!(
        stat(
            &p.server,
            "tcp.InboundPassthroughClusterIpv4.downstream_cx_total"
        ),
        2
    );
    // Identity is enforced on the TLS chains: another CA, or no certificate, is refused.
    assert!(refused(&p.mtls(80, "foreign", "istio-http/1.1", GET)));
    assert!(refused(&p.mtls(80, "-", "istio-http/1.1", GET)));
    assert!(refused(&p.mtls(
        9000,
        "foreign",
        "istio-peer-exchange",
        "ping\\n"
    )));
}

#[test]
fn peer_authentication_strict_refuses_plaintext() {
    // STRICT: istiod emits only the TLS chains (and the 15006 blackhole).
    let vi = chains_where(virtual_inbound_open(), |fc| transport(fc) != "raw_buffer");
    let Some(p) = Inbound::start("dump-strict", vi) else {
        return;
    };
    let out = p.wait_tls(80, "istio-http/1.1", GET);
    assert!(out.contains("app80 GET /info"), "{out}");
    let out = p
        .mtls(9000, "sleep", "istio-peer-exchange,istio", "ping\\n")
        .unwrap();
    assert!(out.contains("tcp9000 got=ping"), "{out}");
    assert!(
        p.http(80, "/a").is_err_or_empty(),
        "plaintext :80 under STRICT"
    );
    assert!(
        p.http(7070, "/a").is_err_or_empty(),
        "plaintext :7070 under STRICT"
    );
    assert!(p.tcp().is_err(), "plaintext TCP under STRICT");
    assert_eq!(stat(&p.server, "cluster.inbound|80||.upstream_rq_total"), 1);
}

#[test]
fn peer_authentication_disable_serves_plaintext_only() {
    // DISABLE: istiod emits no TLS-terminating chain.
    let vi = chains_where(virtual_inbound_open(), |fc| {
        fc["transport_socket"].is_null()
    });
    let Some(p) = Inbound::start("dump-disable", vi) else {
        return;
    };
    let out = p.http(80, "/a").unwrap();
    assert!(out.contains("app80 get /a"), "{out}");
    assert!(p.tcp().unwrap().starts_with("tcp9000 got=ping"));
    // An Istio mTLS client gets no mesh TLS: port 80 has no TLS chain (closed); elsewhere the
    // ClientHello is passed through to the app (the TLS-passthrough catch-all), which is no TLS
    // server.
    assert!(refused(&p.mtls(80, "sleep", "istio-http/1.1", GET)));
    assert!(refused(&p.mtls(
        9000,
        "sleep",
        "istio-peer-exchange",
        "ping\\n"
    )));
    assert_eq!(stat(&p.server, "cluster.inbound|80||.upstream_rq_total"), 1);
}

#[test]
fn peer_authentication_port_level_override() {
    // Workload STRICT with port 80 PERMISSIVE (portLevelMtls): port 80 keeps both chains, the
    // catch-alls keep only TLS.
    let vi = chains_where(virtual_inbound_open(), |fc| {
        port(fc) == Some(80) || transport(fc) != "raw_buffer"
    });
    let Some(p) = Inbound::start("dump-portlevel", vi) else {
        return;
    };
    let out = p.http(80, "/a").unwrap();
    assert!(out.contains("app80 get /a"), "{out}");
    let out = p.wait_tls(80, "istio-http/1.1", GET);
    assert!(out.contains("app80 GET /info"), "{out}");
    assert!(
        p.http(7070, "/a").is_err_or_empty(),
        "plaintext :7070 (STRICT)"
    );
    assert!(p.tcp().is_err(), "plaintext TCP (STRICT)");
    let out = p.mtls(7070, "sleep", "istio-http/1.1", GET).unwrap();
    assert!(out.contains("app7070 GET /info"), "{out}");
}

trait ErrOrEmpty {
    fn is_err_or_empty(&self) -> bool;
}

impl ErrOrEmpty for Result<String, String> {
    /// curl fails, or gets nothing back (the connection was closed without an answer).
    fn is_err_or_empty(&self) -> bool {
        self.as_ref().map_or(true, |s| s.is_empty())
    }
}
