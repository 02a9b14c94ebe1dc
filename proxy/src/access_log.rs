// SPDX-License-Identifier: Apache-2.0
//! Access logs (`envoy.access_loggers.stdout` / `envoy.access_loggers.file`) with Envoy's default text
//! format, `text_format_source` and `json_format`, for the command operators listed in [`Op`].

// istiod still emits deprecated fields (append, exact_match, total_weight…): we translate them on purpose.
#![allow(deprecated)]

use crate::xds::translate::Path;
use envoy_types::pb::envoy::config::accesslog::v3 as al;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::access_loggers::{file::v3 as file, stream::v3 as stream};
use std::io::Write;
use std::sync::Arc;
use std::time::SystemTime;

type Result<T> = std::result::Result<T, crate::xds::translate::TranslateError>;
use crate::xds::translate::TranslateError as TE;

/// Envoy's default format.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// A supported command operator.
#[derive(Debug, Clone)]
pub enum Op {
    /// `%START_TIME%`
    StartTime,
    /// `%REQ(a?b)%` with optional max length
    Req(Vec<String>, Option<usize>),
    /// `%RESP(a)%`
    Resp(Vec<String>, Option<usize>),
    /// `%PROTOCOL%`
    Protocol,
    /// `%RESPONSE_CODE%`
    ResponseCode,
    /// `%RESPONSE_FLAGS%`
    ResponseFlags,
    /// `%BYTES_RECEIVED%`
    BytesReceived,
    /// `%BYTES_SENT%`
    BytesSent,
    /// `%DURATION%`
    Duration,
    /// `%UPSTREAM_HOST%`
    UpstreamHost,
    /// `%UPSTREAM_CLUSTER%`
    UpstreamCluster,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`
    DownstreamRemote,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`
    DownstreamLocal,
    /// `%ROUTE_NAME%`
    RouteName,
    /// `%RESPONSE_CODE_DETAILS%`
    ResponseCodeDetails,
}

/// A piece of a format.
#[derive(Debug, Clone)]
pub enum Token {
    /// literal text
    Lit(String),
    /// an operator
    Op(Op),
}

/// Output format.
#[derive(Debug)]
pub enum Format {
    /// text
    Text(Vec<Token>),
    /// JSON object: key → tokens (a single operator keeps its type, e.g. numbers)
    Json(Vec<(String, Vec<Token>)>),
}

/// Where lines go.
#[derive(Debug)]
pub enum Sink {
    /// standard output
    Stdout,
    /// an append-only file (one `write` per line, so lines never interleave)
    File(std::fs::File),
}

/// One configured access log.
#[derive(Debug)]
pub struct AccessLog {
    /// format
    pub format: Format,
    /// sink
    pub sink: Sink,
}

/// What a log line is made of.
#[derive(Default)]
pub struct Entry<'a> {
    /// request start
    pub start: Option<SystemTime>,
    /// request headers (`:method`, `:path`, `:authority` are resolved through `pseudo`)
    pub req: Option<&'a http::HeaderMap>,
    /// response headers
    pub resp: Option<&'a http::HeaderMap>,
    /// (method, path, authority, protocol)
    pub pseudo: (&'a str, &'a str, &'a str, &'a str),
    /// status (0 = none)
    pub status: u16,
    /// response flags ("-" when empty)
    pub flags: &'a str,
    /// body bytes received
    pub bytes_received: u64,
    /// body bytes sent
    pub bytes_sent: u64,
    /// duration in ms
    pub duration_ms: u64,
    /// upstream host
    pub upstream_host: Option<String>,
    /// cluster
    pub upstream_cluster: Option<&'a str>,
    /// downstream remote
    pub downstream_remote: Option<String>,
    /// downstream local
    pub downstream_local: Option<String>,
    /// route name
    pub route_name: Option<&'a str>,
    /// response code details
    pub details: Option<&'a str>,
}

