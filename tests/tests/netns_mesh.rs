// SPDX-License-Identifier: Apache-2.0
//! Pods as network namespaces with the real pieces: `pingsail-agent iptables` capture and
//! `pingsail-proxy` as the sidecar (UID 1337) in a client and a server pod, with istiod-shaped
//! listeners (virtualOutbound on 15001 with the original-destination hand-off to per-service
//! listeners, virtualInbound on 15006 with original_dst / tls_inspector / http_inspector and the
//! 127.0.0.6 passthrough). Needs root (skips with a message otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pingsail_tests::netns::{Net, Pod, Proc, cargo_bin};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

const APP: &str = env!("CARGO_BIN_EXE_pod-app");
const PROBE: &str = env!("CARGO_BIN_EXE_netns-probe");

fn capture(pod: &Pod, extra: &[&str]) {
    let mut args = vec![
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
    ];
    args.extend_from_slice(extra);
    pod.apply_iptables(&args).unwrap();
}

fn tcp_chain(name: &str, matcher: &str, cluster: &str) -> String {
    format!(
        r#"
    - name: {name}
      filter_chain_match: {matcher}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: "{cluster}"
"#
    )
}

fn http_chain(name: &str, matcher: &str, cluster: &str, header: (&str, &str)) -> String {
    format!(
        r#"
    - name: {name}
      filter_chain_match: {matcher}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            name: {name}
            virtual_hosts:
            - name: all
              domains: ["*"]
              response_headers_to_add: [ {{ header: {{ key: "{hk}", value: "{hv}" }} }} ]
              routes: [ {{ match: {{ prefix: / }}, route: {{ cluster: "{cluster}" }} }} ]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#,
        hk = header.0,
        hv = header.1
    )
}

fn static_cluster(name: &str, ip: Ipv4Addr, port: u16) -> String {
    format!(
        r#"
  - name: "{name}"
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: "{name}"
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }} }} ] }} ]
"#
    )
}

fn orig_dst_cluster(name: &str, bind: Option<&str>) -> String {
    let bind = bind
        .map(|b| {
            format!(
                "\n    upstream_bind_config: {{ source_address: {{ address: {b}, port_value: 0 }} }}"
            )
        })
        .unwrap_or_default();
    format!(
        r#"
  - name: "{name}"
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s{bind}
"#
    )
}

/// The client sidecar: virtualOutbound (catch-all to `catch_all`, no blackhole chain so that the
/// proxy's own loop guard is what is tested) and per-service listeners for the server.
fn client_bootstrap(server: Ipv4Addr, catch_all: &str) -> String {
    let inspectors = r#"
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }
    - name: envoy.filters.listener.http_inspector
      typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }"#;
    let s9080 = http_chain(
        "outbound_9080",
        r#"{ transport_protocol: raw_buffer, application_protocols: [http/1.1, h2c] }"#,
        "outbound|9080||server",
        ("x-client-listener", &format!("{server}_9080")),
    );
    let passthrough = tcp_chain("PassthroughFilterChain", "{}", "PassthroughCluster");
    let s9000 = tcp_chain("outbound_9000", "{}", "outbound|9000||server");
    let s9100 = tcp_chain("outbound_9100", "{}", "outbound|9100||server");
    let blocked = tcp_chain("blocked_7778", "{}", "BlackHoleCluster");
    let catch = tcp_chain("virtualOutbound-catchall-tcp", "{}", catch_all);
    format!(
        r#"
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }} }}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 15001 }} }}
    use_original_dst: true
    filter_chains:{catch}
  - name: {server}_9080
    address: {{ socket_address: {{ address: {server}, port_value: 9080 }} }}
    bind_to_port: false{inspectors}
    filter_chains:{s9080}
    default_filter_chain:{passthrough_default}
  - name: {server}_9000
    address: {{ socket_address: {{ address: {server}, port_value: 9000 }} }}
    bind_to_port: false
    filter_chains:{s9000}
  - name: {server}_9100
    address: {{ socket_address: {{ address: {server}, port_value: 9100 }} }}
    bind_to_port: false
    filter_chains:{s9100}
  - name: {server}_7778
    address: {{ socket_address: {{ address: {server}, port_value: 7778 }} }}
    bind_to_port: false
    filter_chains:{blocked}
  clusters:{c1}{c2}{c3}{c4}{c5}
  - name: BlackHoleCluster
    type: STATIC
    connect_timeout: 1s
