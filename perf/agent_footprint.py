#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Agent footprint (issue 9, item 9): `pingsail-agent proxy sidecar` as an injected pod runs it.

Per round: a fake istiod (tests/perf-bin/fake_istiod.rs: istiod's CA + ADS behind TLS + an echo
upstream) → `target/release/pingsail-agent proxy sidecar` with pilot-agent's environment (CA client,
SDS server, xDS proxy to istiod over TLS, status server, drain coordinator, supervisor; DNS proxy
with `--dns`) → `target/release/pingsail-proxy` as its child. Once the agent's /healthz/ready says
ready, it samples for --idle seconds (agent and proxy RSS, agent CPU), then drives --rate req/s of
HTTP/1.1 keep-alive through the proxy's outbound listener for --duration seconds (perf/loadgen) and
samples again (agent CPU during load, RSS after). pilot-agent itself is not run here (no Go
toolchain or istio image on the machine); the issue's goals are absolute: agent < 5 MB idle,
agent + proxy < 15 MB.

Usage: python3 perf/agent_footprint.py [--rounds 3] [--idle 10] [--duration 15] [--rate 1000] [--dns]
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child_of(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return int(f.read().split()[0])


def wait_ready(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the agent never became ready")


def one_round(args, base: Path) -> dict:
    listener = free_port()
    istiod = subprocess.Popen([str(args.fake_istiod), str(base), str(listener)],
                              stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(istiod.stdout.readline())
        for d, f, content in [("var/run/secrets/istio", "root-cert.pem", (base / "root-cert.pem").read_text()),
                              ("var/run/secrets/tokens", "istio-token", "projected-token")]:
            (base / d).mkdir(parents=True, exist_ok=True)
            (base / d / f).write_text(content)
        admin, status = free_port(), free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "POD_NAME": "bench-x2", "POD_NAMESPACE": "default", "INSTANCE_IP": "127.0.0.1",
            "SERVICE_ACCOUNT": "bench", "ISTIO_CPU_LIMIT": "1", "CA_ADDR": info["ca_addr"],
            "PROXY_CONFIG": json.dumps({"proxyAdminPort": admin, "statusPort": status,
                                        "discoveryAddress": info["istiod_addr"]}),
            "ENVOY_STATUS_PORT": str(free_port()), "ENVOY_PROMETHEUS_PORT": str(free_port()),
        }
        if args.dns:
            env["ISTIO_META_DNS_CAPTURE"] = "true"
            env["DNS_PROXY_ADDR"] = f"127.0.0.1:{free_port()}"
        agent = subprocess.Popen([str(args.agent), "proxy", "sidecar", "--domain", "default.svc.cluster.local",
                                  f"--proxy-binary={args.proxy}"], env=env, cwd=base,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(status)
            proxy = child_of(agent.pid)
            time.sleep(1.0)  # let the first pushes settle before the idle window
            a0, t0 = proc_cpu(agent.pid), time.monotonic()
            time.sleep(args.idle)
            a1, t1 = proc_cpu(agent.pid), time.monotonic()
            res = {
                "agent_idle_rss_mib": round(rss_mib(agent.pid), 2),
                "proxy_idle_rss_mib": round(rss_mib(proxy), 2),
                "agent_idle_cpu_pct": round((a1 - a0) / (t1 - t0) * 100, 3),
            }
            p0, a0, t0 = proc_cpu(proxy), proc_cpu(agent.pid), time.monotonic()
            out = subprocess.run([str(args.loadgen), f"127.0.0.1:{listener}", "--rate", str(args.rate),
                                  "--conns", "16", "--duration", str(args.duration)],
                                 capture_output=True, text=True, check=True).stdout
            p1, a1, t1 = proc_cpu(proxy), proc_cpu(agent.pid), time.monotonic()
            load = json.loads(out.strip().splitlines()[-1])
            res.update({
                "load_requests": load["requests"],
                "load_errors": load.get("errors", 0) + load.get("non2xx", 0),
                "agent_load_cpu_pct": round((a1 - a0) / (t1 - t0) * 100, 3),
                "proxy_cpu_us_per_req": round((p1 - p0) / max(1, load["requests"]) * 1e6, 1),
                "agent_rss_after_load_mib": round(rss_mib(agent.pid), 2),
                "proxy_rss_after_load_mib": round(rss_mib(proxy), 2),
            })
            res["agent_plus_proxy_idle_mib"] = round(res["agent_idle_rss_mib"] + res["proxy_idle_rss_mib"], 2)
            return res
        finally:
            agent.terminate()
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
    finally:
        istiod.kill()
        istiod.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--dns", action="store_true", help="also run the DNS proxy (ISTIO_META_DNS_CAPTURE)")
    ap.add_argument("--agent", type=Path, default=ROOT / "target/release/pingsail-agent")
    ap.add_argument("--proxy", type=Path, default=ROOT / "target/release/pingsail-proxy")
    ap.add_argument("--fake-istiod", type=Path, default=ROOT / "target/debug/fake-istiod")
    ap.add_argument("--loadgen", type=Path, default=ROOT / "target/loadgen/release/pingsail-loadgen")
    args = ap.parse_args()
    rows = []
    for i in range(args.rounds):
        base = Path(tempfile.mkdtemp(prefix="pingsail-footprint-"))
        try:
            r = one_round(args, base)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        rows.append(r)
        print(json.dumps({"round": i + 1, **r}), flush=True)
    keys = list(rows[0].keys())
    print("\n| metric | median | min | max |\n| --- | ---: | ---: | ---: |")
    for k in keys:
        vals = [r[k] for r in rows]
        print(f"| {k} | {statistics.median(vals)} | {min(vals)} | {max(vals)} |")


if __name__ == "__main__":
    main()
