// SPDX-License-Identifier: Apache-2.0
//! Passive outlier detection (Envoy's `OutlierDetection`): per-host consecutive-error counters that
//! eject a host when they reach their threshold, an interval sweep that brings hosts back after
//! `base_ejection_time × multiplier` (capped by `max_ejection_time`) and runs the success-rate and
//! failure-percentage detectors. Host state is carried across endpoint updates by address.

use crate::config::OutlierDetection;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How an upstream attempt ended, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP response with this status.
    Status(u16),
    /// Connection could not be established (local origin).
    ConnectFailed,
    /// The attempt timed out (local origin).
    Timeout,
    /// The connection was reset after it was established.
    Reset,
}

/// Why a host was ejected (for the `ejections_*` counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `consecutive_5xx`
    Consecutive5xx,
    /// `consecutive_gateway_failure`
    ConsecutiveGateway,
    /// `consecutive_local_origin_failure`
    ConsecutiveLocalOrigin,
    /// success rate
    SuccessRate,
    /// failure percentage
    FailurePercentage,
}

/// Outlier state of one host (shared by endpoint sets that contain its address).
#[derive(Debug, Default)]
pub struct HostState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// ejected now (`health_flags::/failed_outlier_check`)
    ejected: AtomicBool,
    /// when the current ejection started (ms since the detector's epoch)
    ejected_at: AtomicU64,
    /// the ejection-time multiplier
    backoff: AtomicU32,
    /// `max_ejection_time_jitter` drawn for the current ejection (ms)
    jitter_ms: AtomicU64,
    /// requests / successes in this interval (external origin)
    total: AtomicU64,
    success: AtomicU64,
    /// same for local origin events (with `split_external_local_origin_errors`)
    local_total: AtomicU64,
    local_success: AtomicU64,
}

impl HostState {
    /// Is the host ejected?
    pub fn ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }
}

/// Cluster-wide detector state: counters and the ejection bookkeeping.
#[derive(Debug)]
pub struct Detector {
    epoch: Instant,
    /// hosts ejected now
    pub ejections_active: AtomicU64,
    /// `outlier_detection.*` counters: ejections_enforced_total, ejections_overflow, and per kind
    /// (detected, enforced) pairs.
    pub enforced_total: AtomicU64,
    /// ejections_overflow
    pub overflow: AtomicU64,
    /// ejections_detected_* / ejections_enforced_* indexed by [`Kind`]
    pub detected: [AtomicU64; 5],
    /// enforced per kind
    pub enforced: [AtomicU64; 5],
}

impl Default for Detector {
    fn default() -> Self {
        Detector {
            epoch: Instant::now(),
            ejections_active: AtomicU64::new(0),
            enforced_total: AtomicU64::new(0),
            overflow: AtomicU64::new(0),
            detected: Default::default(),
            enforced: Default::default(),
        }
    }
}

/// Names of the per-kind counters, in [`Kind`] order.
pub const KIND_NAMES: [&str; 5] = [
    "consecutive_5xx",
    "consecutive_gateway_failure",
    "consecutive_local_origin_failure",
    "success_rate",
    "failure_percentage",
];

fn kind_index(k: Kind) -> usize {
    match k {
        Kind::Consecutive5xx => 0,
        Kind::ConsecutiveGateway => 1,
        Kind::ConsecutiveLocalOrigin => 2,
        Kind::SuccessRate => 3,
        Kind::FailurePercentage => 4,
    }
}

fn enforcing(cfg: &OutlierDetection, k: Kind) -> u32 {
    match k {
        Kind::Consecutive5xx => cfg.enforcing_consecutive_5xx,
        Kind::ConsecutiveGateway => cfg.enforcing_consecutive_gateway_failure,
        Kind::ConsecutiveLocalOrigin => cfg.enforcing_consecutive_local_origin_failure,
        Kind::SuccessRate => cfg.enforcing_success_rate,
        Kind::FailurePercentage => cfg.enforcing_failure_percentage,
    }
}