"#,
        passthrough_default = passthrough.replacen(
            "    - name: PassthroughFilterChain",
            "      name: PassthroughFilterChain",
            1
        ),
        c1 = orig_dst_cluster("PassthroughCluster", None),
        c2 = static_cluster("outbound|9080||server", server, 9080),
        c3 = static_cluster("outbound|9000||server", server, 9000),
        c4 = static_cluster("outbound|9100||server", server, 9100),
        c5 = String::new(),
    )
}

/// The server sidecar: virtualInbound with Istio's listener filters (inspectors disabled for the
/// server-first port 9100 and for 15006 itself).
fn server_bootstrap() -> String {
    let blackhole = tcp_chain(
        "virtualInbound-blackhole",
        "{ destination_port: 15006 }",
        "BlackHoleCluster",
    );
    let p9080 = http_chain(
        "0.0.0.0_9080",
        "{ destination_port: 9080, transport_protocol: raw_buffer }",
        "inbound|9080||",
        ("x-server-chain", "inbound-9080"),
    );
    let p9000 = tcp_chain(
        "0.0.0.0_9000",
        "{ destination_port: 9000 }",
        "inbound|9000||",
    );
    let catch_http = http_chain(
        "virtualInbound-catchall-http",
        "{ prefix_ranges: [ { address_prefix: 0.0.0.0, prefix_len: 0 } ], transport_protocol: raw_buffer, application_protocols: [http/1.1, h2c] }",
        "InboundPassthroughCluster",
        ("x-server-chain", "catchall-http"),
    );
    let catch_tcp = tcp_chain(
        "virtualInbound",
        "{ prefix_ranges: [ { address_prefix: 0.0.0.0, prefix_len: 0 } ], transport_protocol: raw_buffer }",
        "InboundPassthroughCluster",
    );
    format!(
        r#"
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }} }}
static_resources:
  listeners:
  - name: virtualInbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 15006 }} }}
    listener_filters_timeout: 5s
    continue_on_listener_filters_timeout: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }}
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
      filter_disabled: {{ or_match: {{ rules: [ {{ destination_port_range: {{ start: 9100, end: 9101 }} }}, {{ destination_port_range: {{ start: 15006, end: 15007 }} }} ] }} }}
    - name: envoy.filters.listener.http_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }}
      filter_disabled: {{ or_match: {{ rules: [ {{ destination_port_range: {{ start: 9100, end: 9101 }} }}, {{ destination_port_range: {{ start: 15006, end: 15007 }} }} ] }} }}
    filter_chains:{blackhole}{p9080}{p9000}{catch_http}{catch_tcp}
  clusters:{c1}{c2}{c3}
  - name: BlackHoleCluster
    type: STATIC
    connect_timeout: 1s
"#,
        c1 = orig_dst_cluster("InboundPassthroughCluster", Some("127.0.0.6")),
        c2 = orig_dst_cluster("inbound|9080||", Some("127.0.0.6")),
        c3 = orig_dst_cluster("inbound|9000||", Some("127.0.0.6")),
    )
}

struct Sidecar {
    _proc: Proc,
    _dir: pingsail_tests::net::TempDir,
}

