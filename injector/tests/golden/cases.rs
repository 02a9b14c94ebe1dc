// SPDX-License-Identifier: Apache-2.0
//! The case table of Istio's `TestInjection` (pkg/kube/inject/inject_test.go): which input goes
//! with which golden and which knobs the case turns. Inputs not listed here run with the defaults
//! against `<input>.injected`, as upstream does.

#![allow(dead_code)]

use serde_json::{Value, json};

#[derive(Clone, Debug, Default)]
pub struct Case {
    pub input: &'static str,
    pub want: String,
    /// Helm-style `--set` flags.
    pub flags: Vec<&'static str>,
    /// IstioOperator overlay file (spec.values merged into values).
    pub iop: Option<&'static str>,
    pub mesh: Option<MeshTweak>,
    pub native_disabled: bool,
    pub fips: bool,
    pub openshift: bool,
    pub skip_webhook: bool,
    pub skip_kube_inject: bool,
    pub expected_error: Option<&'static str>,
    pub expected_log: Option<&'static str>,
}

#[derive(Clone, Copy, Debug)]
pub enum MeshTweak {
    Tproxy,
    DrainDuration23s,
    TlsClientKeyMetadata,
    EmptyTracing,
    InboundLocalhost,
    OtelSemconv,
}

impl MeshTweak {
    pub fn apply(self, mesh: &mut Value) {
        let dc = mesh
            .pointer_mut("/defaultConfig")
            .and_then(Value::as_object_mut);
        match self {
            MeshTweak::Tproxy => {
                if let Some(dc) = dc {
                    dc.insert("interceptionMode".into(), json!("TPROXY"));
                }
            }
            MeshTweak::DrainDuration23s => {
                if let Some(dc) = dc {
                    dc.insert("drainDuration".into(), json!("23s"));
                }
            }
            MeshTweak::TlsClientKeyMetadata => {
                if let Some(dc) = dc {
                    let pm = dc.entry("proxyMetadata").or_insert_with(|| json!({}));
                    if let Some(pm) = pm.as_object_mut() {
                        pm.insert(
                            "ISTIO_META_TLS_CLIENT_KEY".into(),
                            json!("/etc/identity/client/keys/client-key.pem"),
                        );
                    }
                }
            }
            MeshTweak::EmptyTracing => {
                if let Some(dc) = dc {
                    dc.insert("tracing".into(), json!({}));
                }
            }
            MeshTweak::InboundLocalhost => {
                if let Some(m) = mesh.as_object_mut() {
                    m.insert("inboundTrafficPolicy".into(), json!({"mode": "LOCALHOST"}));
                }
            }
            MeshTweak::OtelSemconv => {
                if let Some(Value::Array(eps)) = mesh.get_mut("extensionProviders") {
                    eps.push(json!({"name": "otel", "opentelemetry": {
                        "service": "otel-collector.observability.svc.cluster.local",
                        "port": 4317,
                        "serviceAttributeEnrichment": "OTEL_SEMANTIC_CONVENTIONS"}}));
                }
            }
        }
    }
}

fn c(input: &'static str, want: &str) -> Case {
    Case {
        input,
        want: want.to_string(),
        ..Default::default()
    }
}

