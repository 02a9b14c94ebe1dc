// SPDX-License-Identifier: Apache-2.0
//! The `pingsail-proxy` binary as Envoy's command line: a malformed bootstrap exits non-zero with one
//! line naming the field path; a good one serves; `/quitquitquit` ends the process.

// Test code: panicking on a failed setup step is the point; timeouts here bound a test, not the data path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_pingsail-proxy");

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pingsail-cli-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    h.finish()
}

/// Runs the binary on a bootstrap expected to be refused; returns stderr.
fn refused(bootstrap: &str) -> String {
    let path = temp_file("bootstrap.yaml", bootstrap);
    let out = Command::new(BIN).arg("-c").arg(&path).output().unwrap();
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
    assert!(!out.status.success(), "expected failure, got success");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected, got: {err}"
    );
    err
}

const GOOD: &str = r#"
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: s
          route_config:
            virtual_hosts:
            - name: v
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: c, hedge_policy: {hedge_on_per_try_timeout: true}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: c
    load_assignment:
      cluster_name: c
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}}]}]
"#;

#[test]
fn unsupported_field_names_its_path() {
    let err = refused(GOOD);
    assert!(
        err.contains(
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0].route.hedge_policy: not supported yet (resilience issue)"
        ),
        "{err}"
    );
}

#[test]
fn bad_yaml() {
    let err = refused("static_resources: [unclosed");
    assert!(err.contains("not valid YAML or JSON"), "{err}");
}

#[test]
fn wrong_field_type_names_its_path() {
    let err = refused(&GOOD.replace("port_value: 0", "port_value: zero"));
    assert!(
        err.contains("static_resources.listeners[0].address.socket_address.port_value"),
        "{err}"
    );
}

#[test]
fn unknown_type_url() {
    let err = refused(&GOOD.replace("router.v3.Router", "router.v3.Nope"));
    assert!(
        err.contains("envoy.extensions.filters.http.router.v3.Nope"),
        "{err}"
    );
}

#[test]
fn unknown_field_name() {
    let err = refused(&GOOD.replace("stat_prefix: s", "stat_prefx: s"));
    assert!(err.contains("stat_prefx"), "{err}");
}

#[test]
fn malformed_ip() {
    let good = GOOD.replace(", hedge_policy: {hedge_on_per_try_timeout: true}", "");
    let err = refused(&good.replace(
        "address: 127.0.0.1, port_value: 1",
        "address: 127.0.0.999, port_value: 1",
    ));
    assert!(err.contains("static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: malformed IP address: 127.0.0.999"), "{err}");
}

#[test]
fn unknown_cluster_in_route() {
    let good = GOOD.replace(", hedge_policy: {hedge_on_per_try_timeout: true}", "");
    let err = refused(&good.replace("route: {cluster: c", "route: {cluster: missing"));
    assert!(err.contains("route: unknown cluster 'missing'"), "{err}");
}

#[test]
fn missing_file() {
    let out = Command::new(BIN)
        .args(["-c", "/nonexistent/pingsail.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/pingsail.yaml"));
}