impl Detector {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Feeds one attempt's outcome for `host` (one of `hosts` hosts in the cluster).
    pub fn record(&self, cfg: &OutlierDetection, host: &HostState, hosts: usize, o: Outcome) {
        let split = cfg.split_external_local_origin_errors;
        let status = match o {
            Outcome::Status(s) => Some(s),
            // Without the split, local-origin events count as the status Envoy maps them to.
            Outcome::ConnectFailed | Outcome::Reset if !split => Some(503),
            Outcome::Timeout if !split => Some(504),
            _ => None,
        };
        match status {
            Some(code) => {
                host.total.fetch_add(1, Ordering::Relaxed);
                if (500..600).contains(&code) {
                    if matches!(code, 502..=504) {
                        let n = host.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1;
                        if n == cfg.consecutive_gateway_failure {
                            self.detected(cfg, host, hosts, Kind::ConsecutiveGateway);
                        }
                    } else {
                        host.consecutive_gateway.store(0, Ordering::Relaxed);
                    }
                    let n = host.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == cfg.consecutive_5xx {
                        self.detected(cfg, host, hosts, Kind::Consecutive5xx);
                    }
                } else {
                    host.success.fetch_add(1, Ordering::Relaxed);
                    host.consecutive_5xx.store(0, Ordering::Relaxed);
                    host.consecutive_gateway.store(0, Ordering::Relaxed);
                    if split {
                        host.consecutive_local.store(0, Ordering::Relaxed);
                    }
                }
            }
            None => {
                // split: a local-origin failure
                host.local_total.fetch_add(1, Ordering::Relaxed);
                let n = host.consecutive_local.fetch_add(1, Ordering::Relaxed) + 1;
                if n == cfg.consecutive_local_origin_failure {
                    self.detected(cfg, host, hosts, Kind::ConsecutiveLocalOrigin);
                }
            }
        }
        if split && matches!(o, Outcome::Status(_)) {
            host.local_total.fetch_add(1, Ordering::Relaxed);
            host.local_success.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn detected(&self, cfg: &OutlierDetection, host: &HostState, hosts: usize, k: Kind) {
        if host.ejected() {
            return;
        }
        self.detected[kind_index(k)].fetch_add(1, Ordering::Relaxed);
        match k {
            Kind::Consecutive5xx => host.consecutive_5xx.store(0, Ordering::Relaxed),
            Kind::ConsecutiveGateway => host.consecutive_gateway.store(0, Ordering::Relaxed),
            Kind::ConsecutiveLocalOrigin => host.consecutive_local.store(0, Ordering::Relaxed),
            _ => {}
        }
        self.eject(cfg, host, hosts, k);
    }

    fn eject(&self, cfg: &OutlierDetection, host: &HostState, hosts: usize, k: Kind) {
        let active = self.ejections_active.load(Ordering::Relaxed);
        let pct = 100.0 * (active + 1) as f64 / hosts.max(1) as f64;
        if !(pct <= f64::from(cfg.max_ejection_percent.min(100))
            || (cfg.always_eject_one_host && active == 0))
        {
            self.overflow.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if u64::from(enforcing(cfg, k)) <= rand::random::<u64>() % 100 {
            return;
        }
        if host.ejected.swap(true, Ordering::Relaxed) {
            return;
        }
        self.ejections_active.fetch_add(1, Ordering::Relaxed);
        self.enforced_total.fetch_add(1, Ordering::Relaxed);
        self.enforced[kind_index(k)].fetch_add(1, Ordering::Relaxed);
        host.ejected_at.store(self.now_ms(), Ordering::Relaxed);
        // Each ejection lasts a random extra in [0, max_ejection_time_jitter].
        let jitter = cfg.max_ejection_time_jitter.as_millis() as u64;
        let extra = if jitter == 0 {
            0
        } else {
            rand::random::<u64>() % (jitter + 1)
        };
        host.jitter_ms.store(extra, Ordering::Relaxed);
        // The multiplier grows with each ejection, until base × multiplier reaches the maximum.
        let base = cfg.base_ejection_time.as_millis().max(1);
        let cap = cfg.max_ejection_time.as_millis().div_ceil(base).max(1) as u32;
        let b = host.backoff.load(Ordering::Relaxed);
        host.backoff.store((b + 1).min(cap), Ordering::Relaxed);
    }

    /// The interval sweep: brings back hosts whose ejection time is over, decays the multiplier of
    /// healthy hosts, and runs the success-rate and failure-percentage detectors.
    pub fn sweep(&self, cfg: &OutlierDetection, hosts: &[&HostState]) {
        let now = self.now_ms();
        let base = cfg.base_ejection_time.as_millis() as u64;
        let max = cfg.max_ejection_time.as_millis() as u64;
        for h in hosts {
            if h.ejected() {
                let t = (base * u64::from(h.backoff.load(Ordering::Relaxed))).min(max)
                    + h.jitter_ms.load(Ordering::Relaxed);
                if now.saturating_sub(h.ejected_at.load(Ordering::Relaxed)) >= t {
                    h.ejected.store(false, Ordering::Relaxed);
                    self.ejections_active.fetch_sub(1, Ordering::Relaxed);
                    h.consecutive_5xx.store(0, Ordering::Relaxed);
                    h.consecutive_gateway.store(0, Ordering::Relaxed);
                    h.consecutive_local.store(0, Ordering::Relaxed);
                }
            } else {
                let b = h.backoff.load(Ordering::Relaxed);
                if b > 0 {
                    h.backoff.store(b - 1, Ordering::Relaxed);
                }
            }
        }
        // Statistical detectors over this interval's counts.
        let counts: Vec<(u64, u64)> = hosts
            .iter()
            .map(|h| {
                (
                    h.total.swap(0, Ordering::Relaxed),
                    h.success.swap(0, Ordering::Relaxed),
                )
            })
            .collect();
        for h in hosts {
            h.local_total.store(0, Ordering::Relaxed);
            h.local_success.store(0, Ordering::Relaxed);
        }
        let n = hosts.len();
        // success rate
        let eligible: Vec<(usize, f64)> = counts
            .iter()
            .enumerate()
            .filter(|(_, (t, _))| *t >= u64::from(cfg.success_rate_request_volume) && *t > 0)
            .map(|(i, (t, s))| (i, 100.0 * *s as f64 / *t as f64))
            .collect();
        if eligible.len() >= cfg.success_rate_minimum_hosts as usize && !eligible.is_empty() {
            let mean = eligible.iter().map(|e| e.1).sum::<f64>() / eligible.len() as f64;
            let var =
                eligible.iter().map(|e| (e.1 - mean).powi(2)).sum::<f64>() / eligible.len() as f64;
            let threshold = mean - var.sqrt() * f64::from(cfg.success_rate_stdev_factor) / 1000.0;
            for (i, rate) in eligible {
                if rate < threshold && !hosts[i].ejected() {
                    self.detected[kind_index(Kind::SuccessRate)].fetch_add(1, Ordering::Relaxed);
                    self.eject(cfg, hosts[i], n, Kind::SuccessRate);
                }
            }
        }
        // failure percentage
        let eligible: Vec<(usize, f64)> = counts
            .iter()
            .enumerate()
            .filter(|(_, (t, _))| *t >= u64::from(cfg.failure_percentage_request_volume) && *t > 0)
            .map(|(i, (t, s))| (i, 100.0 * (*t - *s) as f64 / *t as f64))
            .collect();
        if eligible.len() >= cfg.failure_percentage_minimum_hosts as usize {
            for (i, fail) in eligible {
                if fail >= f64::from(cfg.failure_percentage_threshold) && !hosts[i].ejected() {
                    self.detected[kind_index(Kind::FailurePercentage)]
                        .fetch_add(1, Ordering::Relaxed);
                    self.eject(cfg, hosts[i], n, Kind::FailurePercentage);
                }
            }
        }
    }
}

/// The interval of a detector, for the sweep task.
pub fn interval(cfg: &OutlierDetection) -> Duration {
    cfg.interval.max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 2,
            consecutive_gateway_failure: 5,
            consecutive_local_origin_failure: 5,
            interval: Duration::from_millis(10),
            base_ejection_time: Duration::from_millis(100),
            max_ejection_time: Duration::from_millis(160),
            max_ejection_percent: 50,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_consecutive_local_origin_failure: 100,
            split_external_local_origin_errors: false,
            enforcing_success_rate: 100,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            enforcing_local_origin_success_rate: 100,
            failure_percentage_threshold: 85,
            enforcing_failure_percentage: 0,
            enforcing_failure_percentage_local_origin: 0,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            always_eject_one_host: false,
            max_ejection_time_jitter: Duration::ZERO,
        }
    }

    #[test]
    fn ejection_time_jitter_extends_the_ejection() {
        let mut c = cfg();
        c.max_ejection_percent = 100;
        c.max_ejection_time_jitter = Duration::from_secs(10);
        let d = Detector::default();
        let h = HostState::default();
        d.record(&c, &h, 1, Outcome::Status(503));
        d.record(&c, &h, 1, Outcome::Status(503));
        assert!(h.ejected());
        assert!(h.jitter_ms.load(Ordering::Relaxed) <= 10_000);
        // Pin the draw: base 100 ms + 5 s of jitter is not over after 110 ms.
        h.jitter_ms.store(5_000, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(110));
        d.sweep(&c, &[&h]);
        assert!(h.ejected(), "the jitter lengthens the ejection");
        h.jitter_ms.store(0, Ordering::Relaxed);
        d.sweep(&c, &[&h]);
        assert!(!h.ejected());
    }

    #[test]
    fn ejection_percent_counts_the_new_host() {
        let (c, d) = (cfg(), Detector::default());
        let hosts: Vec<HostState> = (0..3).map(|_| HostState::default()).collect();
        for h in &hosts {
            d.record(&c, h, 3, Outcome::Status(503));
            d.record(&c, h, 3, Outcome::Status(500));
        }
        // (0 + 1) / 3 = 33 % ≤ 50 % ejects; (1 + 1) / 3 = 67 % does not.
        assert_eq!(hosts.iter().filter(|h| h.ejected()).count(), 1);
        assert_eq!(d.overflow.load(Ordering::Relaxed), 2);
        // Without the split, a connect failure counts as a 503.
        let (c, d) = (cfg(), Detector::default());
        let h = HostState::default();
        d.record(&c, &h, 1, Outcome::ConnectFailed);
        assert!(!h.ejected());
        d.record(&c, &h, 1, Outcome::Status(200));
        d.record(&c, &h, 1, Outcome::ConnectFailed);
        assert!(!h.ejected(), "a success resets the count");
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let mut c = cfg();
        c.max_ejection_percent = 100;
        let d = Detector::default();
        let h = HostState::default();
        let eject = || {
            d.record(&c, &h, 1, Outcome::Status(503));
            d.record(&c, &h, 1, Outcome::Status(503));
        };
        eject();
        assert!(h.ejected());
        assert_eq!(h.backoff.load(Ordering::Relaxed), 1);
        std::thread::sleep(Duration::from_millis(110));
        d.sweep(&c, &[&h]);
        assert!(!h.ejected(), "back after base_ejection_time");
        eject();
        assert_eq!(h.backoff.load(Ordering::Relaxed), 2);
        std::thread::sleep(Duration::from_millis(110));
        d.sweep(&c, &[&h]);
        assert!(
            h.ejected(),
            "the second ejection lasts min(2 × 100, 160) ms"
        );
        std::thread::sleep(Duration::from_millis(60));
        d.sweep(&c, &[&h]);
        assert!(!h.ejected());
        eject();
        // 3 × 100 ms is over the 160 ms cap: the multiplier stops at 2.
        assert_eq!(h.backoff.load(Ordering::Relaxed), 2);
        // A healthy host's multiplier decays one step per sweep.
        std::thread::sleep(Duration::from_millis(170));
        d.sweep(&c, &[&h]);
        d.sweep(&c, &[&h]);
        assert_eq!(h.backoff.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn unenforced_detection_only_counts() {
        let mut c = cfg();
        c.enforcing_consecutive_5xx = 0;
        let d = Detector::default();
        let h = HostState::default();
        d.record(&c, &h, 1, Outcome::Status(503));
        d.record(&c, &h, 1, Outcome::Status(503));
        assert!(!h.ejected());
        assert_eq!(d.detected[0].load(Ordering::Relaxed), 1);
        assert_eq!(d.enforced[0].load(Ordering::Relaxed), 0);
    }
}
