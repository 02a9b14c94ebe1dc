// SPDX-License-Identifier: Apache-2.0
//! `pingsail-agent iptables --dry-run` against Istio's own goldens
//! (`../shared/reference/istio/iptables/`, README there): for the settings behind each golden our
//! output must be byte-for-byte the golden. Every mismatch is reported, then the test fails. Goldens
//! we do not support are listed in `UNSUPPORTED` (and in docs/COMPATIBILITY.md, "iptables"); the
//! test also fails if a golden is neither covered nor listed, or listed but covered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const REF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/istio/iptables"
);

/// `getCommonTestCases()` base config of istio's run_test.go (`constructTestConfig`), as flags.
/// IPv6 is off unless a case turns it on; no DNS servers unless a case names them.
const BASE: &[&str] = &[
    "--dry-run",
    "-p",
    "15001",
    "-z",
    "15006",
    "-e",
    "15008",
    "-u",
    "1337",
    "-g",
    "1337",
    "-t",
    "1337",
    "-r",
    "133",
    "--enable-ipv6=false",
    "--dns-servers=",
];

/// tools/istio-iptables/pkg/capture/testdata: golden name -> the case's settings.
const CAPTURE: &[(&str, &[&str])] = &[
    (
        "ipv6-empty-inbound-ports",
        &["-b", "", "--enable-ipv6=true"],
    ),
    (
        "ip-range",
        &[
            "-x",
            "1.1.0.0/16",
            "-i",
            "9.9.0.0/16",
            "--redirect-dns",
            "--enable-ipv6=false",
            "-g",
            "1,2",
            "-u",
            "3,4",
            "--dns-servers=127.0.0.53",
        ],
    ),
    (
        "tproxy",
        &[
            "-m",
            "TPROXY",
            "-b",
            "*",
            "-x",
            "1.1.0.0/16",
            "-i",
            "9.9.0.0/16",
            "--redirect-dns",
            "--dns-servers=127.0.0.53",
            "-g",
            "1337",
            "-u",
            "1337",
            "-c",
            "not-istio-nic",
            "--enable-ipv6=true",
        ],
    ),
    (
        "ipv6-inbound-ports",
        &["-b", "4000,5000", "--enable-ipv6=true"],
    ),
    (
        "ipv6-virt-interfaces",
        &["-b", "4000,5000", "-k", "eth0,eth1", "--enable-ipv6=true"],
    ),
    (
        "ipv6-ipnets",
        &[
            "-b",
            "4000,5000",
            "-d",
            "6000,7000,",
            "-k",
            "eth0,eth1",
            "-x",
            "2001:db8::/32",
            "-i",
            "2001:db8::/32",
            "--enable-ipv6=true",
        ],
    ),
    (
        "ipv6-uid-gid",
        &[
            "-b",
            "4000,5000",
            "-d",
            "6000,7000",
            "-k",
            "eth0,eth1",
            "-g",
            "1,2",
            "-u",
            "3,4",
            "--enable-ipv6=true",
            "-x",
            "2001:db8::/32",
            "-i",
            "2001:db8::/32",
        ],
    ),
    (
        "ipv6-outbound-ports",
        &["-b", "", "-q", "32000,31000", "--enable-ipv6=true"],
    ),
    ("empty", &[]),
    ("kube-virt-interfaces", &["-k", "eth1,eth2", "-i", "*"]),
    ("ipnets", &["-i", "10.0.0.0/8"]),
    (
        "ipnets-with-kube-virt-interfaces",
        &["-k", "eth1,eth2", "-i", "10.0.0.0/8"],
    ),
    ("inbound-ports-include", &["-b", "32000,31000"]),
    ("inbound-ports-wildcard", &["-b", "*"]),
    (
        "inbound-ports-tproxy",
        &["-b", "32000,31000", "-m", "TPROXY"],
    ),
    (
        "inbound-ports-wildcard-tproxy",
        &["-b", "*", "-m", "TPROXY"],
    ),
    (
        "dns-uid-gid",
        &[
            "--redirect-dns",
            "--dns-servers=127.0.0.53,::127.0.0.53",
            "-g",
            "1,2",
            "-u",
            "3,4",
            "--enable-ipv6=true",
        ],
    ),
    (
        "ipv6-dns-uid-gid",
        &[
            "--enable-ipv6=true",
            "--redirect-dns",
            "-g",
            "1,2",
            "-u",
            "3,4",
        ],
    ),
    (
        "outbound-owner-groups",
        &["--outbound-owner-groups", "java,202"],
    ),
    (
        "outbound-owner-groups-exclude",
        &["--outbound-owner-groups-exclude", "888,ftp"],
    ),
    (
        "ipv6-dns-outbound-owner-groups",
        &[
            "--enable-ipv6=true",
            "--redirect-dns",
            "--outbound-owner-groups",
            "java,202",
        ],
    ),
    (
        "ipv6-dns-outbound-owner-groups-exclude",
        &[
            "--enable-ipv6=true",
            "--redirect-dns",
            "--outbound-owner-groups-exclude",
            "888,ftp",
        ],
    ),
    ("outbound-ports-include", &["-q", "32000,31000"]),
    (
        "loopback-outbound-iprange",
        &[
            "-i",
            "127.1.2.3/32",
            "--redirect-dns",
            "--dns-servers=127.0.0.53",
            "--enable-ipv6=false",
            "-g",
            "1,2",
            "-u",
            "3,4",
        ],
    ),
    ("basic-exclude-nic", &["-c", "not-istio-nic"]),
    ("drop-invalid", &["--drop-invalid"]),
    (
        "host-ipv4-loopback-cidr",
        &["--outbound-ipv4-loopback-cidr", "127.0.0.1/8"],
    ),
];

