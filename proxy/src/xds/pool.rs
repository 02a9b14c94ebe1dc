// SPDX-License-Identifier: Apache-2.0
//! The descriptor pool used for proto3-JSON (bootstrap files, `/config_dump`) and for reflection-based
//! "is any field set that we do not honour?" checks. Envoy's schema comes from the `envoy-types` crate's
//! own descriptor set (so JSON and the prost types agree field for field); the few Istio messages that
//! istiod puts in `typed_config` are described here.

use parking_lot::Mutex;
use prost_reflect::DescriptorPool;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto,
    FileDescriptorProto,
};
use std::sync::{Arc, LazyLock, Weak};

/// Envoy's schemas, pruned at build time to the closure of [`pool_roots::ROOTS`] (see build.rs).
static ENVOY_DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_types.bin"));

/// The descriptor pool, built on demand and shared while anyone holds it. Schemas are only needed
/// while configuration is parsed or translated and for `/config_dump`; between those the pool is
/// dropped, which keeps a few MiB out of the proxy's resident memory.
pub fn pool() -> Arc<DescriptorPool> {
    // An immutable schema cache, not configuration: a weak handle, so the pool lives exactly as long
    // as its users.
    static CACHE: LazyLock<Mutex<Weak<DescriptorPool>>> = LazyLock::new(|| Mutex::new(Weak::new()));
    let mut cached = CACHE.lock();
    if let Some(p) = cached.upgrade() {
        return p;
    }
    let p = Arc::new(build());
    *cached = Arc::downgrade(&p);
    p
}

fn build() -> DescriptorPool {
    let mut pool = match DescriptorPool::decode(ENVOY_DESCRIPTORS) {
        Ok(p) => p,
        // The descriptor set is compiled into the binary; failing to decode it is a build defect.
        Err(e) => panic!("embedded envoy descriptor set is invalid: {e}"),
    };
    let mut files = istio_files();
    if pool
        .get_message_by_name("xds.type.v3.TypedStruct")
        .is_none()
    {
        files.push(typed_struct_file(
            "pingsail/xds_typed_struct.proto",
            "xds.type.v3",
        ));
    }
    // Waypoint listeners' filter_chain_matcher uses it; envoy-types' set lacks xds/type/matcher/v3/ip.proto.
    if pool
        .get_message_by_name("xds.type.matcher.v3.IPMatcher")
        .is_none()
    {
        files.push(ip_matcher_file());
    }
    for file in files {
        if let Err(e) = pool.add_file_descriptor_proto(file) {
            panic!("built-in Istio descriptor is invalid: {e}");
        }
    }
    pool
}

fn field(
    name: &str,
    number: i32,
    ty: Type,
    type_name: Option<&str>,
    repeated: bool,
) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(if repeated {
            Label::Repeated
        } else {
            Label::Optional
        } as i32),
        r#type: Some(ty as i32),
        type_name: type_name.map(Into::into),
        json_name: Some(json_name(name)),
        ..Default::default()
    }
}

