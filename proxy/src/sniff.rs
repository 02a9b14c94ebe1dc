// SPDX-License-Identifier: Apache-2.0
//! Listener filters as Envoy runs them before filter-chain selection: `tls_inspector` (transport
//! `tls`, SNI and ALPN from the ClientHello) and `http_inspector` (`http/1.0`, `http/1.1`, `h2c`),
//! each on peeked bytes, never consuming them.

/// What the inspectors learned about a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspected {
    /// a TLS ClientHello was seen (transport protocol `tls`, else `raw_buffer`)
    pub tls: bool,
    /// the ClientHello's server name
    pub server_name: Option<String>,
    /// application protocols: the ClientHello's ALPN list, or what `http_inspector` detected
    pub alpn: Vec<String>,
}

/// The outcome of looking at the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Look<T> {
    /// more bytes are needed
    More,
    /// done
    Done(T),
}

/// A parsed ClientHello: SNI and ALPN.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// `server_name` extension (host_name)
    pub server_name: Option<String>,
    /// `application_layer_protocol_negotiation` extension
    pub alpn: Vec<String>,
}

/// Largest ClientHello we wait for (Envoy's tls_inspector reads up to 64 KiB).
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (x, rest) = self.b.split_first()?;
        self.b = rest;
        Some(*x)
    }
    fn u16(&mut self) -> Option<u16> {
        let s = self.take(2)?;
        Some(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        let s = self.take(3)?;
        Some(((s[0] as usize) << 16) | ((s[1] as usize) << 8) | s[2] as usize)
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Some(a)
    }
}