#[test]
fn validate_mode_and_envoy_flags() {
    let good = GOOD.replace(", hedge_policy: {hedge_on_per_try_timeout: true}", "");
    let path = temp_file("bootstrap.yaml", &good);
    let out = Command::new(BIN)
        .arg("-c")
        .arg(&path)
        .args([
            "--mode",
            "validate",
            "--concurrency",
            "2",
            "--drain-time-s",
            "45",
            "--drain-strategy",
            "immediate",
            "--local-address-ip-version",
            "v4",
            "-l",
            "warning",
            "--component-log-level",
            "misc:error",
            "--disable-hot-restart",
            "--parent-shutdown-time-s",
            "60",
            "--base-id",
            "7",
            "--service-cluster",
            "reviews.default",
            "--service-node",
            "sidecar~10.0.0.1~reviews-1.default~default.svc.cluster.local",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the binary with an admin listener, reads the bound admin port from a known free port, and
/// checks `/ready`, `/config_dump` (decodes as envoy.admin.v3.ConfigDump like istioctl does) and
/// `/quitquitquit` (the process exits 0).
#[test]
fn serves_admin_and_quits() {
    let admin_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let good = GOOD.replace(", hedge_policy: {hedge_on_per_try_timeout: true}", "");
    let boot = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}\n{good}"
    );
    let path = temp_file("bootstrap.yaml", &boot);
    let mut child = Command::new(BIN)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Readiness: poll /ready (the admin socket is bound before listeners are served).
    let mut ready = None;
    for _ in 0..200 {
        if let Ok(r) = http(admin_port, "GET", "/ready") {
            ready = Some(r);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let ready = ready.expect("admin never answered");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.ends_with("LIVE\n"));

    let dump = http(admin_port, "GET", "/config_dump").unwrap();
    let body = dump.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let types: Vec<&str> = v["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["@type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
            "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump",
            "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
        ]
    );
    assert_eq!(
        v["configs"][1]["static_clusters"][0]["cluster"]["name"],
        "c"
    );
    assert_eq!(
        v["configs"][2]["static_listeners"][0]["listener"]["name"],
        "l"
    );
    assert!(
        v["configs"][4]["static_route_configs"][0]["route_config"]["virtual_hosts"][0]["domains"]
            [0]
            == "*"
    );
    // istioctl unmarshals this with protojson: it must decode as envoy.admin.v3.ConfigDump.
    pingsail_proxy::xds::json::dynamic_from_json("envoy.admin.v3.ConfigDump", &v).unwrap();

    let stats = http(admin_port, "GET", "/stats").unwrap();
    assert!(stats.contains("cluster.c.upstream_rq_total: 0"), "{stats}");
    let prom = http(admin_port, "GET", "/stats/prometheus").unwrap();
    assert!(
        prom.contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"c\"} 0"),
        "{prom}"
    );
    let clusters = http(admin_port, "GET", "/clusters").unwrap();
    assert!(
        clusters.contains("c::127.0.0.1:1::health_flags::healthy"),
        "{clusters}"
    );
    assert!(
        http(admin_port, "GET", "/quitquitquit")
            .unwrap()
            .starts_with("HTTP/1.1 405")
    );
    assert!(
        http(admin_port, "POST", "/logging?level=bogus")
            .unwrap()
            .starts_with("HTTP/1.1 400")
    );
    assert!(
        http(admin_port, "POST", "/logging?level=debug")
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );

    assert!(
        http(admin_port, "POST", "/quitquitquit")
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );
    let status = child.wait().unwrap();
    assert!(status.success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("/quitquitquit"), "{err}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

fn http(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// An internal listener tunnelling over CONNECT, as istiod's `connect_originate`.
const TUNNEL: &str = r#"
static_resources:
  listeners:
  - name: connect_originate
    internal_listener: {}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c
          tunneling_config: {hostname: "%DOWNSTREAM_LOCAL_ADDRESS%"}
  clusters:
  - name: c
    load_assignment:
      cluster_name: c
      endpoints: [{lb_endpoints: [{endpoint: {address: {envoy_internal_address: {server_listener_name: connect_originate}}}}]}]
"#;

#[test]
fn hbone_config_errors_name_their_paths() {
    // The shape itself validates.
    let path = temp_file("bootstrap.yaml", TUNNEL);
    let out = Command::new(BIN)
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let err = refused(&TUNNEL.replace("%DOWNSTREAM_LOCAL_ADDRESS%", "%UPSTREAM_HOST%"));
    assert!(
        err.contains(
            "tunneling_config.hostname: command operator %UPSTREAM_HOST% is not supported here"
        ),
        "{err}"
    );
    let err = refused(&TUNNEL.replace("%DOWNSTREAM_LOCAL_ADDRESS%", "%DOWNSTREAM_LOCAL"));
    assert!(err.contains("unterminated command operator"), "{err}");
    let err = refused(&TUNNEL.replace(
        "    internal_listener: {}",
        "    internal_listener: {}\n    address: {socket_address: {address: 127.0.0.1, port_value: 0}}",
    ));
    assert!(
        err.contains("static_resources.listeners[0].address: an internal listener has no address"),
        "{err}"
    );
    let err = refused(&TUNNEL.replace(
        "{server_listener_name: connect_originate}",
        "{endpoint_id: x}",
    ));
    assert!(
        err.contains("envoy_internal_address.server_listener_name"),
        "{err}"
    );
}
