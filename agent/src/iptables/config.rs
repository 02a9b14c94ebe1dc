// SPDX-License-Identifier: Apache-2.0
//! Flags and their resolution into a [`Config`], with istio-iptables' names, short options,
//! environment variables and defaults.

use std::net::IpAddr;

use clap::builder::BoolishValueParser;

use super::Error;

/// `pingsail-agent iptables` flags. Every istio-iptables flag is accepted under its name, short
/// option and environment variable (flag > environment > default, as istio-iptables resolves them).
/// Options istio-iptables only reads from the environment also get a long flag here.
#[derive(clap::Args, Debug, Clone)]
#[command(
    about = "Set up iptables rules for the sidecar (istio-iptables equivalent)",
    args_override_self = true
)]
pub struct Args {
    /// Port to which all outbound TCP traffic is redirected (virtualOutbound).
    #[arg(short = 'p', long = "envoy-port", default_value = "15001")]
    pub proxy_port: String,
    /// Port to which all inbound TCP traffic is redirected (virtualInbound).
    #[arg(
        short = 'z',
        long,
        env = "INBOUND_CAPTURE_PORT",
        default_value = "15006"
    )]
    pub inbound_capture_port: String,
    /// The tunnel (HBONE) port: inbound TCP to it is never redirected.
    #[arg(
        short = 'e',
        long,
        env = "INBOUND_TUNNEL_PORT",
        default_value = "15008"
    )]
    pub inbound_tunnel_port: String,
    /// UID(s) whose traffic is not redirected (comma separated; default: the uid of $ENVOY_USER
    /// (istio-proxy), else 1337).
    #[arg(short = 'u', long, env = "PROXY_UID")]
    pub proxy_uid: Option<String>,
    /// GID(s) whose traffic is not redirected (default: the proxy UID).
    #[arg(short = 'g', long, env = "PROXY_GID")]
    pub proxy_gid: Option<String>,
    /// Inbound interception mode: REDIRECT or TPROXY.
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        env = "ISTIO_INBOUND_INTERCEPTION_MODE"
    )]
    pub inbound_interception_mode: Option<String>,
    /// Packet mark for TPROXY mode.
    #[arg(
        short = 't',
        long = "istio-inbound-tproxy-mark",
        env = "ISTIO_INBOUND_TPROXY_MARK",
        default_value = "1337"
    )]
    pub inbound_tproxy_mark: String,
    /// Routing table for TPROXY mode.
    #[arg(
        short = 'r',
        long = "istio-inbound-tproxy-route-table",
        env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        default_value = "133"
    )]
    pub inbound_tproxy_route_table: String,
    /// Inbound ports to redirect (comma separated, "*" for all, empty for none).
    #[arg(
        short = 'b',
        long = "istio-inbound-ports",
        env = "ISTIO_INBOUND_PORTS",
        default_value = ""
    )]
    pub inbound_ports_include: String,
    /// Inbound ports excluded from redirection (only with -b '*').
    #[arg(
        short = 'd',
        long = "istio-local-exclude-ports",
        env = "ISTIO_LOCAL_EXCLUDE_PORTS",
        default_value = ""
    )]
    pub inbound_ports_exclude: String,
    /// Interfaces whose traffic is never captured, in or out.
    #[arg(
        short = 'c',
        long = "istio-exclude-interfaces",
        env = "ISTIO_EXCLUDE_INTERFACES",
        default_value = ""
    )]
    pub exclude_interfaces: String,
    /// Outbound CIDRs to redirect ("*" for all, empty for none).
    #[arg(
        short = 'i',
        long = "istio-service-cidr",
        env = "ISTIO_SERVICE_CIDR",
        default_value = ""
    )]
    pub outbound_ip_ranges_include: String,
    /// Outbound CIDRs excluded from redirection.
    #[arg(
        short = 'x',
        long = "istio-service-exclude-cidr",
        env = "ISTIO_SERVICE_EXCLUDE_CIDR",
        default_value = ""
    )]
    pub outbound_ip_ranges_exclude: String,
    /// Outbound ports always redirected.
    #[arg(
        short = 'q',
        long = "istio-outbound-ports",
        env = "ISTIO_OUTBOUND_PORTS",
        default_value = ""
    )]
    pub outbound_ports_include: String,
    /// Outbound ports never redirected.
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = ""
    )]
    pub outbound_ports_exclude: String,
    /// Virtual interfaces whose inbound traffic is treated as outbound.
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        env = "KUBE_VIRT_INTERFACES",
        default_value = ""
    )]
    pub reroute_virtual_interfaces: String,
    /// pilot-agent's log scopes (`default:info`), as Istio's injector passes them; log levels
    /// come from RUST_LOG here.
    #[arg(long = "log_output_level", default_value = "default:info")]
    pub log_output_level: String,
    /// Print the commands and iptables-restore input instead of running them.
    #[arg(short = 'n', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub dry_run: Option<bool>,
    /// Capture DNS (port 53) to the agent on 15053 ($REDIRECT_DNS, $ISTIO_META_DNS_CAPTURE).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub redirect_dns: Option<bool>,
    /// Capture DNS to any server, not only those in /etc/resolv.conf.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub capture_all_dns: Option<bool>,
    /// Drop packets conntrack marks INVALID ($DROP_INVALID, $INVALID_DROP).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub drop_invalid: Option<bool>,
    /// Dual-stack pod: configure IPv6 too when the pod has both families ($DUAL_STACK, $ISTIO_DUAL_STACK).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub dual_stack: Option<bool>,
    /// Reconcile (clean up and re-apply) when different rules are already present.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub reconcile: Option<bool>,
    /// Remove our chains and rules and create nothing.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub cleanup_only: Option<bool>,
    /// Apply even when the rules appear to be in place already.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub force_apply: Option<bool>,
    /// Skip applying rules entirely.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub skip_rule_apply: Option<bool>,
    /// Validate the rules with a probe connection (istio-validation): not supported.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub run_validation: Option<bool>,
    /// Use native nftables instead of iptables: not supported.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub native_nftables: Option<bool>,
    /// Running from the CNI plugin (host filesystem); accepted, no effect.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub cni_mode: Option<bool>,
    /// Probe port for validation (accepted; validation is not supported).
    #[arg(long, env = "IPTABLES_PROBE_PORT", default_value = "15002")]
    pub iptables_probe_port: u16,
    /// Probe timeout for validation (accepted; validation is not supported).
    #[arg(long, env = "PROBE_TIMEOUT", default_value = "5s")]
    pub probe_timeout: String,
    /// Network namespace (path, e.g. /var/run/netns/NAME) to apply the rules in.
    #[arg(long, env = "NETWORK_NAMESPACE", default_value = "")]
    pub network_namespace: String,
    /// Which iptables binary family to use: legacy or nft (default: detect).
    #[arg(long, env = "FORCE_IPTABLES_BINARY", default_value = "")]
    pub force_iptables_binary: String,
    /// Groups whose outbound traffic is captured ("*" = all; istio: env only).
    #[arg(long, env = "ISTIO_OUTBOUND_OWNER_GROUPS", default_value = "*")]
    pub outbound_owner_groups: String,
    /// Groups whose outbound traffic is not captured (with groups "*"; istio: env only).
    #[arg(long, env = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", default_value = "")]
    pub outbound_owner_groups_exclude: String,
    /// The IPv4 loopback CIDR meaning "this pod" (istio: env only).
    #[arg(
        long,
        env = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        default_value = "127.0.0.1/32"
    )]
    pub outbound_ipv4_loopback_cidr: String,
    /// pingsail: also program IPv6 (ip6tables). Default: detected from the pod's addresses as
    /// istio-iptables does (IPv6 when the pod's address is IPv6).
    #[arg(long, env = "ENABLE_INBOUND_IPV6", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub enable_ipv6: Option<bool>,
    /// pingsail: the DNS servers to capture (comma separated; default: /etc/resolv.conf's).
    #[arg(long, env = "PINGSAIL_DNS_SERVERS")]
    pub dns_servers: Option<String>,
}

