// SPDX-License-Identifier: Apache-2.0
//! The capture rules (istio-iptables' `capture.Run`) and how they are applied: verify the current
//! state, reconcile or clean up, `iptables-restore --noflush`, then the TPROXY routes.

use super::Error;
use super::builder::{
    IP_VERSION_SPECIFIC as IPV, RuleBuilder, State, state_from_save, state_is_empty,
};
use super::config::{
    Config, InterceptFilter, NetworkRange, parse_intercept_filter, separate_v4_v6, split,
};
use super::deps::{Deps, Tool, Version};

const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
const ISTIO_DIVERT: &str = "ISTIO_DIVERT";
const ISTIO_TPROXY: &str = "ISTIO_TPROXY";
const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
const ISTIO_DROP: &str = "ISTIO_DROP";
/// The agent's DNS proxy.
const DNS_PORT: &str = "15053";
/// TPROXY: marks the sidecar's outbound-to-inbound packets so they are not captured again.
const OUTBOUND_MARK: &str = "1338";
const V6_LOOPBACK: &str = "::1/128";

/// Builds every rule for `cfg`, in istio-iptables' order.
pub fn build(cfg: &Config) -> Result<RuleBuilder, Error> {
    let mut b = RuleBuilder::new(cfg.enable_ipv6);
    let (ex4, ex6) = separate_v4_v6(
        &cfg.outbound_ip_ranges_exclude,
        "--istio-service-exclude-cidr (-x)",
    )?;
    if ex4.wildcard {
        return Err(Error::Config(
            "--istio-service-exclude-cidr (-x): \"*\" is not allowed".into(),
        ));
    }
    let (in4, in6) = separate_v4_v6(&cfg.outbound_ip_ranges_include, "--istio-service-cidr (-i)")?;
    // DNS capture needs somewhere to capture to.
    let redirect_dns = cfg.redirect_dns
        && (cfg.capture_all_dns
            || !cfg.dns_servers_v4.is_empty()
            || !cfg.dns_servers_v6.is_empty());
    if cfg.redirect_dns && !redirect_dns {
        eprintln!(
            "pingsail-agent iptables: DNS capture is on, but not for all DNS and no DNS server is known: DNS capture disabled"
        );
    }
    let lo4 = cfg.host_ipv4_loopback_cidr.as_str();
    let tunnel = cfg.inbound_tunnel_port.as_str();

    for nic in split(&cfg.exclude_interfaces) {
        b.append("PREROUTING", "nat", &format!("-i {nic} -j RETURN"));
        b.append("OUTPUT", "nat", &format!("-o {nic} -j RETURN"));
    }
    if cfg.tproxy {
        for nic in split(&cfg.exclude_interfaces) {
            b.append("PREROUTING", "mangle", &format!("-i {nic} -j RETURN"));
            b.append("OUTPUT", "mangle", &format!("-o {nic} -j RETURN"));
        }
    }
    // Virtual interfaces: inbound from them is handled as outbound (below), never as inbound.
    for nic in split(&cfg.reroute_virtual_interfaces) {
        b.insert("PREROUTING", "nat", 1, &format!("-i {nic} -j RETURN"));
    }
    if cfg.drop_invalid {
        b.append(
            "PREROUTING",
            "mangle",
            &format!("-m conntrack --ctstate INVALID -j {ISTIO_DROP}"),
        );
        b.append(ISTIO_DROP, "mangle", "-j DROP");
    }
    b.append(
        ISTIO_INBOUND,
        "nat",
        &format!("-p tcp --dport {tunnel} -j RETURN"),
    );
    b.append(
        ISTIO_REDIRECT,
        "nat",
        &format!("-p tcp -j REDIRECT --to-ports {}", cfg.proxy_port),
    );
    let to_inbound = format!("-p tcp -j REDIRECT --to-ports {}", cfg.inbound_capture_port);
    b.append(ISTIO_IN_REDIRECT, "nat", &to_inbound);
    inbound(cfg, &mut b);

    b.append("OUTPUT", "nat", &format!("-j {ISTIO_OUTPUT}"));
    for port in split(&cfg.outbound_ports_exclude) {
        b.append(
            ISTIO_OUTPUT,
            "nat",
            &format!("-p tcp --dport {port} -j RETURN"),
        );
        b.append(
            ISTIO_OUTPUT,
            "nat",
            &format!("-p udp --dport {port} -j RETURN"),
        );
    }
    // The inbound passthrough's source address: its connections to the app are not captured.
    let rule = format!("-o lo -s {IPV} -j RETURN");
    b.append_versioned("127.0.0.6/32", "::6/128", ISTIO_OUTPUT, "nat", &rule);

    let loopback_included = in4.has_loopback || in6.has_loopback;
    for (owner, ids) in [
        ("--uid-owner", &cfg.proxy_uid),
        ("--gid-owner", &cfg.proxy_gid),
    ] {
        for id in split(ids) {
            // The sidecar calling its own pod through a service VIP comes back through the inbound
            // listener (app -> sidecar out -> sidecar in -> app). With DNS capture the agent's DNS
            // (53) is left out — for uids only, as istio-iptables does.
            let ports = if redirect_dns && owner == "--uid-owner" {
                format!("-m multiport ! --dports 53,{tunnel}")
            } else {
                format!("! --dport {tunnel}")
            };
            let rule = format!(
                "-o lo ! -d {IPV} -p tcp {ports} -m owner {owner} {id} -j {ISTIO_IN_REDIRECT}"
            );
            b.append_versioned(lo4, V6_LOOPBACK, ISTIO_OUTPUT, "nat", &rule);
            // The app calling itself over loopback is left alone, unless loopback was explicitly
            // included; TCP DNS to a local server stays capturable.
            if !loopback_included {
                let dns = if redirect_dns {
                    "-p tcp ! --dport 53 "
                } else {
                    ""
                };
                b.append(
                    ISTIO_OUTPUT,
                    "nat",
                    &format!("-o lo {dns}-m owner ! {owner} {id} -j RETURN"),
                );
            }
            // Everything else the sidecar sends is never captured (no loops).
            b.append(
                ISTIO_OUTPUT,
                "nat",
                &format!("-m owner {owner} {id} -j RETURN"),
            );
        }
    }

    let groups = parse_intercept_filter(&cfg.owner_groups_include, &cfg.owner_groups_exclude);
    owner_groups(&groups, &mut b);
    if redirect_dns {
        dns(cfg, &mut b);
    }

    // Loopback traffic (sidecar-aware apps, container to container) is not captured.
    b.append_versioned(
        lo4,
        V6_LOOPBACK,
        ISTIO_OUTPUT,
        "nat",
        &format!("-d {IPV} -j RETURN"),
    );
    for c in &ex4.cidrs {
        b.append_v4(ISTIO_OUTPUT, "nat", &format!("-d {c} -j RETURN"));
    }
    for c in &ex6.cidrs {
        b.append_v6(ISTIO_OUTPUT, "nat", &format!("-d {c} -j RETURN"));
    }
    for port in split(&cfg.outbound_ports_include) {
        b.append(
            ISTIO_OUTPUT,
            "nat",
            &format!("-p tcp --dport {port} -j {ISTIO_REDIRECT}"),
        );
    }
    outbound_include(cfg, &in4, false, &mut b);
    outbound_include(cfg, &in6, true, &mut b);
    if cfg.tproxy {
        tproxy_marks(cfg, &mut b);
    }
    Ok(b)
}

