// SPDX-License-Identifier: Apache-2.0
//! The agent's status server (:15020) over real sockets: readiness as pilot-agent decides it
//! (pingsail fed by the fake istiod, through the proxy's 15021 health listener too; latched), merged
//! metrics validated by Prometheus' own parsers (Python prometheus_client), quitquitquit and drain,
//! and the app's rewritten HTTP / TCP / gRPC probes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use parking_lot::Mutex;
use pingsail_agent::lifecycle::{Lifecycle, Phase};
use pingsail_agent::status::{StatusConfig, StatusServer};
use pingsail_tests::client::{self, Request};
use pingsail_tests::istiod::{self, CLUSTER, FakeIstiod, LISTENER};
use pingsail_tests::net::random_loopback_ip;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn start_status(
    cfg: StatusConfig,
    lifecycle: &Lifecycle,
    drain: Option<pingsail_agent::status::DrainHook>,
) -> Result<(u16, tokio::task::JoinHandle<()>)> {
    let (srv, l) = StatusServer::bind(cfg, lifecycle.clone(), drain).await?;
    let port = srv.port();
    Ok((port, tokio::spawn(srv.serve(l))))
}

fn status_cfg() -> StatusConfig {
    StatusConfig {
        listen: local(0),
        ..StatusConfig::new()
    }
}

async fn get(addr: SocketAddr, path: &str) -> Result<client::Response> {
    client::send(addr, &Request::get(path).header("host", &addr.to_string())).await
}

#[tokio::test]
async fn readiness_latches_after_first_cds_and_lds_and_works_through_15021() {
    let istiod = FakeIstiod::start_tcp().await.unwrap();
    let ip = random_loopback_ip();
    let admin = SocketAddr::from((ip, 15000));
    let lifecycle = Lifecycle::new();
    let (port, _srv) = start_status(
        StatusConfig {
            proxy_admin: admin,
            ..status_cfg()
        },
        &lifecycle,
        None,
    )
    .await
    .unwrap();
    let status = local(port);
    // Nothing runs yet: not ready.
    assert_eq!(get(status, "/healthz/ready").await.unwrap().status, 503);

    // Istio's bootstrap shape: the 15021 health listener routes /healthz/ready to the agent.
    let mut bootstrap = istiod::bootstrap(
        &istiod,
        admin,
        true,
        "sidecar~10.0.0.1~p.ns~ns.svc.cluster.local",
    );
    bootstrap.push_str(&format!(
        r#"  - name: agent
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: agent
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }} ] }} ]
  listeners:
  - name: health
    address: {{ socket_address: {{ address: {ip}, port_value: 15021 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: agent
          route_config:
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes:
              - match: {{ prefix: /healthz/ready }}
                route: {{ cluster: agent }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    ));
    let proxy = pingsail_proxy::testing::start(&bootstrap).await.unwrap();
    // Connected, but no CDS/LDS yet: still not ready (the proxy's admin says why).
    assert_eq!(get(status, "/healthz/ready").await.unwrap().status, 503);
    let stats = get(
        admin,
        "/stats?usedonly&filter=%5E%28server%5C.state%7Clistener_manager%5C.workers_started%29",
    )
    .await
    .unwrap()
    .body_text();
    assert!(stats.contains("server.state: 3"), "{stats}");
    assert!(
        stats.contains("listener_manager.workers_started: 0"),
        "{stats}"
    );

    istiod
        .set_yaml(
            CLUSTER,
            r#"
- name: app
  type: STATIC
  connect_timeout: 1s
  load_assignment: { cluster_name: app, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 9 } } } } ] } ] }
"#,
        )
        .unwrap();
    istiod
        .set_yaml(
            LISTENER,
            &format!(
                r#"
- name: app
  address: {{ socket_address: {{ address: {ip}, port_value: 18080 }} }}
  filter_chains:
  - filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: app, cluster: app }}
"#
            ),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = get(status, "/healthz/ready").await.unwrap().status;
        if s == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = get(admin, "/stats").await.unwrap().body_text();
    let value = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{stats}"))
    };
    assert!(value("cluster_manager.cds.update_success") >= 1);
    assert!(value("listener_manager.lds.update_success") >= 1);
    assert_eq!(value("cluster_manager.cds.update_rejected"), 0);
    assert_eq!(value("server.state"), 0);
    assert_eq!(value("listener_manager.workers_started"), 1);
    // Kubelet's path: the proxy's health listener.
    let via = get(SocketAddr::from((ip, 15021)), "/healthz/ready")
        .await
        .unwrap();
    assert_eq!(via.status, 200, "{via:?}");
    // Latched, as pilot-agent: once ready, the proxy's stats are not asked again.
    drop(proxy);
    assert_eq!(get(status, "/healthz/ready").await.unwrap().status, 200);
}

