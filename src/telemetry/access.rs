//! The access log: one line per request on the `keygate::access` target.
//!
//! The line is on every request's path, so it is written without `tracing`'s per-field
//! formatting machinery: [`log`] builds the line by hand, in the same layout the rest of the
//! log uses (tracing-subscriber's full text format or its JSON object), and hands it to the
//! batched writer. Whether it is written at all is still `tracing`'s decision (`RUST_LOG`,
//! `log.level`), asked once per request through the callsite's cached interest. On a terminal
//! (ANSI colours) the line goes through `tracing` itself, so it looks like its neighbours.

use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use super::batch;

/// The target the lines are logged under.
pub const TARGET: &str = "keygate::access";

/// How access lines are written, chosen once by [`super::init`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Through a `tracing` event (coloured terminal output, or no subscriber of keygate's).
    Tracing,
    /// tracing-subscriber's full text layout, written directly.
    Text,
    /// tracing-subscriber's JSON layout, written directly.
    Json,
}

static FORMAT: OnceLock<Format> = OnceLock::new();

/// Set the format; the first call wins (tests install the subscriber once per process).
pub fn set_format(format: Format) {
    let _ = FORMAT.set(format);
}

fn format() -> Format {
    FORMAT.get().copied().unwrap_or(Format::Tracing)
}

/// One request, as the access log records it. No query string, token or key is ever here.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    /// The path without its query.
    pub path: &'a str,
    /// 0 when no response was written.
    pub status: u16,
    pub route: &'a str,
    pub duration_us: u64,
    pub client_ip: Option<IpAddr>,
    pub user: Option<&'a str>,
    pub token_kind: Option<&'a str>,
    pub denied: Option<&'a str>,
    pub error: Option<&'a str>,
}

/// Write the access line for one request, if the `keygate::access` target is enabled.
pub fn log(entry: &Entry<'_>) {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    let format = format();
    if format == Format::Tracing {
        log_event(entry);
        return;
    }
    thread_local! {
        static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    }
    LINE.with(|line| {
        // Re-entered only if formatting itself logged, which it does not; skip rather than panic.
        let Ok(mut line) = line.try_borrow_mut() else {
            return;
        };
        line.clear();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        match format {
            Format::Json => write_json(&mut line, now.as_secs(), now.subsec_micros(), entry),
            _ => write_text(&mut line, now.as_secs(), now.subsec_micros(), entry),
        }
        batch::append(&line, false);
    });
}

fn log_event(e: &Entry<'_>) {
    tracing::info!(
        target: TARGET,
        request_id = e.request_id,
        method = e.method,
        path = e.path,
        status = e.status,
        route = e.route,
        duration_ms = e.duration_us as f64 / 1000.0,
        client_ip = e.client_ip.map(tracing::field::display),
        user = e.user,
        token_kind = e.token_kind,
        denied = e.denied,
        error = e.error,
        "request"
    );
}

/// `2026-11-24T10:11:12` for a Unix second, cached per thread for the current second.
fn write_timestamp(out: &mut Vec<u8>, secs: u64, micros: u32) {
    thread_local! {
        static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
    }
    SECOND.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.0 != secs {
            cell.1 = civil_time(secs);
            cell.0 = secs;
        }
        out.extend_from_slice(&cell.1);
    });
    out.push(b'.');
    let mut frac = [b'0'; 6];
    let mut n = micros.min(999_999);
    for d in frac.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&frac);
    out.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) for a Unix second.