fn inbound(cfg: &Config, b: &mut RuleBuilder) {
    if cfg.inbound_ports_include.is_empty() {
        return;
    }
    let table = if cfg.tproxy { "mangle" } else { "nat" };
    let mark = cfg.inbound_tproxy_mark.as_str();
    if cfg.tproxy {
        // Marked packets are routed to loopback (see the TPROXY routes) to reach the sidecar.
        b.append(
            ISTIO_DIVERT,
            "mangle",
            &format!("-j MARK --set-mark {mark}"),
        );
        b.append(ISTIO_DIVERT, "mangle", "-j ACCEPT");
        let on_port = &cfg.inbound_capture_port;
        let rule = format!(
            "! -d {IPV} -p tcp -j TPROXY --tproxy-mark {mark}/0xffffffff --on-port {on_port}"
        );
        b.append_versioned(
            &cfg.host_ipv4_loopback_cidr,
            V6_LOOPBACK,
            ISTIO_TPROXY,
            "mangle",
            &rule,
        );
    }
    b.append("PREROUTING", table, &format!("-p tcp -j {ISTIO_INBOUND}"));
    let established = "-m conntrack --ctstate RELATED,ESTABLISHED";
    if cfg.inbound_ports_include == "*" {
        for port in split(&cfg.inbound_ports_exclude) {
            b.append(
                ISTIO_INBOUND,
                table,
                &format!("-p tcp --dport {port} -j RETURN"),
            );
        }
        if cfg.tproxy {
            b.append(
                ISTIO_INBOUND,
                "mangle",
                &format!("-p tcp {established} -j {ISTIO_DIVERT}"),
            );
            b.append(
                ISTIO_INBOUND,
                "mangle",
                &format!("-p tcp -j {ISTIO_TPROXY}"),
            );
        } else {
            b.append(
                ISTIO_INBOUND,
                "nat",
                &format!("-p tcp -j {ISTIO_IN_REDIRECT}"),
            );
        }
        return;
    }
    for port in split(&cfg.inbound_ports_include) {
        if cfg.tproxy {
            let divert = format!("-p tcp --dport {port} {established} -j {ISTIO_DIVERT}");
            b.append(ISTIO_INBOUND, "mangle", &divert);
            b.append(
                ISTIO_INBOUND,
                "mangle",
                &format!("-p tcp --dport {port} -j {ISTIO_TPROXY}"),
            );
        } else {
            let rule = format!("-p tcp --dport {port} -j {ISTIO_IN_REDIRECT}");
            b.append(ISTIO_INBOUND, "nat", &rule);
        }
    }
}

