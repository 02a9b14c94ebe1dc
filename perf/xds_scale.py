#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""xDS scale benchmark driver (issue 3, item 7): pingsail vs Envoy over delta ADS.

Runs `xds-scale` (tests/perf-bin/xds_scale.rs: fake istiod in-process, the proxy as its own process)
alternately for Envoy and pingsail (ABBA: Envoy first in odd rounds), waits for a quiet machine
before each run, and prints a markdown report with medians and ratios pingsail/Envoy. Raw JSON lines
and the report go to perf/out/xds-scale-<time>.{json,md}.

    cargo build --release -p pingsail-proxy && cargo build -p pingsail-tests --bin xds-scale
    python3 perf/xds_scale.py --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (reuses machine(), loadavg(), busy_cores(), wait_quiet(), log())

PERF = bench.PERF
ROOT = bench.ROOT

# (label, json path, unit, scale)
METRICS = [
    ("push → ACK, CDS (ms)", ("push_to_ack_ms", "cds"), 1),
    ("push → ACK, EDS (ms)", ("push_to_ack_ms", "eds"), 1),
    ("push → ACK, RDS (ms)", ("push_to_ack_ms", "rds"), 1),
    ("push → ACK, all (ms)", ("push_to_ack_ms", "all"), 1),
    ("push → first 200 (last new service) (ms)", ("push_to_serving_ms", "first"), 1),
    ("push → 200 from every sampled service (ms)", ("push_to_serving_ms", "sample"), 1),
    ("proxy CPU for the push (s)", ("push_cpu_s",), 1),
    ("one-endpoint EDS change → ACK, median (ms)", ("eds_ack_ms", "median"), 1),
    ("one-endpoint EDS change → ACK, max (ms)", ("eds_ack_ms", "max"), 1),
    ("RSS before the push (MiB)", ("rss_kib", "before"), 1 / 1024),
    ("RSS after the push (MiB)", ("rss_kib", "after"), 1 / 1024),
    ("RSS growth from the push (MiB)", ("rss_growth",), 1 / 1024),
    ("RSS after the EDS changes (MiB)", ("rss_kib", "end"), 1 / 1024),
    ("peak RSS (VmHWM) (MiB)", ("hwm_kib", "end"), 1 / 1024),
    ("start → ready with the small config (ms)", ("startup_ms",), 1),
]


def get(r: dict, path: tuple) -> float:
    if path == ("rss_growth",):
        return r["rss_kib"]["after"] - r["rss_kib"]["before"]
    v = r
    for k in path:
        v = v[k]
    return float(v)


def fmt(v: float) -> str:
    if v != v:
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def report(runs: list[dict], meta: dict) -> str:
    by = {p: [r for r in runs if r.get("proxy") == p and "error" not in r] for p in ("pingsail", "envoy")}
    out = [f"machine: {meta['machine']}", f"command: `{meta['command']}`", ""]
    out.append(f"medians of {len(by['pingsail'])} pingsail / {len(by['envoy'])} Envoy runs")
    out.append("")
    out.append("| metric | pingsail | Envoy | ratio pingsail/Envoy |")
    out.append("| --- | ---: | ---: | ---: |")
    for label, path, scale in METRICS:
        med = {}
        for p in by:
            vals = [get(r, path) * scale for r in by[p]]
            med[p] = statistics.median(vals) if vals else float("nan")
        ratio = med["pingsail"] / med["envoy"] if med["envoy"] else float("nan")
        out.append(f"| {label} | {fmt(med['pingsail'])} | {fmt(med['envoy'])} | **{fmt(ratio)}** |")
    out.append("")
    out.append("Raw runs (load = 1-min load average / busy cores just before the run):")
    out.append("")
    out.append("| # | proxy | load | ACK all ms | first 200 ms | sample 200 ms | push CPU s | EDS ACK median ms | RSS before/after/end MiB | NACKs |")
    out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for i, r in enumerate(runs, 1):
        q = r.get("quiet", {})
        load = f"{q.get('load1', 0):.2f}/{q.get('busy_cores', 0):.2f}"
        if "error" in r:
            out.append(f"| {i} | {r['proxy']} | {load} | error: {r['error'][:200]} | | | | | | |")
            continue
        rss = "/".join(f"{r['rss_kib'][k] / 1024:.1f}" for k in ("before", "after", "end"))
        out.append(
            f"| {i} | {r['proxy']} | {load} | {fmt(r['push_to_ack_ms']['all'])} | "
            f"{fmt(r['push_to_serving_ms']['first'])} | {fmt(r['push_to_serving_ms']['sample'])} | "
            f"{r['push_cpu_s']:.2f} | {fmt(r['eds_ack_ms']['median'])} | {rss} | {len(r['nacks'])} |"
        )
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="runs per proxy (default 3)")
    ap.add_argument("--bench-bin", type=Path, default=ROOT / "target/debug/xds-scale")
    ap.add_argument("--pingsail-bin", type=Path, default=ROOT / "target/release/pingsail-proxy")
    ap.add_argument("--envoy-bin", type=Path, default=None)
    ap.add_argument("--quiet-load", type=float, default=0.7)
    ap.add_argument("--quiet-busy", type=float, default=0.3)
    ap.add_argument("--min-pause", type=float, default=5.0)
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="per run, s")
    ap.add_argument("--out", type=Path, default=PERF / "out")
    ap.add_argument("bench_args", nargs="*", help="passed to xds-scale (after --)")
    args = ap.parse_args()

    meta = {
        "machine": bench.machine(),
        "command": " ".join(["python3", "perf/xds_scale.py"] + sys.argv[1:]),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
    }
    runs: list[dict] = []
    for rnd in range(args.rounds):
        order = ["envoy", "pingsail"] if rnd % 2 == 0 else ["pingsail", "envoy"]
        for proxy in order:
            quiet = bench.wait_quiet(args)
            cmd = [str(args.bench_bin), "--proxy", proxy] + args.bench_args
            if proxy == "pingsail":
                cmd += ["--bin", str(args.pingsail_bin)]
            elif args.envoy_bin:
                cmd += ["--bin", str(args.envoy_bin)]
            bench.log(f"round {rnd + 1}/{args.rounds}: {proxy}")
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
                if p.returncode != 0 or not line:
                    r = {"proxy": proxy, "error": (p.stderr.strip() or f"exit {p.returncode}")[-2000:]}
                else:
                    r = json.loads(line)
            except subprocess.TimeoutExpired:
                r = {"proxy": proxy, "error": f"timed out after {args.timeout}s"}
            r["quiet"] = quiet
            runs.append(r)
            if "error" in r:
                bench.log(f"  error: {r['error'][-600:]}")
            else:
                bench.log(
                    f"  ACK {r['push_to_ack_ms']['all']} ms, serving {r['push_to_serving_ms']['first']}/"
                    f"{r['push_to_serving_ms']['sample']} ms, EDS ACK {r['eds_ack_ms']['median']} ms, "
                    f"RSS {r['rss_kib']['before'] // 1024}->{r['rss_kib']['after'] // 1024} MiB, "
                    f"NACKs {len(r['nacks'])}"
                )
    text = report(runs, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"xds-scale-{stamp}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    (args.out / f"xds-scale-{stamp}.md").write_text(text)
    print(text)
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
