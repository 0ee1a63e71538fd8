//! Request bodies: `Content-Length` counted, `chunked` decoded strictly (RFC 9112 §7.1).
//!
//! The decoder is incremental: it takes whatever bytes have arrived, hands the body's bytes
//! to the caller and says how much input it used, so a body of any size passes through a
//! fixed buffer. The same decoder finds where a handler's chunked response ends.

/// Longest chunk-size line, extensions included, and longest trailer line.
const MAX_LINE: usize = 4096;
/// Most trailer bytes in all.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError(pub &'static str);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoder {
    Length { remaining: u64 },
    Chunked(Chunked),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: State,
    /// A line (size or trailer) being gathered across reads.
    line: Vec<u8>,
    trailer_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data { remaining: u64 },
    DataEnd,
    Trailer,
    Done,
}

/// What one call to [`Decoder::decode`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Input bytes used.
    pub used: usize,
    /// The body is complete.
    pub done: bool,
}

impl Decoder {
    pub fn length(n: u64) -> Decoder {
        Decoder::Length { remaining: n }
    }

    pub fn chunked() -> Decoder {
        Decoder::Chunked(Chunked {
            state: State::Size,
            line: Vec::new(),
            trailer_bytes: 0,
        })
    }

    pub fn is_done(&self) -> bool {
        match self {
            Decoder::Length { remaining } => *remaining == 0,
            Decoder::Chunked(c) => c.state == State::Done,
        }
    }

    /// Consumes framing from `input` and passes body bytes to `data`.
    pub fn decode(&mut self, input: &[u8], data: &mut dyn FnMut(&[u8])) -> Result<Step, BodyError> {
        match self {
            Decoder::Length { remaining } => {
                let n = input
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                if n > 0 {
                    data(&input[..n]);
                }
                *remaining -= n as u64;
                Ok(Step {
                    used: n,
                    done: *remaining == 0,
                })
            }
            Decoder::Chunked(c) => c.decode(input, data),
        }
    }
}

impl Chunked {
    fn decode(&mut self, input: &[u8], data: &mut dyn FnMut(&[u8])) -> Result<Step, BodyError> {
        let mut at = 0;
        while at < input.len() && self.state != State::Done {
            match self.state {
                State::Data { remaining } => {
                    let n =
                        (input.len() - at).min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    data(&input[at..at + n]);
                    at += n;
                    self.state = if remaining == n as u64 {
                        State::DataEnd
                    } else {
                        State::Data {
                            remaining: remaining - n as u64,
                        }
                    };
                }
                _ => {
                    let Some(line_end) = self.gather_line(&input[at..])? else {
                        at = input.len();
                        break;
                    };
                    at += line_end;
                    let line = std::mem::take(&mut self.line);
                    self.on_line(&line)?;
                }
            }
        }
        Ok(Step {
            used: at,
            done: self.state == State::Done,
        })
    }

    /// Appends to the current line up to and including its CRLF; the input used, once the
    /// line is whole.
    fn gather_line(&mut self, input: &[u8]) -> Result<Option<usize>, BodyError> {
        match input.iter().position(|&b| b == b'\n') {
            Some(p) => {
                self.line.extend_from_slice(&input[..=p]);
                if self.line.len() > MAX_LINE {
                    return Err(BodyError("chunk line too long"));
                }
                Ok(Some(p + 1))
            }
            None => {
                self.line.extend_from_slice(input);
                if self.line.len() > MAX_LINE {
                    return Err(BodyError("chunk line too long"));
                }
                Ok(None)
            }
        }
    }

    fn on_line(&mut self, line: &[u8]) -> Result<(), BodyError> {
        let line = line
            .strip_suffix(b"\r\n")
            .ok_or(BodyError("chunk line not ended by CRLF"))?;
        if line.contains(&b'\r') || line.contains(&0) {
            return Err(BodyError("bare CR or NUL in chunk framing"));
        }
        self.state = match self.state {
            State::Size => match parse_size(line)? {
                0 => State::Trailer,
                n => State::Data { remaining: n },
            },
            State::DataEnd if line.is_empty() => State::Size,
            State::DataEnd => return Err(BodyError("chunk data longer than its size")),
            State::Trailer if line.is_empty() => State::Done,
            State::Trailer => {
                self.trailer_bytes += line.len();
                if self.trailer_bytes > MAX_TRAILERS {
                    return Err(BodyError("trailers too large"));
                }
                if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') || !line.contains(&b':')
                {
                    return Err(BodyError("malformed trailer"));
                }
                State::Trailer
            }
            State::Data { .. } | State::Done => unreachable!("lines are read only between data"),
        };
        Ok(())
    }
}

/// `1*HEXDIG [ ";" chunk-ext ]`; the size must fit 60 bits (no overflow games).
fn parse_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits_end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let digits = &line[..digits_end];
    let digits = digits
        .strip_suffix(b" ")
        .or_else(|| digits.strip_suffix(b"\t"))
        .unwrap_or(digits);
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(BodyError("malformed chunk size"));
    }
    Ok(digits.iter().fold(0u64, |n, &d| {
        n * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(
        decoder: &mut Decoder,
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, usize), BodyError> {
        let mut out = Vec::new();
        let mut used = 0;
        for piece in input.chunks(step.max(1)) {
            let mut at = 0;
            while at < piece.len() && !decoder.is_done() {
                let s = decoder.decode(&piece[at..], &mut |d| out.extend_from_slice(d))?;
                at += s.used;
                used += s.used;
                if s.used == 0 {
                    break;
                }
            }
        }
        Ok((out, used))
    }

    #[test]
    fn decodes_chunks_extensions_and_trailers() {
        let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let mut d = Decoder::chunked();
        let (out, used) = run(&mut d, input, 1000).unwrap();
        assert_eq!(out, b"hello world");
        assert_eq!(&input[used..], b"NEXT");
        assert!(d.is_done());
    }

    #[test]
    fn refuses_what_could_be_read_two_ways() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
            b"fffffffffffffffff\r\n",
            b"\r\n",
            b"5\rX\r\nhello",
            b"0\r\n folded\r\n\r\n",
            b"0\r\nnocolon\r\n\r\n",
        ] {
            assert!(
                run(&mut Decoder::chunked(), bad, 1000).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn length_stops_at_its_end() {
        let mut d = Decoder::length(3);
        let (out, used) = run(&mut d, b"abcdef", 1000).unwrap();
        assert_eq!((out.as_slice(), used), (&b"abc"[..], 3));
    }

    proptest! {
        /// Any body, cut into any chunks, read in any pieces, comes back whole, and the
        /// decoder stops exactly at the end of the framing.
        #[test]
        fn chunked_round_trip(body in proptest::collection::vec(any::<u8>(), 0..2000), cuts in proptest::collection::vec(1usize..300, 1..20), step in 1usize..64) {
            let mut framed = Vec::new();
            let mut rest = &body[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                framed.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                framed.extend_from_slice(&rest[..n]);
                framed.extend_from_slice(b"\r\n");
                rest = &rest[n..];
                i += 1;
            }
            framed.extend_from_slice(b"0\r\n\r\n");
            let total = framed.len();
            framed.extend_from_slice(b"GET /next");
            let mut d = Decoder::chunked();
            let (out, used) = run(&mut d, &framed, step).unwrap();
            prop_assert_eq!(out, body);
            prop_assert_eq!(used, total);
        }

        /// Arbitrary input never panics the decoder.
        #[test]
        fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = run(&mut Decoder::chunked(), &input, 7);
        }
    }
}
