// SPDX-License-Identifier: Apache-2.0
//! pingsail agent library: pilot-agent's jobs.
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
//! - [`standalone`]: the loopback mesh with a development CA (`pingsail-agent standalone`);
//! - [`status`]: the status server (`:15020`: readiness, merged metrics, quitquitquit, drain, app
//!   probes);
//! - [`drain`]: draining the proxy with one deadline on SIGTERM;
//! - [`cmd`]: the `wait` and `request` subcommands;
//! - [`xdsproxy`]: the ADS relay between the proxy's Unix socket and istiod;
//! - [`nds`]: istiod's name table (NDS), taken by the xDS proxy for the DNS proxy;
//! - [`dns`]: the DNS proxy on 15053 (ISTIO_META_DNS_CAPTURE);
//! - `testing` (feature `testing`): a fake istiod CA and a test PKI.
pub mod bootstrap;
pub mod ca;
pub mod cmd;
pub mod config;
pub mod dns;
pub mod drain;
pub mod identity;
pub mod lifecycle;
pub mod nds;
pub mod proxy;
pub mod sds;
pub mod standalone;
pub mod status;
pub mod supervisor;
#[cfg(feature = "testing")]
pub mod testing;
pub mod xdsproxy;

mod h2serve;
