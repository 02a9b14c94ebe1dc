// SPDX-License-Identifier: Apache-2.0
//! Rule lists for IPv4 and IPv6 and what is built from them: the `iptables-restore` input, the
//! `-C` checks, the undo (`-D`, `-F`, `-X`) commands and the temporary guardrails.

use std::collections::{BTreeMap, HashSet};

/// iptables' built-in chains and targets: never created (`-N`) nor deleted.
const BUILT_INS: &[&str] = &[
    "INPUT",
    "OUTPUT",
    "FORWARD",
    "PREROUTING",
    "POSTROUTING",
    "ACCEPT",
    "RETURN",
    "DROP",
];

fn built_in(chain: &str) -> bool {
    BUILT_INS.contains(&chain)
}

/// Stands for the family's address in a rule added to both families ([`RuleBuilder::append_versioned`]).
pub const IP_VERSION_SPECIFIC: &str = "PLACEHOLDER_IP_VERSION_SPECIFIC";

/// One rule: its chain and table, and its full parameters (`-A CHAIN ...` or `-I CHAIN N ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub table: String,
    pub params: Vec<String>,
}

/// A rule's parameters, written as on the iptables command line (every token is free of
/// whitespace: ports, addresses, interface and group names are validated before).
fn words(rule: &str) -> Vec<String> {
    rule.split_whitespace().map(str::to_string).collect()
}

/// A command line for the `iptables` binary (without the binary).
pub type Cmd = Vec<String>;

#[derive(Debug, Default)]
pub struct RuleBuilder {
    v4: Vec<Rule>,
    v6: Vec<Rule>,
    ipv6: bool,
}

impl RuleBuilder {
    pub fn new(ipv6: bool) -> Self {
        RuleBuilder {
            ipv6,
            ..Self::default()
        }
    }

    fn append_to(list: &mut Vec<Rule>, chain: &str, table: &str, params: Vec<String>) {
        let mut p = vec!["-A".to_string(), chain.to_string()];
        p.extend(params);
        list.push(Rule {
            chain: chain.into(),
            table: table.into(),
            params: p,
        });
    }

    fn insert_to(list: &mut Vec<Rule>, chain: &str, table: &str, pos: u32, params: Vec<String>) {
        let mut p = vec!["-I".to_string(), chain.to_string(), pos.to_string()];
        p.extend(params);
        list.push(Rule {
            chain: chain.into(),
            table: table.into(),
            params: p,
        });
    }

    pub fn append_v4(&mut self, chain: &str, table: &str, rule: &str) {
        Self::append_to(&mut self.v4, chain, table, words(rule));
    }

    pub fn append_v6(&mut self, chain: &str, table: &str, rule: &str) {
        if self.ipv6 {
            Self::append_to(&mut self.v6, chain, table, words(rule));
        }
    }

    /// Appends `rule` (e.g. `"-p tcp --dport 15008 -j RETURN"`) to `chain` in `table`, both families.
    pub fn append(&mut self, chain: &str, table: &str, rule: &str) {
        self.append_v4(chain, table, rule);
        self.append_v6(chain, table, rule);
    }

    pub fn insert_v4(&mut self, chain: &str, table: &str, pos: u32, rule: &str) {
        Self::insert_to(&mut self.v4, chain, table, pos, words(rule));
    }

    pub fn insert_v6(&mut self, chain: &str, table: &str, pos: u32, rule: &str) {
        if self.ipv6 {
            Self::insert_to(&mut self.v6, chain, table, pos, words(rule));
        }
    }

    pub fn insert(&mut self, chain: &str, table: &str, pos: u32, rule: &str) {
        self.insert_v4(chain, table, pos, rule);
        self.insert_v6(chain, table, pos, rule);
    }

    /// Appends to both families, the word [`IP_VERSION_SPECIFIC`] replaced by `v4` / `v6`.
    pub fn append_versioned(&mut self, v4: &str, v6: &str, chain: &str, table: &str, rule: &str) {
        let sub = |with: &str| -> Vec<String> {
            words(rule)
                .into_iter()
                .map(|w| {
                    if w == IP_VERSION_SPECIFIC {
                        with.to_string()
                    } else {
                        w
                    }
                })
                .collect()
        };
        let (p4, p6) = (sub(v4), sub(v6));
        Self::append_to(&mut self.v4, chain, table, p4);
        if self.ipv6 {
            Self::append_to(&mut self.v6, chain, table, p6);
        }
    }

    pub fn rules(&self, v6: bool) -> &[Rule] {
        if v6 { &self.v6 } else { &self.v4 }
    }

