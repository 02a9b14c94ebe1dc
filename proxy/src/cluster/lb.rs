// SPDX-License-Identifier: Apache-2.0
//! Load balancers. Selection state that must survive config swaps (round-robin position, active request
//! counts) lives in [`super::ClusterState`]; the tables built from endpoints are immutable.

use crate::config::Endpoint;
use rand::Rng;

/// Consistent-hash configuration of a cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum HashLb {
    /// `RING_HASH` with `minimum_ring_size` / `maximum_ring_size` (xxHash only).
    Ring {
        /// default 1024
        min: u64,
        /// default 8M
        max: u64,
    },
    /// `MAGLEV` with a prime `table_size` (default 65537).
    Maglev {
        /// table size
        size: u64,
    },
}

/// A consistent-hash lookup table over endpoint indices, built the way Envoy builds it so that
/// pingsail and Envoy sidecars send the same key to the same endpoint.
#[derive(Debug)]
pub enum HashTable {
    /// ketama ring: (hash, endpoint index), sorted by hash
    Ring(Box<[(u64, u32)]>),
    /// maglev table of endpoint indices
    Maglev(Box<[u32]>),
}

fn xxh(b: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh64::xxh64(b, seed)
}

impl HashTable {
    /// Builds the table for `keys` (Envoy's host key: `ip:port`, or the hostname with
    /// `use_hostname_for_hashing`) with their weights.
    pub fn build(lb: &HashLb, keys: &[(String, u32)]) -> Option<HashTable> {
        if keys.is_empty() {
            return None;
        }
        let total: f64 = keys.iter().map(|k| f64::from(k.1)).sum();
        let weights: Vec<f64> = keys.iter().map(|k| f64::from(k.1) / total).collect();
        Some(match *lb {
            HashLb::Ring { min, max } => {
                let min_w = weights.iter().copied().fold(f64::INFINITY, f64::min);
                let scale = ((min_w * min as f64).ceil() / min_w).min(max as f64);
                let mut ring = Vec::with_capacity(scale.ceil() as usize);
                let (mut current, mut target) = (0.0f64, 0.0f64);
                for (idx, ((key, _), w)) in keys.iter().zip(&weights).enumerate() {
                    target += scale * w;
                    let mut i = 0u64;
                    while current < target {
                        let hash_key = format!("{key}_{i}");
                        ring.push((xxh(hash_key.as_bytes(), 0), idx as u32));
                        i += 1;
                        current += 1.0;
                    }
                }
                ring.sort_by_key(|e| e.0);
                HashTable::Ring(ring.into())
            }
            HashLb::Maglev { size } => {
                let max_w = weights.iter().copied().fold(0.0f64, f64::max);
                struct Entry {
                    idx: u32,
                    offset: u64,
                    skip: u64,
                    weight: f64,
                    target: f64,
                    next: u64,
                }
                let mut sorted: Vec<(&str, u32, f64)> = keys
                    .iter()
                    .zip(&weights)
                    .enumerate()
                    .map(|(i, ((k, _), w))| (k.as_str(), i as u32, *w))
                    .collect();
                sorted.sort_by(|a, b| a.0.cmp(b.0).then(a.1.cmp(&b.1)));
                let mut entries: Vec<Entry> = sorted
                    .iter()
                    .map(|(k, idx, w)| Entry {
                        idx: *idx,
                        offset: xxh(k.as_bytes(), 0) % size,
                        skip: xxh(k.as_bytes(), 1) % (size - 1) + 1,
                        weight: *w,
                        target: 0.0,
                        next: 0,
                    })
                    .collect();
                let mut table: Vec<Option<u32>> = vec![None; size as usize];
                let mut filled = 0u64;
                let mut iteration = 1u32;
                while filled < size {
                    for e in entries.iter_mut() {
                        if filled >= size {
                            break;
                        }
                        if f64::from(iteration) * e.weight < e.target {
                            continue;
                        }
                        e.target += max_w;
                        let mut c = (e.offset + e.skip * e.next) % size;
                        while table[c as usize].is_some() {
                            e.next += 1;
                            c = (e.offset + e.skip * e.next) % size;
                        }
                        table[c as usize] = Some(e.idx);
                        e.next += 1;
                        filled += 1;
                    }
                    iteration += 1;
                }
                HashTable::Maglev(table.into_iter().map(|x| x.unwrap_or(0)).collect())
            }
        })
    }

    /// The endpoint index for `hash`; `attempt` > 0 moves away from previously chosen hosts exactly as
    /// Envoy does for retry host predicates.
    pub fn choose(&self, hash: u64, attempt: u32) -> Option<usize> {
        match self {
            HashTable::Ring(ring) => {
                if ring.is_empty() {
                    return None;
                }
                // ketama_get_server, with signed indices as in the original.
                let (mut low, mut high) = (0i64, ring.len() as i64);
                let mut mid;
                loop {
                    mid = (low + high) / 2;
                    if mid == ring.len() as i64 {
                        mid = 0;
                        break;
                    }
                    let midval = ring[mid as usize].0;
                    let midval1 = if mid == 0 {
                        0
                    } else {
                        ring[mid as usize - 1].0
                    };
                    if hash <= midval && hash > midval1 {
                        break;
                    }
                    if midval < hash {
                        low = mid + 1;
                    } else {
                        high = mid - 1;
                    }
                    if low > high {
                        mid = 0;
                        break;
                    }
                }
                let mut i = mid as usize;
                if attempt > 0 {
                    i = (i + attempt as usize) % ring.len();
                }
                Some(ring[i].1 as usize)
            }
            HashTable::Maglev(table) => {
                if table.is_empty() {
                    return None;
                }
                let mut h = hash;
                if attempt > 0 {
                    h ^= (!0u64).wrapping_sub(u64::from(attempt)).wrapping_add(1);
                }
                Some(table[(h % table.len() as u64) as usize] as usize)
            }
        }
    }
}

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
    let mut v = rng.gen_range(0..total);
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
            let a = rng.gen_range(0..n);
            let mut b = rng.gen_range(0..n - 1);
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
            socket_match: Vec::new(),
            internal: None,
        }
    }

    #[test]
    fn ring_and_maglev_cover_all_hosts() {
        let keys: Vec<(String, u32)> = (1..=3).map(|i| (format!("10.0.0.{i}:80"), 1)).collect();
        for lb in [
            HashLb::Ring {
                min: 1024,
                max: 8 << 20,
            },
            HashLb::Maglev { size: 65537 },
        ] {
            let t = HashTable::build(&lb, &keys).unwrap();
            let mut seen = [0usize; 3];
            for k in 0..3000u64 {
                seen[t.choose(xxh(&k.to_le_bytes(), 0), 0).unwrap()] += 1;
            }
            assert!(seen.iter().all(|n| *n > 700), "{lb:?}: {seen:?}");
            // Same key, same host; retries move away deterministically.
            let h = xxh(b"user-1", 0);
            assert_eq!(t.choose(h, 0), t.choose(h, 0));
        }
        if let HashTable::Ring(r) = HashTable::build(
            &HashLb::Ring {
                min: 1024,
                max: 8 << 20,
            },
            &keys,
        )
        .unwrap()
        {
            assert_eq!(r.len(), 1026); // ceil(1/3 * 1024) * 3, as Envoy sizes it
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
