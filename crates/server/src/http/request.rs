//! Request heads, parsed strictly: whatever two parsers could read differently (the trick
//! behind request smuggling) is refused with 400, and the connection is closed.
//!
//! httparse does the tokenizing (request line, header syntax, bare CR, NUL, obs-fold); the
//! rules on top are RFC 9112's for framing: one well-formed `Content-Length`, or
//! `Transfer-Encoding: chunked` alone and last, never both; HTTP/1.1 needs one `Host`.

use std::ops::Range;

use super::Status;

/// Limits from mongrel2's settings.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// `limits.buffer_size`: the largest request head.
    pub max_head: usize,
    /// `limits.header_count`.
    pub max_headers: usize,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

/// A parsed head. It owns a copy of its bytes, with header names lower-cased in place;
/// the fields are ranges into it, so parsing allocates twice.
#[derive(Debug, Clone)]
pub struct Head {
    bytes: Vec<u8>,
    method: Range<usize>,
    /// Path part of the target (origin-form; absolute-form is reduced to its path).
    path: Range<usize>,
    query: Option<Range<usize>>,
    fragment: Option<Range<usize>>,
    /// The target minus the fragment, as mongrel2's URI.
    uri: Range<usize>,
    /// The authority of an absolute-form target: it replaces Host (RFC 9112 §3.2.2).
    authority: Option<Range<usize>>,
    pub version_minor: u8,
    headers: Vec<(Range<usize>, Range<usize>)>,
    pub framing: Framing,
    /// The client wants the connection kept after this response.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expects_continue: bool,
}

impl Head {
    fn slice(&self, r: &Range<usize>) -> &[u8] {
        &self.bytes[r.clone()]
    }

    pub fn method(&self) -> &[u8] {
        self.slice(&self.method)
    }

    pub fn path(&self) -> &[u8] {
        self.slice(&self.path)
    }

    pub fn query(&self) -> Option<&[u8]> {
        self.query.as_ref().map(|r| self.slice(r))
    }

    pub fn fragment(&self) -> Option<&[u8]> {
        self.fragment.as_ref().map(|r| self.slice(r))
    }

    pub fn uri(&self) -> &[u8] {
        self.slice(&self.uri)
    }

    pub fn version(&self) -> &'static [u8] {
        if self.version_minor == 0 {
            b"HTTP/1.0"
        } else {
            b"HTTP/1.1"
        }
    }

    pub fn is_head(&self) -> bool {
        self.method() == b"HEAD"
    }

    /// Headers in arrival order, names lower-cased, values with surrounding whitespace
    /// trimmed.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (self.slice(n), self.slice(v)))
    }

    /// The first value of a header (`name` lower-case).
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The host the request is for: the absolute-form target's authority, else `Host`.
    pub fn host(&self) -> Option<&[u8]> {
        match &self.authority {
            Some(r) => Some(self.slice(r)),
            None => self.header(b"host"),
        }
    }

    /// The body length when it is known up front (0 for no body).
    pub fn content_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Chunked => None,
        }
    }
}

/// Why a head was refused, with the status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadError {
    pub status: Status,
    pub reason: &'static str,
}

fn refuse(status: Status, reason: &'static str) -> HeadError {
    HeadError { status, reason }
}

/// Parses a head at the start of `buf`. `Ok(None)`: incomplete, read more. On success the
/// head's length in `buf` is `head.len()`.
pub fn parse(buf: &[u8], limits: HeadLimits) -> Result<Option<(Head, usize)>, HeadError> {
    // Most requests fit 64 header slots on the stack; more are tried only when needed
    // (zeroing `limits.header_count` slots per request cost more than the parse).
    let mut slots = [httparse::EMPTY_HEADER; 64];
    match parse_with(buf, limits, &mut slots[..limits.max_headers.min(64)]) {
        Err(e)
            if e.status == Status::HEADERS_TOO_LARGE
                && e.reason == TOO_MANY
                && limits.max_headers > 64 =>
        {
            parse_with(
                buf,
                limits,
                &mut vec![httparse::EMPTY_HEADER; limits.max_headers],
            )
        }
        result => result,
    }
}

const TOO_MANY: &str = "too many headers";

