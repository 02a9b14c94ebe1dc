// SPDX-License-Identifier: Apache-2.0
//! The lookup table built from istiod's name table, with the names pilot-agent answers for
//! (`pkg/dns/client/dns.go`: `UpdateLookupTable`, `generateAltHosts`, `buildDNSAnswers`,
//! `lookupHost`):
//!
//! - every host as an FQDN (`host.`);
//! - Kubernetes hosts of the proxy's cluster domain also as `name.ns.`, `name.ns.svc.` (the first
//!   label of the domain) and, in the proxy's own namespace, `name.`; plus their `alt_hosts`;
//! - every such name followed by the first `search` domain of resolv.conf (what a stub resolver
//!   tries first) as a CNAME to the name, answered together with the name's addresses;
//! - `*.domain` hosts match any name under `domain`.
//!
//! A known name answers A/AAAA (TTL 30 s) authoritatively, an empty NOERROR when it has no
//! address of the asked family; any other type, and any unknown name, goes upstream.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::wire::{RData, Record, TYPE_A, TYPE_AAAA};
use crate::nds::{KUBERNETES_REGISTRY, NameInfo, NameTable};

/// pilot-agent's answer TTL (kept low so clients see address changes soon).
pub const DEFAULT_TTL: u32 = 30;

/// What the table's names depend on besides the name table.
#[derive(Debug, Clone, Default)]
pub struct TableContext {
    proxy_namespace: String,
    /// the domain without the proxy's namespace, e.g. `svc.cluster.local`
    proxy_domain: String,
    /// its first label, e.g. `svc`
    domain_first: String,
    /// resolv.conf's search domains
    search: Vec<String>,
}

impl TableContext {
    /// `proxy_domain` as the agent gets it (`--domain`, e.g. `ns.svc.cluster.local`: a leading
    /// namespace label is dropped, as pilot-agent does).
    pub fn new(proxy_namespace: &str, proxy_domain: &str, search: Vec<String>) -> Self {
        let mut parts: Vec<&str> = proxy_domain.split('.').collect();
        if parts.first() == Some(&proxy_namespace) {
            parts.remove(0);
        }
        Self {
            proxy_namespace: proxy_namespace.to_owned(),
            proxy_domain: parts.join("."),
            domain_first: parts.first().map(|s| (*s).to_owned()).unwrap_or_default(),
            search,
        }
    }
}

/// Names → addresses, ready to answer.
#[derive(Debug, Default)]
pub struct LookupTable {
    all_hosts: HashSet<String>,
    name4: HashMap<String, Vec<Ipv4Addr>>,
    name6: HashMap<String, Vec<Ipv6Addr>>,
    /// search-expanded name → the name it stands for
    cname: HashMap<String, String>,
}

fn alt_hosts(hostname: &str, info: &NameInfo, ctx: &TableContext) -> Vec<String> {
    let mut out = vec![format!("{hostname}.")];
    if ctx.proxy_domain.is_empty() || !hostname.ends_with(&ctx.proxy_domain) {
        return out;
    }
    out.push(format!("{}.{}.", info.shortname, info.namespace));
    if ctx.proxy_namespace == info.namespace {
        out.push(format!("{}.", info.shortname));
    }
    out.push(format!(
        "{}.{}.{}.",
        info.shortname, info.namespace, ctx.domain_first
    ));
    out.extend(info.alt_hosts.iter().map(|h| format!("{h}.")));
    out
}

impl LookupTable {
    pub fn build(table: &NameTable, ctx: &TableContext) -> Self {
        let mut out = Self::default();
        for (hostname, info) in &table.table {
            let hosts = if info.registry == KUBERNETES_REGISTRY {
                alt_hosts(hostname, info, ctx)
            } else if hostname.ends_with('.') {
                vec![hostname.clone()]
            } else {
                vec![format!("{hostname}.")]
            };
            let (mut v4, mut v6) = (Vec::new(), Vec::new());
            for ip in &info.ips {
                match ip.parse::<IpAddr>() {
                    Ok(IpAddr::V4(a)) => v4.push(a),
                    Ok(IpAddr::V6(a)) => v6.push(a),
                    Err(_) => tracing::debug!(host = %hostname, ip, "name table: not an IP"),
                }
            }
            if v4.is_empty() && v6.is_empty() {
                continue;
            }
            out.add(&hosts, &v4, &v6, &ctx.search);
        }
        out
    }

    fn add(&mut self, hosts: &[String], v4: &[Ipv4Addr], v6: &[Ipv6Addr], search: &[String]) {
        for h in hosts {
            let h = h.to_ascii_lowercase();
            self.all_hosts.insert(h.clone());
            if !v4.is_empty() {
                self.name4.insert(h.clone(), v4.to_vec());
            }
            if !v6.is_empty() {
                self.name6.insert(h.clone(), v6.to_vec());
            }
            // Only the first search domain: stub resolvers try them in order.
            if let Some(first) = search.first() {
                let mut expanded = format!("{h}{first}").to_ascii_lowercase();
                if !first.ends_with('.') {
                    expanded.push('.');
                }
                if !hosts.contains(&expanded) {
                    self.cname.insert(expanded.clone(), h.clone());
                    self.all_hosts.insert(expanded);
                }
            }
        }
    }

    /// How many names the table answers for.
    pub fn len(&self) -> usize {
        self.all_hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all_hosts.is_empty()
    }

