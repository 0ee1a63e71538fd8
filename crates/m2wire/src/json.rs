//! mongrel2's JSON headers, parsed leniently and byte for byte.
//!
//! mongrel2 1.12 escapes only `"` and `\` when it writes JSON, so a header value can hold raw
//! control characters and bytes that are not UTF-8 (reference §2.4). A strict JSON parser would
//! fail such a request; this one keeps those bytes as they are. Standard escapes, `\uXXXX`
//! included, are decoded. The accepted shape is the one mongrel2 produces: one object whose
//! values are strings, lists of strings, or bare scalars (kept as their text).

use std::borrow::Cow;

use crate::error::WireError;
use crate::headers::{HeaderValue, Headers};

struct Cursor<'a> {
    input: &'a [u8],
    pos: usize,
    base: usize,
}

/// Parses a JSON object of header names to values. `base` is the text's offset in the whole
/// message, for error reports.
pub fn parse_header_object(input: &[u8], base: usize) -> Result<Headers<'_>, WireError> {
    let mut cur = Cursor {
        input,
        pos: 0,
        base,
    };
    let mut headers = Headers::with_capacity(16);
    cur.expect(b'{')?;
    if cur.peek_non_ws() == Some(b'}') {
        cur.pos += 1;
    } else {
        loop {
            let name = cur.string()?;
            cur.expect(b':')?;
            let value = match cur.peek_non_ws() {
                Some(b'[') => {
                    cur.pos += 1;
                    let mut items = Vec::with_capacity(4);
                    if cur.peek_non_ws() == Some(b']') {
                        cur.pos += 1;
                    } else {
                        loop {
                            items.push(cur.scalar()?);
                            if cur.list_separator(b']')? {
                                break;
                            }
                        }
                    }
                    HeaderValue::Many(items)
                }
                _ => HeaderValue::One(cur.scalar()?),
            };
            headers.push(name, value);
            if cur.list_separator(b'}')? {
                break;
            }
        }
    }
    if cur.peek_non_ws().is_some() {
        return Err(cur.error("trailing bytes after the JSON object"));
    }
    Ok(headers)
}

impl<'a> Cursor<'a> {
    fn error(&self, reason: &'static str) -> WireError {
        WireError::at(self.base + self.pos, reason)
    }

    fn peek_non_ws(&mut self) -> Option<u8> {
        while let Some(&b) = self.input.get(self.pos) {
            if !matches!(b, b' ' | b'\t' | b'\r' | b'\n') {
                return Some(b);
            }
            self.pos += 1;
        }
        None
    }

