// SPDX-License-Identifier: Apache-2.0
//! ext_authz (HTTP authorization service) against Envoy: the service runs here, its port is filled
//! into `tests/scenarios/ext_authz.tmpl.yaml`, which then runs as a differential scenario.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pingsail_tests::scenario::{Scenario, run_scenario, scenario_path};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The answer of the authorization service to one check request.
fn decide(head: &str) -> String {
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let pairs: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .filter(|(n, _)| !n.is_empty())
        .collect();
    let timeout = pairs
        .iter()
        .find(|(n, _)| n == "x-envoy-expected-rq-timeout-ms")
        .map_or("", |(_, v)| v.as_str())
        .to_owned();
    let mut names: Vec<String> = pairs.into_iter().map(|(n, _)| n).collect();
    names.sort();
    let reply = |status: &str, headers: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    if path.contains("/deny") {
        reply(
            "403 Forbidden",
            "x-authz-reason: nope\r\nx-authz-user: mallory\r\nwww-authenticate: Custom\r\ncontent-type: text/plain\r\n",
            "denied by authz",
        )
    } else if path.contains("/teapot") {
        reply("418 I'm a teapot", "", "short and stout")
    } else if path.contains("/error") {
        reply(
            "500 Internal Server Error",
            "x-authz-reason: broken\r\n",
            "boom",
        )
    } else {
        let saw = format!(
            "x-authz-user: alice\r\nx-authz-append: added\r\nx-authz-not-allowed: secret\r\n\
             x-authz-saw-path: {path}\r\nx-authz-saw-method: {method}\r\nx-authz-saw-headers: {}\r\n\
             x-authz-saw-timeout: {timeout}\r\n",
            names.join(",")
        );
        reply("200 OK", &saw, "")
    }
}

async fn serve_authz() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        if head.contains("/slow") {
                            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                        }
                        if s.write_all(decide(&head).as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_http_service() {
    let port = serve_authz().await;
    let text = std::fs::read_to_string(scenario_path("ext_authz.tmpl"))
        .unwrap()
        .replace("{{authz_port}}", &port.to_string());
    let scenario: Scenario = serde_yaml::from_str(&text).unwrap();
    if let Err(e) = run_scenario("ext_authz", scenario).await {
        panic!("{e:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_grpc_service() {
    let authz = pingsail_tests::authz_grpc::GrpcAuthz::start()
        .await
        .unwrap();
    let text = std::fs::read_to_string(scenario_path("ext_authz_grpc.tmpl"))
        .unwrap()
        .replace("{{authz_port}}", &authz.port().to_string());
    let scenario: Scenario = serde_yaml::from_str(&text).unwrap();
    if let Err(e) = run_scenario("ext_authz_grpc", scenario).await {
        panic!("{e:#}");
    }
}
