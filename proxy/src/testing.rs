// SPDX-License-Identifier: Apache-2.0
//! In-process start for integration tests (the differential harness's pingsail side).

use std::net::SocketAddr;

/// A proxy running in this process; dropping it stops it.
pub struct Running {
    inner: crate::Running,
}

impl Running {
    /// Bound listeners (name, address).
    pub fn listeners(&self) -> &[(String, SocketAddr)] {
        &self.inner.listeners
    }

    /// Bound admin address.
    pub fn admin(&self) -> Option<SocketAddr> {
        self.inner.admin
    }
}

/// Starts pingsail on a bootstrap (YAML or JSON) with one worker thread. Returns once every listener is
/// bound, which is the readiness signal.
pub async fn start(bootstrap_yaml: &str) -> anyhow::Result<Running> {
    let loaded = crate::xds::bootstrap::load_text(bootstrap_yaml)?;
    let opts = crate::Options {
        concurrency: 1,
        ..Default::default()
    };
    let inner = crate::start(loaded, &opts, None)?;
    Ok(Running { inner })
}