/// Translates `access_log` entries.
pub fn translate_access_logs(logs: &[al::AccessLog], path: &Path) -> Result<Vec<Arc<AccessLog>>> {
    let mut out = Vec::new();
    for (i, l) in logs.iter().enumerate() {
        let p = path.index(i);
        crate::xds::translate::only_pub(
            l,
            &p,
            &["name", "typed_config"],
            &[("filter", "telemetry issue")],
        )?;
        let Some(al::access_log::ConfigType::TypedConfig(any)) = &l.config_type else {
            return Err(TE {
                path: p.field("typed_config"),
                kind: crate::xds::translate::ErrorKind::Required,
            });
        };
        let tp = p.field("typed_config");
        let (format, sink) = match crate::xds::translate::type_name_pub(&any.type_url) {
            "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog" => {
                let s: stream::StdoutAccessLog = crate::xds::translate::unpack_pub(any, &tp)?;
                crate::xds::translate::only_pub(&s, &tp, &["log_format"], &[])?;
                (
                    log_format(
                        s.access_log_format.as_ref().map(|f| match f {
                            stream::stdout_access_log::AccessLogFormat::LogFormat(l) => l,
                        }),
                        &tp.field("log_format"),
                    )?,
                    Sink::Stdout,
                )
            }
            "envoy.extensions.access_loggers.file.v3.FileAccessLog" => {
                let f: file::FileAccessLog = crate::xds::translate::unpack_pub(any, &tp)?;
                crate::xds::translate::only_pub(
                    &f,
                    &tp,
                    &["path", "log_format", "format"],
                    &[
                        ("json_format", "telemetry issue"),
                        ("typed_json_format", "telemetry issue"),
                    ],
                )?;
                use file::file_access_log::AccessLogFormat as AF;
                let format = match &f.access_log_format {
                    Some(AF::LogFormat(l)) => log_format(Some(l), &tp.field("log_format"))?,
                    Some(AF::Format(s)) => Format::Text(parse_text(s, &tp.field("format"))?),
                    Some(_) => {
                        return Err(TE {
                            path: tp.clone(),
                            kind: crate::xds::translate::ErrorKind::NotYet("telemetry issue"),
                        });
                    }
                    None => Format::Text(parse_text(DEFAULT_FORMAT, &tp)?),
                };
                let sink = if f.path == "/dev/stdout" {
                    Sink::Stdout
                } else {
                    Sink::File(
                        std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&f.path)
                            .map_err(|e| TE {
                                path: tp.field("path"),
                                kind: crate::xds::translate::ErrorKind::Invalid(format!(
                                    "{}: {e}",
                                    f.path
                                )),
                            })?,
                    )
                };
                (format, sink)
            }
            other => {
                return Err(TE {
                    path: tp,
                    kind: crate::xds::translate::ErrorKind::UnknownType(other.to_string()),
                });
            }
        };
        out.push(Arc::new(AccessLog { format, sink }));
    }
    Ok(out)
}

fn log_format(f: Option<&core::SubstitutionFormatString>, path: &Path) -> Result<Format> {
    let Some(f) = f else {
        return Ok(Format::Text(parse_text(DEFAULT_FORMAT, path)?));
    };
    crate::xds::translate::only_pub(
        f,
        path,
        &[
            "text_format_source",
            "json_format",
            "omit_empty_values",
            "content_type",
            "text_format",
        ],
        &[("formatters", "telemetry issue")],
    )?;
    use core::substitution_format_string::Format as F;
    match &f.format {
        Some(F::TextFormat(s)) => Ok(Format::Text(parse_text(s, &path.field("text_format"))?)),
        Some(F::TextFormatSource(ds)) => {
            use core::data_source::Specifier as S;
            match &ds.specifier {
                Some(S::InlineString(s)) => Ok(Format::Text(parse_text(
                    s,
                    &path.field("text_format_source"),
                )?)),
                _ => Err(TE {
                    path: path.field("text_format_source"),
                    kind: crate::xds::translate::ErrorKind::NotSupported,
                }),
            }
        }
        Some(F::JsonFormat(st)) => {
            let mut fields = Vec::new();
            for (k, v) in &st.fields {
                use envoy_types::pb::google::protobuf::value::Kind;
                let Some(Kind::StringValue(s)) = &v.kind else {
                    return Err(TE {
                        path: path.field("json_format").field(k),
                        kind: crate::xds::translate::ErrorKind::NotYet("telemetry issue"),
                    });
                };
                fields.push((
                    k.clone(),
                    parse_text(s, &path.field("json_format").field(k))?,
                ));
            }
            fields.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(Format::Json(fields))
        }
        None => Ok(Format::Text(parse_text(DEFAULT_FORMAT, path)?)),
    }
}