fn owner_groups(f: &InterceptFilter<'_>, b: &mut RuleBuilder) {
    if f.except {
        for g in &f.values {
            b.append(
                ISTIO_OUTPUT,
                "nat",
                &format!("-m owner --gid-owner {g} -j RETURN"),
            );
        }
    } else {
        // Only the listed groups are captured: one rule returns whatever is in none of them.
        let none_of: String = f
            .values
            .iter()
            .map(|g| format!("-m owner ! --gid-owner {g} "))
            .collect();
        b.append(ISTIO_OUTPUT, "nat", &format!("{none_of}-j RETURN"));
    }
}

fn dns(cfg: &Config, b: &mut RuleBuilder) {
    let (v4, v6) = (&cfg.dns_servers_v4, &cfg.dns_servers_v6);
    let all = cfg.capture_all_dns;
    b.append("OUTPUT", "raw", &format!("-j {ISTIO_OUTPUT_DNS}"));
    if all || !v4.is_empty() {
        b.append_v4(ISTIO_OUTPUT, "nat", &format!("-j {ISTIO_OUTPUT_DNS}"));
    }
    if all || !v6.is_empty() {
        b.append_v6(ISTIO_OUTPUT, "nat", &format!("-j {ISTIO_OUTPUT_DNS}"));
    }
    // (istio-iptables spells the UDP redirect `--to-port`.)
    for (proto, to) in [("tcp", "--to-ports"), ("udp", "--to-port")] {
        let redirect = format!("-j REDIRECT {to} {DNS_PORT}");
        if all {
            b.append(
                ISTIO_OUTPUT_DNS,
                "nat",
                &format!("-p {proto} --dport 53 {redirect}"),
            );
            continue;
        }
        for s in v4 {
            b.append_v4(
                ISTIO_OUTPUT_DNS,
                "nat",
                &format!("-p {proto} --dport 53 -d {s}/32 {redirect}"),
            );
        }
        for s in v6 {
            b.append_v6(
                ISTIO_OUTPUT_DNS,
                "nat",
                &format!("-p {proto} --dport 53 -d {s}/128 {redirect}"),
            );
        }
    }
    dns_conntrack_zones(cfg, b);
}

