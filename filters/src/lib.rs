// SPDX-License-Identifier: Apache-2.0
//! pingsail's HTTP filters as plain code.
//!
//! Each module owns a validated configuration type (built by the proxy's xDS translation, never parsed
//! here) and synchronous decision functions. Nothing in this crate knows about protos, sockets, xDS or
//! Pingora sessions; the proxy maps Pingora's phases onto these decisions.

pub mod cors;
pub mod fault;
pub mod headers;
pub mod jwt;
pub mod matcher;
pub mod metadata;
pub mod rbac;
pub mod retry;
pub mod route;

pub use arcstr::ArcStr;