/// Parses a text format into tokens; unknown operators are refused.
pub fn parse_text(s: &str, path: &Path) -> Result<Vec<Token>> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            lit.push('%');
            rest = r;
            continue;
        }
        let Some(end) = rest.find('%') else {
            lit.push('%');
            break;
        };
        let cmd = &rest[..end];
        rest = &rest[end + 1..];
        if !lit.is_empty() {
            out.push(Token::Lit(std::mem::take(&mut lit)));
        }
        out.push(Token::Op(parse_op(cmd).ok_or_else(|| TE {
            path: path.clone(),
            kind: crate::xds::translate::ErrorKind::NotYet(leak_op(cmd)),
        })?));
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        out.push(Token::Lit(lit));
    }
    Ok(out)
}

fn leak_op(_cmd: &str) -> &'static str {
    "this access-log command operator: telemetry issue"
}

fn parse_op(cmd: &str) -> Option<Op> {
    let (name, arg, len) = match cmd.find('(') {
        Some(i) => {
            let close = cmd.rfind(')')?;
            let len = cmd[close + 1..]
                .strip_prefix(':')
                .and_then(|l| l.parse().ok());
            (&cmd[..i], Some(&cmd[i + 1..close]), len)
        }
        None => (cmd, None, None),
    };
    let headers = |a: Option<&str>| -> Option<Vec<String>> {
        Some(a?.split('?').map(|s| s.to_ascii_lowercase()).collect())
    };
    Some(match name {
        "START_TIME" if arg.is_none() => Op::StartTime,
        "REQ" => Op::Req(headers(arg)?, len),
        "RESP" => Op::Resp(headers(arg)?, len),
        "PROTOCOL" => Op::Protocol,
        "RESPONSE_CODE" => Op::ResponseCode,
        "RESPONSE_FLAGS" => Op::ResponseFlags,
        "BYTES_RECEIVED" => Op::BytesReceived,
        "BYTES_SENT" => Op::BytesSent,
        "DURATION" => Op::Duration,
        "UPSTREAM_HOST" => Op::UpstreamHost,
        "UPSTREAM_CLUSTER" => Op::UpstreamCluster,
        "DOWNSTREAM_REMOTE_ADDRESS" => Op::DownstreamRemote,
        "DOWNSTREAM_LOCAL_ADDRESS" => Op::DownstreamLocal,
        "ROUTE_NAME" => Op::RouteName,
        "RESPONSE_CODE_DETAILS" => Op::ResponseCodeDetails,
        _ => return None,
    })
}

impl AccessLog {
    /// Formats and writes one entry.
    pub fn write(&self, e: &Entry<'_>) {
        let mut line = match &self.format {
            Format::Text(tokens) => render(tokens, e),
            Format::Json(fields) => {
                let mut m = serde_json::Map::new();
                for (k, toks) in fields {
                    let v = match toks.as_slice() {
                        [Token::Op(op)] => typed_value(op, e),
                        _ => serde_json::Value::String(render(toks, e)),
                    };
                    m.insert(k.clone(), v);
                }
                let mut s = serde_json::Value::Object(m).to_string();
                s.push('\n');
                s
            }
        };
        if !line.ends_with('\n') && matches!(self.format, Format::Json(_)) {
            line.push('\n');
        }
        let _ = match &self.sink {
            Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
            Sink::File(f) => (&*f).write_all(line.as_bytes()),
        };
    }
}

