// SPDX-License-Identifier: Apache-2.0
//! Addresses and scratch space that never collide between parallel tests.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher as _, Hasher as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};

/// A random 64-bit value (std's per-process random hash keys, mixed with time and a counter).
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A random loopback address `127.X.Y.Z` with X, Y, Z in 1..=254 (never 127.0.0.1).
///
/// Give each proxy instance its own, so bootstraps can use fixed ports (15000, 15001, 9080…)
/// without two parallel tests colliding. Linux routes all of 127/8 to `lo`.
pub fn random_loopback_ip() -> Ipv4Addr {
    let r = random_u64();
    let octet = |shift: u32| ((r >> shift) % 254) as u8 + 1;
    Ipv4Addr::new(127, octet(0), octet(16), octet(32))
}

/// A port on 127.0.0.1 that was bound and released, so (barring a rare reuse race) nothing
/// listens there: connections to it are refused.
pub fn closed_port() -> Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding probe port")?;
    Ok(l.local_addr()?.port())
}

/// `127.0.0.1:port`.
pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A uniquely named directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
