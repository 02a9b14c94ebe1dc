// SPDX-License-Identifier: Apache-2.0
//! Protocol differentials that the HTTP/1.1 scenario client cannot drive: h2c with prior knowledge
//! downstream (curl), HTTP/2 upstreams (explicit `http2_protocol_options`), codec HTTP1-only listeners
//! refusing h2. Same bootstrap to Envoy and pingsail, same requests, same observations.

// Test code: panicking on a failed setup step is the point; timeouts here bound a test, not the data path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use pingsail_tests::echo::EchoServer;
use pingsail_tests::net::random_loopback_ip;
use pingsail_tests::proxy::ProxyUnderTest;
use std::net::Ipv4Addr;
use std::process::Command;

/// A STATIC cluster with one endpoint on 127.0.0.1, as bootstrap YAML (list item).
fn cluster(name: &str, port: u16) -> String {
    format!(
        r#"
  - name: {name}
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]"#
    )
}

/// A listener with an HTTP connection manager routing everything to `cluster`; `hcm_extra` is
/// extra HCM fields (indented for the HCM body).
fn http_listener(ip: Ipv4Addr, name: &str, port: u16, hcm_extra: &str, route: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{socket_address: {{address: "{ip}", port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          {hcm_extra}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {route}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"#
    )
}

fn bootstrap(ip: Ipv4Addr, echo_port: u16) -> String {
    format!(
        r#"
admin: {{address: {{socket_address: {{address: "{ip}", port_value: 15000}}}}}}
static_resources:
  listeners:
  - name: front
    address: {{socket_address: {{address: "{ip}", port_value: 9080}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /h2up}}
                route: {{cluster: h2up}}
              - match: {{prefix: /}}
                route: {{cluster: echo}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  - name: h2only
    address: {{socket_address: {{address: "{ip}", port_value: 9081}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: h2only
          codec_type: HTTP2
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                direct_response: {{status: 200, body: {{inline_string: "spoke h2"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:{}
  - name: h2up
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: h2up
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: "{ip}", port_value: 9081}}}}}}}}]}}]
"#,
        cluster("echo", echo_port)
    )
}

#[derive(Debug, PartialEq)]
struct Seen {
    status: String,
    http_version: String,
    upstream: Option<String>,
    upstream_path: Option<String>,
    upstream_method: Option<String>,
    body: Option<String>,
}

