// SPDX-License-Identifier: Apache-2.0
//! Traffic capture in network-namespace pods: `pingsail-agent iptables` rules steer real
//! connections to a stand-in sidecar (`netns-probe sidecar`, UID 1337) that reads the original
//! destination with `pingsail_proxy::orig_dst::original_dst`. Needs root (skips with a message
//! otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use pingsail_tests::netns::{Net, Pod, Proc};

const PROBE: &str = env!("CARGO_BIN_EXE_netns-probe");
const SIDECAR_UID: u32 = 1337;

/// What istio's injector passes (`-d` = the sidecar's own status/metrics ports).
fn capture_args(ipv6: bool) -> Vec<&'static str> {
    let mut a = vec![
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
    ];
    a.push(if ipv6 {
        "--enable-ipv6=true"
    } else {
        "--enable-ipv6=false"
    });
    a
}

/// A listener started in `pod`; returns once every address is bound.
fn listen(pod: &Pod, uid: Option<u32>, args: &[&str]) -> Proc {
    let mut cmd = match uid {
        Some(u) => pod.cmd_as(u, u, PROBE),
        None => pod.cmd(PROBE),
    };
    cmd.args(args);
    let mut p = pod.spawn(cmd).unwrap();
    let addrs = args
        .iter()
        .filter(|a| a.parse::<SocketAddr>().is_ok())
        .count();
    for _ in 0..addrs {
        p.wait_for("listening").unwrap();
    }
    p
}

fn app_server(pod: &Pod) -> Proc {
    listen(
        pod,
        None,
        &["server", "app", "[::]:8080", "[::]:9090", "[::]:15020"],
    )
}

/// The stand-in sidecar: outbound on 15001, inbound on 15006, each forwarding to the original
/// destination (inbound from 127.0.0.6 / ::6), as UID/GID 1337.
fn sidecar(pod: &Pod, forward: bool) -> (Proc, Proc) {
    let mut out = vec!["sidecar", "out", "[::]:15001"];
    let mut inb = vec!["sidecar", "in", "[::]:15006"];
    if forward {
        out.push("--forward");
        inb.push("--forward");
    }
    (
        listen(pod, Some(SIDECAR_UID), &out),
        listen(pod, Some(SIDECAR_UID), &inb),
    )
}

/// `netns-probe client DST` in `pod` (as `uid`, from `bind`): the line it got.
fn call(pod: &Pod, uid: Option<u32>, dst: SocketAddr, bind: Option<&str>) -> String {
    let mut cmd = match uid {
        Some(u) => pod.cmd_as(u, u, PROBE),
        None => pod.cmd(PROBE),
    };
    cmd.arg("client").arg(dst.to_string());
    if let Some(b) = bind {
        cmd.args(["--bind", b]);
    }
    let out = pod.run(cmd).unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .to_string()
}

/// "`field`=VALUE" from a probe line's first hop.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let first = line.split(" -> ").next().unwrap();
    first
        .split(' ')
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

fn v4(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip4.into(), port)
}

fn v6(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip6.into(), port)
}

/// The client pod's app reaches the stand-in sidecar on 15001, which sees the exact original
/// destination; the sidecar's own connection (UID 1337) to it is not captured again and reaches
/// the server.
#[test]
fn outbound_is_redirected_to_15001_with_the_original_destination() {
    let Some(net) = Net::new("outbound_is_redirected_to_15001_with_the_original_destination")
    else {
        return;
    };
    let (client, server) = (net.pod("client").unwrap(), net.pod("server").unwrap());
    let _app = app_server(&server);
    client.apply_iptables(&capture_args(false)).unwrap();
    let _sc = sidecar(&client, true);

    let got = call(&client, None, v4(&server, 8080), None);
    assert!(
        got.starts_with("out "),
        "not captured by the sidecar: {got}"
    );
    assert_eq!(field(&got, "orig"), v4(&server, 8080).to_string(), "{got}");
    assert!(
        field(&got, "peer").starts_with(&format!("{}:", client.ip4)),
        "{got}"
    );
    // The sidecar's forward (UID 1337) reached the real server, not the sidecar again.
    let upstream = got
        .split(" -> ")
        .nth(1)
        .unwrap_or_else(|| panic!("no upstream hop: {got}"));
    assert!(
        upstream.starts_with(&format!(
            "app local={}:8080 peer={}:",
            server.ip4, client.ip4
        )),
        "{got}"
    );
}

