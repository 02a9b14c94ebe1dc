// SPDX-License-Identifier: Apache-2.0
//! Differential scenarios: one bootstrap, two proxies (A = Envoy, B = see
//! [`ProxyUnderTest::side_b_from_env`]), the same requests, compared field by field.
//!
//! A scenario file (`tests/scenarios/NAME.yaml`):
//!
//! ```yaml
//! description: what this covers
//! upstreams: [reviews-v1, reviews-v2]   # echo upstreams, one set per side
//! closed_upstreams: [dead]              # ports bound then closed: connection refused
//! bootstrap: |                          # Envoy v3 bootstrap, placeholders:
//!   ...                                 #   {{listen_ip}}      this side's 127.X.Y.Z
//!                                       #   {{upstream.NAME}}  port of NAME on 127.0.0.1
//! compare:                              # CompareSpec, default for every request
//!   status: true
//!   upstream_headers: [host]
//!   upstream_headers_present: [x-request-id]
//! compare_upstream_requests: false      # after all requests: per-upstream request counts
//! compare_upstream_connections: false   # after all requests: per-upstream TCP connections
//! compare_stats: [rbac.]                # after all requests: admin `/stats` counters whose
//!                                       # name contains one of these, names and values
//! requests:
//!   - name: by-prefix
//!     port: 9080
//!     method: GET                       # default GET
//!     path: /reviews/1
//!     headers: [[host, reviews], [x-foo, bar]]   # sent in this order, no implicit host
//!     body: optional text
//!     repeat: 400                       # compare the outcome distribution instead
//!     parallel: 8                       # send this many copies at once (fresh connections);
//!                                       # compared as a distribution, like `repeat`
//!     wait_ms: 100                      # pause before sending (e.g. for an outlier interval)
//!     keepalive: true                   # reuse this side's connection to that port
//!     raw: "GET / HTTP/1.1\r\n\r\n"     # instead of method/path/headers/body
//!     compare: {...}                    # replaces the scenario-level compare
//!     expect:                           # absolute checks, on both sides
//!       status: 503
//!       upstream: reviews-v1            # or `local` for a local reply
//!       body: no healthy upstream
//!       distribution: {reviews-v1: 0.9, reviews-v2: 0.1}
//!       upstream_path: /rewritten?q=1   # raw request target the echo upstream saw
//!       upstream_headers: {x-added: "a, b", x-removed: "<absent>"}
//!       response_headers: {location: "https://reviews/x", x-gone: "<absent>"}
//!       min_ms: 1000                    # timing class: every response took at least this long
//!       max_ms: 200                     # … and at most this long
//! ```
//!
//! In `expect`, header values are all values joined with `", "`; `<absent>` means "not sent",
//! `<present>` means "sent, with any value".

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::client::{Connection, RawReply, Request};
use crate::compare::{
    ABSENT, CompareSpec, Mismatch, Observation, check_expected_distribution, compare,
    compare_distributions, distribution, render_table,
};
use crate::echo::EchoServer;
use crate::net::{closed_port, random_loopback_ip};
use crate::proxy::{ProxyUnderTest, RunningProxy};

/// A scenario file, see the module docs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub upstreams: Vec<String>,
    #[serde(default)]
    pub closed_upstreams: Vec<String>,
    /// Both sides use the same echo upstreams (same addresses), for behaviour that depends on the
    /// endpoint address itself, e.g. consistent hashing. Excludes the per-upstream count checks.
    #[serde(default)]
    pub shared_upstreams: bool,
    pub bootstrap: String,
    #[serde(default)]
    pub compare: CompareSpec,
    #[serde(default)]
    pub compare_upstream_requests: bool,
    #[serde(default)]
    pub compare_upstream_connections: bool,
    /// After all requests: the admin `/stats` lines whose name contains one of these strings
    /// must be the same on both sides (names and values).
    #[serde(default)]
    pub compare_stats: Vec<String>,
    pub requests: Vec<RequestSpec>,
    /// Differences that are understood and documented (docs/COMPATIBILITY.md). Each must be observed
    /// exactly as written — when it disappears the test fails, so the entry gets removed.
    #[serde(default)]
    pub known_differences: Vec<KnownDifference>,
}

