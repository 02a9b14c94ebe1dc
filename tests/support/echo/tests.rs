// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)]

use tokio::io::AsyncWriteExt as _;

use super::*;
use crate::client::{Connection, RawReply, Request, send_raw};

#[tokio::test]
async fn echoes_in_order_and_counts_keepalive() {
    let echo = EchoServer::start("e1").await.unwrap();
    let mut conn = Connection::connect(echo.addr()).await.unwrap();
    for i in 0..3 {
        let req = Request::new("POST", &format!("/p/{i}?q"))
            .header("Host", "x")
            .header("X-B", "2")
            .header("x-a", "1")
            .body("hi");
        let resp = conn.send(&req).await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-upstream"), Some("e1"));
        let rec: EchoRecord = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(rec.path, format!("/p/{i}?q"));
        assert_eq!(rec.method, "POST");
        assert_eq!(rec.body, "hi");
        let names: Vec<&str> = rec.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["host", "x-b", "x-a", "content-length"]);
    }
    assert!(conn.is_reusable());
    assert_eq!((echo.connections(), echo.requests()), (1, 3));
}

#[tokio::test]
async fn control_headers_and_chunked_bodies() {
    let echo = EchoServer::start("e2").await.unwrap();
    let raw = b"PUT /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\
                x-echo-status: 201\r\nx-echo-header: k1=v1\r\nx-echo-header: k2 = v2\r\n\r\n\
                3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\ntrailer: t\r\n\r\n";
    let RawReply::Response(resp) = send_raw(echo.addr(), raw).await.unwrap() else {
        panic!("no response");
    };
    assert_eq!(resp.status, 201);
    assert_eq!(
        (resp.header("k1"), resp.header("k2")),
        (Some("v1"), Some("v2"))
    );
    let rec: EchoRecord = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(rec.body, "abcde");

    let req = Request::get("/")
        .header("host", "x")
        .header("x-echo-body-size", "5");
    let resp = crate::client::send(echo.addr(), &req).await.unwrap();
    assert_eq!(resp.body, b"xxxxx");

    let req = Request::get("/")
        .header("host", "x")
        .header("x-echo-status", "204");
    let resp = crate::client::send(echo.addr(), &req).await.unwrap();
    assert_eq!((resp.status, resp.body.len()), (204, 0));

    let req = Request::get("/")
        .header("host", "x")
        .header("x-echo-close", "1");
    let reply = send_raw(echo.addr(), &req.to_bytes()).await.unwrap();
    assert_eq!(reply, RawReply::Closed { bytes: vec![] });
    assert!(crate::client::send(echo.addr(), &req).await.is_err());
    assert_eq!(echo.requests(), 5);
}

#[tokio::test]
async fn client_reads_chunked_and_close_delimited_responses() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\nwiki\r\n0\r\n\r\nHTTP/1.1 503 Nope\r\nX-Y: z\r\n\r\nrest-until-close",
        )
        .await
        .unwrap();
    });
    let mut conn = Connection::connect(addr).await.unwrap();
    let first = conn.read_response(false).await.unwrap();
    assert_eq!((first.status, first.body_text().as_str()), (200, "wiki"));
    let second = conn.read_response(false).await.unwrap();
    assert_eq!(second.status, 503);
    assert_eq!(second.reason, "Nope");
    assert_eq!(second.headers, vec![("x-y".to_owned(), "z".to_owned())]);
    assert_eq!(second.body, b"rest-until-close");
    assert!(!conn.is_reusable());
}

#[tokio::test]
async fn raw_garbage_reply_is_reported() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"SSH-2.0-OpenSSH\r\n\r\n").await.unwrap();
    });
    match send_raw(addr, b"\x16\x03\x01garbage").await.unwrap() {
        RawReply::Unparseable { bytes, .. } => assert!(bytes.starts_with(b"SSH-2.0")),
        other => panic!("{other:?}"),
    }
}
