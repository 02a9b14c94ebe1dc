// SPDX-License-Identifier: Apache-2.0
//! Request path normalisation as the HTTP connection manager does it (`normalize_path`,
//! `merge_slashes`, `path_with_escaped_slashes_action`).

use crate::config::EscapedSlashes;

/// Outcome of normalisation.
#[derive(Debug, PartialEq, Eq)]
pub enum Normalized {
    /// unchanged
    Same,
    /// forward with this path
    Changed(String),
    /// answer 307 with this location path
    Redirect(String),
}

/// Normalises `raw` (path and query). `Err` means the request must be rejected with 400.
pub fn normalize(
    raw: &str,
    normalize: bool,
    merge: bool,
    escaped: EscapedSlashes,
) -> Result<Normalized, ()> {
    if !normalize && !merge && escaped == EscapedSlashes::Keep {
        return Ok(Normalized::Same);
    }
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    let mut p = path.to_string();
    let has_escaped = contains_escaped_slash(&p);
    if has_escaped {
        match escaped {
            EscapedSlashes::Keep => {}
            EscapedSlashes::Reject => return Err(()),
            EscapedSlashes::UnescapeAndRedirect | EscapedSlashes::UnescapeAndForward => {
                p = unescape_slashes(&p)
            }
        }
    }
    if normalize {
        // Chromium's canonicaliser fails on an encoded NUL: Envoy answers 400.
        if p.as_bytes().windows(3).any(|w| w == b"%00") {
            return Err(());
        }
        p = canonicalize(&p.replace('\\', "/"));
    }
    if merge {
        while p.contains("//") {
            p = p.replace("//", "/");
        }
    }
    if !p.starts_with('/') && !p.is_empty() && p != "*" {
        return Err(());
    }
    let mut out = p;
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    if out == raw {
        Ok(Normalized::Same)
    } else if has_escaped && escaped == EscapedSlashes::UnescapeAndRedirect {
        Ok(Normalized::Redirect(out))
    } else {
        Ok(Normalized::Changed(out))
    }
}

/// What the HTTP/1 request line's target is, as Envoy's codec and connection manager see it.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// origin-form or absolute-form (or CONNECT's authority-form)
    Ok,
    /// a byte Envoy's codec refuses (controls, space, DEL, non-ASCII) or a relative target: 400
    Invalid,
    /// `*`: 404 from the connection manager
    Asterisk,
}

/// Classifies the target of a raw request line (`METHOD SP target SP version`).
pub fn check_target(line: &[u8]) -> Target {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(first) = line.iter().position(|b| *b == b' ') else {
        return Target::Ok;
    };
    let Some(last) = line.iter().rposition(|b| *b == b' ') else {
        return Target::Ok;
    };
    if last <= first {
        return Target::Ok;
    }
    let (method, target) = (&line[..first], &line[first + 1..last]);
    if target.iter().any(|b| *b < 0x21 || *b >= 0x7f) {
        return Target::Invalid;
    }
    match target.first() {
        Some(b'/') => Target::Ok,
        _ if target == b"*" => Target::Asterisk,
        _ if method == b"CONNECT" || split_absolute_form(target).is_some() => Target::Ok,
        _ => Target::Invalid,
    }
}

/// Splits an absolute-form request target (`http://host:port/path?q`) into authority and
/// path-and-query (`/` when empty); `None` for any other form.
pub fn split_absolute_form(target: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = target.iter().position(|b| *b == b':')?;
    let scheme = &target[..colon];
    if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https")) {
        return None;
    }
    let rest = target[colon..].strip_prefix(b"://")?;
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?'))
        .unwrap_or(rest.len());
    let path: &[u8] = match &rest[end..] {
        [] => b"/",
        p => p,
    };
    Some((&rest[..end], path))
}

fn contains_escaped_slash(p: &str) -> bool {
    let b = p.as_bytes();
    b.windows(3).any(|w| {
        w[0] == b'%'
            && ((w[1] == b'2' && (w[2] | 0x20) == b'f') || (w[1] == b'5' && (w[2] | 0x20) == b'c'))
    })
}

fn unescape_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let b = p.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let (c1, c2) = (b[i + 1], b[i + 2] | 0x20);
            if c1 == b'2' && c2 == b'f' {
                out.push('/');
                i += 3;
                continue;
            }
            if c1 == b'5' && c2 == b'c' {
                out.push('\\');
                i += 3;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Envoy's canonicaliser (Chromium's URL path rules) on a path whose backslashes are already
