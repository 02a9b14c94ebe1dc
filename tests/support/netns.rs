// SPDX-License-Identifier: Apache-2.0
//! Pods as network namespaces, for the traffic-capture tests.
//!
//! A [`Net`] is a private L2 segment: a "switch" network namespace holding a bridge. Each [`Pod`] is
//! a network namespace with `lo` and `eth0` (a veth whose other end is on the bridge), an IPv4
//! address in 10.77.0.0/24 and an IPv6 address in fd00:77::/64, and default routes through eth0.
//! Nothing is added to the host's network namespace, so the same addresses can be reused by every
//! test; namespace names carry the process id and a counter, so tests run in parallel.
//!
//! * Run a program in a pod: [`Pod::cmd`] (`ip netns exec`), as another user: [`Pod::cmd_as`]
//!   (`setpriv`, e.g. UID/GID 1337 for the sidecar), long-running: [`Pod::spawn`] → [`Proc`]
//!   (killed on drop; [`Proc::line`] reads its stdout, e.g. a readiness line).
//! * Capture: [`Pod::iptables`] runs `pingsail-agent iptables ARGS` in the pod.
//! * Binaries: [`cargo_bin`] finds (and first builds, with the cargo that runs the tests) a binary of
//!   any workspace package in this target directory and profile; `PINGSAIL_<NAME>_BIN` (upper case,
//!   `-` → `_`, e.g. `PINGSAIL_PINGSAIL_AGENT_BIN`) overrides it.
//!
//! Everything is removed on drop, panics included: pods' namespaces (their veths go with them),
//! then the switch. Namespaces left by a killed test process (`ps-<pid>-…` with a dead pid) are
//! removed the next time a [`Net`] is created.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and `ip`, `setpriv`, `iptables`: [`Net::new`] returns
//! `None` after printing why when not root, so tests skip visibly (`let Some(net) = Net::new("x")
//! else { return };`).

use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, Result, bail};

const NETNS_DIR: &str = "/var/run/netns";
const PREFIX: &str = "ps-";

/// A private network segment that pods are attached to.
pub struct Net {
    id: String,
    switch: String,
    next_host: AtomicU32,
}

/// One pod: a network namespace attached to a [`Net`].
pub struct Pod {
    /// the network namespace's name (`ip netns exec <ns>`)
    pub ns: String,
    /// the pod's IPv4 address (eth0)
    pub ip4: Ipv4Addr,
    /// the pod's IPv6 address (eth0)
    pub ip6: Ipv6Addr,
}

/// Whether this process may create namespaces and program iptables.
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces created by test processes that no longer run.
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !pid_alive(pid) {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

impl Net {
    /// A new segment, or `None` (after printing the reason) when not running as root.
    /// `test` names the test in that message.
    pub fn new(test: &str) -> Option<Net> {
        if !is_root() {
            // Written to the stderr handle, not with eprintln!, so the test harness's output
            // capture does not hide it: a skip must be visible.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: network-namespace tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); CI runs them as root"
            );
            return None;
        }
        static SWEPT: OnceLock<()> = OnceLock::new();
        SWEPT.get_or_init(sweep_stale);
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let net = Net {
            switch: format!("{id}-sw"),
            id,
            next_host: AtomicU32::new(2),
        };
        let setup = || -> Result<()> {
            ip(&["netns", "add", &net.switch])?;
            ip(&["-n", &net.switch, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &net.switch, "link", "set", "br0", "up"])?;
            Ok(())
        };
        if let Err(e) = setup() {
            panic!("creating network namespace {}: {e:#}", net.switch);
        }
        Some(net)
    }

    /// Adds a pod named `name` (unique within this net).
    pub fn pod(&self, name: &str) -> Result<Pod> {
        let host = self.next_host.fetch_add(1, Ordering::Relaxed);
        if host > 250 {
            bail!("too many pods on one Net");
        }
        let pod = Pod {
            ns: format!("{}-{name}", self.id),
            ip4: Ipv4Addr::new(10, 77, 0, host as u8),
            ip6: Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, host as u16),
        };
        // The pod exists (and is cleaned up on drop) from here on.
        ip(&["netns", "add", &pod.ns])?;
        let port = format!("p{host}");
        let (a4, a6) = (format!("{}/24", pod.ip4), format!("{}/64", pod.ip6));
        ip(&[
            "-n",
            &self.switch,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod.ns,
        ])?;
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        ip(&["-n", &pod.ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &pod.ns, "addr", "add", &a4, "dev", "eth0"])?;
        ip(&[
            "-n", &pod.ns, "-6", "addr", "add", &a6, "dev", "eth0", "nodad",
        ])?;
        ip(&["-n", &pod.ns, "link", "set", "eth0", "up"])?;
        // Default routes, as a pod has: addresses outside the segment (service VIPs) are routable,
        // so the capture rules see connections to them.
        ip(&["-n", &pod.ns, "route", "add", "default", "dev", "eth0"])?;
        ip(&[
            "-n", &pod.ns, "-6", "route", "add", "default", "dev", "eth0",
        ])?;
        Ok(pod)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .output();
    }
}

