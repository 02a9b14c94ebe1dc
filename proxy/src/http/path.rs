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
        p = decode_unreserved(&p);
        p = p.replace('\\', "/");
        p = remove_dot_segments(&p);
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

/// Decodes percent-encoded unreserved characters (RFC 3986 §6.2.2.2), as Envoy's normaliser does.
fn decode_unreserved(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            let c = h * 16 + l;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c);
            } else {
                out.push(b'%');
                out.push(b[i + 1].to_ascii_uppercase());
                out.push(b[i + 2].to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §5.2.4.
fn remove_dot_segments(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let trailing = p.ends_with("/.") || p.ends_with("/..") || p.ends_with('/');
    for seg in p.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(p.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing && !s.ends_with('/') {
        s.push('/');
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