/// Starts pingsail-proxy as UID 1337 in `pod` and waits for its admin `/ready`.
fn sidecar(pod: &Pod, bootstrap: &str) -> Sidecar {
    let dir = pingsail_tests::net::TempDir::new("pingsail-pod").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(&path, bootstrap).unwrap();
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

fn app(pod: &Pod, mode: &str, name: &str, addrs: &[&str]) -> Proc {
    let mut cmd = pod.cmd(APP);
    cmd.arg(mode).arg(name).args(addrs);
    let mut p = pod.spawn(cmd).unwrap();
    for _ in addrs {
        p.wait_for("listening").unwrap();
    }
    p
}

/// curl from the client pod's app (captured); returns (exit ok, headers + body).
fn curl(pod: &Pod, args: &[&str]) -> (bool, String) {
    let mut c = pod.cmd("curl");
    c.args(["-s", "-i", "--max-time", "5"]).args(args);
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_lowercase(),
    )
}

fn run_ok(pod: &Pod, program: &str, args: &[&str]) -> Result<String, String> {
    let mut c = pod.cmd(program);
    c.args(args);
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{text} {}", String::from_utf8_lossy(&out.stderr)))
    }
}

struct Mesh {
    client: Pod,
    server: Pod,
    _procs: Vec<Proc>,
    _sidecars: Vec<Sidecar>,
    _net: Net,
}

fn mesh(test: &str, catch_all: &str, client_extra: &[&str]) -> Option<Mesh> {
    let net = Net::new(test)?;
    let client = net.pod("client").unwrap();
    let server = net.pod("server").unwrap();
    let procs = vec![
        app(&server, "http", "app", &["0.0.0.0:9080", "0.0.0.0:7777"]),
        app(&server, "echo", "echo", &["0.0.0.0:9000"]),
        {
            let mut cmd = server.cmd(PROBE);
            cmd.args(["server", "banner", "0.0.0.0:9100", "0.0.0.0:7778"]);
            let mut p = server.spawn(cmd).unwrap();
            p.wait_for("listening").unwrap();
            p.wait_for("listening").unwrap();
            p
        },
    ];
    capture(&server, &[]);
    capture(&client, client_extra);
    let sidecars = vec![
        sidecar(&server, &server_bootstrap()),
        sidecar(&client, &client_bootstrap(server.ip4, catch_all)),
    ];
    Some(Mesh {
        client,
        server,
        _procs: procs,
        _sidecars: sidecars,
        _net: net,
    })
}

#[test]
fn http_through_both_sidecars() {
    let Some(m) = mesh("mesh-http", "PassthroughCluster", &[]) else {
        return;
    };
    let url = format!("http://{}:9080/hello", m.server.ip4);
    for extra in [&[][..], &["--http2-prior-knowledge"][..]] {
        let mut args = extra.to_vec();
        args.push(&url);
        let (ok, out) = curl(&m.client, &args);
        assert!(ok, "{extra:?}: {out}");
        assert!(out.contains(" 200"), "{extra:?}: {out}");
        // The client sidecar handed the connection to the per-service listener…
        assert!(
            out.contains(&format!("x-client-listener: {}_9080", m.server.ip4)),
            "{extra:?}: {out}"
        );
        // …the server sidecar's 15006 chose the port-9080 chain…
        assert!(
            out.contains("x-server-chain: inbound-9080"),
            "{extra:?}: {out}"
        );
        // …and reached the app from 127.0.0.6, on the original destination.
        assert!(out.contains("x-peer: 127.0.0.6:"), "{extra:?}: {out}");
        assert!(
            out.contains(&format!("x-local: {}:9080", m.server.ip4)),
            "{extra:?}: {out}"
        );
        assert!(out.contains("app get /hello"), "{extra:?}: {out}");
    }
}

