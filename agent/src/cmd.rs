// SPDX-License-Identifier: Apache-2.0
//! `pingsail-agent wait` and `pingsail-agent request`, with pilot-agent's flags and defaults.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::status::client::Call;

/// `wait`: polls the proxy's readiness until it answers 200 (holdApplicationUntilProxyStarts).
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// maximum number of seconds to wait for the proxy to be ready
    #[arg(long = "timeoutSeconds", default_value_t = 60)]
    pub timeout_seconds: u64,
    /// number of milliseconds to wait for response
    #[arg(long = "requestTimeoutMillis", default_value_t = 500)]
    pub request_timeout_millis: u64,
    /// number of milliseconds to wait between attempts
    #[arg(long = "periodMillis", default_value_t = 500)]
    pub period_millis: u64,
    /// URL to use in requests
    #[arg(long = "url", default_value = "http://localhost:15021/healthz/ready")]
    pub url: String,
}

/// `request`: an HTTP request to a local admin or status port; prints the answer's body.
#[derive(Debug, Clone, clap::Args)]
pub struct RequestArgs {
    /// the port to make a local request to (15000: the proxy's admin)
    #[arg(long = "debug-port", default_value_t = 15000)]
    pub debug_port: u16,
    /// HTTP method
    pub method: String,
    /// path (without the leading '/', as pilot-agent takes it)
    pub path: String,
    /// request body
    pub body: Option<String>,
}

/// Splits `http://host:port/path` into an address and a target.
fn parse_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url '{url}': only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') => (
            h.trim_start_matches('[').trim_end_matches(']').to_owned(),
            p.parse::<u16>()
                .map_err(|_| format!("--url '{url}': bad port '{p}'"))?,
        ),
        _ => (authority.to_owned(), 80),
    };
    Ok((host, port, path.to_owned()))
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .collect();
    // Local ports listen on IPv4 first (0.0.0.0 / 127.0.0.1).
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("resolving {host}: no address"))
}

async fn check(url_host: &str, port: u16, path: &str, timeout: Duration) -> Result<(), String> {
    let addr = resolve(url_host, port).await?;
    let mut call = Call::get(addr, path);
    call.host = Some(format!("{url_host}:{port}"));
    call.timeout = Some(timeout);
    let r = call.send().await.map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("HTTP status code {}", r.status));
    }
    Ok(())
}

/// Runs `wait`; the exit code is 0 once ready, 1 on timeout or bad flags.
pub async fn wait(args: WaitArgs) -> i32 {
    let (host, port, path) = match parse_url(&args.url) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("Error: {e}");
            return 1;
        }
    };
    eprintln!(
        "Waiting for the proxy to be ready (timeout: {} seconds)...",
        args.timeout_seconds
    );
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
    let period = Duration::from_millis(args.period_millis);
    let mut last = String::from("no attempt made");
    loop {
        let now = Instant::now();
        if now + period > deadline {
            tokio::time::sleep_until(deadline.into()).await;
            eprintln!("Error: timeout waiting for the proxy to become ready. Last error: {last}");
            return 1;
        }
        tokio::time::sleep(period).await;
        match check(
            &host,
            port,
            &path,
            Duration::from_millis(args.request_timeout_millis),
        )
        .await
        {
            Ok(()) => {
                eprintln!("The proxy is ready!");
                return 0;
            }
            Err(e) => last = e,
        }
    }
}

/// The ports `request` may talk to (pilot-agent's list).
pub const ALLOWED_PORTS: [u16; 4] = [15000, 15004, 15020, 15021];

/// Runs `request`; prints the body to stdout. The exit code is 1 when the port is not allowed or
/// the request could not be made (the answer's status does not matter, as with pilot-agent over TCP).
pub async fn request(args: RequestArgs) -> i32 {
    if !ALLOWED_PORTS.contains(&args.debug_port) {
        eprintln!(
            "Error: debug port {} is not in allowed list {:?}",
            args.debug_port, ALLOWED_PORTS
        );
        return 1;
    }
    let method = match http::Method::from_bytes(args.method.to_ascii_uppercase().as_bytes()) {
        Ok(m) => m,
        Err(_) => {
            eprintln!("Error: invalid method '{}'", args.method);
            return 1;
        }
    };
    let addr = match resolve("localhost", args.debug_port).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("Error: {e}");
            return 1;
        }
    };
    let mut call = Call::get(addr, format!("/{}", args.path.trim_start_matches('/')));
    call.method = method;
    call.host = Some(format!("localhost:{}", args.debug_port));
    call.timeout = Some(Duration::from_secs(60));
    call.body = bytes::Bytes::from(args.body.unwrap_or_default());
    match call.send().await {
        Ok(r) => {
            use std::io::Write as _;
            let mut out = std::io::stdout();
            let _ = out.write_all(&r.body);
            let _ = out.write_all(b"\n");
            0
        }
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    }
}
