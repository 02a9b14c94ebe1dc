// SPDX-License-Identifier: Apache-2.0
//! The little of the DNS wire format (RFC 1035, EDNS0 from RFC 6891) the proxy needs: parse a
//! query's header, first question and EDNS0 UDP size; build replies with A/AAAA/CNAME answers
//! (name compression, truncation to the client's size); truncate a relayed reply. Forwarded
//! queries and replies are otherwise relayed byte for byte.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;

pub const RCODE_NOERROR: u16 = 0;
pub const RCODE_FORMERR: u16 = 1;
pub const RCODE_SERVFAIL: u16 = 2;

/// The UDP size without EDNS0 (and the least a client may advertise).
pub const MIN_UDP_SIZE: usize = 512;
/// The largest message (TCP).
pub const MAX_MSG_SIZE: usize = 65535;
const HEADER_LEN: usize = 12;

const FLAG_QR: u16 = 0x8000;
const MASK_OPCODE: u16 = 0x7800;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_CD: u16 = 0x0010;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message of {0} bytes is shorter than a DNS header")]
    Short(usize),
    #[error("malformed name at offset {0}")]
    BadName(usize),
    #[error("message ends inside a record or question")]
    Truncated,
}

/// A parsed query.
#[derive(Debug, Clone)]
pub struct Query {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    /// The first question's labels as sent (case preserved).
    labels: Vec<Vec<u8>>,
    /// The first question's name, lower-cased, dotted, ending in `.` (`.` for the root).
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The EDNS0 OPT record's UDP payload size, when the query has one.
    pub edns_udp_size: Option<u16>,
}

impl Query {
    /// A response (QR set) rather than a query.
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_QR != 0
    }

    /// The largest reply the client takes over `tcp` or UDP (miekg/dns `ednsSize`).
    pub fn max_reply(&self, tcp: bool) -> usize {
        if tcp {
            return MAX_MSG_SIZE;
        }
        usize::from(self.edns_udp_size.unwrap_or(0)).max(MIN_UDP_SIZE)
    }
}

fn u16_at(msg: &[u8], pos: usize) -> Result<u16, WireError> {
    match msg.get(pos..pos + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(WireError::Truncated),
    }
}

/// Reads the name at `pos`; returns its labels and the offset after it in the message.
fn read_name(msg: &[u8], mut pos: usize) -> Result<(Vec<Vec<u8>>, usize), WireError> {
    let start = pos;
    let mut labels = Vec::new();
    let mut end = None;
    let mut jumps = 0;
    let mut total = 0usize;
    loop {
        let len = *msg.get(pos).ok_or(WireError::BadName(start))?;
        match len & 0xC0 {
            0x00 => {
                if len == 0 {
                    return Ok((labels, end.unwrap_or(pos + 1)));
                }
                let l = usize::from(len);
                let label = msg
                    .get(pos + 1..pos + 1 + l)
                    .ok_or(WireError::BadName(start))?;
                total += l + 1;
                if total > 255 {
                    return Err(WireError::BadName(start));
                }
                labels.push(label.to_vec());
                pos += 1 + l;
            }
            0xC0 => {
                let ptr =
                    usize::from(u16_at(msg, pos).map_err(|_| WireError::BadName(start))?) & 0x3FFF;
                jumps += 1;
                if jumps > 64 || ptr >= msg.len() {
                    return Err(WireError::BadName(start));
                }
                end.get_or_insert(pos + 2);
                pos = ptr;
            }
            _ => return Err(WireError::BadName(start)),
        }
    }
}

/// Dotted text of labels, lower-cased, `\DDD`-escaping what is not a plain host character.
fn name_text(labels: &[Vec<u8>]) -> String {
    if labels.is_empty() {
        return ".".to_owned();
    }
    let mut out = String::new();
    for label in labels {
        for &b in label {
            let c = b.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'*' {
                out.push(char::from(c));
            } else {
                let _ = write!(out, "\\{c:03}");
            }
        }
        out.push('.');
    }
    out
}

/// Skips a resource record at `pos`; returns its type, class and the offset after it.
fn skip_record(msg: &[u8], pos: usize) -> Result<(u16, u16, usize), WireError> {
    let (_, pos) = read_name(msg, pos)?;
    let rtype = u16_at(msg, pos)?;
    let class = u16_at(msg, pos + 2)?;
    let rdlen = usize::from(u16_at(msg, pos + 8)?);
    let end = pos + 10 + rdlen;
    if end > msg.len() {
        return Err(WireError::Truncated);
    }
    Ok((rtype, class, end))
}

/// Offset after the question section.
fn skip_questions(msg: &[u8], qdcount: u16) -> Result<usize, WireError> {
    let mut pos = HEADER_LEN;
    for _ in 0..qdcount {
        let (_, p) = read_name(msg, pos)?;
        pos = p + 4;
        if pos > msg.len() {
            return Err(WireError::Truncated);
        }
    }
    Ok(pos)
}