/// UDP DNS in two conntrack zones (sidecar <-> upstream resolvers: 1; apps <-> sidecar: 2) so the
/// NATed and un-NATed flows of the same 5-tuple do not collide.
fn dns_conntrack_zones(cfg: &Config, b: &mut RuleBuilder) {
    for (owner, ids) in [
        ("--uid-owner", &cfg.proxy_uid),
        ("--gid-owner", &cfg.proxy_gid),
    ] {
        for id in split(ids) {
            let by = format!("-m owner {owner} {id}");
            b.append(
                ISTIO_OUTPUT_DNS,
                "raw",
                &format!("-p udp --dport 53 {by} -j CT --zone 1"),
            );
            b.append(
                ISTIO_OUTPUT_DNS,
                "raw",
                &format!("-p udp --sport {DNS_PORT} {by} -j CT --zone 2"),
            );
        }
    }
    if cfg.capture_all_dns {
        b.append("PREROUTING", "raw", &format!("-j {ISTIO_INBOUND}"));
        b.append(ISTIO_OUTPUT_DNS, "raw", "-p udp --dport 53 -j CT --zone 2");
        b.append(ISTIO_INBOUND, "raw", "-p udp --sport 53 -j CT --zone 1");
        return;
    }
    if !cfg.dns_servers_v4.is_empty() {
        b.append_v4("PREROUTING", "raw", &format!("-j {ISTIO_INBOUND}"));
    }
    for s in &cfg.dns_servers_v4 {
        b.append_v4(
            ISTIO_OUTPUT_DNS,
            "raw",
            &format!("-p udp --dport 53 -d {s}/32 -j CT --zone 2"),
        );
        b.append_v4(
            ISTIO_INBOUND,
            "raw",
            &format!("-p udp --sport 53 -s {s}/32 -j CT --zone 1"),
        );
    }
    if !cfg.dns_servers_v6.is_empty() {
        b.append_v6("PREROUTING", "raw", &format!("-j {ISTIO_INBOUND}"));
    }
    for s in &cfg.dns_servers_v6 {
        b.append_v6(
            ISTIO_OUTPUT_DNS,
            "raw",
            &format!("-p udp --dport 53 -d {s}/128 -j CT --zone 2"),
        );
        b.append_v6(
            ISTIO_INBOUND,
            "raw",
            &format!("-p udp --sport 53 -s {s}/128 -j CT --zone 1"),
        );
    }
}

fn outbound_include(cfg: &Config, range: &NetworkRange, v6: bool, b: &mut RuleBuilder) {
    let append = |b: &mut RuleBuilder, rule: &str| {
        if v6 {
            b.append_v6(ISTIO_OUTPUT, "nat", rule)
        } else {
            b.append_v4(ISTIO_OUTPUT, "nat", rule)
        }
    };
    let insert = |b: &mut RuleBuilder, rule: &str| {
        if v6 {
            b.insert_v6("PREROUTING", "nat", 1, rule)
        } else {
            b.insert_v4("PREROUTING", "nat", 1, rule)
        }
    };
    if range.wildcard {
        append(b, &format!("-j {ISTIO_REDIRECT}"));
        for nic in split(&cfg.reroute_virtual_interfaces) {
            insert(b, &format!("-i {nic} -j {ISTIO_REDIRECT}"));
        }
        return;
    }
    for c in &range.cidrs {
        for nic in split(&cfg.reroute_virtual_interfaces) {
            insert(b, &format!("-i {nic} -d {c} -j {ISTIO_REDIRECT}"));
        }
        append(b, &format!("-d {c} -j {ISTIO_REDIRECT}"));
    }
}