/// A connection to a service VIP no host owns (a ClusterIP) is captured like any other, with
/// the VIP as the original destination (IPv4 and IPv6).
#[test]
fn service_vip_is_the_original_destination() {
    let Some(net) = Net::new("service_vip_is_the_original_destination") else {
        return;
    };
    let client = net.pod("client").unwrap();
    client.apply_iptables(&capture_args(true)).unwrap();
    let _sc = sidecar(&client, false);
    for vip in ["10.96.0.10:80", "[fd00:96::10]:443"] {
        let vip: SocketAddr = vip.parse().unwrap();
        let got = call(&client, None, vip, None);
        assert!(got.starts_with("out "), "{got}");
        assert_eq!(field(&got, "orig"), vip.to_string(), "{got}");
    }
}

/// The sidecar's own egress (UID 1337) goes out uncaptured.
#[test]
fn sidecar_egress_is_not_captured() {
    let Some(net) = Net::new("sidecar_egress_is_not_captured") else {
        return;
    };
    let (client, server) = (net.pod("client").unwrap(), net.pod("server").unwrap());
    let _app = app_server(&server);
    client.apply_iptables(&capture_args(false)).unwrap();
    let _sc = sidecar(&client, false);
    let as_sidecar = call(&client, Some(SIDECAR_UID), v4(&server, 8080), None);
    assert!(
        as_sidecar.starts_with(&format!("app local={}:8080", server.ip4)),
        "{as_sidecar}"
    );
    // Control: the same call from the app is captured.
    assert!(call(&client, None, v4(&server, 8080), None).starts_with("out "));
}

/// `-o PORT`: outbound to that port is not captured; other ports still are.
#[test]
fn excluded_outbound_port_is_not_captured() {
    let Some(net) = Net::new("excluded_outbound_port_is_not_captured") else {
        return;
    };
    let (client, server) = (net.pod("client").unwrap(), net.pod("server").unwrap());
    let _app = app_server(&server);
    let mut args = capture_args(false);
    args.extend(["-o", "9090"]);
    client.apply_iptables(&args).unwrap();
    let _sc = sidecar(&client, false);
    let excluded = call(&client, None, v4(&server, 9090), None);
    assert!(
        excluded.starts_with(&format!("app local={}:9090", server.ip4)),
        "{excluded}"
    );
    let captured = call(&client, None, v4(&server, 8080), None);
    assert_eq!(
        field(&captured, "orig"),
        v4(&server, 8080).to_string(),
        "{captured}"
    );
}

/// Inbound to the server pod goes to 15006 with the original destination; the sidecar's
/// passthrough from 127.0.0.6 reaches the app uncaptured; `-d` ports bypass the sidecar.
#[test]
fn inbound_is_redirected_to_15006_with_the_original_destination() {
    let Some(net) = Net::new("inbound_is_redirected_to_15006_with_the_original_destination") else {
        return;
    };
    let (client, server) = (net.pod("client").unwrap(), net.pod("server").unwrap());
    let _app = app_server(&server);
    server.apply_iptables(&capture_args(false)).unwrap();
    let _sc = sidecar(&server, true);

    let got = call(&client, None, v4(&server, 8080), None);
    assert!(got.starts_with("in "), "not captured inbound: {got}");
    assert_eq!(field(&got, "orig"), v4(&server, 8080).to_string(), "{got}");
    assert!(
        field(&got, "peer").starts_with(&format!("{}:", client.ip4)),
        "{got}"
    );
    let upstream = got
        .split(" -> ")
        .nth(1)
        .unwrap_or_else(|| panic!("no upstream hop: {got}"));
    assert!(
        upstream.starts_with(&format!("app local={}:8080 peer=127.0.0.6:", server.ip4)),
        "{got}"
    );

    // -d 15020: excluded inbound port.
    let excluded = call(&client, None, v4(&server, 15020), None);
    assert!(
        excluded.starts_with(&format!("app local={}:15020", server.ip4)),
        "{excluded}"
    );
}