    /// The `iptables-restore --noflush` input for one family: tables in name order, each with the
    /// `-N` of every chain it uses or jumps to (first use first), then its rules, then `COMMIT`.
    pub fn restore(&self, v6: bool) -> String {
        let rules = self.rules(v6);
        let mut tables: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        for r in rules {
            if seen.insert((r.chain.clone(), r.table.clone())) && !built_in(&r.chain) {
                tables
                    .entry(&r.table)
                    .or_default()
                    .push(format!("-N {}", r.chain));
            }
        }
        for r in rules {
            let n = r.params.len();
            if n >= 2 && r.params[n - 2] == "-j" {
                let target = &r.params[n - 1];
                if seen.insert((target.clone(), r.table.clone())) && !built_in(target) {
                    tables
                        .entry(&r.table)
                        .or_default()
                        .push(format!("-N {target}"));
                }
            }
        }
        for r in rules {
            tables.entry(&r.table).or_default().push(r.params.join(" "));
        }
        let mut out = String::new();
        for (table, lines) in tables {
            if lines.is_empty() {
                continue;
            }
            out.push_str("* ");
            out.push_str(table);
            out.push('\n');
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// `-C` commands checking each rule is present.
    pub fn checks(&self, v6: bool) -> Vec<Cmd> {
        self.rules(v6)
            .iter()
            .map(|r| with_table(&r.table, &rewrite_op(&r.params, "-C")))
            .collect()
    }

    /// Undo commands, newest rule first: `-D` for every rule outside our chains and every jump into
    /// one of them, then `-F` and `-X` for each of our chains.
    pub fn cleanup(&self, v6: bool) -> Vec<Cmd> {
        let reversed: Vec<&Rule> = self.rules(v6).iter().rev().collect();
        let mut out: Vec<Cmd> = undo(reversed.iter().copied());
        let mut seen = HashSet::new();
        for r in reversed {
            if seen.insert((r.chain.clone(), r.table.clone())) && !built_in(&r.chain) {
                out.push(with_table(&r.table, &["-F".into(), r.chain.clone()]));
                out.push(with_table(&r.table, &["-X".into(), r.chain.clone()]));
            }
        }
        out
    }

    fn guardrail_rules() -> Vec<Rule> {
        let mut rules = Vec::new();
        for chain in ["INPUT", "FORWARD", "OUTPUT"] {
            for proto in ["tcp", "udp"] {
                Self::insert_to(
                    &mut rules,
                    chain,
                    "filter",
                    1,
                    words(&format!("-p {proto} -j DROP")),
                );
            }
        }
        rules
    }

    /// Rules dropping all TCP/UDP while we reconcile.
    pub fn guardrails() -> Vec<Cmd> {
        Self::guardrail_rules()
            .iter()
            .map(|r| with_table(&r.table, &r.params))
            .collect()
    }

    pub fn guardrails_cleanup() -> Vec<Cmd> {
        undo(Self::guardrail_rules().iter())
    }
}

fn with_table(table: &str, params: &[String]) -> Cmd {
    let mut c = vec!["-t".to_string(), table.to_string()];
    c.extend(params.iter().cloned());
    c
}

/// `-A`/`-I` (with its position) turned into `op`.
fn rewrite_op(params: &[String], op: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(params.len());
    let mut skip_at = None;
    for (i, p) in params.iter().enumerate() {
        if Some(i) == skip_at {
            continue;
        }
        match p.as_str() {
            "-A" | "--append" => out.push(op.to_string()),
            "-I" | "--insert" => {
                skip_at = Some(i + 2);
                out.push(op.to_string());
            }
            _ => out.push(p.clone()),
        }
    }
    out
}

/// `-D` commands for the rules that flushing our chains does not remove: those in other chains,
/// and jumps to our chains.
fn undo<'a>(rules: impl Iterator<Item = &'a Rule>) -> Vec<Cmd> {
    rules
        .filter(|r| {
            let in_ours = r.params.get(1).is_some_and(|c| c.starts_with("ISTIO_"));
            let jumps_to_ours = r
                .params
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "--jump") && w[1].starts_with("ISTIO_"));
            !in_ours || jumps_to_ours
        })
        .map(|r| with_table(&r.table, &rewrite_op(&r.params, "-D")))
        .collect()
}

/// Tables -> chains -> rules as read from `iptables-save` output (or restore input): only our
/// (`ISTIO_*`) chains are listed unless a rule is found in another chain.
pub type State = BTreeMap<String, BTreeMap<String, Vec<String>>>;

