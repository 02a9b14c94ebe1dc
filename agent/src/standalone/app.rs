// SPDX-License-Identifier: Apache-2.0
//! The standalone mesh's demo app: a small HTTP/1.1 server that says which workload answered,
//! for whom (the caller's SPIFFE id from the sidecar's `x-forwarded-client-cert`) and on which
//! attempt (`x-envoy-attempt-count`). `/flaky…` fails its first attempt with 503 so a retry
//! policy shows.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Listens on `addr` and serves until the task is dropped.
pub async fn bind(addr: SocketAddr, says: String) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    let says: Arc<str> = says.into();
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let says = says.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let says = says.clone();
                    async move { Ok::<_, Infallible>(answer(&says, &req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }))
}

fn answer(says: &str, req: &http::Request<Incoming>) -> http::Response<String> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let attempt: u32 = header("x-envoy-attempt-count")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let caller = header("x-forwarded-client-cert")
        .and_then(caller_uri)
        .unwrap_or("an unauthenticated caller");
    let path = req.uri().path();
    let (status, body) = if path.starts_with("/flaky") && attempt < 2 {
        (
            http::StatusCode::SERVICE_UNAVAILABLE,
            format!("{says}: failing attempt {attempt} of {path} on purpose\n"),
        )
    } else {
        (
            http::StatusCode::OK,
            format!("{says}: {path} for {caller} (attempt {attempt})\n"),
        )
    };
    let mut resp = http::Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    resp
}

/// The `URI=` of the last (nearest) element of an XFCC header: the peer the sidecar saw.
fn caller_uri(xfcc: &str) -> Option<&str> {
    let last = xfcc.rsplit(',').next()?;
    last.split(';')
        .find_map(|kv| kv.strip_prefix("URI="))
        .map(|v| v.trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::caller_uri;

    #[test]
    fn caller_is_the_last_elements_uri() {
        let x = "By=spiffe://a/ns/x/sa/y;URI=spiffe://a/ns/z/sa/old,By=spiffe://a/ns/default/sa/reviews;Hash=ab;Subject=\"\";URI=spiffe://cluster.local/ns/default/sa/sleep";
        assert_eq!(
            caller_uri(x),
            Some("spiffe://cluster.local/ns/default/sa/sleep")
        );
        assert_eq!(caller_uri("By=x;Hash=y"), None);
    }
}