/// The resolved settings (istio-iptables' `config.Config`).
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy_port: String,
    pub inbound_capture_port: String,
    pub inbound_tunnel_port: String,
    pub proxy_uid: String,
    pub proxy_gid: String,
    pub tproxy: bool,
    pub inbound_tproxy_mark: String,
    pub inbound_tproxy_route_table: String,
    pub inbound_ports_include: String,
    pub inbound_ports_exclude: String,
    pub owner_groups_include: String,
    pub owner_groups_exclude: String,
    pub outbound_ports_include: String,
    pub outbound_ports_exclude: String,
    pub outbound_ip_ranges_include: String,
    pub outbound_ip_ranges_exclude: String,
    pub reroute_virtual_interfaces: String,
    pub exclude_interfaces: String,
    pub dry_run: bool,
    pub skip_rule_apply: bool,
    pub redirect_dns: bool,
    pub drop_invalid: bool,
    pub capture_all_dns: bool,
    pub enable_ipv6: bool,
    pub dns_servers_v4: Vec<String>,
    pub dns_servers_v6: Vec<String>,
    pub network_namespace: String,
    pub host_ipv4_loopback_cidr: String,
    pub reconcile: bool,
    pub cleanup_only: bool,
    pub force_apply: bool,
    pub force_iptables_binary: String,
}

