// SPDX-License-Identifier: Apache-2.0
//! The chart's rendered manifests and kube-inject output validate against the Kubernetes API
//! schemas (`conf/injector/validate.sh`, offline, via the `kubernetes-validate` package that
//! `.ci/run` installs). Missing the validator is a failure, not a skip: CI must validate.

use std::process::Command;

#[test]
fn manifests_and_injected_pods_match_kubernetes_schemas() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/injector/validate.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_pingsail-injector"))
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => panic!("running {script}: {e}"),
    };
    assert!(
        out.status.success(),
        "{script} failed (exit {:?}; install with `pip install kubernetes-validate==1.37.0`):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