/// A documented difference between A and B for one request and field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownDifference {
    pub request: String,
    pub field: String,
    pub a: String,
    pub b: String,
    /// Why, and where it is documented.
    pub reason: String,
}

impl KnownDifference {
    fn matches(&self, m: &Mismatch) -> bool {
        m.request == self.request && m.field == self.field && m.a == self.a && m.b == self.b
    }
}

/// One request (or `repeat` identical requests) of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    pub name: String,
    pub port: u16,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    #[serde(default = "one")]
    pub repeat: u32,
    /// Send this many copies concurrently, each on its own connection.
    #[serde(default)]
    pub parallel: u32,
    /// Pause before this request (both sides pause in parallel).
    #[serde(default)]
    pub wait_ms: u64,
    #[serde(default)]
    pub keepalive: bool,
    pub raw: Option<String>,
    pub compare: Option<CompareSpec>,
    #[serde(default)]
    pub expect: Expect,
}

/// Absolute expectations, checked on both sides (guards against a scenario that passes
/// vacuously because both proxies fail the same way).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Expect {
    pub status: Option<u16>,
    /// Upstream name, or `local` for a local reply.
    pub upstream: Option<String>,
    pub body: Option<String>,
    /// Expected share of each outcome for `repeat` requests (keys as in the distribution:
    /// upstream name, `local:<status>`, `error:<class>`).
    pub distribution: Option<BTreeMap<String, f64>>,
    /// The raw request target the echo upstream received.
    pub upstream_path: Option<String>,
    /// Request headers at the upstream: all values joined with `", "`, or `<absent>`.
    pub upstream_headers: BTreeMap<String, String>,
    /// Response headers at the client: all values joined with `", "`, or `<absent>`.
    pub response_headers: BTreeMap<String, String>,
    /// Timing class: each response took at least this many milliseconds.
    pub min_ms: Option<u64>,
    /// Timing class: each response took at most this many milliseconds.
    pub max_ms: Option<u64>,
}

fn default_method() -> String {
    "GET".to_owned()
}