/// `v` from the command line, else the first of `envs` set (later names win, as istio's
/// `AdditionalEnv` overrides the primary variable), else false.
fn flag_or_env(v: Option<bool>, envs: &[&str]) -> Result<bool, Error> {
    if let Some(v) = v {
        return Ok(v);
    }
    for name in envs.iter().rev() {
        if let Ok(raw) = std::env::var(name) {
            return parse_bool(&raw)
                .ok_or_else(|| Error::Config(format!("${name}={raw:?}: expected a boolean")));
        }
    }
    Ok(false)
}

/// Go's `strconv.ParseBool`.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// istio's `config.Split`: comma separated, empty items dropped.
pub fn split(s: &str) -> Vec<&str> {
    s.split(',').filter(|p| !p.is_empty()).collect()
}

/// A CIDR as istio-iptables parses and prints it (Go's `netip.ParsePrefix`: the address is kept
/// as written, host bits included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = s.split_once('/')?;
        let addr: IpAddr = a.parse().ok()?;
        if l.is_empty()
            || l.len() > 3
            || !l.bytes().all(|b| b.is_ascii_digit())
            || (l.len() > 1 && l.starts_with('0'))
        {
            return None;
        }
        let len: u8 = l.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Cidr { addr, len })
    }
}

/// istio's `NetworkRange` for one IP family.
#[derive(Debug, Default, Clone)]
pub struct NetworkRange {
    pub wildcard: bool,
    pub cidrs: Vec<Cidr>,
    pub has_loopback: bool,
}

/// Splits a CIDR list into its IPv4 and IPv6 parts ("*" = wildcard for both).
pub fn separate_v4_v6(list: &str, what: &str) -> Result<(NetworkRange, NetworkRange), Error> {
    if list == "*" {
        let w = NetworkRange {
            wildcard: true,
            ..NetworkRange::default()
        };
        return Ok((w.clone(), w));
    }
    let (mut v4, mut v6) = (NetworkRange::default(), NetworkRange::default());
    for item in split(list) {
        let c = Cidr::parse(item).ok_or_else(|| {
            Error::Config(format!("{what}: {item:?} is not a CIDR (address/length)"))
        })?;
        let r = if c.addr.is_ipv4() { &mut v4 } else { &mut v6 };
        r.has_loopback |= c.addr.is_loopback();
        r.cidrs.push(c);
    }
    Ok((v4, v6))
}

