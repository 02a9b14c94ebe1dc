// SPDX-License-Identifier: Apache-2.0
//! Fault injection (`envoy.filters.http.fault`) decisions: which requests are delayed, which are
//! aborted and with what, as Envoy 1.40 decides them.

use crate::matcher::{HeaderMatcher, HeaderSource};
use std::time::Duration;

/// `envoy.type.v3.FractionalPercent`: `numerator` out of `denominator` (100, 10 000 or 1 000 000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    /// numerator
    pub numerator: u32,
    /// 100, 10 000 or 1 000 000
    pub denominator: u32,
}

impl Fraction {
    /// Envoy's `evaluateFractionalPercent`: `random % denominator < numerator`.
    pub fn hit(self, random: u64) -> bool {
        random % u64::from(self.denominator.max(1)) < u64::from(self.numerator)
    }
}

/// Where a delay's duration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DelaySource {
    /// `fixed_delay`
    Fixed(Duration),
    /// `header_delay`: `x-envoy-fault-delay-request` (milliseconds)
    Header,
}

/// Where an abort's status comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbortSource {
    /// `http_status`
    Http(u16),
    /// `grpc_status`
    Grpc(u32),
    /// `header_abort`: `x-envoy-fault-abort-request` / `x-envoy-fault-abort-grpc-request`
    Header,
}

/// `delay`
#[derive(Debug, Clone)]
pub struct FaultDelay {
    /// duration
    pub source: DelaySource,
    /// `percentage`
    pub percentage: Fraction,
}

/// `abort`
#[derive(Debug, Clone)]
pub struct FaultAbort {
    /// status
    pub source: AbortSource,
    /// `percentage`
    pub percentage: Fraction,
}

/// Where a response rate limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitSource {
    /// `fixed_limit.limit_kbps`
    Fixed(u64),
    /// `header_limit`: `x-envoy-fault-throughput-response` (KiB/s)
    Header,
}

/// `response_rate_limit`
#[derive(Debug, Clone)]
pub struct FaultRateLimit {
    /// rate
    pub source: RateLimitSource,
    /// `percentage`
    pub percentage: Fraction,
}

/// A validated `HTTPFault` (filter-level or per-route).
#[derive(Debug, Clone, Default)]
pub struct FaultConfig {
    /// `delay`
    pub delay: Option<FaultDelay>,
    /// `abort`
    pub abort: Option<FaultAbort>,
    /// `response_rate_limit`
    pub response_rate_limit: Option<FaultRateLimit>,
    /// `headers`: all must match for a fault to apply.
    pub headers: Vec<HeaderMatcher>,
    /// `upstream_cluster`: only requests routed to this cluster.
    pub upstream_cluster: Option<String>,
    /// `downstream_nodes`: only requests whose `x-envoy-downstream-service-node` is listed.
    pub downstream_nodes: Vec<String>,
    /// `max_active_faults` (None = unlimited)
    pub max_active_faults: Option<u64>,
}

/// An abort to answer with: HTTP status and, for gRPC aborts, the gRPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abort {
    /// HTTP status of the local reply (200 for gRPC aborts)
    pub status: u16,
    /// gRPC status, for `grpc_status` / `x-envoy-fault-abort-grpc-request`
    pub grpc_status: Option<u32>,
}

fn first_number<T: std::str::FromStr>(req: &impl HeaderSource, name: &'static str) -> Option<T> {
    let name = http::HeaderName::from_static(name);
    let mut out = None;
    // Only the first value counts (an untrusted header, as Envoy documents).
    req.any_value(&name, &mut |v| {
        out = v.trim().parse().ok();
        true
    });
    out
}

/// The percentage of a header-controlled fault: the header's numerator, capped by the configured one.
fn header_percentage(
    req: &impl HeaderSource,
    name: &'static str,
    configured: Fraction,
) -> Fraction {
    match first_number::<u32>(req, name) {
        Some(n) => Fraction {
            numerator: n.min(configured.numerator),
            denominator: configured.denominator,
        },
        None => configured,
    }
}

impl FaultConfig {
    /// Does the fault apply to this request at all (`upstream_cluster`, `downstream_nodes`,
    /// `headers`)?
    pub fn applies(&self, req: &impl HeaderSource, cluster: Option<&str>) -> bool {
        if let Some(c) = &self.upstream_cluster
            && cluster != Some(c.as_str())
        {
            return false;
        }
        if !self.downstream_nodes.is_empty() {
            let name = http::HeaderName::from_static("x-envoy-downstream-service-node");
            let mut hit = false;
            req.any_value(&name, &mut |v| {
                hit = self.downstream_nodes.iter().any(|n| n == v);
                true
            });
            if !hit {
                return false;
            }
        }
        self.headers.iter().all(|m| m.matches(req))
    }

    /// The delay to inject, if the dice (`random`) and the headers say so. A zero delay is none.
    pub fn delay(&self, req: &impl HeaderSource, random: u64) -> Option<Duration> {
        let d = self.delay.as_ref()?;
        let pct = match d.source {
            DelaySource::Fixed(_) => d.percentage,
            DelaySource::Header => {
                header_percentage(req, "x-envoy-fault-delay-request-percentage", d.percentage)
            }
        };
        if !pct.hit(random) {
            return None;
        }
        let dur = match d.source {
            DelaySource::Fixed(t) => t,
            DelaySource::Header => {
                Duration::from_millis(first_number(req, "x-envoy-fault-delay-request")?)
            }
        };
        (!dur.is_zero()).then_some(dur)
    }

