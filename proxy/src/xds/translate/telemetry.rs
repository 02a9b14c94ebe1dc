// SPDX-License-Identifier: Apache-2.0
//! Telemetry-only configuration istiod and pilot-agent emit: HTTP tracing (HCM and bootstrap), Istio's
//! null-VM Wasm plugins (metadata exchange, stats), stats sinks, the bootstrap's stats options, and
//! the compressor filter of pilot-agent's Prometheus listener (served as pass-through).
//! Each is validated as Envoy would (known provider types, percentages in range) and then accepted
//! without effect: pingsail does not report spans or push metrics yet. None of them changes routing or
//! security; request ids and trace headers (`x-request-id`, `traceparent`, `x-b3-*`) still pass through.
//! docs/COMPATIBILITY.md lists these as known differences.

use super::common::*;
use envoy_types::pb::envoy::config::trace::v3 as trace;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3 as wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::wasm::v3 as wasm_cfg;
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::Any;

/// Tracer provider types Envoy (and istiod's MeshConfig providers) use; accepted, no spans are sent.
const TRACERS: &[&str] = &[
    "envoy.config.trace.v3.ZipkinConfig",
    "envoy.config.trace.v3.OpenTelemetryConfig",
    "envoy.config.trace.v3.DatadogConfig",
    "envoy.config.trace.v3.LightstepConfig",
    "envoy.config.trace.v3.SkyWalkingConfig",
    "envoy.config.trace.v3.OpenCensusConfig",
    "envoy.config.trace.v3.XRayConfig",
    "envoy.config.trace.v3.DynamicOtConfig",
];

/// Istio's null-VM Wasm plugins, all telemetry-only (peer metadata for stats, stats, attributes for
/// stats): `vm_config.code.local.inline_string` names the built-in plugin.
const ISTIO_NULL_VM_PLUGINS: &[&str] = &[
    "envoy.wasm.metadata_exchange",
    "envoy.wasm.stats",
    "istio.stats",
    "envoy.wasm.attributegen",
];

/// Stats sink types pilot-agent's bootstrap emits; accepted, nothing is pushed.
const STATS_SINKS: &[&str] = &[
    "envoy.config.metrics.v3.StatsdSink",
    "envoy.config.metrics.v3.MetricsServiceConfig",
    "envoy.config.metrics.v3.DogStatsdSink",
    "envoy.config.metrics.v3.HystrixSink",
    "envoy.extensions.stat_sinks.graphite_statsd.v3.GraphiteStatsdSink",
];

fn percent(p: &Option<Percent>, path: &Path) -> Result<()> {
    if let Some(p) = p
        && !(0.0..=100.0).contains(&p.value)
    {
        return invalid(&path.field("value"), "must be in [0, 100]");
    }
    Ok(())
}

/// `HttpConnectionManager.tracing`: validated, accepted, not enforced (no spans are reported).
pub fn hcm_tracing(t: &hcm::http_connection_manager::Tracing, path: &Path) -> Result<()> {
    only(
        t,
        path,
        &[
            "client_sampling",
            "random_sampling",
            "overall_sampling",
            "verbose",
            "max_path_tag_length",
            "custom_tags",
            "provider",
            "spawn_upstream_span",
            "operation_name",
        ],
        &[],
    )?;
    percent(&t.client_sampling, &path.field("client_sampling"))?;
    percent(&t.random_sampling, &path.field("random_sampling"))?;
    percent(&t.overall_sampling, &path.field("overall_sampling"))?;
    let mut tags = std::collections::HashSet::new();
    for (i, tag) in t.custom_tags.iter().enumerate() {
        let p = path.at("custom_tags", i);
        if tag.tag.is_empty() {
            return err(&p.field("tag"), ErrorKind::Required);
        }
        if tag.r#type.is_none() {
            return invalid(
                &p,
                "one of literal, environment, request_header, metadata is required",
            );
        }
        if !tags.insert(tag.tag.as_str()) {
            return invalid(&p.field("tag"), format!("duplicate tag '{}'", tag.tag));
        }
    }
    if let Some(h) = &t.provider {
        tracer(h, &path.field("provider"))?;
    }
    Ok(())
}

/// A tracing provider (`envoy.config.trace.v3.Tracing.Http`): a known tracer type.
pub fn tracer(h: &trace::tracing::Http, path: &Path) -> Result<()> {
    only(h, path, &["name", "typed_config"], &[])?;
    let Some(trace::tracing::http::ConfigType::TypedConfig(any)) = &h.config_type else {
        return err(&path.field("typed_config"), ErrorKind::Required);
    };
    known_type(any, TRACERS, &path.field("typed_config"))
}

/// Bootstrap `tracing`.
pub fn bootstrap_tracing(t: &trace::Tracing, path: &Path) -> Result<()> {
    only(t, path, &["http"], &[])?;
    match &t.http {
        Some(h) => tracer(h, &path.field("http")),
        None => Ok(()),
    }
}

/// Bootstrap `stats_sinks[i]`.
pub fn stats_sink(
    s: &envoy_types::pb::envoy::config::metrics::v3::StatsSink,
    path: &Path,
) -> Result<()> {
    use envoy_types::pb::envoy::config::metrics::v3::stats_sink::ConfigType;
    only(s, path, &["name", "typed_config"], &[])?;
    let Some(ConfigType::TypedConfig(any)) = &s.config_type else {
        return err(&path.field("typed_config"), ErrorKind::Required);
    };
    known_type(any, STATS_SINKS, &path.field("typed_config"))
}

fn known_type(any: &Any, known: &[&str], path: &Path) -> Result<()> {
    let name = type_name(&any.type_url);
    if known.contains(&name) {
        Ok(())
    } else {
        err(path, ErrorKind::UnknownType(name.to_string()))
    }
}