fn tproxy_marks(cfg: &Config, b: &mut RuleBuilder) {
    let mark = cfg.inbound_tproxy_mark.as_str();
    let lo4 = cfg.host_ipv4_loopback_cidr.as_str();
    // Keep the mark the sidecar's original_src sets on the connection.
    b.append(
        "PREROUTING",
        "mangle",
        &format!("-p tcp -m mark --mark {mark} -j CONNMARK --save-mark"),
    );
    b.append(
        "OUTPUT",
        "mangle",
        &format!("-p tcp -o lo -m mark --mark {mark} -j RETURN"),
    );
    for (owner, ids) in [
        ("--uid-owner", &cfg.proxy_uid),
        ("--gid-owner", &cfg.proxy_gid),
    ] {
        for id in split(ids) {
            // The sidecar's outbound to its own pod: marked so inbound capture lets it through.
            let rule = format!(
                "! -d {IPV} -p tcp -o lo -m owner {owner} {id} -j MARK --set-mark {OUTBOUND_MARK}"
            );
            b.append_versioned(lo4, V6_LOOPBACK, "OUTPUT", "mangle", &rule);
        }
    }
    let restore = format!("-p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark");
    b.append("OUTPUT", "mangle", &restore);
    b.insert(
        ISTIO_INBOUND,
        "mangle",
        1,
        &format!("-p tcp -m mark --mark {mark} -j RETURN"),
    );
    b.insert_v4(
        ISTIO_INBOUND,
        "mangle",
        2,
        "-p tcp -s 127.0.0.6/32 -i lo -j RETURN",
    );
    b.insert_v6(
        ISTIO_INBOUND,
        "mangle",
        2,
        "-p tcp -s ::6/128 -i lo -j RETURN",
    );
    let app_to_app = format!("-p tcp -i lo -m mark ! --mark {OUTBOUND_MARK} -j RETURN");
    b.insert(ISTIO_INBOUND, "mangle", 3, &app_to_app);
}

/// Where the current rules stand against the planned ones.
struct Verdict {
    /// rules from an earlier run (of any configuration) are present
    residue: bool,
    /// the present rules differ from the planned ones
    delta: bool,
}

fn verify(b: &RuleBuilder, deps: &mut dyn Deps, v4: &Version, v6: Option<&Version>) -> Verdict {
    let mut global_residue = false;
    let mut global_delta = false;
    for (family_v6, ver) in [(false, Some(v4)), (true, v6)] {
        let Some(ver) = ver else { continue };
        let expected = state_from_save(&b.restore(family_v6));
        let planned = !state_is_empty(&expected);
        let (residue, delta) = match deps.run(Tool::Save, ver, None, &[], true) {
            Err(e) => {
                eprintln!(
                    "pingsail-agent iptables: {} failed, assuming a clean state: {e}",
                    ver.name(Tool::Save)
                );
                (false, planned)
            }
            Ok(out) => {
                let current = state_from_save(&out);
                let residue = !state_is_empty(&current);
                let delta = if !residue {
                    planned
                } else {
                    differs(&expected, &current)
                        || b.checks(family_v6)
                            .iter()
                            .any(|c| deps.run(Tool::Iptables, ver, None, c, true).is_err())
                };
                (residue, delta)
            }
        };
        global_delta |= delta;
        global_residue |= residue && planned;
    }
    if !global_residue {
        return Verdict {
            residue: false,
            delta: true,
        };
    }
    Verdict {
        residue: true,
        delta: global_delta,
    }
}

/// Same tables, same chains, same number of rules in each of our chains, and none of our chains
/// in `current` that is not planned.
fn differs(expected: &State, current: &State) -> bool {
    for (table, chains) in expected {
        let Some(cur) = current.get(table) else {
            return true;
        };
        for (chain, rules) in chains {
            match cur.get(chain) {
                None => return true,
                Some(c) if chain.starts_with("ISTIO_") && c.len() != rules.len() => return true,
                _ => {}
            }
        }
    }
    current.iter().any(|(table, chains)| {
        chains.keys().any(|c| {
            c.starts_with("ISTIO_") && !expected.get(table).is_some_and(|e| e.contains_key(c))
        })
    })
}

fn run_all(
    deps: &mut dyn Deps,
    ver: &Version,
    cmds: &[Vec<String>],
    quiet: bool,
) -> Result<(), Error> {
    for c in cmds {
        deps.run(Tool::Iptables, ver, None, c, quiet)?;
    }
    Ok(())
}

fn try_all(deps: &mut dyn Deps, ver: &Version, cmds: &[Vec<String>]) {
    for c in cmds {
        let _ = deps.run(Tool::Iptables, ver, None, c, true);
    }
}

