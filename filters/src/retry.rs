// SPDX-License-Identifier: Apache-2.0
//! Retry policy (`envoy.config.route.v3.RetryPolicy`) decisions.

use std::time::Duration;

/// Conditions in `retry_on` (the HTTP and gRPC ones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn(u32);

impl RetryOn {
    /// `5xx`
    pub const FIVE_XX: RetryOn = RetryOn(1);
    /// `gateway-error`
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    /// `reset`
    pub const RESET: RetryOn = RetryOn(1 << 2);
    /// `connect-failure`
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 3);
    /// `retriable-4xx`
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 4);
    /// `refused-stream`
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 5);
    /// `retriable-status-codes`
    pub const RETRIABLE_STATUS_CODES: RetryOn = RetryOn(1 << 6);
    /// `reset-before-request`
    pub const RESET_BEFORE_REQUEST: RetryOn = RetryOn(1 << 7);
    /// `envoy-ratelimited`
    pub const ENVOY_RATELIMITED: RetryOn = RetryOn(1 << 8);
    /// `retriable-headers`
    pub const RETRIABLE_HEADERS: RetryOn = RetryOn(1 << 9);
    /// `http3-post-connect-failure`
    pub const HTTP3_POST_CONNECT_FAILURE: RetryOn = RetryOn(1 << 10);
    /// gRPC `cancelled`
    pub const CANCELLED: RetryOn = RetryOn(1 << 11);
    /// gRPC `deadline-exceeded`
    pub const DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 12);
    /// gRPC `internal`
    pub const INTERNAL: RetryOn = RetryOn(1 << 13);
    /// gRPC `resource-exhausted`
    pub const RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 14);
    /// gRPC `unavailable`
    pub const UNAVAILABLE: RetryOn = RetryOn(1 << 15);

    /// Parses Envoy's comma-separated list; returns the unknown token on error.
    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let mut v = 0;
        for tok in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            v |= match tok {
                "5xx" => Self::FIVE_XX.0,
                "gateway-error" => Self::GATEWAY_ERROR.0,
                "reset" => Self::RESET.0,
                "connect-failure" => Self::CONNECT_FAILURE.0,
                "retriable-4xx" => Self::RETRIABLE_4XX.0,
                "refused-stream" => Self::REFUSED_STREAM.0,
                "retriable-status-codes" => Self::RETRIABLE_STATUS_CODES.0,
                "reset-before-request" => Self::RESET_BEFORE_REQUEST.0,
                "envoy-ratelimited" => Self::ENVOY_RATELIMITED.0,
                "retriable-headers" => Self::RETRIABLE_HEADERS.0,
                "http3-post-connect-failure" => Self::HTTP3_POST_CONNECT_FAILURE.0,
                "cancelled" => Self::CANCELLED.0,
                "deadline-exceeded" => Self::DEADLINE_EXCEEDED.0,
                "internal" => Self::INTERNAL.0,
                "resource-exhausted" => Self::RESOURCE_EXHAUSTED.0,
                "unavailable" => Self::UNAVAILABLE.0,
                other => return Err(other.to_string()),
            };
        }
        Ok(RetryOn(v))
    }

    /// Is every condition of `other` set?
    pub fn contains(self, other: RetryOn) -> bool {
        self.0 & other.0 == other.0
    }
}

/// A validated retry policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// `retry_on`
    pub on: RetryOn,
    /// `num_retries` (default 1)
    pub num_retries: u32,
    /// `retriable_status_codes`
    pub retriable_status_codes: Vec<u16>,
    /// `retry_host_predicate: previous_hosts`
    pub previous_hosts: bool,
    /// `host_selection_retry_max_attempts`
    pub host_selection_max_attempts: u32,
    /// `retry_back_off.base_interval` (default 25 ms)
    pub backoff_base: Duration,
    /// `retry_back_off.max_interval` (default 10 × base)
    pub backoff_max: Duration,
    /// `per_try_timeout`
    pub per_try_timeout: Option<Duration>,
    /// `per_try_idle_timeout`
    pub per_try_idle_timeout: Option<Duration>,
    /// `retriable_headers`: a response matching any of them is retriable (`retriable-headers`).
    pub retriable_headers: Vec<crate::matcher::HeaderMatcher>,
    /// `retriable_request_headers`: only requests matching one of them are retried.
    pub retriable_request_headers: Vec<crate::matcher::HeaderMatcher>,
    /// `rate_limited_retry_back_off`
    pub rate_limited: Option<RateLimitedBackOff>,
}