fn parse_with<'b>(
    buf: &'b [u8],
    limits: HeadLimits,
    slots: &mut [httparse::Header<'b>],
) -> Result<Option<(Head, usize)>, HeadError> {
    let mut req = httparse::Request::new(slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return check_partial(buf, limits).map(|()| None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(Status::HEADERS_TOO_LARGE, TOO_MANY))
        }
        Err(httparse::Error::Version) => {
            return Err(refuse(Status::BAD_REQUEST, "not HTTP/1.0 or HTTP/1.1"))
        }
        Err(_) => return Err(refuse(Status::BAD_REQUEST, "malformed request head")),
    };
    if len > limits.max_head {
        return Err(too_large(buf, limits));
    }
    let offset = |s: &[u8]| s.as_ptr() as usize - buf.as_ptr() as usize;
    let range = |s: &[u8]| offset(s)..offset(s) + s.len();
    let method = range(req.method.unwrap_or_default().as_bytes());
    let target = range(req.path.unwrap_or_default().as_bytes());
    let version_minor = req.version.unwrap_or(1);
    let headers: Vec<_> = req
        .headers
        .iter()
        .map(|h| (range(h.name.as_bytes()), range(trim(h.value))))
        .collect();
    let mut bytes = buf[..len].to_vec();
    for (name, _) in &headers {
        bytes[name.clone()].make_ascii_lowercase();
    }
    let mut head = Head {
        bytes,
        method,
        path: 0..0,
        query: None,
        fragment: None,
        uri: 0..0,
        authority: None,
        version_minor,
        headers,
        framing: Framing::Length(0),
        keep_alive: version_minor == 1,
        expects_continue: false,
    };
    split_target(&mut head, target)?;
    check_fields(&mut head)?;
    Ok(Some((head, len)))
}

/// A head still incomplete must fit the limit.
fn check_partial(buf: &[u8], limits: HeadLimits) -> Result<(), HeadError> {
    if buf.len() <= limits.max_head {
        return Ok(());
    }
    Err(too_large(buf, limits))
}

/// A head over the limit: 414 when the request line alone does not fit, else 431.
fn too_large(buf: &[u8], limits: HeadLimits) -> HeadError {
    if buf[..limits.max_head].contains(&b'\n') {
        refuse(Status::HEADERS_TOO_LARGE, "request head too large")
    } else {
        refuse(Status::URI_TOO_LONG, "request line too long")
    }
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &value[start..end]
}

/// Origin-form `/path?query#fragment`, absolute-form `http://authority/path...`, or `*`.
fn split_target(head: &mut Head, target: Range<usize>) -> Result<(), HeadError> {
    let bytes = &head.bytes[target.clone()];
    let mut start = target.start;
    if bytes.first() != Some(&b'/') && bytes != b"*" {
        let lower = bytes.to_ascii_lowercase();
        let scheme = [&b"http://"[..], b"https://"]
            .into_iter()
            .find(|s| lower.starts_with(s))
            .ok_or(refuse(Status::BAD_REQUEST, "malformed request target"))?;
        let after = start + scheme.len();
        let end = head.bytes[after..target.end]
            .iter()
            .position(|&b| b == b'/' || b == b'?' || b == b'#')
            .map_or(target.end, |p| after + p);
        if end == after {
            return Err(refuse(
                Status::BAD_REQUEST,
                "absolute target without a host",
            ));
        }
        head.authority = Some(after..end);
        start = end;
    }
    let end = target.end;
    let hash = head.bytes[start..end]
        .iter()
        .position(|&b| b == b'#')
        .map(|p| start + p);
    let uri_end = hash.unwrap_or(end);
    head.fragment = hash.map(|h| h + 1..end);
    head.uri = start..uri_end;
    let question = head.bytes[start..uri_end]
        .iter()
        .position(|&b| b == b'?')
        .map(|p| start + p);
    head.path = start..question.unwrap_or(uri_end);
    head.query = question.map(|q| q + 1..uri_end);
    Ok(())
}

