// SPDX-License-Identifier: Apache-2.0
//! Locates the FileDescriptorSet that the `envoy-types` crate ships (but does not export) and copies it
//! into OUT_DIR, so that bootstrap YAML/JSON and `/config_dump` can use proto3-JSON through prost-reflect
//! with exactly the same schema as the prost types we decode into.

use std::path::PathBuf;
use std::process::Command;

const ENVOY_TYPES: &str = "envoy-types";
const DESCRIPTOR: &str = "src/generated/types.bin";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR unset")));
    let manifest_dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| fail("no manifest dir"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let target = std::env::var("TARGET").unwrap_or_else(|_| fail("TARGET unset"));
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--filter-platform",
            &target,
        ])
        .current_dir(&manifest_dir)
        .output()
        .unwrap_or_else(|e| fail(&format!("running cargo metadata: {e}")));
    if !output.status.success() {
        fail(&format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| fail(&format!("cargo metadata output: {e}")));
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == ENVOY_TYPES)
        .and_then(|p| p["manifest_path"].as_str())
        .unwrap_or_else(|| fail("envoy-types not found in cargo metadata"));
    let src = PathBuf::from(manifest)
        .parent()
        .map(|d| d.join(DESCRIPTOR))
        .unwrap_or_else(|| fail("bad manifest path"));
    println!("cargo:rerun-if-changed={}", src.display());
    std::fs::copy(&src, out.join("envoy_types.bin"))
        .unwrap_or_else(|e| fail(&format!("copying {}: {e}", src.display())));
}

fn fail(msg: &str) -> ! {
    eprintln!("pingsail-proxy build: {msg}");
    std::process::exit(1)
}