impl Pod {
    /// `program` to run inside the pod (as root).
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// `program` to run inside the pod as `uid`/`gid` with no supplementary groups (the sidecar
    /// runs as 1337/1337).
    pub fn cmd_as(&self, uid: u32, gid: u32, program: impl AsRef<OsStr>) -> Command {
        let mut c = self.cmd("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(program);
        c
    }

    /// Like [`Pod::cmd_as`], keeping the capabilities `caps` (e.g. `["net_admin"]`, as a TPROXY
    /// sidecar needs for IP_TRANSPARENT) as ambient capabilities.
    pub fn cmd_as_with_caps(
        &self,
        uid: u32,
        gid: u32,
        caps: &[&str],
        program: impl AsRef<OsStr>,
    ) -> Command {
        let caps: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
        let caps = caps.join(",");
        let mut c = self.cmd("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `cmd` to completion; an error (with its stderr) unless it exits 0.
    pub fn run(&self, mut cmd: impl std::borrow::BorrowMut<Command>) -> Result<Output> {
        run(cmd.borrow_mut())
    }

    /// Runs `program args...` in the pod (as root); its stdout, or an error unless it exits 0.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.run(self.cmd(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `cmd` with stdout piped; it is killed when the returned [`Proc`] drops.
    pub fn spawn(&self, mut cmd: Command) -> Result<Proc> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let stdout = child.stdout.take().map(BufReader::new);
        Ok(Proc { child, stdout })
    }

    /// `pingsail-agent iptables ARGS` in this pod (its output; not checked).
    pub fn iptables(&self, args: &[&str]) -> Result<Output> {
        let mut c = self.cmd(cargo_bin("pingsail-agent", "pingsail-agent")?);
        c.arg("iptables").args(args);
        c.output().with_context(|| format!("running {c:?}"))
    }

    /// `pingsail-agent iptables ARGS` in this pod; an error unless it exits 0.
    pub fn apply_iptables(&self, args: &[&str]) -> Result<Output> {
        let out = self.iptables(args)?;
        if !out.status.success() {
            bail!(
                "pingsail-agent iptables {args:?} in {} failed ({}): {}",
                self.ns,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Waits until `addr` accepts TCP connections from inside this pod (connect retries with
    /// backoff, up to `timeout`): readiness for programs that announce none (prefer a line on
    /// stdout, [`Proc::wait_for`], when there is one).
    pub fn wait_tcp(&self, addr: std::net::SocketAddr, timeout: std::time::Duration) -> Result<()> {
        let probe = cargo_bin("pingsail-tests", "netns-probe")?;
        let millis = timeout.as_millis().to_string();
        self.run(self.cmd(probe).args(["wait", &addr.to_string(), &millis]))
            .map(drop)
    }

    /// `iptables-save` (or `ip6tables-save`) in this pod.
    pub fn save(&self, v6: bool) -> Result<String> {
        let out = self.run(self.cmd(if v6 {
            "ip6tables-save"
        } else {
            "iptables-save"
        }))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A process running in a pod; killed (and reaped) on drop.
pub struct Proc {
    child: Child,
    stdout: Option<BufReader<ChildStdout>>,
}

impl Proc {
    /// The next line the process writes on stdout (without the newline); an error at EOF.
    pub fn line(&mut self) -> Result<String> {
        let r = self.stdout.as_mut().context("stdout not captured")?;
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            let status = self.child.try_wait()?;
            bail!("process ended before writing a line (status {status:?})");
        }
        Ok(l.trim_end().to_string())
    }

    /// Reads lines until one starts with `prefix` (e.g. a readiness line), returning it.
    pub fn wait_for(&mut self, prefix: &str) -> Result<String> {
        loop {
            let l = self.line()?;
            if l.starts_with(prefix) {
                return Ok(l);
            }
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of binary `bin` of workspace package `package`, built for the profile (and in the
/// target directory) the running test was built for.
///
/// Integration tests only get `CARGO_BIN_EXE_*` for their own package's binaries, and cargo has no
/// stable way to depend on another package's binary, so the first call per binary runs
/// `cargo build -p PACKAGE --bin BIN` with the cargo that built the tests (a no-op when fresh),
/// then uses `<target-dir>/<profile>/BIN`: the test executable lives in `<target-dir>/<profile>/deps/`.
/// `PINGSAIL_<BIN>_BIN` (upper case, `-` → `_`) skips all that and names the binary directly.
/// Whether `bin` exists and is newer than every source file and manifest of the workspace.
fn is_fresh(bin: &Path) -> bool {
    fn newest(dir: &Path, acc: &mut std::time::SystemTime) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                newest(&p, acc);
            } else if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                *acc = (*acc).max(t);
            }
        }
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return false;
    };
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut latest = std::time::SystemTime::UNIX_EPOCH;
    for f in ["Cargo.toml", "Cargo.lock"] {
        if let Ok(t) = std::fs::metadata(root.join(f)).and_then(|m| m.modified()) {
            latest = latest.max(t);
        }
    }
    for member in ["proxy", "filters", "agent", "injector", "tests/support"] {
        newest(&root.join(member).join("src"), &mut latest);
        if let Ok(t) =
            std::fs::metadata(root.join(member).join("Cargo.toml")).and_then(|m| m.modified())
        {
            latest = latest.max(t);
        }
    }
    newest(&root.join("tests/support"), &mut latest);
    built >= latest
}

pub fn cargo_bin(package: &str, bin: &str) -> Result<PathBuf> {
    static BUILT: bin_cache::Cache = bin_cache::Cache::new();
    let var = format!("PINGSAIL_{}_BIN", bin.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return Ok(PathBuf::from(p));
    }
    BUILT.get_or_build(bin, || {
        let exe = std::env::current_exe().context("locating the test executable")?;
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .context("test executable not under <target>/<profile>/deps")?;
        let target_dir = profile_dir.parent().context("no target directory")?;
        let profile = match profile_dir.file_name().and_then(OsStr::to_str) {
            Some("debug") => "dev".to_string(),
            Some(p) => p.to_string(),
            None => bail!("cannot tell the profile from {}", profile_dir.display()),
        };
        // `cargo test --workspace` has already built every member's binaries with the workspace's
        // unified features; a `cargo build -p <one package>` would resolve features differently
        // and rebuild most of the dependency tree. Use the existing binary when no source of the
        // workspace is newer than it.
        let existing = profile_dir.join(bin);
        if is_fresh(&existing) {
            return Ok(existing);
        }
        let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        run(Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--manifest-path",
                workspace,
                "-p",
                package,
                "--bin",
                bin,
                "--profile",
                &profile,
            ])
            .arg("--target-dir")
            .arg(target_dir))
        .with_context(|| format!("building {bin} (set {var} to use a prebuilt one)"))?;
        let path = profile_dir.join(bin);
        if !path.exists() {
            bail!("{} does not exist after building it", path.display());
        }
        Ok(path)
    })
}

/// A tiny per-process cache of built binaries (std's OnceLock per name).
mod bin_cache {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use anyhow::Result;

    pub struct Cache(OnceLock<parking_lot::Mutex<HashMap<String, PathBuf>>>);

    impl Cache {
        pub const fn new() -> Self {
            Cache(OnceLock::new())
        }

        /// Builds at most once per name at a time (the lock is held while building).
        pub fn get_or_build(
            &self,
            name: &str,
            build: impl FnOnce() -> Result<PathBuf>,
        ) -> Result<PathBuf> {
            let mut m = self.0.get_or_init(Default::default).lock();
            if let Some(p) = m.get(name) {
                return Ok(p.clone());
            }
            let p = build()?;
            m.insert(name.to_string(), p.clone());
            Ok(p)
        }
    }
}