/// Framing, Host, Connection and Expect.
fn check_fields(head: &mut Head) -> Result<(), HeadError> {
    let mut length = None;
    let mut chunked = false;
    let mut hosts = 0;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    for (name, value) in head.headers() {
        match name {
            b"content-length" => {
                if length.is_some() {
                    return Err(refuse(Status::BAD_REQUEST, "repeated Content-Length"));
                }
                length = Some(parse_length(value)?);
            }
            b"transfer-encoding" => {
                if chunked {
                    return Err(refuse(Status::BAD_REQUEST, "chunked applied twice"));
                }
                let mut codings = value.split(|&b| b == b',').map(trim);
                let last = codings.next_back().unwrap_or_default();
                if codings.next().is_some() || !last.eq_ignore_ascii_case(b"chunked") {
                    return Err(refuse(
                        Status::NOT_IMPLEMENTED,
                        "a transfer coding other than chunked",
                    ));
                }
                chunked = true;
            }
            b"host" => hosts += 1,
            b"connection" => {
                for option in value.split(|&b| b == b',').map(trim) {
                    connection_close |= option.eq_ignore_ascii_case(b"close");
                    connection_keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            _ => {}
        }
    }
    if chunked && length.is_some() {
        return Err(refuse(
            Status::BAD_REQUEST,
            "Content-Length with Transfer-Encoding",
        ));
    }
    if chunked && head.version_minor == 0 {
        return Err(refuse(Status::BAD_REQUEST, "Transfer-Encoding in HTTP/1.0"));
    }
    if hosts > 1 {
        return Err(refuse(Status::BAD_REQUEST, "repeated Host"));
    }
    if hosts == 0 && head.version_minor == 1 && head.authority.is_none() {
        return Err(refuse(Status::BAD_REQUEST, "HTTP/1.1 request without Host"));
    }
    head.framing = if chunked {
        Framing::Chunked
    } else {
        Framing::Length(length.unwrap_or(0))
    };
    head.keep_alive = if head.version_minor == 0 {
        connection_keep_alive && !connection_close
    } else {
        !connection_close
    };
    if let Some(expect) = head.header(b"expect") {
        if !expect.eq_ignore_ascii_case(b"100-continue") {
            return Err(refuse(Status::EXPECTATION_FAILED, "unknown expectation"));
        }
        head.expects_continue = head.version_minor == 1;
    }
    Ok(())
}

/// `1*DIGIT`, nothing else (no sign, no spaces inside, no list), and it must fit.
fn parse_length(value: &[u8]) -> Result<u64, HeadError> {
    let bad = || refuse(Status::BAD_REQUEST, "malformed Content-Length");
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_head: 4096,
        max_headers: 64,
    };

    fn ok(raw: &[u8]) -> Head {
        let (head, len) = parse(raw, LIMITS).unwrap().unwrap();
        assert_eq!(len, raw.len());
        head
    }

    fn status(raw: &[u8]) -> Status {
        parse(raw, LIMITS).unwrap_err().status
    }

    #[test]
    fn parses_target_parts_and_lowercases_names() {
        let h = ok(
            b"GET /a/b%20c?x=1&y#frag HTTP/1.1\r\nHost: ex:80\r\nX-Dup: 1\r\nx-dup:  2 \r\n\r\n",
        );
        assert_eq!(h.method(), b"GET");
        assert_eq!(h.path(), b"/a/b%20c");
        assert_eq!(h.query(), Some(&b"x=1&y"[..]));
        assert_eq!(h.fragment(), Some(&b"frag"[..]));
        assert_eq!(h.uri(), b"/a/b%20c?x=1&y");
        assert_eq!(h.host(), Some(&b"ex:80"[..]));
        let dups: Vec<_> = h
            .headers()
            .filter(|(n, _)| *n == b"x-dup")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(dups, [&b"1"[..], b"2"]);
        assert!(h.keep_alive);
        assert_eq!(h.framing, Framing::Length(0));
    }

    #[test]
    fn absolute_form_gives_path_and_host() {
        let h = ok(b"GET http://other:81/x?q HTTP/1.1\r\nHost: ignored\r\n\r\n");
        assert_eq!(h.path(), b"/x");
        assert_eq!(h.host(), Some(&b"other:81"[..]));
        let h = ok(b"GET http://other HTTP/1.1\r\n\r\n");
        assert_eq!(h.path(), b"");
    }

    #[test]
    fn keep_alive_rules() {
        assert!(!ok(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(ok(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!ok(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: te, close\r\n\r\n").keep_alive);
    }

    #[test]
    fn framing_is_strict() {
        assert_eq!(
            ok(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n").framing,
            Framing::Length(12)
        );
        assert_eq!(
            ok(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").framing,
            Framing::Chunked
        );
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12abc\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        ] {
            assert_eq!(status(bad), Status::BAD_REQUEST, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Status::NOT_IMPLEMENTED
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue-x\r\n\r\n"),
            Status::EXPECTATION_FAILED
        );
        assert!(
            ok(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
                .expects_continue
        );
    }

    #[test]
    fn limits_answer_414_and_431() {
        let long_line = [&b"GET /"[..], &vec![b'a'; 5000]].concat();
        assert_eq!(
            parse(&long_line, LIMITS).unwrap_err().status,
            Status::URI_TOO_LONG
        );
        let mut big = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        big.extend_from_slice(&b"X: yyyyyyyyyyyyyyyyyyyyyyyyyyyyy\r\n".repeat(200));
        assert_eq!(
            parse(&big, LIMITS).unwrap_err().status,
            Status::HEADERS_TOO_LARGE
        );
        let many = [
            &b"GET / HTTP/1.1\r\nHost: a\r\n"[..],
            &b"X: y\r\n".repeat(70),
            b"\r\n",
        ]
        .concat();
        assert_eq!(status(&many), Status::HEADERS_TOO_LARGE);
        assert!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n", LIMITS)
            .unwrap()
            .is_none());
    }
}