    fn expect(&mut self, byte: u8) -> Result<(), WireError> {
        if self.peek_non_ws() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(match byte {
                b'{' => "JSON headers do not start with '{'",
                b':' => "missing ':' after a JSON key",
                _ => "unexpected byte in JSON headers",
            }))
        }
    }

    /// After an item: `,` means more follow (false), `close` ends the container (true).
    fn list_separator(&mut self, close: u8) -> Result<bool, WireError> {
        match self.peek_non_ws() {
            Some(b',') => {
                self.pos += 1;
                Ok(false)
            }
            Some(b) if b == close => {
                self.pos += 1;
                Ok(true)
            }
            _ => Err(self.error("expected ',' or the end of a JSON container")),
        }
    }

    /// A string, or a bare scalar (number, true, false, null) kept as its text.
    fn scalar(&mut self) -> Result<Cow<'a, [u8]>, WireError> {
        if self.peek_non_ws() == Some(b'"') {
            return self.string();
        }
        let start = self.pos;
        while let Some(&b) = self.input.get(self.pos) {
            if matches!(b, b',' | b']' | b'}' | b' ' | b'\t' | b'\r' | b'\n') {
                break;
            }
            self.pos += 1;
        }
        if start == self.pos {
            return Err(self.error("expected a JSON value"));
        }
        Ok(Cow::Borrowed(&self.input[start..self.pos]))
    }

    fn string(&mut self) -> Result<Cow<'a, [u8]>, WireError> {
        if self.peek_non_ws() != Some(b'"') {
            return Err(self.error("expected a JSON string"));
        }
        self.pos += 1;
        let start = self.pos;
        // Fast path: no escapes, borrow the bytes as they are.
        while let Some(&b) = self.input.get(self.pos) {
            match b {
                b'"' => {
                    self.pos += 1;
                    return Ok(Cow::Borrowed(&self.input[start..self.pos - 1]));
                }
                b'\\' => break,
                _ => self.pos += 1,
            }
        }
        let mut owned = self.input[start..self.pos].to_vec();
        loop {
            match self.input.get(self.pos) {
                None => return Err(self.error("unterminated JSON string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Cow::Owned(owned));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    self.escape(&mut owned)?;
                }
                Some(&b) => {
                    owned.push(b);
                    self.pos += 1;
                }
            }
        }
    }

    fn escape(&mut self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let Some(&b) = self.input.get(self.pos) else {
            return Err(self.error("unterminated JSON escape"));
        };
        self.pos += 1;
        let simple = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let c = self.unicode_escape()?;
                // `\u0080`-`\u00ff` stand for single bytes that are not UTF-8: that is how
                // `encode` keeps JSON valid (mongrel2 itself never writes `\u`).
                if ('\u{80}'..='\u{ff}').contains(&c) {
                    out.push(c as u8);
                } else {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                return Ok(());
            }
            // Lenient: an unknown escape keeps both bytes, as written.
            other => {
                out.push(b'\\');
                other
            }
        };
        out.push(simple);
        Ok(())
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.input.get(self.pos..self.pos + 4)?;
        let text = std::str::from_utf8(digits).ok()?;
        let value = u32::from_str_radix(text, 16).ok()?;
        self.pos += 4;
        Some(value)
    }

    /// `\uXXXX`, combining surrogate pairs; a lone surrogate becomes U+FFFD.
    fn unicode_escape(&mut self) -> Result<char, WireError> {
        let first = self
            .hex4()
            .ok_or_else(|| self.error("bad \\u escape in JSON string"))?;
        if (0xD800..0xDC00).contains(&first)
            && self.input.get(self.pos..self.pos + 2) == Some(b"\\u")
        {
            let save = self.pos;
            self.pos += 2;
            match self.hex4() {
                Some(second) if (0xDC00..0xE000).contains(&second) => {
                    let c = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
                    return Ok(char::from_u32(c).unwrap_or('\u{FFFD}'));
                }
                _ => self.pos = save,
            }
        }
        Ok(char::from_u32(first).unwrap_or('\u{FFFD}'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_invalid_json_that_mongrel2_sends() {
        // Raw TAB and a non-UTF-8 byte, as captured in reference §2.4.
        let text = b"{\"PATH\":\"/handler/ctl\",\"x-utf8\":\"\xc3\xa9\xff\",\"x-ctl\":\"a\tb\"}";
        let headers = parse_header_object(text, 0).unwrap();
        assert_eq!(headers.first(b"x-utf8"), Some(&b"\xc3\xa9\xff"[..]));
        assert_eq!(headers.first(b"x-ctl"), Some(&b"a\tb"[..]));
    }

    #[test]
    fn decodes_escapes_and_lists() {
        let text = br#"{"x-quote":"say \"hi\" \\ back","x-dup":["one","two"],"u":"\u0101\ud83d\ude00","l":"\u00e9\u00ff","n":42}"#;
        let headers = parse_header_object(text, 0).unwrap();
        assert_eq!(headers.first(b"x-quote"), Some(&br#"say "hi" \ back"#[..]));
        assert_eq!(
            headers.get(b"x-dup").unwrap().joined(b", ").as_ref(),
            b"one, two"
        );
        assert_eq!(headers.first(b"u"), Some("ā😀".as_bytes()));
        // U+0080-U+00FF are single bytes (what `encode` writes for bytes that are not UTF-8).
        assert_eq!(headers.first(b"l"), Some(&b"\xe9\xff"[..]));
        assert_eq!(headers.first(b"n"), Some(&b"42"[..]));
    }

    #[test]
    fn rejects_non_objects_and_truncation() {
        for bad in [
            &b"[]"[..],
            b"{",
            b"{\"a\"}",
            b"{\"a\":\"b\"",
            b"{\"a\":\"b\"} x",
            b"{\"a\":}",
            b"",
        ] {
            assert!(
                parse_header_object(bad, 0).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_header_object(b"{}", 0).unwrap().is_empty());
    }

    proptest! {
        /// Whatever serde-free escaping we write for arbitrary bytes (only `"` and `\`
        /// escaped, as mongrel2 does) parses back to the same bytes.
        #[test]
        fn round_trips_mongrel2_escaping(value in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut text = b"{\"k\":\"".to_vec();
            for &b in &value {
                if b == b'"' || b == b'\\' { text.push(b'\\'); }
                text.push(b);
            }
            text.extend_from_slice(b"\"}");
            let headers = parse_header_object(&text, 0).unwrap();
            prop_assert_eq!(headers.first(b"k"), Some(&value[..]));
        }

        #[test]
        fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_header_object(&input, 0);
        }
    }
}
