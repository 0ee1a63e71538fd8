//! The HTTP response a WSGI app produces, framed and sent as mongrel2 replies.
//!
//! mongrel2 writes reply bodies to the client verbatim, so the gateway owns HTTP framing:
//! the status line, `Content-Length` or chunked encoding, `Date`/`Server`, and the 0-length
//! close message whenever the connection must end (mongrel2 never closes on its own).
//! This module is plain Rust; the Python glue is in `wsgi::call`.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

/// How a piece of a response ends it, if it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// More of the response follows.
    Middle,
    /// The response is complete: the connection's next request may be answered.
    Last,
    /// Complete, and the connection is to be closed after it.
    LastThenClose,
}

/// Where the pieces of one response go: the link to the broker, or a vector in tests.
pub trait ReplySink {
    fn send(&self, payload: &[u8], piece: Piece) -> io::Result<()>;
}

/// What the request says about the connection and the body.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFacts {
    pub http10: bool,
    /// HTTP/1.1 with `Connection: close`, or HTTP/1.0 without `keep-alive`.
    pub client_wants_close: bool,
    pub head: bool,
}

impl RequestFacts {
    pub fn new(version: &[u8], connection: Option<&[u8]>, method: &[u8]) -> Self {
        let http10 = version == b"HTTP/1.0";
        let has_token = |token: &[u8]| {
            connection.is_some_and(|value| {
                value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
            })
        };
        RequestFacts {
            http10,
            client_wants_close: if http10 {
                !has_token(b"keep-alive")
            } else {
                has_token(b"close")
            },
            head: method == b"HEAD",
        }
    }
}

/// Why `start_response` refused its arguments.
#[derive(Debug, PartialEq, Eq)]
pub enum StartError {
    /// Called a second time without `exc_info`.
    AlreadyStarted,
    /// Called with `exc_info` after the headers went out: the caller re-raises it.
    HeadersSent,
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
    NoBody,
}

struct Head {
    status: Vec<u8>,
    code: u16,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    content_length: Option<u64>,
    app_close: bool,
    has_date: bool,
    has_server: bool,
}

struct Sent {
    framing: Framing,
    close: bool,
}

/// One response, from `start_response` to the last message.
pub struct ResponseWriter {
    sink: Rc<dyn ReplySink>,
    facts: RequestFacts,
    head: Option<Head>,
    sent: Option<Sent>,
    buf: Vec<u8>,
    finished: bool,
    pub status_code: u16,
    pub body_bytes: u64,
}

pub const SERVER: &str = concat!("wsgid/", env!("CARGO_PKG_VERSION"));

impl ResponseWriter {
    pub fn new(sink: Rc<dyn ReplySink>, facts: RequestFacts) -> Self {
        ResponseWriter {
            sink,
            facts,
            head: None,
            sent: None,
            buf: Vec::with_capacity(1024),
            finished: false,
            status_code: 0,
            body_bytes: 0,
        }
    }

    pub fn started(&self) -> bool {
        self.head.is_some() || self.sent.is_some()
    }