fn check_ports(list: &str, what: &str, allow_wildcard: bool) -> Result<(), Error> {
    if allow_wildcard && list == "*" {
        return Ok(());
    }
    for p in split(list) {
        let ok = match p.split_once(':') {
            Some((a, b)) => a.parse::<u16>().is_ok() && b.parse::<u16>().is_ok(),
            None => p.parse::<u16>().is_ok(),
        };
        if !ok {
            return Err(Error::Config(format!(
                "{what}: {p:?} is not a port (or a range lo:hi)"
            )));
        }
    }
    Ok(())
}

fn check_port(p: &str, what: &str) -> Result<(), Error> {
    p.parse::<u16>()
        .map(drop)
        .map_err(|_| Error::Config(format!("{what}: {p:?} is not a port")))
}

fn check_ids(list: &str, what: &str) -> Result<(), Error> {
    if split(list).is_empty() || split(list).iter().any(|id| id.parse::<u32>().is_err()) {
        return Err(Error::Config(format!(
            "{what}: {list:?} is not a comma separated list of numeric ids"
        )));
    }
    Ok(())
}

/// Istio limits included owner groups: they become one rule with one match per group.
const MAX_OWNER_GROUPS_INCLUDE: usize = 64;

impl Config {
    /// Resolves flags and environment the way istio-iptables does (`FillConfigFromEnvironment`,
    /// `Validate`), refusing what we do not support.
    pub fn resolve(a: Args) -> Result<Config, Error> {
        let redirect_dns =
            flag_or_env(a.redirect_dns, &["REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"])?;
        let capture_all_dns = flag_or_env(a.capture_all_dns, &["CAPTURE_ALL_DNS"])?;
        let dual_stack = flag_or_env(a.dual_stack, &["DUAL_STACK", "ISTIO_DUAL_STACK"])?;
        if flag_or_env(a.native_nftables, &["NATIVE_NFTABLES"])? {
            return Err(Error::Config(
                "--native-nftables: not supported (pingsail programs iptables only)".into(),
            ));
        }
        if flag_or_env(a.run_validation, &["RUN_VALIDATION"])? {
            return Err(Error::Config(
                "--run-validation: not supported yet (the istio-validation probe)".into(),
            ));
        }
        let _ = flag_or_env(a.cni_mode, &["CNI_MODE"])?;
        let _ = (a.iptables_probe_port, &a.probe_timeout);

        let mode = a.inbound_interception_mode.unwrap_or_default();
        let tproxy = match mode.as_str() {
            "" | "REDIRECT" => false,
            "TPROXY" => true,
            other => {
                return Err(Error::Config(format!(
                    "--istio-inbound-interception-mode (-m): {other:?}: expected REDIRECT or TPROXY"
                )));
            }
        };
        let proxy_uid = match a.proxy_uid.filter(|u| !u.is_empty()) {
            Some(u) => u,
            None => default_proxy_uid(),
        };
        let proxy_gid = a
            .proxy_gid
            .filter(|g| !g.is_empty())
            .unwrap_or_else(|| proxy_uid.clone());
        check_ids(&proxy_uid, "--proxy-uid (-u)")?;
        check_ids(&proxy_gid, "--proxy-gid (-g)")?;
        check_port(&a.proxy_port, "--envoy-port (-p)")?;
        check_port(&a.inbound_capture_port, "--inbound-capture-port (-z)")?;
        check_port(&a.inbound_tunnel_port, "--inbound-tunnel-port (-e)")?;
        check_ports(&a.inbound_ports_include, "--istio-inbound-ports (-b)", true)?;
        check_ports(
            &a.inbound_ports_exclude,
            "--istio-local-exclude-ports (-d)",
            false,
        )?;
        check_ports(
            &a.outbound_ports_include,
            "--istio-outbound-ports (-q)",
            false,
        )?;
        check_ports(
            &a.outbound_ports_exclude,
            "--istio-local-outbound-ports-exclude (-o)",
            false,
        )?;
        a.inbound_tproxy_mark.parse::<u32>().map_err(|_| {
            Error::Config(format!(
                "--istio-inbound-tproxy-mark (-t): {:?} is not a number",
                a.inbound_tproxy_mark
            ))
        })?;
        a.inbound_tproxy_route_table.parse::<u32>().map_err(|_| {
            Error::Config(format!(
                "--istio-inbound-tproxy-route-table (-r): {:?} is not a number",
                a.inbound_tproxy_route_table
            ))
        })?;
        separate_v4_v6(&a.outbound_ip_ranges_include, "--istio-service-cidr (-i)")?;
        separate_v4_v6(
            &a.outbound_ip_ranges_exclude,
            "--istio-service-exclude-cidr (-x)",
        )?;
        validate_owner_groups(&a.outbound_owner_groups, &a.outbound_owner_groups_exclude)?;
        validate_loopback_cidr(&a.outbound_ipv4_loopback_cidr)?;
        match a.force_iptables_binary.as_str() {
            "" | "legacy" | "nft" => {}
            other => {
                return Err(Error::Config(format!(
                    "--force-iptables-binary: {other:?}: expected legacy or nft"
                )));
            }
        }
        for (name, list) in [
            ("--istio-exclude-interfaces (-c)", &a.exclude_interfaces),
            ("--kube-virt-interfaces (-k)", &a.reroute_virtual_interfaces),
        ] {
            for ifname in split(list) {
                if ifname.len() > 15 || ifname.contains(['/', ' ']) {
                    return Err(Error::Config(format!(
                        "{name}: {ifname:?} is not an interface name"
                    )));
                }
            }
        }

        let enable_ipv6 = match a.enable_ipv6 {
            Some(v) => v,
            None => detect_ipv6(dual_stack, &a.network_namespace)?,
        };
        let (mut dns_servers_v4, mut dns_servers_v6) = (Vec::new(), Vec::new());
        if redirect_dns && !capture_all_dns {
            let servers = match &a.dns_servers {
                Some(list) => split(list).into_iter().map(str::to_string).collect(),
                None => resolv_conf_servers("/etc/resolv.conf")?,
            };
            for s in servers {
                match s.parse::<IpAddr>() {
                    Ok(IpAddr::V4(_)) => dns_servers_v4.push(s),
                    Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => {
                        dns_servers_v4.push(v6.to_ipv4_mapped().map(|v| v.to_string()).unwrap_or(s))
                    }
                    Ok(IpAddr::V6(_)) => dns_servers_v6.push(s),
                    Err(_) => {
                        return Err(Error::Config(format!(
                            "DNS server {s:?} is not an IP address"
                        )));
                    }
                }
            }
        }
        Ok(Config {
            proxy_port: a.proxy_port,
            inbound_capture_port: a.inbound_capture_port,
            inbound_tunnel_port: a.inbound_tunnel_port,
            proxy_uid,
            proxy_gid,
            tproxy,
            inbound_tproxy_mark: a.inbound_tproxy_mark,
            inbound_tproxy_route_table: a.inbound_tproxy_route_table,
            inbound_ports_include: a.inbound_ports_include,
            inbound_ports_exclude: a.inbound_ports_exclude,
            owner_groups_include: a.outbound_owner_groups,
            owner_groups_exclude: a.outbound_owner_groups_exclude,
            outbound_ports_include: a.outbound_ports_include,
            outbound_ports_exclude: a.outbound_ports_exclude,
            outbound_ip_ranges_include: a.outbound_ip_ranges_include,
            outbound_ip_ranges_exclude: a.outbound_ip_ranges_exclude,
            reroute_virtual_interfaces: a.reroute_virtual_interfaces,
            exclude_interfaces: a.exclude_interfaces,
            dry_run: flag_or_env(a.dry_run, &["DRY_RUN"])?,
            skip_rule_apply: flag_or_env(a.skip_rule_apply, &["SKIP_RULE_APPLY"])?,
            redirect_dns,
            drop_invalid: flag_or_env(a.drop_invalid, &["DROP_INVALID", "INVALID_DROP"])?,
            capture_all_dns,
            enable_ipv6,
            dns_servers_v4,
            dns_servers_v6,
            network_namespace: a.network_namespace,
            host_ipv4_loopback_cidr: a.outbound_ipv4_loopback_cidr,
            reconcile: flag_or_env(a.reconcile, &["RECONCILE"])?,
            cleanup_only: flag_or_env(a.cleanup_only, &["CLEANUP_ONLY"])?,
            force_apply: flag_or_env(a.force_apply, &["FORCE_APPLY"])?,
            force_iptables_binary: a.force_iptables_binary,
        })
    }
}

