// SPDX-License-Identifier: Apache-2.0
//! Running the iptables binaries — for real, or recorded for `--dry-run`.

use std::io::Write as _;
use std::process::{Command, Stdio};

use super::Error;

/// Which binary of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Iptables,
    Save,
    Restore,
}

/// One detected iptables family (legacy or nft, IPv4 or IPv6).
#[derive(Debug, Clone)]
pub struct Version {
    pub binary: String,
    /// legacy iptables >= 1.6.2 takes the xtables lock: pass `--wait`
    pub wait: bool,
}

impl Version {
    pub fn plain(v6: bool) -> Version {
        Version {
            binary: if v6 { "ip6tables" } else { "iptables" }.into(),
            wait: false,
        }
    }

    pub fn name(&self, t: Tool) -> String {
        match t {
            Tool::Iptables => self.binary.clone(),
            Tool::Save => format!("{}-save", self.binary),
            Tool::Restore => format!("{}-restore", self.binary),
        }
    }
}

pub trait Deps {
    /// Picks the binaries for a family.
    fn detect(&mut self, v6: bool) -> Result<Version, Error>;
    /// Runs `tool args...` (with `stdin`), returning its stdout.
    fn run(
        &mut self,
        tool: Tool,
        ver: &Version,
        stdin: Option<&str>,
        args: &[String],
        quiet: bool,
    ) -> Result<String, Error>;
}

/// Records what would run: command lines, and the restore input line by line (istio-iptables'
/// dry-run record, which its goldens are made of). Commands "succeed" with empty output.
#[derive(Debug, Default)]
pub struct DryRun {
    pub lines: Vec<String>,
}

impl Deps for DryRun {
    fn detect(&mut self, v6: bool) -> Result<Version, Error> {
        Ok(Version::plain(v6))
    }

    fn run(
        &mut self,
        tool: Tool,
        ver: &Version,
        stdin: Option<&str>,
        args: &[String],
        _quiet: bool,
    ) -> Result<String, Error> {
        match stdin {
            Some(input) => self.lines.extend(input.lines().map(str::to_string)),
            None => {
                let mut l = ver.name(tool);
                for a in args {
                    l.push(' ');
                    l.push_str(a);
                }
                self.lines.push(l);
            }
        }
        Ok(String::new())
    }
}

/// Runs the system's binaries, optionally inside another network namespace (`nsenter --net=`).
#[derive(Debug, Default)]
pub struct Real {
    pub network_namespace: String,
    /// "", "legacy" or "nft"
    pub force_binary: String,
}

/// Does this failure mean we lack the privileges to program netfilter?
fn is_privilege_problem(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains("permission denied")
        || s.contains("must be root")
        || s.contains("operation not permitted")
}

fn privileges(cmd: &str, stderr: &str) -> Error {
    Error::Privileges(format!(
        "`{cmd}` failed: {}. Programming iptables needs CAP_NET_ADMIN (and CAP_NET_RAW) in the pod's network \
         namespace: run as root or grant the NET_ADMIN and NET_RAW capabilities",
        stderr.trim()
    ))
}

impl Real {
    fn command(&self, bin: &str) -> Command {
        if self.network_namespace.is_empty() {
            Command::new(bin)
        } else {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", self.network_namespace))
                .arg("--")
                .arg(bin);
            c
        }
    }