fn curl(args: &[&str], url: &str) -> Seen {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{http_version}",
            "--max-time",
            "10",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    let (status, http_version) = tail.split_once(' ').unwrap_or((tail, ""));
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    Seen {
        status: status.to_string(),
        http_version: http_version.to_string(),
        upstream: json
            .as_ref()
            .and_then(|j| j["upstream"].as_str().map(str::to_string)),
        upstream_path: json
            .as_ref()
            .and_then(|j| j["path"].as_str().map(str::to_string)),
        upstream_method: json
            .as_ref()
            .and_then(|j| j["method"].as_str().map(str::to_string)),
        body: json.is_none().then(|| body.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_downstream_and_h2_upstream_match_envoy() {
    let mut seen = Vec::new();
    for kind in [ProxyUnderTest::Envoy, ProxyUnderTest::Pingsail] {
        let echo = EchoServer::start("echo").await.unwrap();
        let ip = random_loopback_ip();
        let proxy = kind.start(&bootstrap(ip, echo.port()), ip).await.unwrap();
        let base = format!("http://{ip}:9080");
        let h2only = format!("http://{ip}:9081/x");
        let cases: Vec<(&str, Seen)> = vec![
            ("h1 to echo", curl(&[], &format!("{base}/a?b=1"))),
            (
                "h2c prior knowledge to echo",
                curl(&["--http2-prior-knowledge"], &format!("{base}/a?b=1")),
            ),
            (
                "h2c POST to echo",
                curl(
                    &["--http2-prior-knowledge", "-d", "hello"],
                    &format!("{base}/post"),
                ),
            ),
            (
                "h2c no route",
                curl(
                    &["--http2-prior-knowledge", "-H", "host: x"],
                    &format!("{base}/a"),
                ),
            ),
            ("h1 via h2 upstream", curl(&[], &format!("{base}/h2up"))),
            (
                "h2c via h2 upstream",
                curl(&["--http2-prior-knowledge"], &format!("{base}/h2up")),
            ),
            (
                "h2 to HTTP2-only listener",
                curl(&["--http2-prior-knowledge"], &h2only),
            ),
        ];
        drop(proxy);
        seen.push((kind, cases));
    }
    let (envoy, pingsail) = (&seen[0].1, &seen[1].1);
    assert_eq!(envoy[0].1.status, "200", "{envoy:?}");
    assert_eq!(envoy[1].1.http_version, "2", "{envoy:?}");
    assert_eq!(envoy[4].1.body.as_deref(), Some("spoke h2"), "{envoy:?}");
    let mut diffs = Vec::new();
    for ((name, a), (_, b)) in envoy.iter().zip(pingsail) {
        if a != b {
            diffs.push(format!("{name}:\n  envoy:    {a:?}\n  pingsail: {b:?}"));
        }
    }
    assert!(diffs.is_empty(), "differences:\n{}", diffs.join("\n"));
}

fn tcp_bootstrap(ip: Ipv4Addr, a: u16, b: u16) -> String {
    format!(
        r#"
admin: {{address: {{socket_address: {{address: "{ip}", port_value: 15000}}}}}}
static_resources:
  listeners:
  - name: tcp
    address: {{socket_address: {{address: "{ip}", port_value: 9090}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: a
          idle_timeout: 0.3s
  - name: tcp-weighted
    address: {{socket_address: {{address: "{ip}", port_value: 9091}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcpw
          weighted_clusters: {{clusters: [{{name: a, weight: 1}}, {{name: b, weight: 3}}]}}
  clusters:{}{}
"#,
        cluster("a", a),
        cluster("b", b)
    )
}

/// Echo servers `a` and `b` and `kind` on [`tcp_bootstrap`] (the echoes must outlive the proxy).
async fn start_tcp(
    kind: ProxyUnderTest,
) -> (
    Ipv4Addr,
    Box<dyn pingsail_tests::proxy::RunningProxy>,
    [EchoServer; 2],
) {
    let (a, b) = (
        EchoServer::start("a").await.unwrap(),
        EchoServer::start("b").await.unwrap(),
    );
    let ip = random_loopback_ip();
    let proxy = kind
        .start(&tcp_bootstrap(ip, a.port(), b.port()), ip)
        .await
        .unwrap();
    (ip, proxy, [a, b])
}

/// tcp_proxy: bytes reach the cluster untouched, weighted clusters split by weight, and an idle
/// connection is closed after `idle_timeout` — on Envoy and on pingsail alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_matches_envoy() {
    use pingsail_tests::client::{Connection, RawReply};
    use tokio::io::AsyncReadExt;
    let mut results = Vec::new();
    for kind in [ProxyUnderTest::Envoy, ProxyUnderTest::Pingsail] {
        let (ip, proxy, _echoes) = start_tcp(kind).await;
        let addr = std::net::SocketAddr::from((ip, 9090));
        // The HTTP request goes through unmodified: no host rewriting, no added headers.
        let mut c = Connection::connect(addr).await.unwrap();
        let reply = c
            .send_raw(b"GET /raw HTTP/1.1\r\nhost: tcp-test\r\n\r\n")
            .await
            .unwrap();
        let RawReply::Response(resp) = reply else {
            panic!("{kind}: no response: {reply:?}")
        };
        let echo: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        let headers = echo["headers"].to_string();
        // Idle timeout: the next read sees the proxy close the connection.
        let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), raw.read(&mut buf)).await;
        let closed_after_idle = matches!(n, Ok(Ok(0)) | Ok(Err(_)))
            && started.elapsed() >= std::time::Duration::from_millis(250);
        // Weighted: 200 connections, count which cluster answered.
        let mut to_b = 0;
        for _ in 0..200 {
            let r = pingsail_tests::client::send_raw(
                (ip, 9091).into(),
                b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            if let RawReply::Response(r) = r
                && r.header("x-upstream") == Some("b")
            {
                to_b += 1;
            }
        }
        drop(proxy);
        results.push((
            kind,
            resp.status,
            echo["path"].clone(),
            headers,
            closed_after_idle,
            to_b,
        ));
    }
    let (e, p) = (&results[0], &results[1]);
    assert_eq!(e.1, 200);
    assert!(e.4, "envoy closes idle tcp_proxy connections");
    assert_eq!(
        (e.1, &e.2, &e.3, e.4),
        (p.1, &p.2, &p.3, p.4),
        "envoy {e:?}\npingsail {p:?}"
    );
    // 75 % to b: both within a generous binomial band (sd ≈ 6).
    for r in [e, p] {
        assert!((120..=180).contains(&r.5), "{}: {} of 200 to b", r.0, r.5);
    }
}

fn mirror_bootstrap(ip: Ipv4Addr, main: u16, shadow: u16) -> String {
    format!(
        r#"
admin: {{address: {{socket_address: {{address: "{ip}", port_value: 15000}}}}}}
static_resources:
  listeners:
  - name: front
    address: {{socket_address: {{address: "{ip}", port_value: 9080}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              include_request_attempt_count: true
              include_attempt_count_in_response: true
              routes:
              - match: {{prefix: /mirrored}}
                route:
                  cluster: main
                  request_mirror_policies: [{{cluster: shadow}}]
              - match: {{prefix: /never}}
                route:
                  cluster: main
                  request_mirror_policies: [{{cluster: shadow, runtime_fraction: {{default_value: {{numerator: 0}}}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:{}{}
"#,
        cluster("main", main),
        cluster("shadow", shadow)
    )
}

/// request_mirror_policies: every mirrored request reaches the shadow cluster with the authority
/// suffixed `-shadow` and the same method, path and body; the client only sees the primary answer;
/// a 0 % mirror sends nothing. Also `x-envoy-attempt-count` on the request and the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_mirroring_matches_envoy() {
    use pingsail_tests::client::{Connection, Request};
    let mut results = Vec::new();
    for kind in [ProxyUnderTest::Envoy, ProxyUnderTest::Pingsail] {
        let (main, shadow) = (
            EchoServer::start("main").await.unwrap(),
            EchoServer::start("shadow").await.unwrap(),
        );
        let ip = random_loopback_ip();
        let proxy = kind
            .start(&mirror_bootstrap(ip, main.port(), shadow.port()), ip)
            .await
            .unwrap();
        let mut c = Connection::connect((ip, 9080).into()).await.unwrap();
        let mut upstreams = Vec::new();
        for i in 0..5 {
            let req = Request::new("POST", &format!("/mirrored/{i}"))
                .header("host", "reviews.default:9080")
                .body(format!("body-{i}"));
            let resp = c.send(&req).await.unwrap();
            upstreams.push((
                resp.status,
                resp.header("x-upstream").map(str::to_string),
                resp.header("x-envoy-attempt-count").map(str::to_string),
            ));
        }
        let never = c
            .send(&Request::new("GET", "/never").header("host", "reviews"))
            .await
            .unwrap();
        assert_eq!(never.status, 200);
        // Mirrors are fire-and-forget: wait (bounded) until all five have arrived.
        let mut seen = Vec::new();
        for _ in 0..200 {
            seen = shadow.received().await;
            if seen.len() >= 5 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        #[allow(clippy::type_complexity)]
        let mut shadow_view: Vec<(String, String, Option<String>, String, Option<String>)> = seen
            .iter()
            .map(|r| {
                (
                    r.method.clone(),
                    r.path.clone(),
                    r.header("host"),
                    r.body.clone(),
                    r.header("x-envoy-attempt-count"),
                )
            })
            .collect();
        shadow_view.sort();
        let primary: Vec<Option<String>> = main
            .received()
            .await
            .iter()
            .map(|r| r.header("x-envoy-attempt-count"))
            .collect();
        drop(proxy);
        results.push((kind, upstreams, shadow_view, primary));
    }
    let (e, p) = (&results[0], &results[1]);
    assert_eq!(e.2.len(), 5, "envoy mirrored 5 requests: {:?}", e.2);
    assert_eq!(e.2[0].2.as_deref(), Some("reviews.default-shadow:9080"));
    assert_eq!(
        (&e.1, &e.2, &e.3),
        (&p.1, &p.2, &p.3),
        "\nenvoy    {e:?}\npingsail {p:?}"
    );
}

fn websocket_bootstrap(ip: Ipv4Addr, echo: u16) -> String {
    format!(
        r#"
admin: {{address: {{socket_address: {{address: "{ip}", port_value: 15000}}}}}}
static_resources:
  listeners:{}{}
  clusters:{}
"#,
        http_listener(
            ip,
            "ws",
            9080,
            "upgrade_configs: [{upgrade_type: websocket}]",
            "{cluster: echo}"
        ),
        http_listener(ip, "nows", 9081, "", "{cluster: echo}"),
        cluster("echo", echo)
    )
}

/// WebSocket upgrades (Istio enables `upgrade_configs: websocket` on every HCM): 101 and raw bytes
/// both ways when enabled; without it Envoy refuses the upgrade — pingsail must do the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_matches_envoy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut results = Vec::new();
    for kind in [ProxyUnderTest::Envoy, ProxyUnderTest::Pingsail] {
        let echo = EchoServer::start("echo").await.unwrap();
        let ip = random_loopback_ip();
        let proxy = kind
            .start(&websocket_bootstrap(ip, echo.port()), ip)
            .await
            .unwrap();
        let mut out = Vec::new();
        for port in [9080u16, 9081] {
            let mut s = tokio::net::TcpStream::connect((ip, port)).await.unwrap();
            s.write_all(b"GET /chat HTTP/1.1\r\nhost: ws\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n").await.unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut b)).await
                {
                    Ok(Ok(1)) => head.push(b[0]),
                    _ => break,
                }
            }
            let head = String::from_utf8_lossy(&head).to_lowercase();
            let status = head.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut echoed = String::new();
            if status == "101" {
                s.write_all(b"ping-frame").await.unwrap();
                let mut buf = [0u8; 10];
                tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                echoed = String::from_utf8_lossy(&buf).into_owned();
            }
            out.push((
                port,
                status,
                head.contains("upgrade: websocket"),
                head.contains("content-length: 0"),
                echoed,
            ));
        }
        drop(proxy);
        results.push((kind, out));
    }
    assert_eq!(results[0].1[0].1, "101", "{results:?}");
    assert_eq!(results[0].1[0].4, "ping-frame");
    assert_eq!(results[0].1, results[1].1, "{results:?}");
}

/// ORIGINAL_DST with `use_http_header`: `x-envoy-original-dst-host` picks the upstream; without it
/// (and without capture) there is no upstream. Plus the access log: the same request logs the same
/// line in Envoy's default format (after masking times, ids and addresses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_dst_header_and_access_log_match_envoy() {
    use pingsail_tests::client::{Connection, Request};
    let mut results = Vec::new();
    for kind in [ProxyUnderTest::Envoy, ProxyUnderTest::Pingsail] {
        let echo = EchoServer::start("echo").await.unwrap();
        let ip = random_loopback_ip();
        let dir = pingsail_tests::net::TempDir::new("accesslog").unwrap();
        let log = dir.path().join("access.log");
        let json_log = dir.path().join("access.json");
        let boot = format!(
            r#"
admin: {{address: {{socket_address: {{address: "{ip}", port_value: 15000}}}}}}
static_resources:
  listeners:
  - name: front
    address: {{socket_address: {{address: "{ip}", port_value: 9080}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: "{log}"
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: "{json_log}"
              log_format:
                json_format:
                  method: "%REQ(:METHOD)%"
                  path: "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"
                  status: "%RESPONSE_CODE%"
                  flags: "%RESPONSE_FLAGS%"
                  bytes_sent: "%BYTES_SENT%"
                  upstream_cluster: "%UPSTREAM_CLUSTER%"
                  request_id: "%REQ(X-REQUEST-ID)%"
                  ua: "%REQ(USER-AGENT)%"
                  proto: "%PROTOCOL%"
                  route: "%ROUTE_NAME%"
                  details: "%RESPONSE_CODE_DETAILS%"
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: PassthroughCluster}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
    original_dst_lb_config: {{use_http_header: true}}
"#,
            log = log.display(),
            json_log = json_log.display()
        );
        let proxy = kind.start(&boot, ip).await.unwrap();
        let mut c = Connection::connect((ip, 9080).into()).await.unwrap();
        let dst = format!("127.0.0.1:{}", echo.port());
        let ok = c
            .send(
                &Request::new("GET", "/via-header?x=1")
                    .header("host", "anything")
                    .header("x-envoy-original-dst-host", &dst)
                    .header("user-agent", "pingsail-test")
                    .header("x-request-id", "rid-1"),
            )
            .await
            .unwrap();
        let mut c2 = Connection::connect((ip, 9080).into()).await.unwrap();
        let none = c2
            .send(
                &Request::new("GET", "/no-header")
                    .header("host", "anything")
                    .header("x-request-id", "rid-2"),
            )
            .await
            .unwrap();
        drop((c, c2));
        // Envoy flushes file logs about once a second: wait (bounded) for both lines.
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().count() >= 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mut json_text = String::new();
        for _ in 0..100 {
            json_text = std::fs::read_to_string(&json_log).unwrap_or_default();
            if json_text.lines().count() >= 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let json_lines: Vec<serde_json::Value> = json_text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        drop(proxy);
        let masked: Vec<String> = text
            .lines()
            .map(|l| {
                // [time] "..." status flags rx tx duration upstream-time "xff" "ua" "id" "authority" "upstream"
                let l = l.split_once("] ").map_or(l, |x| x.1);
                let fields: Vec<&str> = l.split(' ').collect();
                let mut f: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
                // mask duration and upstream service time (positions after status flags rx tx)
                for i in [7usize, 8] {
                    if let Some(x) = f.get_mut(i) {
                        *x = "<ms>".into();
                    }
                }
                f.join(" ").replace(&echo.port().to_string(), "<port>")
            })
            .collect();
        results.push((
            kind,
            ok.status,
            ok.header("x-upstream").map(str::to_string),
            none.status,
            none.body_text(),
            masked,
            json_lines,
        ));
    }
    let (e, p) = (&results[0], &results[1]);
    assert_eq!(e.1, 200, "{e:?}");
    assert_eq!(e.5.len(), 2, "envoy logged two lines: {e:?}");
    assert_eq!(
        (e.1, &e.2, e.3, &e.4),
        (p.1, &p.2, p.3, &p.4),
        "\nenvoy    {e:?}\npingsail {p:?}"
    );
    assert_eq!(e.5, p.5, "access log lines differ");
    assert_eq!(e.6.len(), 2, "envoy json lines: {:?}", e.6);
    assert_eq!(e.6, p.6, "json access log lines differ");
}

/// HCM timers: `request_timeout` (the whole request must arrive in time) and `stream_idle_timeout`
/// (no bytes in either direction), each against a route without its own timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hcm_timeouts_match_envoy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut results = Vec::new();
    for kind in [ProxyUnderTest::Envoy, ProxyUnderTest::Pingsail] {
        let echo = EchoServer::start("echo").await.unwrap();
        let ip = random_loopback_ip();
        let boot = format!(
            r#"
admin: {{address: {{socket_address: {{address: "{ip}", port_value: 15000}}}}}}
static_resources:
  listeners:{}{}
  clusters:{}
"#,
            http_listener(
                ip,
                "reqtimeout",
                9080,
                "request_timeout: 0.3s",
                "{cluster: echo, timeout: 0s}"
            ),
            http_listener(
                ip,
                "idle",
                9081,
                "stream_idle_timeout: 0.3s",
                "{cluster: echo, timeout: 0s}"
            ),
            cluster("echo", echo.port())
        );
        let proxy = kind.start(&boot, ip).await.unwrap();
        let mut out = Vec::new();
        // A body that never completes.
        let mut s = tokio::net::TcpStream::connect((ip, 9080)).await.unwrap();
        s.write_all(b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        out.push(
            String::from_utf8_lossy(&buf)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        );
        out.push(
            String::from_utf8_lossy(&buf)
                .rsplit("\r\n\r\n")
                .next()
                .unwrap_or("")
                .to_string(),
        );
        // An upstream that is silent for longer than the idle timeout.
        let r = pingsail_tests::client::send(
            (ip, 9081).into(),
            &pingsail_tests::client::Request::new("GET", "/")
                .header("host", "x")
                .header("x-echo-delay-ms", "1500"),
        )
        .await
        .unwrap();
        out.push(r.status.to_string());
        out.push(r.body_text());
        drop(proxy);
        results.push((kind, out));
    }
    assert!(results[0].1[0].contains("408"), "{results:?}");
    assert_eq!(results[0].1, results[1].1, "{results:?}");
}

/// Bad input never takes the proxy down: malformed request lines, headers, chunked bodies, h2
/// garbage and random bytes each get an error or a closed connection, and a normal request still
/// succeeds afterwards. (pingsail only: this is about robustness, not parity.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_never_break_the_proxy() {
    use pingsail_tests::client::{Request, send, send_raw};
    let echo = EchoServer::start("echo").await.unwrap();
    let ip = random_loopback_ip();
    let proxy = ProxyUnderTest::Pingsail
        .start(&bootstrap(ip, echo.port()), ip)
        .await
        .unwrap();
    let addr: std::net::SocketAddr = (ip, 9080).into();
    let mut inputs: Vec<Vec<u8>> = vec![
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\nhost: x\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello".to_vec(),
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
        b"GET /%zz%00 HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        b"GET /\x01\x02 HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nhost: \xff\xfe\r\n\r\n".to_vec(),
        b"GET http://[::1 HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x09\x00\x00\x00\x00\x00garbage".to_vec(),
        b"\x16\x03\x01\x00\x05hello".to_vec(),
    ];
    // Oversized head and many headers.
    let mut big = b"GET / HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..200 {
        big.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(500)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    inputs.push(big);
    // Deterministic pseudo-random bytes.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20 {
        let mut v = Vec::new();
        for _ in 0..200 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.push((seed & 0xff) as u8);
        }
        inputs.push(v);
    }
    for input in &inputs {
        // Any outcome is fine except a hang (the client's reads are bounded) …
        let _ = send_raw(addr, input).await;
        // … as long as the proxy keeps serving.
        let ok = send(addr, &Request::new("GET", "/after").header("host", "x"))
            .await
            .unwrap();
        assert_eq!(ok.status, 200, "after {:?}", String::from_utf8_lossy(input));
    }
    drop(proxy);
}

/// Filter-chain selection with `http_inspector`: among chains that all match `raw_buffer`, HTTP/1.1
/// and h2c (prior knowledge) pick the chains whose `application_protocols` match, anything else (and
/// a silent, server-first client after the inspector's timeout) the chain without one — as Envoy does.
/// (Envoy narrows by destination port, then transport, then application protocol; a unit test in
/// `proxy/src/listener.rs` covers the port level.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_chain_match_matches_envoy() {
    let mut results = Vec::new();
    for kind in [ProxyUnderTest::Envoy, ProxyUnderTest::Pingsail] {
        let (a, b) = (
            EchoServer::start("a").await.unwrap(),
            EchoServer::start("b").await.unwrap(),
        );
        let ip = random_loopback_ip();
        let hcm = |prefix: &str, route: &str| {
            format!(
                r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {prefix}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                {route}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"#
            )
        };
        let boot = format!(
            r#"
admin: {{address: {{socket_address: {{address: "{ip}", port_value: 15000}}}}}}
static_resources:
  listeners:
  - name: sniffing
    address: {{socket_address: {{address: "{ip}", port_value: 9080}}}}
    listener_filters:
    - name: envoy.filters.listener.http_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector}}
    listener_filters_timeout: 0.2s
    continue_on_listener_filters_timeout: true
    filter_chains:
    - name: http1
      filter_chain_match: {{transport_protocol: raw_buffer, application_protocols: [http/1.1, http/1.0]}}
      filters:{}
    - name: h2c
      filter_chain_match: {{transport_protocol: raw_buffer, application_protocols: [h2c]}}
      filters:{}
    - name: raw
      filter_chain_match: {{transport_protocol: raw_buffer}}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: raw
          cluster: b
    default_filter_chain:
      filters:{}
  clusters:{}{}
"#,
            hcm("http1", "route: {cluster: a}"),
            hcm(
                "h2c",
                r#"direct_response: {status: 200, body: {inline_string: "h2c chain"}}"#
            ),
            hcm(
                "default",
                r#"direct_response: {status: 200, body: {inline_string: "default chain"}}"#
            ),
            cluster("a", a.port()),
            cluster("b", b.port()),
        );
        let proxy = kind.start(&boot, ip).await.unwrap();
        let url = format!("http://{ip}:9080/x");
        let h1 = curl(&[], &url);
        let h2 = curl(&["--http2-prior-knowledge"], &url);
        // Not HTTP: no application protocol, so the raw chain (tcp_proxy to b).
        let _ = pingsail_tests::client::send_raw(
            (ip, 9080).into(),
            b"\x00\x01\x02 binary protocol\r\n\r\n",
        )
        .await;
        // A server-first protocol sends nothing: the inspector times out and the raw chain is used.
        let silent = tokio::net::TcpStream::connect((ip, 9080)).await.unwrap();
        let mut b_conns = 0;
        for _ in 0..100 {
            b_conns = b.connections();
            if b_conns >= 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        drop(silent);
        drop(proxy);
        results.push((kind, h1, h2, b_conns, a.connections()));
    }
    let (e, p) = (&results[0], &results[1]);
    assert_eq!(e.1.upstream.as_deref(), Some("a"), "{e:?}");
    assert_eq!(e.2.body.as_deref(), Some("h2c chain"), "{e:?}");
    assert_eq!((e.3, e.4), (2, 1), "{e:?}");
    assert_eq!(
        (&e.1, &e.2, e.3, e.4),
        (&p.1, &p.2, p.3, p.4),
        "\nenvoy    {e:?}\npingsail {p:?}"
    );
}

/// Response flags and details of the resilience features in the access log (DI, FI, UO, UT, URX,
/// UF, UH), against Envoy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilience_response_flags_match_envoy() {
    use pingsail_tests::client::{Connection, Request};
    let mut results = Vec::new();
    for kind in [ProxyUnderTest::Envoy, ProxyUnderTest::Pingsail] {
        let echo = EchoServer::start("echo").await.unwrap();
        let dead = pingsail_tests::net::closed_port().unwrap();
        let ip = random_loopback_ip();
        let dir = pingsail_tests::net::TempDir::new("flags").unwrap();
        let log = dir.path().join("access.json");
        let fault = |body: &str| {
            format!(
                r#"{{envoy.filters.http.fault: {{"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, {body}}}}}"#
            )
        };
        let boot = format!(
            r#"
admin: {{address: {{socket_address: {{address: "{ip}", port_value: 15000}}}}}}
static_resources:
  listeners:
  - name: front
    address: {{socket_address: {{address: "{ip}", port_value: 9080}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: "{log}"
              log_format:
                json_format:
                  path: "%REQ(:PATH)%"
                  status: "%RESPONSE_CODE%"
                  flags: "%RESPONSE_FLAGS%"
                  details: "%RESPONSE_CODE_DETAILS%"
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /abort}}
                route: {{cluster: live}}
                typed_per_filter_config: {abort}
              - match: {{prefix: /delay-abort}}
                route: {{cluster: live}}
                typed_per_filter_config: {delay_abort}
              - match: {{prefix: /delay}}
                route: {{cluster: live}}
                typed_per_filter_config: {delay}
              - match: {{prefix: /zero}}
                route: {{cluster: zero}}
              - match: {{prefix: /timeout}}
                route: {{cluster: live, timeout: 0.1s}}
              - match: {{prefix: /exhausted}}
                route: {{cluster: live, retry_policy: {{retry_on: 5xx, num_retries: 1}}}}
              - match: {{prefix: /dead-retried}}
                route: {{cluster: dead, retry_policy: {{retry_on: connect-failure, num_retries: 1}}}}
              - match: {{prefix: /dead}}
                route: {{cluster: dead}}
              - match: {{prefix: /empty}}
                route: {{cluster: empty}}
          http_filters:
          - name: envoy.filters.http.fault
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault}}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: live
    connect_timeout: 1s
    load_assignment: {{cluster_name: live, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}
  - name: zero
    connect_timeout: 1s
    circuit_breakers: {{thresholds: [{{max_requests: 0}}]}}
    load_assignment: {{cluster_name: zero, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}
  - name: dead
    connect_timeout: 1s
    load_assignment: {{cluster_name: dead, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {dead}}}}}}}}}]}}]}}
  - name: empty
    connect_timeout: 1s
    load_assignment: {{cluster_name: empty, endpoints: []}}