/// The uid of `$ENVOY_USER` (default `istio-proxy`), else 1337.
fn default_proxy_uid() -> String {
    let name = std::env::var("ENVOY_USER").unwrap_or_else(|_| "istio-proxy".into());
    match nix::unistd::User::from_name(&name) {
        Ok(Some(u)) => u.uid.to_string(),
        _ => "1337".into(),
    }
}

/// An owner-group include/exclude pair as istio parses it.
pub struct InterceptFilter<'a> {
    pub values: Vec<&'a str>,
    /// true: capture all groups except `values`; false: only `values`
    pub except: bool,
}

pub fn parse_intercept_filter<'a>(include: &'a str, exclude: &'a str) -> InterceptFilter<'a> {
    if include == "*" {
        InterceptFilter {
            values: split(exclude),
            except: true,
        }
    } else {
        InterceptFilter {
            values: split(include),
            except: false,
        }
    }
}

fn validate_owner_groups(include: &str, exclude: &str) -> Result<(), Error> {
    let f = parse_intercept_filter(include, exclude);
    if !f.except && f.values.len() > MAX_OWNER_GROUPS_INCLUDE {
        return Err(Error::Config(format!(
            "--outbound-owner-groups: at most {MAX_OWNER_GROUPS_INCLUDE} groups can be captured, got {}",
            f.values.len()
        )));
    }
    Ok(())
}

