//! Netstrings: `LEN ":" PAYLOAD ","`, with LEN in ASCII decimal.
//!
//! The parser also returns the byte after the payload, because tnetstrings reuse the same
//! framing with a type tag in place of the `,`.

use crate::error::WireError;

/// Longest length prefix accepted: 10 digits covers every body mongrel2 can send (u32) and
/// keeps the multiplication below from overflowing.
const MAX_LEN_DIGITS: usize = 10;

/// Splits `LEN:PAYLOAD<tag>` off the front of `input`; returns `(payload, tag, rest)`.
/// `base` is the offset of `input` in the whole message, for error reports.
pub fn split_tagged(input: &[u8], base: usize) -> Result<(&[u8], u8, &[u8]), WireError> {
    let colon = input
        .iter()
        .take(MAX_LEN_DIGITS + 1)
        .position(|&b| b == b':')
        .ok_or_else(|| WireError::at(base, "netstring length without ':'"))?;
    if colon == 0 {
        return Err(WireError::at(base, "netstring with an empty length"));
    }
    let mut len: usize = 0;
    for &digit in &input[..colon] {
        if !digit.is_ascii_digit() {
            return Err(WireError::at(
                base,
                "netstring length is not a decimal number",
            ));
        }
        len = len * 10 + usize::from(digit - b'0');
    }
    let start = colon + 1;
    let end = start
        .checked_add(len)
        .filter(|&end| end < input.len())
        .ok_or_else(|| WireError::at(base, "netstring payload runs past the end"))?;
    Ok((&input[start..end], input[end], &input[end + 1..]))
}

/// Splits a `,`-terminated netstring off the front of `input`; returns `(payload, rest)`.
pub fn split(input: &[u8], base: usize) -> Result<(&[u8], &[u8]), WireError> {
    let (payload, tag, rest) = split_tagged(input, base)?;
    if tag != b',' {
        return Err(WireError::at(
            base + input.len() - rest.len() - 1,
            "netstring not terminated by ','",
        ));
    }
    Ok((payload, rest))
}

/// Appends `payload` to `out` as a netstring.
pub fn write(out: &mut Vec<u8>, payload: &[u8]) {
    write_tagged(out, payload, b',');
}

/// Appends `payload` to `out` framed with the given trailing tag byte.
pub fn write_tagged(out: &mut Vec<u8>, payload: &[u8], tag: u8) {
    push_decimal(out, payload.len() as u64);
    out.push(b':');
    out.extend_from_slice(payload);
    out.push(tag);
}

/// Appends the decimal digits of `n` (hot path of every message: each netstring has one).
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends what `fill` writes, framed as a netstring with `tag`. The payload is written in
/// place and its length slid in before it: a buffer of its own cost an allocation, and
/// messages nest netstrings (a header dict, a list in it).
pub fn write_framed(out: &mut Vec<u8>, tag: u8, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    fill(out);
    let mut digits = itoa::Buffer::new();
    let len = digits.format(out.len() - start).as_bytes();
    out.splice(start..start, len.iter().chain(b":").copied());
    out.push(tag);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_keeps_the_rest() {
        assert_eq!(
            split(b"3:abc,rest", 0).unwrap(),
            (&b"abc"[..], &b"rest"[..])
        );
        assert_eq!(split(b"0:,", 0).unwrap(), (&b""[..], &b""[..]));
    }

    #[test]
    fn rejects_broken_framing() {
        for bad in [
            &b"3:ab,"[..],
            b"3:abc",
            b":abc,",
            b"x:abc,",
            b"3abc,",
            b"3:abc}",
            b"",
        ] {
            assert!(split(bad, 0).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(split(b"99999999999:x,", 0).is_err());
    }

    proptest! {
        #[test]
        fn round_trips(payload in proptest::collection::vec(any::<u8>(), 0..300), rest in proptest::collection::vec(any::<u8>(), 0..10)) {
            let mut out = Vec::new();
            write(&mut out, &payload);
            out.extend_from_slice(&rest);
            let (p, r) = split(&out, 0).unwrap();
            prop_assert_eq!(p, &payload[..]);
            prop_assert_eq!(r, &rest[..]);
        }

        /// Framing in place writes what framing a finished payload writes, after whatever
        /// the buffer held.
        #[test]
        fn framing_in_place_is_framing(before in proptest::collection::vec(any::<u8>(), 0..20), payload in proptest::collection::vec(any::<u8>(), 0..2000), tag in any::<u8>()) {
            let mut framed = before.clone();
            write_framed(&mut framed, tag, |out| out.extend_from_slice(&payload));
            let mut tagged = before.clone();
            write_tagged(&mut tagged, &payload, tag);
            prop_assert_eq!(framed, tagged);
        }

        #[test]
        fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = split(&input, 0);
        }
    }
}
