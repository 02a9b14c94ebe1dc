// SPDX-License-Identifier: Apache-2.0
//! Executor: walks the node tree against a [`V`] and writes text.

use std::borrow::Cow;

use super::Template;
use super::funcs;
use super::parse::{Node, Operand, Pipeline};
use crate::value::{MapKind, V, go_to_json_name};

enum Flow {
    Normal,
    Break,
    Continue,
}

struct Exec<'a> {
    tmpl: &'a Template,
    vars: Vec<(String, V)>,
    out: String,
    depth: usize,
}

pub fn render(tmpl: &Template, data: &V) -> Result<String, String> {
    let mut ex = Exec {
        tmpl,
        vars: vec![("$".to_string(), data.clone())],
        out: String::new(),
        depth: 0,
    };
    ex.list(&tmpl.root, data)?;
    Ok(ex.out)
}

impl Exec<'_> {
    fn list(&mut self, nodes: &[Node], dot: &V) -> Result<Flow, String> {
        for n in nodes {
            match self.node(n, dot)? {
                Flow::Normal => {}
                other => return Ok(other),
            }
        }
        Ok(Flow::Normal)
    }

    fn node(&mut self, n: &Node, dot: &V) -> Result<Flow, String> {
        match n {
            Node::Text(t) => self.out.push_str(t),
            Node::Action(p) => {
                let v = self.pipeline(p, dot)?;
                if p.decl.is_empty() {
                    self.out.push_str(&v.to_go_string());
                }
            }
            Node::If(p, body, els) => {
                let mark = self.vars.len();
                let v = self.pipeline(p, dot)?;
                let r = if v.truthy() {
                    self.list(body, dot)
                } else {
                    self.list(els, dot)
                };
                self.vars.truncate(mark);
                return r;
            }
            Node::With(p, body, els) => {
                let mark = self.vars.len();
                let v = self.pipeline(p, dot)?;
                let r = if v.truthy() {
                    self.list(body, &v)
                } else {
                    self.list(els, dot)
                };
                self.vars.truncate(mark);
                return r;
            }
            Node::Range(p, body, els) => {
                let mark = self.vars.len();
                let mut pp = p.clone();
                let decl = std::mem::take(&mut pp.decl);
                let v = self.pipeline(&pp, dot)?;
                let items: Vec<(V, V)> = match v {
                    V::List(l) => l
                        .iter()
                        .cloned()
                        .enumerate()
                        .map(|(i, x)| (V::Int(i as i64), x))
                        .collect(),
                    V::Map(m, _) => m
                        .iter()
                        .map(|(k, x)| (V::Str(k.clone()), x.clone()))
                        .collect(),
                    V::Int(n) => (0..n).map(|i| (V::Int(i), V::Int(i))).collect(),
                    V::Nil | V::Str(_) | V::Bool(false) => Vec::new(),
                    other => {
                        return Err(format!("range can't iterate over {}", other.to_go_string()));
                    }
                };
                if items.is_empty() {
                    let r = self.list(els, dot);
                    self.vars.truncate(mark);
                    return r;
                }
                for (k, x) in items {
                    self.vars.truncate(mark);
                    match decl.len() {
                        0 => {}
                        1 => self.vars.push((decl[0].clone(), x.clone())),
                        _ => {
                            self.vars.push((decl[0].clone(), k));
                            self.vars.push((decl[1].clone(), x.clone()));
                        }
                    }
                    match self.list(body, &x)? {
                        Flow::Break => break,
                        Flow::Continue | Flow::Normal => {}
                    }
                }
                self.vars.truncate(mark);
            }
            Node::Template(name, p) => {
                let arg = match p {
                    Some(p) => self.pipeline(p, dot)?,
                    None => V::Nil,
                };
                let Some(body) = self.tmpl.defines.get(name) else {
                    return Err(format!("no such template {name:?}"));
                };
                if self.depth > 100 {
                    return Err("template recursion too deep".into());
                }
                let saved = std::mem::replace(&mut self.vars, vec![("$".to_string(), arg.clone())]);
                self.depth += 1;
                let r = self.list(body, &arg);
                self.depth -= 1;
                self.vars = saved;
                r?;
            }
            Node::Break => return Ok(Flow::Break),
            Node::Continue => return Ok(Flow::Continue),
        }
        Ok(Flow::Normal)
    }

    fn pipeline(&mut self, p: &Pipeline, dot: &V) -> Result<V, String> {
        let mut val: Option<V> = None;
        for cmd in &p.cmds {
            val = Some(self.command(cmd, dot, val)?);
        }
        let v = val.unwrap_or(V::Nil);
        if !p.decl.is_empty() {
            if p.is_assign {
                let name = &p.decl[0];
                match self.vars.iter_mut().rev().find(|(n, _)| n == name) {
                    Some(slot) => slot.1 = v.clone(),
                    None => return Err(format!("undefined variable: {name}")),
                }
            } else {
                self.vars.push((p.decl[0].clone(), v.clone()));
            }
        }
        Ok(v)
    }

    fn command(&mut self, cmd: &[Operand], dot: &V, last: Option<V>) -> Result<V, String> {
        let Some(first) = cmd.first() else {
            return Ok(V::Nil);
        };
        if let Operand::Func(name) = first {
            let args = &cmd[1..];
            // Short-circuiting boolean functions.
            if name == "and" || name == "or" {
                let mut vals: Vec<V> = Vec::new();
                let total = args.len() + usize::from(last.is_some());
                for (i, a) in args.iter().enumerate() {
                    let v = self.operand(a, dot)?;
                    let t = v.truthy();
                    if (name == "and" && !t) || (name == "or" && t) || i + 1 == total {
                        return Ok(v);
                    }
                    vals.push(v);
                }
                return Ok(last.unwrap_or(V::Nil));
            }
            let mut vals = Vec::with_capacity(args.len() + 1);
            for a in args {
                vals.push(self.operand(a, dot)?);
            }
            if let Some(l) = last {
                vals.push(l);
            }
            return funcs::call(name, vals);
        }
        if cmd.len() > 1 {
            // Helm's `.Files.Get "path"`: a field chain given one argument indexes the map it
            // names. (Go would reject it as a non-function; only chart rendering relies on it.)
            if cmd.len() == 2 && last.is_none() {
                let table = self.operand(first, dot)?;
                let key = self.operand(&cmd[1], dot)?;
                if let V::Map(m, _) = &table {
                    return Ok(m.get(&key.to_go_string()).cloned().unwrap_or(V::str("")));
                }
            }
            return Err("can't give arguments to a non-function".into());
        }
        let v = self.operand(first, dot)?;
        if last.is_some() {
            return Err("can't pipe into a non-function".into());
        }
        Ok(v)
    }

    fn operand(&mut self, op: &Operand, dot: &V) -> Result<V, String> {
        Ok(match op {
            Operand::Field(names) => chain(Cow::Borrowed(dot), names).into_owned(),
            Operand::Var(name, names) => {
                let Some((_, v)) = self.vars.iter().rev().find(|(n, _)| n == name) else {
                    return Err(format!("undefined variable: {name}"));
                };
                chain(Cow::Borrowed(v), names).into_owned()
            }
            Operand::Func(name) => funcs::call(name, Vec::new())?,
            Operand::Str(s) => V::Str(s.clone()),
            Operand::Int(i) => V::Int(*i),
            Operand::Float(f) => V::Float(*f),
            Operand::Bool(b) => V::Bool(*b),
            Operand::Nil => V::Nil,
            Operand::Sub(p, names) => {
                let v = self.pipeline(p, dot)?;
                chain(Cow::Owned(v), names).into_owned()
            }
        })
    }
}