"#,
            log = log.display(),
            port = echo.port(),
            abort = fault("abort: {http_status: 418, percentage: {numerator: 100}}"),
            delay = fault("delay: {fixed_delay: 0.05s, percentage: {numerator: 100}}"),
            delay_abort = fault(
                "delay: {fixed_delay: 0.05s, percentage: {numerator: 100}}, abort: {http_status: 503, percentage: {numerator: 100}}"
            ),
        );
        let proxy = kind.start(&boot, ip).await.unwrap();
        let paths = [
            ("/abort", None),
            ("/delay", None),
            ("/delay-abort", None),
            ("/zero", None),
            ("/timeout", Some(("x-echo-delay-ms", "300"))),
            ("/exhausted", Some(("x-echo-status", "503"))),
            ("/dead-retried", None),
            ("/dead", None),
            ("/empty", None),
        ];
        for (path, extra) in paths {
            let mut c = Connection::connect((ip, 9080).into()).await.unwrap();
            let mut r = Request::new("GET", path).header("host", "svc");
            if let Some((k, v)) = extra {
                r = r.header(k, v);
            }
            c.send(&r).await.unwrap();
        }
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().count() >= paths.len() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        drop(proxy);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        results.push(lines);
    }
    assert_eq!(results[0].len(), 9, "envoy: {:?}", results[0]);
    for (e, p) in results[0].iter().zip(&results[1]) {
        assert_eq!(e, p, "\nenvoy    {e}\npingsail {p}");
    }
    assert_eq!(results[0].len(), results[1].len(), "{:?}", results[1]);
}

