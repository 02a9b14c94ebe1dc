// SPDX-License-Identifier: Apache-2.0
//! pingsail agent library: the workload-certificate side of pilot-agent.
//!
//! - [`ca`]: key/CSR generation, istiod's CA client, chain validation, rotation, file-mounted
//!   certificates;
//! - [`sds`]: the SDS server on the workload Unix socket;
//! - [`identity`]: both wired together from pilot-agent's environment (`pingsail-agent sds`);
//! - [`config`]: `proxy sidecar|router` flags and environment ([`config::AgentConfig`]);
//! - [`bootstrap`]: the proxy's bootstrap as pilot-agent writes it;
//! - [`supervisor`]: runs the proxy with Envoy's command line, restarts it, stops it;
//! - [`lifecycle`]: the one Running → Draining → Stopping state the status server, signals and
//!   supervisor share;
//! - `testing` (feature `testing`): a fake istiod CA and a test PKI.
pub mod bootstrap;
pub mod ca;
pub mod config;
pub mod identity;
pub mod lifecycle;
pub mod proxy;
pub mod sds;
pub mod supervisor;
#[cfg(feature = "testing")]
pub mod testing;

mod h2serve;