fn json_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut up = false;
    for c in name.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.push(c.to_ascii_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn message(name: &str, fields: Vec<FieldDescriptorProto>) -> DescriptorProto {
    DescriptorProto {
        name: Some(name.into()),
        field: fields,
        ..Default::default()
    }
}

fn enumeration(name: &str, values: &[&str]) -> EnumDescriptorProto {
    EnumDescriptorProto {
        name: Some(name.into()),
        value: values
            .iter()
            .enumerate()
            .map(|(i, v)| EnumValueDescriptorProto {
                name: Some((*v).into()),
                number: Some(i as i32),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn file(
    name: &str,
    package: &str,
    deps: &[&str],
    messages: Vec<DescriptorProto>,
    enums: Vec<EnumDescriptorProto>,
) -> FileDescriptorProto {
    FileDescriptorProto {
        name: Some(name.into()),
        package: Some(package.into()),
        dependency: deps.iter().map(|d| (*d).into()).collect(),
        message_type: messages,
        enum_type: enums,
        syntax: Some("proto3".into()),
        ..Default::default()
    }
}

fn typed_struct_file(name: &str, package: &str) -> FileDescriptorProto {
    use Type::*;
    file(
        name,
        package,
        &["google/protobuf/struct.proto"],
        vec![message(
            "TypedStruct",
            vec![
                field("type_url", 1, String, None, false),
                field("value", 2, Message, Some(".google.protobuf.Struct"), false),
            ],
        )],
        vec![],
    )
}

/// `xds.type.matcher.v3.IPMatcher` (cncf/xds `ip.proto` schema).
fn ip_matcher_file() -> FileDescriptorProto {
    use Type::*;
    file(
        "pingsail/xds_ip_matcher.proto",
        "xds.type.matcher.v3",
        &[
            "xds/core/v3/cidr.proto",
            "xds/type/matcher/v3/matcher.proto",
        ],
        vec![DescriptorProto {
            nested_type: vec![message(
                "IPRangeMatcher",
                vec![
                    field("ranges", 1, Message, Some(".xds.core.v3.CidrRange"), true),
                    field(
                        "on_match",
                        2,
                        Message,
                        Some(".xds.type.matcher.v3.Matcher.OnMatch"),
                        false,
                    ),
                    field("exclusive", 3, Bool, None, false),
                ],
            )],
            ..message(
                "IPMatcher",
                vec![field(
                    "range_matchers",
                    1,
                    Message,
                    Some(".xds.type.matcher.v3.IPMatcher.IPRangeMatcher"),
                    true,
                )],
            )
        }],
        vec![],
    )
}

/// Istio's own `typed_config` messages (schemas as published by istio/proxy), plus the legacy
/// `udpa.type.v1.TypedStruct` wrapper that istiod still emits.
fn istio_files() -> Vec<FileDescriptorProto> {
    use Type::*;
    vec![
        typed_struct_file("pingsail/udpa_typed_struct.proto", "udpa.type.v1"),
        file(
            "pingsail/istio_stats.proto",
            "stats",
            &["google/protobuf/duration.proto"],
            vec![
                DescriptorProto {
                    nested_type: vec![DescriptorProto {
                        name: Some("DimensionsEntry".into()),
                        field: vec![
                            field("key", 1, String, None, false),
                            field("value", 2, String, None, false),
                        ],
                        options: Some(prost_types::MessageOptions {
                            map_entry: Some(true),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..message(
                        "MetricConfig",
                        vec![
                            field(
                                "dimensions",
                                1,
                                Message,
                                Some(".stats.MetricConfig.DimensionsEntry"),
                                true,
                            ),
                            field("name", 2, String, None, false),
                            field("tags_to_remove", 3, String, None, true),
                            field("match", 4, String, None, false),
                            field("drop", 5, Bool, None, false),
                        ],
                    )
                },
                message(
                    "MetricDefinition",
                    vec![
                        field("name", 1, String, None, false),
                        field("value", 2, String, None, false),
                        field("type", 3, Enum, Some(".stats.MetricType"), false),
                    ],
                ),
                message(
                    "PluginConfig",
                    vec![
                        field("disable_host_header_fallback", 6, Bool, None, false),
                        field(
                            "tcp_reporting_duration",
                            7,
                            Message,
                            Some(".google.protobuf.Duration"),
                            false,
                        ),
                        field("metrics", 8, Message, Some(".stats.MetricConfig"), true),
                        field(
                            "definitions",
                            9,
                            Message,
                            Some(".stats.MetricDefinition"),
                            true,
                        ),
                        field("reporter", 10, Enum, Some(".stats.Reporter"), false),
                        field(
                            "rotation_interval",
                            11,
                            Message,
                            Some(".google.protobuf.Duration"),
                            false,
                        ),
                        field(
                            "graceful_deletion_interval",
                            12,
                            Message,
                            Some(".google.protobuf.Duration"),
                            false,
                        ),
                    ],
                ),
            ],
            vec![
                enumeration("MetricType", &["COUNTER", "GAUGE", "HISTOGRAM"]),
                enumeration("Reporter", &["UNSPECIFIED", "SERVER_GATEWAY"]),
            ],
        ),
        file(
            "pingsail/metadata_exchange.proto",
            "envoy.tcp.metadataexchange.config",
            &[],
            vec![message(
                "MetadataExchange",
                vec![
                    field("protocol", 1, String, None, false),
                    field("enable_discovery", 2, Bool, None, false),
                    field("additional_labels", 3, String, None, true),
                ],
            )],
            vec![],
        ),
        file(
            "pingsail/alpn.proto",
            "istio.envoy.config.filter.http.alpn.v2alpha1",
            &[],
            vec![DescriptorProto {
                nested_type: vec![message(
                    "AlpnOverride",
                    vec![
                        field(
                            "upstream_protocol",
                            1,
                            Enum,
                            Some(
                                ".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.ProtocolType",
                            ),
                            false,
                        ),
                        field("alpn_override", 2, String, None, true),
                    ],
                )],
                enum_type: vec![enumeration("ProtocolType", &["HTTP10", "HTTP11", "HTTP2"])],
                ..message(
                    "FilterConfig",
                    vec![field(
                        "alpn_override",
                        1,
                        Message,
                        Some(
                            ".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.AlpnOverride",
                        ),
                        true,
                    )],
                )
            }],
            vec![],
        ),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn pool_has_envoy_and_istio_types() {
        let p = super::pool();
        for name in [
            "envoy.config.bootstrap.v3.Bootstrap",
            "envoy.extensions.filters.http.fault.v3.HTTPFault",
            "stats.PluginConfig",
            "udpa.type.v1.TypedStruct",
            "xds.type.v3.TypedStruct",
            "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
            "envoy.tcp.metadataexchange.config.MetadataExchange",
            "xds.type.matcher.v3.IPMatcher",
        ] {
            assert!(p.get_message_by_name(name).is_some(), "{name}");
        }
    }
}
