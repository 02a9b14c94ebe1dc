// SPDX-License-Identifier: Apache-2.0
//! Envoy protos → validated config. Every field is either honoured or refused with its path: the
//! reflection check [`Ctx::only`] rejects any set field that the translator does not name.

mod cluster;
mod common;
mod ext_authz;
mod jwt;
mod listener;
mod rbac;
mod route;
pub mod telemetry;
pub mod tls;

pub use cluster::{translate_cluster, translate_control_plane_cluster, translate_load_assignment};
pub use common::ErrorKind;
pub use common::config_source;
pub use common::{Path, TranslateError};
pub use listener::{translate_listener, typed_struct_inner_type};
pub use route::translate_route_config;

/// Re-exports of translation helpers for sibling modules that translate their own protos.
pub use common::only as only_pub;
pub use common::socket_addr as socket_addr_pub;
pub use common::type_name as type_name_pub;
pub use common::unpack as unpack_pub;
