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

    /// Every running listener with its bound address (static and from LDS).
    pub fn bound(&self) -> Vec<(String, SocketAddr)> {
        self.inner.manager.bound()
    }

    /// The leaf certificate (DER) of a named secret as the proxy currently holds it.
    pub fn secret_leaf(&self, name: &str) -> Option<Vec<u8>> {
        match self.inner.shared.secrets.get(name).as_deref() {
            Some(crate::tls::Material::Cert { chain, .. }) => chain.first().map(|c| c.to_vec()),
            _ => None,
        }
    }

    /// `/config_dump` as the admin endpoint renders it.
    pub fn config_dump(&self, include_eds: bool) -> String {
        crate::admin::config_dump(&self.inner.shared, include_eds)
    }

    /// Waits until the initial xDS fetch is done (what `/ready` reports), or fails after `timeout`.
    pub async fn wait_initialized(&self, timeout: std::time::Duration) -> anyhow::Result<()> {
        let mut rx = self.inner.shared.snapshot.subscribe();
        let check =
            |s: &crate::Shared| s.snapshot.load().xds.as_ref().is_none_or(|x| x.initialized);
        let wait = async {
            while !check(&self.inner.shared) {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        };
        pingora_timeout::timeout(timeout, wait)
            .await
            .map_err(|_| anyhow::anyhow!("xDS not initialized after {timeout:?}"))
    }
}

/// Starts pingsail on a bootstrap (YAML or JSON) with one worker thread. Returns once every listener is
/// bound, which is the readiness signal.
pub async fn start(bootstrap_yaml: &str) -> anyhow::Result<Running> {
    start_with_drain_time(bootstrap_yaml, crate::Options::default().drain_time).await
}

/// [`start`] with `--drain-time-s`.
pub async fn start_with_drain_time(
    bootstrap_yaml: &str,
    drain_time: std::time::Duration,
) -> anyhow::Result<Running> {
    let loaded = crate::xds::bootstrap::load_text(bootstrap_yaml)?;
    let opts = crate::Options {
        concurrency: 1,
        drain_time,
    };
    let inner = crate::start(loaded, &opts, None)?;
    Ok(Running { inner })
}
