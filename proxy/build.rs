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

/// Keeps only the message and enum types reachable from [`roots::ROOTS`] through field types (whole
/// top-level messages, with their nested types), drops comments, services and option extensions, and
/// keeps the files that still hold something. All of Envoy's schemas cost ~50 MiB of heap as a
/// descriptor pool; this closure a small fraction of that.
fn prune(full: &[u8]) -> Vec<u8> {
    use prost::Message;
    use prost_types::{DescriptorProto, FileDescriptorSet};
    use std::collections::{HashMap, HashSet};
    let mut set = FileDescriptorSet::decode(full)
        .unwrap_or_else(|e| fail(&format!("decoding descriptors: {e}")));
    // full name (".pkg.Msg.Nested") → (file, top-level kind/index)
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    enum Top {
        Msg(usize, usize),
        Enum(usize, usize),
    }
    fn index_msg(prefix: &str, m: &DescriptorProto, top: Top, out: &mut HashMap<String, Top>) {
        let full = format!("{prefix}.{}", m.name());
        for n in &m.nested_type {
            index_msg(&full, n, top, out);
        }
        for e in &m.enum_type {
            out.insert(format!("{full}.{}", e.name()), top);
        }
        out.insert(full, top);
    }
    let mut names: HashMap<String, Top> = HashMap::new();
    for (fi, f) in set.file.iter().enumerate() {
        let pkg = if f.package().is_empty() {
            String::new()
        } else {
            format!(".{}", f.package())
        };
        for (mi, m) in f.message_type.iter().enumerate() {
            index_msg(&pkg, m, Top::Msg(fi, mi), &mut names);
        }
        for (ei, e) in f.enum_type.iter().enumerate() {
            names.insert(format!("{pkg}.{}", e.name()), Top::Enum(fi, ei));
        }
    }
    fn field_types(m: &DescriptorProto, out: &mut Vec<String>) {
        for f in &m.field {
            if !f.type_name().is_empty() {
                out.push(f.type_name().to_string());
            }
        }
        for n in &m.nested_type {
            field_types(n, out);
        }
    }
    let mut keep: HashSet<Top> = HashSet::new();
    let mut work: Vec<Top> = Vec::new();
    for r in roots::ROOTS {
        match names.get(&format!(".{r}")) {
            Some(t) => work.push(*t),
            None => fail(&format!("descriptor root {r} not found in envoy-types")),
        }
    }
    while let Some(t) = work.pop() {
        if !keep.insert(t) {
            continue;
        }
        if let Top::Msg(fi, mi) = t {
            let mut refs = Vec::new();
            field_types(&set.file[fi].message_type[mi], &mut refs);
            for r in refs {
                match names.get(&r) {
                    Some(t) => work.push(*t),
                    None => fail(&format!("type {r} referenced but not defined")),
                }
            }
        }
    }
    let mut kept_files: HashSet<String> = HashSet::new();
    for (fi, f) in set.file.iter_mut().enumerate() {
        let msgs = std::mem::take(&mut f.message_type);
        f.message_type = msgs
            .into_iter()
            .enumerate()
            .filter(|(mi, _)| keep.contains(&Top::Msg(fi, *mi)))
            .map(|(_, m)| m)
            .collect();
        let enums = std::mem::take(&mut f.enum_type);
        f.enum_type = enums
            .into_iter()
            .enumerate()
            .filter(|(ei, _)| keep.contains(&Top::Enum(fi, *ei)))
            .map(|(_, e)| e)
            .collect();
        f.service.clear();
        f.extension.clear();
        f.source_code_info = None;
        f.options = None;
        if !f.message_type.is_empty() || !f.enum_type.is_empty() {
            kept_files.insert(f.name().to_string());
        }
    }
    set.file.retain(|f| kept_files.contains(f.name()));
    for f in &mut set.file {
        f.dependency.retain(|d| kept_files.contains(d));
        f.public_dependency.clear();
        f.weak_dependency.clear();
        // Options (validation rules, annotations) are not needed for JSON or reflection; map_entry is.
        fn strip(m: &mut DescriptorProto) {
            let map_entry = m.options.as_ref().and_then(|o| o.map_entry);
            m.options = map_entry.map(|v| prost_types::MessageOptions {
                map_entry: Some(v),
                ..Default::default()
            });
            for f in &mut m.field {
                let deprecated = f.options.as_ref().and_then(|o| o.deprecated);
                let packed = f.options.as_ref().and_then(|o| o.packed);
                f.options =
                    (deprecated.is_some() || packed.is_some()).then(|| prost_types::FieldOptions {
                        deprecated,
                        packed,
                        ..Default::default()
                    });
            }
            for n in &mut m.nested_type {
                strip(n);
            }
        }
        for m in &mut f.message_type {
            strip(m);
        }
    }
    set.encode_to_vec()
}

fn fail(msg: &str) -> ! {
    eprintln!("pingsail-proxy build: {msg}");
    std::process::exit(1)
}