/// How a reset header gives the back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetFormat {
    /// seconds to wait
    Seconds,
    /// the Unix time to wait until
    UnixTimestamp,
}

/// `rate_limited_retry_back_off`: a retriable response may say how long to back off.
#[derive(Debug, Clone)]
pub struct RateLimitedBackOff {
    /// `reset_headers`, in order
    pub reset_headers: Vec<(http::HeaderName, ResetFormat)>,
    /// `max_interval` (default 300 s): a longer reset interval is ignored
    pub max_interval: Duration,
}

impl RateLimitedBackOff {
    /// The first reset header that parses to an interval no longer than `max_interval`.
    pub fn interval(
        &self,
        headers: &http::HeaderMap,
        now: std::time::SystemTime,
    ) -> Option<Duration> {
        for (name, format) in &self.reset_headers {
            let Some(n) = headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
            else {
                continue;
            };
            let d = match format {
                ResetFormat::Seconds => Some(Duration::from_secs(n)),
                ResetFormat::UnixTimestamp => (std::time::UNIX_EPOCH + Duration::from_secs(n))
                    .duration_since(now)
                    .ok(),
            };
            if let Some(d) = d.filter(|d| *d <= self.max_interval) {
                return Some(d);
            }
        }
        None
    }

    /// The back-off for a reset interval: jittered in `[interval, 1.5 × interval)`.
    pub fn backoff(interval: Duration, random: u64) -> Duration {
        let min = interval.as_millis() as u64;
        let spread = (min / 2).max(1);
        Duration::from_millis(min + random % spread)
    }
}

/// How an attempt ended, as far as retry decisions care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// TCP connect failed or timed out.
    ConnectFailure,
    /// The upstream reset/closed before a response.
    Reset,
    /// HTTP/2 REFUSED_STREAM.
    RefusedStream,
    /// The per-try (or per-try idle) timeout expired.
    PerTryTimeout,
    /// A response with this status and optional gRPC status.
    Response {
        /// HTTP status
        status: u16,
        /// `grpc-status` header, when present
        grpc_status: Option<u32>,
    },
}

impl RetryPolicy {
    /// Should an attempt that ended with `outcome` be retried (ignoring the attempt budget)?
    pub fn retriable(&self, outcome: Outcome) -> bool {
        let on = self.on;
        match outcome {
            Outcome::ConnectFailure => {
                on.contains(RetryOn::CONNECT_FAILURE)
                    || on.contains(RetryOn::FIVE_XX)
                    || on.contains(RetryOn::GATEWAY_ERROR)
                    || on.contains(RetryOn::RESET)
                    || on.contains(RetryOn::RESET_BEFORE_REQUEST)
            }
            Outcome::Reset => {
                on.contains(RetryOn::RESET)
                    || on.contains(RetryOn::FIVE_XX)
                    || on.contains(RetryOn::GATEWAY_ERROR)
            }
            Outcome::RefusedStream => {
                on.contains(RetryOn::REFUSED_STREAM) || on.contains(RetryOn::RESET)
            }
            Outcome::PerTryTimeout => {
                on.contains(RetryOn::FIVE_XX)
                    || on.contains(RetryOn::GATEWAY_ERROR)
                    || on.contains(RetryOn::RESET)
            }
            Outcome::Response {
                status,
                grpc_status,
            } => {
                (on.contains(RetryOn::FIVE_XX) && status >= 500)
                    || (on.contains(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504))
                    || (on.contains(RetryOn::RETRIABLE_4XX) && status == 409)
                    || (on.contains(RetryOn::RETRIABLE_STATUS_CODES)
                        && self.retriable_status_codes.contains(&status))
                    || grpc_status.is_some_and(|g| {
                        (on.contains(RetryOn::CANCELLED) && g == 1)
                            || (on.contains(RetryOn::DEADLINE_EXCEEDED) && g == 4)
                            || (on.contains(RetryOn::RESOURCE_EXHAUSTED) && g == 8)
                            || (on.contains(RetryOn::INTERNAL) && g == 13)
                            || (on.contains(RetryOn::UNAVAILABLE) && g == 14)
                    })
            }
        }
    }

