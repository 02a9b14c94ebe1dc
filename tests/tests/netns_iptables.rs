// SPDX-License-Identifier: Apache-2.0
//! `pingsail-agent iptables` applying rules for real, in a network-namespace pod: the kernel
//! accepts every rule set, re-runs are no-ops, `--reconcile` replaces different rules,
//! `--cleanup-only` removes everything, and missing privileges are reported as such.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pingsail_tests::netns::{Net, Pod, cargo_bin};

const BASE: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-g",
    "1337",
    "-i",
    "*",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = BASE.to_vec();
    a.extend_from_slice(extra);
    a
}

/// Our chains and the rules in them and jumping to them, from `iptables-save` (counters and
/// comments dropped).
fn ours(pod: &Pod, v6: bool) -> Vec<String> {
    pod.save(v6)
        .unwrap()
        .lines()
        .filter(|l| l.contains("ISTIO_") || l.starts_with('*'))
        .map(|l| {
            if l.starts_with(':') {
                l.split(' ').next().unwrap().to_string()
            } else {
                l.to_string()
            }
        })
        .collect()
}

fn count(rules: &[String], needle: &str) -> usize {
    rules.iter().filter(|r| r.contains(needle)).count()
}

#[test]
fn apply_rerun_reconcile_and_cleanup() {
    let Some(net) = Net::new("apply_rerun_reconcile_and_cleanup") else {
        return;
    };
    let pod = net.pod("pod").unwrap();
    let first = args(&["--enable-ipv6=true"]);
    pod.apply_iptables(&first).unwrap();
    let (v4, v6) = (ours(&pod, false), ours(&pod, true));
    for chain in [
        ":ISTIO_INBOUND",
        ":ISTIO_REDIRECT",
        ":ISTIO_IN_REDIRECT",
        ":ISTIO_OUTPUT",
    ] {
        assert_eq!(
            count(&v4, chain),
            1,
            "{chain} missing (IPv4):\n{}",
            v4.join("\n")
        );
        assert_eq!(
            count(&v6, chain),
            1,
            "{chain} missing (IPv6):\n{}",
            v6.join("\n")
        );
    }
    assert_eq!(count(&v4, "-j REDIRECT --to-ports 15001"), 1);
    assert_eq!(
        count(&v6, "-s ::6/128 -o lo -j RETURN"),
        1,
        "{}",
        v6.join("\n")
    );
    // ::6 is on lo for the IPv6 inbound passthrough.
    assert!(
        pod.exec("ip", &["-6", "addr", "show", "dev", "lo"])
            .unwrap()
            .contains("::6/128")
    );

    // Same settings again: nothing changes.
    pod.apply_iptables(&first).unwrap();
    assert_eq!(ours(&pod, false), v4, "re-run changed IPv4 rules");
    assert_eq!(ours(&pod, true), v6, "re-run changed IPv6 rules");

    // Different settings without --reconcile: the chains exist, so the restore fails (as
    // istio-iptables does); with --reconcile the rules are replaced.
    let second = args(&["--enable-ipv6=true", "-o", "9090"]);
    let out = pod.iptables(&second).unwrap();
    assert!(
        !out.status.success(),
        "applying different rules over ours should fail without --reconcile"
    );
    let mut reconcile = second.clone();
    reconcile.push("--reconcile");
    pod.apply_iptables(&reconcile).unwrap();
    let v4b = ours(&pod, false);
    assert_eq!(
        count(&v4b, "--dport 9090 -j RETURN"),
        2,
        "{}",
        v4b.join("\n")
    );
    assert_eq!(count(&v4b, ":ISTIO_OUTPUT"), 1);
    assert_eq!(
        count(&v4b, "-A OUTPUT -j ISTIO_OUTPUT"),
        1,
        "old jump left behind:\n{}",
        v4b.join("\n")
    );
    // The guardrails are gone.
    let filter = pod.save(false).unwrap();
    assert!(
        !filter.contains("-j DROP"),
        "guardrail left behind:\n{filter}"
    );

    let mut cleanup = second.clone();
    cleanup.push("--cleanup-only");
    pod.apply_iptables(&cleanup).unwrap();
    for v6 in [false, true] {
        let left = pod.save(v6).unwrap();
        assert!(
            !left.contains("ISTIO_"),
            "cleanup left rules (v6={v6}):\n{left}"
        );
    }
}

