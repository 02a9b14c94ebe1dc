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
    println!("cargo:rerun-if-changed=src/xds/pool_roots.rs");
    let full =
        std::fs::read(&src).unwrap_or_else(|e| fail(&format!("reading {}: {e}", src.display())));
    let subset = prune(&full);
    std::fs::write(out.join("envoy_types.bin"), subset)
        .unwrap_or_else(|e| fail(&format!("writing descriptors: {e}")));
}

mod roots {
    include!("src/xds/pool_roots.rs");
}

/// Keeps the files that define [`roots::ROOTS`] and everything they import, without comments: the
/// full set costs ~50 MiB of heap as a descriptor pool, the closure under 1 MiB.
fn prune(full: &[u8]) -> Vec<u8> {
    use prost::Message;
    use prost_types::{DescriptorProto, FileDescriptorSet};
    let set = FileDescriptorSet::decode(full)
        .unwrap_or_else(|e| fail(&format!("decoding descriptors: {e}")));
    fn names(prefix: &str, msgs: &[DescriptorProto], out: &mut Vec<String>) {
        for m in msgs {
            let full = format!("{prefix}.{}", m.name());
            names(&full, &m.nested_type, out);
            out.push(full);
        }
    }
    let mut defining = std::collections::HashMap::new();
    for (i, f) in set.file.iter().enumerate() {
        let mut n = Vec::new();
        names(f.package(), &f.message_type, &mut n);
        for name in n {
            defining.insert(name, i);
        }
    }
    let by_file: std::collections::HashMap<&str, usize> = set
        .file
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name(), i))
        .collect();
    let mut keep = vec![false; set.file.len()];
    let mut stack = Vec::new();
    for r in roots::ROOTS {
        match defining.get(*r) {
            Some(&i) => stack.push(i),
            None => fail(&format!("descriptor root {r} not found in envoy-types")),
        }
    }
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut keep[i], true) {
            continue;
        }
        for dep in &set.file[i].dependency {
            if let Some(&j) = by_file.get(dep.as_str()) {
                stack.push(j);
            }
        }
    }
    let file = set
        .file
        .into_iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(mut f, _)| {
            f.source_code_info = None;
            f
        })
        .collect();
    FileDescriptorSet { file }.encode_to_vec()
}

fn fail(msg: &str) -> ! {
    eprintln!("pingsail-proxy build: {msg}");
    std::process::exit(1)
}