/// tcp_proxy honours the cluster's `max_connections` (the extra downstream connection is closed,
/// `upstream_cx_overflow`) and feeds outlier detection with connect failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_breakers_and_outlier_match_envoy() {
    use pingsail_tests::client::{Connection, RawReply, Request};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut results = Vec::new();
    for kind in [ProxyUnderTest::Envoy, ProxyUnderTest::Pingsail] {
        let echo = EchoServer::start("a").await.unwrap();
        let dead = pingsail_tests::net::closed_port().unwrap();
        let ip = random_loopback_ip();
        let tcp = |name: &str, port: u16, cluster: &str| {
            format!(
                r#"
  - name: {name}
    address: {{socket_address: {{address: "{ip}", port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}"#
            )
        };
        let boot = format!(
            r#"
admin: {{address: {{socket_address: {{address: "{ip}", port_value: 15000}}}}}}
static_resources:
  listeners:{one}{dead_l}
  clusters:
  - name: one
    connect_timeout: 1s
    circuit_breakers: {{thresholds: [{{max_connections: 1}}]}}
    load_assignment: {{cluster_name: one, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}
  - name: dead
    connect_timeout: 1s
    common_lb_config: {{healthy_panic_threshold: {{value: 0}}}}
    outlier_detection: {{consecutive_5xx: 2, interval: 30s, base_ejection_time: 30s, max_ejection_percent: 100}}
    load_assignment: {{cluster_name: dead, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {dead}}}}}}}}}]}}]}}