fn one() -> u32 {
    1
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Runs the scenario against `a` and `b` and returns every mismatch (empty = equal).
    pub async fn run(
        &self,
        scenario_name: &str,
        a: ProxyUnderTest,
        b: ProxyUnderTest,
    ) -> Result<Vec<Mismatch>> {
        let (mut side_a, mut side_b) = {
            let shared = if self.shared_upstreams {
                if self.compare_upstream_requests || self.compare_upstream_connections {
                    bail!(
                        "shared_upstreams cannot be combined with per-upstream count comparisons"
                    );
                }
                let mut m = BTreeMap::new();
                for name in &self.upstreams {
                    m.insert(
                        name.clone(),
                        std::sync::Arc::new(EchoServer::start(name).await?),
                    );
                }
                Some(m)
            } else {
                None
            };
            tokio::try_join!(
                Side::start("A", a, self, shared.as_ref()),
                Side::start("B", b, self, shared.as_ref())
            )?
        };
        let verbose = std::env::var_os("PINGSAIL_DIFF_VERBOSE").is_some();
        let mut mismatches = Vec::new();
        let mut push = |request: &str, field: String, a: String, b: String| {
            mismatches.push(Mismatch {
                scenario: scenario_name.to_owned(),
                request: request.to_owned(),
                field,
                a,
                b,
            });
        };
        for req in &self.requests {
            let (obs_a, obs_b) = tokio::join!(side_a.observe_n(req), side_b.observe_n(req));
            let spec = req.compare.as_ref().unwrap_or(&self.compare);
            if verbose {
                eprintln!(
                    "[{scenario_name}] {}:\n  A: {}\n  B: {}",
                    req.name,
                    summary(&obs_a),
                    summary(&obs_b)
                );
            }
            if req.repeat > 1 || req.parallel > 1 {
                let (da, db) = (distribution(&obs_a), distribution(&obs_b));
                for d in compare_distributions(&da, &db, spec.distribution_tolerance) {
                    push(&req.name, d.field, d.a, d.b);
                }
                if let Some(want) = &req.expect.distribution {
                    let ea = check_expected_distribution(&da, want, spec.distribution_tolerance);
                    let eb = check_expected_distribution(&db, want, spec.distribution_tolerance);
                    for (key, expected) in expectation_keys(&ea, &eb) {
                        let find = |v: &[(String, String, String)]| {
                            v.iter()
                                .find(|(k, _, _)| *k == key)
                                .map_or_else(|| "ok".to_owned(), |(_, got, _)| got.clone())
                        };
                        push(
                            &req.name,
                            format!("expect.distribution[{key}] = {expected}"),
                            find(&ea),
                            find(&eb),
                        );
                    }
                }
            } else if let (Some(oa), Some(ob)) = (obs_a.first(), obs_b.first()) {
                for d in compare(spec, oa, ob) {
                    push(&req.name, d.field, d.a, d.b);
                }
            }
            for (field, expected, got) in check_expect(&req.expect, &obs_a, &obs_b) {
                push(
                    &req.name,
                    format!("expect.{field} = {expected}"),
                    got.0,
                    got.1,
                );
            }
        }
        for name in &self.upstreams {
            let (ua, ub) = (side_a.upstream(name)?, side_b.upstream(name)?);
            if self.compare_upstream_requests && ua.requests() != ub.requests() {
                push(
                    "<after all>",
                    format!("upstream {name} requests"),
                    ua.requests().to_string(),
                    ub.requests().to_string(),
                );
            }
            if self.compare_upstream_connections && ua.connections() != ub.connections() {
                push(
                    "<after all>",
                    format!("upstream {name} connections"),
                    ua.connections().to_string(),
                    ub.connections().to_string(),
                );
            }
        }
        if !self.compare_stats.is_empty() {
            let (sa, sb) = tokio::join!(
                side_a.stats(&self.compare_stats),
                side_b.stats(&self.compare_stats)
            );
            let (sa, sb) = (sa?, sb?);
            if verbose {
                eprintln!("[{scenario_name}] stats:\n  A: {sa:?}\n  B: {sb:?}");
            }
            for name in sa
                .keys()
                .chain(sb.keys())
                .collect::<std::collections::BTreeSet<_>>()
            {
                let (va, vb) = (sa.get(name), sb.get(name));
                if va != vb {
                    let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| ABSENT.to_owned());
                    push("<after all>", format!("stat {name}"), show(va), show(vb));
                }
            }
        }
        if !mismatches.is_empty() {
            let table = render_table(&mismatches, &a.to_string(), &b.to_string());
            eprintln!("{table}");
            eprintln!("{}", side_a.diagnostics());
            eprintln!("{}", side_b.diagnostics());
        }
        Ok(mismatches)
    }
}

/// One line per request for `PINGSAIL_DIFF_VERBOSE`.
fn summary(obs: &[Observation]) -> String {
    match obs {
        [one] => format!(
            "{} {:?} headers={:?} echo={:?}",
            one.outcome_key(),
            one.body
                .chars()
                .take(
                    if std::env::var("PINGSAIL_DIFF_VERBOSE").as_deref() == Ok("full") {
                        usize::MAX
                    } else {
                        200
                    }
                )
                .collect::<String>(),
            one.response_headers,
            one.echo
                .as_ref()
                .map(|e| (&e.method, &e.path, &e.headers, &e.body))
        ),
        many => format!("{:?}", distribution(many)),
    }
}

fn expectation_keys(
    ea: &[(String, String, String)],
    eb: &[(String, String, String)],
) -> BTreeMap<String, String> {
    ea.iter()
        .chain(eb)
        .map(|(k, _, want)| (k.clone(), want.clone()))
        .collect()
}

type Pair = (String, String);