/// `envoy.extensions.filters.http.wasm.v3.Wasm`: only Istio's built-in telemetry plugins on the null
/// VM are accepted (as no-ops). Any other Wasm module could change routing or security and is refused.
pub fn istio_wasm(w: &wasm::Wasm, path: &Path) -> Result<()> {
    only(w, path, &["config"], &[])?;
    let Some(c) = &w.config else {
        return err(&path.field("config"), ErrorKind::Required);
    };
    let p = path.field("config");
    only(
        c,
        &p,
        &[
            "name",
            "root_id",
            "vm_config",
            "configuration",
            "fail_open",
            "failure_policy",
        ],
        &[],
    )?;
    use wasm_cfg::plugin_config::Vm;
    let Some(Vm::VmConfig(vm)) = &c.vm else {
        return err(&p.field("vm_config"), ErrorKind::NotSupported);
    };
    let vp = p.field("vm_config");
    if vm.runtime != "envoy.wasm.runtime.null" {
        return invalid(
            &vp.field("runtime"),
            format!(
                "only Istio's built-in (null VM) telemetry plugins are supported, not runtime '{}'",
                vm.runtime
            ),
        );
    }
    use envoy_types::pb::envoy::config::core::v3::{async_data_source, data_source};
    let inline = vm.code.as_ref().and_then(|c| match &c.specifier {
        Some(async_data_source::Specifier::Local(d)) => match &d.specifier {
            Some(data_source::Specifier::InlineString(s)) => Some(s.as_str()),
            _ => None,
        },
        _ => None,
    });
    match inline {
        Some(name) if ISTIO_NULL_VM_PLUGINS.contains(&name) => Ok(()),
        other => invalid(
            &vp.field("code"),
            format!(
                "unknown null-VM plugin {:?} (accepted: {})",
                other.unwrap_or(""),
                ISTIO_NULL_VM_PLUGINS.join(", ")
            ),
        ),
    }
}

/// Compression libraries Envoy's compressor filter takes.
const COMPRESSORS: &[&str] = &[
    "envoy.extensions.compression.gzip.compressor.v3.Gzip",
    "envoy.extensions.compression.brotli.compressor.v3.Brotli",
    "envoy.extensions.compression.zstd.compressor.v3.Zstd",
];

/// `envoy.extensions.filters.http.compressor.v3.Compressor` (pilot-agent's bootstrap puts brotli, zstd
/// and gzip on the 15090 Prometheus listener): validated and served as pass-through. Responses are
/// sent uncompressed, which every client that sent `Accept-Encoding` must accept; the upstream still
/// sees the client's `Accept-Encoding` and may compress itself.
pub fn compressor(
    c: &envoy_types::pb::envoy::extensions::filters::http::compressor::v3::Compressor,
    path: &Path,
) -> Result<()> {
    only(
        c,
        path,
        &[
            "content_length",
            "content_type",
            "disable_on_etag_header",
            "runtime_enabled",
            "compressor_library",
            "request_direction_config",
            "response_direction_config",
            "choose_first",
        ],
        &[],
    )?;
    #[allow(deprecated)]
    let remove_accept_encoding = c.remove_accept_encoding_header;
    if remove_accept_encoding {
        // Without compressing here, dropping Accept-Encoding would change what the client receives.
        return err(
            &path.field("remove_accept_encoding_header"),
            ErrorKind::NotSupported,
        );
    }
    let Some(lib) = &c.compressor_library else {
        return err(&path.field("compressor_library"), ErrorKind::Required);
    };
    let lp = path.field("compressor_library");
    only(lib, &lp, &["name", "typed_config"], &[])?;
    match &lib.typed_config {
        Some(any) => known_type(any, COMPRESSORS, &lp.field("typed_config")),
        None => err(&lp.field("typed_config"), ErrorKind::Required),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{
        AsyncDataSource, DataSource, async_data_source, data_source,
    };

    fn wasm(runtime: &str, code: &str) -> wasm::Wasm {
        wasm::Wasm {
            config: Some(wasm_cfg::PluginConfig {
                vm: Some(wasm_cfg::plugin_config::Vm::VmConfig(wasm_cfg::VmConfig {
                    runtime: runtime.into(),
                    code: Some(AsyncDataSource {
                        specifier: Some(async_data_source::Specifier::Local(DataSource {
                            specifier: Some(data_source::Specifier::InlineString(code.into())),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_istio_null_vm_telemetry_plugins_are_accepted() {
        let p = Path::root("f");
        istio_wasm(
            &wasm("envoy.wasm.runtime.null", "envoy.wasm.metadata_exchange"),
            &p,
        )
        .unwrap();
        istio_wasm(&wasm("envoy.wasm.runtime.null", "envoy.wasm.stats"), &p).unwrap();
        let e = istio_wasm(&wasm("envoy.wasm.runtime.v8", "envoy.wasm.stats"), &p).unwrap_err();
        assert_eq!(e.path.to_string(), "f.config.vm_config.runtime");
        let e = istio_wasm(&wasm("envoy.wasm.runtime.null", "my.auth.plugin"), &p).unwrap_err();
        assert_eq!(e.path.to_string(), "f.config.vm_config.code");
    }

    #[test]
    fn tracing_sampling_must_be_a_percentage() {
        let t = hcm::http_connection_manager::Tracing {
            random_sampling: Some(Percent { value: 101.0 }),
            ..Default::default()
        };
        let e = hcm_tracing(&t, &Path::root("tracing")).unwrap_err();
        assert_eq!(e.path.to_string(), "tracing.random_sampling.value");
    }
}
