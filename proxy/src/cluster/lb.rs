// SPDX-License-Identifier: Apache-2.0
//! Load balancers. Selection state that must survive config swaps (round-robin position, active request
//! counts) lives in [`super::ClusterState`]; the tables built from endpoints are immutable.

use crate::config::Endpoint;
use rand::Rng;

/// Placeholder for consistent-hash tables (ring hash / maglev), built at config time.
#[derive(Debug)]
pub struct HashTable;

/// A smooth weighted round-robin schedule (nginx's algorithm), precomputed once per endpoint set:
/// for equal weights it is plain rotation.
#[derive(Debug)]
pub struct Schedule {
    order: Box<[u32]>,
}

impl Schedule {
    /// Builds the schedule for these endpoints (length = sum of reduced weights, capped).
    pub fn new(endpoints: &[Endpoint]) -> Schedule {
        if endpoints.is_empty() {
            return Schedule {
                order: Box::new([]),
            };
        }
        let g = endpoints.iter().fold(0u32, |g, e| gcd(g, e.weight.max(1)));
        let weights: Vec<i64> = endpoints
            .iter()
            .map(|e| i64::from(e.weight.max(1) / g.max(1)))
            .collect();
        let total: i64 = weights.iter().sum();
        // Bound the table; very uneven large weights are approximated proportionally.
        const MAX: i64 = 16_384;
        let (weights, total) = if total > MAX {
            let w: Vec<i64> = weights.iter().map(|w| (w * MAX / total).max(1)).collect();
            let t = w.iter().sum();
            (w, t)
        } else {
            (weights, total)
        };
        let mut current = vec![0i64; weights.len()];
        let mut order = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for i in 0..weights.len() {
                current[i] += weights[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            order.push(best as u32);
        }
        Schedule {
            order: order.into(),
        }
    }

    /// The endpoint index for pick number `n`.
    pub fn pick(&self, n: usize) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        Some(self.order[n % self.order.len()] as usize)
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Weighted random pick.
pub fn random(endpoints: &[Endpoint], rng: &mut impl Rng) -> Option<usize> {
    let total: u64 = endpoints.iter().map(|e| u64::from(e.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut v = rng.random_range(0..total);
    for (i, e) in endpoints.iter().enumerate() {
        if v < u64::from(e.weight) {
            return Some(i);
        }
        v -= u64::from(e.weight);
    }
    None
}

/// Envoy's least-request with equal weights: power of two random choices by active requests. With
/// unequal weights Envoy uses weight / (active + 1)^bias (bias 1.0) in an EDF schedule; we compare
/// that effective weight between the two choices.
pub fn least_request(
    endpoints: &[Endpoint],
    load: impl Fn(usize) -> u32,
    rng: &mut impl Rng,
) -> Option<usize> {
    match endpoints.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let score = |i: usize| f64::from(endpoints[i].weight) / f64::from(load(i) + 1);
            Some(if score(b) > score(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(w: u32) -> Endpoint {
        Endpoint {
            host: "h".into(),
            port: 1,
            addr: None,
            weight: w,
            hostname: None,
        }
    }

    #[test]
    fn smooth_weighted() {
        let s = Schedule::new(&[ep(5), ep(1), ep(1)]);
        let picks: Vec<_> = (0..7).map(|n| s.pick(n).unwrap()).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
        let s = Schedule::new(&[ep(1), ep(1), ep(1)]);
        let picks: Vec<_> = (0..6).map(|n| s.pick(n).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