/// Single-request expectations (for `repeat` requests, `status`/`upstream`/`body` must hold
/// for every response). Returns `(field, expected, (A, B))` when either side fails.
fn check_expect(
    expect: &Expect,
    a: &[Observation],
    b: &[Observation],
) -> Vec<(String, String, Pair)> {
    let mut out = Vec::new();
    // The first observation that violates `f`, shown; "ok" when all satisfy it.
    fn first_bad(
        obs: &[Observation],
        ok: impl Fn(&Observation) -> bool,
        show: impl Fn(&Observation) -> String,
    ) -> Option<String> {
        obs.iter().find(|o| !ok(o)).map(show)
    }
    let mut check = |field: String,
                     expected: String,
                     ok: &dyn Fn(&Observation) -> bool,
                     show: &dyn Fn(&Observation) -> String| {
        let (ba, bb) = (first_bad(a, ok, show), first_bad(b, ok, show));
        if ba.is_some() || bb.is_some() {
            let ok_text = || "ok".to_owned();
            out.push((
                field,
                expected,
                (ba.unwrap_or_else(ok_text), bb.unwrap_or_else(ok_text)),
            ));
        }
    };
    if let Some(min) = expect.min_ms {
        check(
            "min_ms".to_owned(),
            min.to_string(),
            &|o| o.elapsed_ms >= min,
            &|o| format!("{} ms", o.elapsed_ms),
        );
    }
    if let Some(max) = expect.max_ms {
        check(
            "max_ms".to_owned(),
            max.to_string(),
            &|o| o.elapsed_ms <= max,
            &|o| format!("{} ms", o.elapsed_ms),
        );
    }
    if let Some(status) = expect.status {
        check(
            "status".to_owned(),
            status.to_string(),
            &|o| o.status == Some(status),
            &|o| o.status.map_or_else(|| o.outcome_key(), |s| s.to_string()),
        );
    }
    if let Some(up) = &expect.upstream {
        let want = (up != "local").then(|| up.clone());
        check(
            "upstream".to_owned(),
            up.clone(),
            &|o| o.error.is_none() && o.upstream == want,
            &|o| o.upstream.clone().unwrap_or_else(|| o.outcome_key()),
        );
    }
    if let Some(body) = &expect.body {
        check(
            "body".to_owned(),
            body.clone(),
            &|o| o.error.is_none() && &o.body == body,
            &|o| o.body.clone(),
        );
    }
    if let Some(path) = &expect.upstream_path {
        let got = |o: &Observation| {
            o.echo
                .as_ref()
                .map_or_else(|| o.outcome_key(), |e| e.path.clone())
        };
        check(
            "upstream_path".to_owned(),
            path.clone(),
            &|o| got(o) == *path,
            &got,
        );
    }
    for (name, want) in &expect.upstream_headers {
        let got = |o: &Observation| {
            o.echo.as_ref().map_or_else(
                || o.outcome_key(),
                |e| e.header(name).unwrap_or_else(|| ABSENT.to_owned()),
            )
        };
        check(
            format!("upstream_headers[{name}]"),
            want.clone(),
            &|o| o.echo.is_some() && header_ok(&got(o), want),
            &got,
        );
    }
    for (name, want) in &expect.response_headers {
        let got = |o: &Observation| {
            if o.error.is_some() {
                return o.outcome_key();
            }
            let values: Vec<&str> = o
                .response_headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
                .collect();
            if values.is_empty() {
                ABSENT.to_owned()
            } else {
                values.join(", ")
            }
        };
        check(
            format!("response_headers[{name}]"),
            want.clone(),
            &|o| o.error.is_none() && header_ok(&got(o), want),
            &got,
        );
    }
    out
}

/// `<present>` accepts any value; anything else (including `<absent>`) must be equal.
fn header_ok(got: &str, want: &str) -> bool {
    if want == "<present>" {
        got != ABSENT
    } else {
        got == want
    }
}

/// One proxy with its own loopback IP and its own echo upstreams.
struct Side {
    label: &'static str,
    kind: ProxyUnderTest,
    ip: Ipv4Addr,
    upstreams: BTreeMap<String, std::sync::Arc<EchoServer>>,
    proxy: Box<dyn RunningProxy>,
    admin: Option<SocketAddr>,
    conns: HashMap<u16, Connection>,
}

