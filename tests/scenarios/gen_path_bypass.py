#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes path_bypass.yaml: the path-normalisation bypass suite (run: python3 gen_path_bypass.py)."""
import json
def hcm(port, name, action, rules):
    return f'''    - name: {name}
      address:
        socket_address: {{ address: "{{{{listen_ip}}}}", port_value: {port} }}
      filter_chains:
      - filters:
        - name: envoy.filters.network.http_connection_manager
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
            stat_prefix: {name}
            normalize_path: true
            merge_slashes: true
            path_with_escaped_slashes_action: {action}
            route_config:
              virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                - match: {{ prefix: / }}
                  route: {{ cluster: backend }}
            http_filters:
            - name: envoy.filters.http.rbac
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
                rules:
{rules}
            - name: envoy.filters.http.router
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
'''
DENY='''                  action: DENY
                  policies:
                    ns[default]-policy[deny-admin]-rule[0]:
                      permissions:
                      - or_rules:
                          rules:
                          - url_path: { path: { prefix: /admin } }
                          - url_path: { path: { exact: /secret } }
                      principals: [{ any: true }]'''
ALLOW='''                  action: ALLOW
                  policies:
                    ns[default]-policy[public-only]-rule[0]:
                      permissions:
                      - or_rules:
                          rules:
                          - url_path: { path: { prefix: /public/ } }
                          - url_path: { path: { exact: / } }
                      principals: [{ any: true }]'''
listeners = [hcm(9080,'deny-keep','KEEP_UNCHANGED',DENY), hcm(9081,'allowlist-keep','KEEP_UNCHANGED',ALLOW),
  hcm(9082,'deny-reject','REJECT_REQUEST',DENY), hcm(9083,'deny-redirect','UNESCAPE_AND_REDIRECT',DENY),
  hcm(9084,'deny-forward','UNESCAPE_AND_FORWARD',DENY), hcm(9085,'allowlist-forward','UNESCAPE_AND_FORWARD',ALLOW)]
deny_paths = ['/admin','//admin','///admin/x','/./admin','/public/../admin','/x/./../admin','/%2e%2e/admin','/%2E%2E/admin',
  '/%61dmin','/adm%69n','/%2Fadmin','/%2fadmin','/%5Cadmin','/%5cadmin','/\\\\admin','/public\\\\..\\\\admin',
  '/ADMIN','/Admin','/admin.','/secret','/secret/','/secret.','/secret%2e','/secret%2E','/%c0%afadmin','/%e0%80%afadmin',
  '/%252e%252e/admin','/admin;x','/public/..;/admin','/public/%2e%2e%2fadmin','/admin%00','/%2e/admin','/.%2e/admin',
  '/public/..%2Fadmin','/admin?x=1','/public?/../admin','/a/../../admin']
allow_paths = ['/','/public/x','/public/../admin','/public/%2e%2e/admin','/public/..%2fadmin','/public/%2e%2e%2fadmin',
  '/public//../admin','/public/.%2e/admin','/public%2f../admin','/public/..;/admin','/public\\\\..\\\\admin','/PUBLIC/x',
  '/public/x%5C..%5C..%5Cadmin','/%2Fpublic/x','//public/x','/public/./x','/public/%2E%2E/%2E%2E/admin','/public']
reqs=[]
def name(port,p):
    s=p.replace('\\\\','BS')
    for a,b in [('/','_'),('%','pct'),('.','dot'),('?','q'),('=','eq'),(';','semi')]:
        s=s.replace(a,b)
    return f'p{port}{s}'
def req(port,p):
    return f'''- name: "{name(port,p)}"
  port: {port}
  path: "{p}"
  headers: [[host, svc]]
'''
for p in deny_paths:
    for port in (9080,9082,9083,9084): reqs.append(req(port,p))
for p in allow_paths:
    for port in (9081,9085): reqs.append(req(port,p))
raws = [
 ('abs-form-admin', 9080, "GET http://svc/admin HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('abs-form-dotdot', 9080, "GET http://svc/x/../admin HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('abs-form-allowlist', 9081, "GET http://svc/public/../admin HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('fragment-deny', 9080, "GET /public#/../admin HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('fragment-allowlist', 9081, "GET /public/x#/../../admin HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('raw-backslash', 9080, "GET /\\\\admin HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('raw-utf8', 9081, "GET /public/\\u00e9/../../admin HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('raw-space-encoded', 9080, "GET /%20admin HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('asterisk-form', 9081, "OPTIONS * HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('no-leading-slash', 9080, "GET admin HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('raw-quote', 9080, 'GET /admin\\"x HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n'),
 ('raw-braces-pipe-caret', 9081, "GET /public/{a}|^ HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('raw-angle-brackets', 9081, "GET /public/<a> HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('raw-backtick', 9081, "GET /public/`a HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
 ('raw-del', 9080, "GET /admin\\x7f HTTP/1.1\\r\\nhost: svc\\r\\n\\r\\n"),
]
PINGORA = {'raw-angle-brackets', 'raw-backtick', 'raw-del'}
for n,port,raw in raws:
    extra = '  compare: { status: true, upstream: true, upstream_path: true }\n' if n in PINGORA else ''
    reqs.append(f'''- name: {n}
  port: {port}
  raw: "{raw}"
''' + extra)
WHY = "Pingora's HTTP/1 parser, not pingsail: it percent-escapes controls, space and <>\\\" in the request line before parsing, then refuses some of the results; stricter than Envoy, never a bypass (docs/COMPATIBILITY.md, path normalisation)."
known = [
 ('raw-angle-brackets','status','200','400'), ('raw-angle-brackets','upstream','backend','<local reply>'),
 ('raw-angle-brackets','upstream_path','/public/%3Ca%3E','<local reply>'),
 ('raw-backtick','status','200','400'), ('raw-backtick','upstream','backend','<local reply>'),
 ('raw-backtick','upstream_path','/public/%60a','<local reply>'),
 ('raw-del','status','400','403'),
]
reqs.append('known_differences:\n' + ''.join(
    f'- {{ request: {r}, field: {f}, a: "{a}", b: "{b}", reason: "{WHY}" }}\n' for r,f,a,b in known))
out = '''# SPDX-License-Identifier: Apache-2.0
# Generated by gen_path_bypass.py (edit that, then rerun it). Findings: docs/COMPATIBILITY.md.
description: >
  Path normalisation as the security boundary: RBAC DENY on /admin (prefix) and /secret (exact) and
  an ALLOW-list (/public/ prefix, / exact) behind Istio's HCM settings (normalize_path,
  merge_slashes) with each path_with_escaped_slashes_action. Every request tries a known bypass
  (//, /./, /../, %2F, %2f, %5C, backslashes, case, trailing dots, overlong UTF-8, double
  encoding, ;params, fragments, absolute-form). Both proxies must give the same status and forward
  the same path; whatever gets through on Envoy is listed in docs/COMPATIBILITY.md.
upstreams: [backend]
compare:
  status: true
  upstream: true
  upstream_path: true
  body: true
  response_headers: [location]
bootstrap: |
  admin:
    address:
      socket_address: { address: "{{listen_ip}}", port_value: 15000 }
  static_resources:
    listeners:
''' + ''.join(listeners) + '''    clusters:
    - name: backend
      type: STATIC
      connect_timeout: 10s
      load_assignment:
        cluster_name: backend
        endpoints:
        - lb_endpoints:
          - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {{upstream.backend}} } } }
requests:
''' + ''.join(reqs)
open(__import__('os').path.join(__import__('os').path.dirname(__file__), 'path_bypass.yaml'),'w').write(out)
print(len(reqs))