/// cni/pkg/plugin/testdata (sidecar-mode CNI plugin, `iptables-restore` input only): golden ->
/// the settings the CNI plugin derives from the test pod (its defaults: `-i '*' -b '*'`, inbound
/// 15020,15021,15090 and outbound 15020 excluded, DNS capture = capture all DNS).
const CNI_BASE: &[&str] = &[
    "--dry-run",
    "-p",
    "15001",
    "-u",
    "1337",
    "-g",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-b",
    "*",
    "-d",
    "15020,15021,15090",
    "-o",
    "15020",
    "--enable-ipv6=false",
];
const CNI: &[(&str, &[&str])] = &[
    ("basic", &[]),
    (
        "include-exclude-ip",
        &["-i", "127.0.0.0/8", "-x", "10.0.0.0/8"],
    ),
    (
        "include-exclude-ports",
        &[
            "-b",
            "1111,2222",
            "-d",
            "3333,4444,15020,15021,15090",
            "-o",
            "5555,6666",
        ],
    ),
    ("tproxy", &["-m", "TPROXY"]),
    ("dns", &["--redirect-dns", "--capture-all-dns"]),
    ("invalid-drop", &["--drop-invalid"]),
    ("custom-uid", &["-u", "1000670000", "-g", "1000670001"]),
    (
        "custom-uid-tproxy",
        &["-m", "TPROXY", "-u", "1000670000", "-g", "1000670001"],
    ),
];

/// Goldens in the reference directory we do not reproduce (path relative to it, or `dir/*`), with
/// the reason. Mirrored in docs/COMPATIBILITY.md ("iptables").
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "tools-istio-nftables-pkg-capture-testdata/*",
        "istio-nftables' native nftables rules (--native-nftables): not implemented; pingsail programs iptables (iptables-nft on nftables hosts)",
    ),
    (
        "cni-pkg-plugin-testdata/status-ports.txt.golden",
        "stale file: no test case of Istio at this commit produces it (older rule format `-A OUTPUT -p tcp -j ISTIO_OUTPUT`, no UDP exclusion)",
    ),
];

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pingsail-agent"))
        .arg("iptables")
        .args(args)
        .env_clear()
        .output()
        .expect("running pingsail-agent")
}

