//! Request messages as a front end writes them: `UUID SP ID SP PATH SP HEADERS BODY`, the
//! grammar of [`crate::request`], byte for byte what mongrel2 sends, except that JSON headers
//! are always valid JSON (mongrel2 escapes only `"` and `\`, reference §2.4).

use crate::netstring::{push_decimal, write, write_framed};
use crate::request::{ConnId, HeaderEncoding};

/// A request message. `headers` are in arrival order; a repeated name becomes a list, as
/// mongrel2 sends it. Upper-case keys (`PATH`, `METHOD`, ...) are the caller's to include.
pub fn encode_request(
    out: &mut Vec<u8>,
    sender: &[u8],
    id: ConnId,
    path: &[u8],
    encoding: HeaderEncoding,
    headers: &[(&[u8], &[u8])],
    body: &[u8],
) {
    address(out, sender, id, path);
    match encoding {
        HeaderEncoding::Json => write_framed(out, b',', |out| json_object(out, headers)),
        HeaderEncoding::Tnetstring => write_framed(out, b'}', |out| tnetstring_dict(out, headers)),
    }
    write(out, body);
}

/// What a notice (path `@*`) tells a handler about a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The client went away.
    Disconnect,
    /// `download.flow_control`: this many bytes were written to the client.
    Credits(u64),
}

/// A notice message, as mongrel2 writes them (reference §5).
pub fn encode_notice(
    out: &mut Vec<u8>,
    sender: &[u8],
    id: ConnId,
    encoding: HeaderEncoding,
    notice: Notice,
) {
    let mut credits = Vec::new();
    let mut headers: Vec<(&[u8], &[u8])> = vec![(b"METHOD", b"JSON")];
    let body: &[u8] = match notice {
        Notice::Disconnect => b"{\"type\":\"disconnect\"}",
        Notice::Credits(n) => {
            push_decimal(&mut credits, n);
            headers.push((b"DOWNLOAD_CREDITS", &credits));
            b"{\"type\":\"credits\"}"
        }
    };
    encode_request(out, sender, id, b"@*", encoding, &headers, body);
}

fn address(out: &mut Vec<u8>, sender: &[u8], id: ConnId, path: &[u8]) {
    out.extend_from_slice(sender);
    out.push(b' ');
    push_decimal(out, id);
    out.push(b' ');
    out.extend_from_slice(path);
    out.push(b' ');
}

/// Header names in first-seen order, each with all its values. Found by scanning rather
/// than collected: a request has a dozen headers, and a list per name cost an allocation
/// each.
fn grouped<'a, 'h>(
    headers: &'a [(&'h [u8], &'h [u8])],
) -> impl Iterator<Item = (&'h [u8], Values<'a, 'h>)> {
    headers
        .iter()
        .enumerate()
        .filter_map(move |(i, &(name, _))| {
            let first = !headers[..i].iter().any(|&(n, _)| n == name);
            first.then_some((
                name,
                Values {
                    name,
                    rest: &headers[i..],
                },
            ))
        })
}

/// The values of one header name, in arrival order.
#[derive(Clone)]
struct Values<'a, 'h> {
    name: &'h [u8],
    rest: &'a [(&'h [u8], &'h [u8])],
}

impl<'h> Values<'_, 'h> {
    /// The value when the name came once.
    fn single(&self) -> Option<&'h [u8]> {
        let mut values = self.clone();
        let first = values.next();
        values.next().is_none().then_some(first).flatten()
    }
}

impl<'h> Iterator for Values<'_, 'h> {
    type Item = &'h [u8];

    fn next(&mut self) -> Option<&'h [u8]> {
        let at = self.rest.iter().position(|&(n, _)| n == self.name)?;
        let value = self.rest[at].1;
        self.rest = &self.rest[at + 1..];
        Some(value)
    }
}

fn json_object(out: &mut Vec<u8>, headers: &[(&[u8], &[u8])]) {
    out.push(b'{');
    for (i, (name, values)) in grouped(headers).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_string(out, name);
        out.push(b':');
        match values.single() {
            Some(one) => json_string(out, one),
            None => {
                out.push(b'[');
                for (j, v) in values.enumerate() {
                    if j > 0 {
                        out.push(b',');
                    }
                    json_string(out, v);
                }
                out.push(b']');
            }
        }
    }
    out.push(b'}');
}