"#,
            one = tcp("one", 9090, "one"),
            dead_l = tcp("dead", 9091, "dead"),
            port = echo.port(),
        );
        let proxy = kind.start(&boot, ip).await.unwrap();
        // The first connection holds the only upstream connection.
        let mut first = Connection::connect((ip, 9090).into()).await.unwrap();
        let reply = first
            .send_raw(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let first_ok = matches!(reply, RawReply::Response(ref r) if r.status == 200);
        // The second is closed without reaching the upstream.
        let mut second = tokio::net::TcpStream::connect((ip, 9090)).await.unwrap();
        let _ = second.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let mut buf = [0u8; 64];
        let n =
            tokio::time::timeout(std::time::Duration::from_secs(5), second.read(&mut buf)).await;
        let second_closed = matches!(n, Ok(Ok(0)) | Ok(Err(_)));
        drop(first);
        // Two refused connects eject the dead endpoint.
        for _ in 0..2 {
            let mut c = tokio::net::TcpStream::connect((ip, 9091)).await.unwrap();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), c.read(&mut buf)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let admin = (ip, 15000).into();
        let stats = pingsail_tests::client::send(
            admin,
            &Request::get("/stats?filter=cluster\\.(one|dead)\\.(upstream_cx_overflow|outlier_detection\\.ejections_enforced_consecutive_5xx)$")
                .header("host", "admin"),
        )
        .await
        .unwrap()
        .body_text();
        let clusters =
            pingsail_tests::client::send(admin, &Request::get("/clusters").header("host", "admin"))
                .await
                .unwrap()
                .body_text();
        let ejected = clusters
            .lines()
            .any(|l| l.starts_with("dead::") && l.ends_with("health_flags::/failed_outlier_check"));
        drop(proxy);
        results.push((first_ok, second_closed, stats, ejected));
    }
    assert_eq!(
        results[0],
        (
            true,
            true,
            "cluster.dead.outlier_detection.ejections_enforced_consecutive_5xx: 1\ncluster.dead.upstream_cx_overflow: 0\ncluster.one.upstream_cx_overflow: 1\n".to_owned(),
            true
        ),
        "envoy"
    );
    assert_eq!(results[0], results[1], "pingsail differs from envoy");
}

