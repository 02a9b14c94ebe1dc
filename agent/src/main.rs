// SPDX-License-Identifier: Apache-2.0
//! pingsail-agent: the pilot-agent replacement. Each job is a subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod iptables;
mod proxy_cmd;

#[derive(Parser)]
#[command(
    name = "pingsail-agent",
    version,
    about = "pingsail agent (pilot-agent replacement)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Set up the pod's traffic capture (istio-iptables / istio-init equivalent). Also answers to
    /// `istio-iptables`, the name Istio's injection template passes to the image's entrypoint.
    #[command(alias = "istio-iptables")]
    Iptables(Box<iptables::Args>),
    /// Workload certificates from istiod's CA (or mounted files), served over SDS on
    /// ./var/run/secrets/workload-spiffe-uds/socket; configured by pilot-agent's environment.
    Sds,
    /// Run the proxy as pilot-agent does (`proxy sidecar|router` with pilot-agent's flags and
    /// environment): workload identity over SDS, the bootstrap, the supervised proxy.
    Proxy(Box<pingsail_agent::config::ProxyArgs>),
}

fn main() -> ExitCode {
    // Installed as `pilot-agent` too (Istio's injected postStart/preStop call that name): the
    // subcommands are the same; only the name in help and errors follows argv[0].
    let argv0 = std::env::args_os().next().map(std::path::PathBuf::from);
    let name = match argv0.as_deref().and_then(|p| p.file_name()) {
        Some(n) if n == "pilot-agent" => "pilot-agent",
        _ => "pingsail-agent",
    };
    let matches = <Cli as clap::CommandFactory>::command()
        .name(name)
        .bin_name(name)
        .get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Iptables(args) => iptables::main(*args),
        Command::Sds => ExitCode::from(sds_main() as u8),
        Command::Proxy(args) => ExitCode::from(proxy_cmd::main(&args) as u8),
    }
}

/// `pingsail-agent sds`: pilot-agent's environment variables (see `ca::config`), relative paths
/// under the working directory; log level from RUST_LOG (default info).
fn sds_main() -> i32 {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let base = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("pingsail-agent sds: working directory: {e}");
            return 1;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pingsail-agent sds: runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(pingsail_agent::identity::run(&env, &base)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pingsail-agent sds: {e:#}");
            1
        }
    }
}