pub fn state_from_save(data: &str) -> State {
    let mut st: State = BTreeMap::new();
    for t in ["filter", "nat", "mangle", "raw"] {
        st.insert(t.into(), BTreeMap::new());
    }
    let mut table = String::new();
    for line in data.lines() {
        if line.trim().is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
            continue;
        }
        let Some(chains) = st.get_mut(&table) else {
            continue;
        };
        if let Some(rest) = line.strip_prefix(':') {
            if rest.starts_with("ISTIO") {
                let chain = rest.split(' ').next().unwrap_or(rest).to_string();
                chains.entry(chain).or_default();
            }
            continue;
        }
        let words: Vec<&str> = line.split(' ').collect();
        let (mut chain, mut add) = (None, false);
        for (i, w) in words.iter().enumerate() {
            let next = words.get(i + 1).map(|n| n.trim_matches(['\'', '"']));
            match (*w, next) {
                ("--append" | "-A" | "--insert" | "-I", Some(n)) => {
                    add = true;
                    chain = Some(n.to_string());
                }
                ("--new" | "-N", Some(n)) if n.starts_with("ISTIO") => chain = Some(n.to_string()),
                _ => {}
            }
        }
        if let Some(c) = chain {
            let rules = chains.entry(c).or_default();
            if add {
                rules.push(line.to_string());
            }
        }
    }
    st
}

pub fn state_is_empty(st: &State) -> bool {
    st.values().all(|c| c.is_empty())
}

/// Commands removing every trace of istio/pingsail capture found in `st`: jumps to `ISTIO_*`
/// chains, then the chains themselves.
pub fn cleanup_from_state(st: &State) -> Vec<Cmd> {
    let mut out = Vec::new();
    for (table, chains) in st {
        for rules in chains.values() {
            for rule in rules {
                let words: Vec<String> = rule.split_whitespace().map(str::to_string).collect();
                let jumps = words.windows(2).any(|w| {
                    (w[0] == "-j" || w[0] == "--jump")
                        && w[1].trim_matches(['\'', '"']).starts_with("ISTIO_")
                });
                let in_ours = words.get(1).is_some_and(|c| c.starts_with("ISTIO_"));
                if jumps && !in_ours {
                    out.push(with_table(table, &rewrite_op(&words, "-D")));
                }
            }
        }
    }
    // Flush all before deleting any: our chains jump to each other.
    for op in ["-F", "-X"] {
        for (table, chains) in st {
            for chain in chains.keys().filter(|c| c.starts_with("ISTIO_")) {
                out.push(with_table(table, &[op.into(), chain.clone()]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn sample() -> RuleBuilder {
        let mut b = RuleBuilder::new(true);
        b.append("ISTIO_INBOUND", "nat", "-p tcp --dport 15008 -j RETURN");
        b.append("OUTPUT", "nat", "-j ISTIO_OUTPUT");
        b.insert("PREROUTING", "nat", 1, "-i eth1 -j RETURN");
        let rule = format!("-o lo -s {IP_VERSION_SPECIFIC} -j RETURN");
        b.append_versioned("127.0.0.6/32", "::6/128", "ISTIO_OUTPUT", "nat", &rule);
        b
    }

    #[test]
    fn restore_declares_used_and_jumped_to_chains() {
        let b = sample();
        assert_eq!(
            b.restore(false),
            "* nat\n-N ISTIO_INBOUND\n-N ISTIO_OUTPUT\n-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN\n\
             -A OUTPUT -j ISTIO_OUTPUT\n-I PREROUTING 1 -i eth1 -j RETURN\n-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN\nCOMMIT\n"
        );
        assert!(b.restore(true).contains("-s ::6/128"));
        assert_eq!(RuleBuilder::new(false).restore(false), "");
    }

    #[test]
    fn cleanup_undoes_jumps_and_foreign_rules_then_drops_chains() {
        let b = sample();
        let got: Vec<String> = b.cleanup(false).iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            got,
            vec![
                "-t nat -D PREROUTING -i eth1 -j RETURN",
                "-t nat -D OUTPUT -j ISTIO_OUTPUT",
                "-t nat -F ISTIO_OUTPUT",
                "-t nat -X ISTIO_OUTPUT",
                "-t nat -F ISTIO_INBOUND",
                "-t nat -X ISTIO_INBOUND",
            ]
        );
        let checks: Vec<String> = b.checks(false).iter().map(|c| c.join(" ")).collect();
        assert_eq!(checks[2], "-t nat -C PREROUTING -i eth1 -j RETURN");
    }

    #[test]
    fn state_parsing_and_leftover_cleanup() {
        let save = "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n\
                    -A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n";
        let st = state_from_save(save);
        assert_eq!(st["nat"]["ISTIO_OUTPUT"].len(), 1);
        assert!(st["nat"]["ISTIO_REDIRECT"].is_empty());
        assert!(!state_is_empty(&st));
        let got: Vec<String> = cleanup_from_state(&st)
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert_eq!(
            got,
            vec![
                "-t nat -D OUTPUT -p tcp -j ISTIO_OUTPUT",
                "-t nat -F ISTIO_OUTPUT",
                "-t nat -F ISTIO_REDIRECT",
                "-t nat -X ISTIO_OUTPUT",
                "-t nat -X ISTIO_REDIRECT",
            ]
        );
        assert!(state_is_empty(&state_from_save("")));
    }
}