fn typed_value(op: &Op, e: &Entry<'_>) -> serde_json::Value {
    let num = |n: u64| serde_json::Value::Number(n.into());
    match op {
        Op::ResponseCode => num(u64::from(e.status)),
        Op::BytesReceived => num(e.bytes_received),
        Op::BytesSent => num(e.bytes_sent),
        Op::Duration => num(e.duration_ms),
        // Envoy keeps "-" for empty flags in JSON (other empty values become null).
        Op::ResponseFlags => serde_json::Value::String(e.flags.to_string()),
        _ => {
            let s = render(&[Token::Op(op.clone())], e);
            if s == "-" {
                serde_json::Value::Null
            } else {
                serde_json::Value::String(s)
            }
        }
    }
}

fn render(tokens: &[Token], e: &Entry<'_>) -> String {
    let mut s = String::with_capacity(128);
    for t in tokens {
        match t {
            Token::Lit(l) => s.push_str(l),
            Token::Op(op) => {
                let v: Option<String> = match op {
                    Op::StartTime => e.start.map(format_time),
                    Op::Req(names, len) => names
                        .iter()
                        .find_map(|n| req_header(e, n))
                        .map(|v| truncate(v, *len)),
                    Op::Resp(names, len) => names
                        .iter()
                        .find_map(|n| {
                            e.resp
                                .and_then(|h| h.get(n.as_str()))
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        })
                        .map(|v| truncate(v, *len)),
                    Op::Protocol => Some(e.pseudo.3.to_string()),
                    Op::ResponseCode => Some(e.status.to_string()),
                    Op::ResponseFlags => Some(e.flags.to_string()),
                    Op::BytesReceived => Some(e.bytes_received.to_string()),
                    Op::BytesSent => Some(e.bytes_sent.to_string()),
                    Op::Duration => Some(e.duration_ms.to_string()),
                    Op::UpstreamHost => e.upstream_host.clone(),
                    Op::UpstreamCluster => e.upstream_cluster.map(str::to_string),
                    Op::DownstreamRemote => e.downstream_remote.clone(),
                    Op::DownstreamLocal => e.downstream_local.clone(),
                    Op::RouteName => e.route_name.map(str::to_string),
                    Op::ResponseCodeDetails => e.details.map(str::to_string),
                };
                s.push_str(v.as_deref().filter(|v| !v.is_empty()).unwrap_or("-"));
            }
        }
    }
    s
}

fn req_header(e: &Entry<'_>, name: &str) -> Option<String> {
    match name {
        ":method" => Some(e.pseudo.0.to_string()),
        ":path" => Some(e.pseudo.1.to_string()),
        ":authority" => Some(e.pseudo.2.to_string()),
        n => e.req?.get(n)?.to_str().ok().map(str::to_string),
    }
}

fn truncate(mut v: String, len: Option<usize>) -> String {
    if let Some(l) = len
        && v.len() > l
    {
        let mut cut = l;
        while !v.is_char_boundary(cut) {
            cut -= 1;
        }
        v.truncate(cut);
    }
    v
}

/// `%Y-%m-%dT%H:%M:%S.mmmZ` in UTC.
pub fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_format_parses_and_renders() {
        let toks = parse_text(DEFAULT_FORMAT, &Path::root("x")).unwrap();
        let e = Entry {
            pseudo: ("GET", "/a", "h", "HTTP/1.1"),
            status: 404,
            flags: "NR",
            ..Default::default()
        };
        let line = render(&toks, &e);
        assert!(
            line.starts_with(
                "[-] \"GET /a HTTP/1.1\" 404 NR 0 0 0 - \"-\" \"-\" \"-\" \"h\" \"-\""
            ),
            "{line}"
        );
        assert!(parse_text("%NOPE%", &Path::root("x")).is_err());
        assert_eq!(
            format_time(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123)
            ),
            "2023-11-14T22:13:20.123Z"
        );
    }
}