    fn exec(&self, bin: &str, args: &[String], stdin: Option<&str>) -> Result<String, Error> {
        let line = std::iter::once(bin.to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = self.command(bin);
        c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        c.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = c.spawn().map_err(|e| Error::Spawn {
            cmd: line.clone(),
            source: e,
        })?;
        if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
            w.write_all(input.as_bytes()).map_err(|e| Error::Spawn {
                cmd: line.clone(),
                source: e,
            })?;
        }
        let out = child.wait_with_output().map_err(|e| Error::Spawn {
            cmd: line.clone(),
            source: e,
        })?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            if is_privilege_problem(&stderr) {
                return Err(privileges(&line, &stderr));
            }
            return Err(Error::Command {
                cmd: line,
                status: out.status.to_string(),
                stderr: stderr.trim().to_string(),
            });
        }
        // iptables-save reports some failures on stderr with status 0.
        if is_privilege_problem(&stderr) {
            return Err(privileges(&line, &stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// istio's `shouldUseBinaryForCurrentContext`: the binary set exists, reports a version, and
    /// the kernel accepts a no-op rule from it. Returns the version and whether rules exist already.
    /// With `only_if_rules`, a binary set whose tables hold no rules is not probed further (a probe
    /// would instantiate its tables).
    fn usable(&self, bin: &str, only_if_rules: bool) -> Result<(Version, bool), Error> {
        let save = format!("{bin}-save");
        let dump = self.exec(&save, &[], None)?;
        // Rules, not merely tables: a table stays listed (with no rules) once anything touched it.
        let existing = dump
            .lines()
            .any(|l| l.starts_with("-A ") || (l.starts_with(':') && !is_builtin_decl(l)));
        if only_if_rules && !existing {
            return Ok((
                Version {
                    binary: bin.to_string(),
                    wait: false,
                },
                false,
            ));
        }
        let ver_out = self
            .exec(&save, &["--version".into()], None)
            .unwrap_or_default();
        let nft = ver_out.contains("nf_tables");
        let wait = !nft && version_at_least(&ver_out, (1, 6, 2));
        let mut probe: Vec<String> = ["-t", "nat", "-A", "INPUT", "-p", "255", "-j", "RETURN"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if wait {
            probe.push("--wait=30".into());
        }
        self.exec(bin, &probe, None)?;
        probe[2] = "-D".into();
        let _ = self.exec(bin, &probe, None);
        Ok((
            Version {
                binary: bin.to_string(),
                wait,
            },
            existing,
        ))
    }
}

/// `:PREROUTING ACCEPT [0:0]` and the like: a built-in chain's policy line.
fn is_builtin_decl(l: &str) -> bool {
    let name = l.trim_start_matches(':').split(' ').next().unwrap_or("");
    ["INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"].contains(&name)
}

/// `vX.Y.Z` in `iptables-save --version` output is at least `min`.
fn version_at_least(out: &str, min: (u32, u32, u32)) -> bool {
    let Some(i) = out.find(" v") else {
        return false;
    };
    let nums: Vec<u32> = out[i + 2..]
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .next()
        .unwrap_or("")
        .split('.')
        .filter_map(|n| n.parse().ok())
        .collect();
    let v = (
        nums.first().copied().unwrap_or(0),
        nums.get(1).copied().unwrap_or(0),
        nums.get(2).copied().unwrap_or(0),
    );
    v >= min
}

impl Deps for Real {
    fn detect(&mut self, v6: bool) -> Result<Version, Error> {
        let base = if v6 { "ip6tables" } else { "iptables" };
        let (legacy, nft) = (format!("{base}-legacy"), format!("{base}-nft"));
        match self.force_binary.as_str() {
            "legacy" => return self.usable(&legacy, false).map(|(v, _)| v),
            "nft" => return self.usable(&nft, false).map(|(v, _)| v),
            _ => {}
        }
        // Prefer legacy only when it already holds rules in this namespace, then nft, then the
        // plain name.
        let mut privilege_err = None;
        match self.usable(&legacy, true) {
            Ok((v, true)) => return Ok(v),
            Err(e @ Error::Privileges(_)) => privilege_err = Some(e),
            _ => {}
        }
        match self.usable(&nft, false) {
            Ok((v, _)) => return Ok(v),
            Err(e @ Error::Privileges(_)) => privilege_err = privilege_err.or(Some(e)),
            _ => {}
        }
        match self.usable(base, false) {
            Ok((v, _)) => Ok(v),
            Err(e) => Err(privilege_err.unwrap_or(e)),
        }
    }

    fn run(
        &mut self,
        tool: Tool,
        ver: &Version,
        stdin: Option<&str>,
        args: &[String],
        quiet: bool,
    ) -> Result<String, Error> {
        let mut args = args.to_vec();
        if ver.wait && tool != Tool::Save {
            args.push("--wait".into());
        }
        let _ = quiet; // failures are returned; the caller reports those that matter
        self.exec(&ver.name(tool), &args, stdin)
    }
}

impl Real {
    /// `ip ...` in the target namespace; "already there" counts as success.
    pub fn ip(&self, args: &[&str]) -> Result<(), Error> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match self.exec("ip", &args, None) {
            Err(Error::Command { stderr, .. })
                if stderr.contains("File exists") || stderr.contains("already assigned") =>
            {
                Ok(())
            }
            r => r.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn versions() {
        assert!(version_at_least("iptables-save v1.8.9 (legacy)", (1, 6, 2)));
        assert!(!version_at_least("iptables-save v1.6.1", (1, 6, 2)));
        assert!(!version_at_least("garbage", (1, 6, 2)));
    }

    #[test]
    fn dry_run_records_commands_and_restore_lines() {
        let mut d = DryRun::default();
        let v = d.detect(true).unwrap();
        d.run(Tool::Save, &v, None, &[], true).unwrap();
        d.run(
            Tool::Restore,
            &v,
            Some("* nat\nCOMMIT\n"),
            &["--noflush".into()],
            false,
        )
        .unwrap();
        d.run(
            Tool::Iptables,
            &v,
            None,
            &["-t".into(), "nat".into(), "-F".into(), "X".into()],
            true,
        )
        .unwrap();
        assert_eq!(
            d.lines,
            vec!["ip6tables-save", "* nat", "COMMIT", "ip6tables -t nat -F X"]
        );
    }

    #[test]
    fn privilege_errors_are_recognised() {
        assert!(is_privilege_problem(
            "iptables-save v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)"
        ));
        assert!(!is_privilege_problem(
            "iptables: No chain/target/match by that name."
        ));
    }
}