    /// The response body rate in KiB/s to throttle to, if the dice (`random`) and the headers say
    /// so.
    pub fn response_rate_kbps(&self, req: &impl HeaderSource, random: u64) -> Option<u64> {
        let r = self.response_rate_limit.as_ref()?;
        let pct = match r.source {
            RateLimitSource::Fixed(_) => r.percentage,
            RateLimitSource::Header => header_percentage(
                req,
                "x-envoy-fault-throughput-response-percentage",
                r.percentage,
            ),
        };
        if !pct.hit(random) {
            return None;
        }
        match r.source {
            RateLimitSource::Fixed(k) => Some(k),
            RateLimitSource::Header => {
                first_number::<u64>(req, "x-envoy-fault-throughput-response").filter(|k| *k > 0)
            }
        }
    }

    /// The abort to inject, if the dice (`random`) and the headers say so.
    pub fn abort(&self, req: &impl HeaderSource, random: u64) -> Option<Abort> {
        let a = self.abort.as_ref()?;
        let pct = match a.source {
            AbortSource::Header => {
                header_percentage(req, "x-envoy-fault-abort-request-percentage", a.percentage)
            }
            _ => a.percentage,
        };
        if !pct.hit(random) {
            return None;
        }
        match a.source {
            AbortSource::Http(status) => Some(Abort {
                status,
                grpc_status: None,
            }),
            AbortSource::Grpc(g) => Some(Abort {
                status: 200,
                grpc_status: Some(g),
            }),
            AbortSource::Header => {
                if let Some(g) = first_number::<u32>(req, "x-envoy-fault-abort-grpc-request") {
                    return Some(Abort {
                        status: 200,
                        grpc_status: Some(g),
                    });
                }
                let status = first_number::<u16>(req, "x-envoy-fault-abort-request")?;
                (200..600).contains(&status).then_some(Abort {
                    status,
                    grpc_status: None,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::matcher::Pseudo;

    struct H(http::HeaderMap);
    impl HeaderSource for H {
        fn header(&self, name: &http::HeaderName) -> Option<std::borrow::Cow<'_, str>> {
            self.0
                .get(name)
                .map(|v| std::borrow::Cow::Borrowed(v.to_str().unwrap()))
        }
        fn pseudo(&self, _: Pseudo) -> Option<&str> {
            None
        }
    }

    fn h(pairs: &[(&'static str, &'static str)]) -> H {
        let mut m = http::HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, http::HeaderValue::from_static(v));
        }
        H(m)
    }

    #[test]
    fn header_controlled() {
        let pct = Fraction {
            numerator: 100,
            denominator: 100,
        };
        let f = FaultConfig {
            delay: Some(FaultDelay {
                source: DelaySource::Header,
                percentage: pct,
            }),
            abort: Some(FaultAbort {
                source: AbortSource::Header,
                percentage: pct,
            }),
            ..Default::default()
        };
        assert_eq!(f.delay(&h(&[]), 0), None);
        assert_eq!(
            f.delay(&h(&[("x-envoy-fault-delay-request", "200")]), 0),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            f.abort(&h(&[("x-envoy-fault-abort-request", "700")]), 0),
            None
        );
        assert_eq!(
            f.abort(&h(&[("x-envoy-fault-abort-grpc-request", "14")]), 0),
            Some(Abort {
                status: 200,
                grpc_status: Some(14)
            })
        );
        // The header percentage caps at the configured one: 0 → never.
        let hs = h(&[
            ("x-envoy-fault-abort-request", "503"),
            ("x-envoy-fault-abort-request-percentage", "0"),
        ]);
        assert_eq!(f.abort(&hs, 0), None);
    }

    #[test]
    fn response_rate_limit() {
        let all = Fraction {
            numerator: 100,
            denominator: 100,
        };
        let fixed = FaultConfig {
            response_rate_limit: Some(FaultRateLimit {
                source: RateLimitSource::Fixed(4),
                percentage: all,
            }),
            ..Default::default()
        };
        assert_eq!(fixed.response_rate_kbps(&h(&[]), 0), Some(4));
        let header = FaultConfig {
            response_rate_limit: Some(FaultRateLimit {
                source: RateLimitSource::Header,
                percentage: all,
            }),
            ..Default::default()
        };
        assert_eq!(header.response_rate_kbps(&h(&[]), 0), None);
        let hs = h(&[("x-envoy-fault-throughput-response", "8")]);
        assert_eq!(header.response_rate_kbps(&hs, 0), Some(8));
        let zero = h(&[("x-envoy-fault-throughput-response", "0")]);
        assert_eq!(header.response_rate_kbps(&zero, 0), None);
        let off = h(&[
            ("x-envoy-fault-throughput-response", "8"),
            ("x-envoy-fault-throughput-response-percentage", "0"),
        ]);
        assert_eq!(header.response_rate_kbps(&off, 0), None);
    }

    #[test]
    fn fractions() {
        let f = Fraction {
            numerator: 1,
            denominator: 10_000,
        };
        assert!(f.hit(0) && f.hit(10_000) && !f.hit(1) && !f.hit(9_999));
    }
}
