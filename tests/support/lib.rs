// SPDX-License-Identifier: Apache-2.0
//! Test support for pingsail: echo upstreams, a raw HTTP/1.1 client, an Envoy runner and the
//! differential scenario harness (Envoy vs pingsail on the same bootstrap).
//!
//! Adding a scenario: write `tests/scenarios/NAME.yaml` (format in [`scenario`]) and add
//! `scenario!(NAME);` to `tests/tests/differential.rs`.

pub mod authz_grpc;
pub mod client;
pub mod compare;
pub mod configdump;
pub mod echo;
pub mod envoy;
pub mod istiod;
pub mod net;
pub mod netns;
pub mod proxy;
pub mod scenario;
pub mod sidecar;
mod wire;