/// tcp_proxy counters as operators read them: per connection `downstream_cx_total`, bytes each way
/// (`downstream_cx_{rx,tx}_bytes_total`, the cluster's `upstream_cx_{rx,tx}_bytes_total`,
/// `upstream_cx_total`), `idle_timeout` and `downstream_cx_no_route` — equal on Envoy and pingsail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_counters_match_envoy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const NAMES: &str = "(tcp\\.tcp\\.(downstream_cx_total|downstream_cx_rx_bytes_total|downstream_cx_tx_bytes_total|idle_timeout|downstream_cx_no_route)|cluster\\.a\\.(upstream_cx_total|upstream_cx_rx_bytes_total|upstream_cx_tx_bytes_total))$";
    let mut results = Vec::new();
    for kind in [ProxyUnderTest::Envoy, ProxyUnderTest::Pingsail] {
        let (ip, proxy, _echoes) = start_tcp(kind).await;
        let addr = std::net::SocketAddr::from((ip, 9090));
        // Two exchanges that end with the upstream closing (connection: close), then one
        // connection left idle until the proxy closes it.
        let mut replies = Vec::new();
        for path in ["/one", "/second-request"] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nhost: counters\r\nconnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut reply = Vec::new();
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut reply))
                .await
                .unwrap()
                .unwrap();
            replies.push(reply.len());
        }
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), idle.read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "{kind}: idle connection not closed"
        );
        // The counters settle once the proxy has seen every close.
        let admin = (ip, 15000).into();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let stats = loop {
            let text = pingsail_tests::client::send(
                admin,
                &pingsail_tests::client::Request::get(&format!("/stats?filter={NAMES}"))
                    .header("host", "admin"),
            )
            .await
            .unwrap()
            .body_text();
            if text.contains("tcp.tcp.idle_timeout: 1") || std::time::Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        drop(proxy);
        results.push((kind, replies, stats));
    }
    let (e, p) = (&results[0], &results[1]);
    assert_eq!(e.1, p.1, "the same replies");
    let req_bytes: usize = ["/one", "/second-request"]
        .iter()
        .map(|path| {
            format!("GET {path} HTTP/1.1\r\nhost: counters\r\nconnection: close\r\n\r\n").len()
        })
        .sum();
    let reply_bytes: usize = e.1.iter().sum();
    assert!(
        e.2.contains(&format!(
            "tcp.tcp.downstream_cx_rx_bytes_total: {req_bytes}\n"
        )) && e.2.contains(&format!(
            "tcp.tcp.downstream_cx_tx_bytes_total: {reply_bytes}\n"
        )) && e.2.contains("cluster.a.upstream_cx_total: 3\n"),
        "envoy:\n{}",
        e.2
    );
    assert_eq!(e.2, p.2, "envoy:\n{}\npingsail:\n{}", e.2, p.2);
}
