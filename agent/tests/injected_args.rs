// SPDX-License-Identifier: Apache-2.0
//! The `istio-init` container Istio's injector renders runs the image's entrypoint with
//! `istio-iptables …` arguments; with our agent as the entrypoint those arguments must be accepted
//! as they are (checked with `--dry-run` on the reference injection goldens).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn istio_init_arguments_from_the_injection_goldens_are_accepted() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/reference/istio/injection/pkg-kube-inject-testdata-inject"
    );
    let mut checked = 0;
    for name in [
        "hello.yaml.injected",
        "traffic-annotations.yaml.injected",
        "traffic-annotations-wildcards.yaml.injected",
    ] {
        let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
            let Some(inits) = v["spec"]["template"]["spec"]["initContainers"].as_sequence() else {
                continue;
            };
            for c in inits.iter().filter(|c| c["name"] == "istio-init") {
                let args: Vec<String> = c["args"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect();
                assert_eq!(args[0], "istio-iptables");
                let out = Command::new(env!("CARGO_BIN_EXE_pingsail-agent"))
                    .args(&args)
                    .arg("--dry-run")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{name}: {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(String::from_utf8_lossy(&out.stdout).contains("-N ISTIO_OUTPUT"));
                checked += 1;
            }
        }
    }
    assert!(checked >= 2, "only {checked} istio-init containers found");
}