/// Looks for a TLS ClientHello at the start of `buf`. `Done(None)`: not TLS (or not a ClientHello).
pub fn client_hello(buf: &[u8]) -> Look<Option<ClientHello>> {
    if buf.is_empty() {
        return Look::More;
    }
    // TLS record: type 22 (handshake), version 3.x.
    if buf[0] != 0x16 {
        return Look::Done(None);
    }
    if buf.len() >= 2 && buf[1] != 0x03 {
        return Look::Done(None);
    }
    // The handshake may span several records; gather the handshake bytes.
    let mut hs = Vec::new();
    let mut rest = buf;
    let mut need: Option<usize> = None;
    loop {
        if rest.len() < 5 {
            return if rest.is_empty() && need.is_some_and(|n| hs.len() >= n) {
                Look::Done(parse_hello(&hs))
            } else {
                Look::More
            };
        }
        if rest[0] != 0x16 {
            return Look::Done(None);
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if rest.len() < 5 + len {
            // Partial record: what we have may already hold the whole hello.
            hs.extend_from_slice(&rest[5..]);
            if let Some(n) = handshake_len(&hs)
                && hs.len() >= n
            {
                return Look::Done(parse_hello(&hs));
            }
            return if buf.len() >= MAX_CLIENT_HELLO {
                Look::Done(None)
            } else {
                Look::More
            };
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        need = handshake_len(&hs);
        if let Some(n) = need
            && hs.len() >= n
        {
            return Look::Done(parse_hello(&hs));
        }
    }
}

fn handshake_len(hs: &[u8]) -> Option<usize> {
    if hs.len() < 4 {
        return None;
    }
    Some(4 + (((hs[1] as usize) << 16) | ((hs[2] as usize) << 8) | hs[3] as usize))
}

fn parse_hello(hs: &[u8]) -> Option<ClientHello> {
    let mut r = Reader { b: hs };
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let mut r = Reader { b: r.take(len)? };
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let sid = r.u8()? as usize;
    r.take(sid)?;
    let suites = r.u16()? as usize;
    r.take(suites)?;
    let comp = r.u8()? as usize;
    r.take(comp)?;
    let mut hello = ClientHello::default();
    if r.b.is_empty() {
        return Some(hello);
    }
    let ext_len = r.u16()? as usize;
    let mut ext = Reader {
        b: r.take(ext_len)?,
    };
    while !ext.b.is_empty() {
        let kind = ext.u16()?;
        let n = ext.u16()? as usize;
        let mut body = Reader { b: ext.take(n)? };
        match kind {
            0 => {
                let list = body.u16()? as usize;
                let mut l = Reader {
                    b: body.take(list)?,
                };
                while !l.b.is_empty() {
                    let t = l.u8()?;
                    let n = l.u16()? as usize;
                    let name = l.take(n)?;
                    if t == 0 && hello.server_name.is_none() {
                        hello.server_name = std::str::from_utf8(name)
                            .ok()
                            .map(|s| s.to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let list = body.u16()? as usize;
                let mut l = Reader {
                    b: body.take(list)?,
                };
                while !l.b.is_empty() {
                    let n = l.u8()? as usize;
                    let p = l.take(n)?;
                    hello.alpn.push(String::from_utf8_lossy(p).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Envoy's http_inspector: `h2c` for the HTTP/2 preface, `http/1.0` / `http/1.1` from a request line,
/// `Done(None)` when it is not HTTP.
pub fn http_protocol(buf: &[u8]) -> Look<Option<&'static str>> {
    if buf.is_empty() {
        return Look::More;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Look::Done(Some("h2c"))
        } else {
            Look::More
        };
    }
    // method SP target SP HTTP/1.x CRLF
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() {
        return if method_len < 16 {
            Look::More
        } else {
            Look::Done(None)
        };
    }
    if method_len == 0 || buf[method_len] != b' ' {
        return Look::Done(None);
    }
    let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
        // Envoy gives up on a request line longer than its buffer (8 KiB).
        return if buf.len() > 8 * 1024 {
            Look::Done(None)
        } else {
            Look::More
        };
    };
    let line = buf[..eol].strip_suffix(b"\r").unwrap_or(&buf[..eol]);
    if line.ends_with(b" HTTP/1.1") {
        Look::Done(Some("http/1.1"))
    } else if line.ends_with(b" HTTP/1.0") {
        Look::Done(Some("http/1.0"))
    } else {
        Look::Done(None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A ClientHello as rustls or OpenSSL would send it, built by hand: SNI + ALPN.
    fn hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut ext = Vec::new();
        // server_name
        let mut sn = vec![0u8];
        sn.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        sn.extend_from_slice(sni.as_bytes());
        ext.extend_from_slice(&0u16.to_be_bytes());
        ext.extend_from_slice(&((sn.len() + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(sn.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sn);
        // alpn
        let mut al = Vec::new();
        for p in alpn {
            al.push(p.len() as u8);
            al.extend_from_slice(p.as_bytes());
        }
        ext.extend_from_slice(&16u16.to_be_bytes());
        ext.extend_from_slice(&((al.len() + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(al.len() as u16).to_be_bytes());
        ext.extend_from_slice(&al);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn client_hello_sni_and_alpn() {
        let h = hello(
            "Outbound_.9080_._.Reviews.default.svc.cluster.local",
            &["istio-http/1.1", "istio", "http/1.1"],
        );
        let Look::Done(Some(ch)) = client_hello(&h) else {
            panic!("not parsed");
        };
        assert_eq!(
            ch.server_name.as_deref(),
            Some("outbound_.9080_._.reviews.default.svc.cluster.local")
        );
        assert_eq!(ch.alpn, vec!["istio-http/1.1", "istio", "http/1.1"]);
        // Every prefix asks for more; nothing panics.
        for n in 0..h.len() {
            assert_eq!(client_hello(&h[..n]), Look::More, "prefix {n}");
        }
        // Split over two records.
        let hs = &h[5..];
        let (a, b) = hs.split_at(40);
        let mut two = vec![0x16, 3, 1];
        two.extend_from_slice(&(a.len() as u16).to_be_bytes());
        two.extend_from_slice(a);
        two.extend_from_slice(&[0x16, 3, 1]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(client_hello(&two), Look::Done(Some(ch)));
    }

    #[test]
    fn not_tls() {
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Look::Done(None));
        assert_eq!(client_hello(&[0x16, 0x01]), Look::Done(None));
        // garbage inside a handshake record is not a hello, and does not panic
        let mut g = vec![0x16, 3, 1, 0, 8];
        g.extend_from_slice(&[1, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(client_hello(&g), Look::Done(None));
    }

    #[test]
    fn http_versions() {
        assert_eq!(
            http_protocol(b"GET / HTTP/1.1\r\n"),
            Look::Done(Some("http/1.1"))
        );
        assert_eq!(
            http_protocol(b"GET / HTTP/1.0\r\nHost"),
            Look::Done(Some("http/1.0"))
        );
        assert_eq!(http_protocol(b"GET / HTTP/1.1"), Look::More);
        assert_eq!(http_protocol(b"GE"), Look::More);
        assert_eq!(
            http_protocol(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Look::Done(Some("h2c"))
        );
        assert_eq!(http_protocol(b"\x00\x00binary"), Look::Done(None));
        assert_eq!(http_protocol(b"GET / SPDY/3\r\n"), Look::Done(None));
    }
}
