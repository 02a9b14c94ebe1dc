// SPDX-License-Identifier: Apache-2.0
//! Where configuration enters the process: bootstrap loading, proto-JSON, and translation of Envoy
//! protos into our validated, immutable config types. (The ADS client joins here in the xDS issue.)

pub mod ads;
pub mod bootstrap;
pub mod json;
pub mod pool;
pub mod pool_roots;
pub mod sds;
pub mod store;
pub mod translate;
