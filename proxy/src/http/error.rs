// SPDX-License-Identifier: Apache-2.0
//! Every way a request can fail locally, with its status, body and Envoy response flag — in one place.

/// A local failure (Envoy's local replies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No virtual host or route matched.
    NoRoute,
    /// The route names a cluster that does not exist.
    ClusterNotFound,
    /// The cluster has no usable endpoint.
    NoHealthyUpstream,
    /// TCP connect unreachable / failed.
    ConnectFailure,
    /// TCP connect refused (RST): like [`Failure::ConnectFailure`] with the socket error in the
    /// details.
    ConnectRefused,
    /// TCP connect timed out.
    ConnectTimeout,
    /// The upstream closed or reset before sending response headers.
    ConnectionTermination,
    /// The route timeout expired.
    UpstreamTimeout,
    /// `max_stream_duration` expired.
    StreamDuration,
    /// The upstream sent something that is not valid HTTP.
    UpstreamProtocolError,
    /// Request headers over `max_request_headers_kb` or too many headers.
    HeadersTooLarge,
    /// A request the HTTP/1 codec rejects (answered with the status text).
    BadRequest,
    /// Path normalisation failed or `path_with_escaped_slashes_action: REJECT_REQUEST`.
    InvalidPath,
    /// A `#fragment` in the request target.
    InvalidUrl,
    /// An HTTP/1.1 request without `host`.
    MissingHost,
    /// HTTP/1.0 without `accept_http_10`.
    UpgradeRequired,
    /// An `upgrade` request (websocket) the connection manager or route does not allow.
    UpgradeFailed,
    /// The stream idle timeout expired.
    StreamIdleTimeout,
    /// The HCM `request_timeout` expired before the whole request arrived.
    RequestTimeout,
    /// The stream idle timeout expired while waiting for the upstream (request complete): 504.
    StreamIdleTimeoutUpstream,
    /// An RBAC filter denied the request.
    RbacDenied,
    /// jwt_authn refused the request (its reply is written by the filter: status and body vary).
    JwtDenied,
    /// ext_authz denied the request or the authorization service failed (reply written by the
    /// filter).
    ExtAuthzDenied,
    /// The fault filter aborted the request (status from the fault config; 503 here is only the
    /// fallback).
    FaultAbort,
    /// A circuit breaker (max_requests / max_pending_requests / max_connections) overflowed.
    Overflow,
}

impl Failure {
    /// HTTP status of the local reply.
    pub fn status(self) -> u16 {
        match self {
            Failure::NoRoute => 404,
            Failure::ClusterNotFound
            | Failure::NoHealthyUpstream
            | Failure::FaultAbort
            | Failure::Overflow
            | Failure::ConnectFailure
            | Failure::ConnectRefused
            | Failure::ConnectTimeout
            | Failure::ConnectionTermination => 503,
            Failure::UpstreamTimeout | Failure::StreamDuration => 504,
            Failure::UpstreamProtocolError => 502,
            Failure::HeadersTooLarge => 431,
            Failure::BadRequest
            | Failure::InvalidPath
            | Failure::InvalidUrl
            | Failure::MissingHost => 400,
            Failure::UpgradeRequired => 426,
            Failure::UpgradeFailed => 403,
            Failure::StreamIdleTimeout | Failure::RequestTimeout => 408,
            Failure::StreamIdleTimeoutUpstream => 504,
            Failure::RbacDenied => 403,
            Failure::JwtDenied => 401,
            Failure::ExtAuthzDenied => 403,
        }
    }