/// Serves `body` with `content_type` for every request, counting requests.
async fn metrics_app(body: &'static str, content_type: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

/// Runs Python's prometheus_client parser (`openmetrics` or `text`) on `body`; returns the family
/// names it found.
fn python_parse(body: &str, openmetrics: bool) -> Result<Vec<String>> {
    let module = if openmetrics {
        "prometheus_client.openmetrics.parser"
    } else {
        "prometheus_client.parser"
    };
    let script = format!(
        "import sys\nfrom {module} import text_string_to_metric_families as p\nfor f in p(sys.stdin.read()):\n    print(f.name, f.type, len(f.samples))\n"
    );
    let mut child = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(body.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "prometheus_client rejected the exposition (is `pip install prometheus_client` done?): {}\n{body}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split(' ').next().unwrap_or("").to_owned())
        .collect())
}

/// Structural checks Python's text parser does not make: one TYPE and at most one HELP per family,
/// and a family's samples together.
fn check_text_structure(body: &str) {
    let mut types = BTreeMap::new();
    let mut helps = BTreeMap::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_owned();
            *types.entry(name.clone()).or_insert(0) += 1;
            if name != current {
                assert!(!finished.contains(&name), "family {name} split:\n{body}");
                finished.push(std::mem::replace(&mut current, name));
            }
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            *helps
                .entry(rest.split(' ').next().unwrap().to_owned())
                .or_insert(0) += 1;
        }
    }
    for (n, c) in types.iter().chain(helps.iter()) {
        assert_eq!(*c, 1, "{n} declared {c} times:\n{body}");
    }
}

const APP_TEXT: &str = "# HELP app_requests_total Requests.\n# TYPE app_requests_total counter\napp_requests_total{code=\"200\"} 7\n# HELP istio_agent_scrapes_total Not really.\n# TYPE istio_agent_scrapes_total counter\nistio_agent_scrapes_total 999\n# TYPE app_temp gauge\napp_temp 21.5\n";
const APP_OM: &str = "# HELP app_requests Requests.\n# TYPE app_requests counter\n# UNIT app_requests requests\napp_requests_total{code=\"200\"} 7\napp_requests_created{code=\"200\"} 1.7e9\n# TYPE app_build info\napp_build_info{version=\"1\"} 1\n# EOF\n";