impl Side {
    async fn start(
        label: &'static str,
        kind: ProxyUnderTest,
        sc: &Scenario,
        shared: Option<&BTreeMap<String, std::sync::Arc<EchoServer>>>,
    ) -> Result<Self> {
        let ip = random_loopback_ip();
        let mut upstreams = BTreeMap::new();
        let mut ports = BTreeMap::new();
        for name in &sc.upstreams {
            let echo = match shared.and_then(|m| m.get(name)) {
                Some(e) => e.clone(),
                None => std::sync::Arc::new(EchoServer::start(name).await?),
            };
            ports.insert(name.clone(), echo.port());
            upstreams.insert(name.clone(), echo);
        }
        for name in &sc.closed_upstreams {
            ports.insert(name.clone(), closed_port()?);
        }
        let yaml = render(&sc.bootstrap, ip, &ports)?;
        let admin = crate::envoy::admin_address(&yaml).ok();
        let proxy = kind
            .start(&yaml, ip)
            .await
            .with_context(|| format!("starting side {label} ({kind}) on {ip}"))?;
        Ok(Self {
            label,
            kind,
            ip,
            upstreams,
            proxy,
            admin,
            conns: HashMap::new(),
        })
    }

    /// Admin `/stats` lines (`name: value`) whose name contains one of `filters`.
    async fn stats(&self, filters: &[String]) -> Result<BTreeMap<String, String>> {
        let admin = self.admin.with_context(|| {
            format!("side {}: compare_stats needs an admin address", self.label)
        })?;
        let get = |path: &'static str| async move {
            let req = Request::get(path)
                .header("host", "admin")
                .header("connection", "close");
            let resp = crate::client::send(admin, &req).await?;
            anyhow::Ok(String::from_utf8_lossy(&resp.body).into_owned())
        };
        let out: BTreeMap<String, String> = get("/stats")
            .await?
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(n, _)| filters.iter().any(|f| n.contains(f.as_str())))
            .map(|(n, v)| (n.to_owned(), v.trim().to_owned()))
            .collect();
        Ok(out)
    }

    fn upstream(&self, name: &str) -> Result<&EchoServer> {
        self.upstreams
            .get(name)
            .map(|e| &**e)
            .with_context(|| format!("no upstream {name}"))
    }

    fn diagnostics(&self) -> String {
        let text = self.proxy.diagnostics();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!(
            "--- side {} ({}, {}) diagnostics (last 40 lines) ---\n{tail}",
            self.label, self.kind, self.ip
        )
    }

    async fn observe_n(&mut self, req: &RequestSpec) -> Vec<Observation> {
        if req.wait_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(req.wait_ms)).await;
        }
        if req.parallel > 1 {
            let addr = SocketAddr::from((self.ip, req.port));
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..req.parallel {
                let req = req.clone();
                set.spawn(async move {
                    let start = std::time::Instant::now();
                    let mut o = match Self::observe_fresh(addr, &req).await {
                        Ok(o) => o,
                        Err(e) => Observation::from_error(&error_class(&e)),
                    };
                    o.elapsed_ms = start.elapsed().as_millis() as u64;
                    o
                });
            }
            let mut out = Vec::new();
            while let Some(r) = set.join_next().await {
                out.push(r.unwrap_or_else(|_| Observation::from_error("panicked")));
            }
            return out;
        }
        let mut out = Vec::with_capacity(req.repeat as usize);
        for _ in 0..req.repeat {
            let start = std::time::Instant::now();
            let mut obs = match self.observe(req).await {
                Ok(o) => o,
                Err(e) => Observation::from_error(&error_class(&e)),
            };
            obs.elapsed_ms = start.elapsed().as_millis() as u64;
            out.push(obs);
        }
        out
    }

    async fn observe_fresh(addr: SocketAddr, req: &RequestSpec) -> Result<Observation> {
        let mut conn = Connection::connect(addr).await?;
        let request = Request {
            method: req.method.clone(),
            target: req.path.clone(),
            headers: req.headers.clone(),
            body: req.body.clone().map(String::into_bytes),
        };
        Ok(Observation::from_response(&conn.send(&request).await?))
    }

    async fn observe(&mut self, req: &RequestSpec) -> Result<Observation> {
        let addr = SocketAddr::from((self.ip, req.port));
        let mut fresh;
        let conn = if req.keepalive {
            let reusable = self
                .conns
                .get(&req.port)
                .is_some_and(Connection::is_reusable);
            if !reusable {
                self.conns
                    .insert(req.port, Connection::connect(addr).await?);
            }
            self.conns
                .get_mut(&req.port)
                .context("keep-alive connection vanished")?
        } else {
            fresh = Connection::connect(addr).await?;
            &mut fresh
        };
        if let Some(raw) = &req.raw {
            return Ok(match conn.send_raw(raw.as_bytes()).await? {
                RawReply::Response(r) => Observation::from_response(&r),
                RawReply::Closed { .. } => Observation::from_error("closed"),
                RawReply::Unparseable { .. } => Observation::from_error("unparseable"),
            });
        }
        let request = Request {
            method: req.method.clone(),
            target: req.path.clone(),
            headers: req.headers.clone(),
            body: req.body.clone().map(String::into_bytes),
        };
        Ok(Observation::from_response(&conn.send(&request).await?))
    }
}

