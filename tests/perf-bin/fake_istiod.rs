// SPDX-License-Identifier: Apache-2.0
//! A fake istiod for the agent footprint benchmark (perf/agent_footprint.py): istiod's CA
//! (`IstioCertificateService` over TLS) and ADS behind TLS, serving one sidecar an outbound HTTP
//! listener (`0.0.0.0_<port>` style, HCM with Istio's router) whose route goes to a STATIC cluster
//! of this process's echo server. Writes the mesh root to `<dir>/root-cert.pem`, prints one JSON
//! line (`ca_addr`, `istiod_addr`, `listener_port`) and runs until killed.
//!
//! Usage: `fake-istiod <dir> <listener_port>`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pingsail_agent::testing::FakeCa;
use pingsail_tests::echo::EchoServer;
use pingsail_tests::istiod::{CLUSTER, FakeIstiod, LISTENER};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: fake-istiod <dir> <port>"));
    let port: u16 = args.next().expect("listener port").parse()?;
    let ca = FakeCa::start("spiffe://cluster.local/ns/default/sa/bench", false)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let istiod =
        FakeIstiod::start_tls(ca.pki().istiod_tls().map_err(|e| anyhow::anyhow!("{e}"))?).await?;
    let echo = EchoServer::start("app").await?;
    let up = echo.addr();
    istiod.set_yaml(
        CLUSTER,
        &format!(
            r#"
- name: "outbound|80||app.default.svc.cluster.local"
  type: STATIC
  connect_timeout: 10s
  load_assignment: {{ cluster_name: "outbound|80||app.default.svc.cluster.local", endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }} }} ] }} ] }}
"#,
            up.ip(),
            up.port()
        ),
    )?;
    istiod.set_yaml(
        LISTENER,
        &format!(
            r#"
- name: "127.0.0.1_{port}"
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
  traffic_direction: OUTBOUND
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: outbound_0.0.0.0_80
        route_config:
          name: "80"
          virtual_hosts:
          - name: app.default.svc.cluster.local:80
            domains: [ "*" ]
            routes:
            - match: {{ prefix: / }}
              route:
                cluster: "outbound|80||app.default.svc.cluster.local"
                timeout: 0s
                retry_policy: {{ retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", num_retries: 2 }}
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
        ),
    )?;
    std::fs::write(dir.join("root-cert.pem"), ca.root_pem())?;
    println!(
        "{}",
        serde_json::json!({
            "ca_addr": ca.addr().to_string(),
            "istiod_addr": istiod.addr().map(|a| a.to_string()),
            "listener_port": port,
        })
    );
    std::future::pending::<()>().await;
    Ok(())
}