/// Applies (or with `--cleanup-only` removes) the rules for `cfg` through `deps`.
pub fn run(cfg: &Config, deps: &mut dyn Deps) -> Result<(), Error> {
    let v4 = deps.detect(false)?;
    let v6 = match deps.detect(true) {
        Ok(v) => Some(v),
        Err(e) if cfg.enable_ipv6 => return Err(e),
        Err(e) => {
            eprintln!(
                "pingsail-agent iptables: no working ip6tables ({e}); continuing, IPv6 is not enabled"
            );
            None
        }
    };
    let b = build(cfg)?;
    let result = execute(cfg, &b, deps, &v4, v6.as_ref());
    // The final state, for the log (best effort).
    if let Ok(s) = deps.run(Tool::Save, &v4, None, &[], true) {
        log_state("IPv4", &s);
    }
    if cfg.enable_ipv6
        && let Some(v6) = &v6
        && let Ok(s) = deps.run(Tool::Save, v6, None, &[], true)
    {
        log_state("IPv6", &s);
    }
    result
}

fn log_state(family: &str, s: &str) {
    if !s.is_empty() {
        eprintln!("pingsail-agent iptables: final iptables state ({family}):\n{s}");
    }
}

fn execute(
    cfg: &Config,
    b: &RuleBuilder,
    deps: &mut dyn Deps,
    v4: &Version,
    v6: Option<&Version>,
) -> Result<(), Error> {
    let v6_on = if cfg.enable_ipv6 { v6 } else { None };
    let verdict = verify(b, deps, v4, v6);
    let conflicting = verdict.residue && verdict.delta && !cfg.reconcile && !cfg.cleanup_only;
    if conflicting {
        eprintln!(
            "pingsail-agent iptables: different capture rules are already present and --reconcile is off; applying may fail"
        );
    }
    let mut guardrails = false;
    let result = (|| {
        if (verdict.residue && verdict.delta && cfg.reconcile) || cfg.cleanup_only {
            if !cfg.cleanup_only {
                // Drop all TCP/UDP while the rules are swapped, so nothing leaks uncaptured.
                for ver in std::iter::once(v4).chain(v6_on) {
                    try_all(deps, ver, &RuleBuilder::guardrails_cleanup());
                    run_all(deps, ver, &RuleBuilder::guardrails(), false)?;
                    guardrails = true;
                }
            }
            try_all(deps, v4, &b.cleanup(false));
            if let Some(v6) = v6_on {
                try_all(deps, v6, &b.cleanup(true));
            }
            if cfg.cleanup_only && !cfg.dry_run {
                // Also whatever an earlier run with other settings left behind.
                for ver in std::iter::once(v4).chain(v6) {
                    leftovers(deps, ver);
                }
            }
        }
        if (verdict.delta || cfg.force_apply) && !cfg.cleanup_only {
            deps.run(
                Tool::Restore,
                v4,
                Some(&b.restore(false)),
                &["--noflush".to_string()],
                false,
            )?;
            if let Some(v6) = v6_on {
                deps.run(
                    Tool::Restore,
                    v6,
                    Some(&b.restore(true)),
                    &["--noflush".to_string()],
                    false,
                )?;
            }
        }
        Ok(())
    })();
    let result = result.map_err(|e| match e {
        Error::Command { cmd, status, stderr } if conflicting => Error::Command {
            cmd,
            status,
            stderr: format!("{stderr} (capture rules from an earlier run with other settings are present: pass --reconcile to replace them, or --cleanup-only first)"),
        },
        e => e,
    });
    if guardrails {
        try_all(deps, v4, &RuleBuilder::guardrails_cleanup());
        if let Some(v6) = v6_on {
            try_all(deps, v6, &RuleBuilder::guardrails_cleanup());
        }
    }
    result
}

/// Removes every `ISTIO_*` chain and every jump to one still present.
fn leftovers(deps: &mut dyn Deps, ver: &Version) {
    if let Ok(out) = deps.run(Tool::Save, ver, None, &[], true) {
        let st = state_from_save(&out);
        try_all(deps, ver, &super::builder::cleanup_from_state(&st));
    }
}