    /// `retriable-headers`: does the response match one of `retriable_headers`?
    pub fn retriable_response_headers(&self, resp: &impl crate::matcher::HeaderSource) -> bool {
        self.on.contains(RetryOn::RETRIABLE_HEADERS)
            && self.retriable_headers.iter().any(|m| m.matches(resp))
    }

    /// `retriable_request_headers`: may this request be retried at all?
    pub fn request_retriable(&self, req: &impl crate::matcher::HeaderSource) -> bool {
        self.retriable_request_headers.is_empty()
            || self
                .retriable_request_headers
                .iter()
                .any(|m| m.matches(req))
    }

    /// Fully jittered exponential back-off before retry number `retry` (1-based), as Envoy's
    /// `JitteredExponentialBackOffStrategy`: uniform in `[0, min(base * 2^(retry-1), max))`.
    pub fn backoff(&self, retry: u32, random: u64) -> Duration {
        let base = self.backoff_base.as_millis() as u64;
        let max = self.backoff_max.as_millis() as u64;
        let ceiling = base
            .saturating_mul(1u64 << retry.saturating_sub(1).min(30))
            .min(max)
            .max(1);
        Duration::from_millis(random % ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_default_policy() {
        let p = RetryPolicy {
            on: RetryOn::parse(
                "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            )
            .unwrap(),
            num_retries: 2,
            retriable_status_codes: vec![503],
            previous_hosts: true,
            host_selection_max_attempts: 5,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            per_try_timeout: None,
            per_try_idle_timeout: None,
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
            rate_limited: None,
        };
        assert!(p.retriable(Outcome::ConnectFailure));
        assert!(p.retriable(Outcome::Response {
            status: 503,
            grpc_status: None
        }));
        assert!(!p.retriable(Outcome::Response {
            status: 500,
            grpc_status: None
        }));
        assert!(!p.retriable(Outcome::Reset));
        assert!(p.retriable(Outcome::Response {
            status: 200,
            grpc_status: Some(14)
        }));
        assert!(p.backoff(1, 1000) < Duration::from_millis(25));
        assert!(RetryOn::parse("5xx,bogus").is_err());
    }

    #[test]
    fn rate_limited_reset_headers() {
        let rl = RateLimitedBackOff {
            reset_headers: vec![
                (
                    http::HeaderName::from_static("retry-after"),
                    ResetFormat::Seconds,
                ),
                (
                    http::HeaderName::from_static("x-ratelimit-reset"),
                    ResetFormat::UnixTimestamp,
                ),
            ],
            max_interval: Duration::from_secs(10),
        };
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut h = http::HeaderMap::new();
        assert_eq!(rl.interval(&h, now), None);
        h.insert("x-ratelimit-reset", http::HeaderValue::from_static("1004"));
        assert_eq!(rl.interval(&h, now), Some(Duration::from_secs(4)));
        // Over max_interval: ignored, the next header counts.
        h.insert("retry-after", http::HeaderValue::from_static("60"));
        assert_eq!(rl.interval(&h, now), Some(Duration::from_secs(4)));
        h.insert("retry-after", http::HeaderValue::from_static("2"));
        assert_eq!(rl.interval(&h, now), Some(Duration::from_secs(2)));
        let b = RateLimitedBackOff::backoff(Duration::from_secs(2), 12_345);
        assert!(b >= Duration::from_secs(2) && b < Duration::from_secs(3));
    }
}