fn civil_time(secs: u64) -> [u8; 19] {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut out = [0u8; 19];
    let mut w = &mut out[..];
    // A 19-byte buffer holds any four-digit year; later years are not a concern.
    let _ = write!(
        w,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    out
}

fn write_uint(out: &mut Vec<u8>, n: impl itoa::Integer) {
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(buf.format(n).as_bytes());
}

/// Milliseconds with microsecond precision: `12.345`.
fn write_millis(out: &mut Vec<u8>, micros: u64) {
    write_uint(out, micros / 1000);
    out.push(b'.');
    let frac = micros % 1000;
    out.extend_from_slice(&[
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_uint(out, octet);
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Bytes a text value may hold and still be written bare: visible ASCII but `"`, `\\` and `=`.
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x21;
    while b < 0x7f {
        t[b] = !matches!(b as u8, b'"' | b'\\' | b'=');
        b += 1;
    }
    t
};

/// Text values are written bare when they are plain, quoted and escaped otherwise.
fn write_text_value(out: &mut Vec<u8>, value: &str) {
    let plain = !value.is_empty() && value.bytes().all(|b| PLAIN[usize::from(b)]);
    if plain {
        out.extend_from_slice(value.as_bytes());
    } else {
        let _ = write!(out, "{value:?}");
    }
}

/// One field's value, as the two layouts write it.
enum Value<'a> {
    Str(&'a str),
    Uint(u64),
    Millis(u64),
    Ip(IpAddr),
}

impl Entry<'_> {
    /// Hand each field to `f` in log order, those that do not apply left out.
    fn each_field(&self, mut f: impl FnMut(&'static str, Value<'_>)) {
        f("request_id", Value::Str(self.request_id));
        f("method", Value::Str(self.method));
        f("path", Value::Str(self.path));
        f("status", Value::Uint(u64::from(self.status)));
        f("route", Value::Str(self.route));
        f("duration_ms", Value::Millis(self.duration_us));
        if let Some(ip) = self.client_ip {
            f("client_ip", Value::Ip(ip));
        }
        let optional = [
            ("user", self.user),
            ("token_kind", self.token_kind),
            ("denied", self.denied),
            ("error", self.error),
        ];
        for (name, value) in optional {
            if let Some(v) = value {
                f(name, Value::Str(v));
            }
        }
    }
}

/// `name=value` pairs after the message, as tracing-subscriber's full format writes them.
fn write_text(out: &mut Vec<u8>, secs: u64, micros: u32, e: &Entry<'_>) {
    out.reserve(256 + e.path.len() + e.user.map_or(0, str::len));
    write_timestamp(out, secs, micros);
    out.extend_from_slice(b"  INFO ");
    out.extend_from_slice(TARGET.as_bytes());
    out.extend_from_slice(b": request");
    e.each_field(|name, value| {
        out.push(b' ');
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        match value {
            Value::Str(v) => write_text_value(out, v),
            Value::Uint(n) => write_uint(out, n),
            Value::Millis(us) => write_millis(out, us),
            Value::Ip(ip) => write_ip(out, ip),
        }
    });
    out.push(b'\n');
}

fn write_json_str(out: &mut Vec<u8>, value: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// One object per line, fields under `fields`, as tracing-subscriber's JSON format writes it.
fn write_json(out: &mut Vec<u8>, secs: u64, micros: u32, e: &Entry<'_>) {
    out.reserve(320 + e.path.len() + e.user.map_or(0, str::len));
    out.extend_from_slice(b"{\"timestamp\":\"");
    write_timestamp(out, secs, micros);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\"");
    e.each_field(|name, value| {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        match value {
            Value::Str(v) => write_json_str(out, v),
            Value::Uint(n) => write_uint(out, n),
            Value::Millis(us) => write_millis(out, us),
            Value::Ip(ip) => {
                out.push(b'"');
                write_ip(out, ip);
                out.push(b'"');
            }
        }
    });
    out.extend_from_slice(b"},\"target\":\"");
    out.extend_from_slice(TARGET.as_bytes());
    out.extend_from_slice(b"\"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>() -> Entry<'a> {
        Entry {
            request_id: "b7e0c6a2-1f3d-4c55-9a8e-0d2f6b1c9e41",
            method: "POST",
            path: "/mcp",
            status: 200,
            route: "proxied",
            duration_us: 1_234_567,
            client_ip: Some("10.1.2.3".parse().unwrap()),
            user: Some("user_2abc"),
            token_kind: Some("oauth_access"),
            denied: None,
            error: None,
        }
    }

    #[test]
    fn the_text_line_matches_the_layout_of_the_rest_of_the_log() {
        let mut out = Vec::new();
        // 2026-11-24T10:11:12Z
        write_text(&mut out, 1_795_515_072, 42, &entry());
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            "2026-11-24T10:11:12.000042Z  INFO keygate::access: request \
             request_id=b7e0c6a2-1f3d-4c55-9a8e-0d2f6b1c9e41 method=POST path=/mcp status=200 \
             route=proxied duration_ms=1234.567 client_ip=10.1.2.3 user=user_2abc \
             token_kind=oauth_access\n"
        );
    }

    #[test]
    fn text_values_that_are_not_plain_are_quoted_and_escaped() {
        let mut e = entry();
        e.path = "/a=\"b\"";
        e.user = Some("");
        e.denied = Some("rate_limited");
        e.client_ip = Some("::1".parse().unwrap());
        let mut out = Vec::new();
        write_text(&mut out, 0, 999_999, &e);
        let line = String::from_utf8(out).unwrap();
        assert!(line.starts_with("1970-01-01T00:00:00.999999Z"), "{line}");
        assert!(line.contains(r#" path="/a=\"b\"" "#), "{line}");
        assert!(line.contains(r#" user="" "#), "{line}");
        assert!(line.contains(" client_ip=::1 "), "{line}");
        assert!(line.contains(" denied=rate_limited\n"), "{line}");
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn the_json_line_is_one_object_in_tracing_subscribers_shape() {
        let mut e = entry();
        e.user = Some("we\"ird\nuser");
        e.error = Some("ConnectRefused");
        e.duration_us = 7;
        let mut out = Vec::new();
        write_json(&mut out, 1_795_515_072, 500_000, &e);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["timestamp"], "2026-11-24T10:11:12.500000Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "keygate::access");
        let f = &v["fields"];
        assert_eq!(f["message"], "request");
        assert_eq!(f["request_id"], e.request_id);
        assert_eq!(f["method"], "POST");
        assert_eq!(f["path"], "/mcp");
        assert_eq!(f["status"], 200);
        assert_eq!(f["route"], "proxied");
        assert_eq!(f["duration_ms"], 0.007);
        assert_eq!(f["client_ip"], "10.1.2.3");
        assert_eq!(f["user"], "we\"ird\nuser");
        assert_eq!(f["token_kind"], "oauth_access");
        assert_eq!(f["error"], "ConnectRefused");
        assert!(f.get("denied").is_none());
    }

    #[test]
    fn a_plain_byte_is_visible_ascii_but_a_quote_a_backslash_or_an_equals_sign() {
        for b in 0..=u8::MAX {
            let expected = b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'=');
            assert_eq!(PLAIN[usize::from(b)], expected, "byte {b:#04x}");
        }
    }

    #[test]
    fn the_cached_second_changes_with_the_clock() {
        let mut a = Vec::new();
        write_timestamp(&mut a, 1_795_515_072, 0);
        let mut b = Vec::new();
        write_timestamp(&mut b, 1_795_515_073, 0);
        assert_eq!(a, b"2026-11-24T10:11:12.000000Z");
        assert_eq!(b, b"2026-11-24T10:11:13.000000Z");
    }
}
