// SPDX-License-Identifier: Apache-2.0
//! Fixed-rate, open-loop HTTP/1.1 load generator (wrk2-style), used by `perf/bench.py`.
//!
//! `C` keep-alive connections share a global schedule: request `i` is due at
//! `t0 + i / rate` and goes on connection `i % C`. A connection sends a request when it is due
//! and its previous response has arrived (no pipelining). Latency is corrected for coordinated
//! omission: if the connection was still busy when the request fell due, the request has been
//! queued by the system under test and its latency counts from the due time; otherwise it
//! counts from the actual send (so the 1 ms granularity of the tokio timer is not charged to the
//! proxy). Single-threaded on purpose, to keep the generator's own CPU small.
//!
//! Usage: pingsail-loadgen ADDR [--rate N] [--conns N] [--duration SECS] [--path P] [--host H]
//! Prints one JSON object on stdout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: String,
    rate: f64,
    conns: usize,
    duration: f64,
    path: String,
    host: String,
    /// Extra request header lines (`--header "name: value"`, repeatable), each ending in CRLF.
    headers: String,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        addr: String::new(),
        rate: 1000.0,
        conns: 16,
        duration: 20.0,
        path: "/".into(),
        host: "bench.local".into(),
        headers: String::new(),
    };
    while let Some(s) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{s} needs a value"));
        match s.as_str() {
            "--rate" => a.rate = val()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--conns" => a.conns = val()?.parse().map_err(|e| format!("--conns: {e}"))?,
            "--duration" => a.duration = val()?.parse().map_err(|e| format!("--duration: {e}"))?,
            "--path" => a.path = val()?,
            "--host" => a.host = val()?,
            "--header" => {
                a.headers.push_str(&val()?);
                a.headers.push_str("\r\n");
            }
            _ if a.addr.is_empty() && !s.starts_with('-') => a.addr = s,
            _ => return Err(format!("unknown argument {s}")),
        }
    }
    if a.addr.is_empty() || a.rate <= 0.0 || a.conns == 0 || a.duration <= 0.0 {
        return Err("usage: pingsail-loadgen ADDR [--rate N] [--conns N] [--duration SECS]".into());
    }
    Ok(a)
}

#[derive(Default)]
struct ConnResult {
    lat_us: Vec<u32>,
    status: BTreeMap<u16, u64>,
    errors: u64,
    corrected: u64,
}

/// Reads one HTTP/1.1 response (Content-Length or chunked body). Returns the status code.
/// `buf` keeps bytes read past the end of this response.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut tmp = [0u8; 16384];
    // Headers.
    let hdr_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(bad("eof in headers"));
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = std::str::from_utf8(&buf[..hdr_end]).map_err(|_| bad("non-utf8 head"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut clen: Option<usize> = None;
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim();
            if k.eq_ignore_ascii_case("content-length") {
                clen = v.trim().parse().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    buf.drain(..hdr_end);
    if chunked {
        loop {
            // chunk-size line
            let line_end = loop {
                if let Some(p) = find(buf, b"\r\n") {
                    break p;
                }
                let n = s.read(&mut tmp).await?;
                if n == 0 {
                    return Err(bad("eof in chunk size"));
                }
                buf.extend_from_slice(&tmp[..n]);
            };
            let sz_txt = std::str::from_utf8(&buf[..line_end]).map_err(|_| bad("chunk"))?;
            let sz = usize::from_str_radix(sz_txt.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("chunk size"))?;
            buf.drain(..line_end + 2);
            if sz == 0 {
                // trailers until empty line
                loop {
                    if let Some(p) = find(buf, b"\r\n") {
                        let empty = p == 0;
                        buf.drain(..p + 2);
                        if empty {
                            return Ok(status);
                        }
                        continue;
                    }
                    let n = s.read(&mut tmp).await?;
                    if n == 0 {
                        return Err(bad("eof in trailers"));
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
            }
            while buf.len() < sz + 2 {
                let n = s.read(&mut tmp).await?;
                if n == 0 {
                    return Err(bad("eof in chunk"));
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            buf.drain(..sz + 2);
        }
    }
    let len = clen.unwrap_or(0);
    while buf.len() < len {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(bad("eof in body"));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    buf.drain(..len);
    Ok(status)
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

async fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn run_conn(a: std::sync::Arc<Args>, idx: usize, t0: Instant, end: Instant) -> ConnResult {
    let mut r = ConnResult::default();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pingsail-loadgen\r\n{}\r\n",
        a.path, a.host, a.headers
    );
    let interval = Duration::from_secs_f64(a.conns as f64 / a.rate);
    let offset = Duration::from_secs_f64(idx as f64 / a.rate);
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(16384);
    let mut k: u32 = 0;
    let mut prev_done = t0;
    loop {
        let due = t0 + offset + interval * k;
        k += 1;
        if due >= end {
            break;
        }
        let now = Instant::now();
        if now < due {
            tokio::time::sleep_until(due.into()).await;
        }
        // Busy when due -> queued by the system under test: count from the due time.
        let busy = prev_done > due;
        if stream.is_none() {
            match connect(&a.addr).await {
                Ok(s) => {
                    stream = Some(s);
                    buf.clear();
                }
                Err(_) => {
                    r.errors += 1;
                    prev_done = Instant::now();
                    continue;
                }
            }
        }
        let sent = Instant::now();
        let start = if busy {
            r.corrected += 1;
            due
        } else {
            sent
        };
        let Some(s) = stream.as_mut() else { continue };
        let res = async {
            s.write_all(req.as_bytes()).await?;
            read_response(s, &mut buf).await
        }
        .await;
        let done = Instant::now();
        prev_done = done;
        match res {
            Ok(code) => {
                *r.status.entry(code).or_default() += 1;
                r.lat_us.push(done.duration_since(start).as_micros().min(u32::MAX as u128) as u32);
            }
            Err(_) => {
                r.errors += 1;
                stream = None;
            }
        }
    }
    r
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = match parse_args() {
        Ok(a) => std::sync::Arc::new(a),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let t0 = Instant::now() + Duration::from_millis(50);
    let end = t0 + Duration::from_secs_f64(a.duration);
    let mut handles = Vec::new();
    for i in 0..a.conns {
        handles.push(tokio::spawn(run_conn(a.clone(), i, t0, end)));
    }
    let mut all = ConnResult::default();
    for h in handles {
        if let Ok(r) = h.await {
            all.lat_us.extend(r.lat_us);
            all.errors += r.errors;
            all.corrected += r.corrected;
            for (k, v) in r.status {
                *all.status.entry(k).or_default() += v;
            }
        } else {
            all.errors += 1;
        }
    }
    let elapsed = Instant::now().duration_since(t0).as_secs_f64();
    all.lat_us.sort_unstable();
    let n = all.lat_us.len();
    let non2xx: u64 = all.status.iter().filter(|(k, _)| !(200..300).contains(*k)).map(|(_, v)| v).sum();
    let status: Vec<String> = all.status.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    println!(
        "{{\"requests\":{n},\"elapsed_s\":{elapsed:.3},\"rps\":{:.1},\"target_rps\":{},\"errors\":{},\"non2xx\":{non2xx},\"corrected\":{},\"status\":{{{}}},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
        n as f64 / elapsed,
        a.rate,
        all.errors,
        all.corrected,
        status.join(","),
        pct(&all.lat_us, 50.0),
        pct(&all.lat_us, 90.0),
        pct(&all.lat_us, 99.0),
        pct(&all.lat_us, 99.9),
        all.lat_us.last().copied().unwrap_or(0),
    );
}
