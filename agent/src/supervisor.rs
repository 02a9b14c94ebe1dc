// SPDX-License-Identifier: Apache-2.0
//! Runs the proxy the way pilot-agent runs Envoy (`pkg/envoy/proxy.go`): the bootstrap file and
//! Envoy's command line (`-c`, `--drain-time-s`, `--drain-strategy immediate`,
//! `--local-address-ip-version`, `--file-flush-interval-msec`, `--disable-hot-restart`,
//! `--allow-unknown-static-fields`, `-l`, `--component-log-level`, `--concurrency`, …).
//!
//! Unlike pilot-agent (which exits when Envoy exits), a proxy that dies unexpectedly is restarted
//! with exponential backoff, the exit status or signal logged; after `max_failures` consecutive
//! failures the supervisor gives up, moves the [`Lifecycle`] to `Stopping { 1 }` and returns 1.
//! When the lifecycle reaches `Stopping { code }` the proxy gets SIGTERM, then SIGKILL after
//! `stop_grace`, and [`run`] returns `code`.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::config::AgentConfig;
use crate::lifecycle::{Lifecycle, Phase};

/// How to run and watch the proxy.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    pub binary: PathBuf,
    pub args: Vec<String>,
    /// The proxy's working directory (bootstrap paths like `./etc/istio/proxy/XDS` are relative to it).
    pub cwd: PathBuf,
    /// Consecutive failed starts tolerated before giving up.
    pub max_failures: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A run this long resets the failure count.
    pub stable_after: Duration,
    /// SIGTERM → SIGKILL.
    pub stop_grace: Duration,
}

impl SupervisorConfig {
    pub fn new(binary: PathBuf, args: Vec<String>, cwd: PathBuf) -> Self {
        Self {
            binary,
            args,
            cwd,
            max_failures: 10,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            stable_after: Duration::from_secs(60),
            stop_grace: Duration::from_secs(5),
        }
    }
}

/// pilot-agent's `splitComponentLog`: `info,misc:error` → (`info`, [`misc:error`]).
fn split_component_log(level: &str) -> (String, Vec<String>) {
    let mut base = String::new();
    let mut components = Vec::new();
    for item in level.split(',') {
        match item.split(':').count() {
            1 => base = item.to_owned(),
            2 => components.push(item.to_owned()),
            _ => tracing::warn!(level = item, "dropping invalid log level"),
        }
    }
    (base, components)
}

/// Envoy's command line for `config_file`, exactly as pilot-agent builds it.
pub fn proxy_args(cfg: &AgentConfig, config_file: &Path) -> Vec<String> {
    let all_v6 = !cfg.ip_addresses.is_empty()
        && cfg
            .ip_addresses
            .iter()
            .all(|ip| ip.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_ipv6()));
    let flush_ms = cfg
        .proxy_config
        .duration("fileFlushInterval")
        .map_or(1000, |d| d.as_millis());
    let mut args: Vec<String> = vec![
        "-c".into(),
        config_file.to_string_lossy().into_owned(),
        "--drain-time-s".into(),
        cfg.drain.drain_duration.as_secs().to_string(),
        "--drain-strategy".into(),
        "immediate".into(),
        "--local-address-ip-version".into(),
        if all_v6 { "v6" } else { "v4" }.into(),
        "--file-flush-interval-msec".into(),
        flush_ms.to_string(),
        "--disable-hot-restart".into(),
        "--allow-unknown-static-fields".into(),
    ];
    if let Some(kb) = cfg
        .proxy_config
        .int("fileFlushMinSizeKb")
        .filter(|v| *v > 0)
    {
        args.extend(["--file-flush-min-size-kb".into(), kb.to_string()]);
    }
    let (level, components) = split_component_log(&cfg.logging.proxy_log_level);
    if !level.is_empty() {
        args.extend(["-l".into(), level]);
    }
    if !components.is_empty() {
        args.extend(["--component-log-level".into(), components.join(",")]);
    } else if !cfg.logging.proxy_component_log_level.is_empty() {
        args.extend([
            "--component-log-level".into(),
            cfg.logging.proxy_component_log_level.clone(),
        ]);
    }
    let env_true = |k: &str| {
        cfg.env
            .get(k)
            .and_then(|v| crate::bootstrap::parse_go_bool(v))
            .unwrap_or(false)
    };
    if env_true("ENVOY_SKIP_DEPRECATED_LOGS") {
        args.push("--skip-deprecated-logs".into());
    }
    if env_true("ISTIO_ENVOY_ENABLE_CORE_DUMP") {
        args.push("--enable-core-dump".into());
    }
    if let Some(o) = &cfg.paths.bootstrap_override {
        match read_override(o, cfg.env.get("HOST_IP").map(String::as_str).unwrap_or("")) {
            Ok(s) => args.extend(["--config-yaml".into(), s]),
            Err(e) => tracing::warn!(file = %o.display(), error = %e, "bootstrap override ignored"),
        }
    }
    if cfg.concurrency > 0 {
        args.extend(["--concurrency".into(), cfg.concurrency.to_string()]);
    }
    args
}

