// SPDX-License-Identifier: Apache-2.0
//! Draining a sidecar with long-lived streams: admin `drain_listeners?inboundonly&graceful` on
//! pingsail and on Envoy (same semantics: inbound only, `connection: close` on HTTP/1 responses,
//! listeners keep accepting during the drain time, open streams untouched), and the agent's drain
//! coordinator (one deadline; EXIT_ON_ZERO_ACTIVE_CONNECTIONS).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use pingsail_agent::drain::{DrainCoordinator, DrainSettings};
use pingsail_agent::lifecycle::{Lifecycle, Phase};
use pingsail_tests::envoy::Envoy;
use pingsail_tests::net::random_loopback_ip;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The upstream app: `/ws` upgrades and echoes, `/slow?n=N` streams N chunks 100 ms apart, anything
/// else answers `ok` (keep-alive).
struct App {
    addr: SocketAddr,
    chunks_sent: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<String> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i + 4]).into_owned();
            buf.drain(..i + 4);
            return Ok(head);
        }
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            bail!("EOF before a complete head");
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

impl App {
    async fn start() -> Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let chunks_sent = Arc::new(AtomicU64::new(0));
        let sent = chunks_sent.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let sent = sent.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Ok(head) = read_head(&mut s, &mut buf).await {
                        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                        if path == "/ws" {
                            let _ = s
                                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
                                .await;
                            if !buf.is_empty() {
                                let _ = s.write_all(&buf).await;
                            }
                            let (mut r, mut w) = s.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            return;
                        }
                        if let Some(n) = path.strip_prefix("/slow?n=") {
                            let n: u64 = n.parse().unwrap_or(10);
                            if s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                                .await
                                .is_err()
                            {
                                return;
                            }
                            for _ in 0..n {
                                if s.write_all(b"5\r\ntick\n\r\n").await.is_err() {
                                    return;
                                }
                                sent.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            let _ = s.write_all(b"0\r\n\r\n").await;
                            continue;
                        }
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Ok(App {
            addr,
            chunks_sent,
            _task: task,
        })
    }
}

fn listener(name: &str, ip: Ipv4Addr, port: u16, direction: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}
    {direction}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          upgrade_configs: [ {{ upgrade_type: websocket }} ]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: / }}
                route: {{ cluster: app, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    )
}

/// Admin on ip:15000, an INBOUND listener on ip:15006 and an outbound one on ip:15001, both to the
/// app.
fn bootstrap(ip: Ipv4Addr, app: SocketAddr) -> String {
    format!(
        r#"
admin:
  address: {{ socket_address: {{ address: {ip}, port_value: 15000 }} }}
static_resources:
  listeners:
{inbound}
{outbound}
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: app
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {aip}, port_value: {aport} }} }} }} }} ] }} ]
"#,
        inbound = listener("inbound", ip, 15006, "traffic_direction: INBOUND"),
        outbound = listener("outbound", ip, 15001, "traffic_direction: OUTBOUND"),
        aip = app.ip(),
        aport = app.port(),
    )
}

enum Proxy {
    Envoy(#[allow(dead_code)] Envoy),
    Pingsail(#[allow(dead_code)] pingsail_proxy::testing::Running),
}

async fn start(envoy: bool, bootstrap: &str) -> Result<Proxy> {
    Ok(if envoy {
        // As pilot-agent starts it: every connection is discouraged at once when draining.
        Proxy::Envoy(Envoy::start_with_args(bootstrap, &["--drain-strategy", "immediate"]).await?)
    } else {
        Proxy::Pingsail(pingsail_proxy::testing::start(bootstrap).await?)
    })
}

/// `GET /ok` on a fresh connection: (status line, whether `connection: close` came back).
async fn get_ok(addr: SocketAddr) -> Result<(String, bool)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /ok HTTP/1.1\r\nhost: app\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await?;
    let close = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "connection:close");
    Ok((head.lines().next().unwrap_or("").to_owned(), close))
}

/// An upgraded connection through the proxy.
async fn websocket(addr: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /ws HTTP/1.1\r\nhost: app\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await?;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await?;
    if !head.starts_with("HTTP/1.1 101") {
        bail!("no upgrade: {head}");
    }
    Ok(s)
}

async fn echo(s: &mut TcpStream, msg: &[u8]) -> Result<()> {
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    let read = async {
        s.read_exact(&mut got).await?;
        anyhow::Ok(())
    };
    tokio::select! {
        r = read => r?,
        _ = tokio::time::sleep(Duration::from_secs(2)) => bail!("no echo within 2 s"),
    }
    if got != msg {
        bail!("echo mismatch");
    }
    Ok(())
}

/// A slow chunked response; a task counts the chunks and records how it ended.
struct Slow {
    chunks: Arc<AtomicU64>,
    end: tokio::task::JoinHandle<String>,
}

