// SPDX-License-Identifier: Apache-2.0
//! `pingsail-proxy -c bootstrap.yaml`: Envoy's command line, pingsail's data plane.

use clap::Parser;
use pingsail_proxy::cli::{Cli, startup_filter, tracing_level};
use pingsail_proxy::xds::bootstrap;
use std::sync::Arc;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, reload};

fn main() {
    let cli = Cli::parse();
    let level = match cli.log_level.as_deref().map(tracing_level).transpose() {
        Ok(l) => l.unwrap_or("info"),
        Err(e) => fail(&e),
    };
    let (filter, reload_handle) = reload::Layer::new(EnvFilter::new(startup_filter(level)));
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    for (flag, set) in [
        ("--drain-strategy", cli.drain_strategy.is_some()),
        (
            "--parent-shutdown-time-s",
            cli.parent_shutdown_time_s.is_some(),
        ),
        (
            "--local-address-ip-version",
            cli.local_address_ip_version.is_some(),
        ),
        ("--component-log-level", cli.component_log_level.is_some()),
        ("--log-format", cli.log_format.is_some()),
        ("--disable-hot-restart", cli.disable_hot_restart),
        ("--base-id", cli.base_id.is_some()),
        ("--use-dynamic-base-id", cli.use_dynamic_base_id),
        (
            "--file-flush-interval-msec",
            cli.file_flush_interval_msec.is_some(),
        ),
        (
            "--file-flush-min-size-kb",
            cli.file_flush_min_size_kb.is_some(),
        ),
    ] {
        if set {
            tracing::debug!("{flag} accepted and ignored (no meaning for pingsail)");
        }
    }
    let loaded = match (&cli.config_path, &cli.config_yaml) {
        (Some(p), _) => bootstrap::load_file(p),
        (None, Some(y)) => bootstrap::load_text(y),
        (None, None) => fail("a bootstrap is required: -c FILE or --config-yaml TEXT"),
    };
    let mut loaded = match loaded {
        Ok(l) => l,
        Err(e) => fail(&e.to_string()),
    };
    if cli.service_cluster.is_some() || cli.service_node.is_some() {
        let mut b = (*loaded.snapshot.bootstrap).clone();
        let node = b.node.get_or_insert_with(Default::default);
        if let Some(c) = &cli.service_cluster {
            node.cluster = c.clone();
        }
        if let Some(n) = &cli.service_node {
            node.id = n.clone();
        }
        loaded.snapshot.bootstrap = Arc::new(b);
    }
    if cli.mode.as_deref() == Some("validate") {
        println!(
            "configuration '{}' OK",
            cli.config_path.as_deref().unwrap_or("--config-yaml")
        );
        return;
    }
    let mut opts = pingsail_proxy::Options::default();
    if let Some(c) = cli.concurrency {
        opts.concurrency = c.max(1);
    }
    if let Some(d) = cli.drain_time_s {
        opts.drain_time = std::time::Duration::from_secs(d);
    }
    let control: pingsail_proxy::admin::LogControl = Arc::new(move |directive: &str| {
        let f = EnvFilter::try_new(directive).map_err(|e| e.to_string())?;
        reload_handle.reload(f).map_err(|e| e.to_string())
    });
    let running = match pingsail_proxy::start(loaded, &opts, Some(control)) {
        Ok(r) => r,
        Err(e) => fail(&format!("{e:#}")),
    };
    for (name, addr) in &running.listeners {
        tracing::info!("listener '{name}' on {addr}");
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(&e.to_string()),
    };
    rt.block_on(async {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; exiting"),
            _ = term => tracing::info!("SIGTERM; exiting"),
            _ = running.quit_requested() => tracing::info!("/quitquitquit; exiting"),
        }
    });
    drop(running);
}

fn fail(msg: &str) -> ! {
    eprintln!("pingsail-proxy: {msg}");
    std::process::exit(1)
}