fn first_difference(want: &str, got: &str) -> String {
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    for i in 0..w.len().max(g.len()) {
        if w.get(i) != g.get(i) {
            return format!("line {}: want {:?}, got {:?}", i + 1, w.get(i), g.get(i));
        }
    }
    "trailing newline differs".into()
}

/// Every golden under the reference directory, as `dir/file`.
fn all_goldens() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for d in std::fs::read_dir(REF).unwrap() {
        let d = d.unwrap().path();
        if !d.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            if f.to_string_lossy().ends_with(".golden") {
                out.insert(format!(
                    "{}/{}",
                    d.file_name().unwrap().to_string_lossy(),
                    f.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    out
}

/// Runs each case; returns the failures and the goldens covered.
fn check(
    dir: &str,
    ext: &str,
    base: &[&str],
    cases: &[(&str, &[&str])],
    restore_only: bool,
) -> (Vec<String>, BTreeSet<String>) {
    let mut failures = Vec::new();
    let mut covered = BTreeSet::new();
    for (name, case) in cases {
        let file = format!("{dir}/{name}{ext}");
        covered.insert(file.clone());
        let want = std::fs::read_to_string(Path::new(REF).join(&file)).unwrap();
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(case);
        let out = agent(&args);
        let mut got = String::from_utf8_lossy(&out.stdout).into_owned();
        if restore_only {
            // The CNI goldens keep the restore input only.
            got = got
                .lines()
                .filter(|l| *l != "iptables-save" && *l != "ip6tables-save")
                .map(|l| format!("{l}\n"))
                .collect();
        }
        if !out.status.success() {
            failures.push(format!(
                "{file}: exit {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        } else if got != want {
            failures.push(format!(
                "{file}: {}\n--- got:\n{got}",
                first_difference(&want, &got)
            ));
        }
    }
    (failures, covered)
}

#[test]
fn istio_iptables_goldens() {
    let (mut failures, mut covered) = check(
        "tools-istio-iptables-pkg-capture-testdata",
        ".golden",
        BASE,
        CAPTURE,
        false,
    );
    let (f, c) = check(
        "cni-pkg-plugin-testdata",
        ".txt.golden",
        CNI_BASE,
        CNI,
        true,
    );
    failures.extend(f);
    covered.extend(c);
    let total = covered.len();

    let unsupported = |g: &str| {
        UNSUPPORTED
            .iter()
            .any(|(pat, _)| match pat.strip_suffix("/*") {
                Some(dir) => g.starts_with(&format!("{dir}/")),
                None => g == *pat,
            })
    };
    let all = all_goldens();
    let mut skipped = BTreeSet::new();
    for g in &all {
        match (covered.contains(g), unsupported(g)) {
            (true, true) => failures.push(format!("{g}: covered but listed as unsupported")),
            (false, false) => {
                failures.push(format!("{g}: neither covered nor listed as unsupported"))
            }
            (false, true) => drop(skipped.insert(g.clone())),
            (true, false) => {}
        }
    }
    for (pat, _) in UNSUPPORTED {
        if !all
            .iter()
            .any(|g| unsupported(g) && (g == pat || pat.ends_with("/*")))
        {
            failures.push(format!("{pat}: listed as unsupported but no such golden"));
        }
    }
    eprintln!(
        "{} goldens compared, {} skipped as unsupported",
        total,
        skipped.len()
    );
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // The skipped set is exactly the nftables goldens and the stale CNI one.
    assert_eq!(
        skipped.len(),
        all.iter()
            .filter(|g| g.starts_with("tools-istio-nftables-pkg-capture-testdata/"))
            .count()
            + 1
    );
}

#[test]
fn unsupported_list_matches_compatibility_doc() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/COMPATIBILITY.md"
    ))
    .unwrap();
    let section = doc
        .split("## iptables")
        .nth(1)
        .expect("docs/COMPATIBILITY.md has an `## iptables` section");
    for (pat, _) in UNSUPPORTED {
        assert!(
            section.contains(&format!("`{pat}`")),
            "docs/COMPATIBILITY.md (iptables) does not list `{pat}`"
        );
    }
}