/// ISTIO_BOOTSTRAP_OVERRIDE: YAML/JSON file, `$(HOST_IP)` substituted, passed as JSON.
fn read_override(path: &Path, host_ip: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let text = if host_ip.contains(':') {
        text.replace("[$(HOST_IP)]", &format!("[{host_ip}]"))
    } else {
        text
    };
    let text = text.replace("$(HOST_IP)", host_ip);
    let v: serde_json::Value = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
    serde_json::to_string(&v).map_err(|e| e.to_string())
}

/// The proxy binary: `--proxy-binary`; else ProxyConfig binaryPath when set to something other
/// than Istio's default and present; else `pingsail-proxy` next to this executable; else
/// `pingsail-proxy` on PATH; else binaryPath.
pub fn resolve_binary(cfg: &AgentConfig) -> PathBuf {
    if let Some(b) = &cfg.proxy_binary {
        return b.clone();
    }
    let bp = cfg.proxy_config.str("binaryPath").unwrap_or("");
    if !bp.is_empty() && bp != "/usr/local/bin/envoy" && Path::new(bp).is_file() {
        return PathBuf::from(bp);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let p = dir.join("pingsail-proxy");
        if p.is_file() {
            return p;
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("pingsail-proxy");
            if p.is_file() {
                return p;
            }
        }
    }
    if bp.is_empty() {
        PathBuf::from("pingsail-proxy")
    } else {
        PathBuf::from(bp)
    }
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(sig)
            .map_or_else(|_| sig.to_string(), |s| s.to_string());
        format!("killed by signal {name}")
    } else {
        format!("exited with status {}", status.code().unwrap_or(-1))
    }
}

fn signal(child: &tokio::process::Child, sig: nix::sys::signal::Signal) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Stops the child: SIGTERM, SIGKILL after `grace`.
async fn stop_child(child: &mut tokio::process::Child, grace: Duration) {
    signal(child, nix::sys::signal::Signal::SIGTERM);
    tokio::select! {
        r = child.wait() => {
            if let Ok(s) = r {
                tracing::info!(status = %describe(&s), "proxy stopped");
            }
        }
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace = ?grace, "proxy ignored SIGTERM; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Supervises the proxy until the lifecycle stops (returns its exit code) or the proxy cannot be
/// kept alive (returns 1).
pub async fn run(cfg: SupervisorConfig, lifecycle: Lifecycle) -> i32 {
    let mut phase = lifecycle.subscribe();
    let mut failures: u32 = 0;
    let mut backoff = cfg.backoff_initial;
    loop {
        if let Phase::Stopping { exit_code } = *phase.borrow_and_update() {
            return exit_code;
        }
        let started = Instant::now();
        let spawned = tokio::process::Command::new(&cfg.binary)
            .args(&cfg.args)
            .current_dir(&cfg.cwd)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let why = match spawned {
            Err(e) => format!("cannot start {}: {e}", cfg.binary.display()),
            Ok(mut child) => {
                tracing::info!(binary = %cfg.binary.display(), pid = child.id(), args = ?cfg.args, "proxy started");
                loop {
                    tokio::select! {
                        r = child.wait() => {
                            break match r {
                                Ok(s) => describe(&s),
                                Err(e) => format!("wait failed: {e}"),
                            };
                        }
                        changed = phase.changed() => {
                            let stop = match *phase.borrow_and_update() {
                                Phase::Stopping { exit_code } => Some(exit_code),
                                _ => None,
                            };
                            if changed.is_err() || stop.is_some() {
                                stop_child(&mut child, cfg.stop_grace).await;
                                return stop.unwrap_or(0);
                            }
                        }
                    }
                }
            }
        };
        if started.elapsed() >= cfg.stable_after {
            failures = 0;
            backoff = cfg.backoff_initial;
        }
        failures += 1;
        if failures >= cfg.max_failures {
            tracing::error!(reason = %why, failures, "proxy cannot be kept running; giving up");
            lifecycle.stop(1);
            return 1;
        }
        tracing::warn!(reason = %why, failures, retry_in = ?backoff, "proxy exited; restarting");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = phase.changed() => {}
        }
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_levels_split_like_pilot_agent() {
        assert_eq!(
            split_component_log("info,misc:error,upstream:debug"),
            (
                "info".into(),
                vec!["misc:error".into(), "upstream:debug".into()]
            )
        );
        assert_eq!(split_component_log("warning"), ("warning".into(), vec![]));
    }
}
