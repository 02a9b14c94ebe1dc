// SPDX-License-Identifier: Apache-2.0
//! The README's main job: `pingsail-agent standalone` starts the loopback mesh of
//! `conf/standalone/` (development CA → SDS → three pingsail sidecars, mTLS between them, a canary
//! split, a retry, RBAC) and every command of the README's "Standalone mesh" section works
//! against it. The commands the agent prints once ready are the README's, line for line.
//!
//! The mesh uses the fixed ports of `conf/standalone/` (18000–18280, below the ephemeral range);
//! this is the only test that binds them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pingsail_tests::netns::cargo_bin;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The shell lines of the README's "Standalone mesh" section (its first ```sh block).
fn readme_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let section = readme
        .split("\n## Standalone mesh")
        .nth(1)
        .expect("README has a '## Standalone mesh' section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("the section has a ```sh block");
    block
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

struct Mesh(std::process::Child);

impl Drop for Mesh {
    fn drop(&mut self) {
        // SIGTERM: the agent stops its sidecars (they are killed with it) and exits.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn sh(line: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "README line failed ({}): {line}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_readme_mesh_works_line_by_line() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("curl is needed by the README's commands (.ci/run installs it)");
    }
    let agent = cargo_bin("pingsail-agent", "pingsail-agent").unwrap();
    let proxy = cargo_bin("pingsail-proxy", "pingsail-proxy").unwrap();
    let run_dir = pingsail_tests::net::TempDir::new("standalone").unwrap();
    let mut child = Command::new(&agent)
        .args(["standalone", "--conf", "conf/standalone", "--proxy-binary"])
        .arg(&proxy)
        .arg("--run-dir")
        .arg(run_dir.path())
        .current_dir(ROOT)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mesh = Mesh(child);

    // Readiness: the agent prints `mesh ready` once every sidecar's admin says LIVE, then the
    // commands to try.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the agent printed `Ctrl-C stops the mesh.` (mesh ready)");
        if line.starts_with("Ctrl-C") {
            break;
        }
        printed.push(line);
    }
    assert!(
        printed[0].starts_with("mesh ready: 3 workloads"),
        "{printed:?}"
    );
    let tries: Vec<String> = printed
        .iter()
        .skip_while(|l| *l != "try:")
        .skip(1)
        .map(|l| l.trim().to_owned())
        .collect();

    // The section's first line starts the mesh (done above with this build's binaries); every
    // other line is one of the printed commands, and each works.
    let lines = readme_lines();
    assert!(
        lines[0].contains("pingsail-agent standalone"),
        "the section starts the mesh: {}",
        lines[0]
    );
    let rest: Vec<String> = lines[1..].iter().map(|l| l.trim().to_owned()).collect();
    assert_eq!(rest, tries, "README lines == what the agent prints");
    let outputs: Vec<String> = rest.iter().map(|l| sh(l)).collect();
    let find = |needle: &str| {
        rest.iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no README line with {needle:?}"))
    };

    // Canary 90/10 — 20 requests can all land on v1; 300 more must see both.
    let counts = &outputs[find("seq 20")];
    assert!(counts.contains("reviews v1: /reviews"), "{counts}");
    let many = sh("for i in $(seq 300); do curl -s localhost:18000/reviews; done");
    let v2 = many.matches("reviews v2").count();
    assert!(
        (5..=70).contains(&v2),
        "~10% of 300 to v2, got {v2}:\n{many}"
    );
    // mTLS end to end: the server's app sees the client's SPIFFE identity.
    assert!(
        counts.contains("for spiffe://cluster.local/ns/default/sa/sleep"),
        "{counts}"
    );
    // Header match pins v2.
    assert!(
        outputs[find("x-canary")].starts_with("reviews v2: /reviews"),
        "{}",
        outputs[find("x-canary")]
    );
    // The retry: attempt 1 fails with 503, attempt 2 succeeds.
    assert!(
        outputs[find("/flaky")].contains("(attempt 2)"),
        "{}",
        outputs[find("/flaky")]
    );
    // RBAC DENY on /admin.
    assert_eq!(outputs[find("/admin")], "RBAC: access denied");
    // Stats show the retry.
    let stats = &outputs[find("/stats")];
    assert!(
        stats.contains(
            "cluster.outbound|9080|v1|reviews.default.svc.cluster.local.upstream_rq_retry: 1"
        ),
        "{stats}"
    );
    // STRICT mTLS: a caller without a client certificate never reaches the app.
    assert_eq!(outputs[find("https://")].trim(), "refused");

    drop(mesh);
}