#[tokio::test]
async fn merged_metrics_are_one_valid_exposition_text_and_openmetrics() {
    let ip = random_loopback_ip();
    let admin = SocketAddr::from((ip, 15000));
    let _proxy = pingsail_proxy::testing::start(&format!(
        r#"
admin: {{ address: {{ socket_address: {{ address: {ip}, port_value: 15000 }} }} }}
static_resources:
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment: {{ cluster_name: app, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 9 }} }} }} }} ] }} ] }}
"#
    ))
    .await
    .unwrap();
    for (body, ct, om) in [
        (APP_TEXT, "text/plain; version=0.0.4", false),
        (
            APP_OM,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            true,
        ),
    ] {
        let app = metrics_app(body, ct).await;
        let lifecycle = Lifecycle::new();
        let (port, _srv) = start_status(
            StatusConfig {
                proxy_admin: admin,
                proxy_prometheus: admin,
                prometheus_annotations: Some(format!(
                    r#"{{"scrape":"true","path":"/metrics","port":"{}"}}"#,
                    app.port()
                )),
                ..status_cfg()
            },
            &lifecycle,
            None,
        )
        .await
        .unwrap();
        let r = get(local(port), "/stats/prometheus").await.unwrap();
        assert_eq!(r.status, 200);
        let text = r.body_text();
        let families = python_parse(&text, om).unwrap();
        if om {
            assert_eq!(
                r.header("content-type"),
                Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
            );
            assert!(text.ends_with("# EOF\n") && text.matches("# EOF").count() == 1);
            assert!(
                families.contains(&"app_requests".to_owned()),
                "{families:?}"
            );
            assert!(families.contains(&"app_build".to_owned()), "{families:?}");
        } else {
            assert_eq!(
                r.header("content-type"),
                Some("text/plain; version=0.0.4; charset=utf-8")
            );
            check_text_structure(&text);
            assert!(
                families.contains(&"app_requests".to_owned()),
                "{families:?}"
            );
            assert!(families.contains(&"app_temp".to_owned()), "{families:?}");
            // The agent's own series wins over the app's same-named one.
            assert!(!text.contains("istio_agent_scrapes_total 999"), "{text}");
        }
        for want in [
            "istio_agent_scrapes_total 1",
            "istio_agent_process_resident_memory_bytes",
            "envoy_cluster_upstream_rq_total{envoy_cluster_name=\"app\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        lifecycle.stop(0);
    }
    // Without the app and without the proxy answering, the agent's own metrics still come back.
    let lifecycle = Lifecycle::new();
    let dead = SocketAddr::from((ip, 1));
    let (port, _srv) = start_status(
        StatusConfig {
            proxy_admin: dead,
            proxy_prometheus: dead,
            ..status_cfg()
        },
        &lifecycle,
        None,
    )
    .await
    .unwrap();
    let text = get(local(port), "/metrics").await.unwrap().body_text();
    python_parse(&text, false).unwrap();
    assert!(
        text.contains("istio_agent_scrape_failures_total{type=\"envoy\"} 1"),
        "{text}"
    );
    // A scrape target on the status port itself is refused at start.
    let err = StatusServer::bind(
        StatusConfig {
            listen: local(15020),
            prometheus_annotations: Some(r#"{"scrape":"true","port":"15020"}"#.into()),
            ..StatusConfig::new()
        },
        Lifecycle::new(),
        None,
    )
    .await
    .err()
    .expect("recursive scrape accepted");
    assert!(err.to_string().contains("recursive"), "{err}");
}

/// A non-loopback address of this machine, if it has one.
fn external_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn quitquitquit_and_drain_are_local_posts() {
    let lifecycle = Lifecycle::new();
    let drained = Arc::new(AtomicBool::new(false));
    let d = drained.clone();
    let (port, srv) = start_status(
        StatusConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            with_proxy: false,
            ..StatusConfig::new()
        },
        &lifecycle,
        Some(Arc::new(move || d.store(true, Ordering::SeqCst))),
    )
    .await
    .unwrap();
    let addr = local(port);
    assert_eq!(get(addr, "/quitquitquit").await.unwrap().status, 405);
    if let Some(ip) = external_ip() {
        let r = client::send(
            SocketAddr::new(ip, port),
            &Request::new("POST", "/quitquitquit").body(""),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 403);
        let r = client::send(
            SocketAddr::new(ip, port),
            &Request::new("POST", "/drain").body(""),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 403);
    }
    assert_eq!(lifecycle.phase(), Phase::Running);
    let r = client::send(addr, &Request::new("POST", "/drain").body(""))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(drained.load(Ordering::SeqCst));
    assert_eq!(
        lifecycle.phase(),
        Phase::Running,
        "/drain alone does not exit"
    );
    let r = client::send(addr, &Request::new("POST", "/quitquitquit").body(""))
        .await
        .unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (200, "OK"));
    assert_eq!(r.header("connection"), Some("close"));
    // The lifecycle stops once the answer is out.
    let code = tokio::time::timeout(Duration::from_secs(1), lifecycle.stopped())
        .await
        .expect("not stopping after /quitquitquit");
    assert_eq!(code, 0);
    assert_eq!(lifecycle.phase(), Phase::Stopping { exit_code: 0 });
    tokio::time::timeout(Duration::from_secs(2), srv)
        .await
        .expect("status server still serving after quitquitquit")
        .unwrap();
}

/// What the app's HTTP server saw.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    peer: SocketAddr,
}

async fn http_app() -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = l.accept().await else {
                continue;
            };
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                seen.lock().push(Seen { head, peer });
                let resp: &[u8] = match path.as_str() {
                    "/ok" => b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfine",
                    "/fail" => b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 3\r\n\r\nbad",
                    "/redirect" => b"HTTP/1.1 302 Found\r\nlocation: http://elsewhere.example/\r\ncontent-length: 0\r\n\r\n",
                    _ => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                    }
                };
                let _ = s.write_all(resp).await;
            });
        }
    });
    (port, seen)
}

/// A gRPC health server: "" → SERVING, "down" → NOT_SERVING, other methods → UNIMPLEMENTED.
async fn grpc_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        use http_body_util::BodyExt;
                        let path = req.uri().path().to_owned();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let service =
                            String::from_utf8_lossy(body.get(7..).unwrap_or_default()).into_owned();
                        let (frame, code) = if path != "/grpc.health.v1.Health/Check" {
                            (Vec::new(), "12")
                        } else if service == "down" {
                            (vec![0, 0, 0, 0, 2, 0x08, 2], "0")
                        } else {
                            (vec![0, 0, 0, 0, 2, 0x08, 1], "0")
                        };
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static(code));
                        let body = http_body_util::StreamBody::new(futures_stream(frame, trailers));
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    port
}