    /// `start_response(status, headers, exc_info)`: validates and stores the head.
    pub fn start(
        &mut self,
        status: Vec<u8>,
        headers: Vec<(Vec<u8>, Vec<u8>)>,
        with_exc_info: bool,
    ) -> Result<(), StartError> {
        if self.sent.is_some() && with_exc_info {
            return Err(StartError::HeadersSent);
        }
        if self.head.is_some() && !with_exc_info {
            return Err(StartError::AlreadyStarted);
        }
        if self.sent.is_some() {
            return Err(StartError::AlreadyStarted);
        }
        let code = parse_status(&status).map_err(StartError::Invalid)?;
        let mut head = Head {
            status,
            code,
            headers: Vec::with_capacity(headers.len()),
            content_length: None,
            app_close: false,
            has_date: false,
            has_server: false,
        };
        for (name, value) in headers {
            check_header(&name, &value).map_err(StartError::Invalid)?;
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = parse_content_length(&value).ok_or_else(|| {
                    StartError::Invalid(format!(
                        "invalid Content-Length {:?}",
                        String::from_utf8_lossy(&value)
                    ))
                })?;
                if head.content_length.is_some_and(|m| m != n) {
                    return Err(StartError::Invalid(
                        "conflicting Content-Length values".into(),
                    ));
                }
                // Written by `encode_head`, where the status may forbid it.
                head.content_length = Some(n);
                continue;
            } else if HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h)) {
                tracing::debug!(
                    header = %String::from_utf8_lossy(&name),
                    "dropped a hop-by-hop header from the app"
                );
                continue;
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                return Err(StartError::Invalid(
                    "Transfer-Encoding is hop-by-hop: the gateway frames the body (PEP 3333)"
                        .into(),
                ));
            } else if name.eq_ignore_ascii_case(b"connection") {
                head.app_close |= value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                // We write our own Connection header from the decision below.
                continue;
            } else if name.eq_ignore_ascii_case(b"date") {
                head.has_date = true;
            } else if name.eq_ignore_ascii_case(b"server") {
                head.has_server = true;
            }
            head.headers.push((name, value));
        }
        self.head = Some(head);
        Ok(())
    }

    /// A body chunk: goes out at once (streaming). The first non-empty one carries the head.
    pub fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.buf.clear();
        if self.sent.is_none() {
            self.encode_head(None)?;
        }
        self.encode_chunk(chunk);
        // Nothing to send (HEAD, 204/304, a Content-Length already met): an empty payload
        // would tell mongrel2 to close the connection.
        if self.buf.is_empty() {
            return Ok(());
        }
        self.flush_buf()
    }

    /// The whole body in one piece (a one-element iterable): head and body in one message,
    /// with a Content-Length the app did not have to compute.
    pub fn write_all_and_finish(&mut self, body: &[u8]) -> io::Result<()> {
        if self.sent.is_some() {
            self.write(body)?;
            return self.finish();
        }
        self.buf.clear();
        self.encode_head(Some(body.len() as u64))?;
        self.encode_chunk(body);
        self.finish_into_buf();
        self.send_last()
    }

    /// End of the body: the head if nothing was written, the last chunk, and the end of the
    /// response (with the connection's close when it must end).
    pub fn finish(&mut self) -> io::Result<()> {
        self.buf.clear();
        if self.sent.is_none() {
            self.encode_head(Some(0))?;
        }
        self.finish_into_buf();
        self.send_last()
    }

    /// The app failed. Before the head went out the client gets a plain 500; after, the
    /// response cannot be completed honestly, so the connection is closed.
    pub fn abort(&mut self) -> io::Result<()> {
        if self.finished {
            return Ok(());
        }
        if self.sent.is_none() {
            self.head = None;
            let body = b"Internal Server Error\n";
            self.start(
                b"500 Internal Server Error".to_vec(),
                vec![(b"Content-Type".to_vec(), b"text/plain".to_vec())],
                true,
            )
            .expect("a valid built-in head");
            return self.write_all_and_finish(body);
        }
        self.finished = true;
        self.sink.send(b"", Piece::LastThenClose)
    }

    /// Sends a complete response of our own (400, 413, ...), then closes the connection:
    /// after refusing a request, what else the client sends is not worth reading.
    pub fn reply_error(&mut self, status: &str, body: &str) -> io::Result<()> {
        self.head = None;
        self.start(
            status.as_bytes().to_vec(),
            vec![
                (b"Content-Type".to_vec(), b"text/plain".to_vec()),
                (b"Connection".to_vec(), b"close".to_vec()),
            ],
            true,
        )
        .map_err(|e| io::Error::other(format!("{e:?}")))?;
        self.write_all_and_finish(body.as_bytes())
    }

    fn encode_head(&mut self, known_length: Option<u64>) -> io::Result<()> {
        let head = self
            .head
            .take()
            .ok_or_else(|| io::Error::other("the app sent a body before calling start_response"))?;
        // 1xx (never final here), 204 and 304 have no body and no Content-Length.
        let bodiless_status = head.code < 200 || head.code == 204 || head.code == 304;
        let no_body = self.facts.head || bodiless_status;
        let framing = match (head.content_length, known_length) {
            (Some(n), _) => Framing::Length(n),
            _ if no_body => Framing::NoBody,
            (None, Some(n)) => Framing::Length(n),
            (None, None) if self.facts.http10 => Framing::UntilClose,
            (None, None) => Framing::Chunked,
        };
        let close =
            self.facts.client_wants_close || head.app_close || framing == Framing::UntilClose;
        let out = &mut self.buf;
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(&head.status);
        out.extend_from_slice(b"\r\n");
        for (name, value) in &head.headers {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if !head.has_server {
            out.extend_from_slice(b"Server: ");
            out.extend_from_slice(SERVER.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !head.has_date {
            out.extend_from_slice(b"Date: ");
            with_http_date(|date| out.extend_from_slice(date));
            out.extend_from_slice(b"\r\n");
        }
        // The app's Content-Length stands (for HEAD, that of the GET), except where the
        // status forbids one; ours is added when we know the body's length.
        let length = match (head.content_length, framing) {
            (Some(n), _) if !bodiless_status => Some(n),
            (None, Framing::Length(n)) if !no_body => Some(n),
            _ => None,
        };
        if let Some(n) = length {
            out.extend_from_slice(b"Content-Length: ");
            m2wire::netstring::push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if self.facts.http10 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        self.status_code = head.code;
        self.sent = Some(Sent {
            framing: if no_body { Framing::NoBody } else { framing },
            close,
        });
        Ok(())
    }

    fn encode_chunk(&mut self, chunk: &[u8]) {
        let sent = self.sent.as_mut().expect("head encoded before the body");
        let chunk = match &mut sent.framing {
            Framing::NoBody => return,
            Framing::Length(remaining) => {
                // More than the declared length would corrupt the next response on this
                // connection: cut it, and close at the end.
                let take = (*remaining).min(chunk.len() as u64);
                *remaining -= take;
                if take < chunk.len() as u64 {
                    tracing::warn!("response body longer than its Content-Length; truncated");
                    sent.close = true;
                }
                &chunk[..take as usize]
            }
            _ => chunk,
        };
        self.body_bytes += chunk.len() as u64;
        if chunk.is_empty() {
            return;
        }
        if sent.framing == Framing::Chunked {
            self.buf
                .extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            self.buf.extend_from_slice(chunk);
            self.buf.extend_from_slice(b"\r\n");
        } else {
            self.buf.extend_from_slice(chunk);
        }
    }

    fn finish_into_buf(&mut self) {
        self.finished = true;
        let sent = self.sent.as_mut().expect("head encoded before finishing");
        match sent.framing {
            Framing::Chunked => self.buf.extend_from_slice(b"0\r\n\r\n"),
            Framing::Length(remaining) if remaining > 0 => {
                tracing::warn!(
                    missing = remaining,
                    "response body shorter than its Content-Length; closing the connection"
                );
                sent.close = true;
            }
            _ => {}
        }
    }

    /// Sends what is in the buffer as the response's last piece.
    fn send_last(&mut self) -> io::Result<()> {
        let piece = if self.sent.as_ref().is_some_and(|s| s.close) {
            Piece::LastThenClose
        } else {
            Piece::Last
        };
        self.sink.send(&self.buf, piece)
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        self.sink.send(&self.buf, Piece::Middle)
    }
}

/// `NNN reason`: three digits, a space, latin-1 text without CR/LF.
fn parse_status(status: &[u8]) -> Result<u16, String> {
    let valid = status.len() >= 4
        && status[..3].iter().all(u8::is_ascii_digit)
        && status[3] == b' '
        && !status.iter().any(|&b| b == b'\r' || b == b'\n');
    if !valid {
        return Err(format!(
            "invalid status {:?}: expected \"NNN Reason\"",
            String::from_utf8_lossy(status)
        ));
    }
    let code = status[..3]
        .iter()
        .fold(0, |n, &d| n * 10 + u16::from(d - b'0'));
    // 1xx are interim responses the gateway does not relay; a final one must be 200-599.
    if !(200..=599).contains(&code) {
        return Err(format!(
            "status {code}: a response's status must be 200-599"
        ));
    }
    Ok(code)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that only the gateway may set.
const HOP_BY_HOP: [&[u8]; 5] = [
    b"keep-alive",
    b"upgrade",
    b"te",
    b"trailer",
    b"proxy-connection",
];

/// A Content-Length value: digits only (no sign, no inner spaces), surrounding spaces allowed.
fn parse_content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn check_header(name: &[u8], value: &[u8]) -> Result<(), String> {
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if name.is_empty() || !name.iter().all(token) {
        return Err(format!(
            "invalid header name {:?}",
            String::from_utf8_lossy(name)
        ));
    }
    // Field values: visible characters, spaces and tabs (RFC 9110 §5.5).
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(format!(
            "header {:?} has a control character in its value",
            String::from_utf8_lossy(name)
        ));
    }
    Ok(())
}

thread_local! {
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
}

/// The IMF-fixdate of the current second, formatted once per second.
fn with_http_date(f: impl FnOnce(&[u8])) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cache = cell.borrow_mut();
        if cache.0 != secs {
            let text = httpdate::fmt_http_date(now);
            cache.1.copy_from_slice(&text.as_bytes()[..29]);
            cache.0 = secs;
        }
        f(&cache.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records what mongrel2 would get: each piece with data as a message, and a close as
    /// an empty message after it.
    #[derive(Default)]
    struct Recorder(RefCell<Vec<Vec<u8>>>);
    impl ReplySink for Recorder {
        fn send(&self, payload: &[u8], piece: Piece) -> io::Result<()> {
            let mut msgs = self.0.borrow_mut();
            if !payload.is_empty() {
                msgs.push([b"u 1:7, ", payload].concat());
            }
            if piece == Piece::LastThenClose {
                msgs.push(b"u 1:7, ".to_vec());
            }
            Ok(())
        }
    }

    fn writer(facts: RequestFacts) -> (Rc<Recorder>, ResponseWriter) {
        let rec = Rc::new(Recorder::default());
        let w = ResponseWriter::new(rec.clone(), facts);
        (rec, w)
    }

    fn texts(rec: &Recorder) -> Vec<String> {
        rec.0
            .borrow()
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect()
    }

    fn ok_head(w: &mut ResponseWriter) {
        w.start(
            b"200 OK".to_vec(),
            vec![(b"Content-Type".to_vec(), b"text/plain".to_vec())],
            false,
        )
        .unwrap();
    }

    #[test]
    fn single_chunk_is_one_message_with_length() {
        let (rec, mut w) = writer(RequestFacts::new(b"HTTP/1.1", None, b"GET"));
        ok_head(&mut w);
        w.write_all_and_finish(b"hello").unwrap();
        let msgs = texts(&rec);
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0]
            .starts_with("u 1:7, HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nServer: wsgid/"));
        assert!(msgs[0].contains("\r\nContent-Length: 5\r\n\r\nhello"));
        assert!(msgs[0].contains("\r\nDate: "));
    }

    #[test]
    fn streams_chunked_on_http11() {
        let (rec, mut w) = writer(RequestFacts::new(b"HTTP/1.1", None, b"GET"));
        ok_head(&mut w);
        w.write(b"ab").unwrap();
        w.write(b"").unwrap();
        w.write(b"cde").unwrap();
        w.finish().unwrap();
        let msgs = texts(&rec);
        assert_eq!(msgs.len(), 3);
        assert!(msgs[0].contains("Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n"));
        assert_eq!(msgs[1], "u 1:7, 3\r\ncde\r\n");
        assert_eq!(msgs[2], "u 1:7, 0\r\n\r\n");
    }

    #[test]
    fn http10_without_length_closes() {
        let (rec, mut w) = writer(RequestFacts::new(b"HTTP/1.0", None, b"GET"));
        ok_head(&mut w);
        w.write(b"ab").unwrap();
        w.finish().unwrap();
        let msgs = texts(&rec);
        assert!(msgs[0].contains("Connection: close\r\n\r\nab"));
        assert_eq!(msgs.last().unwrap(), "u 1:7, ");
    }

    #[test]
    fn http10_keep_alive_with_length_stays_open() {
        let (rec, mut w) = writer(RequestFacts::new(b"HTTP/1.0", Some(b"Keep-Alive"), b"GET"));
        ok_head(&mut w);
        w.write_all_and_finish(b"ab").unwrap();
        let msgs = texts(&rec);
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].contains("Connection: keep-alive\r\n"));
    }

    #[test]
    fn connection_close_request_gets_close_message() {
        let (rec, mut w) = writer(RequestFacts::new(b"HTTP/1.1", Some(b"close"), b"GET"));
        ok_head(&mut w);
        w.write_all_and_finish(b"ab").unwrap();
        assert_eq!(texts(&rec).len(), 2);
    }

    #[test]
    fn streamed_head_sends_no_empty_message() {
        let (rec, mut w) = writer(RequestFacts::new(b"HTTP/1.1", None, b"HEAD"));
        ok_head(&mut w);
        for _ in 0..3 {
            w.write(b"chunk").unwrap();
        }
        w.finish().unwrap();
        let msgs = texts(&rec);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
    }

    #[test]
    fn head_sends_no_body() {
        let (rec, mut w) = writer(RequestFacts::new(b"HTTP/1.1", None, b"HEAD"));
        ok_head(&mut w);
        w.write(b"body").unwrap();
        w.finish().unwrap();
        let msgs = texts(&rec);
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].ends_with("\r\n\r\n"));
        assert!(!msgs[0].contains("chunked"));
    }

    #[test]
    fn start_response_rules() {
        let (_, mut w) = writer(RequestFacts::default());
        assert!(matches!(
            w.start(b"OK".to_vec(), vec![], false),
            Err(StartError::Invalid(_))
        ));
        assert!(matches!(
            w.start(b"200 OK\r\nX: y".to_vec(), vec![], false),
            Err(StartError::Invalid(_))
        ));
        assert!(matches!(
            w.start(
                b"200 OK".to_vec(),
                vec![(b"X".to_vec(), b"a\nb".to_vec())],
                false
            ),
            Err(StartError::Invalid(_))
        ));
        assert!(matches!(
            w.start(
                b"200 OK".to_vec(),
                vec![(b"Bad Name".to_vec(), b"v".to_vec())],
                false
            ),
            Err(StartError::Invalid(_))
        ));
        ok_head(&mut w);
        assert_eq!(
            w.start(b"200 OK".to_vec(), vec![], false),
            Err(StartError::AlreadyStarted)
        );
        assert_eq!(w.start(b"500 Oops".to_vec(), vec![], true), Ok(()));
        w.write(b"x").unwrap();
        assert_eq!(
            w.start(b"500 Oops".to_vec(), vec![], true),
            Err(StartError::HeadersSent)
        );
    }

    #[test]
    fn abort_before_head_is_500_after_head_is_close() {
        let (rec, mut w) = writer(RequestFacts::default());
        ok_head(&mut w);
        w.abort().unwrap();
        assert!(texts(&rec)[0].contains("HTTP/1.1 500 Internal Server Error"));
        let (rec, mut w) = writer(RequestFacts::default());
        ok_head(&mut w);
        w.write(b"partial").unwrap();
        w.abort().unwrap();
        assert_eq!(texts(&rec).last().unwrap(), "u 1:7, ");
    }

    #[test]
    fn body_longer_than_content_length_is_cut_and_closed() {
        let (rec, mut w) = writer(RequestFacts::default());
        w.start(
            b"200 OK".to_vec(),
            vec![(b"Content-Length".to_vec(), b"3".to_vec())],
            false,
        )
        .unwrap();
        w.write(b"abcdef").unwrap();
        w.finish().unwrap();
        let msgs = texts(&rec);
        assert!(msgs[0].ends_with("\r\n\r\nabc"));
        assert_eq!(msgs.last().unwrap(), "u 1:7, ");
    }

    #[test]
    fn statuses_outside_200_599_are_refused() {
        for status in [
            &b"099 Odd"[..],
            b"100 Continue",
            b"101 Switching",
            b"600 Big",
        ] {
            let (_, mut w) = writer(RequestFacts::default());
            assert!(matches!(
                w.start(status.to_vec(), vec![], false),
                Err(StartError::Invalid(_))
            ));
        }
    }

    #[test]
    fn header_values_with_controls_and_bad_lengths_are_refused() {
        let start = |headers: Vec<(&[u8], &[u8])>| {
            let (_, mut w) = writer(RequestFacts::default());
            let headers = headers
                .into_iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            w.start(b"200 OK".to_vec(), headers, false)
        };
        assert!(start(vec![(b"X", b"a\x01b")]).is_err());
        assert!(start(vec![(b"X", b"a\x7fb")]).is_err());
        assert!(start(vec![(b"X", b"a\tb")]).is_ok());
        assert!(start(vec![(b"Content-Length", b"+5")]).is_err());
        assert!(start(vec![(b"Content-Length", b"5 5")]).is_err());
        assert!(start(vec![(b"Content-Length", b"")]).is_err());
        assert!(start(vec![(b"Content-Length", b"5"), (b"Content-Length", b"86")]).is_err());
        assert!(start(vec![(b"Content-Length", b"5"), (b"Content-Length", b" 5")]).is_ok());
    }

    #[test]
    fn no_content_length_on_204_304_and_no_hop_by_hop_headers() {
        for status in [&b"204 No Content"[..], b"304 Not Modified"] {
            let (rec, mut w) = writer(RequestFacts::default());
            let headers = vec![
                (b"Content-Length".to_vec(), b"10".to_vec()),
                (b"Keep-Alive".to_vec(), b"timeout=5".to_vec()),
                (b"Upgrade".to_vec(), b"h2c".to_vec()),
                (b"TE".to_vec(), b"trailers".to_vec()),
            ];
            w.start(status.to_vec(), headers, false).unwrap();
            w.finish().unwrap();
            let msg = texts(&rec).concat().to_ascii_lowercase();
            assert!(!msg.contains("content-length"), "{msg}");
            assert!(
                !msg.contains("keep-alive") && !msg.contains("upgrade") && !msg.contains("\r\nte:")
            );
        }
        // HEAD keeps the app's length (that of the GET).
        let (rec, mut w) = writer(RequestFacts::new(b"HTTP/1.1", None, b"HEAD"));
        w.start(
            b"200 OK".to_vec(),
            vec![(b"Content-Length".to_vec(), b"10".to_vec())],
            false,
        )
        .unwrap();
        w.finish().unwrap();
        assert_eq!(
            texts(&rec)
                .concat()
                .matches("Content-Length: 10\r\n")
                .count(),
            1
        );
    }
}