    /// The answers for `name` (lower-case, ending in `.`): `None` when the name or the type is
    /// not the table's business (forward upstream), else the records (maybe none).
    pub fn lookup(&self, qtype: u16, name: &str) -> Option<Vec<Record>> {
        let question = name;
        let mut host = name.to_owned();
        let mut wildcard = false;
        if !self.all_hosts.contains(&host) {
            let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
            let found = (0..labels.len()).find_map(|i| {
                let candidate = format!("*.{}.", labels[i + 1..].join("."));
                self.all_hosts.contains(&candidate).then_some(candidate)
            });
            host = found?;
            wildcard = true;
        }
        let mut out = Vec::new();
        let mut cnamed = false;
        if let Some(target) = self.cname.get(&host) {
            out.push(Record {
                name: question.to_owned(),
                ttl: DEFAULT_TTL,
                data: RData::Cname(target.clone()),
            });
            host = target.clone();
            cnamed = true;
        }
        // Wildcard addresses carry the asked name (or the CNAME target after a CNAME).
        let owner = if wildcard && !cnamed {
            question.to_owned()
        } else {
            host.clone()
        };
        let addresses: Vec<RData> = match qtype {
            TYPE_A => self
                .name4
                .get(&host)
                .map(|v| v.iter().map(|a| RData::A(*a)).collect())
                .unwrap_or_default(),
            TYPE_AAAA => self
                .name6
                .get(&host)
                .map(|v| v.iter().map(|a| RData::Aaaa(*a)).collect())
                .unwrap_or_default(),
            _ => return None,
        };
        if addresses.is_empty() {
            // pilot-agent answers nothing at all then, not even the CNAME.
            return Some(Vec::new());
        }
        out.extend(addresses.into_iter().map(|data| Record {
            name: owner.clone(),
            ttl: DEFAULT_TTL,
            data,
        }));
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn info(ips: &[&str], registry: &str, short: &str, ns: &str) -> NameInfo {
        NameInfo {
            ips: ips.iter().map(|s| s.to_string()).collect(),
            registry: registry.into(),
            shortname: short.into(),
            namespace: ns.into(),
            alt_hosts: vec![],
        }
    }

    fn table() -> LookupTable {
        let mut nt = NameTable::default();
        nt.table.insert(
            "productpage.ns1.svc.cluster.local".into(),
            info(&["10.0.0.1", "fd00::1"], "Kubernetes", "productpage", "ns1"),
        );
        nt.table.insert(
            "reviews.ns2.svc.cluster.local".into(),
            info(&["10.0.0.2"], "Kubernetes", "reviews", "ns2"),
        );
        // A ServiceEntry host with an auto-allocated address.
        nt.table.insert(
            "api.example.com".into(),
            info(&["240.240.0.1"], "External", "", ""),
        );
        nt.table.insert(
            "*.wild.example.com".into(),
            info(&["240.240.0.2"], "External", "", ""),
        );
        nt.table.insert(
            "broken.example.com".into(),
            info(&["x"], "External", "", ""),
        );
        let ctx = TableContext::new(
            "ns1",
            "ns1.svc.cluster.local",
            vec!["ns1.svc.cluster.local".into(), "svc.cluster.local".into()],
        );
        LookupTable::build(&nt, &ctx)
    }

    fn a(name: &str, ip: [u8; 4]) -> Record {
        Record {
            name: name.into(),
            ttl: 30,
            data: RData::A(Ipv4Addr::from(ip)),
        }
    }

    #[test]
    fn kubernetes_names() {
        let t = table();
        for n in [
            "productpage.ns1.svc.cluster.local.",
            "productpage.ns1.",
            "productpage.ns1.svc.",
            "productpage.",
        ] {
            assert_eq!(t.lookup(TYPE_A, n), Some(vec![a(n, [10, 0, 0, 1])]), "{n}");
        }
        // Short names only in the proxy's own namespace.
        assert_eq!(t.lookup(TYPE_A, "reviews."), None);
        assert_eq!(
            t.lookup(TYPE_A, "reviews.ns2."),
            Some(vec![a("reviews.ns2.", [10, 0, 0, 2])])
        );
        // AAAA, and a known name without an address of the family: empty NOERROR.
        assert_eq!(
            t.lookup(TYPE_AAAA, "productpage.").unwrap()[0].data,
            RData::Aaaa("fd00::1".parse().unwrap())
        );
        assert_eq!(t.lookup(TYPE_AAAA, "reviews.ns2."), Some(vec![]));
        // Other types go upstream.
        assert_eq!(t.lookup(15, "productpage."), None);
        assert_eq!(t.lookup(TYPE_A, "broken.example.com."), None);
    }

    #[test]
    fn search_expansion_is_a_cname() {
        let t = table();
        let n = "reviews.ns2.ns1.svc.cluster.local.";
        assert_eq!(
            t.lookup(TYPE_A, n),
            Some(vec![
                Record {
                    name: n.into(),
                    ttl: 30,
                    data: RData::Cname("reviews.ns2.".into())
                },
                a("reviews.ns2.", [10, 0, 0, 2])
            ])
        );
        // The FQDN itself is a name already: no CNAME to itself.
        assert_eq!(
            t.lookup(TYPE_A, "productpage.ns1.svc.cluster.local.")
                .unwrap()
                .len(),
            1
        );
        // Only the first search domain.
        assert_eq!(
            t.lookup(TYPE_A, "reviews.ns2.svc.cluster.local.svc.cluster.local."),
            None
        );
    }

    #[test]
    fn external_and_wildcard_hosts() {
        let t = table();
        assert_eq!(
            t.lookup(TYPE_A, "api.example.com."),
            Some(vec![a("api.example.com.", [240, 240, 0, 1])])
        );
        assert_eq!(t.lookup(TYPE_A, "api."), None);
        assert_eq!(
            t.lookup(TYPE_A, "x.y.wild.example.com."),
            Some(vec![a("x.y.wild.example.com.", [240, 240, 0, 2])])
        );
        assert_eq!(t.lookup(TYPE_A, "wild.example.com."), None);
    }
}
