// SPDX-License-Identifier: Apache-2.0
//! The proxies a differential test compares.
//!
//! Side "A" is always Envoy (the reference). Side "B" is chosen by `PINGSAIL_DIFF_B`:
//! `envoy` (the default until pingsail is wired, proving the harness Envoy-vs-Envoy) or
//! `pingsail`. Pingsail plugs in at exactly one place: [`start_pingsail`].

use std::fmt;
use std::net::Ipv4Addr;

use anyhow::{Result, bail};

use crate::envoy::Envoy;

/// A started proxy; dropping it stops the proxy.
pub trait RunningProxy: Send {
    /// Anything useful when a scenario fails (e.g. Envoy's stderr).
    fn diagnostics(&self) -> String {
        String::new()
    }
}

impl RunningProxy for Envoy {
    fn diagnostics(&self) -> String {
        self.stderr()
    }
}

/// Which implementation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyUnderTest {
    Envoy,
    Pingsail,
}

impl fmt::Display for ProxyUnderTest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Envoy => "envoy",
            Self::Pingsail => "pingsail",
        })
    }
}

impl ProxyUnderTest {
    /// Side B as selected by `PINGSAIL_DIFF_B` (`envoy` | `pingsail`; unset = `envoy`).
    pub fn side_b_from_env() -> Result<Self> {
        match std::env::var("PINGSAIL_DIFF_B").as_deref() {
            Err(std::env::VarError::NotPresent) | Ok("") | Ok("pingsail") => Ok(Self::Pingsail),
            Ok("envoy") => Ok(Self::Envoy),
            Ok(other) => bail!("PINGSAIL_DIFF_B={other:?}: expected `envoy` or `pingsail`"),
            Err(e) => bail!("PINGSAIL_DIFF_B: {e}"),
        }
    }

    /// Starts this proxy on a rendered bootstrap whose listeners and admin bind `listen_ip`.
    /// Returns once it accepts traffic.
    pub async fn start(
        self,
        bootstrap_yaml: &str,
        listen_ip: Ipv4Addr,
    ) -> Result<Box<dyn RunningProxy>> {
        match self {
            Self::Envoy => Ok(Box::new(Envoy::start(bootstrap_yaml).await?)),
            Self::Pingsail => start_pingsail(bootstrap_yaml, listen_ip).await,
        }
    }
}

/// Starts pingsail in-process; it returns once every listener is bound (the readiness signal).
async fn start_pingsail(
    bootstrap_yaml: &str,
    listen_ip: Ipv4Addr,
) -> Result<Box<dyn RunningProxy>> {
    struct Pingsail(#[allow(dead_code)] pingsail_proxy::testing::Running);
    impl RunningProxy for Pingsail {}
    let _ = listen_ip; // already rendered into the bootstrap
    Ok(Box::new(Pingsail(
        pingsail_proxy::testing::start(bootstrap_yaml).await?,
    )))
}
