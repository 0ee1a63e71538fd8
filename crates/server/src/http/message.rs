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
