// SPDX-License-Identifier: Apache-2.0
//! Every bootstrap pilot-agent generates (Istio's `pkg/bootstrap` goldens) passes
//! `pingsail-proxy --mode validate`: the Prometheus listener's compressor filters, bootstrap tracing,
//! stats sinks, LRS and the other telemetry-only settings are accepted (docs/COMPATIBILITY.md lists
//! them as known differences), everything else is honoured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_pingsail-proxy");

/// Goldens pingsail refuses, with the reason (none today; keep the list asserted so a new refusal
/// or a fixed one shows up here).
const EXCEPTIONS: &[(&str, &str)] = &[];

fn goldens_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/reference/istio/bootstrap/pkg-bootstrap-testdata"
    ))
}

#[test]
fn every_istio_bootstrap_golden_validates() {
    let dir = goldens_dir();
    assert!(
        dir.is_dir(),
        "Istio bootstrap goldens not found at {}: the shared reference corpus must be checked out",
        dir.display()
    );
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with("_golden.json"))
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 25,
        "expected Istio's ~30 goldens, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        let out = Command::new(BIN)
            .args(["--mode", "validate", "-c"])
            .arg(f)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        match EXCEPTIONS.iter().find(|(n, _)| *n == name) {
            None if !out.status.success() => failures.push(format!("{name}: {}", stderr.trim())),
            Some((_, why)) if out.status.success() => {
                failures.push(format!("{name} validates now; drop its exception ({why})"))
            }
            Some((_, why)) if !stderr.contains(why) => failures.push(format!(
                "{name}: refused for another reason: {}",
                stderr.trim()
            )),
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same goldens with a tracer, a Wasm module or a compressor pingsail cannot vouch for are
/// refused: acceptance is by type, not blanket.
#[test]
fn unknown_telemetry_extensions_are_refused() {
    let golden = std::fs::read_to_string(goldens_dir().join("running_golden.json")).unwrap();
    let dir = tempdir();
    let cases = [
        (
            "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
            "type.googleapis.com/envoy.config.trace.v3.NoSuchTracer",
            "tracing.http.typed_config",
        ),
        (
            "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip",
            "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
            "compressor_library.typed_config",
        ),
    ];
    for (from, to, path) in cases {
        assert!(golden.contains(from), "running_golden.json lacks {from}");
        let f = dir.join("b.json");
        std::fs::write(&f, golden.replace(from, to)).unwrap();
        let out = Command::new(BIN)
            .args(["--mode", "validate", "-c"])
            .arg(&f)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{to} accepted");
        assert!(
            stderr.contains(path),
            "refusal should name {path}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "pingsail-goldens-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
