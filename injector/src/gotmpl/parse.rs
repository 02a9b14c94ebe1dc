// SPDX-License-Identifier: Apache-2.0
//! Parser: tokens → node tree.

use std::collections::HashMap;

use super::lex::Tok;

#[derive(Debug, Clone)]
pub enum Operand {
    /// `.a.b` relative to dot (empty = dot itself).
    Field(Vec<String>),
    Var(String, Vec<String>),
    Func(String),
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Nil,
    /// `( pipeline ).a.b`
    Sub(Box<Pipeline>, Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub decl: Vec<String>,
    /// true for `=`, false for `:=`.
    pub is_assign: bool,
    pub cmds: Vec<Vec<Operand>>,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub enum Node {
    Text(String),
    Action(Pipeline),
    If(Pipeline, Vec<Node>, Vec<Node>),
    With(Pipeline, Vec<Node>, Vec<Node>),
    Range(Pipeline, Vec<Node>, Vec<Node>),
    Template(String, Option<Pipeline>),
    Break,
    Continue,
}

type PResult<T> = Result<T, (usize, String)>;

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    line: usize,
    defines: HashMap<String, Vec<Node>>,
}

/// How a list of nodes ended.
enum Stop {
    Eof,
    End,
    Else,
    ElseIf(Pipeline),
    ElseWith(Pipeline),
}

pub type Defines = HashMap<String, Vec<Node>>;

pub fn parse(toks: Vec<Tok>) -> PResult<(Vec<Node>, Defines)> {
    let mut p = Parser {
        toks,
        pos: 0,
        line: 1,
        defines: HashMap::new(),
    };
    let (nodes, end) = p.list()?;
    match end {
        Stop::Eof => Ok((nodes, p.defines)),
        _ => Err((p.line, "unexpected {{end}} or {{else}}".into())),
    }
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expect_close(&mut self) -> PResult<()> {
        match self.next() {
            Some(Tok::Close) => Ok(()),
            other => Err((self.line, format!("expected }}}}, found {other:?}"))),
        }
    }

    fn list(&mut self) -> PResult<(Vec<Node>, Stop)> {
        let mut nodes = Vec::new();
        loop {
            match self.next() {
                None => return Ok((nodes, Stop::Eof)),
                Some(Tok::Text(t)) => nodes.push(Node::Text(t)),
                Some(Tok::Open(line)) => {
                    self.line = line;
                    match self.peek().cloned() {
                        Some(Tok::Ident(kw)) => match kw.as_str() {
                            "end" => {
                                self.pos += 1;
                                self.expect_close()?;
                                return Ok((nodes, Stop::End));
                            }
                            "else" => {
                                self.pos += 1;
                                match self.peek().cloned() {
                                    Some(Tok::Ident(k)) if k == "if" => {
                                        self.pos += 1;
                                        let p = self.pipeline(true)?;
                                        return Ok((nodes, Stop::ElseIf(p)));
                                    }
                                    Some(Tok::Ident(k)) if k == "with" => {
                                        self.pos += 1;
                                        let p = self.pipeline(true)?;
                                        return Ok((nodes, Stop::ElseWith(p)));
                                    }
                                    _ => {
                                        self.expect_close()?;
                                        return Ok((nodes, Stop::Else));
                                    }
                                }
                            }
                            "if" | "with" | "range" => {
                                self.pos += 1;
                                let p = self.pipeline(true)?;
                                nodes.push(self.control(&kw, p)?);
                            }
                            "define" | "block" => {
                                self.pos += 1;
                                let name = match self.next() {
                                    Some(Tok::Str(s)) => s,
                                    other => {
                                        return Err((
                                            self.line,
                                            format!("bad define name {other:?}"),
                                        ));
                                    }
                                };
                                let pipe = if kw == "block" {
                                    Some(self.pipeline(true)?)
                                } else {
                                    self.expect_close()?;
                                    None
                                };
                                let (body, end) = self.list()?;
                                if !matches!(end, Stop::End) {
                                    return Err((
                                        self.line,
                                        format!("{kw} {name:?} not closed by {{{{end}}}}"),
                                    ));
                                }
                                self.defines.insert(name.clone(), body);
                                if let Some(pipe) = pipe {
                                    nodes.push(Node::Template(name, Some(pipe)));
                                }
                            }
                            "template" => {
                                self.pos += 1;
                                let name = match self.next() {
                                    Some(Tok::Str(s)) => s,
                                    other => {
                                        return Err((
                                            self.line,
                                            format!("bad template name {other:?}"),
                                        ));
                                    }
                                };
                                if matches!(self.peek(), Some(Tok::Close)) {
                                    self.pos += 1;
                                    nodes.push(Node::Template(name, None));
                                } else {
                                    let p = self.pipeline(true)?;
                                    nodes.push(Node::Template(name, Some(p)));
                                }
                            }
                            "break" => {
                                self.pos += 1;
                                self.expect_close()?;
                                nodes.push(Node::Break);
                            }
                            "continue" => {
                                self.pos += 1;
                                self.expect_close()?;
                                nodes.push(Node::Continue);
                            }
                            _ => nodes.push(Node::Action(self.pipeline(true)?)),
                        },
                        _ => nodes.push(Node::Action(self.pipeline(true)?)),
                    }
                }
                Some(other) => return Err((self.line, format!("unexpected token {other:?}"))),
            }
        }
    }

    fn control(&mut self, kw: &str, p: Pipeline) -> PResult<Node> {
        let (body, end) = self.list()?;
        let else_body = match end {
            Stop::End => Vec::new(),
            Stop::Else => {
                let (eb, end2) = self.list()?;
                if !matches!(end2, Stop::End) {
                    return Err((self.line, format!("{kw}: expected {{{{end}}}}")));
                }
                eb
            }
            Stop::ElseIf(p2) => vec![self.control("if", p2)?],
            Stop::ElseWith(p2) => vec![self.control("with", p2)?],
            Stop::Eof => return Err((self.line, format!("unexpected EOF in {kw}"))),
        };
        Ok(match kw {
            "if" => Node::If(p, body, else_body),
            "with" => Node::With(p, body, else_body),
            _ => Node::Range(p, body, else_body),
        })
    }

    /// Parses a pipeline up to `}}` (when `top`) or `)`.
    fn pipeline(&mut self, top: bool) -> PResult<Pipeline> {
        let mut decl = Vec::new();
        let mut is_assign = false;
        // Declarations: `$a :=`, `$a, $b :=`, `$a =`.
        let save = self.pos;
        loop {
            match (self.toks.get(self.pos), self.toks.get(self.pos + 1)) {
                (Some(Tok::Var { name, chain }), Some(Tok::Comma)) if chain.is_empty() => {
                    decl.push(name.clone());
                    self.pos += 2;
                }
                (Some(Tok::Var { name, chain }), Some(Tok::Declare)) if chain.is_empty() => {
                    decl.push(name.clone());
                    self.pos += 2;
                    break;
                }
                (Some(Tok::Var { name, chain }), Some(Tok::Assign)) if chain.is_empty() => {
                    decl.push(name.clone());
                    is_assign = true;
                    self.pos += 2;
                    break;
                }
                _ => {
                    decl.clear();
                    self.pos = save;
                    break;
                }
            }
        }
        let mut cmds = Vec::new();
        let mut cur: Vec<Operand> = Vec::new();
        loop {
            let Some(t) = self.next() else {
                return Err((self.line, "unclosed action".into()));
            };
            match t {
                Tok::Close if top => break,
                Tok::RParen if !top => break,
                Tok::Pipe => {
                    if cur.is_empty() {
                        return Err((self.line, "missing command before |".into()));
                    }
                    cmds.push(std::mem::take(&mut cur));
                }
                Tok::LParen => {
                    let sub = self.pipeline(false)?;
                    let chain = match self.peek() {
                        Some(Tok::Field {
                            names,
                            spaced: false,
                        }) => {
                            let n = names.clone();
                            self.pos += 1;
                            n
                        }
                        _ => Vec::new(),
                    };
                    cur.push(Operand::Sub(Box::new(sub), chain));
                }
                Tok::Field { names, spaced } => {
                    if !spaced {
                        return Err((self.line, "unexpected field chain".into()));
                    }
                    cur.push(Operand::Field(names));
                }
                Tok::Var { name, chain } => cur.push(Operand::Var(name, chain)),
                Tok::Ident(id) => cur.push(match id.as_str() {
                    "true" => Operand::Bool(true),
                    "false" => Operand::Bool(false),
                    "nil" => Operand::Nil,
                    _ => Operand::Func(id),
                }),
                Tok::Str(s) => cur.push(Operand::Str(s)),
                Tok::Int(i) => cur.push(Operand::Int(i)),
                Tok::Float(f) => cur.push(Operand::Float(f)),
                other => return Err((self.line, format!("unexpected {other:?} in pipeline"))),
            }
        }
        if !cur.is_empty() {
            cmds.push(cur);
        }
        if cmds.is_empty() {
            return Err((self.line, "missing value for command".into()));
        }
        Ok(Pipeline {
            decl,
            is_assign,
            cmds,
            line: self.line,
        })
    }
}