fn validate_loopback_cidr(s: &str) -> Result<(), Error> {
    let c = Cidr::parse(s).ok_or_else(|| {
        Error::Config(format!(
            "--outbound-ipv4-loopback-cidr: {s:?} is not a CIDR"
        ))
    })?;
    if !c.addr.is_ipv4() || !c.addr.is_loopback() {
        return Err(Error::Config(format!(
            "--outbound-ipv4-loopback-cidr: {s:?}: expected an IPv4 loopback address"
        )));
    }
    if !(8..=32).contains(&c.len) {
        return Err(Error::Config(format!(
            "--outbound-ipv4-loopback-cidr: {s:?}: mask must be in [8, 32]"
        )));
    }
    Ok(())
}

/// istio-iptables' `getLocalIP`: IPv6 when the pod's (first usable) address is IPv6; with
/// dual-stack, when it has any IPv6 address. Looked up in `netns` when given.
fn detect_ipv6(dual_stack: bool, netns: &str) -> Result<bool, Error> {
    let mut found = None;
    for ip in local_addresses(netns)? {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let link_local = match ip {
            IpAddr::V4(v4) => {
                v4.is_link_local()
                    || (v4.octets()[0] == 224 && v4.octets()[1] == 0 && v4.octets()[2] == 0)
            }
            IpAddr::V6(v6) => {
                (v6.segments()[0] & 0xffc0) == 0xfe80 || (v6.segments()[0] & 0xff0f) == 0xff02
            }
        };
        if ip.is_loopback() || link_local {
            continue;
        }
        found = Some(ip.is_ipv6());
        if !dual_stack || ip.is_ipv6() {
            break;
        }
    }
    found.ok_or_else(|| {
        Error::Config(
            "no usable local IP address found to decide IPv4/IPv6 (pass --enable-ipv6=true|false)"
                .into(),
        )
    })
}

