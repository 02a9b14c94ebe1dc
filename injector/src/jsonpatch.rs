// SPDX-License-Identifier: Apache-2.0
//! RFC 6902 patch creation: the operations that turn one JSON document into another.

use serde_json::{Value, json};

fn escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

/// Operations turning `from` into `to`.
pub fn diff(from: &Value, to: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    walk(from, to, "", &mut ops);
    ops
}

fn walk(from: &Value, to: &Value, path: &str, ops: &mut Vec<Value>) {
    if from == to {
        return;
    }
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, av) in a {
                let p = format!("{path}/{}", escape(k));
                match b.get(k) {
                    Some(bv) => walk(av, bv, &p, ops),
                    // A null field is an unset one for Kubernetes: nothing to remove.
                    None if av.is_null() => {}
                    None => ops.push(json!({"op": "remove", "path": p})),
                }
            }
            for (k, bv) in b {
                if !a.contains_key(k) {
                    ops.push(
                        json!({"op": "add", "path": format!("{path}/{}", escape(k)), "value": bv}),
                    );
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if !path.is_empty() => {
            let common = a.len().min(b.len());
            // Element-wise when the shared prefix keeps most elements in place; else replace.
            let same_prefix = a
                .iter()
                .zip(b.iter())
                .take(common)
                .filter(|(x, y)| x == y)
                .count();
            if same_prefix * 2 >= common || common == 0 {
                for i in 0..common {
                    walk(&a[i], &b[i], &format!("{path}/{i}"), ops);
                }
                for i in (common..a.len()).rev() {
                    ops.push(json!({"op": "remove", "path": format!("{path}/{i}")}));
                }
                for (i, v) in b.iter().enumerate().skip(common) {
                    let _ = i;
                    ops.push(json!({"op": "add", "path": format!("{path}/-"), "value": v}));
                }
            } else {
                ops.push(json!({"op": "replace", "path": path, "value": to}));
            }
        }
        _ => ops.push(
            json!({"op": "replace", "path": if path.is_empty() { "" } else { path }, "value": to}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_ops_transform_documents() {
        let a = json!({"metadata": {"creationTimestamp": null, "name": "x", "labels": {"a/b": "1"}},
                       "spec": {"containers": [{"name": "c"}]}});
        let b = json!({"metadata": {"name": "x", "labels": {"a/b": "2"}, "annotations": {"k": "v"}},
                       "spec": {"containers": [{"name": "c"}, {"name": "d"}], "initContainers": [{"name": "i"}]}});
        let ops = diff(&a, &b);
        assert!(
            ops.iter()
                .all(|o| o["path"] != "/metadata/creationTimestamp"),
            "{ops:?}"
        );
        assert!(
            ops.iter()
                .any(|o| o["path"] == "/metadata/labels/a~1b" && o["op"] == "replace"),
            "{ops:?}"
        );
        assert!(
            ops.iter()
                .any(|o| o["path"] == "/spec/containers/-" && o["value"]["name"] == "d"),
            "{ops:?}"
        );
    }
}
