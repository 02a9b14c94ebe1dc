// SPDX-License-Identifier: Apache-2.0
//! pingsail sidecar injector: Istio-compatible sidecar injection as a mutating admission webhook
//! and as an offline `kube-inject`, both driven by Istio's own injection templates.

pub mod admission;
pub mod config;
pub mod gojson;
pub mod gotmpl;
pub mod inject;
pub mod jsonpatch;
pub mod kubeinject;
pub mod meshcfg;
pub mod metrics;
pub mod probe;
pub mod quantity;
pub mod server;
pub mod smp;
pub mod validate;
pub mod value;