    /// Body of the local reply, as Envoy 1.40 writes it.
    pub fn body(self) -> &'static str {
        match self {
            Failure::NoRoute
            | Failure::ClusterNotFound
            | Failure::InvalidPath
            | Failure::InvalidUrl
            | Failure::MissingHost => "",
            Failure::NoHealthyUpstream => "no healthy upstream",
            Failure::ConnectFailure | Failure::ConnectRefused => {
                "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
            }
            Failure::ConnectTimeout => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection timeout"
            }
            Failure::ConnectionTermination => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
            }
            Failure::UpstreamTimeout => "upstream request timeout",
            Failure::StreamDuration => "downstream duration timeout",
            Failure::UpstreamProtocolError => {
                "upstream connect error or disconnect/reset before headers. reset reason: protocol error"
            }
            Failure::HeadersTooLarge => "Request Header Fields Too Large",
            Failure::BadRequest => "Bad Request",
            Failure::UpgradeRequired => "Upgrade Required",
            Failure::UpgradeFailed => "",
            Failure::StreamIdleTimeout | Failure::StreamIdleTimeoutUpstream => "stream timeout",
            Failure::RequestTimeout => "request timeout",
            Failure::RbacDenied => "RBAC: access denied",
            Failure::JwtDenied => "Jwt verification fails",
            Failure::ExtAuthzDenied => "",
            Failure::FaultAbort => "fault filter abort",
            Failure::Overflow => {
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            }
        }
    }

    /// Body of the reply when the request was retried before this failure (Envoy words reset
    /// replies differently then).
    pub fn body_after_retries(self) -> &'static str {
        match self {
            Failure::ConnectFailure | Failure::ConnectRefused => {
                "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: remote connection failure"
            }
            Failure::ConnectTimeout => {
                "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: connection timeout"
            }
            Failure::ConnectionTermination => {
                "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: connection termination"
            }
            Failure::UpstreamProtocolError => {
                "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: protocol error"
            }
            Failure::Overflow => {
                "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: overflow"
            }
            other => other.body(),
        }
    }

    /// The gRPC status of the reply to a gRPC request when Envoy sets one explicitly (otherwise
    /// it is derived from the HTTP status).
    pub fn grpc_status(self) -> Option<u32> {
        match self {
            Failure::StreamDuration => Some(4),
            _ => None,
        }
    }

    /// The router (not the connection manager) answers this failure: its replies carry
    /// `x-envoy-attempt-count` when the virtual host asks for it.
    pub fn from_router(self) -> bool {
        matches!(
            self,
            Failure::NoHealthyUpstream
                | Failure::ConnectFailure
                | Failure::ConnectRefused
                | Failure::ConnectTimeout
                | Failure::ConnectionTermination
                | Failure::UpstreamTimeout
                | Failure::UpstreamProtocolError
                | Failure::Overflow
        )
    }

    /// Envoy's short response flag.
    pub fn flag(self) -> &'static str {
        match self {
            Failure::NoRoute => "NR",
            Failure::ClusterNotFound => "NC",
            Failure::NoHealthyUpstream => "UH",
            Failure::ConnectFailure | Failure::ConnectRefused | Failure::ConnectTimeout => "UF",
            Failure::ConnectionTermination => "UC",
            Failure::UpstreamTimeout => "UT",
            Failure::StreamDuration => "UMSDR",
            Failure::UpstreamProtocolError => "UPE",
            Failure::HeadersTooLarge
            | Failure::BadRequest
            | Failure::InvalidUrl
            | Failure::MissingHost
            | Failure::UpgradeRequired => "DPE",
            Failure::UpgradeFailed => "-",
            Failure::InvalidPath => "-",
            Failure::StreamIdleTimeout | Failure::StreamIdleTimeoutUpstream => "SI",
            Failure::RequestTimeout => "DT",
            Failure::RbacDenied | Failure::JwtDenied => "-",
            Failure::ExtAuthzDenied => "UAEX",
            Failure::FaultAbort => "FI",
            Failure::Overflow => "UO",
        }
    }

    /// `%RESPONSE_CODE_DETAILS%`
    pub fn details(self) -> &'static str {
        match self {
            Failure::NoRoute => "route_not_found",
            Failure::ClusterNotFound => "cluster_not_found",
            Failure::NoHealthyUpstream => "no_healthy_upstream",
            Failure::ConnectFailure | Failure::ConnectTimeout => {
                "upstream_reset_before_response_started{remote_connection_failure}"
            }
            Failure::ConnectRefused => {
                "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}"
            }
            Failure::ConnectionTermination => {
                "upstream_reset_before_response_started{connection_termination}"
            }
            Failure::UpstreamTimeout => "response_timeout",
            Failure::StreamDuration => "max_duration_timeout",
            Failure::UpstreamProtocolError => {
                "upstream_reset_before_response_started{protocol_error}"
            }
            Failure::HeadersTooLarge => "http1.headers_too_large",
            Failure::BadRequest => "http1.codec_error",
            Failure::InvalidPath => "path_normalization_failed",
            Failure::InvalidUrl => "http1.invalid_url",
            Failure::MissingHost => "missing_host_header",
            Failure::UpgradeRequired => "low_version",
            Failure::UpgradeFailed => "upgrade_failed",
            Failure::StreamIdleTimeout | Failure::StreamIdleTimeoutUpstream => {
                "stream_idle_timeout"
            }
            Failure::RequestTimeout => "request_overall_timeout",
            // Envoy names the matched policy: rbac_access_denied_matched_policy[<id>].
            Failure::RbacDenied => "rbac_access_denied_matched_policy",
            Failure::JwtDenied => "jwt_authn_access_denied",
            Failure::ExtAuthzDenied => "ext_authz_denied",
            Failure::FaultAbort => "fault_filter_abort",
            Failure::Overflow => "upstream_reset_before_response_started{overflow}",
        }
    }

    /// Envoy closes the downstream connection after these replies (`connection: close`).
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            Failure::HeadersTooLarge
                | Failure::BadRequest
                | Failure::InvalidPath
                | Failure::InvalidUrl
                | Failure::MissingHost
                | Failure::UpgradeRequired
        )
    }

    /// Classifies a Pingora error from the upstream side.
    pub fn from_pingora(e: &pingora_error::Error) -> Failure {
        use pingora_error::ErrorType as E;
        match e.etype() {
            E::ConnectTimedout => Failure::ConnectTimeout,
            E::ConnectRefused => Failure::ConnectRefused,
            E::ConnectNoRoute | E::ConnectError | E::BindError | E::SocketError => {
                Failure::ConnectFailure
            }
            E::ReadTimedout | E::WriteTimedout => Failure::UpstreamTimeout,
            E::InvalidHTTPHeader | E::H1Error | E::H2Error | E::InvalidH2 => {
                Failure::UpstreamProtocolError
            }
            _ => Failure::ConnectionTermination,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESET_PREFIX: &str =
        "upstream connect error or disconnect/reset before headers. reset reason: ";

    #[test]
    fn reset_bodies() {
        for (f, reason) in [
            (Failure::ConnectFailure, "remote connection failure"),
            (Failure::ConnectTimeout, "connection timeout"),
            (Failure::ConnectionTermination, "connection termination"),
            (Failure::UpstreamProtocolError, "protocol error"),
        ] {
            assert_eq!(f.body(), format!("{RESET_PREFIX}{reason}"));
        }
    }
}
