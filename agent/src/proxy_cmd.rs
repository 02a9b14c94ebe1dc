// SPDX-License-Identifier: Apache-2.0
//! `proxy sidecar|router`: logging from `--log_output_level`, config from flags + environment
//! (errors reported before anything starts), then [`pingsail_agent::proxy::run`].

use pingsail_agent::config::{AgentConfig, ProxyArgs, host_ips};

/// istio `--log_output_level` (`default:info,scope:level`) → a tracing filter; RUST_LOG wins.
fn log_filter(levels: &str) -> String {
    let mut base = "info".to_owned();
    for item in levels.split(',') {
        let (scope, level) = item.split_once(':').unwrap_or(("default", item));
        let level = match level.trim() {
            "none" => "off",
            "fatal" => "error",
            l => l,
        };
        if scope.trim() == "default" && !level.is_empty() {
            base = level.to_owned();
        }
    }
    base
}

pub fn main(args: &ProxyArgs) -> i32 {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter(&args.log_output_level)));
    // --log_as_json only changes the proxy's log format (the agent's own logs stay text).
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let cwd = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("proxy: working directory: {e}");
            return 1;
        }
    };
    let cfg = match AgentConfig::load(args, &env, &cwd, &host_ips()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("proxy: invalid configuration: {e}");
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
            eprintln!("proxy: runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(pingsail_agent::proxy::run(cfg)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("proxy: {e}");
            1
        }
    }
}
