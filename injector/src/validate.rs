// SPDX-License-Identifier: Apache-2.0
//! Validation of the pod annotations injection reads (Istio's `AnnotationValidation`). Invalid
//! values reject the pod with a message naming the annotation.

use std::net::IpAddr;

use serde_json::{Map, Value};

type Check = fn(&str) -> Result<(), String>;

const CHECKS: &[(&str, Check)] = &[
    ("sidecar.istio.io/interceptionMode", interception_mode),
    ("status.sidecar.istio.io/port", status_port),
    (
        "readiness.status.sidecar.istio.io/initialDelaySeconds",
        uint32,
    ),
    ("readiness.status.sidecar.istio.io/periodSeconds", uint32),
    ("readiness.status.sidecar.istio.io/failureThreshold", uint32),
    (
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        include_ip_ranges,
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        exclude_ip_ranges,
    ),
    (
        "traffic.sidecar.istio.io/includeInboundPorts",
        include_inbound_ports,
    ),
    (
        "traffic.sidecar.istio.io/excludeInboundPorts",
        exclude_inbound_ports,
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        exclude_outbound_ports,
    ),
    ("traffic.sidecar.istio.io/excludeInterfaces", interfaces),
    ("traffic.sidecar.istio.io/kubevirtInterfaces", interfaces),
    ("istio.io/reroute-virtual-interfaces", interfaces),
    ("prometheus.istio.io/merge-metrics", boolean),
    ("proxy.istio.io/config", proxy_config),
    ("sidecar.istio.io/proxyCPU", quantity),
    ("sidecar.istio.io/proxyMemory", quantity),
    ("sidecar.istio.io/proxyCPULimit", quantity),
    ("sidecar.istio.io/proxyMemoryLimit", quantity),
];

/// Validates all known annotations; the error lists every invalid one (like Go's multierror).
pub fn validate_annotations(annos: &Map<String, Value>) -> Result<(), String> {
    let mut errs = Vec::new();
    for (name, check) in CHECKS {
        if let Some(v) = annos.get(*name) {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if let Err(e) = check(&v) {
                errs.push(format!("invalid value '{v}' for annotation '{name}': {e}"));
            }
        }
    }
    if errs.is_empty() {
        return Ok(());
    }
    let n = errs.len();
    let plural = if n == 1 { "error" } else { "errors" };
    let body: Vec<String> = errs.iter().map(|e| format!("\t* {e}")).collect();
    Err(format!("{n} {plural} occurred:\n{}\n\n", body.join("\n")))
}

fn interception_mode(m: &str) -> Result<(), String> {
    match m {
        "REDIRECT" | "TPROXY" | "NONE" => Ok(()),
        _ => Err(format!(
            "interceptionMode invalid, use REDIRECT,TPROXY,NONE: {m}"
        )),
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    p.trim()
        .parse::<u16>()
        .map_err(|e| format!("failed parsing port '{p}': {e}"))
}

fn port_list(name: &str, ports: &str) -> Result<(), String> {
    let ports = ports.trim();
    if ports.is_empty() {
        return Ok(());
    }
    for p in ports.split(',') {
        parse_port(p).map_err(|e| format!("{name} invalid: failed parsing port '{p}': {e}"))?;
    }
    Ok(())
}

fn status_port(p: &str) -> Result<(), String> {
    parse_port(p)
        .map(|_| ())
        .map_err(|e| format!("excludeInboundPorts invalid: {e}"))
}

fn uint32(v: &str) -> Result<(), String> {
    v.parse::<u32>()
        .map(|_| ())
        .map_err(|e| format!("strconv.ParseUint: parsing {v:?}: {e}"))
}

fn boolean(v: &str) -> Result<(), String> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" | "0" | "f" | "F" | "FALSE" | "false"
        | "False" => Ok(()),
        _ => Err(format!("strconv.ParseBool: parsing {v:?}: invalid syntax")),
    }
}

fn cidr_list(cidrs: &str) -> Result<(), String> {
    if cidrs.is_empty() {
        return Ok(());
    }
    for c in cidrs.split(',') {
        let Some((ip, bits)) = c.split_once('/') else {
            return Err(format!(
                "failed parsing cidr '{c}': netip.ParsePrefix({c:?}): no '/'"
            ));
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("failed parsing cidr '{c}': netip.ParsePrefix({c:?}): bad IP"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match bits.parse::<u8>() {
            Ok(b)
                if b <= max
                    && !bits.starts_with('+')
                    && (bits == "0" || !bits.starts_with('0')) => {}
            _ => {
                return Err(format!(
                    "failed parsing cidr '{c}': netip.ParsePrefix({c:?}): bad bits after slash: {bits:?}"
                ));
            }
        }
    }
    Ok(())
}

fn include_ip_ranges(v: &str) -> Result<(), String> {
    if v == "*" {
        return Ok(());
    }
    cidr_list(v).map_err(|e| format!("includeIPRanges invalid: {e}"))
}

fn exclude_ip_ranges(v: &str) -> Result<(), String> {
    cidr_list(v).map_err(|e| format!("excludeIPRanges invalid: {e}"))
}

fn include_inbound_ports(v: &str) -> Result<(), String> {
    if v == "*" {
        return Ok(());
    }
    port_list("includeInboundPorts", v)
}

fn exclude_inbound_ports(v: &str) -> Result<(), String> {
    port_list("excludeInboundPorts", v)
}

fn exclude_outbound_ports(v: &str) -> Result<(), String> {
    port_list("excludeOutboundPorts", v)
}

fn interfaces(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    for i in v.split(',') {
        let i = i.trim();
        if i.is_empty() {
            return Err("empty interface name".into());
        }
        if i.len() > 15 {
            return Err(format!("interface name {i:?} too long (max 15 chars)"));
        }
        let mut chars = i.chars();
        let ok_first = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
        if !ok_first || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
            return Err(format!("interface name {i:?} contains invalid characters"));
        }
    }
    Ok(())
}

fn proxy_config(v: &str) -> Result<(), String> {
    let parsed: Value = serde_yaml::from_str(v)
        .map_err(|e| format!("failed to convert to apply proxy config: {e}"))?;
    crate::meshcfg::merge_proxy_config(&crate::meshcfg::default_proxy_config(), &parsed)
        .map(|_| ())
        .map_err(|e| format!("failed to convert to apply proxy config: {e}"))
}

fn quantity(v: &str) -> Result<(), String> {
    if v.chars().any(char::is_control) {
        return Err("value contains control characters".into());
    }
    crate::quantity::validate(v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_bad_annotation() {
        let mut m = Map::new();
        m.insert(
            "traffic.sidecar.istio.io/includeOutboundIPRanges".into(),
            Value::String("bad".into()),
        );
        let e = validate_annotations(&m).unwrap_err();
        assert!(e.to_lowercase().contains("includeipranges"), "{e}");
        assert!(
            e.contains("traffic.sidecar.istio.io/includeOutboundIPRanges"),
            "{e}"
        );
    }
}
