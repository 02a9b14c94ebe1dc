// SPDX-License-Identifier: Apache-2.0
//! `pingsail-agent iptables`: the istio-iptables (istio-init) equivalent. It programs the pod's
//! network namespace so that the app's outbound TCP reaches the sidecar on 15001 and all inbound
//! TCP reaches it on 15006, while the sidecar's own traffic (UID/GID 1337) passes untouched.
//!
//! Same flags, same rules, same order as istio-iptables; `--dry-run` prints exactly what
//! istio-iptables' dry run records (the commands, and the `iptables-restore` input line by line),
//! which is what Istio's goldens hold (`agent/tests/iptables_golden.rs`).

mod builder;
mod capture;
mod config;
mod deps;

use std::process::ExitCode;

pub use config::Args;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Privileges(String),
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("running `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
}

/// The subcommand: exit 0 on success, 1 with one line on stderr otherwise.
pub fn main(args: Args) -> ExitCode {
    match run(args) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pingsail-agent iptables: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs with `args`; returns what to print on stdout (the dry-run record).
fn run(args: Args) -> Result<String, Error> {
    let cfg = config::Config::resolve(args)?;
    if cfg.skip_rule_apply {
        return Ok(String::new());
    }
    if cfg.dry_run {
        let mut d = deps::DryRun::default();
        capture::run(&cfg, &mut d)?;
        let mut out = d.lines.join("\n");
        out.push('\n');
        return Ok(out);
    }
    let mut real = deps::Real {
        network_namespace: cfg.network_namespace.clone(),
        force_binary: cfg.force_iptables_binary.clone(),
    };
    capture::run(&cfg, &mut real)?;
    if !cfg.cleanup_only {
        configure_routes(&cfg, &real)?;
    }
    Ok(String::new())
}

/// What istio-iptables sets up besides iptables: `::6` on lo for IPv6 (the inbound passthrough
/// source), and for TPROXY the policy route sending marked packets to lo.
fn configure_routes(cfg: &config::Config, real: &deps::Real) -> Result<(), Error> {
    if cfg.enable_ipv6 {
        real.ip(&["-6", "addr", "add", "::6/128", "dev", "lo"])?;
    }
    if !cfg.inbound_ports_include.is_empty() && cfg.tproxy {
        let families: &[(&str, &str)] = if cfg.enable_ipv6 {
            &[("-4", "0.0.0.0/0"), ("-6", "::/0")]
        } else {
            &[("-4", "0.0.0.0/0")]
        };
        for (fam, dst) in families {
            real.ip(&[
                fam,
                "rule",
                "add",
                "fwmark",
                &cfg.inbound_tproxy_mark,
                "lookup",
                &cfg.inbound_tproxy_route_table,
            ])?;
            real.ip(&[
                fam,
                "route",
                "add",
                "local",
                dst,
                "dev",
                "lo",
                "table",
                &cfg.inbound_tproxy_route_table,
            ])?;
        }
    }
    Ok(())
}