/// Parses a query: header, first question, EDNS0 size.
pub fn parse_query(msg: &[u8]) -> Result<Query, WireError> {
    if msg.len() < HEADER_LEN {
        return Err(WireError::Short(msg.len()));
    }
    let id = u16_at(msg, 0)?;
    let flags = u16_at(msg, 2)?;
    let qdcount = u16_at(msg, 4)?;
    let counts = [u16_at(msg, 6)?, u16_at(msg, 8)?, u16_at(msg, 10)?];
    let mut q = Query {
        id,
        flags,
        qdcount,
        labels: Vec::new(),
        name: String::new(),
        qtype: 0,
        qclass: 0,
        edns_udp_size: None,
    };
    if qdcount == 0 {
        return Ok(q);
    }
    let (labels, pos) = read_name(msg, HEADER_LEN)?;
    q.name = name_text(&labels);
    q.labels = labels;
    q.qtype = u16_at(msg, pos)?;
    q.qclass = u16_at(msg, pos + 2)?;
    // The OPT record is in the additional section; a query rarely has anything before it.
    let mut pos = skip_questions(msg, qdcount)?;
    for (section, count) in counts.into_iter().enumerate() {
        for _ in 0..count {
            let (rtype, class, next) = skip_record(msg, pos)?;
            if section == 2 && rtype == TYPE_OPT {
                q.edns_udp_size = Some(class);
            }
            pos = next;
        }
    }
    Ok(q)
}

/// Answer data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// target, dotted with a trailing `.`
    Cname(String),
}

/// One answer record (class IN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// owner name, dotted with a trailing `.`
    pub name: String,
    pub ttl: u32,
    pub data: RData,
}

struct Writer {
    out: Vec<u8>,
    names: HashMap<String, u16>,
}

impl Writer {
    fn labels(&mut self, labels: &[Vec<u8>]) {
        for (i, label) in labels.iter().enumerate() {
            let suffix = name_text(&labels[i..]);
            if let Some(&ptr) = self.names.get(&suffix) {
                self.out.extend_from_slice(&(0xC000 | ptr).to_be_bytes());
                return;
            }
            if let Ok(off) = u16::try_from(self.out.len())
                && off < 0x3FFF
            {
                self.names.insert(suffix, off);
            }
            // Labels come from a parsed name or from text split on dots: at most 63 bytes is
            // checked where text is turned into labels.
            self.out.push(u8::try_from(label.len()).unwrap_or(63));
            self.out.extend_from_slice(label);
        }
        self.out.push(0);
    }

    fn name(&mut self, dotted: &str) {
        self.labels(&text_labels(dotted));
    }

    fn record(&mut self, r: &Record) {
        self.name(&r.name);
        let (rtype, rdata): (u16, Option<Vec<u8>>) = match &r.data {
            RData::A(ip) => (TYPE_A, Some(ip.octets().to_vec())),
            RData::Aaaa(ip) => (TYPE_AAAA, Some(ip.octets().to_vec())),
            RData::Cname(_) => (TYPE_CNAME, None),
        };
        self.out.extend_from_slice(&rtype.to_be_bytes());
        self.out.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.out.extend_from_slice(&r.ttl.to_be_bytes());
        match (rdata, &r.data) {
            (Some(bytes), _) => {
                self.out
                    .extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(0).to_be_bytes());
                self.out.extend_from_slice(&bytes);
            }
            (None, RData::Cname(target)) => {
                let len_at = self.out.len();
                self.out.extend_from_slice(&[0, 0]);
                self.name(target);
                let len = u16::try_from(self.out.len() - len_at - 2).unwrap_or(0);
                self.out[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
            }
            (None, _) => {}
        }
    }
}

/// Labels of dotted text (`\DDD` escapes decoded); labels longer than 63 bytes are cut.
fn text_labels(dotted: &str) -> Vec<Vec<u8>> {
    let mut labels = Vec::new();
    for part in dotted.trim_end_matches('.').split('.') {
        if part.is_empty() {
            continue;
        }
        let bytes = part.as_bytes();
        let mut label = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'\\'
                && let Some(d) = bytes.get(i + 1..i + 4)
                && let Ok(v) = std::str::from_utf8(d).unwrap_or("x").parse::<u8>()
            {
                label.push(v);
                i += 4;
                continue;
            }
            label.push(bytes[i]);
            i += 1;
        }
        label.truncate(63);
        labels.push(label);
    }
    labels
}

