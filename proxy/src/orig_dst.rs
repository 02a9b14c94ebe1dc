// SPDX-License-Identifier: Apache-2.0
//! The original destination of a connection that iptables REDIRECTed to us (`SO_ORIGINAL_DST` for
//! IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6), as Envoy's `original_dst` listener filter reads it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    SockaddrIn, SockaddrIn6, SockaddrStorage, getsockname, getsockopt, sockopt,
};

/// The destination the peer originally connected to before netfilter NAT rewrote it.
///
/// `Ok(None)` when conntrack knows no such connection (`ENOENT`: the connection was not NATed and is
/// not tracked). Note that for a tracked but not redirected connection the kernel reports the
/// connection's own local address; telling that apart (the loop guard) is the caller's business.
/// A v4-mapped connection on an IPv6 socket is looked up in IPv4 conntrack, where it lives.
pub fn original_dst(sock: &impl AsFd) -> io::Result<Option<SocketAddr>> {
    let local: SockaddrStorage = getsockname(sock.as_fd().as_raw_fd()).map_err(io::Error::from)?;
    if local.as_sockaddr_in().is_some() {
        return v4(sock);
    }
    match local.as_sockaddr_in6() {
        Some(l6) if l6.ip().to_ipv4_mapped().is_some() => v4(sock),
        Some(_) => v6(sock),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "original_dst: not an IPv4 or IPv6 socket",
        )),
    }
}

fn v4(sock: &impl AsFd) -> io::Result<Option<SocketAddr>> {
    match getsockopt(sock, sockopt::OriginalDst) {
        Ok(raw) => Ok(Some(SocketAddr::from(SockaddrIn::from(raw)))),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn v6(sock: &impl AsFd) -> io::Result<Option<SocketAddr>> {
    match getsockopt(sock, sockopt::Ip6tOriginalDst) {
        Ok(raw) => Ok(Some(SocketAddr::from(SockaddrIn6::from(raw)))),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Outside a redirect the answer is either "unknown to conntrack" or the socket's own address —
    /// never an error and never some other address. (The redirected case needs a network namespace
    /// with iptables: `tests/tests/netns_capture.rs`.)
    #[test]
    fn unredirected_loopback_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        match original_dst(&s).unwrap() {
            None => {}
            Some(a) => assert_eq!(a, s.local_addr().unwrap()),
        }
        drop(c);
    }

    #[test]
    fn not_an_inet_socket() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = original_dst(&a).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