/// In the pod, the sidecar's UID calling the pod's own address is sent back through inbound
/// (15006) — except from 127.0.0.6, the inbound passthrough source.
#[test]
fn traffic_from_127_0_0_6_is_not_captured() {
    let Some(net) = Net::new("traffic_from_127_0_0_6_is_not_captured") else {
        return;
    };
    let server = net.pod("server").unwrap();
    let _app = app_server(&server);
    server.apply_iptables(&capture_args(false)).unwrap();
    let _sc = sidecar(&server, false);
    let captured = call(&server, Some(SIDECAR_UID), v4(&server, 8080), None);
    assert!(captured.starts_with("in "), "{captured}");
    assert_eq!(field(&captured, "orig"), v4(&server, 8080).to_string());
    let passthrough = call(
        &server,
        Some(SIDECAR_UID),
        v4(&server, 8080),
        Some("127.0.0.6"),
    );
    assert!(
        passthrough.starts_with(&format!("app local={}:8080 peer=127.0.0.6:", server.ip4)),
        "{passthrough}"
    );
}

/// Both pods captured, IPv4 and IPv6: app -> client sidecar (15001) -> server pod -> server
/// sidecar (15006) -> app, the original destination exact at both hops.
#[test]
fn pod_to_pod_through_both_sidecars() {
    let Some(net) = Net::new("pod_to_pod_through_both_sidecars") else {
        return;
    };
    let (client, server) = (net.pod("client").unwrap(), net.pod("server").unwrap());
    let _app = app_server(&server);
    client.apply_iptables(&capture_args(true)).unwrap();
    server.apply_iptables(&capture_args(true)).unwrap();
    let _csc = sidecar(&client, true);
    let _ssc = sidecar(&server, true);

    for (dst, client_ip, passthrough_src) in [
        (
            v4(&server, 8080),
            client.ip4.to_string(),
            "127.0.0.6".to_string(),
        ),
        (
            v6(&server, 8080),
            format!("[{}]", client.ip6),
            "[::6]".to_string(),
        ),
    ] {
        let got = call(&client, None, dst, None);
        let hops: Vec<&str> = got.split(" -> ").collect();
        assert_eq!(hops.len(), 3, "{got}");
        assert!(
            hops[0].starts_with(&format!("out orig={dst} peer={client_ip}:")),
            "{got}"
        );
        assert!(
            hops[1].starts_with(&format!("in orig={dst} peer={client_ip}:")),
            "{got}"
        );
        assert!(
            hops[2].starts_with(&format!("app local={dst} peer={passthrough_src}:")),
            "{got}"
        );
    }
}

/// The harness's fallback readiness check: `wait_tcp` returns once a listener accepts, and fails
/// on a port nothing listens on.
#[test]
fn harness_wait_tcp() {
    let Some(net) = Net::new("harness_wait_tcp") else {
        return;
    };
    let pod = net.pod("pod").unwrap();
    let mut cmd = pod.cmd(PROBE);
    cmd.args(["server", "app", "0.0.0.0:7070"]);
    let _app = pod.spawn(cmd).unwrap(); // its readiness line deliberately not read
    pod.wait_tcp(v4(&pod, 7070), std::time::Duration::from_secs(10))
        .unwrap();
    assert!(call(&pod, None, v4(&pod, 7070), None).starts_with("app "));
    let err = pod
        .wait_tcp(v4(&pod, 7071), std::time::Duration::from_millis(300))
        .unwrap_err();
    assert!(format!("{err:#}").contains("not accepting"), "{err:#}");
}

/// TPROXY inbound: the rules and policy routes `-m TPROXY` sets up deliver inbound connections to
/// a transparent listener on 15006 without NAT — its local address is the original destination,
/// and conntrack agrees — and the passthrough from 127.0.0.6 reaches the app.
#[test]
fn tproxy_inbound_reaches_a_transparent_listener() {
    let Some(net) = Net::new("tproxy_inbound_reaches_a_transparent_listener") else {
        return;
    };
    let (client, server) = (net.pod("client").unwrap(), net.pod("server").unwrap());
    let _app = app_server(&server);
    let mut args = capture_args(false);
    args.extend(["-m", "TPROXY"]);
    server.apply_iptables(&args).unwrap();
    let mut cmd = server.cmd_as_with_caps(SIDECAR_UID, SIDECAR_UID, &["net_admin"], PROBE);
    cmd.args([
        "sidecar",
        "in",
        "0.0.0.0:15006",
        "--forward",
        "--transparent",
    ]);
    let mut sc = server.spawn(cmd).unwrap();
    sc.wait_for("listening").unwrap();

    let got = call(&client, None, v4(&server, 8080), None);
    assert!(got.starts_with("in "), "not captured inbound: {got}");
    assert_eq!(field(&got, "orig"), v4(&server, 8080).to_string(), "{got}");
    assert!(
        field(&got, "peer").starts_with(&format!("{}:", client.ip4)),
        "{got}"
    );
    let upstream = got
        .split(" -> ")
        .nth(1)
        .unwrap_or_else(|| panic!("no upstream hop: {got}"));
    assert!(
        upstream.starts_with(&format!("app local={}:8080 peer=127.0.0.6:", server.ip4)),
        "{got}"
    );
}

