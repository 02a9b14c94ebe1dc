// SPDX-License-Identifier: Apache-2.0
//! Lexer: splits template source into text and action tokens, applying `{{-` / `-}}` trimming.

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    Text(String),
    /// Start of an action (`{{`). Carries the source line.
    Open(usize),
    Close,
    /// `.a.b.c` (empty vec = bare `.`); `spaced` = whitespace (or a non-chainable token) before it.
    Field {
        names: Vec<String>,
        spaced: bool,
    },
    /// `$name` or `$`, with any attached `.a.b` chain.
    Var {
        name: String,
        chain: Vec<String>,
    },
    Ident(String),
    Str(String),
    Int(i64),
    Float(f64),
    LParen,
    RParen,
    Pipe,
    Declare,
    Assign,
    Comma,
}

type LexResult = Result<Vec<Tok>, (usize, String)>;

pub fn lex(src: &str) -> LexResult {
    let mut out = Vec::new();
    let bytes = src.as_bytes();
    let mut i = 0;
    let mut trim_next_text = false;
    let mut line = 1usize;
    while i < bytes.len() {
        let start = i;
        let open = src[i..].find("{{").map(|p| p + i);
        let text_end = open.unwrap_or(bytes.len());
        let mut text = &src[start..text_end];
        if trim_next_text {
            text = text.trim_start_matches(is_space);
        }
        let trim_left = open.is_some_and(|o| {
            bytes.get(o + 2) == Some(&b'-')
                && bytes.get(o + 3).is_some_and(|c| is_space(*c as char))
        });
        if trim_left {
            text = text.trim_end_matches(is_space);
        }
        if !text.is_empty() {
            out.push(Tok::Text(text.to_string()));
        }
        line += src[start..text_end].matches('\n').count();
        let Some(o) = open else { break };
        i = o + 2;
        if trim_left {
            i += 2;
        }
        out.push(Tok::Open(line));
        // Comments.
        let rest = src[i..].trim_start_matches(is_space);
        if rest.starts_with("/*") {
            let cstart = src.len() - rest.len();
            let Some(cend) = src[cstart..].find("*/") else {
                return Err((line, "unclosed comment".into()));
            };
            let after = cstart + cend + 2;
            let tail = &src[after..];
            let tail_trimmed = tail.trim_start_matches(is_space);
            let (close_at, trim_right) = if tail_trimmed.starts_with("-}}") {
                (src.len() - tail_trimmed.len() + 3, true)
            } else if tail_trimmed.starts_with("}}") {
                (src.len() - tail_trimmed.len() + 2, false)
            } else {
                return Err((line, "comment ends before closing delimiter".into()));
            };
            line += src[i..close_at].matches('\n').count();
            out.pop(); // drop the Open: comments produce nothing
            trim_next_text = trim_right;
            i = close_at;
            continue;
        }
        // Tokens inside the action.
        let mut prev_chainable = false;
        loop {
            let Some(&c) = bytes.get(i) else {
                return Err((line, "unclosed action".into()));
            };
            let ch = c as char;
            if is_space(ch) {
                if ch == '\n' {
                    line += 1;
                }
                // ` -}}` closes with trimming.
                if src[i..].starts_with(" -}}")
                    || src[i..].starts_with("\n-}}")
                    || src[i..].starts_with("\t-}}")
                {
                    out.push(Tok::Close);
                    i += 4;
                    trim_next_text = true;
                    break;
                }
                i += 1;
                prev_chainable = false;
                continue;
            }
            if src[i..].starts_with("}}") {
                out.push(Tok::Close);
                i += 2;
                trim_next_text = false;
                break;
            }
            match ch {
                '(' => {
                    out.push(Tok::LParen);
                    i += 1;
                    prev_chainable = false;
                }
                ')' => {
                    out.push(Tok::RParen);
                    i += 1;
                    prev_chainable = true;
                }
                '|' => {
                    out.push(Tok::Pipe);
                    i += 1;
                    prev_chainable = false;
                }
                ',' => {
                    out.push(Tok::Comma);
                    i += 1;
                    prev_chainable = false;
                }
                ':' if bytes.get(i + 1) == Some(&b'=') => {
                    out.push(Tok::Declare);
                    i += 2;
                    prev_chainable = false;
                }
                '=' => {
                    out.push(Tok::Assign);
                    i += 1;
                    prev_chainable = false;
                }
                '"' => {
                    let (s, n) =
                        lex_quoted(&src[i..]).ok_or((line, "bad string literal".to_string()))?;
                    out.push(Tok::Str(s));
                    i += n;
                    prev_chainable = false;
                }
                '`' => {
                    let Some(end) = src[i + 1..].find('`') else {
                        return Err((line, "unterminated raw string".into()));
                    };
                    let s = &src[i + 1..i + 1 + end];
                    line += s.matches('\n').count();
                    out.push(Tok::Str(s.to_string()));
                    i += end + 2;
                    prev_chainable = false;
                }
                '.' => {
                    let (names, n) = lex_chain(&src[i..]);
                    out.push(Tok::Field {
                        names,
                        spaced: !prev_chainable,
                    });
                    i += n;
                    prev_chainable = true;
                }
                '$' => {
                    let name_len = src[i + 1..]
                        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .unwrap_or(src.len() - i - 1);
                    let name = src[i..i + 1 + name_len].to_string();
                    i += 1 + name_len;
                    let (chain, n) = if bytes.get(i) == Some(&b'.') {
                        lex_chain(&src[i..])
                    } else {
                        (vec![], 0)
                    };
                    i += n;
                    out.push(Tok::Var { name, chain });
                    prev_chainable = true;
                }
                c if c.is_ascii_digit()
                    || (c == '-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
                {
                    let len = src[i + 1..]
                        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == 'x'))
                        .unwrap_or(src.len() - i - 1)
                        + 1;
                    let lit = &src[i..i + len];
                    if let Ok(v) = lit.parse::<i64>() {
                        out.push(Tok::Int(v));
                    } else if let Ok(f) = lit.parse::<f64>() {
                        out.push(Tok::Float(f));
                    } else {
                        return Err((line, format!("bad number {lit:?}")));
                    }
                    i += len;
                    prev_chainable = false;
                }
                c if c.is_alphabetic() || c == '_' => {
                    let len = src[i..]
                        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .unwrap_or(src.len() - i);
                    out.push(Tok::Ident(src[i..i + len].to_string()));
                    i += len;
                    prev_chainable = false;
                }
                '\'' => {
                    // Character constant: an integer in Go.
                    let Some(end) = src[i + 1..].find('\'') else {
                        return Err((line, "unterminated character constant".into()));
                    };
                    let c = src[i + 1..i + 1 + end].chars().next().unwrap_or('\0');
                    out.push(Tok::Int(c as i64));
                    i += end + 2;
                    prev_chainable = false;
                }
                other => return Err((line, format!("unexpected character {other:?} in action"))),
            }
        }
    }
    Ok(out)
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Lexes `.a.b.c`; returns the names and the byte length consumed. A lone `.` gives no names.
fn lex_chain(s: &str) -> (Vec<String>, usize) {
    let mut names = Vec::new();
    let mut i = 0;
    let b = s.as_bytes();
    while b.get(i) == Some(&b'.') {
        let len = s[i + 1..]
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(s.len() - i - 1);
        if len == 0 {
            i += 1;
            break;
        }
        names.push(s[i + 1..i + 1 + len].to_string());
        i += 1 + len;
    }
    (names, i)
}

/// Lexes a Go interpreted string literal starting at `"`.
fn lex_quoted(s: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut it = s.char_indices().skip(1);
    while let Some((i, c)) = it.next() {
        match c {
            '"' => return Some((out, i + 1)),
            '\\' => {
                let (_, e) = it.next()?;
                match e {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    '\\' => out.push('\\'),
                    '"' => out.push('"'),
                    '\'' => out.push('\''),
                    '0' => out.push('\0'),
                    other => {
                        out.push('\\');
                        out.push(other);
                    }
                }
            }
            '\n' => return None,
            c => out.push(c),
        }
    }
    None
}
