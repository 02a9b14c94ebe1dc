// SPDX-License-Identifier: Apache-2.0
//! Prometheus metrics, rendered by hand (a handful of counters and one histogram do not justify a
//! metrics stack).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Metrics {
    pub requests: Counter,
    pub injected: Counter,
    pub skipped: Counter,
    pub failed: Counter,
    pub denied: Counter,
    pub bad_requests: Counter,
    pub latency: Histogram,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            ));
        };
        counter(
            &mut s,
            "pingsail_injector_requests_total",
            "Admission requests received on /inject.",
            self.requests.get(),
        );
        s.push_str("# HELP pingsail_injector_injections_total Admission requests by outcome.\n");
        s.push_str("# TYPE pingsail_injector_injections_total counter\n");
        for (o, c) in [
            ("injected", &self.injected),
            ("skipped", &self.skipped),
            ("failed", &self.failed),
        ] {
            s.push_str(&format!(
                "pingsail_injector_injections_total{{outcome=\"{o}\"}} {}\n",
                c.get()
            ));
        }
        counter(
            &mut s,
            "pingsail_injector_denials_total",
            "Pods denied because injection failed.",
            self.denied.get(),
        );
        counter(
            &mut s,
            "pingsail_injector_bad_requests_total",
            "Requests rejected before review (bad body, content type, size).",
            self.bad_requests.get(),
        );
        let name = "pingsail_injector_admission_duration_seconds";
        s.push_str(&format!(
            "# HELP {name} Time to answer an AdmissionReview.\n# TYPE {name} histogram\n"
        ));
        for (i, b) in BUCKETS.iter().enumerate() {
            s.push_str(&format!(
                "{name}_bucket{{le=\"{b}\"}} {}\n",
                self.latency.buckets[i].load(Ordering::Relaxed)
            ));
        }
        let count = self.latency.count.load(Ordering::Relaxed);
        s.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {count}\n"));
        s.push_str(&format!(
            "{name}_sum {}\n",
            self.latency.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        ));
        s.push_str(&format!("{name}_count {count}\n"));
        s
    }
}
