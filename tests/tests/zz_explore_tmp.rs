// SPDX-License-Identifier: Apache-2.0
//! temporary exploration (not to be committed)
use pingsail_proxy::xds::bootstrap::{BootstrapError, load_text};
use pingsail_tests::configdump::*;
use serde_json::Value;

fn segs(p: &str) -> Vec<(String, Option<usize>)> {
    p.split('.').map(|s| {
        if let Some(i) = s.find('[') { (s[..i].to_string(), Some(s[i+1..s.len()-1].parse().unwrap())) } else { (s.to_string(), None) }
    }).collect()
}

fn remove(v: &mut Value, path: &str) -> bool {
    let sg = segs(path);
    let mut cur = v;
    let n = sg.len();
    for (k, (name, idx)) in sg.iter().enumerate() {
        let last = k + 1 == n;
        if last {
            let Some(o) = cur.as_object_mut() else { return false };
            if name == "typed_config" { return false; }
            if name == "rds" { o.remove("rds"); o.insert("route_config".into(), serde_json::json!({})); return true; }
            if let Some(i) = idx { if let Some(a) = o.get_mut(name).and_then(|a| a.as_array_mut()) { a.remove(*i); return true; } return false; }
            return o.remove(name).is_some();
        }
        // drop containing array element if next is typed_config refused
        if k + 2 == n && sg[n-1].0 == "typed_config" {
            if let Some(i) = idx { if let Some(a) = cur.get_mut(name).and_then(|a| a.as_array_mut()) { a.remove(*i); return true; } }
            return false;
        }
        let Some(next) = cur.get_mut(name) else { return false };
        cur = next;
        if let Some(i) = idx { let Some(nx) = cur.get_mut(*i) else { return false }; cur = nx; }
    }
    false
}

#[test]
fn explore() {
    let dumps = read_corpus(&configdumps_dir()).unwrap();
    let mut all = std::collections::BTreeMap::<String, usize>::new();
    for d in &dumps {
        for r in &d.resources {
            let mut b = r.bootstrap.clone();
            let mut chain = Vec::new();
            for _ in 0..60 {
                match load_text(&b.to_string()) {
                    Ok(_) => { chain.push("LOADS".to_string()); break; }
                    Err(BootstrapError::Translate(t)) => {
                        let p = t.path.to_string();
                        chain.push(format!("{p}: {}", t.kind));
                        *all.entry(format!("{:?} {}: {}", r.kind, pattern(&p), t.kind)).or_default() += 1;
                        if !remove(&mut b, &p) { chain.push("STOP".into()); break; }
                    }
                    Err(e) => { chain.push(format!("DECODE {e}")); break; }
                }
            }
            println!("== {} {:?} {}\n   {}", d.file, r.kind, r.name, chain.join("\n   "));
        }
    }
    println!("######## totals");
    for (k, v) in all { println!("{v:4} {k}"); }
}