#[test]
fn tcp_through_both_sidecars() {
    let Some(m) = mesh("mesh-tcp", "PassthroughCluster", &[]) else {
        return;
    };
    // Client-first opaque TCP through the per-service tcp_proxy and the inbound port chain.
    let line = run_ok(
        &m.client,
        APP,
        &["send", &format!("{}:9000", m.server.ip4), "ping"],
    )
    .unwrap();
    assert!(line.starts_with("echo got=ping peer=127.0.0.6:"), "{line}");
    // A server-first protocol: the inspectors are disabled for its port, so nothing waits for the
    // client to speak.
    let line = run_ok(
        &m.client,
        PROBE,
        &["client", &format!("{}:9100", m.server.ip4)],
    )
    .unwrap();
    assert!(
        line.starts_with(&format!(
            "banner local={}:9100 peer=127.0.0.6:",
            m.server.ip4
        )),
        "{line}"
    );
}

#[test]
fn passthrough_and_loop_guard() {
    let Some(m) = mesh("mesh-pass", "PassthroughCluster", &[]) else {
        return;
    };
    // No listener for :7777 in the client: virtualOutbound's catch-all passes it through; the server
    // side sniffs HTTP and takes its catch-all HTTP chain.
    let (ok, out) = curl(&m.client, &[&format!("http://{}:7777/p", m.server.ip4)]);
    assert!(ok, "{out}");
    assert!(out.contains("x-server-chain: catchall-http"), "{out}");
    assert!(!out.contains("x-client-listener"), "{out}");
    assert!(out.contains("x-peer: 127.0.0.6:"), "{out}");
    // A connection straight to 15001 (not redirected: loopback is exempt) must not be proxied to
    // itself: it is closed.
    let r = run_ok(&m.client, PROBE, &["client", "127.0.0.1:15001"]);
    assert!(
        r.as_deref().is_ok_and(str::is_empty) || r.is_err(),
        "a direct connection to 15001 got an answer: {r:?}"
    );
    // Exactly one connection reached the catch-all: no connection to ourselves was made.
    let stats = run_ok(&m.client, "curl", &["-s", "http://127.0.0.1:15000/stats"]).unwrap();
    let cx = stats
        .lines()
        .find_map(|l| l.strip_prefix("tcp.virtualOutbound-catchall-tcp.downstream_cx_total: "))
        .unwrap_or_else(|| panic!("{stats}"));
    // (one for the :7777 passthrough above, one for the direct connection)
    assert_eq!(cx, "2", "{stats}");
    // …and the sidecar still works.
    let (ok, out) = curl(&m.client, &[&format!("http://{}:9080/again", m.server.ip4)]);
    assert!(ok && out.contains(" 200"), "{out}");
}

#[test]
fn registry_only_blackholes() {
    let Some(m) = mesh("mesh-reg", "BlackHoleCluster", &[]) else {
        return;
    };
    let (ok, out) = curl(&m.client, &[&format!("http://{}:7777/p", m.server.ip4)]);
    assert!(
        !ok || !out.contains(" 200"),
        "REGISTRY_ONLY let it through: {out}"
    );
    // Known services still work.
    let (ok, out) = curl(&m.client, &[&format!("http://{}:9080/x", m.server.ip4)]);
    assert!(ok && out.contains(" 200"), "{out}");
}

#[test]
fn excluded_port_is_not_captured() {
    // The client config blackholes :7778; with -o 7778 the app's connection bypasses the sidecar.
    let Some(m) = mesh("mesh-excl", "PassthroughCluster", &["-o", "7778"]) else {
        return;
    };
    let line = run_ok(
        &m.client,
        PROBE,
        &["client", &format!("{}:7778", m.server.ip4)],
    )
    .unwrap();
    assert!(line.starts_with("banner"), "{line}");
    // Control: the same listener without the exclusion blackholes it.
    let Some(m2) = mesh("mesh-excl2", "PassthroughCluster", &[]) else {
        return;
    };
    let r = run_ok(
        &m2.client,
        PROBE,
        &["client", &format!("{}:7778", m2.server.ip4)],
    );
    assert!(
        r.as_deref().is_ok_and(str::is_empty) || r.is_err(),
        "captured :7778 was not blackholed: {r:?}"
    );
}
