// SPDX-License-Identifier: Apache-2.0
//! `pingsail-injector serve` (the mutating webhook) and `pingsail-injector kube-inject`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pingsail_injector::config::{self, Sources};
use pingsail_injector::{kubeinject, server};

#[derive(Parser)]
#[command(
    name = "pingsail-injector",
    version,
    about = "Istio-compatible sidecar injector for pingsail"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// Istio mesh config (the `mesh` key of the `istio` ConfigMap). Default: built in.
    #[arg(long)]
    mesh: Option<String>,
    /// Injector values (the `values` key of `istio-sidecar-injector`). Default: built in.
    #[arg(long)]
    values: Option<String>,
    /// Injection config: policy, templates, selectors (the `config` key). Default: built in.
    #[arg(long)]
    config: Option<String>,
    /// The `istio.io/rev` this injector serves (empty = default).
    #[arg(long, default_value = "")]
    revision: String,
    /// Native sidecars (proxy as an init container with restartPolicy Always). Default: the
    /// `ENABLE_NATIVE_SIDECARS` value under `pilot.env` in values, else true.
    #[arg(long)]
    native_sidecars: Option<bool>,
    /// Platform quirks to apply: `openshift` (like istiod's PLATFORM=openshift).
    #[arg(long, env = "PLATFORM")]
    platform: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the HTTPS admission webhook.
    Serve {
        #[arg(long, default_value = "0.0.0.0:9443")]
        listen: SocketAddr,
        #[arg(long)]
        tls_cert: String,
        #[arg(long)]
        tls_key: String,
        /// Plain-HTTP listener for /metrics, /healthz, /readyz.
        #[arg(long)]
        monitoring_listen: Option<SocketAddr>,
        /// Admit pods unchanged when injection fails (Istio denies them).
        #[arg(long)]
        allow_on_error: bool,
        /// Log format: json or text.
        #[arg(long, default_value = "json")]
        log_format: String,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Inject Kubernetes YAML offline, like `istioctl kube-inject`.
    KubeInject {
        /// Input file, or `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        filename: String,
        /// Output file (default stdout).
        #[arg(short = 'o', long = "output")]
        output: Option<String>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

fn sources(cfg: &ConfigArgs) -> Result<Sources, config::ConfigError> {
    let read = |p: &Option<String>| p.as_ref().map(|p| config::read_file(p)).transpose();
    Ok(Sources {
        config: read(&cfg.config)?,
        values: read(&cfg.values)?,
        mesh: read(&cfg.mesh)?,
        revision: cfg.revision.clone(),
        native_sidecars: cfg.native_sidecars,
        compliance_policy: std::env::var("COMPLIANCE_POLICY").unwrap_or_default(),
        openshift: cfg.platform.as_deref() == Some("openshift"),
    })
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "text" {
        b.init();
    } else {
        b.json().flatten_event(true).init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::KubeInject {
            filename,
            output,
            cfg,
        } => kube_inject(&filename, output.as_deref(), &cfg),
        Cmd::Serve {
            listen,
            tls_cert,
            tls_key,
            monitoring_listen,
            allow_on_error,
            log_format,
            cfg,
        } => {
            init_logs(&log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("pingsail-injector: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve(
                listen,
                tls_cert,
                tls_key,
                monitoring_listen,
                allow_on_error,
                cfg,
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "injector stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn kube_inject(filename: &str, output: Option<&str>, cfg: &ConfigArgs) -> ExitCode {
    let run = || -> anyhow::Result<String> {
        let settings = config::build_settings(&sources(cfg)?)?;
        let mut input = String::new();
        if filename == "-" {
            std::io::stdin().read_to_string(&mut input)?;
        } else {
            input = std::fs::read_to_string(filename)
                .map_err(|e| anyhow::anyhow!("reading {filename}: {e}"))?;
        }
        Ok(kubeinject::kube_inject(&settings, &input, &mut |w| {
            eprint!("{w}")
        })?)
    };
    match run() {
        Ok(out) => {
            let written = match output {
                Some(p) => std::fs::write(p, out).map_err(|e| anyhow::anyhow!("writing {p}: {e}")),
                None => std::io::stdout()
                    .write_all(out.as_bytes())
                    .map_err(anyhow::Error::from),
            };
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pingsail-injector: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("pingsail-injector: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    listen: SocketAddr,
    tls_cert: String,
    tls_key: String,
    monitoring: Option<SocketAddr>,
    allow_on_error: bool,
    cfg: ConfigArgs,
) -> anyhow::Result<()> {
    let src = sources(&cfg)?;
    let settings = config::build_settings(&src)?;
    let opts = server::ServeOptions {
        tls_cert,
        tls_key,
        sources: Sources {
            config: None,
            values: None,
            mesh: None,
            ..src
        },
        source_files: (cfg.config.clone(), cfg.values.clone(), cfg.mesh.clone()),
        allow_on_error,
        reload_interval: Duration::from_secs(2),
    };
    let running = server::start(listen, opts, settings).await?;
    tracing::info!(addr = %running.addr, "webhook listening");
    if let Some(m) = monitoring {
        let addr = server::start_monitoring(m, running.state.clone()).await?;
        tracing::info!(%addr, "monitoring listening");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    Ok(())
}