/// Follows a field chain without copying the values it passes through.
fn chain<'a>(mut v: Cow<'a, V>, names: &[String]) -> Cow<'a, V> {
    for n in names {
        v = match v {
            Cow::Borrowed(b) => field(b, n),
            Cow::Owned(o) => Cow::Owned(field(&o, n).into_owned()),
        };
    }
    v
}

/// Reads field `name` (Go spelling) of `v`, including the few proto getter methods templates call.
pub fn field<'a>(v: &'a V, name: &str) -> Cow<'a, V> {
    match name {
        "GetValue" => {
            return match v {
                V::Map(m, _) => m
                    .get("value")
                    .map(Cow::Borrowed)
                    .unwrap_or(Cow::Owned(V::Bool(false))),
                V::Nil => Cow::Owned(V::Bool(false)),
                V::Str(s) if s.is_empty() => Cow::Owned(V::Bool(false)),
                other => Cow::Borrowed(other),
            };
        }
        "String" if !matches!(v, V::Map(..)) => {
            return Cow::Owned(match v {
                V::Nil => V::str(""),
                other => V::Str(other.to_go_string()),
            });
        }
        _ => {}
    }
    match v {
        V::Map(m, kind) => {
            if let Some(x) = m.get(name) {
                return Cow::Borrowed(x);
            }
            if *kind == MapKind::Struct {
                if let Some(x) = m.get(&go_to_json_name(name)) {
                    return Cow::Borrowed(x);
                }
                if let Some(rest) = name.strip_prefix("Get")
                    && !rest.is_empty()
                {
                    return field(v, rest);
                }
            }
            Cow::Owned(match kind {
                MapKind::Struct | MapKind::StrMap => V::str(""),
                MapKind::Any => V::Nil,
            })
        }
        _ => Cow::Owned(V::Nil),
    }
}