async fn slow(addr: SocketAddr, n: u64) -> Result<Slow> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET /slow?n={n} HTTP/1.1\r\nhost: app\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("slow: {head}");
    }
    let chunks = Arc::new(AtomicU64::new(0));
    let c = chunks.clone();
    let end = tokio::spawn(async move {
        let mut all = buf;
        loop {
            c.store(
                all.windows(5).filter(|w| *w == b"tick\n").count() as u64,
                Ordering::Relaxed,
            );
            if all.ends_with(b"0\r\n\r\n") {
                return "complete".to_owned();
            }
            let mut tmp = [0u8; 1024];
            match s.read(&mut tmp).await {
                Ok(0) => return "eof".to_owned(),
                Ok(k) => all.extend_from_slice(&tmp[..k]),
                Err(e) => return format!("error: {e}"),
            }
        }
    });
    Ok(Slow { chunks, end })
}

async fn post(addr: SocketAddr, target: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("POST {target} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A raw HTTP/2 (prior knowledge) connection: enough framing to send GETs and see GOAWAY.
struct H2 {
    s: TcpStream,
    buf: Vec<u8>,
    next_stream: u32,
}

impl H2 {
    async fn connect(addr: SocketAddr) -> Result<Self> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
        Ok(H2 {
            s,
            buf: Vec::new(),
            next_stream: 1,
        })
    }

    /// GET / (HPACK: :method GET, :path /, :scheme http, :authority app).
    async fn get(&mut self) -> Result<u32> {
        let id = self.next_stream;
        self.next_stream += 2;
        let block = [0x82, 0x84, 0x86, 0x41, 3, b'a', b'p', b'p'];
        let mut f = vec![0, 0, block.len() as u8, 1, 0x5];
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&block);
        self.s.write_all(&f).await?;
        Ok(id)
    }

    /// Reads frames until `want(type, stream)` holds; SETTINGS are acknowledged. Returns the frame
    /// types seen.
    async fn until(&mut self, want: impl Fn(u8, u32) -> bool, within: Duration) -> Result<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            while self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() < 9 + len {
                    break;
                }
                let (ty, flags) = (self.buf[3], self.buf[4]);
                let stream =
                    u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                        & 0x7fff_ffff;
                self.buf.drain(..9 + len);
                seen.push(ty);
                if ty == 4 && flags & 1 == 0 {
                    self.s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await?;
                }
                if want(ty, stream) {
                    return Ok(seen);
                }
            }
            let mut tmp = [0u8; 4096];
            let n = tokio::select! {
                r = self.s.read(&mut tmp) => r?,
                _ = tokio::time::sleep_until(deadline) => bail!("no such frame; saw types {seen:?}"),
            };
            if n == 0 {
                bail!("h2 connection closed; saw frame types {seen:?}");
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

/// Polls until inbound responses carry `connection: close` (the drain reached the proxy).
async fn until_draining(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, close) = get_ok(addr).await?;
        if close {
            anyhow::ensure!(status.contains(" 200"), "during drain: {status}");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("responses never carried connection: close");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What both proxies must do on `drain_listeners?inboundonly&graceful`.
async fn graceful_inbound_drain(envoy: bool) -> Result<()> {
    let app = App::start().await?;
    let ip = random_loopback_ip();
    let _proxy = start(envoy, &bootstrap(ip, app.addr)).await?;
    let inbound = SocketAddr::from((ip, 15006));
    let outbound = SocketAddr::from((ip, 15001));
    let admin = SocketAddr::from((ip, 15000));
    assert!(
        !get_ok(inbound).await?.1,
        "no connection: close before the drain"
    );
    let mut ws = websocket(inbound).await?;
    echo(&mut ws, b"before").await?;
    let slow = slow(inbound, 20).await?;
    let mut h2 = H2::connect(inbound).await?;
    let id = h2.get().await?;
    let seen = h2
        .until(|ty, st| ty == 1 && st == id, Duration::from_secs(3))
        .await?;
    anyhow::ensure!(!seen.contains(&7), "GOAWAY before the drain");

    let r = post(admin, "/drain_listeners?inboundonly&graceful").await?;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    until_draining(inbound).await?;
    // h2: GOAWAY (at once, or with the next response).
    let _ = h2.get().await;
    h2.until(|ty, _| ty == 7, Duration::from_secs(3))
        .await
        .context("no GOAWAY on the h2 connection")?;
    // Outbound listeners are not drained; inbound ones keep accepting during the drain time.
    let (status, close) = get_ok(outbound).await?;
    assert!(
        status.contains(" 200") && !close,
        "outbound: {status} close={close}"
    );
    // The long streams go on.
    for i in 0..5 {
        echo(&mut ws, format!("during-{i}").as_bytes()).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(slow.end.await?, "complete", "the slow response finished");
    assert_eq!(slow.chunks.load(Ordering::Relaxed), 20);
    echo(&mut ws, b"after").await?;
    Ok(())
}

#[tokio::test]
async fn envoy_graceful_inbound_drain_keeps_streams() {
    graceful_inbound_drain(true).await.unwrap();
}

#[tokio::test]
async fn pingsail_graceful_inbound_drain_keeps_streams() {
    graceful_inbound_drain(false).await.unwrap();
}

/// The agent's drain: SIGTERM (terminate) → drain_listeners → exit at the one deadline; the long
/// streams see no reset before it, and end promptly when the proxy is stopped after it.
#[tokio::test]
async fn agent_drain_one_deadline_with_long_streams() {
    let app = App::start().await.unwrap();
    let ip = random_loopback_ip();
    let proxy = pingsail_proxy::testing::start(&bootstrap(ip, app.addr))
        .await
        .unwrap();
    let inbound = SocketAddr::from((ip, 15006));
    let lifecycle = Lifecycle::new();
    let settings = DrainSettings {
        proxy_admin: SocketAddr::from((ip, 15000)),
        termination_drain_duration: Duration::from_millis(1500),
        ..DrainSettings::new()
    };
    let coord = DrainCoordinator::new(settings, lifecycle.clone());
    let run = tokio::spawn(coord.clone().run());
    let mut ws = websocket(inbound).await.unwrap();
    let slow = slow(inbound, 100).await.unwrap();

    let t0 = Instant::now();
    assert!(coord.terminate());
    assert!(!coord.terminate(), "one deadline");
    let Phase::Draining { deadline } = lifecycle.phase() else {
        panic!("not draining: {:?}", lifecycle.phase());
    };
    until_draining(inbound).await.unwrap();
    // Until the deadline: the websocket echoes, the chunked response flows.
    let mut last_echo = t0;
    while Instant::now() + Duration::from_millis(250) < deadline {
        echo(&mut ws, b"still here").await.unwrap();
        last_echo = Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !slow.end.is_finished(),
        "the slow response was cut before the deadline"
    );
    let code = lifecycle.stopped().await;
    let stopped_after = t0.elapsed();
    assert_eq!(code, 0);
    assert!(
        stopped_after >= Duration::from_millis(1400) && stopped_after < Duration::from_millis(2300),
        "stopped after {stopped_after:?}"
    );
    assert!(last_echo.duration_since(t0) >= Duration::from_millis(1000));
    let before = slow.chunks.load(Ordering::Relaxed);
    assert!(before >= 12, "chunks before the deadline: {before}");
    assert!(app.chunks_sent.load(Ordering::Relaxed) >= before);
    run.await.unwrap();
    // The supervisor stops the proxy at Stopping: the streams end promptly.
    let t1 = Instant::now();
    drop(proxy);
    let ended = tokio::time::timeout(Duration::from_secs(2), slow.end)
        .await
        .expect("slow stream still open 2 s after the proxy stopped")
        .unwrap();
    assert_ne!(ended, "complete");
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(2), ws.read(&mut buf))
        .await
        .expect("websocket still open after the proxy stopped");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(t1.elapsed() < Duration::from_secs(2));
}

/// EXIT_ON_ZERO_ACTIVE_CONNECTIONS: after MINIMUM_DRAIN_DURATION the agent stops as soon as the
/// app-facing listeners hold no connection, well before terminationDrainDuration.
#[tokio::test]
async fn agent_drain_exits_on_zero_active_connections() {
    let app = App::start().await.unwrap();
    let ip = random_loopback_ip();
    let _proxy = pingsail_proxy::testing::start(&bootstrap(ip, app.addr))
        .await
        .unwrap();
    let inbound = SocketAddr::from((ip, 15006));
    let lifecycle = Lifecycle::new();
    let settings = DrainSettings {
        proxy_admin: SocketAddr::from((ip, 15000)),
        termination_drain_duration: Duration::from_secs(20),
        minimum_drain_duration: Duration::from_millis(300),
        exit_on_zero_active_connections: true,
        check_interval: Duration::from_millis(100),
        ..DrainSettings::new()
    };
    let coord = DrainCoordinator::new(settings, lifecycle.clone());
    let run = tokio::spawn(coord.clone().run());
    // One stream of 1.2 s; its connection closes when it ends.
    let s = slow(inbound, 12).await.unwrap();
    let t0 = Instant::now();
    coord.terminate();
    assert_eq!(s.end.await.unwrap(), "complete");
    let stream_done = t0.elapsed();
    let code = tokio::time::timeout(Duration::from_secs(5), lifecycle.stopped())
        .await
        .context("the agent did not stop on zero connections")
        .unwrap();
    let stopped = t0.elapsed();
    assert_eq!(code, 0);
    assert!(
        stopped >= stream_done,
        "stopped at {stopped:?} before the stream ended at {stream_done:?}"
    );
    assert!(
        stopped < stream_done + Duration::from_millis(800),
        "stopped at {stopped:?}, stream ended at {stream_done:?}"
    );
    run.await.unwrap();
}