/// The interface addresses, in the kernel's order (IPv4 first), of this network namespace or of
/// `netns` (via `nsenter --net=NETNS ip -o addr show`).
fn local_addresses(netns: &str) -> Result<Vec<IpAddr>, Error> {
    if netns.is_empty() {
        let addrs = nix::ifaddrs::getifaddrs()
            .map_err(|e| Error::Config(format!("listing interface addresses: {e}")))?;
        return Ok(addrs
            .filter_map(|ifa| {
                let a = ifa.address?;
                a.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
            .collect());
    }
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["--", "ip", "-o", "addr", "show"])
        .output()
        .map_err(|e| Error::Config(format!("--network-namespace {netns}: running nsenter: {e}")))?;
    if !out.status.success() {
        return Err(Error::Config(format!(
            "--network-namespace {netns}: listing addresses failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(parse_ip_addr_show(&String::from_utf8_lossy(&out.stdout)))
}

/// The addresses in `ip -o addr show` output (`2: eth0    inet 10.0.0.2/24 brd ...`).
fn parse_ip_addr_show(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l
                .split_whitespace()
                .skip_while(|w| *w != "inet" && *w != "inet6");
            w.next()?;
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// The `nameserver` entries of a resolv.conf.
fn resolv_conf_servers(path: &str) -> Result<Vec<String>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("failed to load {path}: {e}")))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("nameserver")).then(|| f.next()).flatten()
        })
        .map(|s| s.split('%').next().unwrap_or(s).to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn cidr_parse_keeps_host_bits_like_go() {
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.1.2.3/8");
        assert_eq!(
            Cidr::parse("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert!(Cidr::parse("10.0.0.0").is_none());
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("10.0.0.0/08").is_none());
        assert!(Cidr::parse("::/129").is_none());
    }

    #[test]
    fn separate_flags_loopback() {
        let (v4, v6) = separate_v4_v6("127.1.2.3/32,2001:db8::/32", "x").unwrap();
        assert!(v4.has_loopback && !v6.has_loopback);
        assert_eq!(v6.cidrs.len(), 1);
        let e = separate_v4_v6("1.2.3.4/32,nope", "-i")
            .unwrap_err()
            .to_string();
        assert!(e.contains("-i") && e.contains("nope"), "{e}");
    }

    #[test]
    fn split_drops_empty_items() {
        assert_eq!(split("6000,7000,"), vec!["6000", "7000"]);
        assert!(split("").is_empty());
    }

    #[test]
    fn loopback_cidr_validation() {
        assert!(validate_loopback_cidr("127.0.0.1/8").is_ok());
        assert!(validate_loopback_cidr("10.0.0.1/32").is_err());
        assert!(validate_loopback_cidr("127.0.0.1/7").is_err());
    }

    #[test]
    fn ip_addr_show() {
        let text = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                    2: eth0    inet 10.77.0.2/24 scope global eth0\n\
                    2: eth0    inet6 fd00:77::2/64 scope global nodad\n";
        let got: Vec<String> = parse_ip_addr_show(text)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, vec!["127.0.0.1", "10.77.0.2", "fd00:77::2"]);
    }

    #[test]
    fn resolv_conf() {
        let dir = std::env::temp_dir().join(format!("pingsail-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("resolv.conf");
        std::fs::write(
            &p,
            "# c\nsearch x\nnameserver 10.0.0.10\nnameserver fe80::1%eth0\n",
        )
        .unwrap();
        assert_eq!(
            resolv_conf_servers(p.to_str().unwrap()).unwrap(),
            vec!["10.0.0.10", "fe80::1"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
