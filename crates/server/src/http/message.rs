//! A request head as a mongrel2 request message: what the front end sends its handlers, and
//! what a worker builds itself for a request it reads from a connection it holds
//! (`crate::front::lend`), so that both say the same to the app.

use m2wire::encode_request;
use m2wire::request::HeaderEncoding;

use super::request::Head;

/// Who asks, and where the message goes: what is the same for every request of a connection.
pub struct Origin<'a> {
    /// The handler's `send_ident`.
    pub sender: &'a [u8],
    pub conn_id: u64,
    pub encoding: HeaderEncoding,
    pub remote_ip: &'a str,
    pub scheme: &'a [u8],
    /// The route's pattern (`PATTERN`).
    pub pattern: &'a [u8],
    /// `no_clobber_xff`: keep a client's X-Forwarded-For.
    pub no_clobber_xff: bool,
}

/// Appends `head`'s message to `out`: its headers (less any a client may not forge), the
/// server's own, `extra` ones, and `body`. `length`: the body's length replaces a chunked
/// request's framing, as its body is whole here.
pub fn encode(
    out: &mut Vec<u8>,
    origin: &Origin<'_>,
    head: &Head,
    length: Option<&[u8]>,
    extra: &[(&[u8], &[u8])],
    body: &[u8],
) {
    let mut client_xff = None;
    let mut headers: Vec<(&[u8], &[u8])> = Vec::with_capacity(24);
    headers.push((b"PATH", head.path()));
    for (name, value) in head.headers() {
        // No client may forge an upload, nor our framing.
        if name.starts_with(b"x-mongrel2-") || (length.is_some() && name == b"transfer-encoding") {
            continue;
        }
        if name == b"x-forwarded-for" {
            client_xff.get_or_insert(value);
            if !origin.no_clobber_xff {
                continue;
            }
        }
        headers.push((name, value));
    }
    if let Some(length) = length {
        headers.push((b"content-length", length));
    }
    if !(origin.no_clobber_xff && client_xff.is_some()) {
        headers.push((b"x-forwarded-for", origin.remote_ip.as_bytes()));
    }
    headers.push((b"METHOD", head.method()));
    headers.push((b"VERSION", head.version()));
    headers.push((b"URI", head.uri()));
    if let Some(q) = head.query() {
        headers.push((b"QUERY", q));
    }
    if let Some(f) = head.fragment() {
        headers.push((b"FRAGMENT", f));
    }
    headers.push((b"PATTERN", origin.pattern));
    headers.push((b"URL_SCHEME", origin.scheme));
    headers.push((b"REMOTE_ADDR", origin.remote_ip.as_bytes()));
    headers.extend_from_slice(extra);
    out.reserve(256 + body.len() + 32 * headers.len());
    encode_request(
        out,
        origin.sender,
        origin.conn_id,
        head.path(),
        origin.encoding,
        &headers,
        body,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::request::{parse, HeadLimits};
    use m2wire::request::Request;
    use proptest::prelude::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_head: 16 << 10,
        max_headers: 64,
    };

    fn origin(no_clobber_xff: bool) -> Origin<'static> {
        Origin {
            sender: b"wsgid-local",
            conn_id: 42,
            encoding: HeaderEncoding::Tnetstring,
            remote_ip: "10.1.2.3",
            scheme: b"http",
            pattern: b"/",
            no_clobber_xff,
        }
    }

    fn header_name() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9-]{0,12}"
    }

    proptest! {
        /// Whatever head a client sends, the handler reads back what it said, and none of
        /// the server's own headers or a forged upload.
        #[test]
        fn a_head_reads_back_as_the_client_sent_it(
            path in "/[a-z0-9/._~-]{0,20}",
            query in proptest::option::of("[a-z0-9=&]{0,12}"),
            headers in proptest::collection::vec((header_name(), "[ -~]{0,20}"), 0..8),
            no_clobber_xff in any::<bool>(),
        ) {
            let target = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            let mut wire = format!("GET {target} HTTP/1.1\r\nHost: x\r\n");
            for (name, value) in &headers {
                if name != "host" && name != "content-length" && name != "transfer-encoding" {
                    wire.push_str(&format!("{name}: {}\r\n", value.trim()));
                }
            }
            wire.push_str("\r\n");
            let Ok(Some((head, _))) = parse(wire.as_bytes(), LIMITS) else {
                return Ok(());
            };
            let mut out = Vec::new();
            encode(&mut out, &origin(no_clobber_xff), &head, None, &[(b"DIRECT", b"2")], b"");
            let req = Request::parse(&out).expect("a message the handler reads");
            prop_assert_eq!(req.conn_id, 42);
            prop_assert_eq!(req.path, path.as_bytes());
            prop_assert_eq!(req.header(b"METHOD"), Some(&b"GET"[..]));
            prop_assert_eq!(req.header(b"QUERY"), query.as_deref().map(str::as_bytes));
            prop_assert_eq!(req.header(b"REMOTE_ADDR"), Some(&b"10.1.2.3"[..]));
            prop_assert_eq!(req.header(b"DIRECT"), Some(&b"2"[..]));
            prop_assert!(req.header(b"x-mongrel2-upload-done").is_none());
            for (name, value) in head.headers() {
                if name.starts_with(b"x-mongrel2-") {
                    continue;
                }
                if name == b"x-forwarded-for" && !no_clobber_xff {
                    prop_assert_eq!(req.header(name), Some(&b"10.1.2.3"[..]));
                    continue;
                }
                let seen = req.header(name);
                prop_assert!(seen.is_some(), "{:?} lost", String::from_utf8_lossy(name));
                if head.headers().filter(|(n, _)| *n == name).count() == 1 {
                    prop_assert_eq!(seen, Some(value));
                }
            }
        }
    }

    #[test]
    fn a_client_cannot_forge_an_upload_nor_the_forwarded_address() {
        let wire = b"GET / HTTP/1.1\r\nHost: x\r\nX-Mongrel2-Upload-Done: /etc/passwd\r\n\
X-Forwarded-For: 6.6.6.6\r\n\r\n";
        let (head, _) = parse(wire, LIMITS).unwrap().unwrap();
        let mut out = Vec::new();
        encode(&mut out, &origin(false), &head, None, &[], b"");
        let req = Request::parse(&out).unwrap();
        assert!(req.header(b"x-mongrel2-upload-done").is_none());
        assert_eq!(req.header(b"x-forwarded-for"), Some(&b"10.1.2.3"[..]));
    }
}
