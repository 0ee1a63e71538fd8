//! tnetstrings (`LEN:PAYLOAD<tag>`), the header encoding of `protocol='tnetstring'` handlers.
//!
//! Only what mongrel2 puts in a header dict is modelled: string keys mapped to strings or
//! lists of strings. Other scalars (`#` ints, `!` bools) keep their payload text; nulls are
//! dropped. Nested dicts are a protocol error.

use std::borrow::Cow;

use crate::error::WireError;
use crate::headers::{HeaderValue, Headers};
use crate::netstring::split_tagged;

/// Parses the payload of a tnetstring dict (what sits between `LEN:` and `}`).
/// `base` is the payload's offset in the whole message, for error reports.
pub fn parse_header_dict(payload: &[u8], base: usize) -> Result<Headers<'_>, WireError> {
    let mut headers = Headers::with_capacity(16);
    let mut rest = payload;
    while !rest.is_empty() {
        let offset = base + payload.len() - rest.len();
        let (key, tag, after_key) = split_tagged(rest, offset)?;
        if tag != b',' {
            return Err(WireError::at(offset, "tnetstring dict key is not a string"));
        }
        let offset = base + payload.len() - after_key.len();
        let (value, tag, after_value) = split_tagged(after_key, offset)?;
        rest = after_value;
        let value = match tag {
            b',' | b'#' | b'!' | b'^' => HeaderValue::One(Cow::Borrowed(value)),
            b']' => HeaderValue::Many(parse_string_list(value, offset)?),
            b'~' => continue,
            _ => return Err(WireError::at(offset, "unsupported tnetstring header value")),
        };
        headers.push(Cow::Borrowed(key), value);
    }
    Ok(headers)
}

/// The first value of `name` in a header dict's payload, found by walking it without
/// building the header map (a list value gives its first item). None when absent or when
/// the dict is malformed.
pub fn find_in_dict<'a>(payload: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut rest = payload;
    while !rest.is_empty() {
        let (key, _, after_key) = split_tagged(rest, 0).ok()?;
        let (value, tag, after_value) = split_tagged(after_key, 0).ok()?;
        rest = after_value;
        if key != name {
            continue;
        }
        match tag {
            b',' | b'#' | b'!' | b'^' => return Some(value),
            b']' => return split_tagged(value, 0).ok().map(|(first, _, _)| first),
            // A null is no value: the full parse drops it and takes a later one.
            b'~' => continue,
            _ => return None,
        }
    }
    None
}

fn parse_string_list(payload: &[u8], base: usize) -> Result<Vec<Cow<'_, [u8]>>, WireError> {
    let mut items = Vec::with_capacity(4);
    let mut rest = payload;
    while !rest.is_empty() {
        let offset = base + payload.len() - rest.len();
        let (item, tag, after) = split_tagged(rest, offset)?;
        if !matches!(tag, b',' | b'#' | b'!' | b'^') {
            return Err(WireError::at(
                offset,
                "tnetstring list item is not a string",
            ));
        }
        items.push(Cow::Borrowed(item));
        rest = after;
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mongrel2_header_dict() {
        let payload = b"6:METHOD,3:GET,6:cookie,12:3:a=1,3:b=2,]4:size,2:42#3:nil,0:~";
        let headers = parse_header_dict(payload, 0).unwrap();
        assert_eq!(headers.first(b"METHOD"), Some(&b"GET"[..]));
        assert_eq!(
            headers.get(b"cookie").unwrap().joined(b"; ").as_ref(),
            b"a=1; b=2"
        );
        assert_eq!(headers.first(b"size"), Some(&b"42"[..]));
        assert!(headers.get(b"nil").is_none());
    }

    #[test]
    fn finds_one_header_as_the_full_parse_does() {
        let payload = b"6:METHOD,3:GET,6:cookie,12:3:a=1,3:b=2,]4:size,2:42#3:nil,0:~";
        let headers = parse_header_dict(payload, 0).unwrap();
        for name in [&b"METHOD"[..], b"cookie", b"size", b"nil", b"absent"] {
            assert_eq!(find_in_dict(payload, name), headers.first(name));
        }
        assert_eq!(find_in_dict(b"1:a,5:abc,", b"a"), None);
        let null_first = b"1:a,0:~1:a,1:x,";
        let headers = parse_header_dict(null_first, 0).unwrap();
        assert_eq!(find_in_dict(null_first, b"a"), headers.first(b"a"));
    }

    #[test]
    fn rejects_nested_dicts_and_truncation() {
        assert!(parse_header_dict(b"1:a,3:1:b,}", 0).is_err());
        assert!(parse_header_dict(b"1:a,", 0).is_err());
        assert!(parse_header_dict(b"1:a,5:abc,", 0).is_err());
    }
}
