// SPDX-License-Identifier: Apache-2.0
//! pingsail agent library: the workload-certificate side of pilot-agent.
pub mod ca;
mod h2serve;
pub mod sds;
#[cfg(feature = "testing")]
pub mod testing;