pub fn explicit_cases() -> Vec<Case> {
    let hold = vec!["values.global.proxy.holdApplicationUntilProxyStarts=true"];
    let status = vec![
        "values.global.proxy.statusPort=123",
        "values.global.proxy.readinessInitialDelaySeconds=100",
        "values.global.proxy.readinessPeriodSeconds=200",
        "values.global.proxy.readinessFailureThreshold=300",
    ];
    let openshift = |input: &'static str| Case {
        flags: vec!["components.cni.enabled=true"],
        skip_kube_inject: true,
        openshift: true,
        ..c(input, &format!("{input}.injected"))
    };
    let bad = |input: &'static str, err: &'static str| Case {
        expected_error: Some(err),
        ..c(input, "")
    };
    vec![
        Case {
            flags: vec![
                "components.cni.enabled=true",
                "values.cni.provider=default",
                "values.global.network=network1",
            ],
            ..c("hello.yaml", "hello.yaml.cni.injected")
        },
        Case {
            flags: vec!["values.global.proxy.image=proxyTest"],
            ..c("hello.yaml", "hello.yaml.proxyImageName.injected")
        },
        Case {
            flags: vec!["values.global.proxy_init.image=proxyInitTest"],
            ..c("hello.yaml", "hello.yaml.proxyInitImageName.injected")
        },
        Case {
            mesh: Some(MeshTweak::Tproxy),
            ..c("hello.yaml", "hello-tproxy.yaml.injected")
        },
        Case {
            flags: vec!["values.global.imagePullPolicy=Always"],
            ..c("hello.yaml", "hello-always.yaml.injected")
        },
        Case {
            flags: vec!["values.global.imagePullPolicy=Never"],
            ..c("hello.yaml", "hello-never.yaml.injected")
        },
        Case {
            native_disabled: true,
            ..c("hello.yaml", "hello-old-version.yaml.injected")
        },
        Case {
            mesh: Some(MeshTweak::DrainDuration23s),
            ..c("format-duration.yaml", "format-duration.yaml.injected")
        },
        Case {
            flags: vec![
                "values.global.proxy.includeIPRanges=127.0.0.1/24,10.96.0.1/24",
                "values.global.proxy.excludeIPRanges=10.96.0.2/24,10.96.0.3/24",
                "values.global.proxy.excludeInboundPorts=4,5,6",
                "values.global.proxy.statusPort=0",
            ],
            ..c("traffic-params.yaml", "traffic-params.yaml.injected")
        },
        Case {
            flags: status.clone(),
            ..c("status_params.yaml", "status_params.yaml.injected")
        },
        Case {
            flags: status.clone(),
            ..c(
                "kubevirtInterfaces.yaml",
                "kubevirtInterfaces.yaml.injected",
            )
        },
        Case {
            flags: status,
            ..c(
                "reroute-virtual-interfaces.yaml",
                "reroute-virtual-interfaces.yaml.injected",
            )
        },
        Case {
            iop: Some("hello-image-secrets-in-values.iop.yaml"),
            ..c("hello.yaml", "hello-image-secrets-in-values.yaml.injected")
        },
        Case {
            iop: Some("hello-image-secrets-in-values.iop.yaml"),
            ..c(
                "hello-image-pull-secret.yaml",
                "hello-multiple-image-secrets.yaml.injected",
            )
        },
        Case {
            iop: Some("hello-template-in-values.iop.yaml"),
            ..c("hello.yaml", "hello-template-in-values.yaml.injected")
        },
        Case {
            flags: vec!["values.global.mountMtlsCerts=true"],
            ..c("hello.yaml", "hello-mount-mtls-certs.yaml.injected")
        },
        Case {
            flags: vec!["components.cni.enabled=true", "values.cni.provider=multus"],
            ..c("hello.yaml", "hello-cncf-networks.yaml.injected")
        },
        Case {
            flags: vec!["components.cni.enabled=true", "values.cni.provider=multus"],
            ..c(
                "hello-existing-cncf-networks.yaml",
                "hello-existing-cncf-networks.yaml.injected",
            )
        },
        Case {
            flags: vec!["components.cni.enabled=true", "values.cni.provider=multus"],
            ..c(
                "hello-existing-cncf-networks-json.yaml",
                "hello-existing-cncf-networks-json.yaml.injected",
            )
        },
        Case {
            flags: hold.clone(),
            ..c("hello.yaml", "hello.proxyHoldsApplication.yaml.injected")
        },
        Case {
            flags: hold.clone(),
            ..c(
                "hello-probes.yaml",
                "hello-probes.proxyHoldsApplication.yaml.injected",
            )
        },
        c(
            "hello-probes-proxyHoldApplication-ProxyConfig.yaml",
            "hello-probes-proxyHoldApplication-ProxyConfig.yaml.injected",
        ),
        Case {
            flags: hold.clone(),
            ..c(
                "hello-probes-noProxyHoldApplication-ProxyConfig.yaml",
                "hello-probes-noProxyHoldApplication-ProxyConfig.yaml.injected",
            )
        },
        Case {
            skip_webhook: true,
            ..c("hello-service.yaml", "hello-service.yaml.injected")
        },
        Case {
            skip_webhook: true,
            ..c("cronjob.yaml", "cronjob.yaml.injected")
        },
        Case {
            native_disabled: true,
            skip_webhook: true,
            ..c("cronjob.yaml", "cronjob-old-version.yaml.injected")
        },
        Case {
            native_disabled: true,
            ..c("daemonset.yaml", "daemonset-old-version.yaml.injected")
        },
        Case {
            native_disabled: true,
            ..c("job.yaml", "job-old-version.yaml.injected")
        },
        Case {
            native_disabled: true,
            ..c("pod.yaml", "pod-old-version.yaml.injected")
        },
        Case {
            native_disabled: true,
            ..c("replicaset.yaml", "replicaset-old-version.yaml.injected")
        },
        Case {
            native_disabled: true,
            ..c("statefulset.yaml", "statefulset-old-version.yaml.injected")
        },
        bad(
            "traffic-annotations-bad-includeipranges.yaml",
            "includeipranges",
        ),
        bad(
            "traffic-annotations-bad-excludeipranges.yaml",
            "excludeipranges",
        ),
        bad(
            "traffic-annotations-bad-includeinboundports.yaml",
            "includeinboundports",
        ),
        bad(
            "traffic-annotations-bad-excludeinboundports.yaml",
            "excludeinboundports",
        ),
        bad(
            "traffic-annotations-bad-excludeoutboundports.yaml",
            "excludeoutboundports",
        ),
        Case {
            mesh: Some(MeshTweak::TlsClientKeyMetadata),
            ..c(
                "traffic-annotations.yaml",
                "traffic-annotations.yaml.injected",
            )
        },
        c("proxy-override.yaml", "proxy-override.yaml.injected"),
        c(
            "explicit-security-context.yaml",
            "explicit-security-context.yaml.injected",
        ),
        c(
            "only-proxy-container.yaml",
            "only-proxy-container.yaml.injected",
        ),
        c(
            "proxy-override-args.yaml",
            "proxy-override-args.yaml.injected",
        ),
        c(
            "proxy-override-runas.yaml",
            "proxy-override-runas.yaml.injected",
        ),
        Case {
            flags: vec!["components.cni.enabled=true"],
            ..c(
                "proxy-override-runas.yaml",
                "proxy-override-runas.yaml.cni.injected",
            )
        },
        Case {
            mesh: Some(MeshTweak::Tproxy),
            ..c(
                "proxy-override-runas.yaml",
                "proxy-override-runas.yaml.tproxy.injected",
            )
        },
        c(
            "proxy-override-args.yaml",
            "proxy-override-args-native.yaml.injected",
        ),
        c("gateway.yaml", "gateway.yaml.injected"),
        c("native-sidecar.yaml", "native-sidecar.yaml.injected"),
        Case {
            native_disabled: true,
            ..c(
                "native-sidecar.yaml",
                "native-sidecar-old-version.yaml.injected",
            )
        },
        c(
            "native-sidecar-opt-in.yaml",
            "native-sidecar-opt-in.yaml.injected",
        ),
        Case {
            native_disabled: true,
            ..c(
                "native-sidecar-opt-in.yaml",
                "native-sidecar-opt-in.yaml.injected",
            )
        },
        c(
            "native-sidecar-opt-out.yaml",
            "native-sidecar-opt-out.yaml.injected",
        ),
        Case {
            native_disabled: true,
            ..c(
                "native-sidecar-opt-out.yaml",
                "native-sidecar-opt-out.yaml.injected",
            )
        },
        Case {
            iop: Some("custom-template.iop.yaml"),
            ..c("custom-template.yaml", "custom-template.yaml.injected")
        },
        c("tcp-probes.yaml", "tcp-probes.yaml.injected"),
        Case {
            expected_log: Some(
                "Skipping injection because Deployment \"sample/hello-host-network\" has host networking enabled",
            ),
            ..c(
                "hello-host-network-with-ns.yaml",
                "hello-host-network-with-ns.yaml.injected",
            )
        },
        Case {
            flags: hold,
            ..c("merge-probers.yaml", "merge-probers.yaml.injected")
        },
        Case {
            mesh: Some(MeshTweak::EmptyTracing),
            ..c(
                "hello-tracing-disabled.yaml",
                "hello-tracing-disabled.yaml.injected",
            )
        },
        c(
            "truncate-canonical-name-pod.yaml",
            "truncate-canonical-name-pod.yaml.injected",
        ),
        c(
            "truncate-canonical-name-custom-controller-pod.yaml",
            "truncate-canonical-name-custom-controller-pod.yaml.injected",
        ),
        openshift("hello-openshift.yaml"),
        openshift("hello-openshift-custom-injection.yaml"),
        openshift("hello-openshift-tproxy.yaml"),
        Case {
            mesh: Some(MeshTweak::InboundLocalhost),
            ..c(
                "hello-probes-localhost.yaml",
                "hello-probes-localhost.yaml.injected",
            )
        },
        Case {
            iop: Some("proxy-resources-null.iop.yaml"),
            ..c(
                "proxy-resources-null.yaml",
                "proxy-resources-null.yaml.injected",
            )
        },
        Case {
            iop: Some("proxy-resources-null.iop.yaml"),
            ..c(
                "proxy-resources-null-no-init.yaml",
                "proxy-resources-null-no-init.yaml.injected",
            )
        },
        Case {
            iop: Some("proxy-resources-zero.iop.yaml"),
            ..c(
                "proxy-resources-zero.yaml",
                "proxy-resources-zero.yaml.injected",
            )
        },
        Case {
            iop: Some("proxy-resources-memory-null.iop.yaml"),
            ..c(
                "proxy-resources-memory-null.yaml",
                "proxy-resources-memory-null.yaml.injected",
            )
        },
        Case {
            iop: Some("proxy-resources-mixed-null.iop.yaml"),
            ..c(
                "proxy-resources-mixed-null.yaml",
                "proxy-resources-mixed-null.yaml.injected",
            )
        },
        Case {
            iop: Some("spire-template.iop.yaml"),
            ..c("sidecar-spire.yaml", "sidecar-spire.yaml.injected")
        },
        Case {
            iop: Some("spire-template.iop.yaml"),
            ..c("gateway-spire.yaml", "gateway-spire.yaml.injected")
        },
        Case {
            mesh: Some(MeshTweak::OtelSemconv),
            ..c(
                "hello-otel-semconv.yaml",
                "hello-otel-semconv.yaml.injected",
            )
        },
        Case {
            fips: true,
            ..c("hello.yaml", "hello-fips-140-3.yaml.injected")
        },
    ]
}
