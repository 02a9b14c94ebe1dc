// SPDX-License-Identifier: Apache-2.0
//! pingsail-agent: the pilot-agent replacement. Each job is a subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod iptables;

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
    /// Wait until the proxy is ready (pilot-agent's `wait`, for holdApplicationUntilProxyStarts).
    Wait(pingsail_agent::cmd::WaitArgs),
    /// Make an HTTP request to a local admin/status port (pilot-agent's `request`).
    Request(pingsail_agent::cmd::RequestArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Iptables(args) => iptables::main(*args),
        Command::Sds => ExitCode::from(sds_main() as u8),
        Command::Wait(a) => small_rt(pingsail_agent::cmd::wait(a)),
        Command::Request(a) => small_rt(pingsail_agent::cmd::request(a)),
    }
}

fn small_rt(f: impl std::future::Future<Output = i32>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => ExitCode::from(rt.block_on(f) as u8),
        Err(e) => {
            eprintln!("pingsail-agent: runtime: {e}");
            ExitCode::from(1)
        }
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