/// slashes: percent-encoded unreserved characters are decoded, other escapes keep their case,
/// `"<>`{}|^` are escaped, and dot segments are removed (RFC 3986 §5.2.4). A segment of literal
/// dots followed by ';' (`..;x`) counts as a dot segment and loses the rest of the segment, which
/// is not the case when a dot is encoded (`%2e%2e;` stays).
fn canonicalize(p: &str) -> String {
    #[derive(PartialEq)]
    enum Kind {
        Normal,
        Current,
        Up,
    }
    let mut out: Vec<String> = Vec::new();
    let mut last_was_dot = false;
    for seg in p.split('/').skip(1) {
        let decoded = decode_segment(seg);
        let kind = if decoded == "." || seg.starts_with(".;") {
            Kind::Current
        } else if decoded == ".." || seg.starts_with("..;") {
            Kind::Up
        } else {
            Kind::Normal
        };
        last_was_dot = kind != Kind::Normal;
        match kind {
            Kind::Current => {}
            Kind::Up => {
                out.pop();
            }
            Kind::Normal => out.push(decoded),
        }
    }
    let mut s = String::with_capacity(p.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if last_was_dot || s.is_empty() {
        s.push('/');
    }
    s
}

/// Decodes percent-encoded unreserved characters (RFC 3986 §6.2.2.2) and escapes the characters
/// Chromium's path canonicaliser escapes; other escapes are kept as written.
fn decode_segment(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            let d = h * 16 + l;
            if d.is_ascii_alphanumeric() || matches!(d, b'-' | b'.' | b'_' | b'~') {
                out.push(d);
            } else {
                out.extend_from_slice(&b[i..i + 3]);
            }
            i += 3;
            continue;
        }
        if matches!(c, b'"' | b'<' | b'>' | b'`' | b'{' | b'}' | b'|' | b'^') {
            out.push(b'%');
            out.push(HEX[usize::from(c >> 4)]);
            out.push(HEX[usize::from(c & 0xf)]);
        } else {
            out.push(c);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_targets() {
        assert_eq!(check_target(b"GET /a HTTP/1.1\r"), Target::Ok);
        assert_eq!(check_target(b"GET http://h/a HTTP/1.1\r"), Target::Ok);
        assert_eq!(check_target(b"OPTIONS * HTTP/1.1\r"), Target::Asterisk);
        assert_eq!(check_target(b"GET admin HTTP/1.1\r"), Target::Invalid);
        assert_eq!(check_target(b"GET /a\x7fb HTTP/1.1\r"), Target::Invalid);
        assert_eq!(
            check_target("GET /\u{e9} HTTP/1.1\r".as_bytes()),
            Target::Invalid
        );
        assert_eq!(check_target(b"CONNECT h:443 HTTP/1.1\r"), Target::Ok);
    }

    #[test]
    fn absolute_form() {
        assert_eq!(
            split_absolute_form(b"http://reviews:9080/r?x=1"),
            Some((&b"reviews:9080"[..], &b"/r?x=1"[..]))
        );
        assert_eq!(
            split_absolute_form(b"HTTPS://reviews"),
            Some((&b"reviews"[..], &b"/"[..]))
        );
        assert_eq!(split_absolute_form(b"/r"), None);
        assert_eq!(split_absolute_form(b"/a:b"), None);
    }

    #[test]
    fn normalises_like_envoy() {
        let n = |p| normalize(p, true, false, EscapedSlashes::Keep);
        assert_eq!(
            n("/reviews/a/../b/./c"),
            Ok(Normalized::Changed("/reviews/b/c".into()))
        );
        assert_eq!(n("/a/b?x=/../"), Ok(Normalized::Same));
        assert_eq!(n("/%61b"), Ok(Normalized::Changed("/ab".into())));
        // Seen on Envoy 1.40 (path_bypass / scratch scenarios).
        assert_eq!(n("/a/..;x/b"), Ok(Normalized::Changed("/b".into())));
        assert_eq!(n("/a/.;/b"), Ok(Normalized::Changed("/a/b".into())));
        assert_eq!(
            n("/a/%2e%2e;/b"),
            Ok(Normalized::Changed("/a/..;/b".into()))
        );
        assert_eq!(n("/a/..;/../b"), Ok(Normalized::Changed("/b".into())));
        assert_eq!(n("/a/b/..;"), Ok(Normalized::Changed("/a/".into())));
        assert_eq!(n("/a/...;/b"), Ok(Normalized::Same));
        assert_eq!(
            n("/%7e%41%3b%2a"),
            Ok(Normalized::Changed("/~A%3b%2a".into()))
        );
        assert_eq!(n("/a\"<b>"), Ok(Normalized::Changed("/a%22%3Cb%3E".into())));
        assert_eq!(n("/a/%%41"), Ok(Normalized::Changed("/a/%A".into())));
        assert_eq!(n("/admin%00"), Err(()));
        assert_eq!(
            normalize("/a//b", false, true, EscapedSlashes::Keep),
            Ok(Normalized::Changed("/a/b".into()))
        );
        assert_eq!(
            normalize("/a%2Fb", false, false, EscapedSlashes::Reject),
            Err(())
        );
        assert_eq!(
            normalize("/a%2fb", false, false, EscapedSlashes::UnescapeAndRedirect),
            Ok(Normalized::Redirect("/a/b".into()))
        );
    }
}
