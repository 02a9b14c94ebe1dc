// SPDX-License-Identifier: Apache-2.0
//! `pingsail-agent wait` and `pingsail-agent request` (pilot-agent's flags, defaults and exit codes)
//! against real local servers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const AGENT: &str = env!("CARGO_BIN_EXE_pingsail-agent");

/// Answers 503 to the first `fail_first` requests, then 200 (`u64::MAX`: never 200; with
/// `hang`, never answers). Returns the port and the request count.
async fn server(fail_first: u64, hang: bool) -> (u16, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                if !head.starts_with("GET /healthz/ready HTTP/1.1") {
                    let _ = s
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let k = c.fetch_add(1, Ordering::SeqCst);
                if hang {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let resp: &[u8] = if k < fail_first {
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                };
                let _ = s.write_all(resp).await;
            });
        }
    });
    (port, count)
}

#[tokio::test]
async fn wait_polls_until_ready() {
    let (port, count) = server(3, false).await;
    let out = tokio::process::Command::new(AGENT)
        .args([
            "wait",
            "--url",
            &format!("http://127.0.0.1:{port}/healthz/ready"),
            "--periodMillis",
            "50",
            "--timeoutSeconds",
            "10",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count.load(Ordering::SeqCst), 4, "three 503s, then 200");
}

#[tokio::test]
async fn wait_times_out_with_exit_1() {
    for hang in [false, true] {
        let (port, count) = server(u64::MAX, hang).await;
        let t0 = Instant::now();
        let out = tokio::process::Command::new(AGENT)
            .args([
                "wait",
                "--url",
                &format!("http://127.0.0.1:{port}/healthz/ready"),
                "--periodMillis",
                "100",
                "--requestTimeoutMillis",
                "100",
                "--timeoutSeconds",
                "1",
            ])
            .output()
            .await
            .unwrap();
        let took = t0.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(err.contains("timeout waiting for the proxy"), "{err}");
        if hang {
            assert!(err.contains("timed out"), "{err}");
        } else {
            assert!(err.contains("HTTP status code 503"), "{err}");
        }
        assert!(count.load(Ordering::SeqCst) >= 3);
    }
}

#[tokio::test]
async fn wait_defaults_are_pilot_agents() {
    let out = tokio::process::Command::new(AGENT)
        .args(["wait", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--timeoutSeconds <TIMEOUT_SECONDS>",
        "[default: 60]",
        "[default: 500]",
        "[default: http://localhost:15021/healthz/ready]",
        "--requestTimeoutMillis",
        "--periodMillis",
    ] {
        assert!(help.contains(want), "{want} missing:\n{help}");
    }
}

#[tokio::test]
async fn request_refuses_other_ports() {
    let out = tokio::process::Command::new(AGENT)
        .args(["request", "--debug-port", "8080", "GET", "stats"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("debug port 8080 is not in allowed list"),
        "{err}"
    );
}

/// The injected preStop, `request --debug-port=15020 POST drain`, in a network namespace of its own
/// (port 15020 is fixed): the body is printed, exit 0; with nothing listening, exit 1.
#[tokio::test]
async fn request_posts_to_the_status_port_like_the_prestop_hook() {
    let script = format!(
        r#"
import http.server, json, subprocess, threading
seen = []
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get('content-length') or 0)
        seen.append((self.command, self.path, self.rfile.read(n).decode()))
        body = b'OK'
        self.send_response(200); self.send_header('content-length', str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.HTTPServer(('127.0.0.1', 15020), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
a = subprocess.run([{agent:?}, 'request', '--debug-port=15020', 'POST', 'drain'], capture_output=True, text=True)
b = subprocess.run([{agent:?}, 'request', '--debug-port', '15020', 'POST', 'quitquitquit', 'body'], capture_output=True, text=True)
srv.shutdown(); srv.server_close()
c = subprocess.run([{agent:?}, 'request', 'GET', 'ready'], capture_output=True, text=True)
print(json.dumps({{'a': [a.returncode, a.stdout], 'b': [b.returncode, b.stdout], 'c': [c.returncode, c.stderr], 'seen': seen}}))
"#,
        agent = AGENT
    );
    let out = tokio::process::Command::new("unshare")
        .args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec python3 -c \"$0\"",
        ])
        .arg(&script)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["a"], serde_json::json!([0, "OK\n"]));
    assert_eq!(v["b"], serde_json::json!([0, "OK\n"]));
    assert_eq!(
        v["seen"],
        serde_json::json!([["POST", "/drain", ""], ["POST", "/quitquitquit", "body"]])
    );
    assert_eq!(v["c"][0], 1, "nothing on 15000: {}", v["c"][1]);
}
