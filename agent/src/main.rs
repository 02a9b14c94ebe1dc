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
    /// Wait until the proxy is ready (pilot-agent's `wait`, for holdApplicationUntilProxyStarts).
    Wait(pingsail_agent::cmd::WaitArgs),
    /// Make an HTTP request to a local admin/status port (pilot-agent's `request`).
    Request(pingsail_agent::cmd::RequestArgs),
    /// A small mesh on loopback with no Kubernetes and no istiod: a development CA, the workloads
    /// and sidecars `<conf>/mesh.yaml` names (README "Standalone mesh").
    Standalone(StandaloneArgs),
    /// Run the proxy as pilot-agent does (`proxy sidecar|router` with pilot-agent's flags and
    /// environment): workload identity over SDS, the bootstrap, the supervised proxy.
    Proxy(Box<pingsail_agent::config::ProxyArgs>),
}

#[derive(clap::Args)]
struct StandaloneArgs {
    /// The directory holding mesh.yaml and the sidecars' bootstraps.
    #[arg(long, default_value = "conf/standalone")]
    conf: std::path::PathBuf,
    /// The sidecar binary (default: pingsail-proxy beside this binary, else on PATH).
    #[arg(long)]
    proxy_binary: Option<std::path::PathBuf>,
    /// Where the workloads' run directories go (default: a temporary directory removed at exit).
    #[arg(long)]
    run_dir: Option<std::path::PathBuf>,
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
        Command::Standalone(args) => ExitCode::from(standalone_main(args) as u8),
        Command::Wait(a) => small_rt(pingsail_agent::cmd::wait(a)),
        Command::Request(a) => small_rt(pingsail_agent::cmd::request(a)),
        Command::Proxy(args) => ExitCode::from(proxy_cmd::main(&args) as u8),
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

fn standalone_main(args: StandaloneArgs) -> i32 {
    init_logging();
    let proxy_binary = args
        .proxy_binary
        .unwrap_or_else(|| sibling_binary("pingsail-proxy"));
    let opts = pingsail_agent::standalone::Options {
        conf: args.conf,
        proxy_binary,
        run_dir: args.run_dir,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pingsail-agent standalone: runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(pingsail_agent::standalone::run(opts)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pingsail-agent standalone: {e}");
            1
        }
    }
}

/// `name` beside this executable when it exists there, else `name` (looked up on PATH).
fn sibling_binary(name: &str) -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| name.into())
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// `pingsail-agent sds`: pilot-agent's environment variables (see `ca::config`), relative paths
/// under the working directory; log level from RUST_LOG (default info).
fn sds_main() -> i32 {
    init_logging();
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
