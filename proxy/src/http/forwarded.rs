// SPDX-License-Identifier: Apache-2.0
//! What the HTTP connection manager does to `x-forwarded-for`, `x-forwarded-proto`,
//! `x-envoy-external-address` and the other `x-envoy-*` request headers before routing
//! (Envoy's `ConnectionManagerUtility::mutateRequestHeaders`).
//!
//! pingsail has no `internal_address_config`, and Envoy 1.40 treats no address as internal by
//! default, so every request is external: `x-envoy-internal` is always removed, and with
//! `use_remote_address` the request is an edge request.

use http::{HeaderMap, HeaderName};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

/// Client-settable headers Envoy removes from every external request.
const EXTERNAL_STRIPPED: [&str; 15] = [
    "x-envoy-internal",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
    "x-envoy-hedge-on-per-try-timeout",
];

/// Additionally removed from edge requests (`use_remote_address`).
const EDGE_STRIPPED: [&str; 3] = [
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
];

/// The changes to make to a request's headers.
#[derive(Debug, PartialEq, Eq)]
pub struct Mutation {
    /// New `x-forwarded-for` value, if it changes.
    pub xff: Option<String>,
    /// Set `x-forwarded-proto` to the connection's scheme.
    pub set_xfp: bool,
    /// New `x-envoy-external-address`, if any.
    pub external_address: Option<IpAddr>,
    /// Remove the edge-only headers too.
    pub edge: bool,
}

/// Decides the header changes for a request from `remote` (the downstream peer).
pub fn mutation(
    headers: &HeaderMap,
    remote: IpAddr,
    use_remote_address: bool,
    trusted_hops: u32,
) -> Mutation {
    let xff = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let has_xfp = headers.contains_key("x-forwarded-proto");
    if !use_remote_address {
        return Mutation {
            xff: None,
            set_xfp: !has_xfp,
            external_address: None,
            edge: false,
        };
    }
    let trusted = match trusted_hops {
        0 => None,
        n => xff.and_then(|v| last_xff_address(v, n - 1)),
    };
    // Envoy appends the machine's own address for a loopback peer.
    let appended = if remote.is_loopback() {
        local_address()
    } else {
        remote
    };
    let new_xff = match xff {
        Some(prev) if !prev.is_empty() => format!("{prev},{appended}"),
        _ => appended.to_string(),
    };
    Mutation {
        xff: Some(new_xff),
        set_xfp: trusted_hops == 0 || !has_xfp,
        external_address: Some(trusted.unwrap_or(remote)),
        edge: true,
    }
}

/// The client address the connection manager settles on (Envoy's final remote address), read
/// from the request headers after [`mutation`] was applied: the peer with `use_remote_address`
/// (or the trusted XFF entry with `xff_num_trusted_hops`), else the XFF entry `trusted_hops` from
/// the right, else the peer.
pub fn final_remote(
    headers: &HeaderMap,
    remote: IpAddr,
    use_remote_address: bool,
    trusted_hops: u32,
) -> IpAddr {
    let xff = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    match (use_remote_address, trusted_hops) {
        (true, 0) => remote,
        // The mutation appended one entry: skip it as well.
        (true, n) => xff.and_then(|v| last_xff_address(v, n)).unwrap_or(remote),
        (false, n) => xff.and_then(|v| last_xff_address(v, n)).unwrap_or(remote),
    }
}

/// Removes the client-settable `x-envoy-*` headers of an external request (plus the edge-only
/// ones for an edge request) through `remove` (the proxy's header type is not a `HeaderMap`).
pub fn strip_internal(edge: bool, mut remove: impl FnMut(&HeaderName)) {
    for name in EXTERNAL_STRIPPED {
        remove(&HeaderName::from_static(name));
    }
    if edge {
        for name in EDGE_STRIPPED {
            remove(&HeaderName::from_static(name));
        }
    }
}

/// The address `skip` entries from the right of an `x-forwarded-for` list, if it parses.
fn last_xff_address(xff: &str, skip: u32) -> Option<IpAddr> {
    xff.rsplit(',')
        .nth(skip as usize)
        .and_then(|a| a.trim().parse().ok())
}

/// The machine's first non-loopback IPv4 address (Envoy's `Utility::getLocalAddress`),
/// found once via the route to a public address (no packet is sent); loopback if none.
pub fn local_address() -> IpAddr {
    static ADDR: OnceLock<IpAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .and_then(|s| {
                // connect() on UDP only asks the kernel for a route; no packet is sent. The target is
                // TEST-NET-1 (RFC 5737), so the default route's source address is what we learn.
                s.connect((Ipv4Addr::new(192, 0, 2, 1), 9))?;
                s.local_addr()
            })
            .map(|a| a.ip())
            .ok()
            .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn without_remote_address_only_adds_missing_xfp() {
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        let m = mutation(
            &headers(&[("x-forwarded-for", "1.2.3.4")]),
            remote,
            false,
            0,
        );
        assert_eq!(
            m,
            Mutation {
                xff: None,
                set_xfp: true,
                external_address: None,
                edge: false
            }
        );
        let m = mutation(
            &headers(&[("x-forwarded-proto", "https")]),
            remote,
            false,
            0,
        );
        assert!(!m.set_xfp);
    }

    #[test]
    fn edge_request_appends_and_sets_external_address() {
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        let h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        let m = mutation(&h, remote, true, 0);
        assert_eq!(m.xff.as_deref(), Some("1.2.3.4,10.1.2.3"));
        assert!(m.set_xfp);
        assert_eq!(m.external_address, Some(remote));
        assert!(m.edge);
    }

    #[test]
    fn trusted_hops_pick_the_client_from_xff() {
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        let h = headers(&[
            ("x-forwarded-for", "1.2.3.4, 5.6.7.8"),
            ("x-forwarded-proto", "https"),
        ]);
        let m = mutation(&h, remote, true, 1);
        assert_eq!(m.external_address, Some("5.6.7.8".parse().unwrap()));
        assert!(!m.set_xfp);
        let m = mutation(&h, remote, true, 2);
        assert_eq!(m.external_address, Some("1.2.3.4".parse().unwrap()));
        // Not enough entries: the peer address.
        let m = mutation(&h, remote, true, 3);
        assert_eq!(m.external_address, Some(remote));
    }

    #[test]
    fn loopback_peer_appends_the_local_address() {
        let m = mutation(&HeaderMap::new(), IpAddr::V4(Ipv4Addr::LOCALHOST), true, 0);
        assert_eq!(m.xff, Some(local_address().to_string()));
        assert_eq!(m.external_address, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