type Frame = Result<hyper::body::Frame<hyper::body::Bytes>, std::convert::Infallible>;

fn futures_stream(
    data: Vec<u8>,
    trailers: http::HeaderMap,
) -> tokio_stream::Iter<std::vec::IntoIter<Frame>> {
    let mut frames = Vec::new();
    if !data.is_empty() {
        frames.push(Ok(hyper::body::Frame::data(hyper::body::Bytes::from(data))));
    }
    frames.push(Ok(hyper::body::Frame::trailers(trailers)));
    tokio_stream::iter(frames)
}

#[tokio::test]
async fn app_probes_http_tcp_grpc_as_kubelet_would() {
    let (http_port, seen) = http_app().await;
    let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open_port = open.local_addr().unwrap().port();
    let closed = pingsail_tests::net::closed_port().unwrap();
    let grpc = grpc_app().await;
    let probers = format!(
        r#"{{
 "/app-health/web/livez":{{"httpGet":{{"path":"/ok","port":{http_port},"httpHeaders":[{{"name":"x-custom","value":"v1"}}]}}}},
 "/app-health/web/readyz":{{"httpGet":{{"path":"fail","port":{http_port}}}}},
 "/app-health/web/startupz":{{"httpGet":{{"path":"/redirect","port":{http_port}}}}},
 "/app-lifecycle/web/prestopz":{{"httpGet":{{"path":"/hang","port":{http_port}}},"timeoutSeconds":1}},
 "/app-health/tcp/livez":{{"tcpSocket":{{"port":{open_port}}}}},
 "/app-health/tcp/readyz":{{"tcpSocket":{{"port":{closed}}}}},
 "/app-health/grpc/livez":{{"grpc":{{"port":{grpc}}}}},
 "/app-health/grpc/readyz":{{"grpc":{{"port":{grpc},"service":"down"}}}},
 "/app-health/grpc/startupz":{{"grpc":{{"port":{closed}}},"timeoutSeconds":1}}
}}"#
    );
    let lifecycle = Lifecycle::new();
    let (port, _srv) = start_status(
        StatusConfig {
            app_probers: probers,
            pod_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            with_proxy: false,
            ..status_cfg()
        },
        &lifecycle,
        None,
    )
    .await
    .unwrap();
    let status = local(port);
    let kubelet = |path: &str| {
        Request::get(path)
            .header("host", &format!("127.0.0.1:{port}"))
            .header("user-agent", "kube-probe/1.33")
            .header("accept", "*/*")
    };
    let r = client::send(status, &kubelet("/app-health/web/livez"))
        .await
        .unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (200, "fine"));
    let s = seen.lock()[0].clone();
    let head = s.head.to_ascii_lowercase();
    assert!(head.starts_with("get /ok http/1.1"), "{head}");
    assert!(
        head.contains(&format!("host: 127.0.0.1:{http_port}")),
        "status port swapped for the app's: {head}"
    );
    assert!(head.contains("x-custom: v1"), "{head}");
    assert!(head.contains("user-agent: kube-probe/1.33"), "{head}");
    assert_eq!(
        s.peer.ip(),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
        "probes come from 127.0.0.6"
    );

    let r = client::send(status, &kubelet("/app-health/web/readyz"))
        .await
        .unwrap();
    assert_eq!((r.status, r.body_text().as_str()), (503, "bad"));
    assert!(seen.lock()[1].head.starts_with("GET /fail "));
    let r = client::send(status, &kubelet("/app-health/web/startupz"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "a redirect is success");
    let t = Instant::now();
    let r = client::send(status, &kubelet("/app-lifecycle/web/prestopz"))
        .await
        .unwrap();
    assert_eq!(r.status, 500);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "timeoutSeconds honoured: {:?}",
        t.elapsed()
    );

    assert_eq!(
        client::send(status, &kubelet("/app-health/tcp/livez"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        client::send(status, &kubelet("/app-health/tcp/readyz"))
            .await
            .unwrap()
            .status,
        500
    );
    assert_eq!(
        client::send(status, &kubelet("/app-health/grpc/livez"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        client::send(status, &kubelet("/app-health/grpc/readyz"))
            .await
            .unwrap()
            .status,
        500
    );
    assert_eq!(
        client::send(status, &kubelet("/app-health/grpc/startupz"))
            .await
            .unwrap()
            .status,
        500
    );
    let r = client::send(status, &kubelet("/app-health/nope/livez"))
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body_text().contains("app prober config does not exists"));
    drop(open);
}