/// DNS capture (`--redirect-dns` with the pod's resolver): the app's DNS over UDP and TCP to the
/// resolver goes to the agent's DNS port 15053; the agent's own queries (UID 1337) go to the
/// resolver; other UDP is untouched.
#[test]
fn dns_to_the_resolver_is_captured_to_15053() {
    let Some(net) = Net::new("dns_to_the_resolver_is_captured_to_15053") else {
        return;
    };
    let (client, resolver) = (net.pod("client").unwrap(), net.pod("resolver").unwrap());
    let mut udp = resolver.cmd(PROBE);
    udp.args(["udp-server", "resolver", "0.0.0.0:53", "0.0.0.0:5353"]);
    let mut r = resolver.spawn(udp).unwrap();
    r.wait_for("listening udp").unwrap();
    r.wait_for("listening udp").unwrap();
    let _tcp = listen(&resolver, None, &["server", "resolver-tcp", "0.0.0.0:53"]);

    let dns_server = format!("--dns-servers={}", resolver.ip4);
    let mut args = capture_args(false);
    args.extend(["--redirect-dns", &dns_server]);
    client.apply_iptables(&args).unwrap();
    let mut agent = client.cmd_as(SIDECAR_UID, SIDECAR_UID, PROBE);
    agent.args(["udp-server", "agent-dns", "127.0.0.1:15053"]);
    let mut a = client.spawn(agent).unwrap();
    a.wait_for("listening udp").unwrap();
    let _agent_tcp = listen(
        &client,
        Some(SIDECAR_UID),
        &["server", "agent-dns-tcp", "127.0.0.1:15053"],
    );

    let udp_call = |uid: Option<u32>, port: u16| {
        let mut c = match uid {
            Some(u) => client.cmd_as(u, u, PROBE),
            None => client.cmd(PROBE),
        };
        c.args(["udp-client", &v4(&resolver, port).to_string()]);
        String::from_utf8(client.run(c).unwrap().stdout)
            .unwrap()
            .trim_end()
            .to_string()
    };
    let app = udp_call(None, 53);
    assert!(
        app.starts_with("agent-dns local=127.0.0.1:15053"),
        "app's UDP DNS not captured: {app}"
    );
    let tcp = call(&client, None, v4(&resolver, 53), None);
    assert!(
        tcp.starts_with("agent-dns-tcp "),
        "app's TCP DNS not captured: {tcp}"
    );
    let own = udp_call(Some(SIDECAR_UID), 53);
    assert!(
        own.starts_with("resolver local="),
        "the agent's own query was captured: {own}"
    );
    let other = udp_call(None, 5353);
    assert!(
        other.starts_with("resolver local="),
        "non-DNS UDP was captured: {other}"
    );
}

/// A panicking test still removes its namespaces (and with them the links and processes' network).
#[test]
fn harness_cleans_up_on_panic() {
    if Net::new("harness_cleans_up_on_panic").is_none() {
        return;
    }
    let payload = std::panic::catch_unwind(|| {
        let net = Net::new("harness_cleans_up_on_panic (inner)").unwrap();
        let pod = net.pod("pod").unwrap();
        let _p = app_server(&pod);
        let names = vec![
            pod.ns.clone(),
            format!("{}-sw", pod.ns.trim_end_matches("-pod")),
        ];
        for n in &names {
            assert!(
                std::path::Path::new("/var/run/netns").join(n).exists(),
                "{n} not created"
            );
        }
        std::panic::panic_any(names);
    })
    .unwrap_err();
    let names = payload.downcast::<Vec<String>>().unwrap();
    for n in names.iter() {
        assert!(
            !std::path::Path::new("/var/run/netns").join(n).exists(),
            "{n} left behind"
        );
    }
}