/// A transport error reduced to a class that does not mention addresses.
fn error_class(e: &anyhow::Error) -> String {
    let msg = format!("{e:#}");
    if msg.contains("timed out") {
        "timeout"
    } else if msg.contains("connecting to") {
        "connect"
    } else if msg.contains("connection closed") || msg.contains("reset") {
        "closed"
    } else {
        return format!("other: {msg}");
    }
    .to_owned()
}

/// Expands `{{listen_ip}}` and `{{upstream.NAME}}`; any other placeholder is an error.
pub fn render(
    template: &str,
    listen_ip: Ipv4Addr,
    ports: &BTreeMap<String, u16>,
) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            bail!("unclosed `{{{{` in bootstrap");
        };
        let key = after[..end].trim();
        if key == "listen_ip" {
            out.push_str(&listen_ip.to_string());
        } else if let Some(name) = key.strip_prefix("upstream.") {
            let port = ports.get(name).with_context(|| {
                format!("`{{{{{key}}}}}`: {name} is not in upstreams/closed_upstreams")
            })?;
            out.push_str(&port.to_string());
        } else {
            bail!("unknown placeholder `{{{{{key}}}}}`");
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `tests/scenarios/{name}.yaml`.
pub fn scenario_path(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.yaml"))
}

/// Runs `tests/scenarios/{name}.yaml` with A = Envoy and B from `PINGSAIL_DIFF_B`; fails with
/// the mismatch table if anything differs.
pub async fn run_named(name: &str) -> Result<()> {
    run_scenario(name, Scenario::load(&scenario_path(name))?).await
}

/// Runs an already loaded scenario (e.g. one whose file is a template filled in by the test)
/// with A = Envoy and B from `PINGSAIL_DIFF_B`; fails with the mismatch table if anything differs.
pub async fn run_scenario(name: &str, scenario: Scenario) -> Result<()> {
    let (a, b) = (ProxyUnderTest::Envoy, ProxyUnderTest::side_b_from_env()?);
    let mut mismatches = scenario.run(name, a, b).await?;
    if b == ProxyUnderTest::Pingsail {
        let mut stale = Vec::new();
        for known in &scenario.known_differences {
            match mismatches.iter().position(|m| known.matches(m)) {
                Some(i) => {
                    mismatches.remove(i);
                }
                None => stale.push(format!(
                    "{} / {}: {} vs {}",
                    known.request, known.field, known.a, known.b
                )),
            }
        }
        if !stale.is_empty() {
            bail!(
                "scenario {name}: known differences no longer observed (remove them):\n{}",
                stale.join("\n")
            );
        }
    }
    if !mismatches.is_empty() {
        bail!(
            "scenario {name}: {} mismatch(es) between A ({a}) and B ({b}):\n{}",
            mismatches.len(),
            render_table(&mismatches, &a.to_string(), &b.to_string())
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn render_expands_placeholders_and_rejects_unknown_ones() {
        let ports = BTreeMap::from([("v1".to_owned(), 4321)]);
        let ip = Ipv4Addr::new(127, 1, 2, 3);
        assert_eq!(
            render("a: {{listen_ip}}:{{ upstream.v1 }}", ip, &ports).unwrap(),
            "a: 127.1.2.3:4321"
        );
        assert!(render("{{upstream.v2}}", ip, &ports).is_err());
        assert!(render("{{nope}}", ip, &ports).is_err());
        assert!(render("{{listen_ip", ip, &ports).is_err());
    }

    #[test]
    fn every_scenario_file_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let sc = Scenario::load(&path).unwrap();
                assert!(!sc.requests.is_empty(), "{}", path.display());
                n += 1;
            }
        }
        assert!(n >= 3);
    }
}