/// A JSON string of `bytes`. Control characters are escaped; a byte that is not part of
/// valid UTF-8 becomes `\u00XX`, the character of the same number (Latin-1, as PEP 3333
/// decodes header bytes), so the text is always valid JSON. m2wire's parser reads such an
/// escape back as the byte, so the round trip is exact.
fn json_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    for chunk in bytes.utf8_chunks() {
        for &b in chunk.valid().as_bytes() {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0..=0x1f | 0x7f => unicode_escape(out, b),
                _ => out.push(b),
            }
        }
        for &b in chunk.invalid() {
            unicode_escape(out, b);
        }
    }
    out.push(b'"');
}

fn unicode_escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"\\u00");
    out.push(HEX[usize::from(b >> 4)]);
    out.push(HEX[usize::from(b & 15)]);
}

fn tnetstring_dict(out: &mut Vec<u8>, headers: &[(&[u8], &[u8])]) {
    for (name, values) in grouped(headers) {
        write(out, name);
        match values.single() {
            Some(one) => write(out, one),
            None => write_framed(out, b']', |list| values.for_each(|v| write(list, v))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Request;
    use proptest::prelude::*;

    #[test]
    fn writes_mongrel2s_json_request() {
        let mut out = Vec::new();
        encode_request(
            &mut out,
            b"snd",
            34,
            b"/h/form",
            HeaderEncoding::Json,
            &[
                (b"PATH", b"/h/form"),
                (b"cookie", b"a=1"),
                (b"cookie", b"b=2"),
                (b"METHOD", b"POST"),
            ],
            b"x=1",
        );
        assert_eq!(
            out,
            &b"snd 34 /h/form 57:{\"PATH\":\"/h/form\",\"cookie\":[\"a=1\",\"b=2\"],\"METHOD\":\"POST\"},3:x=1,"[..]
        );
    }

    #[test]
    fn writes_mongrel2s_tnetstring_request_and_notices() {
        let mut out = Vec::new();
        encode_request(
            &mut out,
            b"snd",
            1,
            b"/",
            HeaderEncoding::Tnetstring,
            &[(b"PATH", b"/"), (b"x", b"1"), (b"x", b"2")],
            b"",
        );
        assert_eq!(out, &b"snd 1 / 26:4:PATH,1:/,1:x,8:1:1,1:2,]}0:,"[..]);
        out.clear();
        encode_notice(
            &mut out,
            b"snd",
            7,
            HeaderEncoding::Json,
            Notice::Disconnect,
        );
        assert_eq!(
            out,
            &b"snd 7 @* 17:{\"METHOD\":\"JSON\"},21:{\"type\":\"disconnect\"},"[..]
        );
        out.clear();
        encode_notice(
            &mut out,
            b"snd",
            1,
            HeaderEncoding::Json,
            Notice::Credits(1067),
        );
        assert_eq!(
            out,
            &b"snd 1 @* 43:{\"METHOD\":\"JSON\",\"DOWNLOAD_CREDITS\":\"1067\"},18:{\"type\":\"credits\"},"[..]
        );
    }

    #[test]
    fn json_is_valid_for_control_characters_and_bytes_that_are_not_utf8() {
        let mut out = Vec::new();
        json_string(&mut out, b"a\tb\"\\\xc3\xa9\xff\x7f");
        assert_eq!(out, &b"\"a\\u0009b\\\"\\\\\xc3\xa9\\u00ff\\u007f\""[..]);
    }

    proptest! {
        /// Whatever the header bytes, the message parses back (m2wire's own parser, both
        /// encodings) with the same names, and JSON values are exactly recovered when they
        /// are UTF-8 (bytes that are not come back as their Latin-1 characters).
        #[test]
        fn round_trips(values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..6), body in proptest::collection::vec(any::<u8>(), 0..40)) {
            let names: Vec<Vec<u8>> = (0..values.len()).map(|i| format!("h{}", i % 3).into_bytes()).collect();
            let headers: Vec<(&[u8], &[u8])> = names.iter().zip(&values).map(|(n, v)| (n.as_slice(), v.as_slice())).collect();
            for encoding in [HeaderEncoding::Json, HeaderEncoding::Tnetstring] {
                let mut out = Vec::new();
                encode_request(&mut out, b"s-1", 9, b"/p", encoding, &headers, &body);
                let req = Request::parse(&out).unwrap();
                prop_assert_eq!(req.conn_id, 9);
                prop_assert_eq!(req.body, &body[..]);
                for (name, value) in &headers {
                    let found = crate::find_header(&out, name);
                    prop_assert_eq!(found.as_deref(), req.header(name));
                    let got = req.headers.get(name).unwrap();
                    let all = got.joined(b"\x00");
                    prop_assert!(all.windows(value.len().max(1)).any(|w| w == *value) || value.is_empty());
                }
            }
        }
    }
}