/// A reply to `q`: its question echoed, `answers` as fit in `max_size` (TC set when some did
/// not), header flags as miekg/dns `SetReply` makes them (opcode, RD and CD copied).
pub fn reply(
    q: &Query,
    rcode: u16,
    authoritative: bool,
    answers: &[Record],
    max_size: usize,
) -> Vec<u8> {
    let mut flags = FLAG_QR | (q.flags & (MASK_OPCODE | FLAG_RD | FLAG_CD)) | (rcode & 0xF);
    if authoritative {
        flags |= FLAG_AA;
    }
    let qd: u16 = if q.qdcount > 0 { 1 } else { 0 };
    let mut w = Writer {
        out: Vec::with_capacity(512),
        names: HashMap::new(),
    };
    w.out.extend_from_slice(&q.id.to_be_bytes());
    w.out.extend_from_slice(&flags.to_be_bytes());
    w.out.extend_from_slice(&qd.to_be_bytes());
    w.out.extend_from_slice(&[0; 6]);
    if qd == 1 {
        w.labels(&q.labels.clone());
        w.out.extend_from_slice(&q.qtype.to_be_bytes());
        w.out.extend_from_slice(&q.qclass.to_be_bytes());
    }
    let mut count: u16 = 0;
    for r in answers {
        let (len, names) = (w.out.len(), w.names.clone());
        w.record(r);
        if w.out.len() > max_size {
            w.out.truncate(len);
            w.names = names;
            flags |= FLAG_TC;
            w.out[2..4].copy_from_slice(&flags.to_be_bytes());
            break;
        }
        count += 1;
    }
    w.out[6..8].copy_from_slice(&count.to_be_bytes());
    w.out
}

/// An upstream reply cut to `max_size`: when larger, only the header (TC set, no records) and
/// the question section are kept.
pub fn truncate_reply(resp: Vec<u8>, max_size: usize) -> Result<Vec<u8>, WireError> {
    if resp.len() <= max_size {
        return Ok(resp);
    }
    if resp.len() < HEADER_LEN {
        return Err(WireError::Short(resp.len()));
    }
    let qdcount = u16_at(&resp, 4)?;
    let end = skip_questions(&resp, qdcount)?;
    let mut out = resp[..end].to_vec();
    out[2] |= (FLAG_TC >> 8) as u8;
    out[6..12].fill(0);
    Ok(out)
}

/// The id of a message (for matching an upstream reply to the query).
pub fn message_id(msg: &[u8]) -> Option<u16> {
    u16_at(msg, 0).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A query as a stub resolver builds it, optionally with an OPT record.
    pub(crate) fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&0x0100u16.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&u16::from(edns.is_some()).to_be_bytes());
        for l in text_labels(name) {
            m.push(l.len() as u8);
            m.extend_from_slice(&l);
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some(size) = edns {
            m.push(0);
            m.extend_from_slice(&TYPE_OPT.to_be_bytes());
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        m
    }

    #[test]
    fn parses_question_and_edns() {
        let q = parse_query(&query(7, "Foo.Bar.", TYPE_AAAA, Some(1232))).unwrap();
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype, q.edns_udp_size),
            (7, "foo.bar.", TYPE_AAAA, Some(1232))
        );
        assert_eq!(q.max_reply(false), 1232);
        assert_eq!(q.max_reply(true), MAX_MSG_SIZE);
        let q = parse_query(&query(8, "a.", TYPE_A, None)).unwrap();
        assert_eq!(q.max_reply(false), MIN_UDP_SIZE);
        assert_eq!(parse_query(&[1, 2, 3]).unwrap_err(), WireError::Short(3));
        let mut bad = query(9, "a.b.", TYPE_A, None);
        bad[12] = 60; // label length past the end
        assert!(parse_query(&bad).is_err());
    }

    #[test]
    fn reply_compresses_and_truncates() {
        let q = parse_query(&query(5, "svc.ns.", TYPE_A, None)).unwrap();
        let answers: Vec<Record> = (0..40)
            .map(|i| Record {
                name: "svc.ns.".into(),
                ttl: 30,
                data: RData::A(Ipv4Addr::new(10, 0, 0, i)),
            })
            .collect();
        let full = reply(&q, RCODE_NOERROR, true, &answers[..2], MAX_MSG_SIZE);
        // header 12 + question 12 + 2 × (pointer 2 + 10 + 4)
        assert_eq!(full.len(), 12 + 12 + 2 * 16);
        assert_eq!(u16_at(&full, 6).unwrap(), 2);
        assert_eq!(full[2] & 0x04, 0x04, "AA");
        let cut = reply(&q, RCODE_NOERROR, true, &answers, MIN_UDP_SIZE);
        assert!(cut.len() <= MIN_UDP_SIZE);
        assert_eq!(cut[2] & 0x02, 0x02, "TC");
        assert_eq!(usize::from(u16_at(&cut, 6).unwrap()), (512 - 24) / 16);
    }
}