/// The kernel accepts the rule sets behind Istio's goldens (TPROXY, DNS capture with conntrack
/// zones, INVALID drop, owner groups, virtual interfaces), and each re-run is a no-op.
#[test]
fn kernel_accepts_every_mode() {
    let Some(net) = Net::new("kernel_accepts_every_mode") else {
        return;
    };
    let cases: &[&[&str]] = &[
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
            "-c",
            "not-istio-nic",
            "--enable-ipv6=true",
        ],
        &[
            "-b",
            "4000,5000",
            "-d",
            "6000,7000",
            "-k",
            "eth0,eth1",
            "-u",
            "3,4",
            "-g",
            "1,2",
            "-x",
            "2001:db8::/32",
            "-i",
            "2001:db8::/32",
            "--enable-ipv6=true",
        ],
        &[
            "--redirect-dns",
            "--capture-all-dns",
            "--drop-invalid",
            "--enable-ipv6=true",
            "-q",
            "32000,31000",
        ],
        &[
            "-m",
            "TPROXY",
            "-b",
            "32000,31000",
            "--outbound-owner-groups",
            "0,202",
            "--enable-ipv6=false",
        ],
        &[
            "--outbound-owner-groups-exclude",
            "888",
            "-i",
            "127.1.2.3/32",
            "--redirect-dns",
            "--dns-servers=127.0.0.53",
            "--enable-ipv6=false",
        ],
    ];
    for (i, case) in cases.iter().enumerate() {
        let pod = net.pod(&format!("m{i}")).unwrap();
        pod.apply_iptables(case)
            .unwrap_or_else(|e| panic!("case {case:?}: {e:#}"));
        let before = (ours(&pod, false), ours(&pod, true));
        assert!(
            before.0.iter().any(|l| l.contains("ISTIO_OUTPUT")),
            "case {case:?}: nothing applied"
        );
        pod.apply_iptables(case).unwrap();
        assert_eq!(
            (ours(&pod, false), ours(&pod, true)),
            before,
            "case {case:?}: re-run changed the rules"
        );
        if case.contains(&"TPROXY") {
            let rules = pod.exec("ip", &["rule", "show"]).unwrap();
            assert!(
                rules.contains("fwmark 0x539 lookup 133"),
                "case {case:?}: no TPROXY ip rule:\n{rules}"
            );
            let routes = pod.exec("ip", &["route", "show", "table", "133"]).unwrap();
            assert!(
                routes.contains("local default dev lo"),
                "case {case:?}: no TPROXY route:\n{routes}"
            );
        }
    }
}

/// Without CAP_NET_ADMIN the agent exits 1 and says what is missing.
#[test]
fn unprivileged_apply_names_the_missing_capability() {
    let agent = cargo_bin("pingsail-agent", "pingsail-agent").unwrap();
    let out =
        match Net::new("unprivileged_apply_names_the_missing_capability (as root, via setpriv)") {
            // Root: drop to nobody, in a pod (nothing outside it is ever touched).
            Some(net) => {
                let pod = net.pod("pod").unwrap();
                let mut c = pod.cmd_as(65534, 65534, &agent);
                c.arg("iptables").args(args(&["--enable-ipv6=false"]));
                c.output().unwrap()
            }
            // Not root: we are unprivileged already.
            None => std::process::Command::new(&agent)
                .arg("iptables")
                .args(args(&["--enable-ipv6=false"]))
                .output()
                .unwrap(),
        };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("CAP_NET_ADMIN"),
        "stderr does not name the capability: {stderr}"
    );
}

/// Without `--enable-ipv6`, IPv6 is decided from the pod's addresses as istio-iptables does: the
/// first usable address (IPv4 here) decides; with `--dual-stack`, any IPv6 address enables it.
#[test]
fn ipv6_is_detected_from_the_pod_addresses() {
    let Some(net) = Net::new("ipv6_is_detected_from_the_pod_addresses") else {
        return;
    };
    let single = net.pod("single").unwrap();
    single.apply_iptables(BASE).unwrap();
    assert!(!ours(&single, false).is_empty());
    assert!(
        !single.save(true).unwrap().contains("ISTIO_"),
        "IPv6 programmed for an IPv4-first pod"
    );
    let dual = net.pod("dual").unwrap();
    dual.apply_iptables(&args(&["--dual-stack"])).unwrap();
    assert!(
        dual.save(true).unwrap().contains(":ISTIO_OUTPUT"),
        "IPv6 not programmed with --dual-stack"
    );
}

/// `--network-namespace PATH`: run from outside (as the CNI plugin does), the rules land in that
/// namespace only.
#[test]
fn network_namespace_flag_programs_that_namespace() {
    let Some(net) = Net::new("network_namespace_flag_programs_that_namespace") else {
        return;
    };
    let (target, other) = (net.pod("target").unwrap(), net.pod("other").unwrap());
    let agent = cargo_bin("pingsail-agent", "pingsail-agent").unwrap();
    let nspath = format!("/var/run/netns/{}", target.ns);
    // Started inside `other`, pointed at `target`; IPv6 detected from target's addresses.
    let mut c = other.cmd(&agent);
    c.arg("iptables")
        .args(BASE)
        .args(["--dual-stack", "--network-namespace", &nspath]);
    other.run(c).unwrap();
    assert!(target.save(false).unwrap().contains(":ISTIO_OUTPUT"));
    assert!(target.save(true).unwrap().contains(":ISTIO_OUTPUT"));
    assert!(
        !other.save(false).unwrap().contains("ISTIO_"),
        "rules landed in the wrong namespace"
    );
}
